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
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, Optional, Protocol

from ..backends.registry import get_backend
from ..progress import with_progress

if TYPE_CHECKING:
    from ..backends.base import Backend
    from ..execution.task import ChunkFinalizer, TaskOutput
    from ..options import ProcessingOptions
    from ..plan import Plan


class WorkerWriters(Protocol):
    """Picklable factory of the per-worker writers of a sink that writes inside workers."""

    def open_in_worker(self, worker_index: int) -> Any:
        """The writer of worker ``worker_index`` (runs in that worker).

        The writer's ``write(records)`` is the chunk finalizer there (its return value is
        what travels back), ``close() -> (paths, rows)`` completes it, ``abort()`` drops it.
        """
        ...


class Sink(ABC):
    """Receives a run's outputs; see the module docstring for the order of calls."""

    #: Set by :func:`run_into` when this run writes inside the workers.
    in_workers: bool = False

    def finalizer(self) -> Optional[ChunkFinalizer]:
        """A picklable ``records -> chunk`` function run where each task runs (None: lists)."""
        return None

    def wants_workers(self, options: ProcessingOptions) -> bool:
        """Whether this sink would write inside the workers with these options, if the backend can."""
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


def _backend_for(plan: Plan, sink: Sink) -> Backend:
    """The plan's backend, with ``sink.in_workers`` decided from its capabilities."""
    backend = get_backend(plan.options.effective_backend)
    sink.in_workers = sink.wants_workers(plan.options) and backend.capabilities.writes_in_workers
    return backend


def progress_for(handle: Iterable[TaskOutput], plan: Plan) -> Iterator[TaskOutput]:
    """``handle``'s outputs through the progress reporter when ``show_progress`` (main process).

    The total is the source's size when known and every task runs (no resume or shard
    selection); the stats issue plugs its bottleneck estimate in as ``stage_hint``.
    """
    if not plan.options.show_progress:
        return iter(handle)
    total = plan.source.num_records() if plan.task_selection is None else None
    return with_progress(handle, True, total, stage_hint=None)


def run_into(plan: Plan, sink: Sink) -> Any:
    """Runs ``plan`` into ``sink`` (main process) and returns ``sink.commit()``.

    Complete output on success; on any failure the sink is aborted and the error re-raised.
    """
    backend = _backend_for(plan, sink)
    sink.start()
    try:
        with backend.run(plan, sink) as handle:
            for output in progress_for(handle, plan):
                sink.write(output)
        return sink.commit()
    except BaseException:
        sink.abort()
        raise


def iter_records(plan: Plan) -> Iterator[Any]:
    """Runs ``plan``, yielding its output records one by one (main process)."""
    sink = _RecordsSink()
    with _backend_for(plan, sink).run(plan, sink) as handle:
        for output in progress_for(handle, plan):
            if output.chunk:
                yield from output.chunk


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
    """``write_parquet``: records become Arrow tables where produced.

    Deterministic runs (and backends that cannot write in workers): the main process writes
    the tables in order into ``part-00000.parquet``, ... With ``deterministic=False`` on a
    backend that can, each worker writes its own ``part-wNNN-MMMMM.parquet`` and only counts
    come back; the main process prepares the directory and lists the parts at the end.
    """

    def __init__(
        self, path: str | os.PathLike[str], overwrite: bool, schema: Any, rows_per_file: int, row_group_size: int
    ) -> None:
        from . import parquet_writer

        parquet_writer.check_part_sizes(rows_per_file, row_group_size)
        self.path = os.path.abspath(os.fspath(path))
        self.overwrite = overwrite
        self.schema = schema
        self.rows_per_file = rows_per_file
        self.row_group_size = row_group_size
        self._writer: Any = None

    def finalizer(self) -> ChunkFinalizer:
        from .parquet_writer import ArrowTableFinalizer

        return ArrowTableFinalizer(self.schema)

    def wants_workers(self, options: ProcessingOptions) -> bool:
        # Deterministic output keeps the simple backend's part layout: the main process writes.
        return not options.deterministic

    def worker_writers(self) -> WorkerWriters:
        from .parquet_writer import WorkerParquetSink

        return WorkerParquetSink(self.path, self.schema, self.rows_per_file, self.row_group_size)

    def start(self) -> None:
        from . import parquet_writer

        if self.in_workers:
            parquet_writer.prepare_output_dir(self.path, self.overwrite, parquet_writer.PARQUET_SUFFIXES, "write_parquet")
        else:
            self._writer = parquet_writer.ParquetPartWriter(
                self.path, self.overwrite, self.schema, self.rows_per_file, self.row_group_size
            )

    def write(self, output: TaskOutput) -> None:
        if self._writer is not None and output.chunk is not None:
            self._writer.write(output.chunk)

    def commit(self) -> list[str]:
        from . import parquet_writer

        if self._writer is None:
            return parquet_writer.list_parts(self.path)
        self._writer.close()
        paths: list[str] = self._writer.part_paths
        return paths

    def abort(self) -> None:
        from . import parquet_writer

        if self._writer is not None:
            self._writer.abort()
        else:
            parquet_writer.remove_in_progress(self.path)
