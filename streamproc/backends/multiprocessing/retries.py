"""Surviving worker deaths and stuck tasks: the main process's bookkeeping (pure state).

Runs in the main process (the collector's thread); no process or thread here, so it is
tested with fakes. See NOTE [ streamproc retries ] for the whole protocol.

NOTE [ streamproc retries ]
    ``max_task_retries=k`` (multiprocessing backend). When a CPU worker dies during a run
    (SIGKILL, a segfault, ``os._exit``), the collector (:mod:`.run`):

    1. reads what the worker sent before dying, reaps it, and starts a fresh process for the
       same worker index (:meth:`.pool.ProcessPool.replace_cpu_worker`: new pipes; GPU
       workers are handed the new peer's pipes over their control pipe);
    2. counts one attempt for the task the worker was running (the oldest it held; the task
       waiting behind it in its pipe is not blamed) and, within ``k`` reruns, discards what
       arrived of every task the worker held (:meth:`ReorderBuffer.reset_task`) and requeues
       them to the new process (:meth:`TaskDispatcher.requeue`), which runs them first.
       Outputs stay identical: a task's chunks are held until its last one arrives
       (``ReorderBuffer(hold_tasks=True)``), so the sink never sees part of a task that may
       rerun, with ``deterministic=True`` or not;
    3. past ``k`` reruns, raises ``WorkerCrashedError`` saying how often the task was retried;
       with ``on_error`` other than ``"raise"``, *isolates* the task instead: a fresh worker
       reruns it record by record (:mod:`.isolation`), saying ``RecordStarted`` before each
       record; when that worker dies, the record it was on becomes a ``RecordError``
       (``error_type="WorkerCrashedError"``, the signal or exit code in ``message``) and the
       next fresh worker continues after it, keeping the outputs of the records before it.
       The RecordErrors go in the ``errors`` of the task's last ``TaskOutput``.

    ``task_timeout=s``: a CPU worker's watchdog thread (:mod:`.watchdog`) sends ``TaskStuck``
    when its task made no progress for ``s``; the collector raises ``TaskTimeoutError`` (stage,
    record, the worker's stack), or, with ``on_error``, kills the worker and isolates the
    task at once (a stuck task is not retried as a whole: it would hang again); a stuck
    isolated record becomes a ``RecordError`` with ``error_type="TaskTimeoutError"``. The
    backstop: a worker whose progress (a shared double its watchdog writes) is older than
    ``s + backstop_grace(s)`` is killed by the collector even if its watchdog could not run.

    Not retried: a GPU worker's death (``WorkerCrashedError``: its models and every CPU
    worker's batches in flight would all have to be rebuilt), a worker that ended through
    ``sys.exit`` in user code (a user error), and runs that write in the workers
    (``write_parquet`` with ``deterministic=False``: a dead worker's part file is lost).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

from ...errors import TaskTimeoutError, WorkerCrashedError
from ...execution.error_policy import RecordError
from ...execution.serialization import dumps_message
from ...execution.task import Task, TaskOutput
from .messages import IsolatedTask, RecordStarted, TaskStuck

#: Stage of a RecordError whose worker died without saying where it was.
UNKNOWN_STAGE = "unknown (the worker died)"


def backstop_grace_s(task_timeout: float) -> float:
    """How long past ``task_timeout`` the collector waits for a worker's watchdog before it kills the worker."""
    return max(2.0, task_timeout / 2)


@dataclass
class _Isolation:
    """A task run record by record: where to continue, the record running, the records dropped."""

    next_row: int = 0
    row: Optional[int] = None
    record: str = ""
    errors: list[RecordError] = field(default_factory=list)


