"""CSV input: ``read_csv``, streamed block by block with pyarrow's CSV reader where each task runs.

Two task layouts, both pure functions of the files (never of the workers):

* one task per file (the default, and always for compressed files): values may hold quoted
  newlines, so only a reader that starts at the top of the file can tell rows apart;
* with ``newlines_in_values=False`` (the user declares that no value holds a newline), each
  file is cut into byte ranges of ``block_size`` bytes. A range owns the lines that *start*
  in it: the task's reader skips to the first line start at or after its first byte, and
  reads to the first line start at or after its last byte. The file's header line is put in
  front of each range's bytes, so every range parses as a complete CSV file.

The main process only lists files, their sizes and the first file's header (to check
``columns``); the rows are parsed where the task runs (a CPU worker with multiprocessing).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Optional, Union

from ..errors import SchemaError
from .base import READ_BATCH_ROWS, Source
from .parquet import batch_to_records
from .paths import PathLike, resolve_files

CSV_SUFFIXES = (".csv", ".tsv", ".csv.gz", ".tsv.gz", ".csv.bz2", ".tsv.bz2")
COMPRESSED_SUFFIXES = (".gz", ".bz2", ".zst", ".lz4")
DEFAULT_BLOCK_SIZE = 16 * 1024 * 1024
#: How far past a byte offset the reader scans per read while looking for the next line start.
_SCAN_BYTES = 64 * 1024

#: A task: a whole file ``(path, None, None)`` or the byte range ``(path, start, stop)``.
CSVTask = tuple[str, Optional[int], Optional[int]]


def _csv_error(path: str, exc: Exception, start: Optional[int] = None, stop: Optional[int] = None) -> ValueError:
    where = path if start is None else f"{path} (bytes {start}-{stop})"
    return ValueError(f"read_csv: cannot read {where}: {exc}")


def _next_line_start(f: Any, offset: int, size: int) -> int:
    """The offset of the first line that starts at or after ``offset`` (``size`` if none)."""
    if offset <= 0:
        return 0
    if offset >= size:
        return size
    f.seek(offset - 1)  # a line starts at ``offset`` if the byte before it ends a line
    position = offset - 1
    while True:
        block = f.read(_SCAN_BYTES)
        if not block:
            return size
        newline = block.find(b"\n")
        if newline >= 0:
            return position + newline + 1
        position += len(block)


class CSVSource(Source):
    """Dict records from CSV files; see the module docstring for tasks.

    Args:
        path: a file, a directory (read recursively), a glob or a list of those.
        columns: the columns to read (all when None); unknown names fail at once.
        newlines_in_values: False promises no value holds a newline: files are then split
            into ``block_size``-byte tasks instead of one task per file.
        read_options, parse_options, convert_options: pyarrow's ``csv.ReadOptions``,
            ``csv.ParseOptions`` and ``csv.ConvertOptions`` (copied; named arguments of
            :func:`streamproc.read_csv` override their fields).
        filesystem: a ``pyarrow.fs.FileSystem`` or an fsspec filesystem (local when None).
        block_size: the byte size of a task with ``newlines_in_values=False``.
    """

    def __init__(
        self,
        path: PathLike,
        columns: Optional[list[str]] = None,
        newlines_in_values: bool = True,
        read_options: Any = None,
        parse_options: Any = None,
        convert_options: Any = None,
        filesystem: Any = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
    ) -> None:
        import pyarrow.csv as pacsv

        if not isinstance(newlines_in_values, bool):
            raise TypeError(f"read_csv: newlines_in_values must be True or False, got {newlines_in_values!r}")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"read_csv: block_size must be a positive int (bytes), got {block_size!r}")
        self.path_text = str(path)
        self.filesystem, self.files = resolve_files(path, CSV_SUFFIXES, filesystem, what="read_csv")
        self.read_options = _copy_options(read_options, pacsv.ReadOptions, "read_options")
        self.parse_options = _copy_options(parse_options, pacsv.ParseOptions, "parse_options")
        self.convert_options = _copy_options(convert_options, pacsv.ConvertOptions, "convert_options")
        self.parse_options.newlines_in_values = newlines_in_values
        self.newlines_in_values = newlines_in_values
        self.block_size = block_size
        if not newlines_in_values and (self.read_options.skip_rows or self.read_options.skip_rows_after_names):
            raise ValueError("read_csv: skip_rows and skip_rows_after_names need newlines_in_values=True (one task per file)")
        if columns is not None:
            if isinstance(columns, str) or not all(isinstance(c, str) for c in columns):
                raise TypeError(f"read_csv: columns must be a list of column names, got {columns!r}")
            names = self._column_names(self.files[0])
            missing = [c for c in columns if c not in names]
            if missing:
                raise SchemaError(f"read_csv: unknown column(s) {missing} in {self.files[0]!r}; available: {names}")
            self.convert_options.include_columns = list(columns)
        self.columns = columns

    def _column_names(self, path: str) -> list[str]:
        """The column names of ``path``: given ones, else its header (main process, first block)."""
        if self.read_options.column_names:
            return list(self.read_options.column_names)
        reader = self._open_reader(path, self.filesystem.open_input_stream(path), include_columns=False)
        try:
            names: list[str] = reader.schema.names
        finally:
            reader.close()
        return names

    def _open_reader(
        self, path: str, stream: Any, include_columns: bool = True, start: Optional[int] = None, stop: Optional[int] = None
    ) -> Any:
        import pyarrow as pa
        import pyarrow.csv as pacsv

        convert = self.convert_options
        if not include_columns:
            convert = _copy_options(convert, pacsv.ConvertOptions, "convert_options")
            convert.include_columns = []
        try:
            return pacsv.open_csv(
                stream, read_options=self.read_options, parse_options=self.parse_options, convert_options=convert
            )
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            stream.close()
            raise _csv_error(path, exc, start, stop) from exc

    def _splittable(self, path: str) -> bool:
        return not self.newlines_in_values and not path.endswith(COMPRESSED_SUFFIXES)

    def iter_tasks(self, task_size: int) -> Iterator[CSVTask]:
        """Tasks in file order; an empty (0-byte) file has no task, hence no records."""
        for path in self.files:
            size = self.filesystem.get_file_info(path).size
            if not size:
                continue
            if not self._splittable(path):
                yield path, None, None
                continue
            for start in range(0, size, self.block_size):
                yield path, start, min(start + self.block_size, size)

    def read_task(self, payload: CSVTask) -> Iterator[dict[str, Any]]:
        for records in self.read_task_chunks(payload, 0):
            yield from records

    def read_task_chunks(self, payload: CSVTask, chunk_size: int) -> Iterator[list[dict[str, Any]]]:
        """Lists of at most ``max(chunk_size, READ_BATCH_ROWS)`` dicts, from the blocks pyarrow
        parses one at a time (``read_options.block_size`` bytes)."""
        import pyarrow as pa

        path, start, stop = payload
        rows = max(chunk_size, READ_BATCH_ROWS)
        stream: Any = self.filesystem.open_input_stream(path) if start is None else self._range_stream(path, start, stop)
        reader = self._open_reader(path, stream, start=start, stop=stop)
        try:
            while True:
                try:
                    batch = reader.read_next_batch()
                except StopIteration:
                    return
                except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
                    raise _csv_error(path, exc, start, stop) from exc
                for offset in range(0, batch.num_rows, rows):
                    yield batch_to_records(batch.slice(offset, rows))
        finally:
            reader.close()

    def _range_stream(self, path: str, start: int, stop: Optional[int]) -> Any:
        """The header line (unless names are given) and the lines that start in ``[start, stop)``."""
        import pyarrow as pa

        assert stop is not None
        with self.filesystem.open_input_file(path) as f:
            size = f.size()
            header = b""
            first = _next_line_start(f, start, size)
            if not self.read_options.column_names and not self.read_options.autogenerate_column_names:
                header_end = _next_line_start(f, 1, size)
                f.seek(0)
                header = f.read(header_end)
                first = max(first, header_end)  # the first range's header is read once
            last = _next_line_start(f, stop, size)
            f.seek(first)
            body = f.read(max(last - first, 0))
        return pa.BufferReader(header + body if body else header)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for name in ("read_options", "parse_options", "convert_options"):
            state[name] = (type(state[name]), _option_fields(state[name]))
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name in ("read_options", "parse_options", "convert_options"):
            kind, fields = state[name]
            state[name] = kind(**fields)
        self.__dict__.update(state)

    def locate(self, payload: CSVTask, row: int | None = None) -> str:
        path, start, stop = payload
        where = path if start is None else f"{path}, bytes {start}-{stop}"
        return where if row is None else f"{where}, row {row} of the task"

    def describe(self) -> str:
        cols = f", columns={self.columns}" if self.columns is not None else ""
        return f"read_csv({self.path_text!r}{cols}: {len(self.files)} file(s))"


#: The fields of pyarrow's CSV option classes that a source keeps (as plain values: see
#: _copy_options) and rebuilds the objects from where it reads.
_OPTION_FIELDS = {
    "ReadOptions": (
        "use_threads",
        "block_size",
        "skip_rows",
        "skip_rows_after_names",
        "column_names",
        "autogenerate_column_names",
        "encoding",
    ),
    "ParseOptions": (
        "delimiter",
        "quote_char",
        "double_quote",
        "escape_char",
        "newlines_in_values",
        "ignore_empty_lines",
        "invalid_row_handler",
    ),
    "ConvertOptions": (
        "check_utf8",
        "column_types",
        "null_values",
        "true_values",
        "false_values",
        "decimal_point",
        "strings_can_be_null",
        "quoted_strings_can_be_null",
        "include_columns",
        "include_missing_columns",
        "auto_dict_encode",
        "auto_dict_max_cardinality",
        "timestamp_parsers",
        "default_column_type",
    ),
}


def _copy_options(options: Any, kind: type, name: str) -> Any:
    """A new pyarrow CSV options object with the fields of ``options`` (default ones when None),
    so that the caller's object stays as it is.

    Copied field by field: pyarrow's options have no ``copy()``, and a pickled ParseOptions
    comes back with a handler that calls None on every invalid row (pyarrow 26), so the
    source also pickles its options as plain fields (see :meth:`CSVSource.__getstate__`).
    """
    if options is None:
        fresh = kind()
        if kind.__name__ == "ReadOptions":
            fresh.use_threads = False  # one parsing thread per task: the workers are the parallelism
        return fresh
    if not isinstance(options, kind):
        raise TypeError(f"read_csv: {name} must be a pyarrow.csv.{kind.__name__}, got {type(options).__name__}")
    return kind(**_option_fields(options))


def _option_fields(options: Any) -> dict[str, Any]:
    fields = {field: getattr(options, field) for field in _OPTION_FIELDS[type(options).__name__] if hasattr(options, field)}
    return {field: value for field, value in fields.items() if value is not None}


def make_csv_source(
    path: PathLike,
    columns: Optional[list[str]] = None,
    *,
    delimiter: Optional[str] = None,
    quote_char: Union[str, bool, None] = None,
    column_names: Optional[list[str]] = None,
    column_types: Optional[dict[str, Any]] = None,
    newlines_in_values: bool = True,
    read_options: Any = None,
    parse_options: Any = None,
    convert_options: Any = None,
    filesystem: Any = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> CSVSource:
    """The source of ``sp.read_csv``: named arguments set the fields of pyarrow's options."""
    import pyarrow.csv as pacsv

    read_options = _copy_options(read_options, pacsv.ReadOptions, "read_options")
    parse_options = _copy_options(parse_options, pacsv.ParseOptions, "parse_options")
    convert_options = _copy_options(convert_options, pacsv.ConvertOptions, "convert_options")
    if delimiter is not None:
        if not isinstance(delimiter, str) or len(delimiter) != 1:
            raise ValueError(f"read_csv: delimiter must be one character, got {delimiter!r}")
        parse_options.delimiter = delimiter
    if quote_char is not None:
        if not (quote_char is False or (isinstance(quote_char, str) and len(quote_char) == 1)):
            raise ValueError(f"read_csv: quote_char must be one character or False (no quoting), got {quote_char!r}")
        parse_options.quote_char = quote_char
    if column_names is not None:
        if isinstance(column_names, str) or not all(isinstance(c, str) for c in column_names):
            raise TypeError(f"read_csv: column_names must be a list of names, got {column_names!r}")
        read_options.column_names = list(column_names)
    if column_types is not None:
        if not isinstance(column_types, dict):
            raise TypeError(f"read_csv: column_types must be a dict of column name -> pyarrow type, got {column_types!r}")
        convert_options.column_types = column_types
    return CSVSource(path, columns, newlines_in_values, read_options, parse_options, convert_options, filesystem, block_size)
