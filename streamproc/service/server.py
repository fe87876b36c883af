"""The service's server: a warm :class:`~streamproc.WorkerPool` behind an authenticated listener.

Runs in the server process (``streamproc serve``). The main thread accepts connections; each
gets a handler thread (``streamproc-service-conn-N``) that authenticates it (the HMAC
challenge of :mod:`multiprocessing.connection`, both ways, before anything is unpickled),
reads its JSON :class:`~.protocol.Hello`, checks the versions, then answers a status, a stop,
or runs the client's stream (:func:`.remote_run.serve_run`). Runs of several clients go to
the pool at once: the pool decides their order (it runs them in turn today; see
``docs/warm-pools.md``). A heartbeat thread tells every run's client that the server lives.

Stop (``streamproc stop``, SIGTERM, SIGINT): no new connection is accepted; runs already
started finish (for at most ``STOP_GRACE_S``, after which they are cancelled, their clients
getting ``ServiceUnavailableError``); then the pool is closed, the token file removed, and
the process exits.
"""

from __future__ import annotations

import logging
import multiprocessing.connection
import os
import signal
import socket
import threading
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from . import protocol
from .remote_run import serve_run, shutdown_socket
from .tokens import LOOPBACK_HOSTS, remove_token

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    from ..plan import Plan
    from .pool import WorkerPool

logger = logging.getLogger("streamproc.service")

#: How long ``stop`` lets the runs already started finish before cancelling them.
STOP_GRACE_S = 30.0
#: After cancelling: how long the cancelled runs get to drain and end.
CANCEL_JOIN_S = 10.0


class _ActiveRun:
    def __init__(self, conn: Connection, send_lock: threading.Lock, client: str) -> None:
        self.conn = conn
        self.send_lock = send_lock
        self.client = client
        self.started = time.time()


