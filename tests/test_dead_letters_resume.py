"""Dead letters resume with the output: a run stopped after some parts (here by ``max_errors``)
and resumed gives the same parts and the same dead-letter files as an uninterrupted run."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

import streamproc as sp
from tests.hang_guard import run_guarded

N, TASK_SIZE = 60, 5
BAD = (7, 48)  # tasks 1 and 9: parts 0 and 4 with two tasks per part


class BadRecord(ValueError):
    pass


def check(x: int) -> dict[str, int]:
    if x in BAD:
        raise BadRecord(f"bad {x}")
    return {"x": x}


def job(dead: Path, **options: Any) -> sp.Stream:
    return sp.from_iterable(range(N)).map(check).set_processing(
        task_size=TASK_SIZE, on_error="dead_letter", dead_letter_path=str(dead), **options
    )


def listing(path: Path) -> dict[str, list[dict[str, Any]]]:
    return {p.name: pq.read_table(p).to_pylist() for p in sorted(path.glob("*.parquet"))}


def without_tracebacks(rows: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    return {name: [{k: v for k, v in row.items() if k != "traceback"} for row in table] for name, table in rows.items()}


@pytest.mark.parametrize("backend", ["simple", "multiprocessing"])
def test_dead_letters_resume_with_the_output(tmp_path: Path, backend: str) -> None:
    options = {"backend": backend, "num_cpu_workers": 1 if backend == "simple" else 2}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sp.RecordsSkippedWarning)
        run_guarded(
            lambda: job(tmp_path / "dead-whole", **options).write_parquet(tmp_path / "whole", rows_per_file=2 * TASK_SIZE),
            timeout_s=120,
        )
        with pytest.raises(sp.TooManyErrorsError):
            run_guarded(
                lambda: job(tmp_path / "dead", max_errors=1, **options).write_parquet(
                    tmp_path / "out", rows_per_file=2 * TASK_SIZE
                ),
                timeout_s=120,
            )
        committed = listing(tmp_path / "out")
        assert 0 < len(committed) < len(listing(tmp_path / "whole"))
        run_guarded(
            lambda: job(tmp_path / "dead", **options).write_parquet(tmp_path / "out", rows_per_file=2 * TASK_SIZE, resume=True),
            timeout_s=120,
        )
    assert listing(tmp_path / "out") == listing(tmp_path / "whole")
    assert sorted(p.name for p in (tmp_path / "dead").iterdir()) == ["dead-00000001.parquet", "dead-00000009.parquet"]
    assert without_tracebacks(listing(tmp_path / "dead")) == without_tracebacks(listing(tmp_path / "dead-whole"))
