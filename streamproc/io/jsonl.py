"""JSON Lines: a source (one record per line) and an atomic single-file writer.

The main process reads raw lines in tasks of ``task_size`` lines; parsing happens where the
task runs (a CPU worker with the multiprocessing backend). ``.gz`` files are decompressed.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from collections.abc import Iterator
from typing import Any, Optional

from .base import Source
from .paths import PathLike, resolve_files

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz", ".ndjson.gz")


def _open_text(fs: Any, path: str) -> Any:
    # compression=None: pyarrow would otherwise detect ".gz" and decompress too, and the
    # GzipFile below would then read plain text ("Not a gzipped file").
    raw = fs.open_input_stream(path, compression=None)
    stream = gzip.GzipFile(fileobj=raw) if path.endswith(".gz") else raw
    return io.TextIOWrapper(stream, encoding="utf-8")


class JsonlSource(Source):
    """One record per non-empty line of each file; tasks are runs of lines of one file."""

    def __init__(self, path: PathLike, filesystem: Any = None) -> None:
        self.path_text = str(path)
        self.filesystem, self.files = resolve_files(path, JSONL_SUFFIXES, filesystem, what="read_jsonl")

    def iter_tasks(self, task_size: int) -> Iterator[tuple[str, int, list[str]]]:
        for path in self.files:
            with _open_text(self.filesystem, path) as lines:
                first_line, chunk = 1, list[str]()
                for line_no, line in enumerate(lines, start=1):
                    if not chunk:
                        first_line = line_no
                    chunk.append(line)
                    if len(chunk) >= task_size:
                        yield path, first_line, chunk
                        chunk = []
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