class ServiceServer:
    """The listener, its connection handlers and the pool they share (server process).

    Binds at once (so that a busy port fails before any worker starts); serves from
    :meth:`serve_until_stopped`, which takes the pool.

    Args:
        host: the address to bind (not loopback: a warning, the token is then all that guards it).
        port: the port (0: any free one, see :attr:`address`).
        token: the key every client must prove it knows.
        token_path: the token's file, removed at the end.
    """

    def __init__(self, host: str, port: int, token: str, token_path: Optional[Path] = None) -> None:
        if host not in LOOPBACK_HOSTS:
            warnings.warn(
                f"streamproc serve: listening on {host}, not only on this machine: anyone who can reach it "
                f"and has the token can run code here", RuntimeWarning, stacklevel=2,
            )
        self.pool: WorkerPool
        self._key = token.encode("ascii")
        self._token = token
        self._token_path = token_path
        self._sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.address = f"{host}:{self._sock.getsockname()[1]}"
        self._stopping = threading.Event()
        self._wakeup_reader, self._wakeup_writer = multiprocessing.connection.Pipe(duplex=False)
        self._lock = threading.Lock()
        self._active: dict[int, _ActiveRun] = {}
        #: Connections not running a stream (in their handshake, a status): shut at stop, not waited for.
        self._idle: dict[int, Connection] = {}
        self._handlers: list[threading.Thread] = []
        self._models: dict[str, dict[str, Any]] = {}
        self.runs_done = self.runs_failed = self.runs_cancelled = 0
        self.refused = 0
        self._started = time.time()

    # -- the main thread ---------------------------------------------------------------------
    def serve_until_stopped(self, pool: WorkerPool) -> None:
        """Accepts connections for ``pool`` until a stop; then drains the runs and closes the pool (main thread)."""
        self.pool = pool
        heartbeat = threading.Thread(target=self._send_heartbeats, name="streamproc-service-heartbeat", daemon=True)
        heartbeat.start()
        count = 0
        try:
            while not self._stopping.is_set():
                ready = multiprocessing.connection.wait([self._sock, self._wakeup_reader])
                if self._sock not in ready:
                    continue
                try:
                    client_sock, _ = self._sock.accept()
                except OSError:
                    continue
                client_sock.setblocking(True)
                conn = multiprocessing.connection.Connection(client_sock.detach())
                count += 1
                handler = threading.Thread(
                    target=self._handle, args=(conn,), name=f"streamproc-service-conn-{count}", daemon=True
                )
                self._handlers = [t for t in self._handlers if t.is_alive()] + [handler]
                handler.start()
        finally:
            self._sock.close()
            self._stopping.set()
            self._finish_runs()
            heartbeat.join(protocol.HEARTBEAT_INTERVAL_S * 2)
            self.pool.close()
            if self._token_path is not None:
                remove_token(self._token_path, self._token)

    def close(self) -> None:
        """Releases the port without serving (main thread; the server did not start)."""
        self._sock.close()
        self._wakeup_reader.close()
        self._wakeup_writer.close()

    def stop(self) -> None:
        """Asks the main thread to stop (any thread; a signal handler too). Idempotent."""
        self._stopping.set()
        try:
            self._wakeup_writer.send_bytes(b"stop")
        except OSError:
            pass

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT stop the server gracefully (main thread only)."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: self.stop())

    def _finish_runs(self) -> None:
        with self._lock:
            idle = list(self._idle.values())
        for conn in idle:  # a silent peer in its handshake must not hold the stop for the grace
            shutdown_socket(conn)
        deadline = time.monotonic() + STOP_GRACE_S
        for handler in list(self._handlers):
            handler.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            late = list(self._active.values())
        for run in late:  # past the grace: cancelled (its client sees the connection end)
            logger.warning("streamproc service: cancelling the run of %s at stop", run.client)
            shutdown_socket(run.conn)
        deadline = time.monotonic() + CANCEL_JOIN_S
        for handler in list(self._handlers):
            handler.join(max(0.0, deadline - time.monotonic()))

    # -- handler threads ---------------------------------------------------------------------
    def _handle(self, conn: Connection) -> None:
        """One connection: authenticate, hello, then a status, a stop or a run (handler thread)."""
        with self._lock:
            self._idle[id(conn)] = conn
        try:
            try:
                # Both ways, as Listener(authkey=...) does: the client proves it has the token,
                # then the server does. Nothing of the peer is unpickled before.
                multiprocessing.connection.deliver_challenge(conn, self._key)
                multiprocessing.connection.answer_challenge(conn, self._key)
            except (multiprocessing.AuthenticationError, EOFError, OSError) as exc:
                self.refused += 1
                logger.warning("streamproc service: refused a connection that failed authentication (%s)", exc)
                return
            hello = protocol.Hello.from_bytes(conn.recv_bytes(protocol.MAX_HELLO_BYTES)) if conn.poll(
                protocol.HANDSHAKE_TIMEOUT_S
            ) else None
            if hello is None:
                return
            mismatch = protocol.version_mismatch(protocol.local_versions(), hello.versions)
            if mismatch is not None:
                protocol.send_json(conn, {"ok": False, "error": f"version mismatch with the server: {mismatch}"})
                return
            if self._stopping.is_set() and hello.kind == "run":
                protocol.send_json(conn, {"ok": False, "error": "the service is stopping"})
                return
            protocol.send_json(conn, {"ok": True, "versions": protocol.local_versions()})
            if hello.kind == "status":
                protocol.send_json(conn, self.status())
            elif hello.kind == "stop":
                protocol.send_json(conn, {"stopping": True, "pid": os.getpid()})
                self.stop()
            else:
                self._run(conn)
        except Exception:  # a broken peer must not take the server down
            logger.exception("streamproc service: a connection failed")
        finally:
            with self._lock:
                self._idle.pop(id(conn), None)
            conn.close()

    def _run(self, conn: Connection) -> None:
        send_lock = threading.Lock()
        key = id(conn)
        with self._lock:
            self._idle.pop(key, None)
            self._active[key] = _ActiveRun(conn, send_lock, "a client")
        try:
            ended = serve_run(
                conn, send_lock, self.pool, f"the streamproc service at {self.address}",
                lambda plan, client: self._note_run(key, plan, client),
            )
        finally:
            with self._lock:
                self._active.pop(key, None)
        with self._lock:
            if ended == "done":
                self.runs_done += 1
            elif ended == "failed":
                self.runs_failed += 1
            else:
                self.runs_cancelled += 1

    def _note_run(self, key: int, plan: Plan, client: str) -> None:
        """Records who runs ``plan`` and the models of its ``map_gpu`` stages, for status (handler thread)."""
        from ..ops import MapGPU

        with self._lock:
            if key in self._active:
                self._active[key].client = client
        stages = [stage for stage in plan.stages if isinstance(stage.op, MapGPU)]
        if not stages:
            return
        from ..gpu.model_content import model_digest, outermost_modules
        from ..gpu.models import find_modules

        for stage in stages:
            assert isinstance(stage.op, MapGPU)
            for module in outermost_modules(find_modules(stage.op.forward)):
                digest = model_digest(module)
                with self._lock:
                    entry = self._models.setdefault(digest, {
                        "model": type(module).__name__, "digest": digest[:16],
                        "parameters": sum(p.numel() for p in module.parameters()), "runs": 0,
                    })
                    entry["runs"] += 1

    def _send_heartbeats(self) -> None:
        """Every ``HEARTBEAT_INTERVAL_S``: a heartbeat to each run's client (heartbeat thread)."""
        while not self._stopping.wait(protocol.HEARTBEAT_INTERVAL_S):
            with self._lock:
                runs = list(self._active.values())
            for run in runs:
                if run.send_lock.acquire(blocking=False):  # busy: it is sending, which says as much
                    try:
                        protocol.send(run.conn, protocol.Heartbeat())
                    except OSError:
                        pass
                    finally:
                        run.send_lock.release()

    def status(self) -> dict[str, Any]:
        """What ``streamproc status`` prints (JSON-able; any thread)."""
        pool = self.pool
        with self._lock:
            return {
                "address": self.address,
                "pid": os.getpid(),
                "uptime_s": round(time.time() - self._started, 1),
                "cpu_workers": pool.num_cpu_workers,
                "gpu_worker_devices": [d if isinstance(d, str) else list(d) for d in pool.gpu_worker_devices],
                "start_methods": list(pool.process_start_methods),
                "worker_pids": pool.worker_pids(),
                "models": list(self._models.values()),
                "runs_active": len(self._active),
                "clients": [run.client for run in self._active.values()],
                "runs_served": pool.runs_served,
                "runs_done": self.runs_done,
                "runs_failed": self.runs_failed,
                "runs_cancelled": self.runs_cancelled,
                "connections_refused": self.refused,
                "pool_restarts": pool.restarts,
                "versions": protocol.local_versions(),
            }
