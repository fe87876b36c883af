"""JSON Lines: a source (one record per line) and an atomic single-file writer.

The main process reads raw lines in tasks of ``task_size`` lines; parsing happens where the
task runs (a CPU worker with the multiprocessing backend). ``.gz`` files are decompressed.
Lines end at ``"\n"`` (the JSON Lines separator; a ``"\r\n"`` ending is JSON whitespace) and
are decoded a block at a time; invalid UTF-8 and a truncated or corrupt ``.gz`` raise
:class:`~streamproc.errors.CorruptInputError` naming the file and the line, in the main process,
after the lines before it.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import zlib
from collections.abc import Iterator
from typing import Any, Optional

from ..errors import CorruptInputError
from .base import Source
from .paths import PathLike, resolve_files

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz", ".ndjson.gz")
#: Bytes read (decompressed) at a time while splitting a file into lines.
READ_BLOCK_BYTES = 1 << 20
#: What a truncated or corrupt gzip stream raises while it is read.
_GZIP_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile)


def _open_binary(fs: Any, path: str) -> Any:
    # compression=None: pyarrow would otherwise detect ".gz" and decompress too, and the
    # GzipFile below would then read plain text ("Not a gzipped file").
    raw = fs.open_input_stream(path, compression=None)
    return gzip.GzipFile(fileobj=raw) if path.endswith(".gz") else raw


def iter_line_blocks(fs: Any, path: str) -> Iterator[list[str]]:
    """The lines of ``path`` (without their ``"\n"``), decoded and split a block at a time (main process).

    Raises:
        CorruptInputError: a line is not valid UTF-8, or the ``.gz`` stream is truncated or
            corrupt (names the file and the line); the lines before it are yielded first.
    """
    line_no = 0  # lines yielded so far
    with _open_binary(fs, path) as stream:
        # The start of a line not ended yet, in pieces (a long line is joined once, not per block).
        pending: list[bytes] = []
        # read1 on a GzipFile returns what one underlying read decompressed: data before a
        # truncation comes out before the error, so the error names the line where it stops.
        read = stream.read1 if isinstance(stream, gzip.GzipFile) else stream.read
        while True:
            try:
                block = read(READ_BLOCK_BYTES)
            except _GZIP_ERRORS as exc:
                raise CorruptInputError(
                    f"read_jsonl: {path}: truncated or corrupt gzip data at line {line_no + 1} "
                    f"(the lines before it were read): {type(exc).__name__}: {exc}"
                ) from exc
            if not block:
                break
            cut = block.rfind(b"\n") + 1
            if not cut:
                pending.append(block)
                continue
            yield from _decode_lines(b"".join([*pending, block[: cut - 1]]), path, line_no)
            pending = [block[cut:]] if cut < len(block) else []
            line_no += block.count(b"\n", 0, cut)  # the lines just yielded (pending holds no "\n")
        if pending:
            yield from _decode_lines(b"".join(pending), path, line_no)


def _decode_lines(data: bytes, path: str, lines_before: int) -> Iterator[list[str]]:
    """Yields the lines of ``data`` (whole lines joined by ``"\n"``, the first being line
    ``lines_before + 1``), decoded at once and split at ``"\n"`` only (a JSON string may hold
    U+2028, at which ``str.splitlines`` would split too).

    Raises:
        CorruptInputError: invalid UTF-8, after yielding the lines before the bad one.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line_start = data.rfind(b"\n", 0, exc.start) + 1
        if line_start:
            yield data[: line_start - 1].decode("utf-8").split("\n")
        line_no = lines_before + data.count(b"\n", 0, exc.start) + 1
        raise CorruptInputError(
            f"read_jsonl: invalid UTF-8 in {path}, line {line_no}, byte {exc.start - line_start} of the line: {exc.reason}"
        ) from exc
    yield text.split("\n")


