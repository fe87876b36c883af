"""read_parquet and write_parquet: round trips, path forms, atomic parts, schema errors."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import streamproc as sp
from tests.utils import (
    CountingSource,
    UserError,
    assert_outputs,
    assert_same_as_simple,
    config_id,
    fn_raises,
    identity,
    in_process_configs,
    is_deterministic,
    reads_ahead,
)

NESTED = pa.table(
    {
        "id": pa.array(range(6), pa.int64()),
        "text": ["a", None, "ccc", "", "eeeee", None],
        "score": [0.5, 1.5, None, 3.5, None, 5.5],
        "tokens": [[1, 2], [], None, [4], [5, None], [6, 6, 6]],
        "meta": [{"k": "x", "v": 1}, None, {"k": None, "v": 3}, {"k": "y", "v": None}, {"k": "z", "v": 5}, {"k": "w", "v": 6}],
        "flag": [True, False, None, True, False, True],
    }
)


MANIFEST = "_streamproc_manifest.json"


def write_files(directory: Path, tables: dict[str, pa.Table], row_group_size: int) -> None:
    for name, table in tables.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path, row_group_size=row_group_size)


def numbers(start: int, stop: int) -> pa.Table:
    return pa.table({"x": pa.array(range(start, stop), pa.int64()), "sq": [i * i for i in range(start, stop)]})


def files_in(directory: Path) -> list[str]:
    """The files of ``directory`` but write_parquet's manifest."""
    return sorted(name for name in os.listdir(directory) if name != MANIFEST)


# -- read_parquet -----------------------------------------------------------------------------


def test_reads_several_files_and_row_groups_in_order(backend_options, tmp_path):
    # Files are read in sorted path order; "b" comes before "c" whatever the creation order.
    write_files(
        tmp_path, {"c.parquet": numbers(20, 25), "a.parquet": numbers(0, 10), "b.parquet": numbers(10, 20)}, row_group_size=3
    )
    stream = sp.read_parquet(tmp_path)
    assert stream.source.files == [str(tmp_path / n) for n in ("a.parquet", "b.parquet", "c.parquet")]
    records = assert_same_as_simple(stream, **backend_options)
    assert records == [{"x": i, "sq": i * i} for i in range(25)]


def test_one_task_per_row_group(tmp_path):
    write_files(tmp_path, {"a.parquet": numbers(0, 10), "b.parquet": numbers(10, 13)}, row_group_size=4)
    source = sp.read_parquet(tmp_path).source
    tasks = list(source.iter_tasks(task_size=1024))  # the task size does not apply: row groups do
    assert [(os.path.basename(task.path), task.row_group) for task in tasks] == [
        ("a.parquet", 0),
        ("a.parquet", 1),
        ("a.parquet", 2),
        ("b.parquet", 0),
    ]
    assert [len(list(source.read_task(task))) for task in tasks] == [4, 4, 2, 3]


def test_nulls_and_nested_values(backend_options, tmp_path):
    pq.write_table(NESTED, tmp_path / "n.parquet", row_group_size=4)
    records = assert_same_as_simple(sp.read_parquet(tmp_path / "n.parquet"), **backend_options)
    assert records == NESTED.to_pylist()
    assert records[2]["tokens"] is None and records[4]["tokens"] == [5, None]
    assert records[2]["meta"] == {"k": None, "v": 3}


def test_column_selection(backend_options, tmp_path):
    pq.write_table(NESTED, tmp_path / "n.parquet")
    records = assert_same_as_simple(sp.read_parquet(tmp_path, columns=["text", "id"]), **backend_options)
    assert records == [{"text": r["text"], "id": r["id"]} for r in NESTED.to_pylist()]
    assert repr(sp.read_parquet(tmp_path, columns=["id"])).startswith("Stream(read_parquet(")


def test_empty_column_selection_keeps_one_record_per_row(backend_options, tmp_path):
    pq.write_table(numbers(0, 5), tmp_path / "a.parquet", row_group_size=2)
    assert assert_same_as_simple(sp.read_parquet(tmp_path, columns=[]), **backend_options) == [{}] * 5


