"""``write_parquet`` done by the CPU workers (multiprocessing, ``deterministic`` True or False).

Design. The dispatch unit is a whole part group: the main process hands each worker a
:class:`TaskGroup` (the ``G`` consecutive tasks of one part, :func:`group_payloads`), and the
worker runs them task by task (batches never span tasks), writing their rows into that part's
file with the same :class:`~.parquet_parts.PartFileWriter` the main process uses, which it
completes and moves to its final name. Only counts, dead-letter rows and, with the group's
last output, the part's manifest entry (:class:`~.manifest.PartEntry`) go back: the main
process records the commit in the manifest and never holds the data.

Why the files equal the simple backend's, part for part, whichever worker wrote them: a
part's content is a function of its tasks' outputs in task order only, and one worker runs
all of them in that order through the same writer: same name (the first task key), same rows
in the same order, same row groups (the writer cuts them from the rows it was given, and
restarts the file with a wider schema as the main process's writer does), same schema per
part. Schema unification *across* parts is not done here: each entry carries its part's
schema, and the main process, at the end of the run, unifies them in group order and rewrites
the parts whose schema is narrower (:meth:`.parquet_writer.ParquetOutput.commit`), exactly as
after a main-process write.

"Committed in order": the commit point of a part is its manifest entry, not its file. With
``deterministic=True`` the entries travel with the group's last output through the reorder
buffer, so the main process records them in group order and the manifest always lists a
prefix of the run's groups, as the simple backend's does; a part a worker completed ahead of
an earlier one is a file the manifest does not list yet. If the run fails, the sink's abort
(after every worker stopped) deletes such files, so the directory holds the committed prefix;
a crash of the main process leaves them to the next resume, whose start deletes them. With
``deterministic=False`` entries are recorded as they arrive (the manifest may then have gaps;
resume reruns exactly the missing groups either way).

Dead workers: a run that replaces them (``max_task_retries``, ``task_timeout``) reruns single
tasks or records, which have no part to go to; so with ``deterministic=True`` such a run
writes in the main process (:meth:`.sinks.ParquetSink.wants_workers`), and with
``deterministic=False`` it writes here and never replaces a worker (see :mod:`streamproc.backends.multiprocessing.retries`).

Cost of that choice: parallelism is across parts, so a run with fewer parts than workers
leaves workers idle (the default ``rows_per_file`` of 1M makes one part of a 1M-row input:
one worker then does all the work), and an in-memory source sends a part's records in one
message.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from ..execution.task import Task, TaskOutput, run_task
from .base import Source
from .parquet_parts import PartFileWriter, PartSettings
from .write_schema import ArrowTableFinalizer

if TYPE_CHECKING:
    from ..execution.context import ExecutionContext
    from ..execution.timing import StageTimer
    from ..plan import Plan


@dataclass(frozen=True)
class TaskGroup:
    """The payload of one dispatch unit: part group ``group``, its ``(task key, payload)`` pairs in order."""

    group: int
    tasks: tuple[tuple[int, Any], ...]


def group_payloads(payloads: Iterator[tuple[int, Any]], group_size: int) -> Iterator[tuple[int, TaskGroup]]:
    """Gathers consecutive ``(key, payload)`` pairs by part group: ``(first key, TaskGroup)`` (main process).

    >>> [(k, g.group, len(g.tasks)) for k, g in group_payloads(iter(enumerate("abcde")), 2)]
    [(0, 0, 2), (2, 1, 2), (4, 2, 1)]
    """
    pending: list[tuple[int, Any]] = []
    for key, payload in payloads:
        if pending and key // group_size != pending[0][0] // group_size:
            yield pending[0][0], TaskGroup(pending[0][0] // group_size, tuple(pending))
            pending = []
        pending.append((key, payload))
    if pending:
        yield pending[0][0], TaskGroup(pending[0][0] // group_size, tuple(pending))


def _where(plan: Plan, key: int, payload: Any) -> str:
    """Task ``key`` and, when its source can say it (file, row group...), where it is in the input."""
    if type(plan.source).locate is Source.locate:  # the default names the worker's copy of the source only
        return f"task {key}"
    return f"task {key} ({plan.source.locate(payload)})"


class WorkerParquetSink:
    """Picklable factory of the workers' part writers; travels with the plan (see the module docstring)."""

    def __init__(self, settings: PartSettings) -> None:
        self.settings = settings

    def dispatch_units(self, payloads: Iterator[tuple[int, Any]]) -> Iterator[tuple[int, TaskGroup]]:
        """What the main process dispatches: one part group per task (main process)."""
        return group_payloads(payloads, self.settings.group_size)

    def open_in_worker(self, worker_index: int) -> WorkerPartWriter:
        """The writer of CPU worker ``worker_index`` (runs in that worker)."""
        return WorkerPartWriter(self.settings)


class WorkerPartWriter:
    """The worker's half of :class:`WorkerParquetSink` (runs in a CPU worker)."""

    def __init__(self, settings: PartSettings) -> None:
        self.settings = settings
        self.finalize = ArrowTableFinalizer(settings.schema)
        self.paths: list[str] = []
        self.rows_written = 0
        self._part: Optional[PartFileWriter] = None

    def write(self, records: list[Any]) -> Any:
        """The chunk finalizer of tasks run outside a group: records -> Arrow table."""
        return self.finalize(records)

    def run_group(
        self, plan: Plan, task: Task, ctx: ExecutionContext, timer: Optional[StageTimer] = None
    ) -> Iterator[TaskOutput]:
        """Runs the tasks of ``task.payload`` (a :class:`TaskGroup`) in order into their part file.

        ``timer``: the worker's :class:`~streamproc.execution.timing.StageTimer`, which sums the
        tasks' stage figures (None: each task's stats travel with its last output).

        Yields their outputs without the rows (``chunk=()``), all with ``task_index`` =
        ``task.index`` and ``last=False`` but the group's final one, whose ``chunk`` is the
        committed part's :class:`~.manifest.PartEntry`. On any exception the part is dropped.
        """
        group = task.payload
        if not isinstance(group, TaskGroup):
            # A task rerun on its own (isolating a record, say) has no part to go to: a retry
            # of a run that writes in workers must resend the whole group.
            raise TypeError(f"a worker writing parts runs part groups, got {type(group).__name__} for task {task.index}")
        part = self._part = PartFileWriter(self.settings, group.group)
        final: Optional[TaskOutput] = None
        try:
            for position, (key, payload) in enumerate(group.tasks):
                closing = position == len(group.tasks) - 1
                for output in run_task(plan, Task(task.index, payload, task.run_id, key), ctx, self.finalize, timer):
                    if output.chunk is not None:
                        part.write(output.chunk, _where(plan, key, payload))
                    stripped = dataclasses.replace(output, chunk=(), last=output.last and closing)
                    if stripped.last:
                        final = stripped
                    else:
                        yield stripped
            entry = part.commit()
        except BaseException:
            part.abort()
            raise
        finally:
            self._part = None
        if entry.file is not None:
            self.paths.append(self.settings.directory.join(entry.file))
        self.rows_written += entry.rows
        assert final is not None
        yield dataclasses.replace(final, chunk=entry)

    def close(self) -> tuple[list[str], int]:
        """The part paths this worker committed and the rows it wrote (at the end of a run)."""
        return self.paths, self.rows_written

    def abort(self) -> None:
        if self._part is not None:
            self._part.abort()
            self._part = None
