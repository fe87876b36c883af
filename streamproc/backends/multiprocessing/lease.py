"""The contract between a run and a warm pool that lends it its processes (main process).

A run on a :class:`~streamproc.service.pool.WorkerPool` either has the pool's workers to itself
(its lease's ``inbox`` is None: it reads their pipes, as a run on its own processes does) or
shares them with the other runs active on the pool (``inbox`` set). A shared run's tasks go
down the same task pipes as the other runs' (each send under the worker's :class:`SharedConn`
lock), and the pool's router thread (:mod:`streamproc.service.router`) reads every worker's
pipes, handing each run, through its :class:`RunInbox`, the messages that carry its run id and
every worker exit. :func:`receive_routed` is the shared run's side of the collector.
"""

from __future__ import annotations

import collections
import multiprocessing.connection
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Protocol

from .feeder import WorkerSlot
from .messages import RunEnded

if TYPE_CHECKING:
    from ...execution.reorder import ReorderBuffer
    from ...execution.task import Task
    from .pool import WorkerHandle
    from .run import _Run


class RunLease(Protocol):
    """A warm pool's hold on a run (:mod:`streamproc.service.pool`): the run's processes are the pool's.

    ``begin`` (main process, as the run starts) waits for the pool, sets ``run.pool`` and sends
    the GPU workers the run's forwards; ``end`` (in :meth:`_Run.shutdown`) drains the run
    instead of stopping the workers, replaces dead ones and frees the pool. A run without a
    lease starts and stops its pool itself. ``inbox``: set by ``begin`` when the run shares
    the workers; ``slot`` makes the run's side of CPU worker ``worker``'s task pipe.
    """

    inbox: Optional[RunInbox]

    def begin(self, run: _Run, forwards_bytes: Optional[bytes]) -> None: ...

    def end(self, run: _Run, broken: bool) -> None: ...

    def slot(self, worker: WorkerHandle, first: bytes, last: bytes, encode: Callable[[Task], bytes]) -> WorkerSlot: ...


@dataclass(frozen=True)
class WorkerExited:
    """Routed to every shared run: the worker's process ended; ``replacement`` took its place (None: none)."""

    replacement: Optional[WorkerHandle]


@dataclass(frozen=True)
class Unreadable:
    """Routed to every shared run: a message from the worker did not unpickle (whose run is unknown)."""

    error: BaseException


class RunInbox:
    """What the router handed one shared run, in arrival order (main process; router and run threads).

    The router appends and wakes the run through its wakeup pipe once per batch of items (a
    slow consumer never fills that pipe); the run takes everything at once. Bounded by the
    run's tasks in flight: a task's slot frees only when the run handles its last output.
    """

    def __init__(self, wake: Callable[[], None]) -> None:
        self._lock = threading.Lock()
        self._items: collections.deque[tuple[WorkerHandle, Any]] = collections.deque()
        self._signalled = False
        self._wake = wake

    def put(self, worker: WorkerHandle, item: Any) -> None:
        with self._lock:
            self._items.append((worker, item))
            if self._signalled:
                return
            self._signalled = True
        self._wake()

    def take(self) -> list[tuple[WorkerHandle, Any]]:
        """Everything routed so far; call after emptying the wakeup pipe (a later item wakes again)."""
        with self._lock:
            self._signalled = False
            items = list(self._items)
            self._items.clear()
        return items


class SharedConn:
    """A CPU worker's task pipe as the runs sharing it send on it: one whole message at a time."""

    def __init__(self, conn: Any, lock: threading.Lock) -> None:
        self.conn = conn
        self.lock = lock

    def send_bytes(self, data: bytes) -> None:
        with self.lock:
            self.conn.send_bytes(data)


class SharedWorkerSlot(WorkerSlot):
    """A shared run's :class:`WorkerSlot`: also remembers which process its ``EndRun`` went to."""

    def __init__(self, task_conn: Any, first: bytes, last: bytes, encode: Callable[[Task], bytes]) -> None:
        super().__init__(task_conn, first, last, encode, survives_worker_death=False)
        # Reentrant: send_end holds it around WorkerSlot.send_end, which takes it too.
        self.lock = threading.RLock()  # type: ignore[assignment]
        self.end_generation: Optional[int] = None

    def send_end(self) -> None:
        with self.lock:
            self.end_generation = self.generation
            super().send_end()

    def take_replacement(self, task_conn: Any) -> bool:
        """The process died, holding no task of this run; True if this run's ``EndRun`` had gone to it."""
        with self.lock:
            ended = self.end_generation == self.generation
            self.replace(task_conn)
            return ended


def receive_routed(run: _Run, inbox: RunInbox, reorder: ReorderBuffer, timeout: float) -> None:
    """A shared run's collector step (the run's consumer thread): waits up to ``timeout``, then
    handles its feeders' errors and what the router handed it."""
    if multiprocessing.connection.wait([run._wakeup_reader], timeout=timeout):
        run._take_feeder_errors(reorder)  # empties the wakeup pipe first: see RunInbox.take
    for worker, item in inbox.take():
        if isinstance(item, WorkerExited):
            worker_exited(run, worker, item)
        elif isinstance(item, Unreadable):
            if run.held(worker):  # it may be this run's: the runs with a task there fail
                raise item.error
        elif isinstance(item, BaseException):  # the pool was closed during the run
            raise item
        else:
            run._handle(worker, item, reorder)


def worker_exited(run: _Run, worker: WorkerHandle, exited: WorkerExited) -> None:
    """A worker of the shared pool ended (the router reaped it and replaced a CPU worker).

    The run fails if that CPU worker held one of its tasks (or said why it stopped), or, for a
    run with ``map_gpu`` stages, if it was a GPU worker; otherwise its next tasks go to the
    replacement (``StartRun`` first), and the run goes on.

    Raises:
        WorkerCrashedError: the worker's crash, as a run on its own processes reports it.
    """
    if worker.id.kind != "cpu":
        if run.plan.has_gpu_stage:
            raise worker.crash_error(" during the run")
        return  # its CPU workers never send it a batch; the pool restarts once the runs end
    assignment = run.assigned[worker.id.index]
    held = assignment.held()
    if assignment.last_error is not None or held or exited.replacement is None:
        # Nothing of this run is left on that index: its drain waits for no EndRun answer there.
        if assignment.ended is None:
            assignment.ended = RunEnded(run.run_id, worker.id, [], None)
        if assignment.last_error is not None:
            raise assignment.last_error
        raise worker.crash_error(f" while running task {held[0]}" if held else "")
    slot = assignment.slot
    assert isinstance(slot, SharedWorkerSlot) and exited.replacement.task_conn is not None
    conn = slot.task_conn
    assert isinstance(conn, SharedConn)
    if slot.take_replacement(SharedConn(exited.replacement.task_conn, conn.lock)) and assignment.ended is None:
        # Its EndRun went down with it: nothing of this run is left on that index.
        assignment.ended = RunEnded(run.run_id, worker.id, [], None)
