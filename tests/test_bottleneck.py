"""The bottleneck hint against known work, and its rules on hand-made stats.

The timed tests use work of a known size (busy-waits on the thread's CPU clock, a sleeping
forward standing in for a device) and wide, model-based bounds only: 1,000 records x 2 ms of
CPU is 2 s of stage time, so the report must say between 1.5 s and 4 s, the upper bound
scaled by how much slower than its CPU time the run went (a shared, oversubscribed machine
preempts the busy-wait: its wall time is then longer than the work it did). Runs that start
processes run under the hang guard.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

import streamproc as sp
from streamproc.bottleneck import Bottleneck, find_bottleneck
from streamproc.stats import ProcessStats, RunStats, StageStats
from tests.hang_guard import run_guarded

RUN_TIMEOUT_S = 120


def busy_wait(seconds: float) -> None:
    """Spends ``seconds`` of this thread's CPU time (work of a known size, whatever the load)."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def upstream_0_2ms(x: int) -> int:
    busy_wait(0.0002)
    return x


def slow_2ms(x: int) -> int:
    busy_wait(0.002)
    return x


def collect(stream: sp.Stream) -> tuple[list[Any], sp.RunStats]:
    """Runs ``stream`` in this thread inside ``collect_stats``: its output and its one RunStats."""
    with sp.collect_stats() as stats:
        out = stream.to_list()
    assert len(stats.runs) == 1
    return out, stats.runs[0]


def stage_named(stats: sp.RunStats, fragment: str) -> StageStats:
    (stage,) = [s for s in stats.stage_rows() if fragment in s.name]
    return stage


def test_a_2ms_stage_is_measured_and_named_the_bottleneck() -> None:
    stream = sp.from_iterable(range(1000)).map(upstream_0_2ms).map(slow_2ms).set_processing(task_size=100)
    cpu_before, wall_before = time.process_time(), time.perf_counter()
    out, stats = collect(stream)  # the simple backend: the stages run in this process
    slowdown = max(1.0, (time.perf_counter() - wall_before) / (time.process_time() - cpu_before))
    assert out == list(range(1000))
    slow, fast = stage_named(stats, "slow_2ms"), stage_named(stats, "upstream_0_2ms")
    # 1,000 x 2 ms, exclusive of the 0.2 ms stage upstream.
    assert 1.5 <= slow.seconds <= 4.0 * slowdown, f"slowdown {slowdown:.2f}\n{stats.report()}"
    assert fast.seconds < slow.seconds / 3, stats.report()  # ~0.2 s
    bottleneck = stats.bottleneck
    assert bottleneck.resource == "main process" and bottleneck.stage == slow.name
    assert "slow_2ms" in str(bottleneck) and "upstream" not in str(bottleneck)
    assert "add CPU workers" in str(bottleneck)


def test_the_2ms_stage_is_the_bottleneck_in_cpu_workers_too() -> None:
    stream = (
        sp.from_iterable(range(500)).map(upstream_0_2ms).map(slow_2ms)
        .set_processing(backend="multiprocessing", num_cpu_workers=2, task_size=50)
    )
    out, stats = run_guarded(lambda: collect(stream), RUN_TIMEOUT_S, "a 2 ms stage in CPU workers")
    assert out == list(range(500))
    slow, fast = stage_named(stats, "slow_2ms"), stage_named(stats, "upstream_0_2ms")
    assert slow.seconds >= 0.75 and fast.seconds < slow.seconds / 3, stats.report()
    bottleneck = stats.bottleneck
    assert bottleneck.resource == "CPU workers" and bottleneck.stage == slow.name, stats.report()
    assert str(bottleneck).endswith("CPU-bound: add CPU workers")


def prepare_slowly(batch: list[int]) -> Any:
    import torch

    busy_wait(0.02)  # the CPU side: 20 ms per batch
    return torch.tensor(batch)


def forward_sleeps(x: Any) -> Any:
    time.sleep(0.002)  # the device: 2 ms per batch, ten times faster than prepare
    return x * 2


