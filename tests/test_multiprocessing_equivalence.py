"""The multiprocessing backend gives the simple backend's output: identical when deterministic.

Every pipeline runs under several worker counts, task sizes and start methods, and is compared
with the simple backend on the same stream (same task size: batches never span tasks, so
batch composition depends on it). ``map_batches`` stages return their batches as records, so
batch composition is part of what is compared. With ``deterministic=False`` the outputs must be
the same multiset.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import streamproc as sp
from tests import multiprocessing_fakes as fakes
from tests.utils import add, assert_same_as_simple, batch_as_record, double, identity

NUM_RECORDS = 200
WORDS = ["a", "bb", "ccc", "dddd", "eeeee", "ffffff", "ggggggg", "hhhhhhhhhhhh"]


@dataclass(frozen=True)
class Inputs:
    parquet_dir: Path
    jsonl_path: Path
    frame: pd.DataFrame


def make_records(n: int = NUM_RECORDS) -> list[dict[str, Any]]:
    return [{"id": i, "text": WORDS[(i * 7) % len(WORDS)] * (1 + i % 3), "score": i / 4} for i in range(n)]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Inputs:
    root = tmp_path_factory.mktemp("inputs")
    records = make_records()
    parquet_dir = root / "parquet"
    parquet_dir.mkdir()
    # Three files with row groups of different sizes: tasks are row groups.
    table = pa.Table.from_pylist(records)
    pq.write_table(table.slice(0, 70), parquet_dir / "a.parquet", row_group_size=9)
    pq.write_table(table.slice(70, 30), parquet_dir / "b.parquet", row_group_size=30)
    pq.write_table(table.slice(100), parquet_dir / "c.parquet", row_group_size=17)
    jsonl_path = root / "records.jsonl"
    sp.from_iterable(records).write_jsonl(jsonl_path)
    return Inputs(parquet_dir, jsonl_path, pd.DataFrame(records))


# -- pipelines (module-level callables and lambdas: both must reach spawned workers) -----------


def not_multiple_of_3(x: int) -> bool:
    return x % 3 != 0


def keep_odd_positions_and_sum(batch: list[int]) -> list[int]:
    return [*batch[1::2], sum(batch)]


def text_length(record: dict[str, Any]) -> int:
    return len(record["text"])


def summarize(record: dict[str, Any]) -> dict[str, Any]:
    return {"id": record["id"], "n": len(record["text"]), "score2": record["score"] * 2}


PIPELINES: dict[str, Callable[[Inputs], sp.Stream]] = {
    "map_filter": lambda _: sp.from_iterable(range(NUM_RECORDS)).map(double).filter(not_multiple_of_3).map(add, kwargs={"k": 1}),
    "flatten": lambda _: sp.from_iterable(range(NUM_RECORDS)).map(lambda x: [x] * (x % 3)).flatten().map(identity),
    "map_batches_records": lambda _: sp.from_iterable(range(NUM_RECORDS)).map_batches(batch_as_record, batch_size=4),
    "map_batches_tokens": lambda _: (
        sp.from_iterable(make_records())
        .map(lambda r: r["text"])
        .map_batches(batch_as_record, batch_size="12 tokens", batch_by=len)
    ),
    "map_batches_resize": lambda _: (
        sp.from_iterable(range(NUM_RECORDS))
        .map_batches(keep_odd_positions_and_sum, batch_size=5)
        .map_batches(batch_as_record, batch_size=3)
    ),
    "map_gpu": lambda _: (
        sp.from_iterable(make_records())
        .map_gpu(fakes.features, fakes.TinyModel(), fakes.attach_outputs, batch_size="20 tokens", batch_by=text_length)
        .map(lambda r: (r["id"], r["y"], r["batch_len"]))
    ),
    "map_gpu_default_postprocess": lambda _: sp.from_iterable(make_records()).map_gpu(
        fakes.features, fakes.TinyModel(), batch_size=6
    ),
    "parquet": lambda i: sp.read_parquet(i.parquet_dir, columns=["id", "text"]).map_batches(batch_as_record, batch_size=4),
    "jsonl": lambda i: sp.read_jsonl(i.jsonl_path).map(summarize).filter(lambda r: r["n"] != 3),
    "pandas": lambda i: sp.from_pandas(i.frame).map(summarize).map_batches(batch_as_record, batch_size=3),
    "many_records": lambda _: sp.from_iterable(range(5_000)).map(double).filter(not_multiple_of_3),
}

# (id, options): worker counts 1-3, tasks of 1, 3 and 7 records, both determinism modes.
FORK_CONFIGS = {
    "w1-ts7": {"num_cpu_workers": 1, "task_size": 7},
    "w2-ts1": {"num_cpu_workers": 2, "task_size": 1},
    "w3-ts7": {"num_cpu_workers": 3, "task_size": 7},
    "w2-ts7-nondet": {"num_cpu_workers": 2, "task_size": 7, "deterministic": False},
    "w3-ts3-nondet": {"num_cpu_workers": 3, "task_size": 3, "deterministic": False},
}
# Spawn and forkserver start slowly: a representative subset.
# map_gpu first: it gets the 2-worker configuration (each spawned worker imports torch).
OTHER_METHOD_PIPELINES = ["map_gpu", "map_batches_tokens", "pandas", "parquet"]
OTHER_METHOD_CONFIGS = {
    "w2-ts7": {"num_cpu_workers": 2, "task_size": 7},
    "w3-ts3-nondet": {"num_cpu_workers": 3, "task_size": 3, "deterministic": False},
}


def _params() -> list[Any]:
    params = []
    for pipeline in PIPELINES:
        for config_id, config in FORK_CONFIGS.items():
            params.append(pytest.param(pipeline, {**config, "process_start_method": "fork"}, id=f"{pipeline}-fork-{config_id}"))
    for method in ("spawn", "forkserver"):
        for index, pipeline in enumerate(OTHER_METHOD_PIPELINES):
            if pipeline == "map_gpu" and method == "forkserver":
                continue  # torch in every fresh worker: once (under spawn) is enough
            # Alternate the configurations so both modes run under each method.
            config_id, config = list(OTHER_METHOD_CONFIGS.items())[index % 2]
            params.append(
                pytest.param(pipeline, {**config, "process_start_method": method}, id=f"{pipeline}-{method}-{config_id}")
            )
    return params


def run_both(stream: sp.Stream, config: dict[str, Any]) -> list[Any]:
    """Runs ``stream`` with ``config`` and with the simple backend (same task size); compares."""
    config = dict(config)
    task_size = config.pop("task_size", None)
    if task_size is not None:
        stream = stream.set_processing(task_size=task_size)
    return assert_same_as_simple(stream, backend="multiprocessing", **config)


@pytest.mark.parametrize(("pipeline", "config"), _params())
def test_same_output_as_simple(inputs, pipeline, config):
    outputs = run_both(PIPELINES[pipeline](inputs), config)
    assert outputs  # every pipeline produces records


def test_default_task_size_on_many_records():
    stream = sp.from_iterable(range(20_000)).map(double).filter(not_multiple_of_3)
    assert len(run_both(stream, {"num_cpu_workers": 3})) == len([x for x in range(0, 40_000, 2) if x % 3])


def test_batch_composition_is_recorded_and_independent_of_workers():
    # An explicit look at what the parametrized test compares: batches of 4 within tasks of 7.
    stream = sp.from_iterable(range(15)).map_batches(batch_as_record, batch_size=4).set_processing(task_size=7)
    expected = [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9, 10], [11, 12, 13], [14]]
    assert stream.to_list() == expected
    for workers in (1, 2, 3):
        assert stream.set_processing(backend="multiprocessing", num_cpu_workers=workers).to_list() == expected


# -- sinks ------------------------------------------------------------------------------------

SINK_CONFIGS = {
    "fork-w2": {"num_cpu_workers": 2, "process_start_method": "fork"},
    "fork-w3-nondet": {"num_cpu_workers": 3, "deterministic": False, "process_start_method": "fork"},
    "spawn-w2": {"num_cpu_workers": 2, "process_start_method": "spawn"},
}


def _read_parts(paths: list[str]) -> list[pa.Table]:
    return [pq.read_table(path) for path in paths]


@pytest.mark.parametrize("config", SINK_CONFIGS.values(), ids=SINK_CONFIGS.keys())
def test_write_parquet_reads_back_identical_to_simple(inputs, tmp_path, config):
    stream = sp.read_parquet(inputs.parquet_dir).map(summarize)
    expected_paths = stream.set_processing(backend="simple").write_parquet(
        tmp_path / "simple", rows_per_file=45, row_group_size=10
    )
    actual_paths = stream.set_processing(backend="multiprocessing", **config).write_parquet(
        tmp_path / "mp", rows_per_file=45, row_group_size=10
    )
    names = sorted(p.name for p in (tmp_path / "mp").iterdir() if p.name != "_streamproc_manifest.json")
    assert names == [Path(p).name for p in actual_paths]  # no temp files
    expected, actual = _read_parts(expected_paths), _read_parts(actual_paths)
    # The part layout: the same files as the simple backend, whether the main process writes
    # (deterministic) or each worker writes whole parts (deterministic=False).
    assert [Path(p).name for p in actual_paths] == [Path(p).name for p in expected_paths]
    for a, e in zip(actual, expected):
        assert a.equals(e)
        assert a.num_rows == e.num_rows
    assert [pq.ParquetFile(p).metadata.num_row_groups for p in actual_paths] == [
        pq.ParquetFile(p).metadata.num_row_groups for p in expected_paths
    ]


@pytest.mark.parametrize("config", SINK_CONFIGS.values(), ids=SINK_CONFIGS.keys())
def test_write_jsonl_identical_to_simple(inputs, tmp_path, config):
    stream = sp.from_pandas(inputs.frame).map(summarize).set_processing(task_size=9)
    expected = Path(stream.set_processing(backend="simple").write_jsonl(tmp_path / "simple.jsonl")).read_text()
    actual = Path(stream.set_processing(backend="multiprocessing", **config).write_jsonl(tmp_path / "mp.jsonl")).read_text()
    if config.get("deterministic", True):
        assert actual == expected
    else:
        assert sorted(actual.splitlines()) == sorted(expected.splitlines())


@pytest.mark.parametrize("config", SINK_CONFIGS.values(), ids=SINK_CONFIGS.keys())
def test_to_pandas_identical_to_simple(inputs, config):
    stream = sp.read_jsonl(inputs.jsonl_path).map(summarize).set_processing(task_size=11)
    expected = stream.set_processing(backend="simple").to_pandas()
    actual = stream.set_processing(backend="multiprocessing", **config).to_pandas()
    if not config.get("deterministic", True):
        actual = actual.sort_values("id").reset_index(drop=True)
    pd.testing.assert_frame_equal(actual, expected)


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_show_progress_counts_every_record(capsys, method):
    stream = (
        sp.from_iterable(range(500))
        .map(double)
        .set_processing(
            backend="multiprocessing", num_cpu_workers=2, task_size=30, show_progress=True, process_start_method=method
        )
    )
    assert stream.to_list() == [2 * i for i in range(500)]
    err = capsys.readouterr().err
    assert re.search(r"\b500 records\b", err), err
