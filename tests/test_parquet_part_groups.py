"""The part size ``G`` of ``write_parquet`` over a parquet source counts its row groups, not
tasks of ``task_size`` (issue 10, "Targets": parquet).

A parquet task is one row group whatever ``task_size`` says, so ``G = rows_per_file //
task_size`` made parts of ``G`` row groups: far more rows than ``rows_per_file`` (97 row groups
of 50,000 rows for ``rows_per_file=100_000``), one part for the whole input, and so a single
part group that the multiprocessing backend wrote in the main process (fewer groups than
workers). ``G`` now comes from ``Source.rows_per_task``: the largest row group's rows. Checked:
the pure rule, the parts' row counts, that the workers write (stats), and that the directory
is the simple backend's, with the default ``task_size`` and with others.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import streamproc as sp
from streamproc.io.parquet_parts import tasks_per_group

from .hang_guard import run_guarded
from .parquet_dirs import snapshot

#: 3 files of 4 row groups of 25 rows (the last file's last group: 10 rows): 12 row groups.
ROW_GROUP_ROWS = 25
FILE_ROWS = (100, 100, 85)
RUN_TIMEOUT_S = 120


def _add_length(record: dict[str, Any]) -> dict[str, Any]:
    return {**record, "n": len(record["text"])}


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("parquet-in")
    first = 0
    for k, rows in enumerate(FILE_ROWS):
        ids = list(range(first, first + rows))
        table = pa.table({"id": ids, "text": ["x" * (i % 7) for i in ids]})
        pq.write_table(table, directory / f"in-{k}.parquet", row_group_size=ROW_GROUP_ROWS)
        first += rows
    return directory


def _write(source_dir: Path, out: Path, rows_per_file: int, **options: Any) -> tuple[list[str], Any]:
    stream = sp.read_parquet(str(source_dir)).map(_add_length).set_processing(**options)

    def write() -> tuple[list[str], Any]:
        with sp.collect_stats() as stats:
            paths = stream.write_parquet(out, rows_per_file=rows_per_file)
        return paths, stats.runs[-1]

    result: tuple[list[str], Any] = run_guarded(write, RUN_TIMEOUT_S, f"write_parquet {options}")
    return result


def test_rows_per_task_of_a_parquet_source_is_its_largest_row_group(source_dir):
    source = sp.read_parquet(str(source_dir)).plan().source
    assert source.rows_per_task(1024) == ROW_GROUP_ROWS
    assert source.rows_per_task(3) == ROW_GROUP_ROWS  # task_size never cuts a row group
    assert tasks_per_group(50, source.rows_per_task(1024)) == 2
    assert tasks_per_group(10, source.rows_per_task(1024)) == 1  # a part is at least one row group


def test_an_in_memory_source_keeps_task_size(source_dir):
    source = sp.from_iterable(range(10)).plan().source
    assert source.rows_per_task(4) == 4


@pytest.mark.parametrize("task_size", [None, 7, 10_000])
def test_parts_hold_at_most_rows_per_file_rows_whatever_task_size(tmp_path, source_dir, task_size):
    options = {} if task_size is None else {"task_size": task_size}
    paths, _ = _write(source_dir, tmp_path / "out", rows_per_file=50, backend="simple", **options)
    rows = [pq.ParquetFile(p).metadata.num_rows for p in paths]
    # 12 row groups, 2 per part: 6 parts, named by their first task (row group) index.
    assert rows == [50, 50, 50, 50, 50, 35]
    assert [Path(p).name for p in paths] == [f"part-{k:06d}.parquet" for k in range(0, 12, 2)]
    assert pq.read_table(paths).column("id").to_pylist() == list(range(sum(FILE_ROWS)))


@pytest.mark.parametrize("deterministic", [True, False])
def test_workers_write_the_parts_and_the_directory_is_the_simple_backends(tmp_path, source_dir, deterministic):
    # task_size=4: G was 50 // 4 = 12 tasks (row groups), one part of the whole input, which
    # the main process wrote; now 2 row groups per part, 6 part groups for 2 workers.
    _write(source_dir, tmp_path / "simple", rows_per_file=50, backend="simple", task_size=4)
    _, stats = _write(
        source_dir,
        tmp_path / "mp",
        rows_per_file=50,
        backend="multiprocessing",
        num_cpu_workers=2,
        deterministic=deterministic,
        task_size=4,
    )
    assert stats.writes_in_workers is True
    assert len(list((tmp_path / "mp").glob("part-*.parquet"))) == 6
    assert snapshot(tmp_path / "mp") == snapshot(tmp_path / "simple")


def test_one_part_for_the_whole_input_is_written_in_the_main_process(tmp_path, source_dir):
    # The default rows_per_file (1M) makes one part of this input: one group for 2 workers.
    _write(source_dir, tmp_path / "simple", rows_per_file=1_000_000, backend="simple")
    _, stats = _write(source_dir, tmp_path / "mp", rows_per_file=1_000_000, backend="multiprocessing", num_cpu_workers=2)
    assert stats.writes_in_workers is False
    assert snapshot(tmp_path / "mp") == snapshot(tmp_path / "simple")
