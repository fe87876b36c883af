"""Fair dispatch: every idle worker gets a task before any worker gets a second one.

Found in a real-model trial: with 2 workers (2 tasks in flight each) and a 2-row-group parquet
input, the first feeder to ask got both tasks, and 2 workers took as long as 1. The rule lives
in :class:`~streamproc.execution.dispatch.TaskDispatcher`; it is tested here with threads
standing in for feeders (no process), as a pure rule with hypothesis, and end to end with 2
and 3 worker processes whose tasks can only finish if they all run at once.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from typing import Any, Optional

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import streamproc as sp
from streamproc.execution import dispatch
from streamproc.execution.dispatch import TaskDispatcher
from streamproc.execution.task import Task
from tests.multiprocessing_fakes import FILE_POLL_S, announce_started
from tests.test_dispatcher import RETURN_TIMEOUT_S, Call, CountingIterator, make
from tests.utils import UserError

# -- the rule, one feeder at a time -----------------------------------------------------------


def test_a_second_task_waits_until_every_idle_worker_has_one():
    # The trial's case: 2 workers, 2 tasks in flight each, the first feeder asks twice.
    dispatcher = make(range(10), num_workers=2, max_in_flight=2)
    assert dispatcher.next_task(0) == Task(0, 0)
    second = Call(lambda: dispatcher.next_task(0))
    assert second.is_blocked()  # worker 1 is idle: it gets the next task first
    assert dispatcher.next_task(1) == Task(1, 1)  # at once
    assert second.result() == Task(2, 2)


def test_an_idle_worker_never_waits_for_a_busy_one():
    dispatcher = make(range(10), num_workers=3, max_in_flight=2)
    assert [dispatcher.next_task(w).index for w in (0, 1, 2)] == [0, 1, 2]
    dispatcher.task_finished(1)
    # Worker 1 is idle again: it goes before 0 and 2, which hold one task each.
    waiting = [Call(lambda w=w: dispatcher.next_task(w)) for w in (0, 2)]
    assert all(call.is_blocked() for call in waiting)
    assert dispatcher.next_task(1) == Task(3, 3)
    assert sorted(call.result().index for call in waiting) == [4, 5]


def test_a_gone_worker_does_not_hold_up_the_others():
    dispatcher = make(range(10), num_workers=3, max_in_flight=2)
    assert dispatcher.next_task(0) == Task(0, 0)
    second = Call(lambda: dispatcher.next_task(0))
    assert second.is_blocked()
    dispatcher.worker_gone(1)  # its feeder exited (worker died, pipe broke)
    assert second.is_blocked()  # worker 2 is still live and idle
    dispatcher.worker_gone(2)
    assert second.result() == Task(1, 1)


def test_the_end_of_the_source_wakes_a_waiting_worker():
    dispatcher = make(["a"], num_workers=2, max_in_flight=2)
    assert dispatcher.next_task(0) == Task(0, "a")
    second = Call(lambda: dispatcher.next_task(0))
    assert second.is_blocked()  # the source may still have tasks: worker 1 goes first
    assert dispatcher.next_task(1) is None  # it finds the end
    assert second.result() is None
    assert dispatcher.total_tasks == 1


def test_a_failed_task_wakes_a_waiting_worker():
    dispatcher = make(range(10), num_workers=2, max_in_flight=2)
    assert dispatcher.next_task(0) == Task(0, 0)
    second = Call(lambda: dispatcher.next_task(0))
    assert second.is_blocked()
    dispatcher.fail_at(0)  # no task after 0 is needed: nothing left to be fair about
    assert second.result() is None


def test_stop_wakes_a_worker_waiting_for_an_idle_one():
    dispatcher = make(range(10), num_workers=2, max_in_flight=2)
    dispatcher.next_task(0)
    second = Call(lambda: dispatcher.next_task(0))
    assert second.is_blocked()
    dispatcher.stop()
    assert second.result() is None
    # A stopped dispatcher never blocks.
    assert Call(lambda: dispatcher.next_task(1)).result() is None


def test_an_idle_worker_waiting_for_the_source_goes_first():
    # Worker 0 is inside a slow source; worker 1 (busy) and worker 2 (idle) wait for it.
    # When it returns, the idle one reads next, whatever the order in which they asked.
    gate = threading.Event()
    source = CountingIterator(list(range(10)), gate=gate)
    dispatcher = TaskDispatcher(enumerate(source), 3, 2, None)
    gate.set()
    assert dispatcher.next_task(1) == Task(0, 0)
    assert dispatcher.next_task(2) == Task(1, 1)
    gate.clear()
    source.entered.clear()
    inside = Call(lambda: dispatcher.next_task(0))
    assert source.entered.wait(RETURN_TIMEOUT_S)
    dispatcher.task_finished(2)  # worker 2 is idle again, worker 1 still busy
    busy = Call(lambda: dispatcher.next_task(1))
    idle = Call(lambda: dispatcher.next_task(2))
    assert busy.is_blocked() and idle.is_blocked()
    gate.set()
    assert inside.result() == Task(2, 2)
    assert idle.result() == Task(3, 3)
    assert busy.result() == Task(4, 4)


# -- the rule as a pure function --------------------------------------------------------------

states = st.integers(min_value=1, max_value=6).flatmap(
    lambda n: st.tuples(
        st.lists(st.integers(min_value=0, max_value=3), min_size=n, max_size=n),
        st.lists(st.booleans(), min_size=n, max_size=n),
    )
)


@given(states)
def test_rule_an_idle_worker_may_always_take(state):
    in_flight, live = state
    for worker, count in enumerate(in_flight):
        if count == 0:
            assert dispatch.may_take_task(worker, in_flight, live)


@given(states)
def test_rule_a_busy_worker_takes_only_when_no_other_live_worker_is_idle(state):
    in_flight, live = state
    for worker, count in enumerate(in_flight):
        others_idle = any(live[v] and in_flight[v] == 0 for v in range(len(in_flight)) if v != worker)
        if count > 0:
            assert dispatch.may_take_task(worker, in_flight, live) == (not others_idle)


@given(states)
def test_rule_some_live_worker_may_always_take(state):
    # No deadlock from the rule alone: among the live workers, one may always go.
    in_flight, live = state
    if any(live):
        assert any(dispatch.may_take_task(w, in_flight, live) for w in range(len(live)) if live[w])


# -- the rule under real threads: every task handed out once, nothing waits forever ------------


def _simulate(num_workers: int, num_tasks: int, max_in_flight: int, window: Optional[int], lifetimes: list[Optional[int]]):
    """Feeder threads asking and "worker" threads finishing tasks on their own, as processes do.

    A worker whose lifetime is k leaves after taking k tasks (its feeder calls ``worker_gone``);
    its worker thread still finishes what it was given, so that the reorder window moves on.
    Returns the task indices each worker received.
    """
    dispatcher = TaskDispatcher(enumerate(iter(range(num_tasks))), num_workers, max_in_flight, window)
    received: list[list[int]] = [[] for _ in range(num_workers)]
    done: set[int] = set()
    lock = threading.Lock()
    violations: list[str] = []

    def finish(worker: int, index: int) -> None:
        with lock:  # the "collector": releases finished tasks in order
            done.add(index)
            released = dispatcher._released
            while released in done:
                released += 1
            dispatcher.set_released(released)
        dispatcher.task_finished(worker)

    def run_worker(worker: int, inbox: queue.Queue[Optional[int]]) -> None:
        while (index := inbox.get(timeout=RETURN_TIMEOUT_S)) is not None:
            finish(worker, index)

    def feed(worker: int, inbox: queue.Queue[Optional[int]]) -> None:
        try:
            while lifetimes[worker] is None or len(received[worker]) < lifetimes[worker]:
                task = dispatcher.next_task(worker)
                if task is None:
                    break
                if window is not None and task.index >= dispatcher._released + window:
                    violations.append(f"task {task.index} outside the window")
                received[worker].append(task.index)
                inbox.put(task.index)
        finally:
            dispatcher.worker_gone(worker)
            inbox.put(None)

    calls = []
    for worker in range(num_workers):
        inbox: queue.Queue[Optional[int]] = queue.Queue()
        calls.append(Call(lambda w=worker, q=inbox: run_worker(w, q), name=f"test-worker-{worker}"))
        calls.append(Call(lambda w=worker, q=inbox: feed(w, q), name=f"test-feeder-{worker}"))
    for call in calls:
        call.result(timeout=10.0)
    assert violations == []
    assert dispatcher.total_tasks == num_tasks
    return received


@settings(max_examples=40, deadline=None)
@given(
    st.integers(min_value=1, max_value=4).flatmap(
        lambda n: st.tuples(
            st.just(n),
            st.integers(min_value=0, max_value=40),
            st.integers(min_value=1, max_value=3),
            st.one_of(st.none(), st.integers(min_value=1, max_value=8)),
            st.lists(st.one_of(st.none(), st.integers(min_value=0, max_value=5)), min_size=n, max_size=n),
        )
    )
)
def test_concurrent_feeders_with_workers_leaving_hand_out_every_task_once(case):
    num_workers, num_tasks, max_in_flight, window, lifetimes = case
    lifetimes[0] = None  # one worker stays to the end
    received = _simulate(num_workers, num_tasks, max_in_flight, window, lifetimes)
    assert sorted(i for r in received for i in r) == list(range(num_tasks))
    assert all(r == sorted(r) for r in received)


# -- end to end: tasks that finish only if they all run at once --------------------------------

#: How long a task waits for the others to start before failing (never a hang).
BARRIER_TIMEOUT_S = 20.0


def run_with_all_tasks(value: int, directory: str, num_tasks: int) -> dict[str, int]:
    """CPU worker: marks task ``value`` started, then waits until all ``num_tasks`` have started.

    A cross-process barrier through files: it passes only if the tasks run on different
    workers at the same time. Returns the task and the pid of the worker that ran it.
    """
    announce_started(os.path.join(directory, f"started-{value}"))
    deadline = time.monotonic() + BARRIER_TIMEOUT_S
    while not all(os.path.exists(os.path.join(directory, f"started-{i}")) for i in range(num_tasks)):
        if time.monotonic() > deadline:
            started = sorted(name for name in os.listdir(directory) if name.startswith("started-"))
            raise UserError(f"task {value} waited {BARRIER_TIMEOUT_S} s for the others; started: {started}")
        time.sleep(FILE_POLL_S)  # in the worker, waiting on other processes (not how the test syncs)
    return {"task": value, "pid": os.getpid()}


def x_of(record: dict[str, Any]) -> int:
    return int(record["x"])


def _parquet_stream(tmp_path: Any, num_tasks: int) -> sp.Stream:
    path = tmp_path / "input.parquet"
    with pq.ParquetWriter(str(path), pa.schema([("x", pa.int64())])) as writer:
        for value in range(num_tasks):
            writer.write_table(pa.table({"x": [value]}))  # one row group per task
    assert pq.ParquetFile(str(path)).num_row_groups == num_tasks
    return sp.read_parquet(str(path)).map(x_of)


@pytest.mark.parametrize(
    ("source", "num_workers", "deterministic"),
    [("iterable", 2, True), ("iterable", 2, False), ("iterable", 3, True), ("parquet", 2, True)],
)
def test_as_many_tasks_as_workers_run_on_different_workers(tmp_path, source, num_workers, deterministic):
    barrier_dir = tmp_path / "barrier"
    barrier_dir.mkdir()
    stream = sp.from_iterable(range(num_workers)) if source == "iterable" else _parquet_stream(tmp_path, num_workers)
    stream = stream.map(run_with_all_tasks, kwargs={"directory": str(barrier_dir), "num_tasks": num_workers})
    outputs = stream.set_processing(
        backend="multiprocessing", num_cpu_workers=num_workers, task_size=1, deterministic=deterministic
    ).to_list()
    assert sorted(o["task"] for o in outputs) == list(range(num_workers))
    pids = {o["pid"] for o in outputs}
    assert len(pids) == num_workers, f"tasks per pid: {outputs}"
