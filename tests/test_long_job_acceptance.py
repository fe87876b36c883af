"""Issue 8's "done when": a parquet job with poisonous records (one raises, one segfaults, one
hangs) completes under ``on_error="dead_letter", max_task_retries=1, task_timeout=...``, with
exactly the output of the clean records and a dead-letter output naming all three.

Multiprocessing only: a segfault in the simple backend would be the test runner's own death.
The hang is an ``Event`` that is never set (no sleep), cut by ``task_timeout``.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import streamproc as sp
from tests.hang_guard import run_guarded

NUM_ROWS = 600
ROW_GROUP_ROWS = 50
RAISES, SEGFAULTS, HANGS = 77, 311, 502
POISON = {RAISES, SEGFAULTS, HANGS}


class PoisonError(ValueError):
    pass


def process(record: dict[str, Any]) -> dict[str, Any]:
    """Runs in a CPU worker: doubles ``x``; three ids are poisonous."""
    if record["id"] == RAISES:
        raise PoisonError(f"record {record['id']} is poisonous")
    if record["id"] == SEGFAULTS:
        ctypes.string_at(0)  # a segfault in a C call
    if record["id"] == HANGS:
        threading.Event().wait()  # never set: only task_timeout ends this
    return {"id": record["id"], "y": record["x"] * 2}


@pytest.fixture
def poisoned_input(tmp_path: Any) -> str:
    table = pa.table({"id": list(range(NUM_ROWS)), "x": [float(i) for i in range(NUM_ROWS)]})
    path = tmp_path / "in"
    path.mkdir()
    pq.write_table(table.slice(0, NUM_ROWS // 2), path / "a.parquet", row_group_size=ROW_GROUP_ROWS)
    pq.write_table(table.slice(NUM_ROWS // 2), path / "b.parquet", row_group_size=ROW_GROUP_ROWS)
    return str(path)


@pytest.mark.parametrize("num_cpu_workers", [1, 2])
def test_poisonous_records_are_dead_lettered_and_clean_records_come_out(
    poisoned_input: str, tmp_path: Any, num_cpu_workers: int
) -> None:
    dead = tmp_path / "dead"
    stream = (
        sp.read_parquet(poisoned_input)
        .map(process)
        .set_processing(
            backend="multiprocessing",
            num_cpu_workers=num_cpu_workers,
            on_error="dead_letter",
            dead_letter_path=str(dead),
            max_task_retries=1,
            task_timeout=5.0,
        )
    )
    with pytest.warns(RuntimeWarning, match="3"):
        parts = run_guarded(lambda: stream.write_parquet(tmp_path / "out"), timeout_s=240, what="the poisoned job")

    out = pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)
    expected_ids = [i for i in range(NUM_ROWS) if i not in POISON]
    assert out["id"].tolist() == expected_ids
    assert out["y"].tolist() == [2.0 * i for i in expected_ids]

    letters = pd.read_parquet(dead).sort_values("task")
    assert set(letters.columns) >= {"source", "task", "stage", "error_type", "message", "traceback", "record"}
    by_type = dict(zip(letters["error_type"], letters["record"]))
    assert set(by_type) == {"PoisonError", "WorkerCrashedError", "TaskTimeoutError"}
    assert f'"id": {RAISES}' in by_type["PoisonError"]
    assert f'"id": {SEGFAULTS}' in by_type["WorkerCrashedError"]
    assert f'"id": {HANGS}' in by_type["TaskTimeoutError"]
    # Each row names its file and row group.
    for source in letters["source"]:
        assert ("a.parquet" in source) or ("b.parquet" in source), source
        assert "row group" in source, source
