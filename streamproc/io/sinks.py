"""Sinks: where a run's outputs go, and the one function that runs a plan into a sink.

A :class:`Sink` has a half that runs where records are produced (``finalizer``: records ->
what travels, an Arrow table or JSON text; or, when the backend can write inside workers, a
per-worker writer) and a half in the main process (``start``, ``write``, ``commit``,
``abort``). :func:`run_into` asks the backend's capabilities, never its name, whether the
sink writes in the workers.

Example subclass (a sink that counts records, finalized to counts where they are produced)::

    class CountSink(Sink):
        def __init__(self):
            self.total = 0

        def finalizer(self):
            return len            # runs in the worker: only an int travels

        def write(self, output):  # main process, task order when deterministic
            self.total += output.chunk or 0

        def commit(self):
            return self.total

Ordering guarantee: ``start`` before any task runs; ``write`` in the order the backend yields
outputs (task order when deterministic); then exactly one of ``commit`` (the run completed)
or ``abort`` (any failure, ``KeyboardInterrupt`` and early exit included).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Optional, Protocol

from ..backends.registry import get_backend
from ..progress import with_progress
from .error_ledger import dead_letter_mode_of, open_error_ledger, output_dir_of, watch_errors

if TYPE_CHECKING:
    from ..backends.base import Backend
    from ..execution.task import ChunkFinalizer, TaskOutput
    from ..plan import Plan
    from ..stats import RunStats


class WorkerWriters(Protocol):
    """Picklable factory of the per-worker writers of a sink that writes inside workers."""

    def dispatch_units(self, payloads: Iterator[tuple[int, Any]]) -> Iterator[tuple[int, Any]]:
        """What the backend dispatches, from the ``(key, payload)`` pairs of the run (main process):
        e.g. one part group per task, so that each worker writes whole parts."""
        ...

    def open_in_worker(self, worker_index: int) -> Any:
        """The writer of worker ``worker_index`` (runs in that worker).

        The writer's ``run_group(plan, task, ctx, timer)`` runs each dispatched task there, yielding
        its ``TaskOutput``s (what travels back), ``close() -> (paths, rows)`` completes it,
        ``abort()`` drops it.
        """
        ...


class Sink(ABC):
    """Receives a run's outputs; see the module docstring for the order of calls."""

    #: Set by :func:`run_into` when this run writes inside the workers.
    in_workers: bool = False
    #: How this run's dead letters treat what an earlier run wrote: ``"new"`` (refuse),
    #: ``"overwrite"`` or ``"resume"`` (``write_parquet(resume=True)``: keep the committed ones).
    dead_letter_mode: str = "new"

    def finalizer(self) -> Optional[ChunkFinalizer]:
        """A picklable ``records -> chunk`` function run where each task runs (None: lists)."""
        return None

    def wants_workers(self, plan: Plan) -> bool:
        """Whether this sink would write inside the workers for this plan, if the backend can."""
        return False

    def worker_writers(self) -> WorkerWriters:
        """The per-worker writers (only called when :attr:`in_workers` is set)."""
        raise NotImplementedError(f"{type(self).__name__} does not write inside workers")

    def start(self) -> None:
        """Prepares the output (main process, before any task runs); raises early on bad paths."""
        return None

    @abstractmethod
    def write(self, output: TaskOutput) -> None:
        """Takes one output chunk (main process)."""

    def commit(self) -> Any:
        """Completes the output after the last chunk; returns the sink's result."""
        return None

    def abort(self) -> None:
        """Drops what is incomplete after a failure (completed, committed parts stay)."""
        return None


class ListSink(Sink):
    """Collects the records in a list (``to_list``)."""

    def __init__(self) -> None:
        self.records: list[Any] = []

    def write(self, output: TaskOutput) -> None:
        if output.chunk:
            self.records.extend(output.chunk)

    def commit(self) -> list[Any]:
        return self.records


class _RecordsSink(Sink):
    """The sink of iteration: outputs are read from the run handle, never written."""

    def write(self, output: TaskOutput) -> None:  # never called: iter_records reads the handle
        raise AssertionError("iteration reads outputs from the run handle")


