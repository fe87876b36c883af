"""The threads backend: worker threads in the main process, checked against the simple backend.

The shared end-to-end suite already runs over ``backend="threads"`` (see
``tests.utils.BACKEND_CONFIGS``). Here: what only threads can show. Threads are forced to
overlap or to finish out of order with events and barriers (each wait has a timeout, so a
broken run fails instead of hanging), never with sleeps; nothing here asserts a duration.
"""

from __future__ import annotations

import gc
import os
import signal
import threading
from contextlib import closing
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import streamproc as sp
from streamproc.backends import threads as threads_backend
from streamproc.backends.base import BackendCapabilities
from streamproc.backends.registry import get_backend
from streamproc.io.sinks import ListSink
from tests.utils import (
    UserError,
    assert_records_equal,
    assert_same_as_simple,
    batch_as_record,
    collect_until_error,
    identity,
    stage_notes,
    wait_for_condition,
)

#: Upper bound of every wait on an event or a barrier in these tests.
WAIT_S = 10.0
THREADS = {"backend": "threads", "num_cpu_workers": 3}


def worker_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("streamproc-thread-")]


class BlockAt:
    """A ``map`` fn that, on record ``at``, sets ``entered`` and blocks until ``release`` is set."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.entered = threading.Event()
        self.release = threading.Event()
        self.__name__ = f"block_at_{at}"

    def __call__(self, record: int) -> int:
        if record == self.at:
            self.entered.set()
            assert self.release.wait(WAIT_S), "the test never released the blocked record"
        return record


# -- output: the simple backend's, whatever the thread count and the finishing order -----------


@pytest.mark.parametrize("num_threads", [1, 2, 3, 8])
def test_deterministic_output_is_the_simple_backends(num_threads):
    stream = (
        sp.from_iterable(range(500))
        .map(lambda x: [x] * (x % 3))
        .flatten()
        .filter(lambda x: x % 7 != 0)
        .map_batches(batch_as_record, batch_size=4)
        .set_processing(task_size=13)
    )
    assert_same_as_simple(stream, backend="threads", num_cpu_workers=num_threads)


def test_tasks_finishing_out_of_order_come_out_in_task_order():
    later_task_done = threading.Event()

    def wait_for_task_2(x: int) -> int:
        if x == 0:  # task 0 finishes only after task 2 ran in another thread
            assert later_task_done.wait(WAIT_S)
        if x == 29:
            later_task_done.set()
        return x

    base = sp.from_iterable(range(100)).set_processing(task_size=10)
    expected = base.map_batches(batch_as_record, batch_size=3).set_processing(backend="simple").to_list()
    stream = base.map(wait_for_task_2).map_batches(batch_as_record, batch_size=3).set_processing(**THREADS)
    assert stream.to_list() == expected


def test_non_deterministic_output_loses_and_duplicates_nothing():
    done_first = threading.Event()

    def last_task_first(x: int) -> int:
        if x == 0:
            assert done_first.wait(WAIT_S)
        if x == 999:
            done_first.set()
        return x

    stream = sp.from_iterable(range(1000)).map(last_task_first).set_processing(task_size=10, deterministic=False)
    outputs = stream.set_processing(backend="threads", num_cpu_workers=3).to_list()
    assert sorted(outputs) == list(range(1000))
    assert outputs != list(range(1000))  # task 0 came out after task 99


def test_each_thread_reads_parquet_through_its_own_source(tmp_path):
    # One ParquetSource shared by the threads (it keeps its last ParquetFile open) fails with
    # "ReadRangeCache did not find matching cache entry", or crashes, when threads decode row
    # groups of one file at once.
    rows = 20_000
    table = pa.table({"id": range(rows), "text": [f"row {i} " * 4 for i in range(rows)]})
    pq.write_table(table.slice(0, rows // 2), tmp_path / "a.parquet", row_group_size=50)
    pq.write_table(table.slice(rows // 2), tmp_path / "b.parquet", row_group_size=50)
    stream = sp.read_parquet(tmp_path).map(lambda r: r["id"])
    for _ in range(3):
        assert stream.set_processing(backend="threads", num_cpu_workers=4).to_list() == list(range(rows))


# -- bounded memory ---------------------------------------------------------------------------


@pytest.mark.parametrize("deterministic", [True, False], ids=["deterministic", "any-order"])
def test_threads_run_boundedly_far_ahead_of_the_consumer(deterministic):
    num_threads, task_size = 3, 5
    if deterministic:  # the reorder window: index < released + window
        ahead = threads_backend.REORDER_WINDOW_TASKS_PER_THREAD * num_threads
    else:  # queued chunks (one per task here), one per thread waiting to queue, one being read
        ahead = (threads_backend.RESULT_QUEUE_CHUNKS_PER_THREAD + 1) * num_threads + 1
    received = [0]  # records the consumer has received
    pulled_tasks = [0]
    too_far = []

    def source():  # runs in the worker threads, under the dispatcher's lock
        for i in range(3000):
            task, done = i // task_size, received[0] // task_size
            pulled_tasks[0] = max(pulled_tasks[0], task + 1)
            if task >= done + ahead:
                too_far.append((task, done))
            yield i

    stream = sp.from_iterable(source()).set_processing(
        backend="threads", num_cpu_workers=num_threads, task_size=task_size, deterministic=deterministic
    )
    for record in stream:
        if received[0] == 0:  # the consumer pauses: the threads fill what the bound allows
            wait_for_condition(lambda: pulled_tasks[0] >= min(ahead, 2 * num_threads), WAIT_S, message="threads read ahead")
        received[0] += 1
        del record
    assert received[0] == 3000
    assert too_far == []


# -- errors -----------------------------------------------------------------------------------


def test_the_users_exception_object_itself_comes_out_after_earlier_tasks():
    raised: list[BaseException] = []
    failed = threading.Event()

    def fail_in_task_1(x: int) -> int:
        if x == 0:  # task 0 finishes after task 1 failed: its outputs still come first
            assert failed.wait(WAIT_S)
        if x == 15:
            raised.append(UserError("at 15"))
            failed.set()
            raise raised[0]
        return x

    stream = sp.from_iterable(range(100)).map(fail_in_task_1).set_processing(task_size=10, **THREADS)
    outputs, exc = collect_until_error(stream)
    assert exc is raised[0]  # not a copy: nothing is pickled
    assert outputs == list(range(10))
    assert stage_notes(exc) == [f"streamproc: raised in stage 1 (map({fail_in_task_1.__qualname__}))"]
    assert any("task 1 in streamproc-thread-" in note and "threads backend" in note for note in exc.__notes__)


@pytest.mark.parametrize("exc_type", [SystemExit, KeyboardInterrupt])
def test_base_exceptions_in_user_code_propagate_as_with_the_simple_backend(exc_type):
    def exit_at_25(x: int) -> int:
        if x == 25:
            raise exc_type(3)
        return x

    stream = sp.from_iterable(range(100)).map(exit_at_25).set_processing(task_size=10)
    results = {}
    for config in [{"backend": "simple"}, THREADS]:
        outputs = []
        with pytest.raises(exc_type) as info:
            for record in stream.set_processing(**config):
                outputs.append(record)
        assert info.value.args == (3,)
        results[config["backend"]] = outputs
    assert results["threads"] == results["simple"] == list(range(20))


# -- every exit path joins every thread -------------------------------------------------------


def run_and_leave(path: str) -> None:
    stream = sp.from_iterable(range(1000)).map(identity).set_processing(task_size=10, **THREADS)
    if path == "success":
        assert stream.to_list() == list(range(1000))
    elif path == "error":
        _, exc = collect_until_error(stream.map(lambda x: 1 // (x - 500)))
        assert type(exc) is ZeroDivisionError
    elif path == "break":
        for record in stream:
            if record == 15:
                break
    elif path == "close":
        handle = get_backend("threads").run(stream.plan(), ListSink())
        assert next(handle).chunk == list(range(10))
        handle.close()
        handle.close()  # idempotent
    elif path == "garbage collection":
        iterator = iter(stream)
        assert next(iterator) == 0
        cycle: list[Any] = [iterator]
        cycle.append(cycle)  # only the cycle collector can free it
        del iterator, cycle
        gc.collect()
    elif path == "error in the consumer":
        with pytest.raises(UserError):
            for record in stream:
                if record == 15:
                    raise UserError("consumer")


@pytest.mark.parametrize("path", ["success", "error", "break", "close", "garbage collection", "error in the consumer"])
def test_no_thread_is_left_after_any_exit_path(path):
    run_and_leave(path)
    assert worker_threads() == []  # joined before the sink returned, not merely later


def test_threads_are_named_and_their_count_defaults_to_the_cpu_budget(monkeypatch):
    monkeypatch.setenv("STREAMPROC_MAX_WORKERS", "2")
    running: list[list[str]] = []  # the worker threads, while tasks 0 and 1 run at once
    both_running = threading.Barrier(2, action=lambda: running.append(sorted(t.name for t in worker_threads())), timeout=WAIT_S)
    names = set()

    def record_threads(x: int) -> int:
        if x in (0, 10):
            both_running.wait()
            names.add(threading.current_thread().name)
        return x

    sp.from_iterable(range(20)).map(record_threads).set_processing(backend="threads", task_size=10).to_list()
    assert running == [["streamproc-thread-0", "streamproc-thread-1"]]
    assert names == {"streamproc-thread-0", "streamproc-thread-1"}


def test_keyboard_interrupt_while_the_consumer_waits_stops_every_thread():
    interrupted = threading.Event()

    def on_sigint(signum: int, frame: Any) -> None:
        interrupted.set()
        raise KeyboardInterrupt

    def interrupt_at_15(x: int) -> int:
        if x == 15:
            os.kill(os.getpid(), signal.SIGINT)  # handled in the main thread, where the consumer waits
            assert interrupted.wait(WAIT_S)
        return x

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        with pytest.raises(KeyboardInterrupt):
            sp.from_iterable(range(100)).map(interrupt_at_15).set_processing(task_size=10, **THREADS).to_list()
    finally:
        signal.signal(signal.SIGINT, previous)
    assert worker_threads() == []


def test_a_thread_blocked_in_user_code_is_left_with_a_warning_naming_stage_and_task(monkeypatch):
    monkeypatch.setattr(threads_backend, "SHUTDOWN_JOIN_TIMEOUT_S", 0.2)
    block = BlockAt(15)
    stream = (
        sp.from_iterable(range(40)).map(identity).map(block).set_processing(backend="threads", num_cpu_workers=2, task_size=10)
    )
    try:
        expected = r"worker thread streamproc-thread-[01] is still in stage 2 \(map\(block_at_15\)\) of task 1 "
        with pytest.warns(RuntimeWarning, match=expected), closing(iter(stream)) as iterator:
            assert next(iterator) == 0  # task 0 ran in the other thread
            assert block.entered.wait(WAIT_S)
        stuck = worker_threads()  # the blocked thread (and on a busy machine maybe the other)
        assert stuck and all(thread.daemon for thread in stuck)
    finally:
        block.release.set()
    wait_for_condition(lambda: not worker_threads(), WAIT_S, message="the released thread ends at its next chunk")


def test_a_thread_blocked_in_the_source_is_left_with_a_warning(monkeypatch):
    monkeypatch.setattr(threads_backend, "SHUTDOWN_JOIN_TIMEOUT_S", 0.2)
    entered, release = threading.Event(), threading.Event()

    def source():
        yield from range(10)
        entered.set()
        assert release.wait(WAIT_S)
        yield from range(10, 20)

    stream = sp.from_iterable(source()).set_processing(backend="threads", num_cpu_workers=2, task_size=10)
    try:
        with pytest.warns(RuntimeWarning, match=r"is still in the source, reading a task"), closing(iter(stream)) as iterator:
            assert next(iterator) == 0
            assert entered.wait(WAIT_S)
    finally:
        release.set()
    wait_for_condition(lambda: not worker_threads(), WAIT_S, message="the released threads end")


# -- what threads allow: shared state, no pickling ---------------------------------------------


def test_callables_may_close_over_an_open_file_and_a_lock(tmp_path):
    all_running = threading.Barrier(3, timeout=WAIT_S)
    lock = threading.Lock()
    with open(tmp_path / "log.txt", "w") as log:

        def log_record(x: int) -> int:
            if x in (0, 10, 20):  # tasks 0-2 run at once: one in each thread
                all_running.wait()
            with lock:
                log.write(f"{threading.current_thread().name} {x}\n")
            return x

        outputs = sp.from_iterable(range(1000)).map(log_record).set_processing(task_size=10, **THREADS).to_list()
    assert outputs == list(range(1000))
    names, values = zip(*(line.split() for line in (tmp_path / "log.txt").read_text().splitlines()))
    assert sorted(map(int, values)) == list(range(1000))  # every record written once
    assert set(names) == {f"streamproc-thread-{i}" for i in range(3)}


def test_forward_runs_in_the_worker_threads():
    torch = pytest.importorskip("torch")
    model = torch.nn.Linear(2, 1)
    threads_seen = set()

    def forward(batch):  # type: ignore[no-untyped-def]
        threads_seen.add(threading.current_thread().name)
        return model(batch)

    def to_tensor(records):  # type: ignore[no-untyped-def]
        return torch.tensor([[float(r), 1.0] for r in records])

    stream = sp.from_iterable(range(60)).map_gpu(to_tensor, forward, batch_size=4).set_processing(task_size=10)
    expected = stream.set_processing(backend="simple").to_list()
    threads_seen.clear()
    assert_records_equal(stream.set_processing(**THREADS).to_list(), expected)
    assert threads_seen and threads_seen <= {f"streamproc-thread-{i}" for i in range(3)}


def test_several_gpu_devices_are_refused_naming_the_option():
    stream = (
        sp.from_iterable(range(4))
        .map_gpu(identity, identity)
        .set_processing(backend="threads", gpu_worker_devices=["cpu", "cpu"])
    )
    with pytest.raises(ValueError, match=r"backend='threads'.*gpu_worker_devices=\('cpu', 'cpu'\).*multiprocessing"):
        stream.to_list()


def test_sinks_write_in_the_main_process_after_finalizing_in_the_threads(tmp_path):
    backend = get_backend("threads")
    assert backend.capabilities == BackendCapabilities(writes_in_workers=False, separate_processes=False)
    stream = sp.from_iterable({"x": i} for i in range(500)).set_processing(
        backend="threads", num_cpu_workers=3, task_size=10, deterministic=False
    )
    paths = stream.write_parquet(tmp_path / "out", rows_per_file=200)
    # Part layout: 20 tasks per part, each named by its first task.
    assert [os.path.basename(p) for p in paths] == ["part-000000.parquet", "part-000020.parquet", "part-000040.parquet"]
    assert sorted(pq.read_table(tmp_path / "out").column("x").to_pylist()) == list(range(500))


def test_a_failure_of_streamproc_in_a_thread_reaches_the_consumer(monkeypatch):
    def broken_context(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("no context in this thread")

    monkeypatch.setattr(threads_backend, "ExecutionContext", broken_context)
    with pytest.raises(RuntimeError, match="no context in this thread"):
        sp.from_iterable(range(10)).set_processing(**THREADS).to_list()
    assert worker_threads() == []


def test_threads_that_vanish_without_a_word_fail_the_run_instead_of_hanging(monkeypatch):
    monkeypatch.setattr(threads_backend._ThreadRun, "_work", lambda self, worker: None)
    with pytest.raises(sp.PipelineShutdownError, match="every worker thread ended before the run was complete"):
        sp.from_iterable(range(10)).set_processing(**THREADS).to_list()
