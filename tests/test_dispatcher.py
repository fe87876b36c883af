"""TaskDispatcher and feed_worker: the main-process half of dispatch, with real threads but no process.

Blocking is proven with bounded joins: a call that must block is still running after
``BLOCKED_CHECK_S``; a call that must return does so within ``RETURN_TIMEOUT_S``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any, Optional

import pytest

from streamproc import SerializationError
from streamproc.backends.multiprocessing.feeder import WorkerSlot, feed_worker
from streamproc.backends.multiprocessing.messages import EndRun, StartRun, Task, WorkerId
from streamproc.execution.dispatch import DispatchStopped, SourceFailed, TaskDispatcher
from streamproc.execution.serialization import dumps_message, loads_message
from tests.utils import UserError

#: How long a call that must stay blocked is watched (a negative check needs some time).
BLOCKED_CHECK_S = 0.2
#: The most a call that must return (or a woken thread) may take.
RETURN_TIMEOUT_S = 5.0
#: The most a caller waiting for its turn at the source may take to return after stop(). It is
#: notified at once; the bound is generous for a loaded machine (it used to wait forever).
STOP_WAKE_TIMEOUT_S = 2.0


class Call:
    """Runs ``fn()`` in a daemon thread; ``result()`` waits for it with a timeout."""

    def __init__(self, fn: Callable[[], Any], name: str = "test-call") -> None:
        self._value: Any = None
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, args=(fn,), name=name, daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self._value = fn()
        except BaseException as exc:
            self._error = exc

    def is_blocked(self) -> bool:
        self._thread.join(BLOCKED_CHECK_S)
        return self._thread.is_alive()

    def result(self, timeout: float = RETURN_TIMEOUT_S) -> Any:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"call still blocked after {timeout} s (deadlock?)"
        if self._error is not None:
            raise self._error
        return self._value


class CountingIterator:
    """An iterator over ``items`` that counts ``next()`` calls and raises ``fail`` at index ``fail_at``."""

    def __init__(self, items: list[Any], fail_at: Optional[int] = None, gate: Optional[threading.Event] = None) -> None:
        self.items = items
        self.fail_at = fail_at
        self.gate = gate
        self.calls = 0
        self.entered = threading.Event()
        self._position = 0

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        self.calls += 1
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(RETURN_TIMEOUT_S), "test gate never opened"
        if self.fail_at is not None and self._position == self.fail_at:
            self._position += 1
            raise UserError(f"source failed at {self.fail_at}")
        if self._position >= len(self.items):
            raise StopIteration
        self._position += 1
        return self.items[self._position - 1]


def make(items: Any, num_workers: int = 1, max_in_flight: int = 100, window: Optional[int] = None) -> TaskDispatcher:
    return TaskDispatcher(enumerate(iter(items)), num_workers, max_in_flight, window)


# -- TaskDispatcher ---------------------------------------------------------------------------


def test_hands_out_tasks_in_source_order_then_none():
    dispatcher = make("abc")
    assert [dispatcher.next_task(0) for _ in range(3)] == [Task(0, "a"), Task(1, "b"), Task(2, "c")]
    assert dispatcher.total_tasks is None
    assert dispatcher.next_task(0) is None
    assert dispatcher.total_tasks == 3
    assert dispatcher.next_task(0) is None


def test_empty_source_has_zero_tasks():
    dispatcher = make([])
    assert dispatcher.next_task(0) is None
    assert dispatcher.total_tasks == 0


def test_in_flight_bound_is_per_worker_and_released_by_task_finished():
    dispatcher = make(range(10), num_workers=2, max_in_flight=2)
    # Fairness (tests/test_dispatch_fairness.py): one task each before anyone gets a second.
    assert [dispatcher.next_task(w).index for w in (0, 1, 0)] == [0, 1, 2]
    third = Call(lambda: dispatcher.next_task(0))
    assert third.is_blocked()
    # Worker 1 has its own bound: it is not held up by worker 0.
    assert dispatcher.next_task(1) == Task(3, 3)
    dispatcher.task_finished(0)
    assert third.result() == Task(4, 4)


def test_window_bound_is_released_by_set_released():
    dispatcher = make(range(10), max_in_flight=100, window=3)
    assert [dispatcher.next_task(0).index for _ in range(3)] == [0, 1, 2]
    fourth = Call(lambda: dispatcher.next_task(0))
    assert fourth.is_blocked()
    dispatcher.set_released(0)  # no change: still blocked
    assert fourth.is_blocked()
    dispatcher.set_released(1)
    assert fourth.result() == Task(3, 3)
    # Invariant: index < released + window.
    fifth = Call(lambda: dispatcher.next_task(0))
    assert fifth.is_blocked()
    dispatcher.set_released(3)
    assert fifth.result() == Task(4, 4)
    assert dispatcher.next_task(0) == Task(5, 5)


def test_window_does_not_block_past_a_failed_task():
    dispatcher = make(range(10), window=2)
    dispatcher.next_task(0)
    dispatcher.next_task(0)
    dispatcher.fail_at(1)
    # Task 2 would be outside the window, but no task after 1 is needed: None at once.
    assert Call(lambda: dispatcher.next_task(0)).result() is None
    assert dispatcher.total_tasks == 2


def test_stop_wakes_every_blocked_call():
    dispatcher = make(range(10), num_workers=2, max_in_flight=1, window=2)
    dispatcher.next_task(0)
    dispatcher.next_task(1)
    in_flight_wait = Call(lambda: dispatcher.next_task(0))
    dispatcher.task_finished(1)
    window_wait = Call(lambda: dispatcher.next_task(1))
    assert in_flight_wait.is_blocked() and window_wait.is_blocked()
    dispatcher.stop()
    assert in_flight_wait.result() is None
    assert window_wait.result() is None
    assert dispatcher.stopping


def test_fail_at_stops_handing_out_later_tasks():
    dispatcher = make(range(10))
    for _ in range(5):
        dispatcher.next_task(0)
    dispatcher.fail_at(3)
    assert dispatcher.total_tasks == 4
    assert dispatcher.next_task(0) is None
    dispatcher.fail_at(1)  # an earlier failure lowers the total
    assert dispatcher.total_tasks == 2
    dispatcher.fail_at(2)  # a later one does not raise it again
    assert dispatcher.total_tasks == 2


def test_source_error_is_raised_once_and_ends_the_tasks():
    source = CountingIterator(["a", "b", "c"], fail_at=2)
    dispatcher = TaskDispatcher(enumerate(source), 2, 100, None)
    assert dispatcher.next_task(0) == Task(0, "a")
    assert dispatcher.next_task(1) == Task(1, "b")
    with pytest.raises(SourceFailed) as info:
        dispatcher.next_task(0)
    assert info.value.index == 2
    assert type(info.value.error) is UserError
    assert dispatcher.total_tasks == 3
    calls = source.calls
    # Regression: another feeder must not call next() on the failed source again (a failed
    # generator then raises StopIteration, which used to set total_tasks to 2 and end the
    # run as if complete, losing the error).
    assert dispatcher.next_task(1) is None
    assert dispatcher.total_tasks == 3
    assert source.calls == calls


def test_source_error_with_a_feeder_waiting_for_the_source_lock():
    gate = threading.Event()
    source = CountingIterator([], fail_at=0, gate=gate)
    dispatcher = TaskDispatcher(enumerate(source), 2, 100, None)
    first = Call(lambda: dispatcher.next_task(0))
    assert source.entered.wait(RETURN_TIMEOUT_S)
    second = Call(lambda: dispatcher.next_task(1))  # waits for the source lock
    assert second.is_blocked()
    gate.set()
    with pytest.raises(SourceFailed):
        first.result()
    assert second.result() is None
    assert dispatcher.total_tasks == 1
    assert source.calls == 1


def test_main_thread_never_waits_behind_a_slow_source():
    # A feeder is inside next() while it blocks; every method the collector calls (main
    # thread) must still return at once.
    gate = threading.Event()
    source = CountingIterator(list(range(5)), gate=gate)
    dispatcher = TaskDispatcher(enumerate(source), 2, 100, 4)
    gate.set()
    dispatcher.next_task(0)
    gate.clear()
    source.entered.clear()
    slow = Call(lambda: dispatcher.next_task(1))
    assert source.entered.wait(RETURN_TIMEOUT_S)
    assert dispatcher.reader == 1
    Call(lambda: dispatcher.task_finished(0)).result(timeout=3.0)
    Call(lambda: dispatcher.set_released(1)).result(timeout=3.0)
    Call(lambda: dispatcher.fail_at(3)).result(timeout=3.0)
    gate.set()
    assert slow.result() == Task(1, 1)
    assert dispatcher.reader is None


def test_stop_wakes_every_caller_waiting_for_the_source_at_once():
    # Ctrl-C while the source blocks: one feeder is inside next(), the others wait for their
    # turn. They used to wait on a lock without a timeout, and the shutdown joined each for
    # SHUTDOWN_JOIN_TIMEOUT_S; they must return as soon as stop() is called.
    gate = threading.Event()
    source = CountingIterator(list(range(5)), gate=gate)
    dispatcher = TaskDispatcher(enumerate(source), 4, 2, None)
    inside = Call(lambda: dispatcher.next_task(0))
    assert source.entered.wait(RETURN_TIMEOUT_S)
    waiting = [Call(lambda w=w: dispatcher.next_task(w)) for w in (1, 2, 3)]
    assert all(call.is_blocked() for call in waiting)
    dispatcher.stop()
    for call in waiting:
        assert call.result(timeout=STOP_WAKE_TIMEOUT_S) is None
    assert inside.is_blocked()  # user code: nothing can interrupt it
    assert dispatcher.reader == 0
    gate.set()
    # What it read is dropped, and its caller is told not to send anything.
    with pytest.raises(DispatchStopped):
        inside.result()
    assert dispatcher.reader is None
    assert source.calls == 1


@pytest.mark.parametrize("outcome", ["end", "error"])
def test_a_source_ending_or_failing_after_stop_raises_dispatch_stopped(outcome):
    gate = threading.Event()
    source = CountingIterator([], fail_at=0 if outcome == "error" else None, gate=gate)
    dispatcher = TaskDispatcher(enumerate(source), 1, 2, None)
    inside = Call(lambda: dispatcher.next_task(0))
    assert source.entered.wait(RETURN_TIMEOUT_S)
    dispatcher.stop()
    gate.set()
    with pytest.raises(DispatchStopped):
        inside.result()
    assert dispatcher.next_task(0) is None
    assert source.calls == 1


@pytest.mark.parametrize("window", [None, 3])
def test_concurrent_feeders_hand_out_every_task_exactly_once(window):
    num_workers, num_tasks = 4, 400
    dispatcher = make(range(num_tasks), num_workers=num_workers, max_in_flight=2, window=window)
    received: list[list[int]] = [[] for _ in range(num_workers)]
    done: set[int] = set()
    done_lock = threading.Lock()
    violations: list[str] = []

    def feeder(worker: int) -> None:
        while (task := dispatcher.next_task(worker)) is not None:
            if window is not None and task.index >= dispatcher._released + window:
                violations.append(f"task {task.index} handed out with released={dispatcher._released}")
            received[worker].append(task.index)
            with done_lock:  # the "worker" finishes it at once; the "collector" releases in order
                done.add(task.index)
                released = dispatcher._released
                while released in done:
                    released += 1
                dispatcher.set_released(released)
            dispatcher.task_finished(worker)

    calls = [Call(lambda w=w: feeder(w), name=f"test-feeder-{w}") for w in range(num_workers)]
    for call in calls:
        call.result()
    assert violations == []
    assert sorted(i for r in received for i in r) == list(range(num_tasks))
    assert all(r == sorted(r) for r in received)  # each feeder sees increasing indices
    assert dispatcher.total_tasks == num_tasks


# -- feed_worker ------------------------------------------------------------------------------


class FakeConn:
    """Stands for a task pipe: records the messages sent; optionally breaks after ``break_after``."""

    def __init__(self, break_after: Optional[int] = None) -> None:
        self.messages: list[Any] = []
        self.break_after = break_after

    def send_bytes(self, data: bytes) -> None:
        if self.break_after is not None and len(self.messages) >= self.break_after:
            raise BrokenPipeError("the worker is gone")
        self.messages.append(loads_message(data))


class Recorder:
    def __init__(self) -> None:
        self.sent: list[tuple[int, int]] = []
        self.errors: list[tuple[int, BaseException]] = []
        self.exits = 0

    def on_sent(self, worker: int, task: int) -> None:
        self.sent.append((worker, task))

    def on_error(self, task: int, error: BaseException) -> None:
        self.errors.append((task, error))

    def on_exit(self) -> None:
        self.exits += 1


#: What a run's feeder sends before the first task and after the last.
RUN_MESSAGES = {"first_message": dumps_message(StartRun(7, b"plan")), "last_message": dumps_message(EndRun(7))}


def feed(worker: int, dispatcher: TaskDispatcher, conn: FakeConn, recorder: Recorder, **messages: bytes) -> None:
    """Runs ``feed_worker`` through a :class:`WorkerSlot` over ``conn``; ``recorder.sent`` gets
    the tasks the slot recorded as sent (none finishes here)."""
    slot = WorkerSlot(conn, messages.get("first_message", b""), messages.get("last_message", b""))
    try:
        feed_worker(WorkerId("cpu", worker), dispatcher, slot, recorder.on_error, recorder.on_exit)
    finally:
        recorder.sent = [(worker, index) for index in slot.tasks]


def run_feeder(dispatcher: TaskDispatcher, conn: FakeConn, worker: int = 0) -> Recorder:
    recorder = Recorder()
    Call(lambda: feed(worker, dispatcher, conn, recorder, **RUN_MESSAGES)).result()
    return recorder


def test_feeder_sends_start_run_every_task_then_end_run():
    conn = FakeConn()
    recorder = run_feeder(make([[1, 2], [3]]), conn)
    assert conn.messages == [StartRun(7, b"plan"), Task(0, [1, 2]), Task(1, [3]), EndRun(7)]
    assert recorder.sent == [(0, 0), (0, 1)]
    assert recorder.errors == [] and recorder.exits == 1


def test_feeder_reports_an_unpicklable_record_and_stops_dispatch():
    # A generator: neither pickle nor dill (the fallback) can serialize it. (A lock would
    # not do: dill pickles locks.)
    dispatcher = make([[1], [(x for x in "ab")], [3]])
    conn = FakeConn()
    recorder = run_feeder(dispatcher, conn)
    [(task, error)] = recorder.errors
    assert task == 1
    assert isinstance(error, SerializationError)
    assert "task 1" in str(error) and "cpu worker 0" in str(error)
    assert error.__cause__ is not None
    assert dispatcher.total_tasks == 2
    assert conn.messages[1:] == [Task(0, [1]), EndRun(7)]
    assert recorder.sent == [(0, 0)]  # the failed task was never counted as sent


def test_feeder_reports_a_source_error():
    conn = FakeConn()
    recorder = run_feeder(TaskDispatcher(enumerate(CountingIterator(["a"], fail_at=1)), 1, 100, None), conn)
    [(task, error)] = recorder.errors
    assert task == 1 and type(error) is UserError
    assert conn.messages[1:] == [Task(0, "a"), EndRun(7)]
    assert recorder.exits == 1


def test_feeder_returns_quietly_when_the_pipe_breaks():
    conn = FakeConn(break_after=2)
    recorder = run_feeder(make(range(5)), conn)
    assert conn.messages[1:] == [Task(0, 0)]
    assert recorder.errors == [] and recorder.exits == 1


def test_feeder_sends_end_run_when_woken_by_stop():
    # After a complete run, shutdown() stops the dispatcher while a feeder still waits in
    # next_task (in-flight bound). Its worker must still get EndRun, or its part files stay open.
    dispatcher = make(["a", "b"], max_in_flight=1)
    conn = FakeConn()
    recorder = Recorder()
    feeder = Call(lambda: feed(0, dispatcher, conn, recorder, **RUN_MESSAGES))
    assert feeder.is_blocked()  # task 0 sent, waiting for it to finish
    dispatcher.stop()
    feeder.result()
    assert conn.messages[1:] == [Task(0, "a"), EndRun(7)]


def test_feeder_inside_the_source_when_the_run_stops_sends_nothing():
    # Its run has shut down while the source blocked: the pipe may be closed (and its
    # descriptor reused) by the time the source returns. Nothing is sent, not even EndRun.
    gate = threading.Event()
    source = CountingIterator(["a", "b"], gate=gate)
    dispatcher = TaskDispatcher(enumerate(source), 1, 2, None)
    conn = FakeConn()
    recorder = Recorder()
    feeder = Call(lambda: feed(0, dispatcher, conn, recorder))
    assert source.entered.wait(RETURN_TIMEOUT_S)
    dispatcher.stop()
    assert feeder.is_blocked()
    gate.set()
    feeder.result()
    assert conn.messages == []
    assert recorder.sent == [] and recorder.errors == [] and recorder.exits == 0


def test_a_feeder_that_exits_no_longer_holds_up_the_other_workers():
    dispatcher = make(range(10), num_workers=2, max_in_flight=2)
    run_feeder(dispatcher, FakeConn(break_after=1), worker=1)  # its worker is gone: the send of task 0 breaks
    dispatcher.task_finished(1)  # whatever became of task 0, worker 1 holds none now
    assert dispatcher.next_task(0) == Task(1, 1)
    # Worker 1 is idle, but its feeder has exited (worker_gone): worker 0 does not wait for it.
    assert Call(lambda: dispatcher.next_task(0)).result() == Task(2, 2)
