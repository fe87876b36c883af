"""The part layout of write_parquet: part g holds tasks [g*G, (g+1)*G), named by its first task,
the same files for every backend, worker count and writer (main process or workers)."""

from __future__ import annotations

import doctest
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import streamproc as sp
from streamproc.io import parquet_parts, worker_parts, write_schema
from streamproc.io.parquet_parts import parse_part_name, part_name, tasks_per_group
from streamproc.io.worker_parts import group_payloads
from tests.hang_guard import run_guarded
from tests.parquet_dirs import MANIFEST, doubled, snapshot
from tests.utils import BACKEND_CONFIGS, config_id

#: Every backend configuration, plus the multiprocessing workers writing their own parts.
WRITER_CONFIGS = [
    *BACKEND_CONFIGS,
    {"backend": "multiprocessing", "num_cpu_workers": 2, "deterministic": False},
    {"backend": "multiprocessing", "num_cpu_workers": 3, "deterministic": False},
    {"backend": "threads", "num_cpu_workers": 3, "deterministic": False},
]
GUARD_S = 120


@pytest.mark.parametrize("module", [parquet_parts, worker_parts, write_schema], ids=lambda m: m.__name__)
def test_module_doctests(module):
    assert doctest.testmod(module).failed == 0


def test_tasks_per_group_and_names():
    assert tasks_per_group(1_000_000, 1024) == 976
    assert tasks_per_group(10, 3) == 3
    assert tasks_per_group(2, 3) == 1  # a part is at least one task
    assert part_name(0, 3) == "part-000000.parquet"
    assert part_name(4, 3) == "part-000012.parquet"
    assert part_name(2, 500_000) == "part-1000000.parquet"  # wider keys keep their digits
    assert parse_part_name("part-000012.parquet") == (12, False)
    assert parse_part_name(".part-000012.parquet.inprogress") == (12, True)
    assert parse_part_name(".part-000012.parquet.1.inprogress") == (12, True)
    for other in ("part-000012.parquet.inprogress", ".part-000012.parquet", "notes.txt", "part-x.parquet", MANIFEST):
        assert parse_part_name(other) is None, other


def test_group_payloads_follow_keys_not_positions():
    # A selection skipped group 1 (keys 2, 3): the groups are named by key.
    pairs = [(0, "a"), (1, "b"), (4, "e"), (5, "f"), (6, "g")]
    groups = [(key, group.group, group.tasks) for key, group in group_payloads(iter(pairs), 2)]
    assert groups == [(0, 0, ((0, "a"), (1, "b"))), (4, 2, ((4, "e"), (5, "f"))), (6, 3, ((6, "g"),))]


def _stream(n: int = 103):
    # Records 40-59 are filtered out: with 10 records per task and 2 tasks per part, part 2
    # (tasks 4 and 5) has no row, so no file.
    return sp.from_iterable([{"x": i, "s": "v" * (i % 5)} for i in range(n)]).filter(lambda r: not 40 <= r["x"] < 60)


@pytest.mark.parametrize("config", WRITER_CONFIGS, ids=config_id)
def test_every_backend_writes_the_same_files(tmp_path, config):
    expected_paths = _stream().map(doubled).set_processing(task_size=10).write_parquet(
        tmp_path / "simple", rows_per_file=25, row_group_size=7
    )
    stream = _stream().map(doubled).set_processing(task_size=10, **config)
    paths = run_guarded(
        lambda: stream.write_parquet(tmp_path / "out", rows_per_file=25, row_group_size=7), GUARD_S, "write_parquet"
    )
    names = [os.path.basename(p) for p in paths]
    assert names == [os.path.basename(p) for p in expected_paths]
    assert names == [f"part-{k:06d}.parquet" for k in (0, 2, 6, 8, 10)]
    assert snapshot(tmp_path / "out") == snapshot(tmp_path / "simple")
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert [(p["group"], p["file"], p["rows"]) for p in manifest["parts"]] == [
        (0, "part-000000.parquet", 20), (1, "part-000002.parquet", 20), (2, None, 0),
        (3, "part-000006.parquet", 20), (4, "part-000008.parquet", 20), (5, "part-000010.parquet", 3),
    ]
    sizes = [pq.ParquetFile(p).metadata for p in paths]
    assert [[m.row_group(i).num_rows for i in range(m.num_row_groups)] for m in sizes] == [[7, 7, 6]] * 4 + [[3]]


def test_parts_are_not_cut_at_rows_per_file(tmp_path):
    # rows_per_file decides G only: a flatten that multiplies rows makes larger parts.
    stream = sp.from_iterable(range(12)).map(lambda x: [{"x": x, "k": k} for k in range(3)]).flatten().set_processing(task_size=4)
    paths = stream.write_parquet(tmp_path / "out", rows_per_file=8)
    assert [pq.ParquetFile(p).metadata.num_rows for p in paths] == [24, 12]
    assert [os.path.basename(p) for p in paths] == ["part-000000.parquet", "part-000002.parquet"]


@pytest.mark.parametrize("config", WRITER_CONFIGS[:2] + WRITER_CONFIGS[-3:-1], ids=config_id)
def test_parquet_source_parts_hold_row_groups(tmp_path, config):
    # One task per row group, G counted in row groups (Source.rows_per_task): with row groups
    # of 10 rows and rows_per_file=30, a part holds 3 row groups, whatever task_size says.
    table = pa.table({"x": list(range(70))})
    pq.write_table(table.slice(0, 40), tmp_path / "a.parquet", row_group_size=10)
    pq.write_table(table.slice(40), tmp_path / "b.parquet", row_group_size=10)
    stream = sp.read_parquet([tmp_path / "a.parquet", tmp_path / "b.parquet"]).set_processing(task_size=100, **config)
    paths = run_guarded(lambda: stream.write_parquet(tmp_path / "out", rows_per_file=30), GUARD_S, "write_parquet")
    assert [os.path.basename(p) for p in paths] == ["part-000000.parquet", "part-000003.parquet", "part-000006.parquet"]
    columns = [pq.read_table(p).column("x").to_pylist() for p in paths]
    assert columns == [list(range(0, 30)), list(range(30, 60)), list(range(60, 70))]


def test_empty_output_has_a_manifest_and_no_part(tmp_path):
    assert sp.from_iterable([{"x": 1}]).filter(lambda r: False).write_parquet(tmp_path / "out") == []
    assert os.listdir(tmp_path / "out") == [MANIFEST]
    parts = json.loads((tmp_path / "out" / MANIFEST).read_text())["parts"]
    assert parts == [{"group": 0, "file": None, "rows": 0, "schema": None}]