def test_a_starved_gpu_worker_reports_idle_time_and_asks_for_cpu_workers() -> None:
    pytest.importorskip("torch")
    stream = (
        sp.from_iterable(range(400))
        .map_gpu(prepare_slowly, forward_sleeps, batch_size=8)
        .set_processing(backend="multiprocessing", num_cpu_workers=1, gpu_worker_devices=["cpu"])
    )
    out, stats = run_guarded(lambda: collect(stream), RUN_TIMEOUT_S, "a starved GPU worker")
    assert out == [2 * i for i in range(400)]
    (gpu,) = stats.workers("gpu")
    assert gpu.batches == 50
    # 50 batches x 2 ms of forward at least; the worker waits the rest (~20 ms per batch).
    assert gpu.forward_seconds >= 0.1 - 1e-3
    assert gpu.idle_seconds > gpu.forward_seconds
    assert gpu.busy_fraction < 0.5
    bottleneck = stats.bottleneck
    assert bottleneck.resource == "GPU workers"
    assert "add CPU workers" in str(bottleneck) and "idle" in str(bottleneck)
    assert bottleneck.share > 0.5
    stage = stage_named(stats, "map_gpu")
    assert stage.forward_where == "GPU workers" and stage.forward_batches == 50
    assert stage.seconds >= 50 * 0.02 * 0.75  # prepare is the stage's own time, not forward's


# -- the rules, on hand-made stats (no process) -------------------------------------------------


def _stats(backend: str = "multiprocessing", wall: float = 10.0, **main: float) -> RunStats:
    stats = RunStats(backend, wall_seconds=wall)
    for name, value in main.items():
        setattr(stats.main, name, value)
    stats.stages[1] = StageStats(1, "stage 1 (map(f))", "CPU workers", 100, 100, 1, seconds=5.0)
    for i in range(2):
        stats.add_process(ProcessStats(f"cpu worker {i}", "cpu", wall_seconds=wall, busy_seconds=5.0))
    return stats


def test_a_main_process_that_writes_most_of_the_time_is_the_bottleneck() -> None:
    bottleneck = find_bottleneck(_stats(sink_seconds=8.0))
    assert bottleneck == Bottleneck(
        "main process", None, 0.8, "main process writes 80% of the time: write with write_parquet or write_sql, which "
        "write in the CPU workers (unless max_task_retries or task_timeout is set); write_jsonl and the in-memory sinks "
        "write in the main process",
    )


def test_head_of_line_blocking_is_named() -> None:
    bottleneck = find_bottleneck(_stats(reorder_wait_seconds=4.0))
    assert bottleneck.resource == "main process" and "deterministic=False" in str(bottleneck)


def test_reorder_wait_while_every_worker_is_busy_is_not_head_of_line_blocking() -> None:
    stats = _stats(reorder_wait_seconds=4.0)
    for worker in stats.workers("cpu"):
        worker.busy_seconds = 9.5  # of 10 s: the main process waits because the workers compute
    assert find_bottleneck(stats).resource == "CPU workers"


def test_one_long_task_asks_for_a_smaller_task_size() -> None:
    stats = _stats()
    stats.max_task_seconds, stats.second_task_seconds = 4.0, 1.0
    assert str(find_bottleneck(stats)) == "one task took 40% of the run: lower task_size"


def test_two_long_first_tasks_are_not_a_straggler() -> None:
    stats = _stats()  # each worker's first task imported something heavy: start-up, not a straggler
    stats.max_task_seconds, stats.second_task_seconds = 4.0, 3.5
    assert find_bottleneck(stats).resource == "CPU workers"


def test_a_busy_gpu_worker_asks_for_gpu_workers() -> None:
    stats = _stats()
    stats.add_process(ProcessStats("gpu worker 0", "gpu", wall_seconds=10.0, startup_seconds=1.0, forward_seconds=8.5))
    bottleneck = find_bottleneck(stats)
    assert bottleneck.resource == "GPU workers" and "add GPU workers" in bottleneck.hint


def test_an_empty_run_has_nothing_to_blame() -> None:
    assert find_bottleneck(RunStats("simple")).resource == "nothing"


def test_an_in_process_forward_that_dominates_asks_for_gpu_workers() -> None:
    stats = RunStats("simple", wall_seconds=10.0)
    stats.stages[1] = StageStats(1, "stage 1 (map_gpu(p, f))", "main process", 10, 10, 1, seconds=1.0, forward_seconds=8.0)
    bottleneck = find_bottleneck(stats)
    assert bottleneck.stage == "stage 1 (map_gpu(p, f))" and bottleneck.share == pytest.approx(8 / 9)
    assert "forward of stage 1" in str(bottleneck) and "GPU workers" in str(bottleneck)


def test_much_padding_adds_sort_by_length_to_a_busy_gpu_hint() -> None:
    stats = _stats()
    stats.stages[2] = StageStats(2, "stage 2 (map_gpu(p, f))", "CPU workers", 10, 10, 2, real_tokens=38, padded_tokens=100)
    stats.add_process(ProcessStats("gpu worker 0", "gpu", wall_seconds=10.0, forward_seconds=9.5))
    assert find_bottleneck(stats).hint.endswith("; 62% of the padded tokens are padding: sort by length")
