"""Timing one task's stages, once per chunk: what :class:`~streamproc.stats.TaskStats` holds.

Runs wherever the task runs (main process, worker thread, CPU worker). Each stage's output
iterator (and the source's) is wrapped in :func:`_timed`, which adds the time spent inside its
``next()`` to a running total, and counts chunks and records. The wrappers nest: stage ``k``
pulls from the wrapper of stage ``k - 1``, so

    exclusive(k) = inclusive(k) - inclusive(k - 1)          (inclusive(0): the source's own)

and for a ``map_gpu`` stage the forward runner is wrapped the same way (its output minus its
input), so that forward (in process, or waiting for the GPU workers) is not counted as the
stage's CPU time. Two ``perf_counter`` calls per chunk and per stage: never per record.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Optional, TypeVar

from ..stats import ProcessStats, StageStats, TaskStats

T = TypeVar("T")

if TYPE_CHECKING:
    from ..plan import Plan, Stage
    from .context import ExecutionContext, ForwardRunner

_clock = time.perf_counter


class _Inclusive:
    """Running totals of one wrapped iterator: seconds inside its ``next()``, chunks, records."""

    __slots__ = ("chunks", "records", "seconds")

    def __init__(self) -> None:
        self.seconds = 0.0
        self.chunks = 0
        self.records = 0


def _timed(it: Iterator[T], into: _Inclusive, count_records: bool = True) -> Iterator[T]:
    """Yields the items of ``it`` (chunks, or ``(records, batch)`` pairs), adding the time spent
    producing each one to ``into``, and its ``len`` as records when ``count_records``."""
    clock = _clock
    it = iter(it)
    while True:
        start = clock()
        try:
            item = next(it)
        except StopIteration:
            into.seconds += clock() - start
            return
        except BaseException:
            into.seconds += clock() - start
            raise
        into.seconds += clock() - start
        into.chunks += 1
        if count_records:
            into.records += len(item)  # type: ignore[arg-type]
        yield item


class _TimedForwardRunner:
    """A stage's forward runner, timed: its output's ``next()`` minus the input it pulled.

    Also counts real and padded tokens of the batches when the stage's ``batch_by`` gives
    record sizes (one size call per record of a ``map_gpu`` batch: negligible next to forward).
    """

    def __init__(self, inner: ForwardRunner, stage: Stage, stats: StageStats) -> None:
        self.inner = inner
        self.stats = stats
        op: Any = stage.op
        batch_size = getattr(op, "batch_size", None)
        self.size_of: Any = None
        if batch_size is not None and getattr(batch_size, "unit", "records") != "records":
            from ..batching import make_size_fn

            self.size_of = make_size_fn(op.batch_by)

    def run(self, batches: Iterator[tuple[list[Any], Any]]) -> Iterator[tuple[list[Any], Any]]:
        inputs, outputs = _Inclusive(), _Inclusive()
        try:
            counted = self._counted(batches, inputs)
            yield from _timed(self.inner.run(counted), outputs, count_records=False)
        finally:
            self.stats.forward_seconds += outputs.seconds - inputs.seconds
            self.stats.forward_batches += outputs.chunks
            # Upstream time the forward runner pulled is the stage's own (prepare_batch, batching).
            self.stats.seconds -= outputs.seconds - inputs.seconds

    def _counted(self, batches: Iterator[tuple[list[Any], Any]], into: _Inclusive) -> Iterator[tuple[list[Any], Any]]:
        size_of = self.size_of
        stats = self.stats
        for pair in _timed(batches, into, count_records=False):
            if size_of is not None:
                sizes = [size_of(record) for record in pair[0]]
                if sizes:
                    stats.real_tokens += sum(sizes)
                    stats.padded_tokens += max(sizes) * len(sizes)
            yield pair


class _TimingContext:
    """The task's :class:`ExecutionContext`, whose forward runners are timed into this task's stats."""

    def __init__(self, ctx: ExecutionContext, stages: dict[int, StageStats]) -> None:
        self._ctx = ctx
        self._stages = stages

    def forward_runner(self, stage: Stage) -> ForwardRunner:
        inner = self._ctx.forward_runner(stage)
        stats = self._stages[stage.index]
        stats.forward_where = getattr(inner, "location", None) or self._ctx.where
        return _TimedForwardRunner(inner, stage, stats)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ctx, name)


class TaskTimer:
    """Times the stages of one task (made by :func:`~streamproc.execution.task.iter_task_records`).

    :meth:`wrap` wraps the iterators as the chain is built; :meth:`stats` turns the totals
    into a :class:`TaskStats` once the task has run. A few microseconds per task.
    """

    def __init__(self, plan: Plan, ctx: ExecutionContext) -> None:
        self.where = ctx.where
        self._totals: list[_Inclusive] = []
        self._plan_stages = plan.stages
        self._stages: dict[int, StageStats] = {}
        self.ctx: Any = ctx
        if plan.has_gpu_stage:  # forward runners are timed: their stats must exist from the start
            self._stages = {stage.index: StageStats(stage.index, stage.name, ctx.where) for stage in plan.stages}
            self.ctx = _TimingContext(ctx, self._stages)
        self.finalize_seconds = 0.0
        self._reported_records = 0

    @property
    def source_records(self) -> int:
        """The records the task has read from its source so far (the first wrapped iterator's)."""
        return self._totals[0].records if self._totals else 0

    def take_source_records(self) -> int:
        """The records read from the source since the last call (each output chunk's share, for progress)."""
        read = self.source_records
        new, self._reported_records = read - self._reported_records, read
        return new

    def wrap(self, it: Iterator[list[Any]]) -> Iterator[list[Any]]:
        """Wraps the source's chunks (first call) or the next stage's output (later calls)."""
        totals = _Inclusive()
        self._totals.append(totals)
        return _timed(it, totals)

    def stats(self) -> TaskStats:
        """The task's :class:`TaskStats` (call after its last chunk)."""
        totals = self._totals
        source = totals[0] if totals else _Inclusive()
        stages: list[Any] = [(0, "read the source", source.records, source.records, source.chunks, source.seconds)]
        made = self._stages
        for k in range(1, len(totals)):
            plan_stage = self._plan_stages[k - 1]
            before, after = totals[k - 1], totals[k]
            stage = made.get(plan_stage.index)
            if stage is None:  # a plain tuple: see StageRow
                seconds = after.seconds - before.seconds
                stages.append((plan_stage.index, plan_stage.name, before.records, after.records, after.chunks, seconds))
                continue
            stage.records_in = before.records
            stage.records_out = after.records
            stage.batches = after.chunks
            stage.seconds += after.seconds - before.seconds
            stages.append(stage)
        busy = (totals[-1].seconds if totals else 0.0) + self.finalize_seconds
        return TaskStats(where=self.where, seconds=busy, stages=stages, finalize_seconds=self.finalize_seconds)


def timed_finalize(finalize: Any, timer: Optional[TaskTimer]) -> Any:
    """``finalize`` whose time is added to ``timer.finalize_seconds`` (None: no finalize)."""
    if finalize is None or timer is None:
        return finalize

    def run(records: list[Any]) -> Any:
        start = _clock()
        try:
            return finalize(records)
        finally:
            timer.finalize_seconds += _clock() - start

    return run


def timed_payloads(payloads: Iterator[tuple[int, Any]], main: ProcessStats) -> Iterator[tuple[int, Any]]:
    """``payloads`` (the run's tasks), the time spent producing them added to ``main.source_seconds``.

    Runs in the main process (in the thread that asks for the next task: the consumer's, a
    feeder's or a worker thread's; the dispatcher's lock serialises them).
    """
    clock = _clock
    while True:
        start = clock()
        try:
            item = next(payloads)
        except StopIteration:
            main.source_seconds += clock() - start
            return
        except BaseException:
            main.source_seconds += clock() - start
            raise
        main.source_seconds += clock() - start
        yield item
