"""Running one task: read its records, chain the stages, cut the outputs into chunks.

This is the one code path that every backend shares, so that a task produces the same
records in the main process (simple backend), a worker thread (threads backend) and a CPU
worker (multiprocessing backend). It runs wherever the backend calls it; it starts no process
and no thread.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from ..errors import add_context_note
from ..stage_tags import tagged
from ..stats import TaskStats
from .error_policy import RECORDS_IN_KEY, ErrorPolicy, make_policy
from .timing import StageTimer, timed_finalize
from .worker_info import TaskInfo, reset_current, set_current

if TYPE_CHECKING:
    from ..plan import Plan
    from .context import ExecutionContext
    from .error_policy import RecordError

#: Turns a task's list of output records into what travels to the sink (a list, an Arrow table...).
ChunkFinalizer = Callable[[list[Any]], Any]


@dataclass(frozen=True)
class Task:
    """A numbered unit of work of run ``run_id``: ``payload`` is what ``Source.read_task`` needs.

    ``index`` is the task's position in this run (0, 1, 2, ... with no gap: dispatch and the
    reorder buffer count on it); ``key`` is its number in the whole, unsharded stream (the
    task's place in the part layout, its seed, its name in error rows). They differ when a
    :class:`~streamproc.execution.selection.TaskSelection` skips tasks (resume, sharding);
    ``key=None`` means ``key == index``.
    """

    index: int
    payload: Any
    run_id: int = 0
    key: Optional[int] = None

    @property
    def task_key(self) -> int:
        return self.index if self.key is None else self.key


@dataclass(frozen=True)
class TaskOutput:
    """One chunk of the outputs of task ``task_index``: what a backend yields to the sink.

    ``chunk`` is a list of ``count`` records, or what the sink's ``finalize`` made of them
    where the task ran (an Arrow table, JSON text, nothing for a sink that wrote them there).
    A task's chunks come in order; ``last`` marks its final one, which may carry ``stats``:
    the task's own (:func:`run_task` without a timer), or the sums of the tasks its process
    ran since it last sent them (see :class:`~streamproc.execution.timing.StageTimer`).
    A task with no output yields one ``TaskOutput`` with ``chunk=None`` and ``count=0``.
    ``task_key`` is the task's key in the whole stream (see :class:`Task`; None: the index).
    ``errors`` are the records the error policy dropped in this chunk (dead-letter rows).
    ``source_records`` are the records read from the source since the task's previous chunk
    (summed over a task's chunks: the records the task read); progress counts these.
    """

    task_index: int
    chunk: Any
    count: int
    stats: Optional[TaskStats] = None
    last: bool = True
    task_key: Optional[int] = None
    errors: tuple[RecordError, ...] = ()
    source_records: int = 0


def iter_task_records(
    plan: Plan,
    payload: Any,
    ctx: ExecutionContext,
    timer: Optional[StageTimer] = None,
) -> Iterator[list[Any]]:
    """Streams the output records of one task, in lists (source read included).

    The source's chunks and every stage's output run inside a generator that tags an error
    with the stage it came from (:func:`~streamproc.stage_tags.tagged`); with a ``timer``, the same
    generator times and counts them once per chunk (see :mod:`.timing`), and the stages see
    the timer's context, whose forward runners are timed.
    """
    source = plan.source.read_task_chunks(payload, plan.chunk_size)
    if timer is None:
        chunks: Iterator[list[Any]] = tagged(source, "the source")
        for stage in plan.stages:
            chunks = tagged(stage.op.apply(chunks, ctx, stage), stage.name)
        return chunks
    chunks = timer.wrap(source, 0, "the source")
    ctx = timer.ctx
    for layer, stage in enumerate(plan.stages, 1):
        chunks = timer.wrap(stage.op.apply(chunks, ctx, stage), layer, stage.name)
    return chunks


def iter_task_chunks(
    plan: Plan,
    payload: Any,
    ctx: ExecutionContext,
    finalize: Optional[ChunkFinalizer] = None,
    timer: Optional[StageTimer] = None,
) -> Generator[tuple[Any, int], None, None]:
    """Runs one task and yields ``(chunk, record_count)`` pairs.

    Small output lists (after a filter, or per batch) are merged until they hold at least
    ``plan.chunk_size`` records, so that a message carries many records. ``finalize`` (for
    example records -> Arrow table for parquet sinks) is applied to every chunk where the task
    runs, so a worker does that conversion rather than the main process. A ``timer`` times
    the stages and ``finalize``.
    """
    size = plan.chunk_size
    finalize = timed_finalize(finalize, timer)
    pending: list[Any] = []
    for chunk in iter_task_records(plan, payload, ctx, timer):
        if pending:
            pending.extend(chunk)
        else:
            pending = chunk
        if len(pending) >= size:
            yield (finalize(pending) if finalize is not None else pending), len(pending)
            pending = []
    if pending:
        yield (finalize(pending) if finalize is not None else pending), len(pending)


def run_task(
    plan: Plan,
    task: Task,
    ctx: ExecutionContext,
    finalize: Optional[ChunkFinalizer] = None,
    timer: Optional[StageTimer] = None,
) -> Iterator[TaskOutput]:
    """Runs ``task`` and yields its :class:`TaskOutput` chunks, the last one with ``last=True``.

    One chunk is held back so that the last can be marked; an exception propagates after
    the chunks completed before it (marked ``last=False``) were yielded. Every chunk carries
    the number of source records read since the previous one (progress).

    Stats: the stages are timed by ``timer``, the :class:`StageTimer` of the process or
    thread running the task, which sums its tasks' figures; the last chunk carries them when
    they are due (:meth:`StageTimer.take_if_due`). Without a timer, the task gets its own and
    its last chunk always carries the task's :class:`~streamproc.stats.TaskStats`.

    With ``on_error`` other than ``"raise"``, the task's :class:`ErrorPolicy` is
    ``ctx.error_policy`` while it runs; each chunk carries the errors recorded until it was
    yielded, and, with a fractional ``max_errors``, the last one carries the task's own stats
    with ``stats.extra["records_in"]`` (records the source produced). While its ops run,
    ``sp.get_worker_info()`` gives the context's worker and the task's seed (:mod:`.worker_info`).
    """
    policy = ctx.error_policy = make_policy(plan.options, plan.source, task.payload, task.task_key)
    own_stats = timer is None or (policy is not None and policy.counts_records)
    if own_stats:
        timer = StageTimer(plan, ctx)
    assert timer is not None
    timer.begin_task()
    previous: Optional[tuple[Any, int]] = None
    info = TaskInfo(ctx.worker_info, plan, task.task_key)
    chunks = iter_task_chunks(plan, task.payload, ctx, finalize, timer)
    # The info is current while the task's code runs (inside the loop's next()), never while
    # an output is handed on; a ``for`` loop: the chunks' end raises no StopIteration here.
    token, current = set_current(info), True
    try:
        for chunk, count in chunks:
            reset_current(token)
            current = False
            if previous is not None:
                yield _output(task, previous, policy, False, timer.take_source_records())
            previous = (chunk, count)
            token, current = set_current(info), True
    except GeneratorExit:  # the consumer closed us (at a yield): nothing more may be yielded
        token = set_current(info)  # the ops' clean-up may run user code
        try:
            chunks.close()
        finally:
            reset_current(token)
        raise
    except BaseException as exc:
        if current:  # raised inside the task's code
            reset_current(token)
        if isinstance(exc, Exception):
            add_context_note(exc, task_location_note(plan, task))
        if previous is not None:
            yield _output(task, previous, policy, False, timer.take_source_records())
        raise
    reset_current(token)
    source_records = timer.take_source_records()
    timer.end_task()
    if own_stats:
        records_in = timer.task_source_records
        stats = timer.take()
        if policy is not None and policy.counts_records and stats is not None:
            stats.extra[RECORDS_IN_KEY] = records_in
    else:
        stats = timer.take_if_due()
    yield _output(task, previous if previous is not None else (None, 0), policy, True, source_records, stats)


def _output(
    task: Task,
    chunk: tuple[Any, int],
    policy: Optional[ErrorPolicy],
    last: bool,
    source_records: int,
    stats: Optional[TaskStats] = None,
) -> TaskOutput:
    errors = policy.drain() if policy is not None else ()
    return TaskOutput(task.index, chunk[0], chunk[1], stats, last, task.task_key, errors, source_records)


def task_location_note(plan: Plan, task: Task) -> str:
    """The note naming where in the input ``task`` is: ``"streamproc: task 3 reads a.parquet, row group 1"``."""
    try:
        where = plan.source.locate(task.payload)
    except Exception as exc:  # a note must never hide the error it annotates
        where = f"<locate() failed: {type(exc).__name__}: {exc}>"
    return f"streamproc: task {task.task_key} reads {where}"


def iter_selected_payloads(plan: Plan) -> Iterator[tuple[int, Any]]:
    """``(key, payload)`` of the tasks this run does, in source order (main process).

    Every task of the source is numbered (its key); the plan's task selection (resume,
    sharding) drops the ones this run skips. A skipped task's payload is still produced (an
    iterable source is re-iterated and its records discarded); a splittable source's payload
    holds no records, so skipping a parquet row group reads nothing of it.
    """
    selection = plan.task_selection
    for key, payload in enumerate(plan.source.iter_tasks_of_plan(plan.task_size, plan.min_task_records)):
        if selection is None or selection.selects(key):
            yield key, payload
