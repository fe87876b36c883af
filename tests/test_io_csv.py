"""read_csv: one task per file, or byte-range tasks with newlines_in_values=False, on every
backend against simple; options; errors that name the file or the column."""

from __future__ import annotations

import gzip

import pyarrow as pa
import pyarrow.csv as pacsv
import pytest

import streamproc as sp
from tests.hang_guard import run_guarded
from tests.utils import assert_same_as_simple

RUN_TIMEOUT_S = 120
ROWS = [{"id": i, "text": f"row {i}", "score": i / 4} for i in range(57)]


def guarded(fn):
    return run_guarded(fn, timeout_s=RUN_TIMEOUT_S, what="a csv run")


def write_csv(path, rows=ROWS, header=True, sep=",", trailing_newline=True):
    lines = [sep.join(rows[0])] if header else []
    lines += [sep.join(str(v) for v in row.values()) for row in rows]
    text = "\n".join(lines) + ("\n" if trailing_newline else "")
    path.write_text(text, encoding="utf-8")
    return path


def test_empty_files_have_no_records_and_header_only_files_none_either(backend_options, tmp_path):
    (tmp_path / "a.csv").write_text("", encoding="utf-8")
    (tmp_path / "b.csv").write_text("id,text,score\n", encoding="utf-8")
    write_csv(tmp_path / "c.csv", ROWS[:3])
    for newlines_in_values in (True, False):
        stream = sp.read_csv(tmp_path, newlines_in_values=newlines_in_values, block_size=5)
        assert guarded(lambda stream=stream: assert_same_as_simple(stream, **backend_options)) == ROWS[:3]


def test_large_blocks_come_in_bounded_chunks(tmp_path):
    rows = [{"id": i, "text": "x", "score": 0.5} for i in range(20_000)]
    path = write_csv(tmp_path / "a.csv", rows)
    chunks = list(sp.read_csv(path).source.read_task_chunks((str(path), None, None), 100))
    assert max(len(chunk) for chunk in chunks) <= 8192 and sum(map(len, chunks)) == 20_000


@pytest.mark.parametrize("newlines_in_values", [True, False])
def test_under_forkserver(tmp_path, newlines_in_values):
    # The source travels to fresh interpreters: pyarrow's CSV options must survive pickling.
    path = write_csv(tmp_path / "a.csv")
    stream = sp.read_csv(
        path, delimiter=",", column_types={"id": pa.int32()}, newlines_in_values=newlines_in_values, block_size=64
    )
    options = {"backend": "multiprocessing", "num_cpu_workers": 2, "process_start_method": "forkserver"}
    assert guarded(lambda: assert_same_as_simple(stream, **options)) == ROWS


def test_one_file_matches_simple(backend_options, tmp_path):
    path = write_csv(tmp_path / "a.csv")
    assert guarded(lambda: assert_same_as_simple(sp.read_csv(path), **backend_options)) == ROWS
    assert list(sp.read_csv(path).source.iter_tasks(10)) == [(str(path), None, None)]