@pytest.mark.parametrize(
    "path_form",
    ["directory", "directory-str", "glob", "recursive-glob", "list", "list-of-dirs", "file"],
)
def test_path_forms(backend_options, tmp_path, monkeypatch, path_form):
    write_files(tmp_path / "data", {"a.parquet": numbers(0, 4), "sub/b.parquet": numbers(4, 8)}, row_group_size=3)
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data"
    path, expected = {
        "directory": (data, range(8)),
        "directory-str": ("data", range(8)),  # relative to the working directory
        "glob": (str(data / "*.parquet"), range(4)),
        "recursive-glob": (str(data / "**" / "*.parquet"), range(8)),
        "list": ([data / "sub" / "b.parquet", "data/a.parquet"], [*range(4, 8), *range(4)]),  # the list's order
        "list-of-dirs": (["data/sub", data], [*range(4, 8), *range(4)]),  # each file once
        "file": (data / "sub" / "b.parquet", range(4, 8)),
    }[path_form]
    stream = sp.read_parquet(path)
    assert all(os.path.isabs(f) for f in stream.source.files)
    records = assert_same_as_simple(stream.map(lambda r: r["x"]), **backend_options)
    assert records == list(expected)


def test_hidden_and_foreign_files_are_skipped(backend_options, tmp_path):
    write_files(
        tmp_path,
        {
            "a.parquet": numbers(0, 3),
            "sub/b.pq": numbers(3, 5),
            "sub/c.parq": numbers(5, 6),
            ".hidden.parquet": numbers(100, 101),
            "_tmp.parquet": numbers(200, 201),
            "_temporary/x.parquet": numbers(300, 301),
            ".cache/y.parquet": numbers(400, 401),
            ".part-00000.parquet.inprogress": numbers(500, 501),
        },
        row_group_size=10,
    )
    (tmp_path / "_SUCCESS").write_bytes(b"")
    for path in (tmp_path, str(tmp_path / "*"), str(tmp_path / "**")):
        records = assert_same_as_simple(sp.read_parquet(path).map(lambda r: r["x"]), **backend_options)
        assert records == list(range(6)), path
    # A directory lists parquet files only; a glob takes whatever non-hidden file it matches.
    (tmp_path / "README.txt").write_text("not parquet")
    assert sp.read_parquet(tmp_path).source.files == sp.read_parquet(str(tmp_path / "**" / "*.p*")).source.files
    assert str(tmp_path / "README.txt") in sp.read_parquet(str(tmp_path / "*")).source.files


def test_missing_paths_fail_when_the_stream_is_built(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "only_text").mkdir()
    (tmp_path / "only_text" / "a.txt").write_text("x")
    for path in (
        tmp_path / "nope.parquet",
        tmp_path / "nope",
        str(tmp_path / "*.parquet"),
        tmp_path / "empty",
        tmp_path / "only_text",
        [],
    ):
        with pytest.raises(FileNotFoundError):
            sp.read_parquet(path)


def test_missing_path_message_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"read_parquet: .*nope\.parquet"):
        sp.read_parquet(tmp_path / "nope.parquet")


def test_unknown_column_fails_when_the_stream_is_built(tmp_path):
    pq.write_table(numbers(0, 3), tmp_path / "a.parquet")
    with pytest.raises(sp.SchemaError, match="'missing'") as info:
        sp.read_parquet(tmp_path, columns=["x", "missing"])
    assert isinstance(info.value, ValueError)
    with pytest.raises(TypeError, match="list of column names"):
        sp.read_parquet(tmp_path, columns="x")


def test_large_row_group_is_streamed_in_slices(tmp_path):
    # One row group of 20,000 rows: read_task yields records before decoding the whole group.
    pq.write_table(numbers(0, 20_000), tmp_path / "a.parquet", row_group_size=20_000)
    source = sp.read_parquet(tmp_path).source
    (task,) = source.iter_tasks(1024)
    records = source.read_task(task)
    assert next(iter(records)) == {"x": 0, "sq": 0}
    assert sum(1 for _ in records) == 19_999


# -- write_parquet -----------------------------------------------------------------------------


def test_write_returns_parts_and_round_trips(backend_options, tmp_path):
    pq.write_table(NESTED, tmp_path / "in.parquet", row_group_size=2)
    paths = sp.read_parquet(tmp_path / "in.parquet").set_processing(**backend_options).write_parquet(tmp_path / "out")
    assert paths == [str(tmp_path / "out" / "part-000000.parquet")]
    assert files_in(tmp_path / "out") == ["part-000000.parquet"]
    assert_outputs(pq.read_table(paths[0]).to_pylist(), NESTED.to_pylist(), backend_options)


