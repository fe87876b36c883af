"""The part layout of ``write_parquet`` and the writer of one part file.

Part layout (design.md section 5): with ``G`` tasks per part (:func:`tasks_per_group`: from
``rows_per_file`` and the most rows a task holds, ``task_size`` or a parquet row group), part
``g`` holds the outputs of the consecutive tasks ``[g*G, (g+1)*G)`` of the whole stream, in
task order, and is named by its first task: ``part-<g*G:06d>.parquet``. It is a pure function
of the task key, never of timing or of the number of workers, so a resumed run, a shard and
a run that writes in its workers all produce the same files. A group whose tasks produce no
row has no file (the manifest lists it with 0 rows).

A part is written under a hidden in-progress name (``.part-000012.parquet.inprogress``) and
moved to its final name when complete. Its row groups hold ``row_group_size`` rows (the last
one fewer), or less when a buffer reaches ``row_group_bytes``. :class:`PartFileWriter` runs
where the part is written: the main process, or a CPU worker writing its own parts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional

from .manifest import PartEntry
from .output_dir import OutputDir
from .write_schema import conform_table, schema_to_text, unify_schemas

DEFAULT_ROW_GROUP_ROWS = 65_536
DEFAULT_ROW_GROUP_BYTES = 64 * 1024 * 1024
DEFAULT_ROWS_PER_FILE = 1_000_000
IN_PROGRESS_SUFFIX = ".inprogress"

#: A part file, and its in-progress files (``.1``, ``.2``...: restarted with a wider schema).
_PART_NAME = re.compile(r"^part-(\d+)\.parquet$")
_IN_PROGRESS_NAME = re.compile(r"^\.part-(\d+)\.parquet(?:\.\w+)?\.inprogress$")


def tasks_per_group(rows_per_file: int, rows_per_task: int) -> int:
    """``G``, the tasks per part: ``max(1, rows_per_file // rows_per_task)``.

    ``rows_per_task`` is the most rows a task holds (``Source.rows_per_task``): ``task_size``,
    or a parquet source's largest row group (its tasks are row groups).

    >>> tasks_per_group(1_000_000, 1024), tasks_per_group(10, 6)
    (976, 1)
    """
    return max(1, rows_per_file // rows_per_task)


def part_name(group: int, group_size: int) -> str:
    """The file name of part ``group``: named by its first task key."""
    return f"part-{group * group_size:06d}.parquet"


def parse_part_name(name: str) -> Optional[tuple[int, bool]]:
    """``(first task key, in progress)`` of a part file name, None for any other name."""
    for pattern, in_progress in ((_PART_NAME, False), (_IN_PROGRESS_NAME, True)):
        match = pattern.match(name)
        if match is not None:
            return int(match.group(1)), in_progress
    return None


def check_part_sizes(rows_per_file: Any, row_group_rows: Any) -> None:
    """Raises ``ValueError`` unless both sizes are positive ints."""
    for name, value in (("rows_per_file", rows_per_file), ("row_group_size", row_group_rows)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"write_parquet: {name} must be a positive int, got {value!r}")


@dataclass(frozen=True)
class PartSettings:
    """How part files are written (picklable: travels to the workers that write parts)."""

    directory: OutputDir
    group_size: int
    row_group_rows: int = DEFAULT_ROW_GROUP_ROWS
    row_group_bytes: int = DEFAULT_ROW_GROUP_BYTES
    compression: str = "snappy"
    #: A ``pyarrow.Schema`` the user fixed (``schema=``): no evolution, every part has it.
    schema: Any = None


class PartFileWriter:
    """Writes one part: the tables of part group ``group``, in order, into one file.

    The file's schema is the union of its tables' schemas (see :mod:`.write_schema`). When a
    later table widens it (a field typed after being all null, a new field) after row groups
    were written, the part is restarted: its rows are copied, row group by row group, into a
    new in-progress file with the wider schema. That costs one re-read of this part only, and
    keeps one schema per file without holding a part in memory.

    Memory: ``buffered rows < row_group_rows`` between calls, unless a table is larger.
    """

    def __init__(self, settings: PartSettings, group: int) -> None:
        self.settings = settings
        self.group = group
        self.name = part_name(group, settings.group_size)
        self.schema: Any = settings.schema
        self.rows = 0
        self._buffer: list[Any] = []
        self._buffer_rows = 0
        self._buffer_bytes = 0
        self._writer: Any = None
        self._tmp_name: Optional[str] = None
        self._restarts = 0

    def write(self, table: Any, where: str) -> None:
        """Adds ``table`` (rows of task ``where``) to the part."""
        if table.num_rows == 0:
            return
        if self.settings.schema is None:
            wider = unify_schemas(self.schema, table.schema, where)
            if self.schema is not None and not wider.equals(self.schema):
                self._widen(wider)
            self.schema = wider
        table = conform_table(table, self.schema, where)
        self._buffer.append(table)
        self._buffer_rows += table.num_rows
        self._buffer_bytes += table.nbytes
        if self._buffer_rows >= self.settings.row_group_rows or self._buffer_bytes >= self.settings.row_group_bytes:
            self._flush(final=False)

    def _widen(self, schema: Any) -> None:
        import pyarrow.parquet as pq

        self._buffer = [conform_table(t, schema, "earlier records") for t in self._buffer]
        if self._writer is None:
            return
        directory = self.settings.directory
        self._writer.close()
        old = self._tmp_name
        assert old is not None
        self._open(schema)
        written = pq.ParquetFile(directory.join(old), filesystem=directory.fs)
        for index in range(written.num_row_groups):
            rows = conform_table(written.read_row_group(index), schema, "earlier records")
            self._writer.write_table(rows, row_group_size=self.settings.row_group_rows)
        directory.delete(old)

    def _open(self, schema: Any) -> None:
        import pyarrow.parquet as pq

        directory = self.settings.directory
        self._tmp_name = f".{self.name}{'.' + str(self._restarts) if self._restarts else ''}{IN_PROGRESS_SUFFIX}"
        self._restarts += 1
        self._writer = pq.ParquetWriter(
            directory.join(self._tmp_name), schema, compression=self.settings.compression, filesystem=directory.fs
        )

    def _flush(self, final: bool) -> None:
        """Writes the buffered rows: whole row groups only, unless ``final`` or over the byte budget."""
        import pyarrow as pa

        if not self._buffer:
            return
        table = pa.concat_tables(self._buffer) if len(self._buffer) > 1 else self._buffer[0]
        keep = 0
        if not final and self._buffer_bytes < self.settings.row_group_bytes:
            keep = table.num_rows % self.settings.row_group_rows
        table, rest = table.slice(0, table.num_rows - keep), table.slice(table.num_rows - keep)
        self._buffer = [rest] if keep else []
        self._buffer_rows, self._buffer_bytes = keep, rest.nbytes if keep else 0
        if table.num_rows:
            if self._writer is None:
                self._open(self.schema)
            self._writer.write_table(table, row_group_size=self.settings.row_group_rows)
            self.rows += table.num_rows

    def commit(self) -> PartEntry:
        """Completes the file and moves it to its final name; returns the manifest entry."""
        self._flush(final=True)
        if self._writer is None:
            return PartEntry(self.group, None, 0, None)
        self._writer.close()
        self._writer = None
        assert self._tmp_name is not None
        self.settings.directory.move(self._tmp_name, self.name)
        self._tmp_name = None
        return PartEntry(self.group, self.name, self.rows, schema_to_text(self.schema))

    def abort(self) -> None:
        """Drops the part in progress."""
        self._buffer = []
        writer, self._writer = self._writer, None
        try:
            if writer is not None:
                writer.close()
        finally:
            if self._tmp_name is not None:
                self.settings.directory.delete(self._tmp_name)
                self._tmp_name = None


def rewrite_part(settings: PartSettings, name: str, schema: Any) -> None:
    """Rewrites the committed part ``name`` with ``schema`` (a wider one), row group by row group.

    Runs in the main process when a run completes and an earlier part's schema is narrower
    than the final one (a field still all null there, or absent), so that every part of the
    output has one schema (``pq.read_table(dir)`` takes the first file's). The new file
    replaces the old one by a move: atomic on a local filesystem.
    """
    import pyarrow.parquet as pq

    directory = settings.directory
    temporary = f".{name}.rewrite{IN_PROGRESS_SUFFIX}"
    old = pq.ParquetFile(directory.join(name), filesystem=directory.fs)
    writer = pq.ParquetWriter(directory.join(temporary), schema, compression=settings.compression, filesystem=directory.fs)
    try:
        for index in range(old.num_row_groups):
            writer.write_table(conform_table(old.read_row_group(index), schema, name), row_group_size=settings.row_group_rows)
    except BaseException:
        writer.close()
        directory.delete(temporary)
        raise
    writer.close()
    directory.move(temporary, name)
