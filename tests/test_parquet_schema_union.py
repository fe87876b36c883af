"""read_parquet over files whose schemas differ: unified when the run starts, refused when they clash."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import streamproc as sp
from streamproc.io.parquet_schema import conform_batch, unify_file_schemas
from tests.hang_guard import run_guarded
from tests.utils import assert_same_as_simple, collect_until_error

GUARD_S = 120.0


def write(path: Path, columns: dict[str, pa.Array], row_group_size: int = 2) -> None:
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)


def test_unify_merges_nulls_widths_and_missing_fields():
    unified = unify_file_schemas(
        [
            ("a", pa.schema([("id", pa.int32()), ("note", pa.null())])),
            ("b", pa.schema([("id", pa.int64()), ("note", pa.string())])),
            ("c", pa.schema([("extra", pa.float64()), ("id", pa.int64())])),
        ]
    )
    assert unified == pa.schema([("id", pa.int64()), ("note", pa.string()), ("extra", pa.float64())])
    assert all(field.nullable for field in unified)


def test_unify_names_both_files_the_field_and_the_types():
    with pytest.raises(sp.SchemaError) as info:
        unify_file_schemas(
            [
                ("a.parquet", pa.schema([("id", pa.int64()), ("label", pa.null())])),
                ("b.parquet", pa.schema([("id", pa.int64()), ("label", pa.bool_())])),
                ("c.parquet", pa.schema([("label", pa.string())])),
            ]
        )
    # "label" got its type (bool) from b.parquet, not from a.parquet where it was null.
    assert str(info.value).startswith("read_parquet: field 'label' is bool in 'b.parquet' but string in 'c.parquet'")


def test_conform_orders_casts_and_fills_fields():
    batch = pa.record_batch({"b": pa.array([1, 2], pa.int32()), "a": pa.array(["x", "y"])})
    schema = pa.schema([("a", pa.string()), ("b", pa.int64()), ("c", pa.float64())])
    conformed = conform_batch(batch, schema, "f.parquet, row group 0")
    assert conformed.schema == schema
    assert conformed.to_pylist() == [{"a": "x", "b": 1, "c": None}, {"a": "y", "b": 2, "c": None}]


def mixed_files(directory: Path) -> None:
    write(directory / "a.parquet", {"id": pa.array([0, 1, 2], pa.int32()), "note": pa.nulls(3)})
    write(directory / "b.parquet", {"id": pa.array([3, 4], pa.int64()), "note": pa.array([None, "four"])})
    write(directory / "c.parquet", {"score": pa.array([0.5, 1.5, 2.5]), "id": pa.array([5, 6, 7], pa.int64())})


def test_compatible_files_give_records_of_one_shape(backend_options, tmp_path):
    mixed_files(tmp_path)
    records = run_guarded(
        lambda: assert_same_as_simple(sp.read_parquet(tmp_path), **backend_options), GUARD_S, "reading mixed schemas"
    )
    assert records == [
        {"id": 0, "note": None, "score": None},
        {"id": 1, "note": None, "score": None},
        {"id": 2, "note": None, "score": None},
        {"id": 3, "note": None, "score": None},
        {"id": 4, "note": "four", "score": None},
        {"id": 5, "note": None, "score": 0.5},
        {"id": 6, "note": None, "score": 1.5},
        {"id": 7, "note": None, "score": 2.5},
    ]
    assert [list(record) for record in records] == [["id", "note", "score"]] * 8  # same fields, same order


def test_columns_missing_from_some_files_are_null(backend_options, tmp_path):
    mixed_files(tmp_path)
    stream = sp.read_parquet(tmp_path, columns=["id", "note"])
    records = run_guarded(lambda: assert_same_as_simple(stream, **backend_options), GUARD_S, "reading selected columns")
    assert records == [{"id": i, "note": "four" if i == 4 else None} for i in range(8)]


def test_files_that_agree_are_read_as_they_are(tmp_path):
    write(tmp_path / "a.parquet", {"x": pa.array([1, 2], pa.int64())})
    write(tmp_path / "b.parquet", {"x": pa.array([3], pa.int64())})
    tasks = list(sp.read_parquet(tmp_path).source.iter_tasks(1024))
    assert [task.schema for task in tasks] == [None, None]  # nothing to conform: no cost per batch


def test_only_the_files_that_differ_carry_the_unified_schema(tmp_path):
    write(tmp_path / "a.parquet", {"x": pa.array([1, 2], pa.int64())})
    write(tmp_path / "b.parquet", {"x": pa.array([3], pa.int32())})
    tasks = list(sp.read_parquet(tmp_path).source.iter_tasks(1024))
    assert [task.schema for task in tasks] == [None, pa.schema([("x", pa.int64())])]


def clashing_files(directory: Path) -> None:
    write(directory / "a.parquet", {"id": pa.array([0, 1]), "label": pa.array(["x", "y"])})
    write(directory / "b.parquet", {"id": pa.array([2, 3]), "label": pa.array([1, 2], pa.int64())})


def test_incompatible_files_are_refused_when_the_run_starts(backend_options, tmp_path):
    clashing_files(tmp_path)
    stream = sp.read_parquet(tmp_path)  # building the stream reads no footer
    stream_with_columns = sp.read_parquet(tmp_path, columns=["label"])  # only the first file's
    for built in (stream, stream_with_columns):
        outputs, exc = run_guarded(
            lambda built=built: collect_until_error(built.set_processing(**backend_options)), GUARD_S, "a clash"
        )
        assert outputs == []  # refused before any task, a.parquet's records included
        assert isinstance(exc, sp.SchemaError)
        assert str(exc).startswith(
            f"read_parquet: field 'label' is string in {str(tmp_path / 'a.parquet')!r} "
            f"but int64 in {str(tmp_path / 'b.parquet')!r}"
        )


def test_an_unselected_clashing_column_does_not_matter(tmp_path):
    clashing_files(tmp_path)
    assert sp.read_parquet(tmp_path, columns=["id"]).to_list() == [{"id": i} for i in range(4)]


def test_a_value_that_does_not_fit_the_unified_type_names_the_file(tmp_path):
    # int64 and uint64 unify to int64 (pyarrow's rule); 2**63 does not fit, found when read.
    write(tmp_path / "a.parquet", {"n": pa.array([1], pa.int64())})
    write(tmp_path / "b.parquet", {"n": pa.array([2, 2**63], pa.uint64())})
    outputs, exc = run_guarded(lambda: collect_until_error(sp.read_parquet(tmp_path)), GUARD_S, "an overflow")
    assert outputs == [{"n": 1}]
    assert isinstance(exc, sp.SchemaError)
    assert f"field 'n' of {str(tmp_path / 'b.parquet')!r}, row group 0 cannot be read as int64" in str(exc)


def test_module_doctests():
    import doctest

    from streamproc.io import parquet_schema

    assert doctest.testmod(parquet_schema).failed == 0
