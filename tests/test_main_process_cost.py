"""What the main process holds before it forks workers, and the collector's wait (issue 10).

Every module the main process imports before a run forks its workers is counted again in
each forked worker's RSS, so ``import streamproc`` and a CPU-only run import only what they
use: the warm-pool client (``secrets`` -> ``hmac`` -> OpenSSL), the GPU worker and the stats
helpers come on first use. Checked in fresh interpreters (the test runner has them loaded).

The collector's :class:`ResultWaiter` keeps one selector between waits and rebuilds it when
the live workers change; tested here with real pipes and fake worker handles, no process.
"""

from __future__ import annotations

import multiprocessing.connection
from dataclasses import dataclass, field
from typing import Any

import pytest

import streamproc as sp
from streamproc.backends.multiprocessing.result_wait import ResultWaiter
from tests.test_imports import run_python

#: What neither ``import streamproc`` nor a CPU-only multiprocessing run may import.
NOT_IMPORTED_BY_A_CPU_RUN = (
    "hashlib",
    "hmac",
    "secrets",
    "streamproc.service.client",
    "streamproc.service.pool",
    "streamproc.backends.multiprocessing.gpu_worker",
)
#: ... and what ``import streamproc`` alone does not import either (a run may).
NOT_IMPORTED_BY_IMPORT = (*NOT_IMPORTED_BY_A_CPU_RUN, "streamproc.bottleneck", "dill", "streamproc.backends.multiprocessing")


def test_import_streamproc_leaves_out_what_a_run_does_not_need(tmp_path):
    code = f"""
        import sys
        import streamproc
        print(sorted(m for m in {NOT_IMPORTED_BY_IMPORT!r} if m in sys.modules))
    """
    assert run_python(code, tmp_path) == "[]"


def test_a_cpu_only_run_forks_without_the_warm_pool_client_or_the_gpu_worker(tmp_path):
    code = f"""
        import sys
        import streamproc as sp
        from streamproc.backends.multiprocessing import pool

        at_fork = []
        start = pool.ProcessPool.start
        def recording_start(self, *args, **kwargs):
            at_fork.extend(m for m in {NOT_IMPORTED_BY_A_CPU_RUN!r} if m in sys.modules)
            return start(self, *args, **kwargs)
        pool.ProcessPool.start = recording_start
        stream = sp.from_iterable(range(50)).map(abs)
        out = stream.set_processing(backend="multiprocessing", num_cpu_workers=2, process_start_method="fork").to_list()
        print(out == list(range(50)), sorted(at_fork))
    """
    assert run_python(code, tmp_path) == "True []"


@pytest.mark.parametrize("name", sorted(sp.__all__))
def test_every_public_name_resolves(name):
    assert getattr(sp, name) is not None
    assert name in dir(sp)


def test_the_lazy_names_are_the_modules_objects():
    from streamproc.service.pool import WorkerPool
    from streamproc.stats import RunStats

    assert sp.WorkerPool is WorkerPool and sp.RunStats is RunStats


def test_an_unknown_attribute_raises_attribute_error_naming_it():
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        sp.no_such_name  # noqa: B018


# --- ResultWaiter ----------------------------------------------------------------------------


@dataclass
class FakeProcess:
    sentinel: Any


@dataclass(eq=False)
class FakeWorker:
    """A worker handle's two waited-on ends: its result pipe and (a pipe standing in for) its sentinel."""

    name: str
    result_conn: Any = None
    process: Any = None
    _writers: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.result_conn, result_writer = multiprocessing.connection.Pipe(duplex=False)
        sentinel_reader, sentinel_writer = multiprocessing.connection.Pipe(duplex=False)
        self.process = FakeProcess(sentinel_reader.fileno())
        self._writers = [result_writer, sentinel_writer, sentinel_reader]

    def send_result(self) -> None:
        self._writers[0].send_bytes(b"result")

    def end(self) -> None:
        self._writers[1].send_bytes(b"")  # the sentinel becomes readable, as a dead process's does

    def close(self) -> None:
        for conn in (self.result_conn, *self._writers):
            conn.close()


@pytest.fixture
def waiter_and_workers():
    wakeup_reader, wakeup_writer = multiprocessing.connection.Pipe(duplex=False)
    workers = [FakeWorker("a"), FakeWorker("b")]
    waiter = ResultWaiter(wakeup_reader)
    yield waiter, workers, wakeup_writer
    waiter.close()
    waiter.close()  # idempotent
    for worker in workers:
        worker.close()
    wakeup_reader.close()
    wakeup_writer.close()


def test_nothing_ready_returns_nothing_after_the_timeout(waiter_and_workers):
    waiter, workers, _ = waiter_and_workers
    assert waiter.wait(workers, 0.01) == []


