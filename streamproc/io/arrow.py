"""Arrow in and out: ``from_arrow`` (a Table, a RecordBatch or a ``pyarrow.dataset``) and ``to_arrow``.

In-memory tables are cut into tasks of ``task_size`` rows; a task is a zero-copy slice taken
where the task runs (the table travels to each worker once, with the stream). A
``pyarrow.dataset.Dataset`` has one task per fragment (per row group for parquet fragments):
the main process only lists them, the rows are decoded where the task runs.
"""

from __future__ import annotations

import reprlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Optional

from ..errors import SchemaError
from .base import READ_BATCH_ROWS, ChunkedSource, Source, row_ranges
from .parquet import batch_to_records
from .sinks import Sink

if TYPE_CHECKING:
    from ..execution.task import ChunkFinalizer, TaskOutput


def _check_columns(columns: Optional[list[str]], names: list[str], what: str) -> Optional[list[str]]:
    """``columns`` as a list, after checking each names a column of ``names``."""
    if columns is None:
        return None
    if isinstance(columns, str) or not all(isinstance(c, str) for c in columns):
        raise TypeError(f"{what}: columns must be a list of column names, got {columns!r}")
    missing = [c for c in columns if c not in names]
    if missing:
        raise SchemaError(f"{what}: unknown column(s) {missing}; available: {names}")
    return list(columns)


class ArrowTableSource(ChunkedSource):
    """Dict records from an in-memory ``pyarrow.Table`` (a ``RecordBatch`` becomes one).

    Tasks are row ranges ``(start, stop)``; ``read_task_chunks`` slices the table (no copy)
    and converts ``chunk_size`` rows at a time to dicts, where the task runs.
    """

    tasks_follow_task_size = True

    def __init__(self, table: Any, columns: Optional[list[str]] = None) -> None:
        import pyarrow as pa

        if isinstance(table, pa.RecordBatch):
            table = pa.Table.from_batches([table])
        self.columns = _check_columns(columns, table.schema.names, "from_arrow")
        self.table = table.select(self.columns) if self.columns is not None else table

    def iter_tasks(self, task_size: int) -> Iterator[tuple[int, int]]:
        return row_ranges(self.table.num_rows, task_size)

    def read_task_chunks(self, payload: tuple[int, int], chunk_size: int) -> Iterator[list[dict[str, Any]]]:
        start, stop = payload
        for offset in range(start, stop, chunk_size):
            yield batch_to_records(self.table.slice(offset, min(chunk_size, stop - offset)))

    def locate(self, payload: tuple[int, int], row: int | None = None) -> str:
        start, stop = payload
        if row is None:
            return f"from_arrow, rows {start}-{stop - 1}"
        return f"from_arrow, row {start + row}"

    def num_records(self) -> int:
        return int(self.table.num_rows)

    def describe(self) -> str:
        return f"from_arrow(<Table {self.table.num_rows} rows x {self.table.num_columns} columns>)"


