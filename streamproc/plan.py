"""The execution plan: what a backend runs, derived from a Stream with defaults resolved.

A :class:`Plan` is the unit that travels to workers (pickled with dill once per worker): the
source (its worker half), the stages with batch sizes filled in, and the task size. It is
built in the main process, when a sink asks for records.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from .execution.granularity import finer_task_size
from .execution.selection import TaskSelection
from .execution.sharding import resolve_shard
from .io.base import Source
from .ops import BatchedOp, MapGPU, Op
from .options import DEFAULT_BATCH_SIZE, DEFAULT_TASK_SIZE, ProcessingOptions

if TYPE_CHECKING:
    from .stream import Stream


@dataclass(frozen=True)
class Stage:
    """One op of a plan and its place: ``index`` counts from 1 in source-to-sink order.

    ``name`` (``"stage 2 (map(clean))"``) is for messages only; code keys on ``index``.
    """

    index: int
    name: str
    op: Op


@dataclass(frozen=True)
class Plan:
    """A stream ready to run.

    ``task_size`` source records form one task (parquet: one row group per task); batches
    never span tasks. ``chunk_size`` is the most output records sent to the sink per message.
    ``task_selection`` (None: every task) is which tasks this run does: a sink that resumes
    skips committed ones, a shard keeps its own (see :func:`.execution.task.iter_selected_payloads`).
    """

    source: Source
    stages: tuple[Stage, ...]
    options: ProcessingOptions
    task_size: int
    chunk_size: int
    task_selection: Optional[TaskSelection] = None
    #: The fewest records of a task cut by bytes (all but the last): the largest record-count
    #: batch size, so that big records still make full batches (see :mod:`.execution.byte_budget`).
    min_task_records: int = 1

    @property
    def ops(self) -> tuple[Op, ...]:
        return tuple(stage.op for stage in self.stages)

    @property
    def has_gpu_stage(self) -> bool:
        return any(isinstance(stage.op, MapGPU) for stage in self.stages)

    def stage(self, index: int) -> Stage:
        """The stage numbered ``index`` (1-based)."""
        return self.stages[index - 1]

    def with_task_selection(self, tasks_per_group: int = 1, done_groups: Iterable[int] = ()) -> Plan:
        """This plan with part groups of ``tasks_per_group`` tasks, minus ``done_groups`` (main process).

        The shard (``set_processing(shard=...)``) is kept: a sink whose parts hold several
        tasks (``write_parquet``: ``tasks_per_group`` from ``rows_per_file`` and
        ``task_size``) calls this so that a rank owns whole parts, and a resumed run passes
        the groups already committed. See :func:`task_selection_for`.
        """
        return dataclasses.replace(self, task_selection=task_selection_for(self.options, tasks_per_group, done_groups))


def make_stages(ops: tuple[Op, ...]) -> tuple[Stage, ...]:
    """Numbers ``ops`` from 1 and names each stage after its op."""
    return tuple(Stage(index, f"stage {index} ({op.describe()})", op) for index, op in enumerate(ops, start=1))


def default_task_size(ops: tuple[Op, ...]) -> int:
    """``DEFAULT_TASK_SIZE``, or the largest record-count batch size if larger, so that a
    ``map_batches(batch_size=N)`` stage does see batches of N records."""
    return max(DEFAULT_TASK_SIZE, largest_batch_records(ops))


def largest_batch_records(ops: tuple[Op, ...]) -> int:
    """The largest batch size counted in records of ``ops`` (1: none)."""
    sizes = [op.batch_size.value for op in ops if isinstance(op, BatchedOp) and op.batch_size and op.batch_size.unit == "records"]
    return max([1, *sizes])


def _default_task_size_for(source: Source, ops: tuple[Op, ...]) -> int:
    """:func:`default_task_size`, cut finer for a small input of known length (see :mod:`.execution.granularity`)."""
    task_size = default_task_size(ops)
    if not source.tasks_follow_task_size:
        return task_size
    return finer_task_size(task_size, source.num_records(), largest_batch_records(ops))


def task_selection_for(
    options: ProcessingOptions, tasks_per_group: int = 1, done_groups: Iterable[int] = ()
) -> Optional[TaskSelection]:
    """The tasks a run with ``options`` does: its shard's part groups, minus ``done_groups``.

    None (every task, nothing to check per task) when the run is not sharded and skips
    nothing. ``shard="auto"`` reads the environment here (see :func:`.execution.sharding.resolve_shard`).

    >>> task_selection_for(ProcessingOptions()) is None
    True
    >>> task_selection_for(ProcessingOptions(shard=(1, 3)), tasks_per_group=2)
    TaskSelection(tasks_per_group=2, rank=1, world_size=3, done_groups=frozenset())

    Raises:
        ValueError: ``tasks_per_group`` is not a positive integer, or ``shard="auto"`` in an
            inconsistent environment.
    """
    if isinstance(tasks_per_group, bool) or not isinstance(tasks_per_group, int) or tasks_per_group < 1:
        raise ValueError(f"tasks_per_group must be a positive integer, got {tasks_per_group!r}")
    rank, world_size = resolve_shard(options.shard)
    done = frozenset(done_groups)
    if world_size == 1 and not done:
        return None
    return TaskSelection(tasks_per_group, rank, world_size, done)


def build_plan(stream: Stream) -> Plan:
    """The plan of ``stream`` (main process, when a sink asks for records).

    Its task selection is the shard's, one task per part group; a sink whose parts hold
    several tasks replaces it with :meth:`Plan.with_task_selection`.
    """
    options = stream.options
    options.check_combination()
    default_size = options.batch_size or DEFAULT_BATCH_SIZE
    ops = tuple(op.resolved(default_size, options.batch_by) if isinstance(op, BatchedOp) else op for op in stream.ops)
    task_size = options.task_size or _default_task_size_for(stream.source, ops)
    selection = task_selection_for(options)
    return Plan(
        stream.source, make_stages(ops), options, task_size, chunk_size=task_size, task_selection=selection,
        min_task_records=min(task_size, largest_batch_records(ops)),
    )
