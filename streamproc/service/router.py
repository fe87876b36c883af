"""The router of a warm pool's shared runs: one thread reads every worker, each run gets its own.

Runs in the main process, in thread ``streamproc-pool-router``, while at least one run shares
the pool's workers (:mod:`.pool` starts it with the first and stops it after the last). Runs
sharing a pool send their tasks down the same task pipes; the results of all of them come back
on the same result pipes, so no run can read those pipes for itself. The router reads them all,
always (a run whose consumer is slow never blocks a worker that the other runs need: what it
has not consumed waits in its :class:`~streamproc.backends.multiprocessing.lease.RunInbox`,
bounded by its tasks in flight), and routes by run id:

* a message that carries a run id goes to that run (dropped if the run has ended: a broken
  run's last outputs);
* a worker's exit goes to every run, after what the worker sent before it: a dead CPU worker
  is reaped and replaced first (the replacement gets each run's ``StartRun`` with its next
  task), a dead GPU worker marks the pool for a restart once the runs are over;
* log records are re-emitted, ``WorkerStarted`` marks the worker started.
"""

from __future__ import annotations

import multiprocessing.connection
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Optional

from ..backends.multiprocessing.lease import RunInbox, Unreadable, WorkerExited
from ..backends.multiprocessing.log_forwarding import reemit
from ..backends.multiprocessing.messages import LogRecordMessage, WorkerDone, WorkerFailed, WorkerStarted
from ..backends.multiprocessing.result_wait import ResultWaiter
from ..errors import SerializationError
from ..execution.serialization import loads_message

if TYPE_CHECKING:
    from ..backends.multiprocessing.pool import ProcessPool, WorkerHandle

#: Upper bound of one wait of the router (its wakeup pipe wakes it at once to stop).
ROUTER_WAIT_S = 1.0
#: Messages read from one pipe before the router looks at the others.
MAX_MESSAGES_PER_TURN = 64


class Router:
    """Routes the workers' messages to the shared runs (main process; see the module docstring).

    Args:
        processes: the pool's processes (its worker handles change as workers are replaced).
        replace: starts a replacement for a CPU worker index (under the pool's control lock),
            closing in a forked child the descriptors given; raises when it cannot.
    """

    def __init__(self, processes: ProcessPool, replace: Callable[[int, tuple[Any, ...]], WorkerHandle]) -> None:
        self.processes = processes
        self._replace = replace
        self._lock = threading.Lock()
        self._runs: dict[int, tuple[RunInbox, Callable[[], tuple[Any, ...]]]] = {}
        #: A GPU worker died: the pool must restart before the next run.
        self.gpu_lost = False
        self._stopping = False
        self._wake_reader, self._wake_writer = multiprocessing.connection.Pipe(duplex=False)
        self._thread = threading.Thread(target=self._run, name="streamproc-pool-router", daemon=True)
        self._thread.start()

    # -- runs (their threads) -------------------------------------------------------------------
    def add(self, run_id: int, inbox: RunInbox, pipes: Callable[[], tuple[Any, ...]]) -> None:
        """Routes run ``run_id``'s messages to ``inbox``; ``pipes``: its descriptors a forked replacement closes."""
        with self._lock:
            self._runs[run_id] = (inbox, pipes)

    def remove(self, run_id: int) -> None:
        with self._lock:
            self._runs.pop(run_id, None)

    def stop(self) -> None:
        """Stops and joins the thread (no run left); idempotent."""
        self._stopping = True
        try:
            self._wake_writer.send_bytes(b"")
        except OSError:
            pass
        self._thread.join()
        self._wake_writer.close()
        self._wake_reader.close()

    # -- the thread -------------------------------------------------------------------------------
    def _run(self) -> None:
        waiter = ResultWaiter(self._wake_reader)  # the collector's wait, on the pool's workers
        try:
            while not self._stopping:
                for what, worker in waiter.wait(self.processes.live_workers(), ROUTER_WAIT_S):
                    if worker is None or worker.exited:
                        continue  # the wakeup pipe, or handled in this turn already (pipe and sentinel both ready)
                    if what == "result" and self._read(worker, MAX_MESSAGES_PER_TURN):
                        continue
                    worker.process.join(0.0 if what == "exited" else 0.1)
                    if worker.process.exitcode is not None:
                        self._exited(worker)
        finally:
            waiter.close()

    def _read(self, worker: WorkerHandle, limit: Optional[int]) -> bool:
        """Routes up to ``limit`` messages waiting from ``worker``; False at the end of its pipe."""
        conn = worker.result_conn
        for _ in range(limit) if limit is not None else iter(int, 1):
            try:
                data = conn.recv_bytes()
            except (EOFError, OSError):
                return False
            self._route(worker, data)
            if not conn.poll():
                return True
        return True

    def _route(self, worker: WorkerHandle, data: bytes) -> None:
        try:
            message = loads_message(data)
        except Exception as exc:  # its run is unknown: the runs that hold a task there fail
            error = SerializationError(f"a result from {worker.id} cannot be unpickled in the main process: {exc}")
            for inbox in self._inboxes():
                inbox.put(worker, Unreadable(error))
            return
        run_id = getattr(message, "run_id", None)
        if run_id is not None:
            with self._lock:
                entry = self._runs.get(run_id)
            if entry is not None:
                entry[0].put(worker, message)
        elif isinstance(message, LogRecordMessage):
            reemit(message)
        elif isinstance(message, WorkerStarted):
            worker.started = True
        elif isinstance(message, WorkerDone):
            worker.done = True
        elif isinstance(message, WorkerFailed):  # a worker ending (sys.exit in forward): every run hears
            for inbox in self._inboxes():
                inbox.put(worker, message)

    def _inboxes(self) -> list[RunInbox]:
        with self._lock:
            return [inbox for inbox, _ in self._runs.values()]

    def _exited(self, worker: WorkerHandle) -> None:
        """``worker`` ended: route what it sent last, reap it, replace it (CPU), tell every run."""
        try:
            while worker.result_conn.poll():
                if not self._read(worker, None):
                    break
        except OSError:
            pass
        self.processes.reap(worker)
        replacement: Optional[WorkerHandle] = None
        if worker.id.kind == "gpu":
            self.gpu_lost = True
        else:
            with self._lock:
                pipes = tuple(conn for _, run_pipes in self._runs.values() for conn in run_pipes())
            try:
                replacement = self._replace(worker.id.index, (*pipes, self._wake_reader, self._wake_writer))
            except Exception:  # a GPU worker is gone too: the runs fail, the pool restarts
                self.gpu_lost = True
        for inbox in self._inboxes():
            inbox.put(worker, WorkerExited(replacement))