class ArrowDatasetSource(ChunkedSource):
    """Dict records from a ``pyarrow.dataset.Dataset``: one task per fragment, or per row group
    of a parquet fragment. Payloads are ``(fragment number, row group or None)``; the fragments
    are listed once per process (main process: at creation; a worker: at its first task)."""

    def __init__(self, dataset: Any, columns: Optional[list[str]] = None) -> None:
        self.dataset = dataset
        self.columns = _check_columns(columns, dataset.schema.names, "from_arrow")
        self._fragments: Optional[list[Any]] = None

    def fragments(self) -> list[Any]:
        if self._fragments is None:
            self._fragments = list(self.dataset.get_fragments())
        return self._fragments

    def iter_tasks(self, task_size: int) -> Iterator[tuple[int, Optional[int]]]:
        import pyarrow.dataset as pads

        for number, fragment in enumerate(self.fragments()):
            if isinstance(fragment, pads.ParquetFileFragment) and fragment.num_row_groups > 1:
                for row_group in range(fragment.num_row_groups):
                    yield number, row_group
            else:
                yield number, None

    def read_task_chunks(self, payload: tuple[int, Optional[int]], chunk_size: int) -> Iterator[list[dict[str, Any]]]:
        number, row_group = payload
        fragment = self.fragments()[number]
        if row_group is not None:
            fragment = fragment.subset(row_group_ids=[row_group])
        # The dataset's schema, not the fragment's: every task yields the same fields.
        batches = fragment.to_batches(
            schema=self.dataset.schema, columns=self.columns, batch_size=max(chunk_size, READ_BATCH_ROWS), use_threads=False
        )
        for batch in batches:
            if batch.num_rows:
                yield batch_to_records(batch)

    def locate(self, payload: tuple[int, Optional[int]], row: int | None = None) -> str:
        number, row_group = payload
        fragment = self.fragments()[number]
        where = f"from_arrow, {getattr(fragment, 'path', None) or f'fragment {number}'}"
        if row_group is not None:
            where += f", row group {row_group}"
        return where if row is None else f"{where}, row {row}"

    def num_records(self) -> Optional[int]:
        """The row counts of parquet fragments' footers; None when a fragment is not parquet
        (counting its rows would read it)."""
        import pyarrow.dataset as pads

        fragments = self.fragments()
        if not all(isinstance(fragment, pads.ParquetFileFragment) for fragment in fragments):
            return None
        return sum(fragment.metadata.num_rows for fragment in fragments)

    def describe(self) -> str:
        return f"from_arrow(<{type(self.dataset).__name__} {len(self.fragments())} fragment(s)>)"

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fragments"] = None  # listed again where the tasks run
        return state


def make_arrow_source(data: Any, columns: Optional[list[str]] = None) -> Source:
    """The source of ``sp.from_arrow`` for a Table, a RecordBatch or a ``pyarrow.dataset.Dataset``."""
    import pyarrow as pa
    import pyarrow.dataset as pads

    if isinstance(data, (pa.Table, pa.RecordBatch)):
        return ArrowTableSource(data, columns)
    if isinstance(data, pads.InMemoryDataset):  # does not pickle; its batches are in memory anyway
        return ArrowTableSource(data.to_table(), columns)
    if isinstance(data, pads.Dataset):
        return ArrowDatasetSource(data, columns)
    raise TypeError(
        f"from_arrow() needs a pyarrow.Table, a pyarrow.RecordBatch or a pyarrow.dataset.Dataset, got {type(data).__name__}"
    )


class ArrowChunkFinalizer:
    """Picklable ``records -> pyarrow.Table`` (where the chunk is produced) for ``to_arrow``."""

    def __init__(self, schema: Any = None, what: str = "to_arrow") -> None:
        self.schema = schema
        self.what = what

    def __call__(self, records: list[Any]) -> Any:
        from .parquet_writer import records_to_table

        for position, record in enumerate(records):
            if not isinstance(record, dict):
                raise SchemaError(
                    f"{self.what}() needs dict records, got {type(record).__name__} {reprlib.repr(record)} "
                    f"(record {position} of a chunk of {len(records)}): map records to dicts first"
                )
        return records_to_table(records, self.schema)


def concat_tables(tables: list[Any], schema: Any = None, what: str = "to_arrow") -> Any:
    """One table from chunk tables (main process); a column's null-only chunks take the type of
    the others. Raises ``SchemaError`` naming the chunks' schemas when types disagree."""
    import pyarrow as pa

    if not tables:
        return schema.empty_table() if schema is not None else pa.table({})
    try:
        return pa.concat_tables(tables, promote_options="default")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        schemas = list(dict.fromkeys(str(t.schema).replace("\n", ", ") for t in tables))
        raise SchemaError(f"{what}(): the chunks' columns have types that do not agree ({exc}); schemas: {schemas[:3]}") from exc


class ArrowSink(Sink):
    """``to_arrow``: records become Arrow tables where produced; the main process concatenates them."""

    def __init__(self, schema: Any = None) -> None:
        self.schema = schema
        self.tables: list[Any] = []

    def finalizer(self) -> ChunkFinalizer:
        return ArrowChunkFinalizer(self.schema)

    def write(self, output: TaskOutput) -> None:
        if output.chunk is not None:
            self.tables.append(output.chunk)

    def commit(self) -> Any:
        return concat_tables(self.tables, self.schema)
