"""from_arrow (Table, RecordBatch, pyarrow.dataset) and to_arrow, on every backend against simple."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

import streamproc as sp
from tests.hang_guard import run_guarded
from tests.utils import assert_same_as_simple, double

RUN_TIMEOUT_S = 120

TABLE = pa.table(
    {
        "id": list(range(23)),
        "text": [f"t{i}" if i % 5 else None for i in range(23)],
        "tags": [[str(i)] * (i % 3) for i in range(23)],
        "score": [i / 7 for i in range(23)],
    }
)


def guarded(fn):
    return run_guarded(fn, timeout_s=RUN_TIMEOUT_S, what="an arrow run")


def add_len(record):
    return {**record, "n": len(record["tags"])}


@pytest.mark.parametrize("task_size", [1, 5, 100])
def test_from_table_matches_simple_and_the_table(backend_options, task_size):
    stream = sp.from_arrow(TABLE).map(add_len).set_processing(task_size=task_size)
    out = guarded(lambda: assert_same_as_simple(stream, **backend_options))
    assert out == [{**r, "n": len(r["tags"])} for r in TABLE.to_pylist()]


def test_from_record_batch_and_chunked_table(backend_options):
    batch = TABLE.to_batches()[0]
    chunked = pa.concat_tables([TABLE.slice(0, 4), TABLE.slice(4, 10), TABLE.slice(14)])
    assert chunked.column(0).num_chunks == 3
    for data in (batch, chunked):
        stream = sp.from_arrow(data).set_processing(task_size=6)
        assert guarded(lambda stream=stream: assert_same_as_simple(stream, **backend_options)) == TABLE.to_pylist()


def test_from_parquet_dataset_by_fragment_and_row_group(backend_options, tmp_path):
    pq.write_table(TABLE.slice(0, 10), tmp_path / "a.parquet", row_group_size=3)
    pq.write_table(TABLE.slice(10), tmp_path / "b.parquet", row_group_size=100)
    dataset = pads.dataset(tmp_path, format="parquet")
    source = sp.from_arrow(dataset).source
    assert list(source.iter_tasks(1000)) == [(0, 0), (0, 1), (0, 2), (0, 3), (1, None)]
    stream = sp.from_arrow(dataset, columns=["id", "text"])
    expected = TABLE.select(["id", "text"]).to_pylist()
    assert guarded(lambda: assert_same_as_simple(stream, **backend_options)) == expected


def test_from_in_memory_dataset(backend_options):
    stream = sp.from_arrow(pads.dataset(TABLE)).set_processing(task_size=4)
    assert guarded(lambda: assert_same_as_simple(stream, **backend_options)) == TABLE.to_pylist()


def test_columns_select_and_unknown_column_raises_now():
    assert sp.from_arrow(TABLE, columns=["score", "id"]).to_list()[0] == {"score": 0.0, "id": 0}
    with pytest.raises(sp.SchemaError, match=r"unknown column\(s\) \['nope'\]"):
        sp.from_arrow(TABLE, columns=["id", "nope"])
    with pytest.raises(TypeError, match="columns must be a list"):
        sp.from_arrow(TABLE, columns="id")


@pytest.mark.parametrize("bad", [[{"a": 1}], {"a": [1]}, "table", None])
def test_from_arrow_rejects_other_types(bad):
    with pytest.raises(TypeError, match=r"from_arrow\(\) needs a pyarrow.Table"):
        sp.from_arrow(bad)


def test_to_arrow_round_trip(backend_options):
    stream = sp.from_arrow(TABLE).set_processing(task_size=5, **backend_options)
    table = guarded(stream.to_arrow)
    assert table.equals(TABLE)


def test_to_arrow_matches_to_list(backend_options):
    stream = sp.from_iterable(range(40)).map(lambda x: {"x": x, "y": double(x)}).set_processing(task_size=7, **backend_options)
    table = guarded(stream.to_arrow)
    assert table.to_pylist() == stream.set_processing(backend="simple").to_list()


def test_to_arrow_unifies_a_column_that_is_null_in_one_chunk(backend_options):
    records = [{"a": None}, {"a": None}, {"a": 1}, {"a": 2}]
    table = guarded(sp.from_iterable(records).set_processing(task_size=2, **backend_options).to_arrow)
    assert table.schema.field("a").type == pa.int64()
    assert table.column("a").to_pylist() == [None, None, 1, 2]


def test_to_arrow_with_schema_and_empty_stream():
    schema = pa.schema([("a", pa.float32())])
    table = sp.from_iterable([{"a": 1}]).to_arrow(schema=schema)
    assert table.schema == schema and table.column("a").to_pylist() == [1.0]
    assert sp.from_iterable([]).to_arrow(schema=schema).schema == schema
    assert sp.from_iterable([]).to_arrow().num_rows == 0


def test_to_arrow_errors_name_the_problem(backend_options):
    with pytest.raises(sp.SchemaError, match=r"to_arrow\(\) needs dict records, got int"):
        guarded(sp.from_iterable([1, 2]).set_processing(**backend_options).to_arrow)
    records = [{"a": 1}, {"a": "x"}]
    with pytest.raises(sp.SchemaError, match="to_arrow"):
        guarded(sp.from_iterable(records).set_processing(task_size=1, **backend_options).to_arrow)


def test_dataset_under_forkserver(tmp_path):
    pq.write_table(TABLE, tmp_path / "a.parquet", row_group_size=4)
    stream = sp.from_arrow(pads.dataset(tmp_path / "a.parquet"), columns=["id", "score"])
    options = {"backend": "multiprocessing", "num_cpu_workers": 2, "process_start_method": "forkserver"}
    assert guarded(lambda: assert_same_as_simple(stream, **options)) == TABLE.select(["id", "score"]).to_pylist()
