"""``sp.connect(address, token=None)``: a pool object for a running service (client process).

Runs in any client process. :class:`ServicePool` is what ``set_processing(pool=...)`` takes;
streams on it run on the service's warm workers (:mod:`.client_run`). Each request (a run, a
status, a stop) opens its own authenticated connection (:func:`open_connection`).
"""

from __future__ import annotations

import multiprocessing.connection
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from ..errors import AuthenticationError, ServiceUnavailableError
from . import protocol
from .tokens import default_token_path, parse_address, read_token

if TYPE_CHECKING:
    from multiprocessing.connection import Connection


def connect(address: str, token: Optional[str] = None) -> ServicePool:
    """A pool for the service at ``address`` (``"127.0.0.1:P"``), to pass as ``set_processing(pool=...)``.

    Runs in the client process; checks at once that the service answers, accepts the token and
    runs the same streamproc, dill and Python versions (a status request).

    >>> import streamproc as sp
    >>> sp.connect("127.0.0.1:1", token="x")  # doctest: +SKIP
    Traceback (most recent call last):
    streamproc.errors.ServiceUnavailableError: no streamproc service at 127.0.0.1:1 ...

    Args:
        address: ``"host:port"`` of a ``streamproc serve``.
        token: the service's token; None reads the default token file of the port
            (``$XDG_RUNTIME_DIR/streamproc/<port>.token``, else ``~/.cache/streamproc/<port>.token``).

    Raises:
        ValueError: a malformed address or token.
        AuthenticationError: the service refused the token.
        ServiceUnavailableError: nothing answers there, a version mismatch, or no token file.
    """
    host, port = parse_address(address)
    if token is None:
        token = read_token(default_token_path(port))
    if not isinstance(token, str) or not token or not token.isascii():
        raise ValueError(f"connect(token=...): expected the service's token (an ASCII string), got {type(token).__name__}")
    pool = ServicePool(f"{host}:{port}", token)
    pool.refresh()
    return pool


class ServicePool:
    """A running service, as ``set_processing(pool=...)`` takes it (client process).

    Holds the address and the token only, so it can be pickled to other processes. The
    worker counts and devices are the service's (as of :meth:`refresh`); like a
    :class:`~streamproc.WorkerPool`, it owns them: ``set_processing`` refuses them with it.
    """

    #: Accepted by ``set_processing(pool=...)``; the backend its streams run on.
    is_streamproc_pool = True
    backend_name = "service"

    def __init__(self, address: str, token: str) -> None:
        self.address = address
        self._token = token
        self._status: dict[str, Any] = {}

    @property
    def num_cpu_workers(self) -> int:
        return int(self._status.get("cpu_workers", 1))

    @property
    def gpu_worker_devices(self) -> tuple[Any, ...]:
        return tuple(d if isinstance(d, str) else tuple(d) for d in self._status.get("gpu_worker_devices", ()))

    def status(self) -> dict[str, Any]:
        """What the service reports now: workers, devices, models, runs (see ``streamproc status``)."""
        self.refresh()
        return dict(self._status)

    def refresh(self) -> None:
        conn = open_connection(self.address, self._token, "status")
        try:
            self._status = protocol.recv_json(conn, protocol.HANDSHAKE_TIMEOUT_S)
        except (OSError, EOFError, TimeoutError) as exc:
            raise ServiceUnavailableError(f"the streamproc service at {self.address} did not answer: {exc}") from None
        finally:
            conn.close()

    def stop(self) -> int:
        """Asks the service to stop (it finishes its runs first); returns the server's pid."""
        conn = open_connection(self.address, self._token, "stop")
        try:
            answer = protocol.recv_json(conn, protocol.HANDSHAKE_TIMEOUT_S)
        except (OSError, EOFError, TimeoutError) as exc:
            raise ServiceUnavailableError(f"the streamproc service at {self.address} did not answer: {exc}") from None
        finally:
            conn.close()
        return int(answer["pid"])

    def open_run(self) -> Connection:
        """An authenticated connection for one run (see :mod:`.client_run`)."""
        return open_connection(self.address, self._token, "run")

    def __repr__(self) -> str:
        return f"ServicePool({self.address!r}, num_cpu_workers={self.num_cpu_workers})"

    def __getstate__(self) -> dict[str, Any]:
        return {"address": self.address, "_token": self._token, "_status": self._status}


def open_connection(address: str, token: str, kind: str) -> Connection:
    """Connects, authenticates both ways and exchanges hellos (client process).

    Raises:
        AuthenticationError: a wrong token (either way).
        ServiceUnavailableError: nothing listens, no answer in time, a version mismatch, or
            a stopping service; each names the address.
    """
    host, port = parse_address(address)
    key = token.encode("ascii")
    try:
        sock = socket.create_connection((host, port), timeout=protocol.HANDSHAKE_TIMEOUT_S)
    except OSError as exc:
        raise ServiceUnavailableError(
            f"no streamproc service at {address} ({exc.strerror or exc}): start one with "
            f"`streamproc serve --port {port}`"
        ) from None
    sock.setblocking(True)
    conn = multiprocessing.connection.Connection(sock.detach())
    try:
        if not conn.poll(protocol.HANDSHAKE_TIMEOUT_S):
            raise ServiceUnavailableError(f"the streamproc service at {address} did not start the handshake in time")
        multiprocessing.connection.answer_challenge(conn, key)
        multiprocessing.connection.deliver_challenge(conn, key)
        conn.send_bytes(protocol.Hello(kind, protocol.local_versions()).to_bytes())
        answer = protocol.recv_json(conn, protocol.HANDSHAKE_TIMEOUT_S)
    except multiprocessing.AuthenticationError:
        conn.close()
        raise AuthenticationError(
            f"the streamproc service at {address} refused the token (the token is in the server's token file, "
            f"by default {default_token_path(port)})"
        ) from None
    except (OSError, EOFError, TimeoutError, ValueError) as exc:
        conn.close()
        raise ServiceUnavailableError(f"the streamproc service at {address} broke off the handshake: {exc!r}") from None
    except BaseException:
        conn.close()
        raise
    if not answer.get("ok"):
        conn.close()
        raise ServiceUnavailableError(f"the streamproc service at {address} refused the connection: {answer.get('error')}")
    return conn


def token_file_of(port: int, token_file: Optional[str]) -> Path:
    """The token file of a CLI command: ``--token-file``, else the default of the port."""
    return Path(token_file) if token_file else default_token_path(port)
