"""Isolation mode: a task that keeps killing workers, run record by record (CPU worker side).

Runs in a CPU worker, for an ``IsolatedTask`` (see :mod:`.retries` for the main process's
side). The task's records are read as usual, then each record from ``start_row`` on goes
alone through every stage (a batch of one for ``map_batches`` and ``map_gpu``: outputs equal
within float tolerance to those of full batches, like the survivors of a split batch). Before
each record the worker says ``RecordStarted`` (with the record's text), and after it sends that
record's outputs, so that when the worker dies on a record the main process knows which one,
has every output of the records before it, and a fresh worker continues after it.

A record whose processing raises (which the record error policy did not catch, say in the
source) becomes a :class:`~streamproc.execution.error_policy.RecordError` of the task's last
``TaskOutput``; the crashes are added there by the main process.
"""

from __future__ import annotations

import dataclasses
import re
import traceback
from collections.abc import Callable, Iterator
from typing import Any, Optional

from ...execution.context import ExecutionContext
from ...execution.error_policy import RecordError, record_text
from ...execution.task import ChunkFinalizer, Task, TaskOutput, run_task
from ...io.base import Source
from ...plan import Plan
from .messages import IsolatedTask, RecordStarted, TaskChunk

_STAGE_NOTE = re.compile(r"^streamproc: raised in (stage \d+ \(.*\)|the source)")


def _stage_of(exc: BaseException) -> str:
    for note in getattr(exc, "__notes__", None) or []:
        match = _STAGE_NOTE.match(str(note))
        if match:
            return match.group(1)
    return "unknown"


class _OneRecordSource(Source):
    """A source whose one task is the payload itself: a list holding one record."""

    def __init__(self, source: Source) -> None:
        self.source = source

    def iter_tasks(self, task_size: int) -> Iterator[Any]:
        raise RuntimeError("an isolated record is never cut into tasks")

    def read_task(self, payload: Any) -> Iterator[Any]:
        return iter(payload)

    def describe(self) -> str:
        return self.source.describe()


def run_isolated(
    plan: Plan,
    isolated: IsolatedTask,
    ctx: ExecutionContext,
    finalize: Optional[ChunkFinalizer],
    send: Callable[[Any], None],
    begin_record: Callable[[int], None],
) -> None:
    """Runs ``isolated`` record by record, sending ``RecordStarted`` and ``TaskChunk`` messages.

    ``begin_record(row)`` tells the watchdog (if any) which record is running.
    """
    task = isolated.task
    records = [record for chunk in plan.source.read_task_chunks(task.payload, plan.chunk_size) for record in chunk]
    single = dataclasses.replace(plan, source=_OneRecordSource(plan.source))
    errors: list[RecordError] = []
    for row in range(isolated.start_row, len(records)):
        record = records[row]
        text = record_text(record)
        send(RecordStarted(task.run_id, task.index, row, text))
        begin_record(row)
        try:
            for output in run_task(single, Task(task.index, [record], task.run_id, task.key), ctx, finalize):
                if output.count or output.errors:
                    send(TaskChunk(task.run_id, dataclasses.replace(output, last=False, stats=None)))
        except Exception as exc:
            errors.append(
                RecordError(
                    source=plan.source.locate(task.payload, row),
                    task=task.task_key,
                    stage=_stage_of(exc),
                    error_type=type(exc).__name__,
                    message=str(exc),
                    traceback="".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
                    record=text,
                )
            )
    last = TaskOutput(task.index, None, 0, last=True, task_key=task.task_key, errors=tuple(errors))
    send(TaskChunk(task.run_id, last))