def test_reports_results_then_ended_workers_then_the_wakeup(waiter_and_workers):
    waiter, (a, b), wakeup_writer = waiter_and_workers
    wakeup_writer.send_bytes(b"")
    a.end()
    b.send_result()
    assert waiter.wait([a, b], 1.0) == [("result", b), ("exited", a), ("wakeup", None)]


def test_keeps_its_selector_while_the_live_workers_stay_the_same(waiter_and_workers):
    waiter, (a, b), _ = waiter_and_workers
    waiter.wait([a, b], 0)
    selector = waiter._selector
    a.send_result()
    assert waiter.wait([a, b], 1.0) == [("result", a)]
    assert waiter._selector is selector


def test_a_replaced_or_reaped_worker_is_no_longer_waited_on(waiter_and_workers):
    waiter, (a, b), _ = waiter_and_workers
    waiter.wait([a, b], 0)
    a.send_result()
    assert waiter.wait([b], 0.01) == []  # a was reaped: its pipe is not waited on any more
    replacement = FakeWorker("a2")
    try:
        replacement.send_result()
        assert waiter.wait([replacement, b], 1.0) == [("result", replacement)]
    finally:
        waiter.close()
        replacement.close()


# --- WorkerSlot: what the main process holds of the tasks in flight ----------------------------


@pytest.mark.parametrize("keeps_payloads", [True, False])
def test_a_slot_holds_the_payloads_of_tasks_in_flight_only_when_asked(keeps_payloads):
    from streamproc.backends.multiprocessing.feeder import WorkerSlot
    from streamproc.execution.serialization import dumps_message, loads_message
    from streamproc.execution.task import Task

    reader, writer = multiprocessing.connection.Pipe(duplex=False)
    try:
        slot = WorkerSlot(writer, b"", b"", keeps_payloads=keeps_payloads)
        task = Task(3, ["a big record"], run_id=7, key=5)
        slot.send_task(task, dumps_message(task))
        assert loads_message(reader.recv_bytes()) == task  # the worker gets the whole task
        held = slot.tasks[3]
        assert (held.index, held.run_id, held.key) == (3, 7, 5)
        assert held.payload == (["a big record"] if keeps_payloads else None)
        assert slot.finished(3) and not slot.finished(3)
    finally:
        reader.close()
        writer.close()


# --- TaskDispatcher: a change wakes only the callers it may let go on ----------------------------


def counting_notifications(condition: Any) -> list[int]:
    """Counts ``condition``'s ``notify_all`` calls (in the returned one-item list)."""
    count = [0]
    notify_all = condition.notify_all

    def counted() -> None:
        count[0] += 1
        notify_all()

    condition.notify_all = counted
    return count


def test_set_released_wakes_no_one_unless_a_caller_waits_for_the_window():
    from streamproc.execution.dispatch import TaskDispatcher

    dispatcher = TaskDispatcher(iter([(i, i) for i in range(10)]), num_workers=1, max_in_flight=5, window=2)
    first, second = dispatcher.next_task(0), dispatcher.next_task(0)
    assert (first.index, second.index) == (0, 1)  # type: ignore[union-attr]
    woken = counting_notifications(dispatcher._cond)
    dispatcher.set_released(1)  # the window moves, but no caller is held by it: no wakeup
    assert woken == [0]
    assert dispatcher.next_task(0).index == 2  # type: ignore[union-attr]
    with dispatcher._cond:
        assert not dispatcher._may_read(0)  # task 3 is outside the window [1, 3): a caller would wait
    woken[0] = 0
    dispatcher.set_released(2)
    assert woken == [1]
    assert dispatcher.next_task(0).index == 3  # type: ignore[union-attr]


def test_a_finished_task_wakes_its_own_workers_caller_not_the_others():
    import threading

    from streamproc.execution.dispatch import TaskDispatcher

    dispatcher = TaskDispatcher(iter([(i, i) for i in range(10)]), num_workers=2, max_in_flight=1, window=None)
    assert dispatcher.next_task(0).index == 0 and dispatcher.next_task(1).index == 1  # type: ignore[union-attr]
    with dispatcher._cond:  # both callers would now wait for their own worker's slot
        assert [dispatcher._condition_for(w) for w in (0, 1)] == dispatcher._slot_freed
    woken = [counting_notifications(condition) for condition in dispatcher._slot_freed]
    dispatcher.task_finished(1, 1)
    assert woken == [[0], [1]]
    got: list[Any] = []
    caller = threading.Thread(target=lambda: got.append(dispatcher.next_task(1)), name="test-caller", daemon=True)
    caller.start()
    caller.join(10)
    assert not caller.is_alive() and got[0].index == 2
    dispatcher.stop()  # wakes everyone, whatever they wait for
    assert woken == [[1], [2]]
