"""Every way a run can end stops and reaps everything it started, within bounded time.

Success, the consumer breaking out early, ``del`` + garbage collection of a half-consumed
iterator, an exception or a KeyboardInterrupt in the consumer's loop body, a Ctrl-C while the
main process waits for results, and a source that fails. The shutdown is synchronous: right
after the iterator is closed there must be no worker process, no ``streamproc-*`` thread and
no pipe left open (checked here at once, not only by conftest's leak check, which waits).
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import psutil
import pytest

import streamproc as sp
from streamproc.backends.multiprocessing import pool as executor
from streamproc.backends.multiprocessing import worker_runtime
from streamproc.backends.multiprocessing.backend import MultiprocessingBackend
from streamproc.io.sinks import ListSink
from tests import multiprocessing_fakes as fakes
from tests.utils import CountingSource, UserError, collect_until_error, identity, wait_for_condition

#: The most an interrupted run may take to stop everything (workers stop at once when
#: terminated; SHUTDOWN_JOIN_TIMEOUT_S is for workers that do not).
MAX_STOP_S = executor.SHUTDOWN_JOIN_TIMEOUT_S
STARTED_TIMEOUT_S = 30.0


def options(method: str = "fork", **changes: Any) -> dict[str, Any]:
    return {"backend": "multiprocessing", "num_cpu_workers": 2, "task_size": 5, "process_start_method": method, **changes}


def assert_everything_stopped() -> None:
    """Checked at once: the shutdown joins and reaps before it returns."""
    assert fakes.live_worker_processes() == []
    assert fakes.streamproc_threads() == []


# -- the consumer stops early -----------------------------------------------------------------


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_consumer_breaking_out_early(method):
    source = CountingSource(range(100_000))
    stream = sp.from_iterable(source).map(identity).set_processing(**options(method))
    start = time.monotonic()
    for record in stream:
        if record == 12:
            break
    assert time.monotonic() - start < MAX_STOP_S + 10  # start-up included
    assert_everything_stopped()
    pulled = source.pulled
    assert pulled < len(source.items)
    assert source.pulled == pulled  # nothing goes on reading in the background


def test_closing_an_iterator_twice_and_after_exhaustion():
    iterator = iter(sp.from_iterable(range(20)).set_processing(**options()))
    assert next(iterator) == 0
    iterator.close()
    iterator.close()
    assert_everything_stopped()
    iterator = iter(sp.from_iterable(range(20)).set_processing(**options()))
    assert list(iterator) == list(range(20))
    iterator.close()
    assert_everything_stopped()


def test_del_of_a_half_consumed_iterator():
    iterator = iter(sp.from_iterable(range(1000)).map(identity).set_processing(**options()))
    assert next(iterator) == 0
    assert fakes.live_worker_processes()
    del iterator
    gc.collect()
    assert_everything_stopped()


class Holder:
    """A reference cycle around an iterator: only the garbage collector can free it."""

    def __init__(self, iterator: Any) -> None:
        self.iterator = iterator
        self.me = self


def test_gc_of_a_half_consumed_iterator_in_a_reference_cycle():
    holder = Holder(iter(sp.from_iterable(range(1000)).map(identity).set_processing(**options())))
    assert next(holder.iterator) == 0
    del holder
    gc.collect()
    assert_everything_stopped()


def test_gc_of_the_backend_iterator_itself():
    # The backend's own iterator, without Stream's context manager: weakref.finalize stops it.
    plan = sp.from_iterable(range(1000)).map(identity).set_processing(**options()).plan()
    handle = MultiprocessingBackend().run(plan, ListSink())
    output = next(handle)
    assert output.chunk == [0, 1, 2, 3, 4] and output.count == 5
    del handle, output
    gc.collect()
    assert_everything_stopped()


@pytest.mark.parametrize("exc_type", [UserError, KeyboardInterrupt])
def test_exception_in_the_consumer_loop_body(exc_type):
    stream = sp.from_iterable(range(1000)).map(identity).set_processing(**options())
    seen = []
    with pytest.raises(exc_type):
        for record in stream:
            seen.append(record)
            if record == 7:
                raise exc_type("raised by the consumer")
    assert seen == list(range(8))
    assert_everything_stopped()


def send_sigint_when_started(started_path: Any, done: threading.Event) -> None:
    wait_for_condition(started_path.exists, STARTED_TIMEOUT_S, message="the worker to block")
    os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C, to this process only (workers ignore it anyway)
    done.set()


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_ctrl_c_while_waiting_for_results(tmp_path, method, ctrl_c_raises):
    started, release = tmp_path / "started", tmp_path / "never-created"
    stream = sp.from_iterable(range(100)).map(fakes.BlockAt(12, str(started), str(release))).set_processing(**options(method))
    done = threading.Event()
    interrupter = threading.Thread(target=send_sigint_when_started, args=(started, done), name="test-interrupter", daemon=True)
    interrupter.start()
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        stream.to_list()  # blocked: task 2 never finishes
    assert done.is_set()
    assert time.monotonic() - start < STARTED_TIMEOUT_S + MAX_STOP_S
    interrupter.join(5)
    assert_everything_stopped()


# -- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "workers", "task_size", "fail_after"),
    [
        ("fork", 2, 5, 0),
        ("fork", 2, 5, 5),
        ("fork", 3, 5, 23),
        ("fork", 3, 1, 40),
        ("fork", 2, 64, 1000),
        ("spawn", 2, 5, 23),
    ],
)
def test_source_failing_after_k_items_gives_exactly_k_outputs(method, workers, task_size, fail_after):
    source = CountingSource(range(2000), fail_after=fail_after)
    stream = (
        sp.from_iterable(source).map(identity).set_processing(**options(method, num_cpu_workers=workers, task_size=task_size))
    )
    outputs, exc = collect_until_error(stream)
    assert type(exc) is UserError
    assert outputs == list(range(fail_after))
    assert_everything_stopped()


def test_user_error_in_a_worker_stops_everything():
    stream = sp.from_iterable(range(1000)).map(fakes.FaultAt("raise", 333, "map")).set_processing(**options())
    outputs, exc = collect_until_error(stream)
    assert type(exc) is UserError
    assert outputs == list(range(330))
    assert_everything_stopped()


def test_repeated_runs_leave_no_file_descriptor_open():
    stream = sp.from_iterable(range(100)).map(identity)

    def run_every_way() -> None:
        for method in ("fork", "spawn"):
            assert stream.set_processing(**options(method)).to_list() == list(range(100))
            iterator = iter(stream.set_processing(**options(method)))
            next(iterator)
            iterator.close()
            _, exc = collect_until_error(stream.map(fakes.FaultAt("os_exit", 50, "map")).set_processing(**options(method)))
            assert type(exc) is sp.WorkerCrashedError

    run_every_way()  # first use: the resource tracker and lazily opened library handles
    gc.collect()
    before = psutil.Process().num_fds()
    for _ in range(2):
        run_every_way()
    gc.collect()
    assert psutil.Process().num_fds() == before  # every pipe of every run was closed
    assert_everything_stopped()


# -- the parent-death watchdog ------------------------------------------------------------------


class SlowFirstTask:
    """Identity; record 0 takes a while, as a slow task does (longer than the watchdog's period)."""

    __name__ = "slow_first_task"

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __call__(self, x: int) -> int:
        if x == 0:
            time.sleep(self.seconds)  # simulated work, not synchronisation
        return x


def test_forkserver_workers_outlive_the_watchdog_period():
    # Regression: under forkserver a worker's parent is the fork server, and the watchdog,
    # which compared os.getppid() with the main process's pid, killed every worker after
    # PARENT_CHECK_INTERVAL_S ("died unexpectedly: exit code 1").
    seconds = 2.5 * worker_runtime.PARENT_CHECK_INTERVAL_S
    stream = sp.from_iterable(range(20)).map(SlowFirstTask(seconds)).set_processing(**options("forkserver"))
    assert stream.to_list() == list(range(20))


ORPHAN_SCRIPT = """
import os, sys, threading
import streamproc as sp

def block(x):
    with open(os.path.join(sys.argv[2], f"{os.getpid()}.pid"), "w") as f:
        f.write("started")
    threading.Event().wait(120)  # until the main process is killed, and this worker with it
    return x

if __name__ == "__main__":
    options = dict(backend="multiprocessing", num_cpu_workers=2, task_size=1, process_start_method=sys.argv[1])
    sp.from_iterable(range(10)).map(block).set_processing(**options).to_list()
"""


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_workers_exit_when_the_main_process_is_killed(tmp_path, method):
    # The parent-death watchdog: a worker blocked in user code exits within about
    # PARENT_CHECK_INTERVAL_S of the main process's death, under every start method.
    script, pid_dir = tmp_path / "orphan.py", tmp_path / "pids"
    script.write_text(ORPHAN_SCRIPT)
    pid_dir.mkdir()
    main = subprocess.Popen([sys.executable, str(script), method, str(pid_dir)])
    try:
        wait_for_condition(lambda: len(list(pid_dir.glob("*.pid"))) == 2, STARTED_TIMEOUT_S, message="both workers to block")
        workers = [int(p.stem) for p in pid_dir.glob("*.pid")]
    finally:
        main.kill()  # SIGKILL: no shutdown code runs in the main process
        main.wait(STARTED_TIMEOUT_S)
    timeout = 3 * worker_runtime.PARENT_CHECK_INTERVAL_S + 5
    wait_for_condition(lambda: all(_gone(pid) for pid in workers), timeout, message="orphaned workers to exit")
