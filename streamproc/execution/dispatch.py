"""Handing out tasks: one dispatcher over the source, shared by every backend with workers.

Pure scheduling state (one lock, no processes): tested without any worker. Whoever feeds
a worker (a feeder thread of the multiprocessing backend, a worker thread of the threads
backend) asks :meth:`TaskDispatcher.next_task` for the next numbered task, so whichever worker
is free gets the next task. Two bounds keep memory flat whatever the input size:

* per worker: ``in_flight[w] <= max_in_flight`` (tasks handed to ``w`` and not yet finished);
* deterministic runs: ``index < released + window``, where ``released`` is the first task whose
  outputs the sink has not fully received, so the reorder buffer holds at most ``window`` tasks.

and, with a :class:`~.byte_budget.ByteBudget`, two in bytes (see NOTE [ streamproc byte bounds ]):

* ``in_flight_bytes <= budget.in_flight_bytes + num_workers * (largest task)``: a task is
  handed out only while the estimated bytes of the tasks in flight (``task_bytes(payload)``,
  summed) are under the budget, unless its worker has none in flight (never fewer than one
  task per worker; over the budget a worker holds one task at most);
* deterministic runs: task ``index > released`` is handed out only while the outputs the
  reorder buffer holds (``reorder_bytes``, told by :meth:`TaskDispatcher.set_released`) are
  under ``budget.reorder_bytes``; task ``released`` itself always may go, so the run advances.

and one rule keeps the workers busy, :func:`may_take_task`: every idle live worker gets a task
before any worker gets a second one. Without it, the first feeder to ask took both tasks of a
2-row-group input, and 2 workers took as long as 1.

Retries (``max_task_retries``, process backends): :meth:`TaskDispatcher.requeue` gives the
tasks of a dead worker back, to be handed out again (before any new task) to the same
worker index, which its replacement process now holds. With ``hold_until_finished`` a caller
gets None only once every task handed out has finished, since any of them may come back.
"""

from __future__ import annotations

import collections
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Optional

from .byte_budget import ByteBudget
from .task import Task

#: How long a blocked wait lasts before it re-checks its condition. ``stop()`` and every state
#: change notify the waiters at once; this only bounds the damage of a missed notification.
WAIT_POLL_INTERVAL_S = 0.5


class SourceFailed(Exception):
    """The source raised while producing task ``index`` (carries the source's exception)."""

    def __init__(self, index: int, error: BaseException) -> None:
        super().__init__(index, error)
        self.index = index
        self.error = error


class DispatchStopped(Exception):
    """The run stopped while this caller was inside the source: what it read was dropped.

    Raised by :meth:`TaskDispatcher.next_task` to the one caller whose ``next()`` on the source
    was still running when :meth:`TaskDispatcher.stop` was called (a blocked source cannot be
    interrupted). By then the run has shut down, its pipes may be closed: the caller must
    exit without sending anything.
    """


def may_take_task(worker: int, in_flight: Sequence[int], live: Sequence[bool]) -> bool:
    """Whether ``worker`` may take a task now, by the fairness rule alone (bounds aside).

    An idle worker (no task in flight) may always take one; a busy worker only when no
    *other* live worker is idle. A worker is live while its feeder may still ask (see
    :meth:`TaskDispatcher.worker_gone`), so a dead worker never holds up the others. Among
    the live workers, one may always go: an idle one if there is one, else all of them.

    >>> may_take_task(0, in_flight=[1, 0], live=[True, True])
    False
    >>> may_take_task(0, in_flight=[1, 0], live=[True, False])
    True
    """
    if in_flight[worker] == 0:
        return True
    return not any(live[other] and in_flight[other] == 0 for other in range(len(in_flight)) if other != worker)


