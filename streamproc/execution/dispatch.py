"""Handing out tasks: one dispatcher over the source, shared by every backend with workers.

Pure scheduling state (one lock, no processes): tested without any worker. Whoever feeds a
worker (a feeder thread of the multiprocessing backend, a worker thread of the threads
backend) asks :meth:`TaskDispatcher.next_task` for the next numbered task, so whichever worker
is free gets the next task. Two bounds keep memory flat whatever the input size:

* per worker: ``in_flight[w] <= max_in_flight`` (tasks handed to ``w`` and not yet finished);
* deterministic runs: ``index < released + window``, where ``released`` is the first task whose
  outputs the sink has not fully received, so the reorder buffer holds at most ``window`` tasks.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, Optional

from .task import Task

#: How long a blocked wait lasts before it re-checks the stop flag.
WAIT_POLL_INTERVAL_S = 0.5


class SourceFailed(Exception):
    """The source raised while producing task ``index`` (carries the source's exception)."""

    def __init__(self, index: int, error: BaseException) -> None:
        super().__init__(index, error)
        self.index = index
        self.error = error


class TaskDispatcher:
    """Hands out ``Task(index, payload)`` in source order to whichever feeder asks first.

    Thread-safe. ``total_tasks`` is set once the source is exhausted (or failed). The main
    thread only takes ``_cond`` (never ``_source_lock``, which a feeder holds while reading a
    possibly slow source), so it cannot be blocked behind a feeder.
    """

    def __init__(
        self, payloads: Iterator[Any], num_workers: int, max_in_flight: int, window: Optional[int], run_id: int = 0
    ) -> None:
        self._payloads = payloads
        self._run_id = run_id
        self._max_in_flight = max_in_flight
        self._window = window
        self._cond = threading.Condition()
        self._source_lock = threading.Lock()
        self._in_flight = [0] * num_workers
        self._released = 0
        self._next_index = 0
        self._stop_at = sys.maxsize  # no task index >= _stop_at is handed out
        self.total_tasks: Optional[int] = None
        self.stopping = False

    def _wait_until(self, predicate: Callable[[], bool]) -> bool:
        """Waits (holding ``_cond``) until ``predicate()`` or stop; True if not stopping."""
        while not (self.stopping or predicate()):
            self._cond.wait(WAIT_POLL_INTERVAL_S)
        return not self.stopping

    def _may_hand_out(self, index: int) -> bool:
        return index >= self._stop_at or self._window is None or index < self._released + self._window

    def next_task(self, worker: int) -> Optional[Task]:
        """The next task for ``worker``, or None when the source is done or the run stops.

        Raises:
            SourceFailed: the source raised; no further task is handed out.
        """
        with self._cond:
            if not self._wait_until(lambda: self._in_flight[worker] < self._max_in_flight):
                return None
        with self._source_lock:
            with self._cond:
                index = self._next_index
                if not self._wait_until(lambda: self._may_hand_out(index)) or index >= self._stop_at:
                    return None
            try:
                payload = next(self._payloads)
            except StopIteration:
                self._finish(index)
                return None
            except BaseException as exc:
                with self._cond:
                    # A failed generator raises StopIteration on the next call: never make one,
                    # or a feeder waiting for the lock would end the run at ``index`` as if the
                    # source were complete, and the error would be lost.
                    self._next_index = index + 1
                self._finish(index + 1)
                raise SourceFailed(index, exc) from exc
            with self._cond:
                self._next_index = index + 1
                self._in_flight[worker] += 1
        return Task(index, payload, self._run_id)

    def _finish(self, total: int) -> None:
        with self._cond:
            if self.total_tasks is None or total < self.total_tasks:
                self.total_tasks = total
            self._stop_at = min(self._stop_at, total)
            self._cond.notify_all()

    def fail_at(self, index: int) -> None:
        """Hands out no task after ``index`` (which failed or could not be sent)."""
        self._finish(index + 1)

    def task_finished(self, worker: int) -> None:
        with self._cond:
            self._in_flight[worker] -= 1
            self._cond.notify_all()

    def set_released(self, next_task: int) -> None:
        with self._cond:
            if next_task != self._released:
                self._released = next_task
                self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self.stopping = True
            self._cond.notify_all()
