"""Stage figures summed where tasks run (``StageTimer``), sent now and then, merged exactly.

The figures a process sums over its tasks must equal the sum of the tasks' own figures
(counts exactly; the two longest tasks exactly, on hand-made stats); they travel on a task's
last output only when due, and the rest comes at the run's end, on every backend, with
per-task stats (a run that replaces dead workers) or summed ones. Runs that start processes
or threads go through the hang guard; nothing here asserts a time.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

import pytest

import streamproc as sp
import streamproc.execution.timing as timing
from streamproc.execution.context import ExecutionContext
from streamproc.execution.task import Task, run_task
from streamproc.execution.timing import StageTimer
from streamproc.plan import build_plan
from streamproc.stage_tags import stage_running_in
from streamproc.stats import RunStats, TaskStats
from tests.hang_guard import run_guarded
from tests.utils import is_odd

RUN_TIMEOUT_S = 120


def _tasks(stream: sp.Stream) -> tuple[Any, list[Task]]:
    plan = build_plan(stream)
    return plan, [Task(i, payload) for i, payload in enumerate(plan.source.iter_tasks(plan.task_size))]


def _counts(stats: RunStats) -> list[tuple[int, int, int, int]]:
    return [(s.index, s.records_in, s.records_out, s.batches) for s in stats.stage_rows()]


STREAM = sp.from_iterable(range(100)).filter(is_odd).map_batches(lambda b: b + b, batch_size=5).set_processing(task_size=10)
#: (stage, records in, records out, batches) of STREAM: 10 tasks of 10 records, 5 odd ones each.
STREAM_COUNTS = [(0, 100, 100, 10), (1, 100, 50, 10), (2, 50, 100, 10)]


def test_a_shared_timer_sums_what_per_task_timers_report(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(timing, "STATS_SEND_INTERVAL_S", 1e9)  # never due: everything stays in the timer
    plan, tasks = _tasks(STREAM)
    ctx = ExecutionContext("cpu worker 0", kind="cpu")
    own, summed = RunStats("simple"), RunStats("simple")
    timer = StageTimer(plan, ctx)
    for task in tasks:
        for output in run_task(plan, task, ctx):
            if output.last:
                assert output.stats is not None and output.stats.tasks == 1
                own.add_task(output.stats)
        outputs = list(run_task(plan, task, ctx, timer=timer))
        assert [o.stats for o in outputs] == [None] * len(outputs)  # nothing built or sent per task
    rest = timer.take()
    assert rest is not None and rest.tasks == 10 and timer.take() is None  # taken once, then zero
    summed.add_task(rest)
    assert _counts(summed) == _counts(own) == STREAM_COUNTS
    assert summed.process("cpu worker 0").tasks == own.process("cpu worker 0").tasks == 10
    assert summed.max_task_seconds >= summed.second_task_seconds > 0


def test_figures_due_travel_on_a_last_output_and_add_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(timing, "STATS_SEND_INTERVAL_S", 0.0)  # always due: each task's last output carries them
    plan, tasks = _tasks(STREAM)
    ctx = ExecutionContext()
    timer = StageTimer(plan, ctx)
    stats = RunStats("simple")
    for task in tasks:
        outputs = list(run_task(plan, task, ctx, timer=timer))
        assert all(o.stats is None for o in outputs[:-1]) and outputs[-1].stats is not None
        stats.add_task(outputs[-1].stats)
    assert timer.take() is None
    assert _counts(stats) == STREAM_COUNTS and stats.main.tasks == 10


def test_a_fractional_max_errors_still_gets_each_tasks_records_in() -> None:
    stream = sp.from_iterable(range(10)).map(abs).set_processing(task_size=4, on_error="skip", max_errors=0.5)
    plan, tasks = _tasks(stream)
    ctx = ExecutionContext()
    timer = StageTimer(plan, ctx)
    lasts = [list(run_task(plan, task, ctx, timer=timer))[-1] for task in tasks]
    assert [o.stats.extra["records_in"] if o.stats else None for o in lasts] == [4, 4, 2]
    assert timer.take() is None  # those tasks' figures went with them, not into the shared timer


def test_the_longest_two_tasks_merge_exactly() -> None:
    stats = RunStats("multiprocessing")
    stats.add_task(TaskStats("cpu worker 0", 6.0, tasks=3, longest=3.0, second_longest=2.0))
    stats.add_task(TaskStats("cpu worker 1", 2.5, tasks=1))
    stats.add_task(TaskStats("cpu worker 1", 4.0, tasks=4, longest=2.8, second_longest=0.5))
    assert (stats.max_task_seconds, stats.second_task_seconds) == (3.0, 2.8)
    assert stats.task_seconds == pytest.approx(12.5)
    assert [stats.process(f"cpu worker {i}").tasks for i in (0, 1)] == [3, 5]


def test_summed_stats_survive_pickling() -> None:
    import pickle

    row = TaskStats("cpu worker 2", 1.5, [(0, "read the source", 4, 4, 1, 0.1)], 0.2, {}, 7, 0.9, 0.4)
    assert pickle.loads(pickle.dumps(row)) == row


def _collect(stream: sp.Stream) -> tuple[list[Any], RunStats]:
    with sp.collect_stats() as collected:
        out = stream.to_list()
    return out, collected.runs[0]


@pytest.mark.parametrize(
    "options",
    [
        {"backend": "multiprocessing", "num_cpu_workers": 2},
        {"backend": "multiprocessing", "num_cpu_workers": 2, "deterministic": False},
        {"backend": "multiprocessing", "num_cpu_workers": 2, "max_task_retries": 1},  # per-task stats
        {"backend": "threads", "num_cpu_workers": 3},
    ],
    ids=["mp", "mp-nondeterministic", "mp-retries", "threads"],
)
# Forked workers inherit the patched interval; they run no torch (fork's warning is moot here).
@pytest.mark.filterwarnings("ignore:process_start_method='fork'")
def test_every_backend_delivers_exact_counts_whatever_the_sending(
    options: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    for interval in (0.0, 1e9):  # every task's figures sent (forked workers inherit it), or only at the end
        monkeypatch.setattr(timing, "STATS_SEND_INTERVAL_S", interval)
        fork = {"process_start_method": "fork"} if options["backend"] == "multiprocessing" else {}
        stream = STREAM.set_processing(**fork, **options)
        out, stats = run_guarded(functools.partial(_collect, stream), RUN_TIMEOUT_S, f"{options}, stats sent every {interval} s")
        assert sorted(out) == sorted(x for x in range(100) if x % 2 for _ in (0, 1))
        assert _counts(stats)[:3] == STREAM_COUNTS, stats.report()
        assert sum(p.tasks for p in stats.task_runners) == 10
        assert stats.max_task_seconds >= stats.second_task_seconds > 0


def _wait_in_map(started: threading.Event, release: threading.Event) -> Any:
    def wait(x: int) -> int:
        started.set()
        release.wait(RUN_TIMEOUT_S)
        return x

    return wait


def test_the_running_stage_is_named_through_the_timed_layer() -> None:
    started, release = threading.Event(), threading.Event()
    out: list[Any] = []
    stream = sp.from_iterable(range(3)).map(abs).map(_wait_in_map(started, release))
    thread = threading.Thread(target=lambda: out.extend(stream.to_list()), name="test-stage-probe")
    thread.start()
    try:
        assert started.wait(RUN_TIMEOUT_S)
        assert stage_running_in(thread) == "stage 2 (map(_wait_in_map.<locals>.wait))"
    finally:
        release.set()
        thread.join(RUN_TIMEOUT_S)
    assert not thread.is_alive() and out == [0, 1, 2]


def test_worker_info_is_built_only_when_asked_for() -> None:
    calls: list[int] = []

    class CountingContext(ExecutionContext):
        def worker_info(self, plan: Any, task_key: int) -> Any:
            calls.append(task_key)
            return super().worker_info(plan, task_key)

    plan, tasks = _tasks(sp.from_iterable(range(20)).map(abs).set_processing(task_size=10))
    ctx = CountingContext()
    for task in tasks:
        list(run_task(plan, task, ctx))
    assert calls == []  # no op asked

    def seed_of(x: int) -> int:
        return sp.get_worker_info().seed or 0

    plan, tasks = _tasks(sp.from_iterable(range(20)).map(seed_of).set_processing(task_size=10))
    outputs = [list(run_task(plan, task, ctx)) for task in tasks]
    assert calls == [0, 1]  # once per task, however many records asked
    assert len({record for task in outputs for output in task for record in output.chunk}) == 2
