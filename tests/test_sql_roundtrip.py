"""Issue 12's SQL acceptance: ``read_sql -> map_gpu -> write_sql`` in one database, resumed exactly once.

The job reads table ``docs`` and writes table ``scores`` of the same database (``sql_url``: a
SQLite file; PostgreSQL too in ``tox -e sql``). Its first run fails part-way (a map raises
while a marker file exists); the rerun with ``resume=True`` completes it, and every document
is in ``scores`` exactly once, with the value an uninterrupted run computes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import streamproc as sp
from streamproc.io.sql_connection import connect, sql_target
from tests import sql_databases
from tests.hang_guard import run_guarded

#: The ``sql_url`` fixture (a fresh database per test; see tests/sql_databases.py).
sql_url = sql_databases.sql_url

GUARD_S = 120
N = 500
CHUNK = 40  # 13 tasks, the last one short
FAIL_AT = 300  # in task 7


class FailsWhileMarked:
    """A map that raises at record ``id == at`` while ``marker`` exists (the first run)."""

    def __init__(self, marker: Path, at: int) -> None:
        self.marker = str(marker)
        self.at = at

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        if row["id"] == self.at and Path(self.marker).exists():
            raise RuntimeError(f"interrupted at {self.at}")
        return row


def prepare(rows: list[dict[str, Any]]) -> torch.Tensor:
    return torch.tensor([[float(len(r["text"])), float(r["id"])] for r in rows])


def postprocess(rows: list[dict[str, Any]], outputs: Any) -> list[dict[str, Any]]:
    return [{"id": r["id"], "score": float(o[0] * 3 + o[1])} for r, o in zip(rows, outputs)]


def job(url: str, marker: Path, config: dict[str, Any]) -> sp.Stream:
    return (
        sp.read_sql("SELECT id, text FROM docs ORDER BY id", url, chunk_size=CHUNK)
        .map(FailsWhileMarked(marker, FAIL_AT))
        .map_gpu(prepare, torch.nn.Identity(), postprocess, batch_size=16)
        .set_processing(**config)
    )


def fill_docs(url: str) -> None:
    with connect(sql_target(url)) as connection:
        connection.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text TEXT)")
        with connection.transaction():
            connection.executemany("INSERT INTO docs VALUES (:id, :text)", [{"id": i, "text": "w" * (i % 11)} for i in range(N)])


@pytest.mark.parametrize(
    "config",
    [
        {"backend": "simple"},
        {"backend": "multiprocessing", "num_cpu_workers": 2},
        {"backend": "multiprocessing", "num_cpu_workers": 1, "gpu_worker_devices": ["cpu"]},
    ],
    ids=["simple", "mp-2cpu", "mp-1cpu-1gpu"],
)
def test_read_sql_map_gpu_write_sql_resumes_exactly_once(sql_url, tmp_path, config):
    fill_docs(sql_url)
    marker = tmp_path / "fail-the-first-run"
    marker.touch()
    with pytest.raises(RuntimeError, match=f"interrupted at {FAIL_AT}"):
        run_guarded(lambda: job(sql_url, marker, config).write_sql(sql_url, "scores", resume=True), timeout_s=GUARD_S)
    with connect(sql_target(sql_url)) as connection:
        partial = connection.execute("SELECT COUNT(*) AS n FROM scores")[0]["n"]
    assert 0 < partial < N  # the first run committed some tasks, not all
    marker.unlink()
    rows = run_guarded(lambda: job(sql_url, marker, config).write_sql(sql_url, "scores", resume=True), timeout_s=GUARD_S)
    assert rows == N
    with connect(sql_target(sql_url)) as connection:
        table = connection.execute("SELECT id, score FROM scores ORDER BY id")
    assert [row["id"] for row in table] == list(range(N))  # each document exactly once
    assert [row["score"] for row in table] == [float((i % 11) * 3 + i) for i in range(N)]


def test_reading_and_writing_one_sqlite_file_switches_it_to_wal(tmp_path):
    # SQLite's default journal would make every commit wait for read_sql's open cursor.
    url = f"sqlite:///{tmp_path / 'one.db'}"
    fill_docs(url)
    config = {"backend": "multiprocessing", "num_cpu_workers": 2}
    rows = run_guarded(lambda: job(url, tmp_path / "absent", config).write_sql(url, "scores"), timeout_s=GUARD_S)
    assert rows == N
    with connect(sql_target(url)) as connection:
        assert connection.execute("PRAGMA journal_mode")[0]["journal_mode"] == "wal"
