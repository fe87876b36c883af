"""write_parquet written by the CPU workers (multiprocessing, deterministic=False).

Each worker writes whole parts (a dispatch unit is a part group), with the names and rows of
the part layout (``part-<first task>.parquet``); the main process only prepares the directory,
records the parts in the manifest and checks that the rows written equal the records produced. These tests
cover the worker-side writer's boundaries: success, a user error, a schema error and a
worker killed mid-write, none of which may leave an in-progress file behind.
"""

from __future__ import annotations

import os
import re

import psutil
import pyarrow.parquet as pq
import pytest

import streamproc as sp

from .utils import UserError

NUM_RECORDS = 5_000
WORKER_CONFIG = {"backend": "multiprocessing", "num_cpu_workers": 2, "deterministic": False, "task_size": 250}


def _record(i: int) -> dict:
    return {"id": i, "text": "x" * (i % 11)}


MANIFEST = "_streamproc_manifest.json"


def _files(path) -> list[str]:
    return sorted(name for name in os.listdir(path) if name != MANIFEST)


def test_workers_write_all_records_in_their_own_parts(tmp_path):
    stream = sp.from_iterable([_record(i) for i in range(NUM_RECORDS)]).set_processing(**WORKER_CONFIG)
    paths = stream.write_parquet(tmp_path / "out", rows_per_file=1_000, row_group_size=300)

    assert _files(tmp_path / "out") == sorted(os.path.basename(p) for p in paths)  # nothing else, no temp file
    # 4 tasks of 250 records per part, named by the first task, in task order.
    assert [os.path.basename(p) for p in paths] == [f"part-{k:06d}.parquet" for k in range(0, 20, 4)]
    tables = [pq.read_table(p) for p in paths]
    assert [t.column("id").to_pylist() for t in tables] == [list(range(k, k + 1_000)) for k in range(0, NUM_RECORDS, 1_000)]
    assert all(pq.ParquetFile(p).metadata.row_group(0).num_rows == 300 for p in paths)


def test_main_process_checks_the_target_before_starting_workers(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("user data")
    stream = sp.from_iterable(range(3)).set_processing(**WORKER_CONFIG)
    children_before = len(psutil.Process().children(recursive=True))
    with pytest.raises(FileExistsError, match="not empty"):
        stream.write_parquet(tmp_path / "out")
    with pytest.raises(ValueError, match="rows_per_file"):
        stream.write_parquet(tmp_path / "other", rows_per_file=0)
    assert len(psutil.Process().children(recursive=True)) == children_before
    assert (tmp_path / "out" / "keep.txt").read_text() == "user data"


def _raise_at_4000(record: dict) -> dict:
    if record["id"] == 4_000:
        raise UserError("bad record 4000")
    return record


def _exit_at_4000(record: dict) -> dict:
    if record["id"] == 4_000:
        os._exit(1)
    return record


def _mixed_types(record: dict) -> dict:
    return {**record, "id": "four thousand"} if record["id"] == 4_000 else record


@pytest.mark.parametrize(
    ("fn", "expected", "match"),
    [
        (_raise_at_4000, UserError, "bad record 4000"),
        (_exit_at_4000, sp.WorkerCrashedError, "exit code 1"),
        (_mixed_types, sp.SchemaError, "'id'"),
    ],
    ids=["user-error", "worker-exit", "schema"],
)
def test_failure_mid_write_leaves_no_in_progress_file(tmp_path, fn, expected, match):
    stream = sp.from_iterable([_record(i) for i in range(NUM_RECORDS)]).map(fn).set_processing(**WORKER_CONFIG)
    with pytest.raises(expected, match=match):
        stream.write_parquet(tmp_path / "out", rows_per_file=500, row_group_size=100)
    leftovers = [name for name in _files(tmp_path / "out") if not re.fullmatch(r"part-\d{6}\.parquet", name)]
    assert leftovers == []
    for name in _files(tmp_path / "out"):  # completed parts stay, and are whole: 2 tasks of 250
        ids = pq.read_table(tmp_path / "out" / name).column("id").to_pylist()
        first = int(name[5:11]) * 250
        assert ids == list(range(first, first + 500))
        assert 4_000 not in ids