class TaskDispatcher:
    """Hands out ``Task(index, payload, key)`` in source order to whichever feeder may take it first.

    ``payloads`` yields ``(key, payload)`` pairs (see :func:`.task.iter_selected_payloads`);
    indices count the tasks handed out, 0, 1, 2..., whatever keys a task selection skipped.

    Thread-safe; every field is guarded by ``_cond``. One caller at a time reads the source
    (``_reader`` names its worker); it reads without holding ``_cond``, so the main thread,
    which only calls the short methods (``task_finished``, ``set_released``, ``fail_at``,
    ``stop``), is never blocked behind a slow source, and a caller waiting for its turn at the
    source wakes as soon as ``stop()`` is called.

    A call of :meth:`next_task` for worker ``w`` waits until, all at once: no other caller is
    inside the source, ``in_flight[w] < max_in_flight``, ``index < released + window`` and
    :func:`may_take_task`. It returns None at once when the dispatcher is stopped or no task
    is left (``index >= stop_at``: the source ended or failed, or a task failed).

    Progress assumes what process workers do: a task handed out finishes without its worker
    asking for another (it runs from the worker's pipe). A caller that runs its tasks only
    between calls of ``next_task`` (a thread that prefetches by asking) must use
    ``max_in_flight=1``, or a busy worker could wait for an idle one that waits for the
    window, which waits for the busy worker's unstarted task.

    ``total_tasks`` is set once the source is exhausted (or failed).

    ``hold_until_finished`` (runs that retry tasks): :meth:`next_task` returns None only when
    no task is left *and* none is in flight or requeued, so a feeder stays to send the tasks
    of a worker that dies at the very end.

    ``byte_budget`` (None: counts only) with ``task_bytes`` (a task payload's estimated size,
    :meth:`streamproc.io.base.Source.task_bytes`) adds the byte bounds above. A task is sized
    once, after it is read; ``in_flight_bytes`` and ``peak_in_flight_bytes`` are what the
    bound counted (tests read them).
    """

    def __init__(
        self,
        payloads: Iterator[tuple[int, Any]],
        num_workers: int,
        max_in_flight: int,
        window: Optional[int],
        run_id: int = 0,
        hold_until_finished: bool = False,
        byte_budget: Optional[ByteBudget] = None,
        task_bytes: Optional[Callable[[Any], int]] = None,
    ) -> None:
        self._payloads = payloads
        self._budget = byte_budget
        self._task_bytes = task_bytes if byte_budget is not None else None
        self._run_id = run_id
        self._max_in_flight = max_in_flight
        self._window = window
        # One lock, three conditions on it, so that a change wakes only the callers it may
        # let go on: ``_reader_done`` (a caller waits for another to come out of the source),
        # ``_slot_freed[w]`` (worker w's caller waits for one of its tasks to finish), and
        # ``_cond`` for every other wait (window, bytes, fairness, the end of the run). With one
        # condition, every finished task and every read woke every feeder: one GIL turn each,
        # for nothing but one of them, in the main process (issue 10). See _condition_for.
        lock = threading.RLock()
        self._cond = threading.Condition(lock)
        self._reader_done = threading.Condition(lock)
        self._slot_freed = [threading.Condition(lock) for _ in range(num_workers)]
        self._in_flight = [0] * num_workers
        self._live = [True] * num_workers
        self._reader: Optional[int] = None  # the worker whose caller is inside next(payloads)
        self._released = 0
        self._next_index = 0
        self._stop_at = sys.maxsize  # no task index >= _stop_at is handed out
        self._hold = hold_until_finished
        self._requeued: list[collections.deque[Task]] = [collections.deque() for _ in range(num_workers)]
        self.total_tasks: Optional[int] = None
        self.stopping = False
        #: Estimated bytes of each task in flight, by index; their sum, and its largest value.
        self._bytes_of: dict[int, int] = {}
        self.in_flight_bytes = 0
        self.peak_in_flight_bytes = 0
        self._reorder_bytes = 0
        #: Whether a caller waits because of the window or the reorder bytes (``set_released``
        #: wakes the callers only then; every other change wakes them anyway).
        self._window_waiters = False

    @property
    def reader(self) -> Optional[int]:
        """The worker whose caller is inside the source's ``next()`` now, or None.

        After :meth:`stop` it can only go from a worker to None: a shutdown that finds it set
        knows that feeder is blocked in user code and cannot be joined promptly.
        """
        with self._cond:
            return self._reader

    def _may_read(self, worker: int) -> bool:
        index = self._next_index
        if self._reader is not None or self._in_flight[worker] >= self._max_in_flight:
            return False
        if self._window is not None and index >= self._released + self._window:
            self._window_waiters = True
            return False
        return self._within_bytes(worker, index) and may_take_task(worker, self._in_flight, self._live)

    def _within_bytes(self, worker: int, index: int) -> bool:
        """The byte bounds of the class docstring (caller holds ``_cond``)."""
        budget = self._budget
        if budget is None:
            return True
        if self._in_flight[worker] and self.in_flight_bytes >= budget.in_flight_bytes:
            return False
        if self._window is None or index <= self._released or self._reorder_bytes < budget.reorder_bytes:
            return True
        self._window_waiters = True
        return False

    def _count_bytes(self, index: int, payload: Any) -> None:
        """Adds task ``index``'s estimated bytes to those in flight (caller holds ``_cond``)."""
        if self._task_bytes is None:
            return
        nbytes = self._task_bytes(payload)
        if nbytes:
            self._bytes_of[index] = nbytes
            self.in_flight_bytes += nbytes
            self.peak_in_flight_bytes = max(self.peak_in_flight_bytes, self.in_flight_bytes)

    def _uncount_bytes(self, index: Optional[int]) -> None:
        if index is not None:
            self.in_flight_bytes -= self._bytes_of.pop(index, 0)

    def next_task(self, worker: int) -> Optional[Task]:
        """The next task for ``worker``, or None when no task is left or the run stops.

        Runs in the caller's thread (a feeder thread of the main process); blocks as the class
        docstring says, re-checking at least every ``WAIT_POLL_INTERVAL_S``.

        Raises:
            SourceFailed: the source raised; no further task is handed out.
            DispatchStopped: ``stop()`` was called while this call was inside the source.
        """
        with self._cond:
            while True:
                if self.stopping:
                    return None
                requeued = self._take_requeued(worker)
                if requeued is not None:
                    return requeued
                if self._next_index >= self._stop_at:
                    if self._all_finished():
                        return None
                elif self._may_read(worker):
                    break
                self._condition_for(worker).wait(WAIT_POLL_INTERVAL_S)
            index = self._next_index
            self._reader = worker
        try:
            key, payload = next(self._payloads)
        except StopIteration:
            self._end_reading(index, next_index=index, total=index)
            # Holding: wait, like every other caller, for the tasks in flight (they may come back).
            return self.next_task(worker) if self._hold else None
        except BaseException as exc:
            # A failed generator raises StopIteration on the next call: never make one, or the
            # run would end at ``index`` as if the source were complete, and the error be lost.
            self._end_reading(index, next_index=index + 1, total=index + 1)
            raise SourceFailed(index, exc) from exc
        with self._cond:
            self._end_reading(index, next_index=index + 1)
            if index >= self._stop_at:  # a task before it failed meanwhile: not needed
                return None
            self._in_flight[worker] += 1
            self._count_bytes(index, payload)
        return Task(index, payload, self._run_id, None if key == index else key)

    def _condition_for(self, worker: int) -> threading.Condition:
        """What ``worker``'s caller, which may not go on, waits on (caller holds the lock).

        The condition of the first reason it may not; the caller re-checks everything when
        woken. Who notifies which:

        * ``_reader_done`` (another caller is inside the source): :meth:`_end_reading`;
        * ``_slot_freed[worker]`` (its tasks in flight are at ``max_in_flight``): only a task
          of that worker finishing (:meth:`task_finished`) or coming back (:meth:`requeue`);
        * ``_cond`` (the window, the bytes, fairness, the end of a holding run):
          :meth:`_end_reading` (the reader's worker holds one more task: fairness),
          :meth:`task_finished` (bytes freed; maybe the end), :meth:`set_released` (when a
          caller waits for the window or the reorder bytes);
        * all three: :meth:`requeue`, :meth:`_finish`, :meth:`worker_gone`, :meth:`stop`.
        """
        if self._next_index < self._stop_at:  # _may_read was asked, and said no
            if self._reader is not None:
                return self._reader_done
            if self._in_flight[worker] >= self._max_in_flight:
                return self._slot_freed[worker]
        return self._cond

    def _notify_everyone(self) -> None:
        """Wakes every waiting caller, whatever it waits for (caller holds the lock)."""
        self._cond.notify_all()
        self._reader_done.notify_all()
        for condition in self._slot_freed:
            condition.notify_all()

    def _take_requeued(self, worker: int) -> Optional[Task]:
        """A requeued task for ``worker`` if it may take one now (caller holds ``_cond``)."""
        queue = self._requeued[worker]
        while queue and queue[0].index >= self._stop_at:
            queue.popleft()  # a task before it failed meanwhile: not needed
        if not queue or self._in_flight[worker] >= self._max_in_flight:
            return None
        self._in_flight[worker] += 1
        task = queue.popleft()
        self._count_bytes(task.index, task.payload)
        return task

    def _all_finished(self) -> bool:
        """Whether a caller may stop asking (caller holds ``_cond``; no task is left to read)."""
        return not self._hold or (not any(self._in_flight) and not any(self._requeued))

    def requeue(self, worker: int, tasks: Sequence[Task]) -> None:
        """``worker`` died holding ``tasks`` (sent, not finished): hand them to it again, first.

        Called by the collector (main thread) once the worker's replacement process holds the
        index ``worker``; ``tasks`` no longer count as in flight until handed out again.
        """
        with self._cond:
            self._in_flight[worker] -= len(tasks)
            for task in tasks:
                self._uncount_bytes(task.index)
            self._requeued[worker].extend(tasks)
            self._notify_everyone()

    def _end_reading(self, index: int, next_index: int, total: Optional[int] = None) -> None:
        """The source returned for task ``index`` (``total``: it ended or failed there).

        Raises:
            DispatchStopped: ``stop()`` was called meanwhile.
        """
        with self._cond:  # re-entrant: next_task may hold it already
            self._reader = None
            self._next_index = next_index
            if total is not None:
                self._finish(total)
            self._reader_done.notify_all()
            self._cond.notify_all()  # fairness: the reader's worker holds one more task now
            if self.stopping:
                self._close_payloads()
                raise DispatchStopped(f"the run stopped while the source was read for task {index}")

    def _finish(self, total: int) -> None:
        with self._cond:
            if self.total_tasks is None or total < self.total_tasks:
                self.total_tasks = total
            self._stop_at = min(self._stop_at, total)
            self._notify_everyone()

    def fail_at(self, index: int) -> None:
        """Hands out no task after ``index`` (which failed or could not be sent)."""
        self._finish(index + 1)

    def task_finished(self, worker: int, task_index: Optional[int] = None) -> None:
        """``worker`` finished one of its tasks, ``task_index`` (collector: main thread).

        ``task_index`` frees the task's bytes; without it (a caller with no byte budget) only
        the count is freed.
        """
        with self._cond:
            self._in_flight[worker] -= 1
            self._uncount_bytes(task_index)
            self._slot_freed[worker].notify_all()
            self._cond.notify_all()  # bytes freed; with hold_until_finished, maybe the end

    def worker_gone(self, worker: int) -> None:
        """``worker``'s feeder has exited and will not ask again: the others stop waiting for it.

        Called by the feeder itself on every exit (its ``finally``): the source is done, a
        task failed, its worker died or its pipe broke. Idempotent.
        """
        with self._cond:
            self._live[worker] = False
            self._notify_everyone()

    def set_released(self, next_task: int, reorder_bytes: int = 0) -> None:
        """The sink has received every output of the tasks before ``next_task``; the reorder
        buffer holds ``reorder_bytes`` of later outputs (collector)."""
        with self._cond:
            # Only a caller held by the window (or the reorder bytes) can go on now: waking the
            # others (feeders waiting for their own worker's slot, most of the time) costs each
            # a wakeup and a turn of the GIL per finished task, in the main process (issue 10).
            moved = next_task != self._released or reorder_bytes < self._reorder_bytes
            if moved and self._window_waiters:
                self._window_waiters = False
                self._cond.notify_all()
            self._released = next_task
            self._reorder_bytes = reorder_bytes

    def stop(self) -> None:
        """Wakes every waiting caller (they return None) and makes every later call return None."""
        with self._cond:
            self.stopping = True
            self._notify_everyone()
            if self._reader is None:  # else the reader closes it when the source returns
                self._close_payloads()

    def _close_payloads(self) -> None:
        """Closes the payload generator (``_cond`` held, no caller inside it), so that a source
        holding resources releases them when the run stops, not when it is garbage-collected
        (a limit's inner run, with its workers: see NOTE [ streamproc limit ])."""
        close = getattr(self._payloads, "close", None)
        if close is not None:
            close()
