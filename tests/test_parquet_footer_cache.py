"""A parquet source reads each file's footer once per run in the main process, never a stale one.

Footer reads are counted with spies on the pyarrow entry points (``pq.read_metadata``, the
cache's; ``pq.read_schema`` and ``pq.ParquetFile`` opened without a footer, which would read
one again). A spy installed in the main process counts there only: forked workers inherit it,
but their calls land in their own copy of the list, and a worker reads its own files' footers
(the cache does not travel with the pickled source). Outputs are compared with the simple
backend's in every backend configuration.
"""

from __future__ import annotations

import os
import pickle
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import streamproc as sp

from .hang_guard import run_guarded
from .parquet_dirs import snapshot
from .utils import assert_same_as_simple

GUARD_S = 120.0
FILES = 3
ROWS_PER_FILE = 40
ROW_GROUP_ROWS = 10  # 4 row groups (tasks) per file, 12 in all


def _shifted(record: dict[str, Any]) -> dict[str, Any]:
    return {**record, "id": record["id"] + 1000}


class FooterReads:
    """Spies on the main process's footer reads; ``paths`` counts ``read_metadata`` calls per file."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.paths: Counter[str] = Counter()
        self.others: list[str] = []
        read_metadata, read_schema, parquet_file = pq.read_metadata, pq.read_schema, pq.ParquetFile
        pid = os.getpid()

        def counted_read_metadata(where: Any, *args: Any, **kwargs: Any) -> Any:
            if os.getpid() == pid:
                self.paths[str(where)] += 1
            return read_metadata(where, *args, **kwargs)

        def counted_read_schema(where: Any, *args: Any, **kwargs: Any) -> Any:
            if os.getpid() == pid:
                self.others.append(f"read_schema({where})")
            return read_schema(where, *args, **kwargs)

        def counted_parquet_file(source: Any, *args: Any, **kwargs: Any) -> Any:
            if os.getpid() == pid and kwargs.get("metadata") is None:
                self.others.append(f"ParquetFile({source}) without metadata")
            return parquet_file(source, *args, **kwargs)

        monkeypatch.setattr(pq, "read_metadata", counted_read_metadata)
        monkeypatch.setattr(pq, "read_schema", counted_read_schema)
        monkeypatch.setattr(pq, "ParquetFile", counted_parquet_file)

    def total(self) -> int:
        return sum(self.paths.values())


def write_files(directory: Path, offset: int = 0) -> list[str]:
    directory.mkdir(exist_ok=True)
    paths = []
    for k in range(FILES):
        ids = range(offset + k * ROWS_PER_FILE, offset + (k + 1) * ROWS_PER_FILE)
        table = pa.table({"id": pa.array(ids, pa.int64()), "text": [f"row {i}" for i in ids]})
        path = directory / f"f{k}.parquet"
        pq.write_table(table, path, row_group_size=ROW_GROUP_ROWS)
        paths.append(str(path))
    return paths


def expected_records(offset: int = 0) -> list[dict[str, Any]]:
    return [{"id": i, "text": f"row {i}"} for i in range(offset, offset + FILES * ROWS_PER_FILE)]


def test_a_whole_to_list_run_reads_each_footer_once(backend_options, tmp_path, monkeypatch):
    paths = write_files(tmp_path / "in")
    stream = sp.read_parquet(tmp_path / "in").map(_shifted)
    expected = stream.set_processing(backend="simple").to_list()  # another source object: its own cache
    assert expected == [_shifted(r) for r in expected_records()]
    reads = FooterReads(monkeypatch)
    run = sp.read_parquet(tmp_path / "in").map(_shifted).set_processing(**backend_options)
    assert run_guarded(run.to_list, GUARD_S, "a to_list run") == expected
    assert reads.paths == Counter({path: 1 for path in paths})
    assert reads.others == []


def test_a_whole_write_parquet_run_reads_each_footer_once(backend_options, tmp_path, monkeypatch):
    paths = write_files(tmp_path / "in")
    layout = {"rows_per_file": 2 * ROW_GROUP_ROWS, "row_group_size": 7}  # 6 parts of 2 row groups
    sp.read_parquet(tmp_path / "in").map(_shifted).write_parquet(tmp_path / "simple", **layout)
    reads = FooterReads(monkeypatch)
    stream = sp.read_parquet(tmp_path / "in").map(_shifted).set_processing(**backend_options, deterministic=True)
    run_guarded(lambda: stream.write_parquet(tmp_path / "out", **layout), GUARD_S, "a write_parquet run")
    # Listing the tasks, the part size (twice), the number of part groups, the fingerprint.
    assert reads.paths == Counter({path: 1 for path in paths})
    assert reads.others == []
    monkeypatch.undo()  # snapshot reads the written files with pyarrow
    assert snapshot(tmp_path / "out") == snapshot(tmp_path / "simple")
    assert pq.read_table(tmp_path / "out").to_pylist() == [_shifted(r) for r in expected_records()]


def test_resume_of_a_complete_output_reads_each_footer_once(tmp_path, monkeypatch):
    paths = write_files(tmp_path / "in")
    stream = sp.read_parquet(tmp_path / "in")
    stream.write_parquet(tmp_path / "out", rows_per_file=2 * ROW_GROUP_ROWS)
    before = snapshot(tmp_path / "out")
    reads = FooterReads(monkeypatch)
    sp.read_parquet(tmp_path / "in").write_parquet(tmp_path / "out", rows_per_file=2 * ROW_GROUP_ROWS, resume=True)
    assert reads.paths == Counter({path: 1 for path in paths})
    monkeypatch.undo()
    assert snapshot(tmp_path / "out") == before


def test_a_second_run_of_unchanged_files_reads_no_footer(tmp_path, monkeypatch):
    write_files(tmp_path / "in")
    stream = sp.read_parquet(tmp_path / "in")
    assert stream.to_list() == expected_records()
    reads = FooterReads(monkeypatch)
    assert stream.to_list() == expected_records()
    assert stream.source.num_records() == FILES * ROWS_PER_FILE
    assert reads.total() == 0


def test_a_file_rewritten_between_two_runs_is_read_again(tmp_path, monkeypatch):
    paths = write_files(tmp_path / "in")
    stream = sp.read_parquet(tmp_path / "in")
    assert stream.to_list() == expected_records()
    reads = FooterReads(monkeypatch)
    # f1 gets other rows and another row-group layout (another size and mtime).
    table = pa.table({"id": pa.array([7, 8, 9], pa.int64()), "text": ["x", "y", "z"]})
    pq.write_table(table, paths[1], row_group_size=2)
    os.utime(paths[1], ns=(1, 1))  # an mtime that differs from the first write's, whatever the clock's step
    records = expected_records()
    expected = records[:ROWS_PER_FILE] + table.to_pylist() + records[2 * ROWS_PER_FILE :]
    assert stream.to_list() == expected
    assert stream.source.num_tasks(1024) == 2 * (ROWS_PER_FILE // ROW_GROUP_ROWS) + 2
    assert reads.paths == Counter({paths[1]: 1})


def test_a_changed_mtime_alone_invalidates_the_footer(tmp_path, monkeypatch):
    paths = write_files(tmp_path / "in")
    stream = sp.read_parquet(tmp_path / "in")
    assert stream.source.num_records() == FILES * ROWS_PER_FILE
    reads = FooterReads(monkeypatch)
    stat = os.stat(paths[2])
    os.utime(paths[2], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # same bytes, same size
    assert stream.source.num_records() == FILES * ROWS_PER_FILE
    assert reads.paths == Counter({paths[2]: 1})


def test_a_footer_that_failed_is_not_cached(tmp_path):
    paths = write_files(tmp_path / "in")
    good = Path(paths[0]).read_bytes()
    Path(paths[0]).write_bytes(good[: len(good) // 2])
    stream = sp.read_parquet(tmp_path / "in")
    with pytest.raises(sp.CorruptInputError, match="cannot read the footer of"):
        stream.to_list()
    Path(paths[0]).write_bytes(good)
    assert stream.to_list() == expected_records()


def test_the_cache_does_not_travel_with_a_pickled_source(tmp_path, monkeypatch):
    paths = write_files(tmp_path / "in")
    source = sp.read_parquet(tmp_path / "in").source
    assert source.num_records() == FILES * ROWS_PER_FILE
    copy = pickle.loads(pickle.dumps(source))
    reads = FooterReads(monkeypatch)
    assert copy.num_records() == FILES * ROWS_PER_FILE  # the copy reads its own footers, once each
    assert copy.num_tasks(1024) == FILES * (ROWS_PER_FILE // ROW_GROUP_ROWS)
    assert reads.paths == Counter({path: 1 for path in paths})


def test_columns_are_checked_against_the_cached_first_footer(backend_options, tmp_path, monkeypatch):
    paths = write_files(tmp_path / "in")
    reads = FooterReads(monkeypatch)
    stream = sp.read_parquet(tmp_path / "in", columns=["text"])
    assert reads.paths == Counter({paths[0]: 1})  # columns= reads the first footer when the stream is built
    actual = run_guarded(lambda: assert_same_as_simple(stream, **backend_options), GUARD_S, "a columns run")
    assert actual == [{"text": r["text"]} for r in expected_records()]
    with pytest.raises(sp.SchemaError, match="unknown column"):
        sp.read_parquet(tmp_path / "in", columns=["nope"])
