"""Parquet input: a source streamed by row group (output: :mod:`.parquet_writer`).

Tasks of a parquet source are row groups: the main process only lists them (reading file
footers); the rows are decoded where the task runs, a CPU worker with the multiprocessing
backend, in slices of ``READ_BATCH_ROWS`` so a large row group is never held whole.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Optional

from ..errors import SchemaError
from .base import Source
from .paths import PathLike, resolve_files

PARQUET_SUFFIXES = (".parquet", ".parq", ".pq")
READ_BATCH_ROWS = 8192


def batch_to_records(batch: Any) -> list[dict[str, Any]]:
    """Arrow RecordBatch/Table -> list of dicts (faster than ``to_pylist`` on wide tables)."""
    names = batch.schema.names
    if not names:  # columns=[]: one empty record per row, not zero records
        return [{} for _ in range(batch.num_rows)]
    columns = [column.to_pylist() for column in batch.columns]
    return [dict(zip(names, row)) for row in zip(*columns)]


class ParquetSource(Source):
    """Dict records from parquet files, one task per row group.

    Args:
        path: a file, a directory (read recursively), a glob or a list of those.
        columns: the columns to read (all when None); unknown names fail at once.
        filesystem: a ``pyarrow.fs.FileSystem`` or an fsspec filesystem (local when None).
    """

    def __init__(self, path: PathLike, columns: Optional[list[str]] = None, filesystem: Any = None) -> None:
        import pyarrow.parquet as pq

        self.path_text = str(path)
        self.filesystem, self.files = resolve_files(path, PARQUET_SUFFIXES, filesystem, what="read_parquet")
        if columns is not None:
            if isinstance(columns, str) or not all(isinstance(c, str) for c in columns):
                raise TypeError(f"read_parquet: columns must be a list of column names, got {columns!r}")
            schema = pq.read_schema(self.files[0], filesystem=self.filesystem)
            missing = [c for c in columns if c not in schema.names]
            if missing:
                raise SchemaError(
                    f"read_parquet: unknown column(s) {missing} in {self.files[0]!r}; available: {schema.names}"
                )
            columns = list(columns)
        self.columns = columns
        self._open: Optional[tuple[str, Any]] = None

    def _parquet_file(self, path: str) -> Any:
        # Keep the last file open: consecutive tasks usually come from the same file.
        import pyarrow.parquet as pq

        if self._open is None or self._open[0] != path:
            self._open = (path, pq.ParquetFile(path, filesystem=self.filesystem))
        return self._open[1]

    def iter_tasks(self, task_size: int) -> Iterator[tuple[str, int]]:
        for path in self.files:
            for row_group in range(self._parquet_file(path).num_row_groups):
                yield path, row_group

    def read_task(self, payload: tuple[str, int]) -> Iterator[dict[str, Any]]:
        for records in self.read_task_chunks(payload, READ_BATCH_ROWS):
            yield from records

    def read_task_chunks(self, payload: tuple[str, int], chunk_size: int) -> Iterator[list[dict[str, Any]]]:
        """One list of dicts per decoded slice of ``max(chunk_size, READ_BATCH_ROWS)`` rows."""
        path, row_group = payload
        batches = self._parquet_file(path).iter_batches(
            batch_size=max(chunk_size, READ_BATCH_ROWS), row_groups=[row_group], columns=self.columns, use_threads=False
        )
        for batch in batches:
            yield batch_to_records(batch)

    def num_records(self) -> int:
        """The row counts of the files' metadata (footers only; no row is read)."""
        return sum(self._parquet_file(path).metadata.num_rows for path in self.files)

    def describe(self) -> str:
        cols = f", columns={self.columns}" if self.columns is not None else ""
        return f"read_parquet({self.path_text!r}{cols}: {len(self.files)} file(s))"

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_open"] = None  # open file handles do not travel
        return state
