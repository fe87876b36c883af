"""read_jsonl and write_jsonl: round trips, gzip, malformed lines, atomic writes."""

from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pytest

import streamproc as sp
from tests.utils import CountingSource, UserError, assert_same_as_simple, config_id, fn_raises, in_process_configs

RECORDS = [
    {"id": 0, "text": "héllo", "tags": ["a", "b"], "score": 0.5, "meta": {"k": None}},
    {"id": 1, "text": "", "tags": [], "score": None, "meta": {}},
    {"id": 2, "text": 'line\nbreak "quoted"', "tags": ["c"], "score": -1e-3, "meta": {"k": [1, 2]}},
]


@pytest.mark.parametrize("name", ["out.jsonl", "out.jsonl.gz", "out.ndjson", "out.json"])
def test_round_trip(backend_options, tmp_path, name):
    path = sp.from_iterable(RECORDS).set_processing(**backend_options).write_jsonl(tmp_path / name)
    assert path == str(tmp_path / name)
    assert sorted(os.listdir(tmp_path)) == [name]
    assert assert_same_as_simple(sp.read_jsonl(path), **backend_options) == RECORDS


def test_written_file_is_one_json_value_per_line(tmp_path):
    sp.from_iterable([*RECORDS, 3, "x", [1]]).write_jsonl(tmp_path / "a.jsonl")
    lines = (tmp_path / "a.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [*RECORDS, 3, "x", [1]]
    assert "héllo" in lines[0]  # not escaped to \\u00e9


def test_gz_output_is_gzipped(tmp_path):
    sp.from_iterable(RECORDS).write_jsonl(tmp_path / "a.jsonl.gz")
    with gzip.open(tmp_path / "a.jsonl.gz", "rt", encoding="utf-8") as f:
        assert [json.loads(line) for line in f] == RECORDS


def test_reads_gzipped_input_written_by_others(backend_options, tmp_path):
    with gzip.open(tmp_path / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write('{"a": 1}\n{"a": 2}\n')
    assert assert_same_as_simple(sp.read_jsonl(tmp_path / "a.jsonl.gz"), **backend_options) == [{"a": 1}, {"a": 2}]


def test_blank_lines_are_skipped(backend_options, tmp_path):
    (tmp_path / "a.jsonl").write_text('\n{"a": 1}\n   \n\n{"a": 2}\n\t\n{"a": 3}', encoding="utf-8")
    stream = sp.read_jsonl(tmp_path / "a.jsonl").set_processing(task_size=2)
    assert assert_same_as_simple(stream, **backend_options) == [{"a": 1}, {"a": 2}, {"a": 3}]


def test_any_json_value_is_a_record(backend_options, tmp_path):
    (tmp_path / "a.jsonl").write_text('1\n"two"\n[3]\nnull\ntrue\n', encoding="utf-8")
    assert assert_same_as_simple(sp.read_jsonl(tmp_path / "a.jsonl"), **backend_options) == [1, "two", [3], None, True]


@pytest.mark.parametrize("task_size", [1, 2, 1000])
def test_malformed_line_names_file_and_line(backend_options, tmp_path, task_size):
    # Line numbers count every line of the file, blank ones included, across tasks.
    (tmp_path / "a.jsonl").write_text('{"a": 1}\n\n{"a": 2}\n{"a": 3}\n{"a": oops}\n{"a": 5}\n', encoding="utf-8")
    stream = sp.read_jsonl(tmp_path / "a.jsonl").set_processing(task_size=task_size, **backend_options)
    with pytest.raises(ValueError, match=r"a\.jsonl, line 5") as info:
        stream.to_list()
    assert str(tmp_path / "a.jsonl") in str(info.value)


def test_malformed_line_in_second_file(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"a": 1}\n', encoding="utf-8")
    (tmp_path / "b.jsonl").write_text('{"a": 2}\n{"a": 3\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"b\.jsonl, line 2"):
        sp.read_jsonl(tmp_path).to_list()


def test_directory_glob_and_list(backend_options, tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.jsonl").write_text('{"x": 1}\n', encoding="utf-8")
    (tmp_path / "sub" / "b.ndjson").write_text('{"x": 2}\n', encoding="utf-8")
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as f:
        f.write('{"x": 3}\n')
    (tmp_path / "_SUCCESS").write_text("")
    (tmp_path / ".hidden.jsonl").write_text('{"x": 99}\n')
    (tmp_path / "notes.txt").write_text("not json")
    expected = [{"x": 1}, {"x": 3}, {"x": 2}]  # sorted paths: a.jsonl, c.jsonl.gz, sub/b.ndjson
    assert assert_same_as_simple(sp.read_jsonl(tmp_path), **backend_options) == expected
    assert sp.read_jsonl(str(tmp_path / "*.jsonl*")).to_list() == [{"x": 1}, {"x": 3}]
    assert sp.read_jsonl([tmp_path / "sub" / "b.ndjson", tmp_path / "a.jsonl"]).to_list() == [{"x": 2}, {"x": 1}]


def test_missing_path_fails_when_the_stream_is_built(tmp_path):
    with pytest.raises(FileNotFoundError, match="read_jsonl"):
        sp.read_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError):
        sp.read_jsonl(tmp_path)  # no .jsonl file in it


def test_lines_are_read_lazily_task_by_task(tmp_path):
    (tmp_path / "a.jsonl").write_text("".join(f'{{"i": {i}}}\n' for i in range(100)), encoding="utf-8")
    source = sp.read_jsonl(tmp_path / "a.jsonl").source
    tasks = source.iter_tasks(30)
    path, first_line, lines = next(tasks)
    assert (path, first_line, len(lines)) == (str(tmp_path / "a.jsonl"), 1, 30)
    assert [(t[1], len(t[2])) for t in tasks] == [(31, 30), (61, 30), (91, 10)]


def test_write_refuses_an_existing_file_unless_overwrite(backend_options, tmp_path):
    target = tmp_path / "a.jsonl"
    target.write_text("old\n")
    source = CountingSource(RECORDS)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        sp.from_iterable(source).set_processing(**backend_options).write_jsonl(target)
    assert source.pulled == 0
    assert target.read_text() == "old\n"
    sp.from_iterable(source).set_processing(**backend_options).write_jsonl(target, overwrite=True)
    assert sp.read_jsonl(target).to_list() == RECORDS


def test_write_refuses_a_directory(tmp_path):
    with pytest.raises(FileExistsError, match="directory"):
        sp.from_iterable(RECORDS).write_jsonl(tmp_path)


def test_write_creates_parent_directories(tmp_path):
    path = sp.from_iterable([{"a": 1}]).write_jsonl(tmp_path / "x" / "y" / "a.jsonl")
    assert sp.read_jsonl(path).to_list() == [{"a": 1}]


@pytest.mark.parametrize("name", ["a.jsonl", "a.jsonl.gz"])
def test_failed_write_leaves_no_file(backend_options, tmp_path, name):
    stream = (
        sp.from_iterable(range(100)).map(fn_raises(at=60)).map(lambda i: {"i": i}).set_processing(task_size=10, **backend_options)
    )
    with pytest.raises(UserError):
        stream.write_jsonl(tmp_path / name)
    assert os.listdir(tmp_path) == []


def test_failed_overwrite_keeps_the_old_file(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"old": true}\n')
    with pytest.raises(UserError):
        sp.from_iterable(range(10)).map(fn_raises(at=3)).write_jsonl(tmp_path / "a.jsonl", overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["a.jsonl"]
    assert sp.read_jsonl(tmp_path / "a.jsonl").to_list() == [{"old": True}]


def test_numpy_values_and_sets_are_written_as_lists(tmp_path):
    records = [{"v": np.array([1.5, 2.0]), "n": np.int64(3), "s": {7}}]
    sp.from_iterable(records).write_jsonl(tmp_path / "a.jsonl")
    assert sp.read_jsonl(tmp_path / "a.jsonl").to_list() == [{"v": [1.5, 2.0], "n": 3, "s": [7]}]


def test_unserializable_value_names_its_type(tmp_path):
    with pytest.raises(TypeError, match="object is not JSON serializable"):
        sp.from_iterable([{"v": object()}]).write_jsonl(tmp_path / "a.jsonl")
    assert os.listdir(tmp_path) == []


fsspec = pytest.importorskip("fsspec")


@pytest.mark.parametrize("config", in_process_configs(), ids=config_id)
def test_fsspec_memory_filesystem(tmp_path, config):
    # Backends that run user code in this process only: the memory filesystem lives in this
    # process's memory, which a worker process started with spawn does not share.
    fs = fsspec.filesystem("memory")
    root = f"/streamproc-jsonl-{os.getpid()}-{tmp_path.name}"
    try:
        fs.mkdir(root)
        with fs.open(f"{root}/a.jsonl", "wb") as f:
            f.write(b'{"a": 1}\n\n{"a": 2}\n')
        with fs.open(f"{root}/b.jsonl.gz", "wb") as f:
            f.write(gzip.compress(b'{"a": 3}\n'))
        stream = sp.read_jsonl(root, filesystem=fs).set_processing(**config)
        assert stream.to_list() == [{"a": 1}, {"a": 2}, {"a": 3}]
    finally:
        fs.rm(root, recursive=True)


def test_fsspec_local_filesystem(backend_options, tmp_path):
    (tmp_path / "a.jsonl").write_text('{"a": 1}\n{"a": 2}\n')
    stream = sp.read_jsonl(str(tmp_path), filesystem=fsspec.filesystem("file"))
    assert assert_same_as_simple(stream, **backend_options) == [{"a": 1}, {"a": 2}]
