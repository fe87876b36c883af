"""Source.locate for every source, and the note naming the task's location on every error."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Optional

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import streamproc as sp
from streamproc.io.base import Source
from tests.hang_guard import run_guarded
from tests.utils import UserError, collect_until_error, fn_raises, is_simple

#: Deadline of one guarded run (a 2-core machine shared with other test runs).
GUARD_S = 120.0


def location_notes(exc: BaseException) -> list[str]:
    return [note for note in getattr(exc, "__notes__", []) if " reads " in note and note.startswith("streamproc: task ")]


def run_until_error(stream: sp.Stream) -> tuple[list[Any], Optional[BaseException]]:
    return run_guarded(lambda: collect_until_error(stream), GUARD_S, "a stream that fails on one record")


# -- locate, source by source -----------------------------------------------------------------


def test_parquet_locates_row_group_and_row_in_the_file(tmp_path):
    pq.write_table(pa.table({"x": list(range(10))}), tmp_path / "a.parquet", row_group_size=4)
    source = sp.read_parquet(tmp_path / "a.parquet").source
    tasks = list(source.iter_tasks(1024))
    path = str(tmp_path / "a.parquet")
    assert [source.locate(task) for task in tasks] == [f"{path}, row group {g}" for g in range(3)]
    # The row is counted in the file, over the row groups before (4 + 4 rows before group 2).
    assert source.locate(tasks[0], 3) == f"{path}, row group 0, row 3"
    assert source.locate(tasks[2], 1) == f"{path}, row group 2, row 9"
    assert list(source.read_task(tasks[2]))[1] == {"x": 9}


def test_parquet_row_numbers_restart_in_each_file(tmp_path):
    for name in ("a", "b"):
        pq.write_table(pa.table({"x": list(range(5))}), tmp_path / f"{name}.parquet", row_group_size=3)
    source = sp.read_parquet(tmp_path).source
    tasks = list(source.iter_tasks(1024))
    assert [source.locate(task, 1) for task in tasks] == [
        f"{tmp_path / 'a.parquet'}, row group 0, row 1",
        f"{tmp_path / 'a.parquet'}, row group 1, row 4",
        f"{tmp_path / 'b.parquet'}, row group 0, row 1",
        f"{tmp_path / 'b.parquet'}, row group 1, row 4",
    ]


def test_jsonl_locates_lines_skipping_blank_ones(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"i": 0}\n\n{"i": 1}\n   \n{"i": 2}\n{"i": 3}\n', encoding="utf-8")
    source = sp.read_jsonl(path).source
    first, second = source.iter_tasks(4)
    assert source.locate(first) == f"{path}, lines 1 to 4"
    assert source.locate(second) == f"{path}, lines 5 to 6"
    # Record 1 of the first task is on line 3 (line 2 is blank), record 0 of the second on line 5.
    assert [source.locate(first, 0), source.locate(first, 1)] == [f"{path}, line 1", f"{path}, line 3"]
    assert source.locate(second, 1) == f"{path}, line 6"
    assert "past the task's end" in source.locate(first, 2)


def test_iterable_locates_the_item_index():
    source = sp.from_iterable(x * 10 for x in range(7)).source
    tasks = list(source.iter_tasks(3))
    assert [source.locate(task) for task in tasks] == ["items 0 to 2", "items 3 to 5", "items 6 to 6"]
    assert source.locate(tasks[1], 2) == "item 5"
    assert list(source.read_task(tasks[1])) == [30, 40, 50]


def test_pandas_locates_the_position_and_the_label():
    positional = sp.from_pandas(pd.DataFrame({"a": range(5)})).source
    assert positional.locate((3, 5)) == "rows 3 to 4"
    assert positional.locate((3, 5), 1) == "row 4"  # a RangeIndex from 0: the label adds nothing
    labelled = sp.from_pandas(pd.DataFrame({"a": range(3)}, index=["x", "y", "z"])).source
    assert labelled.locate((0, 3), 1) == "row 1 (index 'y')"
    shifted = sp.from_pandas(pd.DataFrame({"a": range(3)}, index=pd.RangeIndex(10, 13))).source
    assert shifted.locate((2, 3), 0) == "row 2 (index 12)"


def test_the_default_names_the_source_and_the_record():
    class Plain(Source):
        def iter_tasks(self, task_size: int) -> Iterator[int]:
            yield 0

        def read_task(self, payload: int) -> Iterator[int]:
            yield payload

        def describe(self) -> str:
            return "plain()"

    assert Plain().locate(0) == "plain()"
    assert Plain().locate(0, 2) == "plain(), record 2 of its task"


# -- the note on errors, every backend --------------------------------------------------------


def test_an_error_in_a_parquet_task_names_its_row_group(backend_options, tmp_path):
    pq.write_table(pa.table({"x": list(range(20))}), tmp_path / "a.parquet", row_group_size=6)
    stream = sp.read_parquet(tmp_path).map(fn_raises(at={"x": 14})).set_processing(**backend_options)
    outputs, exc = run_until_error(stream)
    assert type(exc) is UserError
    assert location_notes(exc) == [f"streamproc: task 2 reads {tmp_path / 'a.parquet'}, row group 2"]
    if is_simple(backend_options):
        assert outputs == [{"x": i} for i in range(12)]


def test_an_error_in_a_jsonl_task_names_its_lines(backend_options, tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text("".join(f"{i}\n" for i in range(10)), encoding="utf-8")
    stream = sp.read_jsonl(path).map(fn_raises(at=5)).set_processing(task_size=4, **backend_options)
    _, exc = run_until_error(stream)
    assert type(exc) is UserError
    assert location_notes(exc) == [f"streamproc: task 1 reads {path}, lines 5 to 8"]


@pytest.mark.parametrize("kind", ["iterable", "pandas"])
def test_an_error_in_a_memory_task_names_its_items(backend_options, kind):
    if kind == "iterable":
        stream = sp.from_iterable(range(10)).map(fn_raises(at=7))
        expected = "items 6 to 8"
    else:
        stream = sp.from_pandas(pd.DataFrame({"v": range(10)})).map(fn_raises(at={"v": 7}))
        expected = "rows 6 to 8"
    _, exc = run_until_error(stream.set_processing(task_size=3, **backend_options))
    assert type(exc) is UserError
    assert location_notes(exc) == [f"streamproc: task 2 reads {expected}"]


def test_a_sharded_run_names_the_task_by_its_key_in_the_stream(backend_options):
    # Rank 1 of 2 runs tasks 1, 3, 5...: the note names task 3 (its key), not its position 1.
    stream = sp.from_iterable(range(20)).map(fn_raises(at=13)).set_processing(task_size=4, shard=(1, 2), **backend_options)
    _, exc = run_until_error(stream)
    assert type(exc) is UserError
    assert location_notes(exc) == ["streamproc: task 3 reads items 12 to 15"]


class _LocateFails(Source):
    """One task of three records whose locate() raises: the note must not hide the error."""

    def iter_tasks(self, task_size: int) -> Iterator[int]:
        yield 0

    def read_task(self, payload: int) -> Iterator[int]:
        return iter(range(3))

    def locate(self, payload: Any, row: Optional[int] = None) -> str:
        raise RuntimeError("no location")

    def describe(self) -> str:
        return "locate_fails()"


def test_a_failing_locate_does_not_hide_the_error(backend_options):
    stream = sp.Stream(_LocateFails()).map(fn_raises(at=1)).set_processing(**backend_options)
    _, exc = run_until_error(stream)
    assert type(exc) is UserError
    assert location_notes(exc) == ["streamproc: task 0 reads <locate() failed: RuntimeError: no location>"]
