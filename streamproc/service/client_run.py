"""The service backend: a stream with ``pool=sp.connect(...)`` runs on the service (client process).

:class:`ServiceBackend` is what the stream picks for a :class:`~.client.ServicePool`. A run
opens one connection, sends the plan as the workers receive it (dill; the pool itself stays
here) with the sink's finalizer, then:

* a sender thread (``streamproc-service-feeder``) pulls the source's task payloads here and
  sends one per credit the server grants (:class:`~.protocol.PayloadsWanted`): an in-memory
  iterable's records travel, a file source's payloads only name what the server's workers read;
* the run's generator reads what the server sends: outputs (each acked once consumed, so at
  most ``OUTPUT_WINDOW`` wait here), credits, heartbeats, and the end (``RunDone``, or
  ``RunFailed`` whose carrier rebuilds the user's exception with the remote traceback).

Nothing heard for ``HEARTBEAT_INTERVAL_S * 10`` (``HEARTBEAT_TIMEOUT_S``), or the connection
ending, raises ``ServiceUnavailableError`` naming the address. Leaving the run early (a
``break``, an error here, garbage collection) sends ``Cancel`` and closes the connection: the
server cancels the run and its workers go back to the pool.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import threading
import weakref
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

from ..backends.base import Backend, BackendCapabilities, RunHandle
from ..errors import ExceptionWithTraceback, ServiceUnavailableError
from ..execution.serialization import dumps_plan
from ..stats import RunStats
from . import protocol

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    from ..execution.task import TaskOutput
    from ..io.sinks import Sink
    from ..plan import Plan
    from .client import ServicePool

#: How long the end of a run waits for the sender thread (it may be inside the user's source).
SENDER_JOIN_TIMEOUT_S = 5.0


class ServiceBackend(Backend):
    """Runs plans on a streamproc service (client process); see the module docstring."""

    name = "service"
    # The sink writes here: a path of the client may not be one of the server.
    capabilities = BackendCapabilities(writes_in_workers=False, separate_processes=True)

    def run(self, plan: Plan, sink: Sink) -> RunHandle:
        remote = plan.options.pool
        assert remote is not None and getattr(remote, "backend_name", None) == "service"
        _refuse_nested_run(plan)
        stats = RunStats(self.name)
        # What the workers receive: the plan without the pool (and an iterable without its
        # records, see IterableSource.__getstate__), and the sink's finalizer.
        worker_plan = dataclasses.replace(plan, options=dataclasses.replace(plan.options, pool=None))
        plan_bytes = dumps_plan((worker_plan, sink.finalizer()), plan)
        run = _ClientRun(remote, plan, plan_bytes, stats)  # type: ignore[arg-type]
        outputs = run.outputs()
        weakref.finalize(outputs, run.close)
        return RunHandle(outputs, stats)


def _refuse_nested_run(plan: Plan) -> None:
    """Refuses a ``limit()`` whose two runs could not share the server's workers (main process).

    The inner run (the ops before the limit) produces the outer run's tasks, so both must run
    at once. Runs on a pool interleave, except those that have the workers alone (retries
    replace dead workers: ``max_task_retries``): with one of those on either side, each run
    would wait for the other.
    """
    from ..io.limit import LimitSource

    source = plan.source
    if not isinstance(source, LimitSource) or source.inner.options.pool is None:
        return
    if source.inner.options.max_task_retries or plan.options.max_task_retries:
        raise ValueError(
            "limit() on a service pool with max_task_retries is not supported: "
            "a run that retries has the pool's workers alone, and the ops before the limit must run at the same time "
            "as those after it; drop max_task_retries, or use take(n), or a break out of the loop"
        )


class _ClientRun:
    """One run on the service: its connection, sender thread and credits (client process)."""

    def __init__(self, remote: ServicePool, plan: Plan, plan_bytes: bytes, stats: RunStats) -> None:
        self.remote = remote
        self.plan = plan
        self.plan_bytes = plan_bytes
        self.stats = stats
        self.conn: Connection | None = None
        self._send_lock = threading.Lock()
        self._credits = threading.Semaphore(0)
        self._stop = threading.Event()
        self._sender: threading.Thread | None = None
        self._finished = False

    def outputs(self) -> Generator[TaskOutput, None, None]:
        """The run's outputs as the server sends them (main thread of the client)."""
        address = self.remote.address
        try:
            self.conn = conn = self.remote.open_run()
            self._send(protocol.RunRequest(self.plan_bytes, f"pid {os.getpid()} on {socket.gethostname()}"))
            self._sender = threading.Thread(target=self._send_payloads, name="streamproc-service-feeder", daemon=True)
            self._sender.start()
            while True:
                message = self._receive(conn, address)
                if isinstance(message, protocol.Output):
                    yield message.output
                    self._ack()
                elif isinstance(message, protocol.PayloadsWanted):
                    for _ in range(message.count):
                        self._credits.release()
                elif isinstance(message, protocol.RunDone):
                    self._finished = True
                    self._merge_stats(message.stats)
                    return
                elif isinstance(message, protocol.RunFailed):
                    self._finished = True
                    error: BaseException = message.error  # type: ignore[assignment]  # unpickled: the rebuilt exception
                    raise error
        finally:
            self.close()

    def _receive(self, conn: Connection, address: str) -> Any:
        try:
            if not conn.poll(protocol.HEARTBEAT_TIMEOUT_S):
                raise ServiceUnavailableError(
                    f"the streamproc service at {address} sent nothing for {protocol.HEARTBEAT_TIMEOUT_S:.0f} s "
                    f"(it sends a heartbeat every {protocol.HEARTBEAT_INTERVAL_S:.0f} s): taken for lost mid-run"
                )
            return protocol.recv(conn)
        except (EOFError, OSError) as exc:
            raise ServiceUnavailableError(
                f"lost the streamproc service at {address} mid-run ({type(exc).__name__}: the server stopped or was killed)"
            ) from None

    def _send(self, message: Any) -> None:
        try:
            with self._send_lock:
                if self.conn is None:
                    raise OSError("the run was closed")
                protocol.send(self.conn, message)
        except OSError as exc:
            raise ServiceUnavailableError(f"lost the streamproc service at {self.remote.address} mid-run: {exc}") from None

    def _ack(self) -> None:
        """Acks one output. A failure is not one yet: the server closes once it has sent ``RunDone``,
        maybe before this ack of its last output; the next receive tells the end or the loss."""
        try:
            self._send(protocol.OutputsAcked(1))
        except ServiceUnavailableError:
            pass

    def _send_payloads(self) -> None:
        """The sender thread: the source's payloads, one per credit, then ``PayloadsEnd`` (client process)."""
        plan = self.plan
        selection = plan.task_selection
        try:
            for key, payload in enumerate(plan.source.iter_tasks(plan.task_size)):
                skipped = selection is not None and not selection.selects(key)
                while not self._credits.acquire(timeout=0.5):
                    if self._stop.is_set():
                        return
                if self._stop.is_set():
                    return
                self._send(protocol.Payload(None if skipped else payload, skipped))
            self._send(protocol.PayloadsEnd())
        except ServiceUnavailableError:
            return  # the generator reports it
        except BaseException as exc:  # the user's source raised: the run fails with it, there
            if self._stop.is_set():
                return
            try:
                self._send(protocol.SourceFailed(ExceptionWithTraceback(exc, f"the source {plan.source.describe()}")))
            except ServiceUnavailableError:
                return

    def _merge_stats(self, server_stats: Any) -> None:
        """The server's figures of its worker processes go into this run's stats (its main process is not ours)."""
        if not isinstance(server_stats, RunStats):
            return
        for name, process in server_stats.processes.items():
            if name != "main process":
                self.stats.add_process(process)

    def close(self) -> None:
        """Ends the run here: cancels it on the server unless it ended, stops the sender (idempotent)."""
        self._stop.set()
        with self._send_lock:  # not under a send of the sender thread
            conn, self.conn = self.conn, None
            if conn is not None:
                if not self._finished:
                    try:
                        protocol.send(conn, protocol.Cancel())
                    except OSError:
                        pass
                conn.close()
        if self._sender is not None and self._sender is not threading.current_thread():
            self._sender.join(SENDER_JOIN_TIMEOUT_S)