@pytest.mark.parametrize("block_size", [1, 13, 100, 10**6])
@pytest.mark.parametrize("trailing_newline", [True, False])
def test_byte_ranges_give_the_same_records_as_whole_files(backend_options, tmp_path, block_size, trailing_newline):
    path = write_csv(tmp_path / "a.csv", trailing_newline=trailing_newline)
    stream = sp.read_csv(path, newlines_in_values=False, block_size=block_size, column_types={"score": pa.float64()})
    assert len(list(stream.source.iter_tasks(10))) == -(-path.stat().st_size // block_size)
    assert guarded(lambda: assert_same_as_simple(stream, **backend_options)) == ROWS


def test_byte_ranges_without_header(backend_options, tmp_path):
    path = write_csv(tmp_path / "a.csv", header=False)
    stream = sp.read_csv(path, column_names=["id", "text", "score"], newlines_in_values=False, block_size=40)
    assert guarded(lambda: assert_same_as_simple(stream, **backend_options)) == ROWS


def test_quoted_newlines_in_values(backend_options, tmp_path):
    path = tmp_path / "a.csv"
    path.write_text('id,text\n1,"two\nlines"\n2,"a ""quote"", here"\n3,plain\n', encoding="utf-8")
    expected = [{"id": 1, "text": "two\nlines"}, {"id": 2, "text": 'a "quote", here'}, {"id": 3, "text": "plain"}]
    assert guarded(lambda: assert_same_as_simple(sp.read_csv(path), **backend_options)) == expected


def test_directory_glob_list_and_gzip(backend_options, tmp_path):
    (tmp_path / "sub").mkdir()
    write_csv(tmp_path / "a.csv", ROWS[:10])
    write_csv(tmp_path / "sub" / "b.csv", ROWS[10:20])
    with gzip.open(tmp_path / "c.csv.gz", "wt", encoding="utf-8") as f:
        f.write("id,text,score\n" + "".join(f"{r['id']},{r['text']},{r['score']}\n" for r in ROWS[20:]))
    (tmp_path / "_SUCCESS").write_text("")
    stream = sp.read_csv(tmp_path, newlines_in_values=False, block_size=64)  # the .gz file stays one task
    assert (
        guarded(lambda: assert_same_as_simple(stream, **backend_options)) == ROWS[:10] + ROWS[20:] + ROWS[10:20]
    )  # sorted paths: a, c.gz, sub/b
    assert sp.read_csv(str(tmp_path / "*.csv")).to_list() == ROWS[:10]
    assert sp.read_csv([tmp_path / "sub" / "b.csv", tmp_path / "a.csv"]).to_list() == ROWS[10:20] + ROWS[:10]


def test_delimiter_quote_char_and_column_types(tmp_path):
    path = write_csv(tmp_path / "a.tsv", ROWS[:3], sep="\t")
    out = sp.read_csv(path, delimiter="\t", column_types={"id": pa.string()}).to_list()
    assert out[1] == {"id": "1", "text": "row 1", "score": 0.25}
    path = tmp_path / "q.csv"
    path.write_text("a,b\n'x,y',2\n", encoding="utf-8")
    assert sp.read_csv(path, quote_char="'").to_list() == [{"a": "x,y", "b": 2}]
    assert sp.read_csv(path, quote_char=False).source.parse_options.quote_char is False


def test_pyarrow_options_pass_through_and_are_copied(tmp_path):
    path = write_csv(tmp_path / "a.csv", ROWS[:3], sep=";")
    parse = pacsv.ParseOptions(delimiter=";")
    convert = pacsv.ConvertOptions(column_types={"id": pa.float64()})
    assert sp.read_csv(path, parse_options=parse, convert_options=convert).to_list()[2]["id"] == 2.0
    assert parse.newlines_in_values is False and convert.include_columns == []  # the caller's objects are unchanged
    with pytest.raises(TypeError, match=r"parse_options must be a pyarrow\.csv\.ParseOptions"):
        sp.read_csv(path, parse_options={"delimiter": ";"})


def test_columns_select_and_unknown_column_raises_now(backend_options, tmp_path):
    path = write_csv(tmp_path / "a.csv")
    stream = sp.read_csv(path, columns=["score", "id"], newlines_in_values=False, block_size=200)
    assert guarded(lambda: assert_same_as_simple(stream, **backend_options)) == [
        {"score": r["score"], "id": r["id"]} for r in ROWS
    ]
    with pytest.raises(sp.SchemaError, match=r"unknown column\(s\) \['nope'\] in .*a\.csv"):
        sp.read_csv(path, columns=["id", "nope"])


def test_missing_file_raises_now(tmp_path):
    with pytest.raises(FileNotFoundError, match="read_csv: no such file"):
        sp.read_csv(tmp_path / "missing.csv")
    with pytest.raises(FileNotFoundError, match="read_csv: no file matches"):
        sp.read_csv(str(tmp_path / "*.csv"))


@pytest.mark.parametrize("newlines_in_values", [True, False])
def test_malformed_row_names_the_file(backend_options, tmp_path, newlines_in_values):
    write_csv(tmp_path / "a.csv", ROWS[:5])
    bad = tmp_path / "b.csv"
    bad.write_text("id,text,score\n1,x,0.5\n2,y\n", encoding="utf-8")
    stream = sp.read_csv(tmp_path, newlines_in_values=newlines_in_values, block_size=16).set_processing(**backend_options)
    with pytest.raises(ValueError, match=r"read_csv: cannot read .*b\.csv.*Expected 3 columns, got 2"):
        guarded(stream.to_list)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"delimiter": ",,"}, ValueError, "delimiter must be one character"),
        ({"quote_char": "ab"}, ValueError, "quote_char must be one character"),
        ({"block_size": 0}, ValueError, "block_size must be a positive int"),
        ({"newlines_in_values": "no"}, TypeError, "newlines_in_values must be True or False"),
        ({"column_types": ["int"]}, TypeError, "column_types must be a dict"),
        ({"columns": "id"}, TypeError, "columns must be a list"),
        ({"newlines_in_values": False, "read_options": pacsv.ReadOptions(skip_rows=1)}, ValueError, "skip_rows"),
    ],
)
def test_bad_arguments_raise_naming_them(tmp_path, kwargs, exc, match):
    path = write_csv(tmp_path / "a.csv", ROWS[:2])
    with pytest.raises(exc, match=match):
        sp.read_csv(path, **kwargs)