class JsonlSource(Source):
    """One record per non-empty line of each file; tasks are runs of lines of one file."""

    def __init__(self, path: PathLike, filesystem: Any = None) -> None:
        self.path_text = str(path)
        self.filesystem, self.files = resolve_files(path, JSONL_SUFFIXES, filesystem, what="read_jsonl")

    def iter_tasks(self, task_size: int) -> Iterator[tuple[str, int, list[str]]]:
        for path in self.files:
            first_line, chunk = 1, list[str]()
            lines_before = 0  # lines of the file before the current block
            for lines in iter_line_blocks(self.filesystem, path):
                taken = 0
                while taken < len(lines):
                    if not chunk:
                        first_line = lines_before + taken + 1
                    more = lines[taken : taken + task_size - len(chunk)]
                    chunk.extend(more)
                    taken += len(more)
                    if len(chunk) >= task_size:
                        yield path, first_line, chunk
                        chunk = []
                lines_before += len(lines)
            if chunk:
                yield path, first_line, chunk

    def read_task(self, payload: tuple[str, int, list[str]]) -> Iterator[Any]:
        path, first_line, lines = payload
        for line_no, line in enumerate(lines, start=first_line):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"read_jsonl: malformed JSON in {path}, line {line_no}: {exc.msg} (column {exc.colno})") from exc

    def locate(self, payload: tuple[str, int, list[str]], row: Optional[int] = None) -> str:
        """``"<file>, lines <first> to <last>"``, or ``"<file>, line <n>"`` for record ``row`` of the
        task (blank lines hold no record: the ``row``-th non-blank line)."""
        path, first_line, lines = payload
        if row is None:
            return f"{path}, lines {first_line} to {first_line + len(lines) - 1}"
        record_lines = [line_no for line_no, line in enumerate(lines, start=first_line) if line.strip()]
        if 0 <= row < len(record_lines):
            return f"{path}, line {record_lines[row]}"
        return f"{path}, lines {first_line} to {first_line + len(lines) - 1} (record {row} is past the task's end)"

    def num_records(self) -> None:
        return None  # unknown without reading every line

    def describe(self) -> str:
        return f"read_jsonl({self.path_text!r}: {len(self.files)} file(s))"


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy arrays and scalars, torch tensors
        return value.tolist()
    if isinstance(value, (set, frozenset)):
        return list(value)
    if hasattr(value, "isoformat"):
        return value.isoformat()
    raise TypeError(f"write_jsonl: {type(value).__name__} is not JSON serializable: {value!r:.80}")


def records_to_jsonl(records: list[Any]) -> str:
    """Serializes records to JSON Lines text (runs where the chunk is finalized)."""
    return "".join(json.dumps(r, ensure_ascii=False, default=_json_default) + "\n" for r in records)


class JsonlWriter:
    """Writes JSON Lines text to one file, under a hidden temporary name until complete.

    Raises:
        FileExistsError: the file exists and ``overwrite`` is False.
    """

    def __init__(self, path: str, overwrite: bool = False) -> None:
        self.path = os.path.abspath(os.fspath(path))
        if os.path.isdir(self.path):
            raise FileExistsError(f"write_jsonl: {self.path!r} is a directory; give a file path")
        if os.path.exists(self.path) and not overwrite:
            raise FileExistsError(f"write_jsonl: {self.path!r} exists; pass overwrite=True to replace it")
        directory, name = os.path.split(self.path)
        os.makedirs(directory, exist_ok=True)
        self.tmp_path = os.path.join(directory, f".{name}.inprogress")
        raw: Any = open(self.tmp_path, "wb")  # noqa: SIM115 (owned by the writer: closed by close() or abort())
        binary = gzip.GzipFile(fileobj=raw, mode="wb") if name.endswith(".gz") else raw
        self._file: Optional[Any] = io.TextIOWrapper(binary, encoding="utf-8")
        self._raw = raw
        self.records_written = 0

    def write(self, text: str) -> None:
        assert self._file is not None
        self._file.write(text)

    def close(self) -> None:
        assert self._file is not None
        self._file.close()
        self._raw.close()
        self._file = None
        os.replace(self.tmp_path, self.path)

    def abort(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
                self._raw.close()
            finally:
                self._file = None
                if os.path.exists(self.tmp_path):
                    os.unlink(self.tmp_path)