def test_rows_per_file_and_row_group_size(backend_options, tmp_path):
    records = [{"x": i, "s": str(i)} for i in range(25)]
    stream = sp.from_iterable(records).set_processing(task_size=6, **backend_options)
    # G = rows_per_file // task_size = 2 tasks (12 records) per part, named by the first task.
    paths = stream.write_parquet(tmp_path / "out", rows_per_file=13, row_group_size=4)
    assert [os.path.basename(p) for p in paths] == ["part-000000.parquet", "part-000002.parquet", "part-000004.parquet"]
    assert files_in(tmp_path / "out") == [os.path.basename(p) for p in paths]
    assert [pq.ParquetFile(p).metadata.num_rows for p in paths] == [12, 12, 1]
    for path in paths:
        metadata = pq.ParquetFile(path).metadata
        assert all(0 < metadata.row_group(i).num_rows <= 4 for i in range(metadata.num_row_groups))
    assert_outputs(sp.read_parquet(tmp_path / "out").to_list(), records, backend_options)


def test_row_groups_are_full_when_chunks_are_small(tmp_path):
    paths = (
        sp.from_iterable([{"x": i} for i in range(10)])
        .set_processing(task_size=1)
        .write_parquet(tmp_path / "out", row_group_size=4)
    )
    metadata = pq.ParquetFile(paths[0]).metadata
    assert [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)] == [4, 4, 2]


def test_existing_non_empty_directory_is_refused_before_running(backend_options, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "part-000000.parquet").write_bytes(b"old")
    source = CountingSource([{"x": 1}])
    with pytest.raises(FileExistsError, match="overwrite=True"):
        sp.from_iterable(source).set_processing(**backend_options).write_parquet(out)
    assert source.pulled == 0
    assert os.listdir(out) == ["part-000000.parquet"]
    assert (out / "part-000000.parquet").read_bytes() == b"old"


def test_existing_empty_directory_is_fine(tmp_path):
    (tmp_path / "out").mkdir()
    assert len(sp.from_iterable([{"x": 1}]).write_parquet(tmp_path / "out")) == 1


def test_output_path_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "out").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        sp.from_iterable([{"x": 1}]).write_parquet(tmp_path / "out", overwrite=True)


def test_overwrite_replaces_previous_parts_and_keeps_other_files(backend_options, tmp_path):
    out = tmp_path / "out"
    sp.from_iterable([{"x": i} for i in range(30)]).set_processing(task_size=10).write_parquet(out, rows_per_file=10)
    (out / "notes.txt").write_text("mine")
    paths = sp.from_iterable([{"x": -1}]).set_processing(**backend_options).write_parquet(out, overwrite=True)
    assert files_in(out) == ["notes.txt", "part-000000.parquet"]  # no stale part-000001/2
    assert paths == [str(out / "part-000000.parquet")]
    assert sp.read_parquet(out).to_list() == [{"x": -1}]


def test_failure_mid_write_leaves_only_complete_parts(backend_options, tmp_path):
    out = tmp_path / "out"
    stream = (
        sp.from_iterable([{"x": i} for i in range(100)])
        .map(fn_raises(at={"x": 57}))
        .set_processing(task_size=5, **backend_options)
    )
    with pytest.raises(UserError):
        stream.write_parquet(out, rows_per_file=20, row_group_size=5)
    names = files_in(out)
    assert not [n for n in names if n.endswith(".inprogress")]
    # 4 tasks of 5 records per part. Parts 0 and 1 (rows 0-39) may be complete before the
    # error (a backend with workers may be past them); the part holding rows 40-59 was in
    # progress and is gone. Nothing half-written stands under a final name.
    assert set(names) <= {"part-000000.parquet", "part-000004.parquet"}
    assert all(pq.ParquetFile(out / name).metadata.num_rows == 20 for name in names)
    if is_deterministic(backend_options) and not reads_ahead(backend_options):
        assert names == ["part-000000.parquet", "part-000004.parquet"]
        assert [r["x"] for r in sp.read_parquet(out).to_list()] == list(range(40))


def test_failure_before_any_part_completes_leaves_nothing(tmp_path):
    with pytest.raises(UserError):
        sp.from_iterable([{"x": i} for i in range(10)]).map(fn_raises(at={"x": 7})).write_parquet(tmp_path / "out")
    assert files_in(tmp_path / "out") == []


