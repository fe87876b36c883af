"""Backpressure and laziness: how much the multiprocessing backend pulls from its source.

The bounds come from the executor's constants. Only the dispatcher pulls, one whole task of an
iterable source at a time, when it hands the task out. After the consumer has read ``k``
records (one output per record, so ``ceil(k / task_size)`` tasks read):

* deterministic: task ``i`` is handed out only if ``i < released + window``, with
  ``window = REORDER_WINDOW_TASKS_PER_WORKER * workers`` and ``released`` the first task the
  sink has not fully received: at most ``ceil(k / task_size) + window`` tasks pulled;
* not deterministic: at most ``MAX_TASKS_IN_FLIGHT_PER_WORKER`` tasks per worker are
  unfinished, and the collector receives at most one finished task per worker before the sink
  reads them: at most ``ceil(k / task_size) + workers * (1 + MAX_TASKS_IN_FLIGHT_PER_WORKER)``.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

import streamproc as sp
from streamproc.backends.multiprocessing.run import MAX_TASKS_IN_FLIGHT_PER_WORKER, REORDER_WINDOW_TASKS_PER_WORKER
from tests import multiprocessing_fakes as fakes
from tests.utils import CountingSource, identity, wait_for_condition

#: A negative check ("the source is not pulled further") watches for this long.
STAYS_S = 0.3
STARTED_TIMEOUT_S = 30.0


def max_pulled(consumed: int, task_size: int, workers: int, deterministic: bool) -> int:
    """The most records the source may have yielded once the consumer has read ``consumed`` records."""
    tasks_read = math.ceil(consumed / task_size)
    if deterministic:
        return (tasks_read + REORDER_WINDOW_TASKS_PER_WORKER * workers) * task_size
    return (tasks_read + workers * (1 + MAX_TASKS_IN_FLIGHT_PER_WORKER)) * task_size


def assert_stays(predicate: Callable[[], bool], duration_s: float = STAYS_S, message: str = "") -> None:
    """Asserts ``predicate`` holds throughout ``duration_s`` (polled): a bounded negative check."""
    deadline = time.monotonic() + duration_s
    while time.monotonic() < deadline:
        assert predicate(), message
        time.sleep(0.01)


def options(**changes: Any) -> dict[str, Any]:
    return {"backend": "multiprocessing", "process_start_method": "fork", **changes}


def test_the_bound_is_not_vacuous():
    # The constants are small enough for the tests below to mean something.
    assert max_pulled(1, 10, 2, deterministic=True) < 100_000 // 10
    assert REORDER_WINDOW_TASKS_PER_WORKER >= 1 and MAX_TASKS_IN_FLIGHT_PER_WORKER >= 1


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_building_and_iter_start_nothing(method):
    source = CountingSource(range(100))
    stream = sp.from_iterable(source).map(identity).set_processing(**options(num_cpu_workers=2, process_start_method=method))
    iterator = iter(stream)
    assert source.iterations == 0 and source.pulled == 0
    assert fakes.live_worker_processes() == [] and fakes.streamproc_threads() == []
    iterator.close()
    assert source.pulled == 0


@pytest.mark.parametrize(
    ("workers", "task_size", "deterministic"),
    [(1, 10, True), (2, 10, True), (3, 7, True), (2, 10, False), (3, 1, False)],
)
def test_slow_consumer_bounds_what_is_pulled(workers, task_size, deterministic):
    source = CountingSource(range(100_000))
    stream = (
        sp.from_iterable(source)
        .map(identity)
        .set_processing(**options(num_cpu_workers=workers, task_size=task_size, deterministic=deterministic))
    )
    iterator = iter(stream)
    consumed = 0
    for pause_after in (1, task_size * 3 + 1, task_size * 10):
        while consumed < pause_after:
            next(iterator)
            consumed += 1
            assert source.pulled <= max_pulled(consumed, task_size, workers, deterministic)
        # The consumer pauses: the engine must not go on pulling past the bound.
        bound = max_pulled(consumed, task_size, workers, deterministic)
        assert_stays(lambda b=bound: source.pulled <= b, message=f"pulled {source.pulled} > {bound} after {consumed} records")
    iterator.close()
    assert source.pulled < len(source.items)


@pytest.mark.parametrize("deterministic", [True, False])
def test_bound_holds_over_a_whole_run(deterministic):
    workers, task_size = 2, 5
    source = CountingSource(range(20_000))
    stream = (
        sp.from_iterable(source)
        .map(identity)
        .set_processing(**options(num_cpu_workers=workers, task_size=task_size, deterministic=deterministic))
    )
    worst = 0
    for consumed, _ in enumerate(stream, start=1):
        worst = max(worst, source.pulled - max_pulled(consumed, task_size, workers, deterministic))
    assert worst <= 0
    assert source.pulled == 20_000


def test_a_stuck_task_holds_the_others_within_the_reorder_window(tmp_path):
    # Task 0 blocks in its worker: deterministic output cannot move on, so the others may run
    # ahead by exactly the window, and no further, however long task 0 takes.
    workers, task_size = 2, 4
    window = REORDER_WINDOW_TASKS_PER_WORKER * workers
    started, release = tmp_path / "started", tmp_path / "release"
    source = CountingSource(range(1000))
    stream = sp.from_iterable(source).map(fakes.BlockAt(0, str(started), str(release)))
    stream = stream.set_processing(**options(num_cpu_workers=workers, task_size=task_size))
    outputs: list[Any] = []
    consumer = threading.Thread(target=lambda: outputs.extend(stream), name="test-consumer", daemon=True)
    consumer.start()
    wait_for_condition(started.exists, STARTED_TIMEOUT_S, message="task 0 to start")
    wait_for_condition(lambda: source.pulled == window * task_size, 10, message=f"the window to fill ({source.pulled} pulled)")
    assert_stays(lambda: source.pulled == window * task_size, message=f"pulled {source.pulled} past the window")
    release.touch()
    consumer.join(STARTED_TIMEOUT_S)
    assert not consumer.is_alive()
    assert outputs == list(range(1000))
