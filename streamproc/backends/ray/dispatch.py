"""Which CPU worker actor gets the next task (pure scheduling state; the driver's thread).

Ray calls are asynchronous, so the driver needs no feeder threads: between two waits for
results it hands out every task the bounds allow, and :class:`ActorDispatch` says which. (The
shared :class:`~streamproc.execution.dispatch.TaskDispatcher` blocks its caller until a task
may go, which suits one feeder thread per worker process, not one thread submitting for all.)

Invariants, at every moment:

* ``in_flight[w] <= max_in_flight`` for every actor ``w`` (tasks submitted, not answered);
* deterministic runs: every task handed out has ``index < released + window``, where
  ``released`` is the first task whose outputs the sink has not all received; so the
  reorder buffer holds at most ``window`` tasks;
* no task with ``index >= stop_at`` is handed out (a task failed, or the source ended there);
* tasks go only to actors marked ready (their ``begin_run`` answered: the run's plan is
  loaded there), so the first tasks go to whichever actor starts first.

Tasks to run again (their actor died, ``max_task_retries``) go before new ones and are not
bound by the window (they are below it already).
"""

from __future__ import annotations

import collections
import sys
from typing import Generic, Optional, TypeVar

T = TypeVar("T")


class ActorDispatch(Generic[T]):
    """The in-flight counts, the reorder window and the tasks to rerun; see the module docstring.

    >>> d = ActorDispatch(num_workers=2, max_in_flight=1, window=2)
    >>> d.worker_for_new_task()
    0
    >>> d.handed_out(0); d.worker_for_new_task()
    1
    >>> d.handed_out(1); d.worker_for_new_task() is None  # both busy
    True
    >>> d.finished(0); d.worker_for_new_task() is None    # task 2 is outside the window [0, 2)
    True
    >>> d.released = 1; d.worker_for_new_task()
    0

    Actors that are still starting get nothing:

    >>> d = ActorDispatch(num_workers=2, max_in_flight=1, window=None, ready=False)
    >>> d.worker_for_new_task() is None
    True
    >>> d.set_ready(1, True); d.worker_for_new_task()
    1
    """

    def __init__(self, num_workers: int, max_in_flight: int, window: Optional[int], ready: bool = True) -> None:
        self.in_flight = [0] * num_workers
        self.ready = [ready] * num_workers
        self.max_in_flight = max_in_flight
        self.window = window
        self.next_index = 0
        self.released = 0
        self.stop_at = sys.maxsize
        self._reruns: collections.deque[T] = collections.deque()

    def _least_busy(self) -> Optional[int]:
        free = [w for w, ready in enumerate(self.ready) if ready and self.in_flight[w] < self.max_in_flight]
        return min(free, key=self.in_flight.__getitem__) if free else None

    def set_ready(self, worker: int, ready: bool) -> None:
        """``worker`` may get tasks (its ``begin_run`` answered), or may not (it is being replaced)."""
        self.ready[worker] = ready

    def worker_for_new_task(self) -> Optional[int]:
        """The actor that gets task ``next_index`` now (the least busy), or None if it must wait."""
        if self.next_index >= self.stop_at:
            return None
        if self.window is not None and self.next_index >= self.released + self.window:
            return None
        return self._least_busy()

    def handed_out(self, worker: int, new: bool = True) -> None:
        """A task was submitted to ``worker`` (``new``: task ``next_index``; else a rerun)."""
        self.in_flight[worker] += 1
        if new:
            self.next_index += 1

    def finished(self, worker: int) -> None:
        """``worker`` answered (or lost) one of its tasks."""
        self.in_flight[worker] -= 1

    def stop_after(self, index: int) -> None:
        """No task after ``index`` is needed (it failed, or the source ended after it)."""
        self.stop_at = min(self.stop_at, index + 1)

    @property
    def no_new_tasks(self) -> bool:
        return self.next_index >= self.stop_at

    def rerun(self, task: T) -> None:
        self._reruns.append(task)

    def rerun_for(self) -> Optional[tuple[int, T]]:
        """``(worker, task)`` for the oldest task to rerun, if one may go now (it is taken)."""
        if not self._reruns:
            return None
        worker = self._least_busy()
        if worker is None:
            return None
        return worker, self._reruns.popleft()

    @property
    def reruns_waiting(self) -> int:
        return len(self._reruns)