def test_source_error_aborts_the_write(tmp_path):
    # An error raised by the source itself (main process) also aborts the write cleanly.
    source = CountingSource([{"x": i} for i in range(10)], fail_after=6)
    with pytest.raises(UserError):
        sp.from_iterable(source).set_processing(task_size=2).write_parquet(tmp_path / "out", row_group_size=2)
    assert files_in(tmp_path / "out") == []


@pytest.mark.parametrize("task_size", [1, 100], ids=["across-chunks", "within-a-chunk"])
@pytest.mark.parametrize(
    "records",
    [
        [{"a": 1, "b": "x"}, {"a": 2, "b": 3}],
        [{"a": 1, "b": "x"}, {"a": 2, "b": [3]}],
        [{"a": 1, "b": 7}, {"a": 2, "b": "7"}],
        [{"a": 1, "b": True}, {"a": 2, "b": 5}],
        [{"a": 1, "b": {"k": 1}}, {"a": 2, "b": "k"}],
    ],
    ids=["str-int", "str-list", "int-str", "bool-int", "struct-str"],
)
def test_inconsistent_types_raise_schema_error_naming_the_field(backend_options, tmp_path, records, task_size):
    stream = sp.from_iterable(records).set_processing(task_size=task_size, **backend_options)
    with pytest.raises(sp.SchemaError, match="field 'b'") as info:
        stream.write_parquet(tmp_path / "out")
    assert isinstance(info.value, ValueError)
    assert not [n for n in files_in(tmp_path / "out") if n.endswith(".inprogress")]


@pytest.mark.parametrize(
    ("records", "stored"),
    [
        ([{"a": 1.5}, {"a": 2}, {"a": None}], [1.5, 2.0, None]),  # int into the float column
        ([{"a": 1}, {"a": 2.0}, {"a": None}], [1, 2, None]),  # a whole float into the int column
    ],
)
def test_compatible_numbers_are_cast_to_the_first_type(tmp_path, records, stored):
    sp.from_iterable(records).set_processing(task_size=1).write_parquet(tmp_path / "out")
    column = pq.read_table(tmp_path / "out").column("a")
    assert column.to_pylist() == stored
    assert [type(v) for v in column.to_pylist()] == [type(v) for v in stored]


def test_lossy_number_cast_is_a_schema_error(tmp_path):
    with pytest.raises(sp.SchemaError, match="field 'a' was int64"):
        sp.from_iterable([{"a": 1}, {"a": 2.5}]).set_processing(task_size=1).write_parquet(tmp_path / "out")


def test_null_first_column_takes_its_later_type_or_the_schema(backend_options, tmp_path):
    records = [{"id": 0, "label": None}, {"id": 1, "label": "spam"}, {"id": 2, "label": None}]
    stream = sp.from_iterable(records).set_processing(task_size=1, **backend_options)
    inferred = stream.write_parquet(tmp_path / "inferred")
    assert pq.read_table(tmp_path / "inferred").schema.field("label").type == pa.string()
    assert_outputs(pq.read_table(inferred[0]).to_pylist(), records, backend_options)
    schema = pa.schema([("id", pa.int64()), ("label", pa.string())])
    paths = stream.write_parquet(tmp_path / "good", schema=schema)
    table = pq.read_table(paths[0])
    assert table.schema == schema
    assert_outputs(table.to_pylist(), records, backend_options)


def test_schema_fixes_types_and_column_order(tmp_path):
    schema = pa.schema([("b", pa.float32()), ("a", pa.int16())])
    sp.from_iterable([{"a": 1, "b": 2}, {"a": 3, "b": None}]).write_parquet(tmp_path / "out", schema=schema)
    table = pq.read_table(tmp_path / "out")
    assert table.schema == schema
    assert table.to_pylist() == [{"b": 2.0, "a": 1}, {"b": None, "a": 3}]


def test_field_added_by_a_later_record_of_a_chunk_is_kept(backend_options, tmp_path):
    records = [{"a": 1}, {"a": 2, "b": "x"}, {"b": "y", "a": 3}]
    sp.from_iterable(records).set_processing(**backend_options).write_parquet(tmp_path / "out")
    assert pq.read_table(tmp_path / "out").to_pylist() == [{"a": 1, "b": None}, {"a": 2, "b": "x"}, {"a": 3, "b": "y"}]


def test_field_added_after_the_first_chunk_is_added(tmp_path):
    stream = sp.from_iterable([{"a": 1}, {"a": 2, "b": "x"}]).set_processing(task_size=1)
    stream.write_parquet(tmp_path / "out")
    assert pq.read_table(tmp_path / "out").to_pylist() == [{"a": 1, "b": None}, {"a": 2, "b": "x"}]


