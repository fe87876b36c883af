"""Parquet output: records -> Arrow tables, and writers of atomic part files.

Two ways to write, chosen by ``Stream.write_parquet``:

* :class:`ParquetPartWriter` in the main process writes the run's tables in order into
  ``part-00000.parquet``, ... (simple backend, and deterministic multiprocessing runs: the
  files then hold the records in the simple backend's order and layout);
* :class:`WorkerParquetSink` makes each CPU worker write its own parts,
  ``part-w000-00000.parquet``, ... (multiprocessing with ``deterministic=False``): the main
  process then only coordinates.

Either way a part is written under a hidden ``.inprogress`` name and renamed when complete.
"""

from __future__ import annotations

import itertools
import operator
import os
import reprlib
from typing import Any, Optional

from ..errors import SchemaError
from .parquet import PARQUET_SUFFIXES

DEFAULT_ROW_GROUP_ROWS = 65_536
DEFAULT_ROW_GROUP_BYTES = 64 * 1024 * 1024
DEFAULT_ROWS_PER_FILE = 1_000_000
IN_PROGRESS_SUFFIX = ".inprogress"


def records_to_table(records: list[Any], schema: Any = None) -> Any:
    """Converts dict records to an Arrow table, naming the field whose values do not fit.

    Runs where the chunk is finalized (a CPU worker with the multiprocessing backend).

    Raises:
        SchemaError: a field holds values of incompatible types, or a record is not a dict.
    """
    import pyarrow as pa

    # Checked before anything else touches a record: ``len(None)`` in the column check
    # below, or ``None.get`` in the slow path, would raise a bare TypeError.
    for position, record in enumerate(records):
        if not isinstance(record, dict):
            raise SchemaError(
                f"write_parquet needs dict records, got {type(record).__name__} {reprlib.repr(record)} "
                f"(record {position} of a chunk of {len(records)}): map records to dicts before writing them"
            )
    # Every field of every record, in order of first appearance: ``Table.from_pylist`` would
    # take the names from the first record only and silently drop a field that a later record
    # of the chunk adds. Usually every record has the first one's fields (same count, none
    # missing), and the columns are built with itemgetter; otherwise with ``get`` over the union.
    columns = None
    if schema is None and records:
        names = list(records[0])
        if sum(map(len, records)) == len(names) * len(records):
            try:
                columns = {name: list(map(operator.itemgetter(name), records)) for name in names}
            except KeyError:
                columns = None
    if columns is None:
        names = schema.names if schema is not None else list(dict.fromkeys(itertools.chain.from_iterable(records)))
        columns = {name: [r.get(name) for r in records] for name in names}
    try:
        return pa.Table.from_pydict(columns, schema=schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError) as exc:
        for name in names:
            values = [r.get(name) for r in records]
            try:
                pa.array(values, type=schema.field(name).type if schema is not None else None)
            except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError) as field_exc:
                raise SchemaError(f"write_parquet: field {name!r} holds values of inconsistent types: {field_exc}") from exc
        raise SchemaError(f"write_parquet: records cannot be converted to Arrow: {exc}") from exc


def _type_kind(arrow_type: Any) -> str:
    """Coarse kind of an Arrow type: casts between types of one kind only (int32 -> int64...)."""
    import pyarrow.types as pat

    if pat.is_null(arrow_type):
        return "null"
    if pat.is_boolean(arrow_type):
        return "bool"
    if pat.is_integer(arrow_type) or pat.is_floating(arrow_type) or pat.is_decimal(arrow_type):
        return "number"
    if pat.is_string(arrow_type) or pat.is_large_string(arrow_type):
        return "string"
    if pat.is_binary(arrow_type) or pat.is_large_binary(arrow_type) or pat.is_fixed_size_binary(arrow_type):
        return "binary"
    if pat.is_temporal(arrow_type):
        return "temporal"
    return "nested"  # lists, structs, maps: Arrow's cast checks their children