class TaskRetries:
    """Which task ran how often, and which tasks are isolated (main process; collector thread).

    Args:
        max_task_retries: reruns of a task whose worker died (``set_processing``).
        isolate: whether a task past its reruns is isolated (``on_error`` is not "raise").
        task_timeout: seconds without progress (None: no timeout).
        locate: ``Source.locate(payload, row)``.
    """

    def __init__(
        self, max_task_retries: int, isolate: bool, task_timeout: Optional[float], locate: Callable[[Any, Optional[int]], str]
    ) -> None:
        self.max_task_retries = max_task_retries
        self.isolate = isolate
        self.task_timeout = task_timeout
        self._locate = locate
        self._attempts: dict[int, int] = {}
        self._isolating: dict[int, _Isolation] = {}

    @property
    def enabled(self) -> bool:
        """Whether a dead worker is replaced: reruns asked for, or stuck tasks to isolate."""
        return self.max_task_retries > 0 or (self.isolate and self.task_timeout is not None)

    def encode(self, task: Task) -> bytes:
        """What the feeder sends for ``task``: itself, or an ``IsolatedTask`` from where it stopped."""
        isolation = self._isolating.get(task.index)
        if isolation is None:
            return dumps_message(task)
        return dumps_message(IsolatedTask(task, isolation.next_row))

    def record_started(self, message: RecordStarted) -> None:
        isolation = self._isolating.get(message.task_index)
        if isolation is not None:
            isolation.row, isolation.record = message.row, message.record

    def running_row(self, task_index: int) -> Optional[int]:
        isolation = self._isolating.get(task_index)
        return isolation.row if isolation is not None else None

    def after_death(self, task: Task, crash: WorkerCrashedError, stuck: Optional[TaskStuck]) -> bool:
        """The worker running ``task`` died (``stuck``: killed by the timeout). Decides the rerun.

        Returns:
            Whether what arrived of ``task`` must be discarded (it reruns from its start);
            False when an isolated task continues after the record that killed its worker.

        Raises:
            WorkerCrashedError: ``task`` was rerun ``max_task_retries`` times and is not isolated,
                or its isolated run died before its first record (reading the task).
            TaskTimeoutError: ``task`` was stuck and is not isolated.
        """
        isolation = self._isolating.get(task.index)
        if isolation is not None:
            if isolation.row is None:
                raise WorkerCrashedError(f"{crash}, while reading task {task.index} to isolate its records") from None
            isolation.errors.append(self._record_error(task, isolation, crash, stuck))
            isolation.next_row, isolation.row = isolation.row + 1, None
            return False
        if stuck is not None:
            if not self.isolate:
                raise self.timeout_error(stuck, task)
            self._isolating[task.index] = _Isolation()
            return True
        attempts = self._attempts[task.index] = self._attempts.get(task.index, 0) + 1
        if attempts <= self.max_task_retries:
            return True
        if self.isolate:
            self._isolating[task.index] = _Isolation()
            return True
        raise WorkerCrashedError(
            f"{crash}; task {task.index} was retried {self.max_task_retries} time(s) and killed its worker "
            f"each time (max_task_retries={self.max_task_retries})"
        ) from None

    def _record_error(
        self, task: Task, isolation: _Isolation, crash: WorkerCrashedError, stuck: Optional[TaskStuck]
    ) -> RecordError:
        assert isolation.row is not None
        source = self._locate(task.payload, isolation.row)
        if stuck is not None:
            error = self.timeout_error(stuck, task)
            return RecordError(source, task.task_key, stuck.stage, "TaskTimeoutError", str(error), stuck.stack, isolation.record)
        return RecordError(source, task.task_key, UNKNOWN_STAGE, "WorkerCrashedError", str(crash), "", isolation.record)

    def on_output(self, output: TaskOutput) -> TaskOutput:
        """The last output of an isolated task carries the records its workers died on."""
        if not output.last:
            return output
        isolation = self._isolating.pop(output.task_index, None)
        self._attempts.pop(output.task_index, None)
        if isolation is None or not isolation.errors:
            return output
        return dataclasses.replace(output, errors=(*output.errors, *isolation.errors))

    def timeout_error(self, stuck: TaskStuck, task: Task) -> TaskTimeoutError:
        """The error for a stuck task: worker, pid, stage, record (its source location), stack."""
        if stuck.row is not None:
            record = f"record {stuck.row} of the task ({self._locate(task.payload, stuck.row)})"
        else:
            record = (
                f"a record of {self._locate(task.payload, None)} (which one is known only when the task is "
                f"isolated, with on_error='skip' or 'dead_letter')"
            )
        return TaskTimeoutError(
            f"task {task.index} made no progress for {stuck.seconds:.1f} s (task_timeout={self.task_timeout:g}) "
            f"in {stuck.worker} (pid {stuck.pid}), in {stuck.stage}, on {record}.\n"
            f"Python stack of the worker's task thread (most recent call last):\n{stuck.stack}"
        )