def _default_cpu_workers(plan: Plan) -> int:
    """The CPU worker count the multiprocessing backend would start for ``plan`` (main process)."""
    from ..backends.multiprocessing.cpu_budget import default_num_cpu_workers

    return default_num_cpu_workers(plan.options.effective_gpu_workers)


def _backend_for(plan: Plan, sink: Sink) -> Backend:
    """The plan's backend, with ``sink.in_workers`` decided from its capabilities."""
    backend = get_backend(plan.options.effective_backend)
    sink.in_workers = sink.wants_workers(plan) and backend.capabilities.writes_in_workers
    return backend


def progress_for(outputs: Iterable[TaskOutput], plan: Plan, stats: Optional[RunStats] = None) -> Iterator[TaskOutput]:
    """``outputs`` through the progress reporter when ``show_progress`` (main process).

    The total is the source's size when known and every task runs (not a shard, nor a resume
    that skips committed parts). With the run's ``stats``, the bar names the stage the
    bottleneck estimate blames so far (from the stage times of the tasks done).
    """
    if not plan.options.show_progress:
        return iter(outputs)
    selection = plan.task_selection
    every_task = selection is None or (selection.world_size == 1 and not selection.done_groups)
    total = plan.source.num_records() if every_task else None
    return with_progress(outputs, True, total, stage_hint=_bottleneck_stage(stats) if stats is not None else None)


def _bottleneck_stage(stats: RunStats) -> Callable[[], Optional[str]]:
    def stage() -> Optional[str]:
        try:
            return stats.bottleneck.stage
        except Exception:  # partial figures: a hint is never worth failing the run
            return None

    return stage


def run_into(plan: Plan, sink: Sink) -> Any:
    """Runs ``plan`` into ``sink`` (main process) and returns ``sink.commit()``.

    Complete output on success; on any failure the sink is aborted and the error re-raised.
    """
    from ..collect import publish_run

    backend = _backend_for(plan, sink)
    ledger = open_error_ledger(plan, dead_letter_mode_of(sink), output_dir_of(sink))
    sink.start()
    try:
        with backend.run(plan, sink) as handle:
            write = handle.timed_write(sink.write)
            for output in progress_for(watch_errors(handle, ledger), plan, handle.stats):
                write(output)
        result = handle.timed_commit(sink.commit)
        publish_run(handle.stats, plan, sink.in_workers)
        return result
    except BaseException:
        sink.abort()
        raise


def iter_records(plan: Plan) -> Iterator[Any]:
    """Runs ``plan``, yielding its output records one by one (main process)."""
    from ..collect import publish_run

    sink = _RecordsSink()
    ledger = open_error_ledger(plan, "new")
    with _backend_for(plan, sink).run(plan, sink) as handle:
        for output in progress_for(watch_errors(handle, ledger), plan, handle.stats):
            if output.chunk:
                yield from output.chunk
    publish_run(handle.stats, plan)


class JsonlSink(Sink):
    """``write_jsonl``: records become JSON text where produced; the main process writes one file."""

    def __init__(self, path: str | os.PathLike[str], overwrite: bool) -> None:
        self.path = os.fspath(path)
        self.overwrite = overwrite
        self._writer: Any = None

    def finalizer(self) -> ChunkFinalizer:
        from .jsonl import records_to_jsonl

        return records_to_jsonl

    def start(self) -> None:
        from .jsonl import JsonlWriter

        self._writer = JsonlWriter(self.path, self.overwrite)

    def write(self, output: TaskOutput) -> None:
        if output.chunk:
            self._writer.write(output.chunk)

    def commit(self) -> str:
        self._writer.close()
        path: str = self._writer.path
        return path

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()


