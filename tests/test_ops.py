"""Every CPU op and every batch-size form, end to end, under every backend configuration.

Each test checks the exact output (under the configuration at hand) and that it is identical to
the simple backend's output. Batch composition is made visible in the output itself
(``batch_as_record`` turns each batch into one record), so it is checked in every backend, not
only where a callback could record it in this process.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import streamproc as sp
from streamproc.batching import BatchSize
from tests.utils import add, assert_outputs, assert_same_as_simple, batch_as_record, double, identity, is_odd


def _lengths(batches: list[list]) -> list[int]:
    return [len(batch) for batch in batches]


def text_length(record: dict) -> int:
    return len(record["text"])


# -- map / filter / flatten --------------------------------------------------------------------


def test_map(backend_options):
    stream = sp.from_iterable(range(10)).map(double)
    assert assert_same_as_simple(stream, **backend_options) == [2 * i for i in range(10)]


def test_map_with_kwargs(backend_options):
    stream = sp.from_iterable(range(5)).map(add, kwargs={"k": 10}).map(pow, kwargs={"exp": 2})
    assert assert_same_as_simple(stream, **backend_options) == [(i + 10) ** 2 for i in range(5)]


def test_map_on_dict_records_and_lambdas(backend_options):
    stream = sp.from_iterable([{"text": " A "}, {"text": "b"}]).map(lambda r: {**r, "text": r["text"].strip().lower()})
    assert assert_same_as_simple(stream, **backend_options) == [{"text": "a"}, {"text": "b"}]


def test_filter(backend_options):
    stream = sp.from_iterable(range(10)).filter(is_odd)
    assert assert_same_as_simple(stream, **backend_options) == [1, 3, 5, 7, 9]


def test_filter_uses_truthiness_and_can_drop_everything(backend_options):
    assert assert_same_as_simple(sp.from_iterable(["a", "", None, "b", 0]).filter(lambda x: x), **backend_options) == ["a", "b"]
    assert assert_same_as_simple(sp.from_iterable(range(50)).filter(lambda x: False), **backend_options) == []


def test_flatten(backend_options):
    stream = sp.from_iterable([[1, 2], [], (3,), range(4, 6)]).flatten()
    assert assert_same_as_simple(stream, **backend_options) == [1, 2, 3, 4, 5]


def test_flatten_after_map_across_tasks(backend_options):
    stream = sp.from_iterable(range(7)).map(lambda x: [x] * (x % 3)).flatten().set_processing(task_size=2)
    assert assert_same_as_simple(stream, **backend_options) == [1, 2, 2, 4, 5, 5]


def test_empty_source(backend_options):
    stream = sp.from_iterable([]).map(double).map_batches(batch_as_record, batch_size=2)
    assert assert_same_as_simple(stream, **backend_options) == []


def test_chained_ops_keep_order_across_many_tasks(backend_options):
    stream = (
        sp.from_iterable(range(5000))
        .map(double)
        .filter(lambda x: x % 3 != 0)
        .map_batches(lambda batch: [sum(batch)], batch_size=10)
        .set_processing(task_size=100)
    )
    expected = []
    for start in range(0, 5000, 100):  # each task holds 100 source records
        kept = [2 * i for i in range(start, start + 100) if (2 * i) % 3 != 0]
        expected += [sum(kept[j : j + 10]) for j in range(0, len(kept), 10)]
    assert assert_same_as_simple(stream, **backend_options) == expected


# -- map_batches ---------------------------------------------------------------------------------


def test_map_batches_output_longer_than_input(backend_options):
    stream = sp.from_iterable(range(5)).map_batches(lambda batch: [x for x in batch for _ in range(3)], batch_size=2)
    assert assert_same_as_simple(stream, **backend_options) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]


def test_map_batches_output_shorter_than_input(backend_options):
    stream = sp.from_iterable(range(7)).map_batches(lambda batch: [sum(batch)], batch_size=3)
    assert assert_same_as_simple(stream, **backend_options) == [3, 12, 6]


def test_map_batches_may_return_a_generator_or_nothing(backend_options):
    gen = sp.from_iterable(range(6)).map_batches(lambda batch: (x + 1 for x in reversed(batch)), batch_size=4)
    assert assert_same_as_simple(gen, **backend_options) == [4, 3, 2, 1, 6, 5]
    drop = sp.from_iterable(range(6)).map_batches(lambda batch: [], batch_size=4)
    assert assert_same_as_simple(drop, **backend_options) == []


@pytest.mark.parametrize("batch_size", [3, "3", "3 records", " 3  RECORDS ", "3 record", BatchSize(3)])
def test_record_batch_size_forms(backend_options, batch_size):
    stream = sp.from_iterable(range(8)).map_batches(batch_as_record, batch_size=batch_size)
    assert assert_same_as_simple(stream, **backend_options) == [[0, 1, 2], [3, 4, 5], [6, 7]]


TEXTS = ["aa", "bbb", "c", "dddd", "ee", "f", "ggggggggg", "h"]  # lengths 2 3 1 4 2 1 9 1


@pytest.mark.parametrize("batch_by", ["text", text_length, "n"], ids=["field-len", "callable", "field-int"])
def test_tokens_batch_size(backend_options, batch_by):
    records = [{"text": t, "n": len(t)} for t in TEXTS]
    stream = sp.from_iterable(records).map_batches(batch_as_record, batch_size="6 tokens", batch_by=batch_by)
    batches = assert_same_as_simple(stream, **backend_options)
    # Greedy: a batch takes records while the sum of sizes stays <= 6; the 9-token record,
    # larger than the budget on its own, forms a batch alone.
    assert [[r["text"] for r in b] for b in batches] == [["aa", "bbb", "c"], ["dddd", "ee"], ["f"], ["ggggggggg"], ["h"]]


@pytest.mark.parametrize("batch_by", ["text", text_length], ids=["field", "callable"])
def test_padded_tokens_batch_size(backend_options, batch_by):
    records = [{"text": t} for t in TEXTS]
    stream = sp.from_iterable(records).map_batches(batch_as_record, batch_size="8 padded_tokens", batch_by=batch_by)
    batches = assert_same_as_simple(stream, **backend_options)
    # Longest size x count <= 8: [aa, bbb] is 3x2 (adding c: 3x3 = 9); [c, dddd] is 4x2;
    # [ee, f] is 2x2 (adding the 9: 9x3); the 9 alone exceeds the budget but forms a batch.
    assert [[r["text"] for r in b] for b in batches] == [["aa", "bbb"], ["c", "dddd"], ["ee", "f"], ["ggggggggg"], ["h"]]


def test_tokens_batch_size_on_plain_strings_uses_len(backend_options):
    stream = sp.from_iterable(TEXTS).map_batches(batch_as_record, batch_size="6 tokens")
    assert assert_same_as_simple(stream, **backend_options) == [["aa", "bbb", "c"], ["dddd", "ee"], ["f"], ["ggggggggg"], ["h"]]


def test_set_processing_batch_size_is_the_default(backend_options):
    stream = sp.from_iterable(range(7)).map_batches(batch_as_record).set_processing(batch_size=3)
    assert assert_same_as_simple(stream, **backend_options) == [[0, 1, 2], [3, 4, 5], [6]]


def test_set_processing_tokens_default_with_batch_by(backend_options):
    records = [{"text": t} for t in TEXTS]
    stream = sp.from_iterable(records).map_batches(batch_as_record).set_processing(batch_size="6 tokens", batch_by="text")
    batches = assert_same_as_simple(stream, **backend_options)
    assert _lengths(batches) == [3, 2, 1, 1, 1]


def test_stage_batch_size_wins_over_the_default(backend_options):
    stream = sp.from_iterable(range(6)).map_batches(batch_as_record, batch_size=4).set_processing(batch_size=2)
    assert assert_same_as_simple(stream, **backend_options) == [[0, 1, 2, 3], [4, 5]]


def test_stage_token_size_measured_with_the_default_batch_by(backend_options):
    # The stage names its budget but not how to measure a record: set_processing's batch_by.
    records = [{"text": t} for t in TEXTS]
    stream = sp.from_iterable(records).map_batches(batch_as_record, batch_size="6 tokens").set_processing(batch_by="text")
    assert _lengths(assert_same_as_simple(stream, **backend_options)) == [3, 2, 1, 1, 1]


def test_default_batch_size_is_128_records(backend_options):
    stream = sp.from_iterable(range(300)).map_batches(batch_as_record)
    assert _lengths(assert_same_as_simple(stream, **backend_options)) == [128, 128, 44]


def test_batches_never_span_tasks(backend_options):
    stream = sp.from_iterable(range(12)).map_batches(batch_as_record, batch_size=3).set_processing(task_size=5)
    assert assert_same_as_simple(stream, **backend_options) == [[0, 1, 2], [3, 4], [5, 6, 7], [8, 9], [10, 11]]


def test_token_batches_never_span_tasks(backend_options):
    stream = sp.from_iterable(["ab"] * 6).map_batches(batch_as_record, batch_size="100 tokens").set_processing(task_size=4)
    assert _lengths(assert_same_as_simple(stream, **backend_options)) == [4, 2]


def test_batches_cut_at_default_task_boundaries(backend_options):
    # Default task of a large input: 1024 records = 341 batches of 3 + a batch of 1, twice,
    # then 2 records left.
    stream = sp.from_iterable(range(10_242)).map_batches(batch_as_record, batch_size=3)
    assert stream.plan().task_size == 1024
    lengths = _lengths(assert_same_as_simple(stream, **backend_options))
    assert lengths == ([3] * 341 + [1]) * 10 + [2]


def test_a_small_input_gets_finer_default_tasks_of_whole_batches(backend_options):
    # 2,050 records would make 3 default tasks: cut finer (at least 8, of at least 256 records),
    # rounded up to whole batches of 3 (execution/granularity.py), whatever the backend.
    stream = sp.from_iterable(range(2050)).map_batches(batch_as_record, batch_size=3)
    assert stream.plan().task_size == 258
    lengths = _lengths(assert_same_as_simple(stream, **backend_options))
    assert lengths == [3] * 86 * 7 + [3] * 81 + [1]  # 7 tasks of 258, then 244 records


def test_large_batch_size_grows_default_task(backend_options):
    stream = sp.from_iterable(range(5000)).map_batches(lambda batch: [len(batch)], batch_size=2000)
    assert assert_same_as_simple(stream, **backend_options) == [2000, 2000, 1000]


def test_batches_of_two_stages_both_cut_at_task_boundaries(backend_options):
    stream = (
        sp.from_iterable(range(10))
        .map_batches(lambda batch: [x for x in batch for _ in range(2)], batch_size=3)
        .map_batches(batch_as_record, batch_size=4)
        .set_processing(task_size=5)
    )
    # Task 0: 0..4 doubled = 10 records -> 4, 4, 2; task 1 likewise.
    assert _lengths(assert_same_as_simple(stream, **backend_options)) == [4, 4, 2, 4, 4, 2]


def test_parquet_batches_never_span_row_groups(backend_options, tmp_path):
    pq.write_table(pa.table({"x": list(range(10))}), tmp_path / "a.parquet", row_group_size=4)
    stream = sp.read_parquet(tmp_path).map(lambda r: r["x"]).map_batches(batch_as_record, batch_size=3)
    assert assert_same_as_simple(stream, **backend_options) == [[0, 1, 2], [3], [4, 5, 6], [7], [8, 9]]


# -- sinks ----------------------------------------------------------------------------------------


def test_iteration_and_to_list_agree(backend_options):
    stream = sp.from_iterable(range(30)).map(double).set_processing(task_size=7, **backend_options)
    assert_outputs(list(stream), [2 * i for i in range(30)], backend_options)
    assert_outputs(stream.to_list(), [2 * i for i in range(30)], backend_options)


def test_to_pandas_of_non_dict_records_has_a_value_column(backend_options):
    df = sp.from_iterable([1, 2]).map(double).set_processing(**backend_options).to_pandas()
    assert df.columns.tolist() == ["value"]
    assert df["value"].tolist() == [2, 4]
    assert sp.from_iterable([]).set_processing(**backend_options).to_pandas().empty


def test_to_pandas_of_dict_records(backend_options):
    df = sp.from_iterable([{"a": 1, "b": "x"}, {"a": 2, "b": "y"}]).set_processing(**backend_options).to_pandas()
    assert df.to_dict(orient="list") == {"a": [1, 2], "b": ["x", "y"]}


def test_show_progress_does_not_change_the_output(backend_options, capsys):
    stream = sp.from_iterable(range(50)).map(double).set_processing(show_progress=True, task_size=10, **backend_options)
    assert_outputs(stream.to_list(), [2 * i for i in range(50)], backend_options)
    assert "50" in capsys.readouterr().err  # the bar counted every record


def test_identity_pipeline_on_many_records(backend_options):
    stream = sp.from_iterable(range(20_000)).map(identity).set_processing(task_size=333)
    assert assert_same_as_simple(stream, **backend_options) == list(range(20_000))
