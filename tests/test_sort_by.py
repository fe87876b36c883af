"""``sort_by`` on ``map_batches`` and ``map_gpu``: batches in key order, outputs in input order.

Every run on another backend is compared with the simple backend's output (batch composition
included: each output record carries the keys of its batch), and the output records with the
unsorted stream's. Batch composition itself is checked with the simple backend, where a
``prepare_batch`` records what it saw. See ``streamproc/execution/sorting.py``.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

import streamproc as sp
from streamproc.execution.sorting import SortFieldError, sort_order
from tests.hang_guard import run_guarded
from tests.utils import UserError, assert_same_as_simple, collect_until_error

torch = pytest.importorskip("torch")

#: Deadline of one guarded run (a 2-core machine shared with other test runs).
GUARD_S = 120.0

#: Word counts that vary a lot within a task, so that sorting changes every batch.
WORD_COUNTS = [7, 1, 4, 9, 2, 2, 8, 3, 1, 6, 5, 9, 1, 3, 7, 2]


def make_records(n: int = 48) -> list[dict[str, Any]]:
    return [{"id": i, "n": WORD_COUNTS[i % len(WORD_COUNTS)], "text": "w " * WORD_COUNTS[i % len(WORD_COUNTS)]} for i in range(n)]


def n_words(record: dict[str, Any]) -> int:
    return len(record["text"].split())


def with_batch_keys(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """map_batches fn: one output per record, carrying the keys of its batch (its composition)."""
    keys = tuple(r["n"] for r in batch)
    return [{**r, "batch": keys} for r in batch]


def drop_batch_keys(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "batch"} for r in records]


def run(stream: sp.Stream, **options: Any) -> list[Any]:
    return run_guarded(lambda: stream.set_processing(**options).to_list(), GUARD_S, "a sort_by run")


def batched(sort_by: Any = None, n: int = 48, **kwargs: Any) -> sp.Stream:
    kwargs.setdefault("batch_size", 3)
    stream = sp.from_iterable(make_records(n)).map_batches(with_batch_keys, sort_by=sort_by, **kwargs)
    return stream.set_processing(task_size=8)


# -- same records, same order, on every backend ---------------------------------------------


@pytest.mark.parametrize("sort_by", ["n", n_words], ids=["field", "function"])
def test_map_batches_output_is_the_unsorted_streams_on_every_backend(backend_options, sort_by):
    out = run_guarded(lambda: assert_same_as_simple(batched(sort_by), **backend_options), GUARD_S, "sort_by vs simple")
    unsorted = run(batched(None))
    assert drop_batch_keys(out) == drop_batch_keys(unsorted)
    assert [r["id"] for r in out] == list(range(48))
    # The batches really changed: each is in key order, and they are not the unsorted ones.
    assert all(list(r["batch"]) == sorted(r["batch"]) for r in out)
    assert [r["batch"] for r in out] != [r["batch"] for r in unsorted]


def encode_keys(records: list[dict[str, Any]]) -> Any:
    """prepare_batch that returns the batch's keys (and ids), so forward and postprocess see them."""
    return {"n": torch.tensor([r["n"] for r in records]), "id": torch.tensor([r["id"] for r in records])}


def score(batch: dict[str, Any]) -> Any:
    return batch["id"] * 10 + batch["n"]


def attach_score(records: list[dict[str, Any]], scores: Any) -> list[dict[str, Any]]:
    keys = tuple(r["n"] for r in records)
    return [{**r, "score": int(s), "batch": keys} for r, s in zip(records, scores.tolist())]


def gpu_stream(sort_by: Any = "n", **kwargs: Any) -> sp.Stream:
    kwargs.setdefault("batch_size", 4)
    stream = sp.from_iterable(make_records()).map_gpu(encode_keys, score, attach_score, sort_by=sort_by, **kwargs)
    return stream.set_processing(task_size=16)


GPU_WORKERS = [
    {"backend": "multiprocessing", "num_cpu_workers": cpu, "num_gpu_workers": 1, "gpu_worker_devices": ["cpu"]}
    for cpu in (1, 2)
]


def test_map_gpu_output_is_the_unsorted_streams_on_every_backend(backend_options):
    out = run_guarded(lambda: assert_same_as_simple(gpu_stream(), **backend_options), GUARD_S, "map_gpu sort_by")
    assert [r["score"] for r in out] == [r["id"] * 10 + r["n"] for r in make_records()]
    assert drop_batch_keys(out) == drop_batch_keys(run(gpu_stream(None)))
    assert all(list(r["batch"]) == sorted(r["batch"]) for r in out)


@pytest.mark.parametrize("config", GPU_WORKERS, ids=["1cpu-1gpu", "2cpu-1gpu"])
def test_map_gpu_with_gpu_workers_is_the_simple_backends(config):
    out = run_guarded(lambda: assert_same_as_simple(gpu_stream(n_words), **config), GUARD_S, "gpu workers sort_by")
    assert [r["id"] for r in out] == list(range(48))
    assert all(list(r["batch"]) == sorted(r["batch"]) for r in out)