class ParquetSink(Sink):
    """``write_parquet``: records become Arrow tables where produced, parts follow the part layout.

    On a backend that can write in its workers (multiprocessing), each CPU worker writes whole
    parts and only their manifest entries come back, in task order when ``deterministic``
    (:mod:`.worker_parts`). The main process writes the parts (outputs in task order) on the
    other backends and, with ``deterministic=True``, when the run replaces dead workers
    (``max_task_retries``, ``task_timeout``) or the filesystem lives in one process. See
    :mod:`.parquet_writer` for the directory, the manifest and resume. :meth:`prepare` must run
    (main process) before :func:`run_into`.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        overwrite: bool,
        schema: Any,
        rows_per_file: int,
        row_group_size: int,
        resume: bool = False,
        filesystem: Any = None,
    ) -> None:
        from .parquet_writer import ParquetOutput

        self.output = ParquetOutput(path, overwrite, resume, schema, rows_per_file, row_group_size, filesystem)
        self._enough_groups: Optional[bool] = None  # see _a_part_group_per_worker
        self.schema = schema
        self.dead_letter_mode = "resume" if resume else "overwrite" if overwrite else "new"

    def prepare(self, plan: Plan) -> Plan:
        """Checks the output directory and returns the plan to run (main process, before the run).

        The plan gets the part groups' task selection (resume skips committed groups), and
        runs in task order (``deterministic=True``) on a backend that cannot write in its
        workers: the part layout needs outputs in task order where the main process writes.
        """
        import dataclasses

        in_workers = self.wants_workers(plan) and get_backend(plan.options.effective_backend).capabilities.writes_in_workers
        if not in_workers and not plan.options.deterministic:
            plan = dataclasses.replace(plan, options=plan.options.updated(deterministic=True))
        return self.output.prepare(plan, in_workers=in_workers)

    def _a_part_group_per_worker(self, plan: Plan) -> bool:
        """Whether the run has at least one part group for each CPU worker (main process).

        A worker writes whole parts (G consecutive tasks), so with fewer groups than workers
        the others would sit idle: the workers then send their outputs to the main process,
        which writes. A source whose size is unknown (a generator, jsonl, a query) counts as
        too small: the main process writing is never slower than one worker computing everything.
        """
        if self._enough_groups is None:  # once per write: counting a parquet source's tasks reads its footers
            self._enough_groups = self._count_part_groups_per_worker(plan)
        return self._enough_groups

    def _count_part_groups_per_worker(self, plan: Plan) -> bool:
        from .parquet_parts import tasks_per_group

        tasks = plan.source.num_tasks(plan.task_size)
        if tasks is None:
            return False
        selection = plan.task_selection
        world_size = selection.world_size if selection is not None else 1
        groups = -(-tasks // tasks_per_group(self.output.rows_per_file, plan.source.rows_per_task(plan.task_size)))
        workers = plan.options.num_cpu_workers
        if workers is None:
            pool = getattr(plan.options, "pool", None)
            workers = pool.num_cpu_workers if pool is not None else _default_cpu_workers(plan)
        return -(-groups // world_size) >= workers

    def run(self, plan: Plan) -> list[str]:
        """Runs the prepared ``plan`` into the output (main process); a complete output runs nothing."""
        if self.output.complete:
            self.start()  # clears uncommitted files all the same
            return self.commit()
        paths: list[str] = run_into(plan, self)
        return paths

    def finalizer(self) -> ChunkFinalizer:
        from .write_schema import ArrowTableFinalizer

        return ArrowTableFinalizer(self.schema)

    def wants_workers(self, plan: Plan) -> bool:
        # The main process writes when a worker per part group would leave workers idle, and
        # when the filesystem lives in one process (fsspec ``memory``): no worker can reach it.
        if self.output.directory.is_per_process() or not self._a_part_group_per_worker(plan):
            return False
        if not plan.options.deterministic:
            return True  # a dead worker's part is lost: such a run never replaces workers (retries.py)
        # Deterministic: the workers' parts are the simple backend's, committed in order. A run
        # that replaces dead workers reruns single tasks, which have no part to go to: the main
        # process writes.
        return plan.options.max_task_retries == 0 and plan.options.task_timeout is None

    def worker_writers(self) -> WorkerWriters:
        return self.output.worker_writers()

    def start(self) -> None:
        self.output.start()

    def write(self, output: TaskOutput) -> None:
        from .manifest import PartEntry

        if not self.in_workers:
            self.output.write(output)
        elif isinstance(output.chunk, PartEntry):
            self.output.record(output.chunk)

    def commit(self) -> list[str]:
        return self.output.commit()

    def abort(self) -> None:
        self.output.abort()