class ParquetPartWriter:
    """Writes Arrow tables in order into ``part-00000.parquet``, ``part-00001.parquet``...

    Each part is written under a hidden temporary name and renamed when complete, so a part
    appears under its final name only whole. Tables are buffered up to ``row_group_rows``
    rows or ``row_group_bytes`` bytes, then written as one row group: memory stays bounded by
    one row group. Runs in the main process.

    Raises:
        FileExistsError: the target directory is not empty and ``overwrite`` is False.
        SchemaError: a table's schema cannot be cast to the part's schema (names the field).
    """

    def __init__(
        self,
        path: str,
        overwrite: bool = False,
        schema: Any = None,
        rows_per_file: int = DEFAULT_ROWS_PER_FILE,
        row_group_rows: int = DEFAULT_ROW_GROUP_ROWS,
        row_group_bytes: int = DEFAULT_ROW_GROUP_BYTES,
        compression: str = "snappy",
        prefix: str = "part",
        prepare: bool = True,
    ) -> None:
        check_part_sizes(rows_per_file, row_group_rows)
        self.path = os.path.abspath(os.fspath(path))
        if prepare:
            prepare_output_dir(self.path, overwrite, PARQUET_SUFFIXES, "write_parquet")
        self.prefix = prefix
        self.schema = schema
        self.rows_per_file = rows_per_file
        self.row_group_rows = row_group_rows
        self.row_group_bytes = row_group_bytes
        self.compression = compression
        self.part_paths: list[str] = []
        self.rows_written = 0
        self._buffer: list[Any] = []
        self._buffer_rows = 0
        self._buffer_bytes = 0
        self._writer: Any = None
        self._tmp_path: Optional[str] = None
        self._rows_in_part = 0

    def write(self, table: Any) -> None:
        if table.num_rows == 0:
            return
        if self.schema is None:
            self.schema = table.schema
        table = self._conform(table)
        self._buffer.append(table)
        self._buffer_rows += table.num_rows
        self._buffer_bytes += table.nbytes
        if self._buffer_rows >= self.row_group_rows or self._buffer_bytes >= self.row_group_bytes:
            self._flush()

    def _conform(self, table: Any) -> Any:
        import pyarrow as pa

        if table.schema.equals(self.schema):
            return table
        extra = [name for name in table.schema.names if name not in self.schema.names]
        if extra:
            raise SchemaError(f"write_parquet: field(s) {extra} appear after the first records, which lack them; pass schema=")
        columns = []
        for field in self.schema:
            if field.name not in table.schema.names:
                columns.append(pa.nulls(table.num_rows, field.type))
                continue
            column = table.column(field.name)
            try:
                if column.type != field.type and _type_kind(column.type) not in ("null", _type_kind(field.type)):
                    # Arrow would cast "5" to 5, 7 to "7" or 2 to True: a change of kind is an
                    # error, as it is within one chunk, not a silent conversion.
                    raise pa.ArrowTypeError(f"no implicit cast from {column.type} to {field.type}")
                columns.append(column.cast(field.type) if column.type != field.type else column)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
                raise SchemaError(
                    f"write_parquet: field {field.name!r} was {field.type} in earlier records and is "
                    f"{column.type} now; pass schema= to write_parquet to fix it"
                ) from exc
        return pa.Table.from_arrays(columns, schema=self.schema)

    def _flush(self, final: bool = False) -> None:
        """Writes the buffered rows: whole row groups only, unless ``final`` or over the byte budget."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self._buffer:
            return
        table = pa.concat_tables(self._buffer) if len(self._buffer) > 1 else self._buffer[0]
        keep = 0
        if not final and self._buffer_bytes < self.row_group_bytes:
            keep = table.num_rows % self.row_group_rows
        table, rest = table.slice(0, table.num_rows - keep), table.slice(table.num_rows - keep)
        self._buffer = [rest] if keep else []
        self._buffer_rows, self._buffer_bytes = keep, rest.nbytes if keep else 0
        while table.num_rows:
            if self._writer is None:
                index = len(self.part_paths)
                name = f"{self.prefix}-{index:05d}.parquet"
                final_path = os.path.join(self.path, name)
                self._tmp_path = os.path.join(self.path, f".{name}{IN_PROGRESS_SUFFIX}")
                self._writer = pq.ParquetWriter(self._tmp_path, self.schema, compression=self.compression)
                self.part_paths.append(final_path)
                self._rows_in_part = 0
            room = self.rows_per_file - self._rows_in_part
            head, table = table.slice(0, room), table.slice(room)
            self._writer.write_table(head, row_group_size=self.row_group_rows)
            self._rows_in_part += head.num_rows
            self.rows_written += head.num_rows
            if self._rows_in_part >= self.rows_per_file:
                self._finish_part()

    def _finish_part(self) -> None:
        assert self._tmp_path is not None
        self._writer.close()
        os.replace(self._tmp_path, self.part_paths[-1])
        self._writer, self._tmp_path = None, None

    def close(self) -> None:
        """Writes what is buffered and completes the last part."""
        self._flush(final=True)
        if self._writer is not None:
            self._finish_part()

    def abort(self) -> None:
        """Drops the part in progress (completed parts stay)."""
        self._buffer = []
        if self._writer is not None:
            try:
                self._writer.close()
            finally:
                if self._tmp_path and os.path.exists(self._tmp_path):
                    os.unlink(self._tmp_path)
                self.part_paths.pop()
                self._writer, self._tmp_path = None, None


def prepare_output_dir(path: str, overwrite: bool, suffixes: tuple[str, ...], what: str) -> None:
    """Creates the output directory, refusing (or clearing, with ``overwrite``) a non-empty one.

    ``overwrite=True`` deletes only the files a previous run wrote (``suffixes``, and hidden
    in-progress parts), never anything else the user keeps there.
    """
    if os.path.isfile(path):
        raise FileExistsError(f"{what}: {path!r} is a file; give a directory path")
    if os.path.isdir(path):
        entries = os.listdir(path)
        if entries and not overwrite:
            raise FileExistsError(f"{what}: output directory {path!r} is not empty; pass overwrite=True to replace its content")
        for name in entries:
            full = os.path.join(path, name)
            if os.path.isfile(full) and (name.endswith(suffixes) or name.endswith(IN_PROGRESS_SUFFIX)):
                os.unlink(full)
    os.makedirs(path, exist_ok=True)


class ArrowTableFinalizer:
    """Picklable ``records -> pyarrow.Table`` conversion, run where the chunk is produced."""

    def __init__(self, schema: Any = None) -> None:
        self.schema = schema

    def __call__(self, records: list[Any]) -> Any:
        return records_to_table(records, self.schema)


def list_parts(path: str) -> list[str]:
    """The complete part files under ``path``, sorted by name."""
    return sorted(os.path.join(path, name) for name in os.listdir(path) if name.startswith("part-") and name.endswith(".parquet"))


def check_part_sizes(rows_per_file: Any, row_group_rows: Any) -> None:
    """Raises ``ValueError`` unless both sizes are positive ints."""
    for name, value in (("rows_per_file", rows_per_file), ("row_group_size", row_group_rows)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"write_parquet: {name} must be a positive int, got {value!r}")


def remove_in_progress(path: str) -> None:
    """Deletes the hidden parts still in progress under ``path`` (after a failed run).

    Workers killed mid-write cannot clean up after themselves; completed parts stay.
    """
    if os.path.isdir(path):
        for name in os.listdir(path):
            if name.startswith(".") and name.endswith(IN_PROGRESS_SUFFIX):
                try:
                    os.unlink(os.path.join(path, name))
                except FileNotFoundError:  # its writer renamed or removed it meanwhile
                    pass


class WorkerParquetSink:
    """``write_parquet`` done by the CPU workers: each writes its own ``part-wNNN-MMMMM.parquet``.

    Picklable; travels to the workers with the plan. In worker ``i``, :meth:`open_in_worker`
    returns the writer whose ``write`` is the chunk finalizer: it converts and writes the
    records there, and only a record count goes back to the main process. The main process
    prepares the directory first (``overwrite`` is checked there).
    """

    def __init__(self, path: str, schema: Any, rows_per_file: int, row_group_rows: int) -> None:
        self.path = path
        self.schema = schema
        self.rows_per_file = rows_per_file
        self.row_group_rows = row_group_rows

    def open_in_worker(self, worker_index: int) -> _WorkerPartWriter:
        parts = ParquetPartWriter(
            self.path, schema=self.schema, rows_per_file=self.rows_per_file, row_group_rows=self.row_group_rows,
            prefix=f"part-w{worker_index:03d}", prepare=False,
        )
        return _WorkerPartWriter(parts, self.schema)


class _WorkerPartWriter:
    """The worker's half of :class:`WorkerParquetSink` (runs in a CPU worker)."""

    def __init__(self, parts: ParquetPartWriter, schema: Any) -> None:
        self.parts = parts
        self.schema = schema

    def write(self, records: list[Any]) -> tuple[()]:
        self.parts.write(records_to_table(records, self.schema))
        return ()  # what travels to the main process: nothing but the count

    def close(self) -> tuple[list[str], int]:
        """Completes the last part; returns the part paths and the rows written."""
        self.parts.close()
        return self.parts.part_paths, self.parts.rows_written

    def abort(self) -> None:
        self.parts.abort()
