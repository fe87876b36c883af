"""Timing the stages of tasks, once per chunk: what :class:`~streamproc.stats.TaskStats` holds.

Runs wherever the tasks run (main process, worker thread, CPU worker). Each stage's output
iterator (and the source's) runs inside :func:`streamproc.stage_tags.tagged_timed`, the generator
that tags the stage's errors, which also adds the time spent inside its ``next()`` to a
running total, and counts chunks and records. The wrappers nest: stage ``k``
pulls from the wrapper of stage ``k - 1``, so

    exclusive(k) = inclusive(k) - inclusive(k - 1)          (inclusive(0): the source's own)

and for a ``map_gpu`` stage the forward runner is wrapped the same way (its output minus its
input), so that forward (in process, or waiting for the GPU workers) is not counted as the
stage's CPU time. Two ``perf_counter`` calls per chunk and per stage: never per record.

The totals are summed over the tasks a process or thread runs (:class:`StageTimer`) and handed
on a few times per run, so that the per-task cost of the stats is a few attribute updates: no
object is built, pickled or merged per task (issue 9: stats cost at most 3% of the overhead
benchmark; see docs/benchmarks.md, "Stats overhead, reworked").
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Optional, TypeVar

from ..stage_tags import tagged_timed
from ..stats import ProcessStats, StageStats, TaskStats

T = TypeVar("T")

if TYPE_CHECKING:
    from ..plan import Plan, Stage
    from .context import ExecutionContext, ForwardRunner

_clock = time.perf_counter

#: How often a :class:`StageTimer` that sums many tasks hands its figures on (seconds, checked
#: at each task's end): often enough for the progress bar's bottleneck hint, which reads them
#: at most once per second, and rare enough to cost nothing per task.
STATS_SEND_INTERVAL_S = 0.5


class _Inclusive:
    """Running totals of one wrapped iterator: seconds inside its ``next()``, chunks, records.

    Summed over the tasks of a :class:`StageTimer` (one layer per stage, and the source's).
    """

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


class StageTimer:
    """Times the stages of the tasks one process or thread runs, and sums their figures there.

    Made by a backend once per run and per process or thread that runs tasks (a CPU worker, a
    worker thread, the simple backend's main process) and passed to every
    :func:`~streamproc.execution.task.run_task` there, so that nothing is built, pickled or
    merged per task: :meth:`take` hands the sums on as one
    :class:`~streamproc.stats.TaskStats` at most every :data:`STATS_SEND_INTERVAL_S` (on a
    task's last output, for the progress hint) and at the run's end (the backend).
    ``run_task`` without one makes one per task, whose figures travel with the task's last
    output (direct callers, crash isolation, retries: see ``StartRun.per_task_stats``).

    Its layers hold the wrapped iterators' totals summed over the tasks: exclusive time is
    linear in them (the sum over tasks of ``inclusive(k) - inclusive(k - 1)`` is the
    difference of the sums), so per task only :meth:`begin_task` and :meth:`end_task` run
    (the task's busy seconds, for the two longest). A timer serves one thread at a time.
    """

    def __init__(self, plan: Plan, ctx: ExecutionContext) -> None:
        self.where = ctx.where
        self._plan_stages = plan.stages
        self._layers = [_Inclusive() for _ in range(len(plan.stages) + 1)]
        self._gpu: dict[int, StageStats] = {}
        self.ctx: Any = ctx
        if plan.has_gpu_stage:  # forward runners are timed into these, which persist across tasks
            self._gpu = {stage.index: StageStats(stage.index, stage.name, ctx.where) for stage in plan.stages}
            self.ctx = _TimingContext(ctx, self._gpu)
        self.finalize_seconds = 0.0
        self.tasks = 0
        self.task_seconds = 0.0
        self.longest = 0.0
        self.second_longest = 0.0
        self._task_start = 0.0
        self._task_source_start = 0
        self._reported_records = 0
        self._taken_at = _clock()

    def wrap(self, it: Iterator[list[Any]], layer: int, stage: str) -> Iterator[list[Any]]:
        """The source's chunks (``layer`` 0) or stage ``layer``'s output, tagged with ``stage``
        (see :func:`streamproc.stage_tags.tagged`) and timed into that layer, in one generator."""
        return tagged_timed(it, stage, self._layers[layer])

    def begin_task(self) -> None:
        """A task starts (before its first chunk is asked for)."""
        self._task_start = self._layers[-1].seconds + self.finalize_seconds
        self._task_source_start = self._reported_records = self._layers[0].records

    @property
    def task_source_records(self) -> int:
        """The records the current task has read from its source so far."""
        return self._layers[0].records - self._task_source_start

    def take_source_records(self) -> int:
        """The records read from the source since the last call (each output chunk's share, for progress)."""
        read = self._layers[0].records
        new, self._reported_records = read - self._reported_records, read
        return new

    def end_task(self) -> None:
        """The current task ran to its end: count it and its busy seconds."""
        seconds = self._layers[-1].seconds + self.finalize_seconds - self._task_start
        self.tasks += 1
        self.task_seconds += seconds
        if seconds > self.longest:
            self.longest, self.second_longest = seconds, self.longest
        elif seconds > self.second_longest:
            self.second_longest = seconds

    def take_if_due(self) -> Optional[TaskStats]:
        """:meth:`take` when :data:`STATS_SEND_INTERVAL_S` passed since the last one, else None."""
        return self.take() if _clock() - self._taken_at >= STATS_SEND_INTERVAL_S else None

    def take(self) -> Optional[TaskStats]:
        """The figures of the tasks ended since the last call (None: none), and starts over at zero.

        Call between tasks (what a task that failed had counted goes with the next figures:
        only a failed run, whose stats nobody reads, has one).
        """
        self._taken_at = _clock()
        if not self.tasks:
            return None
        layers = self._layers
        source = layers[0]
        stages: list[Any] = [(0, "read the source", source.records, source.records, source.chunks, source.seconds)]
        for before, after, plan_stage in zip(layers, layers[1:], self._plan_stages):
            gpu = self._gpu.get(plan_stage.index)
            if gpu is None:  # a plain tuple: see StageRow
                seconds = after.seconds - before.seconds
                stages.append((plan_stage.index, plan_stage.name, before.records, after.records, after.chunks, seconds))
                continue
            stages.append(dataclasses.replace(
                gpu, records_in=before.records, records_out=after.records, batches=after.chunks,
                seconds=gpu.seconds + after.seconds - before.seconds,
            ))
            gpu.seconds = gpu.forward_seconds = 0.0
            gpu.forward_batches = gpu.real_tokens = gpu.padded_tokens = 0
        stats = TaskStats(
            self.where, self.task_seconds, stages, self.finalize_seconds, {}, self.tasks, self.longest, self.second_longest
        )
        for layer in layers:
            layer.seconds, layer.chunks, layer.records = 0.0, 0, 0
        self.finalize_seconds = self.task_seconds = self.longest = self.second_longest = 0.0
        self.tasks = self._task_source_start = self._reported_records = 0
        return stats


def timed_finalize(finalize: Any, timer: Optional[StageTimer]) -> Any:
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
