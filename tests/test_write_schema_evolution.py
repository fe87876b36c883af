"""Schemas across tasks: a field null at first and typed later, or appearing later, is written
with its type in every part; only a change of kind is a SchemaError naming the field, both
types and the task. Every part of the output has one final schema, so directory readers work."""

from __future__ import annotations

import os
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import streamproc as sp
from streamproc.io.write_schema import unify_schemas
from tests.hang_guard import run_guarded
from tests.parquet_dirs import FailsWhileFileExists, snapshot
from tests.utils import BACKEND_CONFIGS, config_id, is_deterministic

WRITER_CONFIGS = [*BACKEND_CONFIGS, {"backend": "multiprocessing", "num_cpu_workers": 2, "deterministic": False}]
GUARD_S = 120


def late_label(record: dict[str, Any]) -> dict[str, Any]:
    """Records 0-4 have a null label (task 0: a part of its own), the rest a string; "extra"
    appears from record 9 (a later part) on."""
    x = record["x"]
    out: dict[str, Any] = {"x": x, "label": None if x < 5 else f"l{x}", "tokens": [] if x < 5 else [x]}
    if x >= 9:
        out["extra"] = float(x)
    return out


def _write(stream: sp.Stream, out: Any, **kwargs: Any) -> list[str]:
    paths: list[str] = run_guarded(lambda: stream.write_parquet(out, **kwargs), GUARD_S, "write_parquet")
    return paths


@pytest.mark.parametrize("config", WRITER_CONFIGS, ids=config_id)
def test_null_then_typed_and_late_fields_across_parts(tmp_path, config):
    stream = sp.from_iterable([{"x": i} for i in range(20)]).map(late_label).set_processing(task_size=5, **config)
    paths = _write(stream, tmp_path / "out", rows_per_file=5, row_group_size=2)
    assert len(paths) == 4
    expected_schema = pa.schema(
        [("x", pa.int64()), ("label", pa.string()), ("tokens", pa.list_(pa.int64())), ("extra", pa.float64())]
    )
    assert all(pq.read_schema(p) == expected_schema for p in paths)  # one schema, the first part rewritten
    expected = [{"extra": None, **late_label({"x": i})} for i in range(20)]
    assert pq.read_table(tmp_path / "out").to_pylist() == expected
    frame = pd.read_parquet(tmp_path / "out")
    assert list(frame.columns) == ["x", "label", "tokens", "extra"] and len(frame) == 20
    assert sp.read_parquet(tmp_path / "out").to_list() == expected
    # The same bytes of information as a run told the schema up front.
    _write(sp.from_iterable([{"x": i} for i in range(20)]).map(late_label).set_processing(task_size=5), tmp_path / "given",
           rows_per_file=5, row_group_size=2, schema=expected_schema)
    assert {k: v for k, v in snapshot(tmp_path / "out").items() if k.endswith(".parquet")} == {
        k: v for k, v in snapshot(tmp_path / "given").items() if k.endswith(".parquet")
    }


@pytest.mark.parametrize("config", WRITER_CONFIGS[:2] + WRITER_CONFIGS[-1:], ids=config_id)
def test_a_part_is_restarted_when_its_schema_widens_after_row_groups(tmp_path, config):
    # One part of 4 tasks; 2-row row groups of the null label are written before "l5" comes.
    stream = sp.from_iterable([{"x": i} for i in range(20)]).map(late_label).set_processing(task_size=5, **config)
    (path,) = _write(stream, tmp_path / "out", rows_per_file=20, row_group_size=2)
    metadata = pq.ParquetFile(path).metadata
    assert [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)] == [2] * 10
    assert pq.read_schema(path).field("label").type == pa.string()
    assert pq.read_table(path).column("label").to_pylist() == [None] * 5 + [f"l{i}" for i in range(5, 20)]
    assert sorted(os.listdir(tmp_path / "out")) == ["_streamproc_manifest.json", "part-000000.parquet"]  # no restart left over


def kind_changes(record: dict[str, Any]) -> dict[str, Any]:
    return {"x": record["x"], "b": str(record["x"]) if record["x"] < 6 else record["x"]}


@pytest.mark.parametrize("config", WRITER_CONFIGS, ids=config_id)
@pytest.mark.parametrize("rows_per_file", [3, 300], ids=["across-parts", "within-a-part"])
def test_a_change_of_kind_names_the_field_both_types_and_the_task(tmp_path, config, rows_per_file):
    stream = sp.from_iterable([{"x": i} for i in range(12)]).map(kind_changes).set_processing(task_size=3, **config)
    match = r"field 'b' was string in earlier records and is int64 in .*task 2\b"
    if not is_deterministic(config):  # parts commit in any order: the conflict is found either way round
        match = r"field 'b' was (string|int64) in earlier records and is (int64|string) in .*task \d\b"
    with pytest.raises(sp.SchemaError, match=match):
        _write(stream, tmp_path / "out", rows_per_file=rows_per_file)
    assert not [n for n in os.listdir(tmp_path / "out") if n.endswith(".inprogress")]


def test_a_lossy_number_cast_across_parts_names_the_part(tmp_path):
    # Numbers keep the first type: 2.5 in a later part cannot become an int64.
    stream = sp.from_iterable([{"a": 1}, {"a": 2.5}]).set_processing(task_size=1)
    with pytest.raises(sp.SchemaError, match=r"field 'a' was int64 .* double in part-000001\.parquet") as info:
        stream.write_parquet(tmp_path / "out", rows_per_file=1)
    assert any("part-000001.parquet" in note for note in getattr(info.value, "__notes__", []))


def test_resume_after_a_null_first_part_gives_the_uninterrupted_output(tmp_path):
    def stream() -> sp.Stream:
        return sp.from_iterable([{"x": i} for i in range(20)]).map(late_label).map(FailsWhileFileExists(flag, at=12))

    flag = str(tmp_path / "flag")
    _write(stream().set_processing(task_size=5), tmp_path / "reference", rows_per_file=5)
    open(flag, "w").close()
    with pytest.raises(RuntimeError):
        _write(stream().set_processing(task_size=5), tmp_path / "out", rows_per_file=5)
    assert pq.read_schema(tmp_path / "out" / "part-000000.parquet").field("label").type == pa.null()  # not final yet
    os.unlink(flag)
    _write(stream().set_processing(task_size=5), tmp_path / "out", rows_per_file=5, resume=True)
    assert snapshot(tmp_path / "out") == snapshot(tmp_path / "reference")


def test_unify_schemas_rules():
    where = "task 7"
    null_then = unify_schemas(pa.schema([("a", pa.null())]), pa.schema([("a", pa.string())]), where)
    assert null_then == pa.schema([("a", pa.string())])
    kept = unify_schemas(pa.schema([("a", pa.int64())]), pa.schema([("a", pa.null()), ("b", pa.bool_())]), where)
    assert kept == pa.schema([("a", pa.int64()), ("b", pa.bool_())])
    first_number = unify_schemas(pa.schema([("a", pa.int64())]), pa.schema([("a", pa.float64())]), where)
    assert first_number == pa.schema([("a", pa.int64())])
    nested = unify_schemas(pa.schema([("t", pa.list_(pa.null()))]), pa.schema([("t", pa.list_(pa.int64()))]), where)
    assert nested == pa.schema([("t", pa.list_(pa.int64()))])
    with pytest.raises(sp.SchemaError, match=r"field 'a' was bool in earlier records and is int64 in task 7"):
        unify_schemas(pa.schema([("a", pa.bool_())]), pa.schema([("a", pa.int64())]), where)