def test_field_missing_from_later_records_is_null(tmp_path):
    sp.from_iterable([{"a": 1, "b": "x"}, {"a": 2}]).set_processing(task_size=1).write_parquet(tmp_path / "out")
    assert pq.read_table(tmp_path / "out").to_pylist() == [{"a": 1, "b": "x"}, {"a": 2, "b": None}]


def test_non_dict_records_raise_schema_error(backend_options, tmp_path):
    for records in ([1, 2], [{"a": 1}, "ab"]):
        with pytest.raises(sp.SchemaError, match="dict records"):
            sp.from_iterable(records).set_processing(**backend_options).write_parquet(tmp_path / "out", overwrite=True)


def test_empty_stream_writes_no_part(tmp_path):
    assert sp.from_iterable([]).write_parquet(tmp_path / "out") == []
    assert files_in(tmp_path / "out") == []


def test_invalid_writer_sizes(tmp_path):
    for kwargs in ({"rows_per_file": 0}, {"row_group_size": -1}):
        with pytest.raises(ValueError, match=next(iter(kwargs)).replace("_size", "")):
            sp.from_iterable([{"a": 1}]).write_parquet(tmp_path / "out", **kwargs)


def test_map_output_written_and_read_back_through_every_backend(backend_options, tmp_path):
    write_files(tmp_path / "in", {"a.parquet": numbers(0, 50), "b.parquet": numbers(50, 75)}, row_group_size=7)
    stream = sp.read_parquet(tmp_path / "in").map(lambda r: {**r, "half": r["x"] / 2}).filter(lambda r: r["x"] % 4)
    stream.set_processing(**backend_options).write_parquet(tmp_path / "out", rows_per_file=20, row_group_size=6)
    expected = [{"x": i, "sq": i * i, "half": i / 2} for i in range(75) if i % 4]
    assert_outputs(sp.read_parquet(tmp_path / "out").to_list(), expected, backend_options)
    assert_same_as_simple(sp.read_parquet(tmp_path / "out").map(identity), **backend_options)


# -- fsspec filesystems ------------------------------------------------------------------------


fsspec = pytest.importorskip("fsspec")


def test_fsspec_local_filesystem(backend_options, tmp_path):
    write_files(tmp_path, {"a.parquet": numbers(0, 5), "_SUCCESS.parquet": numbers(9, 10)}, row_group_size=2)
    stream = sp.read_parquet(str(tmp_path), filesystem=fsspec.filesystem("file"))
    assert assert_same_as_simple(stream.map(lambda r: r["x"]), **backend_options) == list(range(5))


@pytest.mark.parametrize("config", in_process_configs(), ids=config_id)
def test_fsspec_memory_filesystem(tmp_path, config):
    # Backends that run user code in this process only: the memory filesystem lives in this
    # process's memory, which a worker process started with spawn does not share.
    fs = fsspec.filesystem("memory")
    root = f"/streamproc-test-{os.getpid()}-{tmp_path.name}"
    try:
        fs.mkdir(root)
        for name, table in {"a.parquet": numbers(0, 3), "sub/b.parquet": numbers(3, 6), ".x.parquet": numbers(9, 10)}.items():
            with fs.open(f"{root}/{name}", "wb") as f:
                pq.write_table(table, f, row_group_size=2)
        stream = sp.read_parquet(root, columns=["x"], filesystem=fs).set_processing(**config)
        assert [os.path.basename(f) for f in stream.source.files] == ["a.parquet", "b.parquet"]
        assert stream.to_list() == [{"x": i} for i in range(6)]
        with pytest.raises(FileNotFoundError):
            sp.read_parquet(f"{root}/nope.parquet", filesystem=fs)
    finally:
        fs.rm(root, recursive=True)


def test_bad_filesystem_argument(tmp_path):
    pq.write_table(numbers(0, 1), tmp_path / "a.parquet")
    with pytest.raises(TypeError, match="filesystem"):
        sp.read_parquet(tmp_path, filesystem="local")


def test_errors_while_reading_are_reported(backend_options, tmp_path):
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not a parquet file")
    with pytest.raises(Exception, match=r"(?i)parquet"):
        sp.read_parquet(tmp_path).set_processing(**backend_options).to_list()
