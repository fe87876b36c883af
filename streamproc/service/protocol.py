"""The service's wire protocol: messages, the handshake, and timed receives (client and server).

One TCP connection (a :class:`multiprocessing.connection.Connection`) per request. It opens
with the HMAC challenge of :mod:`multiprocessing.connection` in both directions (the token is
the key): nothing is unpickled before it succeeds. Then the client sends :class:`Hello` as
JSON (versions and what it asks for: ``"run"``, ``"status"`` or ``"stop"``) and the server
answers JSON (``{"ok": true, ...}``, or ``{"ok": false, "error": ...}`` for a version
mismatch or a stopping server). Only then do pickled messages flow:

* run: client -> server :class:`RunRequest`, then :class:`Payload` (one per source task, sent
  only against :class:`PayloadsWanted` credits), :class:`PayloadsEnd` or
  :class:`SourceFailed`, :class:`OutputsAcked` (one per output consumed) and :class:`Cancel`;
  server -> client :class:`PayloadsWanted`, :class:`Output`, :class:`Heartbeat` and one
  final :class:`RunDone` or :class:`RunFailed`.

Invariant (results): outputs sent - outputs acked <= ``OUTPUT_WINDOW``. Invariant (records):
payloads sent <= payloads wanted, so an in-memory source is pulled no faster than the
server's workers take tasks.
"""

from __future__ import annotations

import json
import multiprocessing.connection
import sys
from dataclasses import dataclass
from typing import Any, Optional

from ..errors import ExceptionWithTraceback
from ..execution.serialization import dumps_message, loads_message

#: Un-acked outputs the server may have sent on one connection.
OUTPUT_WINDOW = 8
#: The server sends a heartbeat this often on every open run connection.
HEARTBEAT_INTERVAL_S = 1.0
#: A client that hears nothing for this long takes the server for lost.
HEARTBEAT_TIMEOUT_S = 10.0
#: How long one handshake (challenge, hello) may take before the peer is dropped.
HANDSHAKE_TIMEOUT_S = 10.0
#: The most bytes of a JSON hello or answer (read before anything is trusted).
MAX_HELLO_BYTES = 64 * 1024

REQUEST_KINDS = ("run", "status", "stop")


def local_versions() -> dict[str, str]:
    """The versions a client and a server must share: streamproc, dill and Python (major.minor.micro)."""
    import importlib

    import dill

    # The package's own version; looked up, not imported (streamproc/__init__ imports the client).
    version = importlib.import_module("streamproc").__version__
    python = ".".join(map(str, sys.version_info[:3]))
    return {"streamproc": version, "dill": dill.__version__, "python": python}


def version_mismatch(server: dict[str, str], client: dict[str, str]) -> Optional[str]:
    """A sentence naming every version that differs between server and client (None: they agree).

    >>> version_mismatch({"dill": "0.3.8"}, {"dill": "0.3.9"})
    'dill 0.3.8 on the server, 0.3.9 in the client'
    """
    differ = [
        f"{name} {server[name]} on the server, {client.get(name)} in the client"
        for name in server
        if client.get(name) != server[name]
    ]
    return "; ".join(differ) or None


@dataclass(frozen=True)
class Hello:
    """The client's first message after authentication (sent as JSON, never pickled)."""

    kind: str
    versions: dict[str, str]

    def to_bytes(self) -> bytes:
        return json.dumps({"kind": self.kind, "versions": self.versions}).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Hello:
        """Raises ValueError on anything but a well-formed hello."""
        value = json.loads(data.decode())
        if not isinstance(value, dict):
            raise ValueError(f"not a streamproc hello: {data[:80]!r}")
        kind, versions = value.get("kind"), value.get("versions")
        if kind not in REQUEST_KINDS or not isinstance(versions, dict):
            raise ValueError(f"not a streamproc hello: {data[:80]!r}")
        return cls(kind, {str(k): str(v) for k, v in versions.items()})


@dataclass(frozen=True)
class RunRequest:
    """A stream to run: its plan as the workers receive it (dill bytes), and the sink's finalizer."""

    plan_bytes: bytes
    client: str  # "pid 1234 on host", for status and errors


@dataclass(frozen=True)
class PayloadsWanted:
    """Server -> client: send ``count`` more task payloads."""

    count: int


@dataclass(frozen=True)
class Payload:
    """Client -> server: the next task payload of the source (``skipped``: a task this run does not do)."""

    payload: Any
    skipped: bool = False


@dataclass(frozen=True)
class PayloadsEnd:
    """Client -> server: the source has no more tasks."""


@dataclass(frozen=True)
class SourceFailed:
    """Client -> server: the client's source raised (the carrier rebuilds the user's exception)."""

    error: ExceptionWithTraceback


@dataclass(frozen=True)
class Output:
    """Server -> client: one :class:`~streamproc.execution.task.TaskOutput` of the run."""

    output: Any


@dataclass(frozen=True)
class OutputsAcked:
    """Client -> server: ``count`` outputs consumed (frees window)."""

    count: int


@dataclass(frozen=True)
class Heartbeat:
    """Server -> client: the server is alive (sent every ``HEARTBEAT_INTERVAL_S``)."""


@dataclass(frozen=True)
class Cancel:
    """Client -> server: stop the run (an early break, an error in the client)."""


@dataclass(frozen=True)
class RunDone:
    """Server -> client: the run completed; ``stats`` are the server's :class:`~streamproc.stats.RunStats`."""

    stats: Any


@dataclass(frozen=True)
class RunFailed:
    """Server -> client: the run raised (the user's error, a worker crash): the carrier rebuilds it."""

    error: ExceptionWithTraceback


def send(conn: multiprocessing.connection.Connection, message: Any) -> None:
    """Pickles ``message`` (the standard pickle, else dill) and sends it."""
    conn.send_bytes(dumps_message(message))


def recv(conn: multiprocessing.connection.Connection) -> Any:
    """The next message (blocking; EOFError/OSError when the peer is gone)."""
    return loads_message(conn.recv_bytes())


def recv_json(conn: multiprocessing.connection.Connection, timeout_s: float) -> Any:
    """The next message as JSON, at most ``MAX_HELLO_BYTES``, within ``timeout_s``.

    Raises:
        TimeoutError: nothing came in time.
        EOFError/OSError: the peer is gone (or sent more than ``MAX_HELLO_BYTES``).
        ValueError: not JSON.
    """
    if not conn.poll(timeout_s):
        raise TimeoutError(f"no answer within {timeout_s:.0f} s")
    return json.loads(conn.recv_bytes(MAX_HELLO_BYTES).decode())


def send_json(conn: multiprocessing.connection.Connection, value: Any) -> None:
    conn.send_bytes(json.dumps(value).encode())