def test_flatten_before_and_limit_after(backend_options):
    nested = [make_records(48)[i : i + 4] for i in range(0, 48, 4)]

    def stream(sort_by: Any) -> sp.Stream:
        return (
            sp.from_iterable(nested).flatten().map_batches(with_batch_keys, batch_size=3, sort_by=sort_by)
            .limit(21).set_processing(task_size=3)  # 3 nested records: 12 flattened records per task
        )

    out = run_guarded(lambda: assert_same_as_simple(stream("n"), **backend_options), GUARD_S, "flatten sort_by")
    assert drop_batch_keys(out) == make_records(48)[:21]
    assert all(list(r["batch"]) == sorted(r["batch"]) for r in out)


# -- batch composition (simple backend, where prepare_batch can record what it sees) ----------


def test_batches_are_cut_from_each_tasks_records_in_stable_key_order():
    seen: list[list[tuple[int, int]]] = []

    def prepare(records: list[dict[str, Any]]) -> Any:
        seen.append([(r["n"], r["id"]) for r in records])
        return encode_keys(records)

    stream = sp.from_iterable(make_records(32)).map_gpu(prepare, score, attach_score, batch_size=3, sort_by="n")
    out = stream.set_processing(task_size=16).to_list()
    assert [r["id"] for r in out] == list(range(32))
    for task in range(2):
        records = make_records(32)[task * 16 : (task + 1) * 16]
        # Stable: equal keys keep their input order (the id breaks no tie of its own).
        expected = sorted(((r["n"], r["id"]) for r in records), key=lambda pair: pair[0])
        batches = [b for b in seen if b[0][1] // 16 == task]
        assert [pair for batch in batches for pair in batch] == expected
        assert [len(b) for b in batches] == [3, 3, 3, 3, 3, 1]


def test_padded_token_budget_gives_fuller_batches_when_sorted():
    def batch_count(sort_by: Any) -> tuple[int, int]:
        batches: list[int] = []

        def record_batch(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
            batches.append(max(r["n"] for r in batch) * len(batch))
            return batch

        stream = sp.from_iterable(make_records(64)).map_batches(
            record_batch, batch_size="18 padded_tokens", batch_by="n", sort_by=sort_by
        )
        assert stream.set_processing(task_size=32).to_list() == make_records(64)
        return len(batches), sum(batches)

    unsorted, unsorted_padded = batch_count(None)
    sorted_count, sorted_padded = batch_count("n")
    # The same real tokens in fewer batches with less padding.
    assert sorted_count < unsorted and sorted_padded < unsorted_padded


def test_stats_count_records_and_the_batches_run():
    with sp.collect_stats() as stats:
        assert len(batched("n").to_list()) == 48
    stage = stats.runs[-1].stages[1]
    assert "sort_by='n'" in stage.name
    assert (stage.records_in, stage.records_out, stage.batches) == (48, 48, 6 * 3)


#: Errors are checked in this process and across a process boundary (types and notes travel).
SIMPLE_AND_MP = [{"backend": "simple"}, {"backend": "multiprocessing", "num_cpu_workers": 2}]


# -- the function must return one record per input ---------------------------------------------


def first_only(batch: list[Any]) -> list[Any]:
    return batch[:1]


def postprocess_one_too_many(records: list[Any], outputs: Any) -> list[Any]:
    return [*records, records[0]]


@pytest.mark.parametrize("config", SIMPLE_AND_MP, ids=["simple", "mp"])
def test_a_count_changing_function_raises_value_error_naming_the_stage(config):
    stream = sp.from_iterable(make_records(8)).map_batches(first_only, batch_size=4, sort_by="n").set_processing(**config)
    _, exc = run_guarded(lambda: collect_until_error(stream), GUARD_S, "count mismatch")
    assert type(exc) is ValueError
    assert "stage 1 (map_batches(first_only" in str(exc) and "one record per input record" in str(exc)
    assert "returned 1 records for 4" in str(exc)

    gpu = sp.from_iterable(make_records(8)).map_gpu(encode_keys, score, postprocess_one_too_many, sort_by="n")
    _, exc = run_guarded(lambda: collect_until_error(gpu.set_processing(**config)), GUARD_S, "gpu count mismatch")
    assert type(exc) is ValueError and "stage 1 (map_gpu(" in str(exc) and "returned 9 records for 8" in str(exc)


# -- on_error: dropped records, their rows and the survivors' order ---------------------------


def read_dead_letters(path: Path) -> list[dict[str, Any]]:
    return [row for name in sorted(os.listdir(path)) for row in pq.read_table(path / name).to_pylist()]


def run_dead_letter(stream: sp.Stream, path: Path, **options: Any) -> list[Any]:
    def go() -> list[Any]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", sp.RecordsSkippedWarning)
            return stream.set_processing(on_error="dead_letter", dead_letter_path=str(path), **options).to_list()

    return run_guarded(go, GUARD_S, "a dead_letter run")


BAD_IDS = (5, 12, 13, 30)


def fails_on_bad(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for r in batch:
        if r["id"] in BAD_IDS:
            raise UserError(f"bad id {r['id']}")
    return [{**r, "ok": True} for r in batch]


def encode_failing(records: list[dict[str, Any]]) -> Any:
    fails_on_bad(records)
    return encode_keys(records)


def mark_ok(records: list[dict[str, Any]], scores: Any) -> list[dict[str, Any]]:
    return [{**r, "ok": True} for r in records]


@pytest.mark.parametrize("op", ["map_batches", "map_gpu"])
def test_on_error_drops_the_same_records_and_names_their_input_rows(backend_options, tmp_path, op):
    def stream(sort_by: Any) -> sp.Stream:
        source = sp.from_iterable(make_records(32))
        if op == "map_batches":
            source = source.map_batches(fails_on_bad, batch_size=4, sort_by=sort_by)
        else:
            source = source.map_gpu(encode_failing, score, mark_ok, batch_size=4, sort_by=sort_by)
        return source.set_processing(task_size=16)

    expected = run_dead_letter(stream(None), tmp_path / "unsorted", backend="simple")
    assert [r["id"] for r in expected] == [i for i in range(32) if i not in BAD_IDS]
    assert run_dead_letter(stream("n"), tmp_path / "sorted", **backend_options) == expected
    rows = read_dead_letters(tmp_path / "sorted")
    # Each row names the record's own input position: item index = id (16 per task).
    by_id = {json.loads(row["record"])["id"]: row for row in rows}
    assert sorted(by_id) == list(BAD_IDS)
    for record_id, row in by_id.items():
        assert row["task"] == record_id // 16
        assert str(record_id) in row["source"], row["source"]
        assert row["message"] == f"bad id {record_id}"


def key_fails_on_seven(record: dict[str, Any]) -> int:
    if record["id"] == 7:
        raise UserError("no key for 7")
    return record["n"]


def test_a_failing_key_under_skip_drops_the_record_as_the_sort_by_step(tmp_path):
    out = run_dead_letter(batched(key_fails_on_seven), tmp_path / "dead")
    assert [r["id"] for r in out] == [i for i in range(48) if i != 7]
    [row] = read_dead_letters(tmp_path / "dead")
    assert row["stage"].endswith(", sort_by") and row["stage"].startswith("stage 1 (map_batches(")
    assert row["message"] == "no key for 7" and "7" in row["source"]


# -- errors: the key function, a missing field, keys that do not compare ----------------------


@pytest.mark.parametrize("config", SIMPLE_AND_MP, ids=["simple", "mp"])
def test_a_raising_key_function_keeps_its_type_and_names_stage_record_and_task(config):
    _, exc = run_guarded(lambda: collect_until_error(batched(key_fails_on_seven).set_processing(**config)), GUARD_S, "key")
    assert type(exc) is UserError
    notes = "\n".join(exc.__notes__)
    assert "raised by sort_by of stage 1 (map_batches(with_batch_keys" in notes
    assert "on record 7 of the stage's input in this task" in notes
    assert "streamproc: task 0 reads items 0 to 7" in notes


def test_a_missing_field_raises_a_key_error_naming_field_and_stage():
    stream = sp.from_iterable([{"id": 1, "n": 2}, {"id": 2}]).map_batches(with_batch_keys, sort_by="n")
    with pytest.raises(KeyError) as info:
        stream.to_list()
    assert isinstance(info.value, SortFieldError)
    assert str(info.value).startswith("stage 1 (map_batches(with_batch_keys")
    assert "sort_by='n' is not a field of the record (its fields: id)" in str(info.value)


def test_none_keys_sort_first_and_mixed_types_are_refused():
    assert sort_order([3, None, 1, None, 2], lambda r: r, "stage 1", None) == [1, 3, 2, 4, 0]
    assert sort_order([2.5, 1, True], lambda r: r, "stage 1", None) == [1, 2, 0]  # numbers compare; True == 1, stable
    with pytest.raises(TypeError, match=r"^stage 1 \(x\): sort_by keys do not compare .*key types int, str"):
        sort_order([1, "a", None], lambda r: r, "stage 1 (x)", None)
    stream = sp.from_iterable([{"n": None, "id": 0}, {"n": 3, "id": 1}, {"n": None, "id": 2}])
    out = stream.map_batches(with_batch_keys, sort_by="n").to_list()
    assert [r["batch"] for r in out] == [(None, None, 3)] * 3 and [r["id"] for r in out] == [0, 1, 2]


@pytest.mark.parametrize("bad", [3, "", ["n"]])
def test_sort_by_is_checked_when_the_stream_is_built(bad):
    with pytest.raises(ValueError, match=r"map_batches\(\): sort_by must be None, a field name or a callable"):
        sp.from_iterable([1]).map_batches(first_only, sort_by=bad)
    with pytest.raises(ValueError, match=r"map_gpu\(\): sort_by must be"):
        sp.from_iterable([1]).map_gpu(encode_keys, score, sort_by=bad)


def test_explain_shows_the_key():
    assert "sort_by='n'" in batched("n").explain()
    assert "sort_by=n_words" in batched(n_words).explain()
