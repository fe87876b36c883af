"""Corrupt input names the file and the row group or line: parquet footers and pages, gzip, UTF-8.

Every corrupt file is built here from a good one. A bad footer fails when the run starts,
before any record (every footer is read then); a bad page fails in the task that reads it,
after the records of the tasks before it.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path
from typing import Any, Optional

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import streamproc as sp
from tests.hang_guard import run_guarded
from tests.utils import collect_until_error, is_deterministic, is_simple

GUARD_S = 120.0
ROWS = 4000
ROW_GROUP_ROWS = 1000


def good_table() -> pa.Table:
    return pa.table({"id": pa.array(range(ROWS), pa.int64()), "text": [f"document {i} " * 4 for i in range(ROWS)]})


def write_good(path: Path) -> bytes:
    pq.write_table(good_table(), path, row_group_size=ROW_GROUP_ROWS, compression="snappy")
    return path.read_bytes()


def run(stream: sp.Stream) -> tuple[list[Any], Optional[BaseException]]:
    return run_guarded(lambda: collect_until_error(stream), GUARD_S, "a run over corrupt input")


# -- parquet footers: fail when the run starts --------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "empty", "not_parquet"])
def test_a_bad_footer_fails_before_any_record(backend_options, tmp_path, damage):
    data = write_good(tmp_path / "a.parquet")
    bad = tmp_path / "b.parquet"
    bad.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "not_parquet": b"id,text\n1,x\n" * 100}[damage])
    outputs, exc = run(sp.read_parquet(tmp_path).set_processing(**backend_options))
    assert isinstance(exc, sp.CorruptInputError)
    assert f"cannot read the footer of {str(bad)!r}" in str(exc)
    # a.parquet is good and comes first, but every footer is read before its first task runs.
    assert outputs == []
    assert isinstance(exc.__cause__, pa.ArrowException)


def test_a_bad_first_footer_fails_when_columns_are_checked(tmp_path):
    (tmp_path / "a.parquet").write_bytes(b"")
    with pytest.raises(sp.CorruptInputError, match="Parquet file size is 0 bytes") as info:
        sp.read_parquet(tmp_path, columns=["id"])  # columns= reads the first footer when the stream is built
    assert str(tmp_path / "a.parquet") in str(info.value)


def test_a_missing_file_keeps_its_own_error(tmp_path):
    path = tmp_path / "a.parquet"
    write_good(path)
    stream = sp.read_parquet(path)
    path.unlink()
    with pytest.raises(FileNotFoundError):
        stream.to_list()


# -- parquet pages: fail in the task that reads them --------------------------------------------


def corrupt_a_page(path: Path, row_group: int) -> None:
    """Overwrites the header of the first data page of column ``text`` in ``row_group``."""
    data = bytearray(path.read_bytes())
    column = pq.read_metadata(path).row_group(row_group).column(1)
    start = column.data_page_offset
    data[start : start + 64] = b"\xab" * 64
    path.write_bytes(bytes(data))


def test_a_corrupt_page_names_the_file_and_the_row_group(backend_options, tmp_path):
    path = tmp_path / "a.parquet"
    write_good(path)
    corrupt_a_page(path, row_group=2)
    outputs, exc = run(sp.read_parquet(path).set_processing(**backend_options))
    assert isinstance(exc, sp.CorruptInputError)
    assert f"cannot decode {str(path)!r}, row group 2" in str(exc)
    assert f"streamproc: task 2 reads {path}, row group 2" in exc.__notes__
    if is_simple(backend_options):
        assert isinstance(exc.__cause__, OSError)  # pyarrow's own error ("Couldn't deserialize thrift")
    if is_deterministic(backend_options):
        # The two row groups before it come out, in order, whatever the backend.
        assert outputs == good_table().slice(0, len(outputs)).to_pylist()
        assert len(outputs) <= 2 * ROW_GROUP_ROWS
    if is_simple(backend_options):
        assert len(outputs) == 2 * ROW_GROUP_ROWS


def test_other_row_groups_of_a_damaged_file_still_read(tmp_path):
    path = tmp_path / "a.parquet"
    write_good(path)
    corrupt_a_page(path, row_group=2)
    source = sp.read_parquet(path).source
    tasks = list(source.iter_tasks(1024))
    assert [len(list(source.read_task(tasks[g]))) for g in (0, 1, 3)] == [ROW_GROUP_ROWS] * 3


# -- jsonl: gzip and UTF-8 ---------------------------------------------------------------------


def jsonl_bytes(n: int) -> bytes:
    return b"".join(b'{"i": %d, "text": "line %d of the file"}\n' % (i, i) for i in range(n))


def complete_lines_in(truncated_gz: bytes) -> int:
    """How many whole lines a truncated gzip stream holds (what a reader can get out of it)."""
    return zlib.decompressobj(wbits=31).decompress(truncated_gz).count(b"\n")


def test_a_truncated_gz_names_the_file_and_the_line(backend_options, tmp_path):
    data = gzip.compress(jsonl_bytes(60_000))
    truncated = data[: len(data) // 2]
    path = tmp_path / "a.jsonl.gz"
    path.write_bytes(truncated)
    outputs, exc = run(sp.read_jsonl(path).set_processing(task_size=500, **backend_options))
    assert isinstance(exc, sp.CorruptInputError)
    line = complete_lines_in(truncated) + 1
    assert f"{path}: truncated or corrupt gzip data at line {line}" in str(exc)
    assert isinstance(exc.__cause__, EOFError)
    if is_deterministic(backend_options):
        # Every whole task before the truncation comes out (the one it cuts does not).
        assert outputs == [{"i": i, "text": f"line {i} of the file"} for i in range(len(outputs))]
    if is_simple(backend_options):
        assert len(outputs) == (line - 1) // 500 * 500


@pytest.mark.parametrize("damage", ["bad_checksum", "not_gzip"])
def test_corrupt_gzip_names_the_file(tmp_path, damage):
    if damage == "bad_checksum":
        data = bytearray(gzip.compress(jsonl_bytes(20_000)))
        data[-8] ^= 0xFF  # the CRC32 of the trailer: gzip notices after the last line
        line = 20_001
    else:
        data = bytearray(jsonl_bytes(10))  # plain text under a .gz name
        line = 1
    path = tmp_path / "a.jsonl.gz"
    path.write_bytes(bytes(data))
    _, exc = run(sp.read_jsonl(path))
    assert isinstance(exc, sp.CorruptInputError)
    assert f"{path}: truncated or corrupt gzip data at line {line} " in str(exc)
    assert isinstance(exc.__cause__, gzip.BadGzipFile)


@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "gz"])
def test_invalid_utf8_names_the_file_and_the_line(backend_options, tmp_path, compressed):
    lines = [b'{"t": "ok"}\n', b'{"t": "caf\xc3\xa9"}\n', b"\n", b'{"t": "bad \xff byte"}\n', b'{"t": "after"}\n']
    data = b"".join(lines)
    path = tmp_path / ("a.jsonl.gz" if compressed else "a.jsonl")
    path.write_bytes(gzip.compress(data) if compressed else data)
    outputs, exc = run(sp.read_jsonl(path).set_processing(task_size=2, **backend_options))
    assert isinstance(exc, sp.CorruptInputError)
    assert f"invalid UTF-8 in {path}, line 4, byte 11 of the line: invalid start byte" in str(exc)
    assert isinstance(exc.__cause__, UnicodeDecodeError)
    if is_deterministic(backend_options):
        # Task 0 (lines 1-2) is whole; task 1 (lines 3-4) never forms: the source stops at line 4.
        assert outputs == [{"t": "ok"}, {"t": "café"}][: len(outputs)]
    if is_simple(backend_options):
        assert outputs == [{"t": "ok"}, {"t": "café"}]


def test_windows_line_endings_and_a_last_line_without_newline_still_read(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"i": 0}\r\n\r\n{"i": 1}\r\n{"i": 2}')
    source = sp.read_jsonl(path).source
    (task,) = source.iter_tasks(10)
    assert list(source.read_task(task)) == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert source.locate(task, 2) == f"{path}, line 4"


def test_a_line_longer_than_a_read_block(tmp_path, monkeypatch):
    from streamproc.io import jsonl

    monkeypatch.setattr(jsonl, "READ_BLOCK_BYTES", 7)  # lines span many blocks, blocks many lines
    records = [{"i": i, "text": "x" * (i * 5)} for i in range(12)]
    path = tmp_path / "a.jsonl"
    path.write_text("".join(f'{{"i": {r["i"]}, "text": "{r["text"]}"}}\n' for r in records), encoding="utf-8")
    assert sp.read_jsonl(path).to_list() == records


def test_unicode_line_separators_inside_strings_do_not_split_lines(tmp_path):
    # U+2028 and U+0085 are valid raw inside JSON strings; str.splitlines would split at them.
    records = [{"t": "a\u2028b"}, {"t": "c\x85d\u2029e"}]
    path = tmp_path / "a.jsonl"
    path.write_bytes("".join(f'{{"t": "{r["t"]}"}}\n' for r in records).encode("utf-8"))
    assert sp.read_jsonl(path).to_list() == records
