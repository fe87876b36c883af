"""The sinks of a :class:`~streamproc.Stream`: the methods that run it (main process).

Each builds the stream's plan (``Stream.plan()``) and hands it to a sink of :mod:`streamproc.io`
(``io/sinks.py``, ``io/arrow.py``, ``io/sql_sink.py``, ...), which runs it on the backend the
options choose. They live apart from ``stream.py``, which builds streams and runs nothing.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from typing import Any

from .io.limit import check_count
from .plan import Plan


class StreamOutputs:
    """The running half of :class:`~streamproc.Stream` (a base class; every method runs the
    stream in the calling process, which is the main process of the run)."""

    def plan(self) -> Plan:
        """The plan a sink would run now (defaults resolved); ``Stream`` defines it."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[Any]:
        """Runs the stream, yielding output records one by one (main process)."""
        from .io.sinks import iter_records

        return iter_records(self.plan())

    def to_list(self) -> list[Any]:
        """Runs the stream and returns its records in a list."""
        from .io.sinks import ListSink, run_into

        records: list[Any] = run_into(self.plan(), ListSink())
        return records

    def to_pandas(self) -> Any:
        """Runs the stream and returns a DataFrame (one row per dict record; column ``value`` otherwise)."""
        import pandas as pd

        records = self.to_list()
        if records and not isinstance(records[0], dict):
            return pd.DataFrame({"value": records})
        return pd.DataFrame.from_records(records) if records else pd.DataFrame()

    def write_parquet(
        self,
        path: str | os.PathLike[str],
        overwrite: bool = False,
        schema: Any = None,
        rows_per_file: int = 1_000_000,
        row_group_size: int = 65_536,
        resume: bool = False,
        filesystem: Any = None,
    ) -> list[str]:
        """Runs the stream and writes dict records to part files ``path/part-<first task>.parquet``.

        Part layout: with ``G = max(1, rows_per_file // rows per task)``, rows per task being
        ``task_size`` (a parquet source: its largest row group, a task being a row group), part
        ``g`` holds the outputs of tasks ``[g*G, (g+1)*G)`` in task order, named by its first
        task, whatever the backend, the number of workers or the timing. Records become Arrow
        where they are produced; on multiprocessing the CPU workers write whole parts when every
        worker has one, else the main process writes (docs/api.md says exactly when). A part
        counts once the manifest (``_streamproc_manifest.json``) lists it; ``resume=True``
        completes an interrupted write (error, Ctrl-C, SIGTERM, kill) into the uninterrupted
        run's directory. ``schema`` fixes the column types, else they are unified across tasks.
        See docs/long-jobs.md.

        Returns:
            The paths of this rank's part files, in task order (committed earlier ones too).

        Raises:
            FileExistsError: ``path`` holds this rank's files and neither ``overwrite`` nor
                ``resume`` is set (checked first; with a shard only its own files count).
            streamproc.ResumeMismatchError: ``resume=True`` but the input or the task layout
                (``task_size``, ``rows_per_file``, ``row_group_size``, shard) changed; says what.
            streamproc.SchemaError: a field whose types do not agree, naming both and the task.
            SystemExit: SIGTERM received (status 143), after committing the complete parts.
        """
        from .io.sinks import ParquetSink
        from .io.termination import run_until_sigterm

        sink = ParquetSink(path, overwrite, schema, rows_per_file, row_group_size, resume, filesystem)
        plan = sink.prepare(self.plan())
        paths: list[str] = run_until_sigterm(lambda: sink.run(plan), f"write_parquet({os.fspath(path)!r})")
        return paths

    def write_jsonl(self, path: str | os.PathLike[str], overwrite: bool = False) -> str:
        """Runs the stream and writes one JSON line per record to the file ``path`` (``.gz``: gzipped).

        The file appears under its name only when complete. Returns its path.
        """
        from .io.sinks import JsonlSink, run_into

        written: str = run_into(self.plan(), JsonlSink(path, overwrite))
        return written

    def write_sql(self, con: Any, table: str, if_exists: str = "fail", schema: Any = None, resume: bool = False) -> int:
        """Runs the stream and writes dict records into ``table``, one transaction per task.

        ``con``: a path or ``sqlite:///`` URL (sqlite3), or any SQLAlchemy URL (extra ``sql``);
        never a live connection: each process that writes (the CPU workers with multiprocessing,
        else the main process) opens its own. ``if_exists`` ("fail", "append", "replace") is
        applied once, before the run; the table is created from ``schema`` (``{column: "SQL
        type"}`` or a ``pyarrow.Schema``), else from the first committed task's records.
        ``resume=True`` records each task in ``_streamproc_tasks`` in its transaction; a rerun
        skips committed tasks (exactly once) and refuses a changed input or task layout
        (``ResumeMismatchError``). Row order in the table is not meaningful. Returns the rows
        written (with ``resume``, earlier runs' too). See :mod:`streamproc.io.sql_sink`.
        """
        from .io.sql_sink import write_sql

        return write_sql(self.plan(), con, table, if_exists, schema, resume)

    def take(self, n: int) -> list[Any]:
        """Runs the stream until ``n`` records are out and returns them in a list (a sink).

        The run stops (its workers too) once it has them: the source is read only as far
        as the backend reads ahead.

        >>> import streamproc as sp
        >>> sp.from_iterable(range(10**9)).filter(lambda x: x % 7 == 0).take(3)
        [0, 7, 14]
        """
        n = check_count(n, "take")
        if n == 0:
            return []
        records = iter(self)
        try:
            return list(itertools.islice(records, n))
        finally:
            close = getattr(records, "close", None)
            if close is not None:
                close()

    def count(self) -> int:
        """Runs the stream and returns how many records it yields (a sink).

        Records are counted where they are produced (a CPU worker with multiprocessing):
        only counts reach the main process.

        >>> import streamproc as sp
        >>> sp.from_iterable(range(10)).filter(lambda x: x % 2).count()
        5
        """
        from .io.limit import CountSink
        from .io.sinks import run_into

        total: int = run_into(self.plan(), CountSink())
        return total

    def to_arrow(self, schema: Any = None) -> Any:
        """Runs the stream and returns a ``pyarrow.Table`` of its dict records.

        Records become Arrow tables where they are produced (a CPU worker with
        multiprocessing); the main process concatenates them. ``schema`` (a
        ``pyarrow.Schema``) fixes the column types; otherwise each chunk's records decide
        and chunks are unified (a column that is all null in one chunk takes the type the
        others have). An empty stream gives an empty table (with ``schema``'s columns).

        >>> import streamproc as sp
        >>> sp.from_iterable([{"a": 1}, {"a": 2}]).to_arrow().to_pydict()
        {'a': [1, 2]}

        Raises:
            streamproc.SchemaError: a record that is not a dict, or types that do not agree.
        """
        from .io.arrow import ArrowSink
        from .io.sinks import run_into

        table = run_into(self.plan(), ArrowSink(schema))
        return table

    def to_huggingface(self, schema: Any = None) -> Any:
        """Runs the stream and returns a ``datasets.Dataset`` over ``to_arrow(schema)`` (no copy).

        Needs the optional ``datasets`` library (``pip install streamproc[datasets]``).

        Raises:
            ImportError: ``datasets`` is not installed, naming the pip command (before running).
        """
        from .io.huggingface import import_datasets, table_to_dataset

        import_datasets("to_huggingface()")
        return table_to_dataset(self.to_arrow(schema))

    def to_ray_dataset(self, schema: Any = None) -> Any:
        """Runs the stream and returns a ``ray.data.Dataset`` over ``to_arrow(schema)`` (needs ``streamproc[ray]``)."""
        from .io.ray_dataset import import_ray_for, table_to_ray_dataset

        import_ray_for("to_ray_dataset()")  # before running the stream
        return table_to_ray_dataset(self.to_arrow(schema))
