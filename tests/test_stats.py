"""Run statistics: exact counts on every backend, the report and its forms, collect_stats, show_stats.

Counts are exact (records in and out of each stage, batches, tasks); times are only checked
to add up (stage seconds against the measured busy time) or against wide bounds. Every run
that may start processes or threads runs under the hang guard, with ``collect_stats`` opened
inside the guarded call: a context variable does not follow a new thread.
"""

from __future__ import annotations

import io
import json
import logging
import threading
from typing import Any

import pytest

import streamproc as sp
from streamproc.stats import RunStats
from tests.hang_guard import run_guarded
from tests.utils import assert_same_as_simple, effective_backend, is_odd

RUN_TIMEOUT_S = 120


def _tokens(record: str) -> int:
    return len(record)


def prepare_lengths(batch: list[str]) -> Any:
    import torch

    return torch.tensor([len(record) for record in batch])


def double_forward(x: Any) -> Any:
    return x * 2


def collect_run(stream: sp.Stream, how: str = "to_list") -> tuple[Any, RunStats]:
    def run() -> tuple[Any, RunStats]:
        with sp.collect_stats() as stats:
            out = stream.to_list() if how == "to_list" else list(stream)
        assert len(stats.runs) == 1
        return out, stats.runs[0]

    return run_guarded(run, RUN_TIMEOUT_S, f"a run of {stream!r:.60}")


def counts(stats: RunStats) -> list[tuple[int, int, int, int]]:
    return [(s.index, s.records_in, s.records_out, s.batches) for s in stats.stage_rows() if s.index >= 0]


def test_counts_are_exact_and_agree_on_every_backend(backend_options: dict[str, Any]) -> None:
    stream = (
        sp.from_iterable(range(1000))
        .filter(is_odd)
        .map_batches(lambda batch: batch + batch, batch_size=10)
        .set_processing(task_size=100, **backend_options)
    )
    assert_same_as_simple(stream, **backend_options)
    out, stats = collect_run(stream)
    assert len(out) == 1000
    assert stats.finished and stats.backend == effective_backend(backend_options)
    assert stats.tasks_done == 10 and stats.records_out == 1000
    # (stage, records in, records out, batches): 10 tasks of 100 records, 50 odd ones each.
    assert counts(stats) == [(0, 1000, 1000, 10), (1, 1000, 500, 10), (2, 500, 1000, 50)]
    assert sum(p.tasks for p in stats.processes.values()) == 10
    runners = stats.task_runners
    assert len(runners) == backend_options.get("num_cpu_workers", 1)
    assert all(p.wall_seconds > 0 for p in runners)


def test_iteration_is_collected_too() -> None:
    stream = sp.from_iterable(range(10)).map(abs)
    out, stats = collect_run(stream, how="iter")
    assert out == list(range(10)) and stats.records_out == 10 and counts(stats)[1] == (1, 10, 10, 1)


def test_stage_seconds_add_up_to_the_workers_busy_time() -> None:
    from tests.test_bottleneck import slow_2ms

    stream = sp.from_iterable(range(300)).map(slow_2ms).set_processing(backend="multiprocessing", num_cpu_workers=2, task_size=50)
    _, stats = collect_run(stream)
    busy = sum(p.busy_seconds for p in stats.workers("cpu"))
    assert busy > 0.45
    assert abs(stats.stage_seconds - busy) <= 0.1 * busy, stats.report()


def test_map_gpu_counts_forward_batches_and_padding() -> None:
    pytest.importorskip("torch")
    records = ["x" * n for n in (1, 3, 2, 4, 4, 4)]
    stream = sp.from_iterable(records).map_gpu(prepare_lengths, double_forward, batch_size="8 padded_tokens", batch_by=_tokens)
    _, stats = collect_run(stream)
    stage = stats.stages[1]
    assert stage.forward_batches == stage.batches
    assert stage.real_tokens == 18
    assert stage.padded_tokens >= stage.real_tokens
    assert "padding" in stats.report()


