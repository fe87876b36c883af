"""Parquet input: a source streamed by row group (output: :mod:`.parquet_writer`).

Tasks of a parquet source are row groups: the main process only lists them, reading every
file's footer when the run starts (so a truncated, empty or corrupt footer fails at once,
naming the file; once per file and run: :mod:`.parquet_metadata`) and unifying the files'
schemas (:mod:`.parquet_schema`); the rows are
decoded where the task runs, a CPU worker with the multiprocessing backend, in slices of
``READ_BATCH_ROWS`` so a large row group is never held whole. A corrupt data page fails in
the task that reads it, naming the file and the row group.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, NamedTuple, Optional

from ..errors import CorruptInputError, SchemaError
from .base import READ_BATCH_ROWS, ChunkedSource
from .parquet_metadata import FileFooter, FooterCache
from .parquet_schema import conform_batch, unify_file_schemas
from .paths import PathLike, resolve_files

if TYPE_CHECKING:
    import pyarrow as pa

PARQUET_SUFFIXES = (".parquet", ".parq", ".pq")


def batch_to_records(batch: Any) -> list[dict[str, Any]]:
    """Arrow RecordBatch/Table -> list of dicts (where the task runs).

    pyarrow's own ``to_pylist`` builds the dicts faster than ``dict(zip(names, row))`` over its
    columns' lists (65,536 rows of an int and a string: 33 ms against 53 ms; 20 columns: 64
    against 70 ms; pyarrow 26): that loop was a quarter of ``read_parquet``'s cost per row.
    """
    if not batch.schema.names:  # columns=[]: one empty record per row, not zero records
        return [{} for _ in range(batch.num_rows)]
    records: list[dict[str, Any]] = batch.to_pylist()
    return records


class RowGroupTask(NamedTuple):
    """The payload of one task: row group ``row_group`` of ``path``, whose first row is row
    ``first_row`` of the file. ``schema`` is the files' unified schema when this file's differs
    from it (its batches are conformed where the task runs), else None (read as is)."""

    path: str
    row_group: int
    first_row: int
    schema: Optional[pa.Schema] = None


class _Footer(NamedTuple):
    path: str
    row_group_rows: tuple[int, ...]
    schema: pa.Schema


def _reader_errors() -> tuple[type[BaseException], ...]:
    """What pyarrow raises on undecodable bytes (``ArrowIOError`` is ``OSError``); a file that
    vanished or cannot be opened keeps its own error (it names the file already)."""
    import pyarrow as pa

    return (pa.ArrowException, OSError)


def _is_corruption(exc: BaseException) -> bool:
    return not isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError))


def _corrupt_footer(path: str, exc: BaseException) -> CorruptInputError:
    return CorruptInputError(f"read_parquet: cannot read the footer of {path!r} (empty, truncated or not parquet): {exc}")


class ParquetSource(ChunkedSource):
    """Dict records from parquet files, one task per row group.

    Args:
        path: a file, a directory (read recursively), a glob or a list of those.
        columns: the columns to read (all when None); unknown names fail at once.
        filesystem: a ``pyarrow.fs.FileSystem`` or an fsspec filesystem (local when None).
    """

    def __init__(self, path: PathLike, columns: Optional[list[str]] = None, filesystem: Any = None) -> None:
        self.path_text = str(path)
        self.filesystem, self.files = resolve_files(path, PARQUET_SUFFIXES, filesystem, what="read_parquet")
        self.columns: Optional[list[str]] = None
        self._footers = FooterCache(self.filesystem)
        if columns is not None:
            if isinstance(columns, str) or not all(isinstance(c, str) for c in columns):
                raise TypeError(f"read_parquet: columns must be a list of column names, got {columns!r}")
            schema = self._read_footer(self.files[0]).schema
            missing = [c for c in columns if c not in schema.names]
            if missing:
                raise SchemaError(
                    f"read_parquet: unknown column(s) {missing} in {self.files[0]!r}; available: {schema.names}"
                )
            columns = list(columns)
        self.columns = columns
        self._local = threading.local()

    def _parquet_file(self, path: str) -> Any:
        # Keep the last file open: consecutive tasks usually come from the same file. One per
        # thread: the threads backend's threads share this source, and a reader is not shared.
        # Opened with the footer the cache holds, so the main process (simple and threads
        # backends) decodes no footer twice.
        import pyarrow.parquet as pq

        opened: Optional[tuple[str, Any]] = getattr(self._local, "open", None)
        if opened is None or opened[0] != path:
            metadata = self._footer(path).metadata
            opened = (path, pq.ParquetFile(path, metadata=metadata, filesystem=self.filesystem))
            self._local.open = opened
        return opened[1]

    def _footer(self, path: str) -> FileFooter:
        """The footer of ``path``, read once while the file is unchanged (:mod:`.parquet_metadata`).

        Raises:
            CorruptInputError: the file is empty, truncated or not parquet (names the file).
        """
        try:
            return self._footers.footer(path)
        except _reader_errors() as exc:
            if not _is_corruption(exc):
                raise
            raise _corrupt_footer(path, exc) from exc

    def _read_footer(self, path: str) -> _Footer:
        """The row counts of the row groups of ``path`` and its schema (selected columns only)."""
        import pyarrow as pa

        footer = self._footer(path)
        schema = footer.schema
        if self.columns is not None:
            schema = pa.schema([schema.field(name) for name in self.columns if name in schema.names])
        return _Footer(path, footer.row_group_rows, schema)

    def iter_tasks(self, task_size: int) -> Iterator[RowGroupTask]:
        """One task per row group (main process); every footer is read before the first task."""
        footers = [self._read_footer(path) for path in self.files]
        unified = unify_file_schemas([(footer.path, footer.schema) for footer in footers])
        for footer in footers:
            schema = None if footer.schema.equals(unified, check_metadata=False) else unified
            first_row = 0
            for row_group, rows in enumerate(footer.row_group_rows):
                yield RowGroupTask(footer.path, row_group, first_row, schema)
                first_row += rows

    def read_task_chunks(self, payload: RowGroupTask, chunk_size: int) -> Iterator[list[dict[str, Any]]]:
        """One list of dicts per decoded slice of ``max(chunk_size, READ_BATCH_ROWS)`` rows.

        Raises:
            CorruptInputError: a page of the row group cannot be decoded (names the file and
                the row group).
            SchemaError: a value does not fit the files' unified type.
        """
        where = f"{payload.path!r}, row group {payload.row_group}"
        try:
            parquet_file = self._parquet_file(payload.path)
            columns = self.columns
            if columns is not None and payload.schema is not None:  # a file without some of the columns
                columns = [name for name in columns if name in parquet_file.schema_arrow.names]
            batches = parquet_file.iter_batches(
                batch_size=max(chunk_size, READ_BATCH_ROWS), row_groups=[payload.row_group], columns=columns, use_threads=False
            )
            for batch in batches:
                if payload.schema is not None:
                    batch = conform_batch(batch, payload.schema, where)
                yield batch_to_records(batch)
        except _reader_errors() as exc:
            if not _is_corruption(exc):
                raise
            raise CorruptInputError(f"read_parquet: cannot decode {where}: {type(exc).__name__}: {exc}") from exc

    def locate(self, payload: RowGroupTask, row: Optional[int] = None) -> str:
        """``"<file>, row group <g>"``, and ``", row <r>"`` with ``r`` the row's number in the
        file (counted from 0 over all its row groups), for record ``row`` of the task."""
        where = f"{payload.path}, row group {payload.row_group}"
        return where if row is None else f"{where}, row {payload.first_row + row}"

    def fingerprint(self) -> dict[str, Any]:
        """Each file's path, size, rows and row groups (footers only; main process)."""
        files = []
        for path in self.files:
            footer = self._footer(path)
            rows, groups = footer.metadata.num_rows, footer.metadata.num_row_groups
            files.append({"path": path, "size": footer.size, "rows": rows, "row_groups": groups})
        return {"files": files, "columns": self.columns}

    def num_records(self) -> int:
        """The row counts of the files' footers (main process; no row is read). A corrupt
        footer raises here the ``CorruptInputError`` that listing the tasks would raise."""
        return sum(sum(self._read_footer(path).row_group_rows) for path in self.files)

    def num_tasks(self, task_size: int) -> int:
        """One task per row group, counted from the footers (main process)."""
        return sum(len(self._read_footer(path).row_group_rows) for path in self.files)

    def rows_per_task(self, task_size: int) -> int:
        """The largest row group's rows, from the footers (main process): a task is one row
        group whatever ``task_size`` says, so a part of ``rows_per_file // rows_per_task``
        tasks stays within ``rows_per_file`` rows (at least one task)."""
        return max((rows for path in self.files for rows in self._read_footer(path).row_group_rows), default=1) or 1

    def describe(self) -> str:
        cols = f", columns={self.columns}" if self.columns is not None else ""
        return f"read_parquet({self.path_text!r}{cols}: {len(self.files)} file(s))"

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        del state["_local"]  # open file handles do not travel
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()
