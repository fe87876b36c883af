"""Replacing dead CPU workers and stuck tasks: the collector's side (main process).

The methods :class:`~.run._Run` uses when a CPU worker dies or its task is stuck, kept here so
that :mod:`.run` holds dispatch and collection only. See NOTE [ streamproc retries ] in
:mod:`.retries` for the protocol; the decisions themselves are :class:`~.retries.TaskRetries`'s.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any, Optional

from ...execution.dispatch import TaskDispatcher
from ...execution.reorder import ReorderBuffer
from .feeder import WorkerSlot
from .messages import RunEnded, TaskStuck
from .pool import ProcessPool, WorkerHandle
from .retries import TaskRetries, backstop_grace_s

#: Retries: deaths in a row of a worker index holding no task, before the run gives up.
MAX_IDLE_DEATHS = 2


class WorkerAssignment:
    """What the run knows of one CPU worker: its feeder, the tasks it holds, what it reported."""

    def __init__(self) -> None:
        self.feeder: Optional[threading.Thread] = None
        #: Its task pipe and the tasks sent and not finished (set when the run starts).
        self.slot: Optional[WorkerSlot] = None
        self.last_error: Optional[BaseException] = None
        #: The worker's answer to ``EndRun``.
        self.ended: Optional[RunEnded] = None
        #: Why the run killed this worker (its task made no progress for ``task_timeout``).
        self.stuck: Optional[TaskStuck] = None
        #: Deaths in a row of its process while it held no task (retries enabled).
        self.idle_deaths = 0
        #: When its oldest task became its running one (``time.monotonic()``).
        self.running_since = time.monotonic()

    def held(self) -> list[int]:
        return list(self.slot.tasks) if self.slot is not None else []


class RecoveryMixin:
    """What a run does when a CPU worker dies or its task is stuck (collector thread)."""

    pool: ProcessPool
    dispatcher: Optional[TaskDispatcher]
    retries: TaskRetries
    replaces_workers: bool
    assigned: list[WorkerAssignment]
    run_id: int
    _wakeup_reader: Any
    _wakeup_writer: Any

    def _replace_worker(self, worker: WorkerHandle, crash: Any, reorder: ReorderBuffer) -> None:
        """CPU worker ``worker`` died: decide its tasks' fate, start its replacement, requeue them."""
        assert self.dispatcher is not None
        assignment = self.assigned[worker.id.index]
        assert assignment.slot is not None
        tasks = list(assignment.slot.tasks.values())
        stuck, assignment.stuck = assignment.stuck, None
        assignment.idle_deaths = 0 if tasks else assignment.idle_deaths + 1
        if assignment.idle_deaths > MAX_IDLE_DEATHS:
            raise crash  # something kills this worker index without any task to blame
        if tasks:
            # Raises when the running task may not be rerun; the tasks behind it are not blamed.
            if self.retries.after_death(tasks[0], crash, stuck):
                reorder.reset_task(tasks[0].index)
            for task in tasks[1:]:
                reorder.reset_task(task.index)
        new = self.pool.replace_cpu_worker(worker.id.index, also_close=(self._wakeup_reader, self._wakeup_writer))
        held = assignment.slot.replace(new.task_conn)
        assignment.running_since = time.monotonic()
        self.dispatcher.requeue(worker.id.index, held)

    def _task_stuck(self, worker: WorkerHandle, stuck: TaskStuck) -> None:
        """``worker``'s watchdog says its task is stuck: raise, or kill it to isolate the task."""
        assignment = self.assigned[worker.id.index]
        assert assignment.slot is not None
        task = assignment.slot.tasks[stuck.task_index]
        if not self.retries.isolate or not self.replaces_workers:
            raise self.retries.timeout_error(stuck, task)
        if assignment.stuck is None:
            assignment.stuck = stuck
            worker.process.kill()  # its sentinel fires: see _worker_exited

    def _check_backstop(self, timeout: float) -> None:
        """Kills a worker whose task made no progress past ``timeout`` plus a grace, with no word from its watchdog."""
        now = time.monotonic()
        for worker, assignment in zip(self.pool.cpu_workers, self.assigned):
            held = assignment.held()
            # Not before it runs streamproc code (a spawned worker imports for seconds): its
            # watchdog publishes progress from then on, and all the time it holds no task.
            if not held or not worker.started or worker.exited or assignment.stuck is not None:
                continue
            progress = max(self.pool.progress[worker.id.index].value, assignment.running_since)
            if now - progress < timeout + backstop_grace_s(timeout):
                continue
            pid = worker.process.pid
            try:
                os.kill(pid, signal.SIGUSR1)  # faulthandler: its stack goes to its stderr, GIL or not
            except OSError:
                pass
            row = self.retries.running_row(held[0])
            stack = (
                f"(unavailable: its watchdog thread did not run for {now - progress:.1f} s, as when a C extension "
                f"holds the GIL; the worker dumped its stacks to its stderr on SIGUSR1)"
            )
            stuck = TaskStuck(self.run_id, held[0], worker.id, pid, "unknown", row, now - progress, stack)
            self._task_stuck(worker, stuck)