def test_report_dict_and_dataframe_describe_the_same_run() -> None:
    stream = sp.from_iterable(range(100)).map(abs).filter(is_odd)
    _, stats = collect_run(stream)
    report = stats.report()
    assert report == str(stats)
    assert "stage 1 (map(abs))" in report and "stage 2 (filter(is_odd))" in report and "bottleneck:" in report
    assert len({len(line) for line in report.splitlines()[3:6]}) == 1  # a fixed-width table
    data = stats.to_dict()
    json.dumps(data)
    assert [s["records_out"] for s in data["stages"]] == [100, 100, 50]
    assert data["bottleneck"]["hint"] == str(stats.bottleneck)
    frame = stats.to_pandas()
    assert list(frame["row"]) == ["stage"] * 3 + ["process"]
    assert frame.loc[frame["row"] == "stage", "share"].sum() == pytest.approx(1.0)


def test_collect_stats_lists_each_run_and_nests() -> None:
    with sp.collect_stats() as outer:
        sp.from_iterable(range(3)).to_list()
        with sp.collect_stats() as inner:
            sp.from_iterable(range(5)).to_list()
    sp.from_iterable(range(7)).to_list()  # outside both: not collected
    assert [r.records_out for r in outer.runs] == [3, 5]
    assert [r.records_out for r in inner.runs] == [5]
    assert inner.bottleneck == inner.runs[-1].bottleneck
    assert inner.report() == str(inner) == inner.runs[-1].report()


def test_collect_stats_without_a_run_says_so() -> None:
    with sp.collect_stats() as stats:
        pass
    assert stats.runs == [] and "no run" in str(stats)
    with pytest.raises(ValueError, match="no run has finished"):
        stats.report()


def test_collect_stats_blocks_in_threads_see_only_their_own_runs() -> None:
    seen: dict[int, list[int]] = {}
    start = threading.Barrier(4, timeout=30)

    def run(n: int) -> None:
        with sp.collect_stats() as stats:
            start.wait()
            for _ in range(3):
                sp.from_iterable(range(n)).to_list()
        seen[n] = [r.records_out for r in stats.runs]

    def run_all() -> None:
        threads = [threading.Thread(target=run, args=(n,)) for n in (1, 2, 3, 4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)

    run_guarded(run_all, RUN_TIMEOUT_S, "collect_stats in four threads")
    assert seen == {n: [n, n, n] for n in (1, 2, 3, 4)}


def test_show_stats_prints_the_report_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    logging.getLogger().handlers, saved = [], logging.getLogger().handlers
    try:
        sp.from_iterable(range(20)).map(abs).set_processing(show_stats=True).to_list()
    finally:
        logging.getLogger().handlers = saved
    err = capsys.readouterr().err
    assert "streamproc run stats: backend=simple, 1 tasks, 20 records out" in err and "bottleneck:" in err


def test_show_stats_goes_through_logging_when_configured(capsys: pytest.CaptureFixture[str]) -> None:
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    logger = logging.getLogger("streamproc")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        sp.from_iterable(range(20)).set_processing(show_stats=True).to_list()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert "20 records out" in buffer.getvalue()
    assert "records out" not in capsys.readouterr().err


def test_a_run_without_show_stats_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    sp.from_iterable(range(20)).to_list()
    assert capsys.readouterr().err == ""


def test_parquet_finalize_is_its_own_row(tmp_path: Any) -> None:
    stream = sp.from_iterable({"a": i} for i in range(100))

    def run() -> RunStats:
        with sp.collect_stats() as stats:
            stream.write_parquet(tmp_path / "out")
        return stats.runs[0]

    stats = run_guarded(run, RUN_TIMEOUT_S, "write_parquet")
    assert stats.stages[-1].name.startswith("finalize")
    assert stats.records_out == 100 and stats.main.sink_seconds > 0


def test_a_failed_run_is_not_collected() -> None:
    from tests.utils import UserError, fn_raises

    with sp.collect_stats() as stats, pytest.raises(UserError):
        sp.from_iterable(range(10)).map(fn_raises(3)).to_list()
    assert stats.runs == []
