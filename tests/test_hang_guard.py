"""The test harness's hang guards: ``tests.hang_guard.run_guarded`` and the per-test timeout.

Also checks that the leak probes tell multiprocessing's own servers (resource tracker,
forkserver) from workers, including workers that the forkserver starts.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest

import streamproc as sp
from tests import hang_guard
from tests import multiprocessing_fakes as fakes
from tests.conftest import _live_children
from tests.hang_guard import MULTIPROCESSING_SERVERS, run_guarded, worker_processes
from tests.utils import UserError, identity, wait_for_condition

#: The deadline of the guarded runs that hang on purpose: long enough for two forked workers
#: to start and block on a loaded machine, short enough to keep the test quick.
HUNG_RUN_DEADLINE_S = 5.0
#: How long after the deadline the guard may take to fail: kill, the run's shutdown (its join
#: timeouts), reaping, and a loaded machine.
GUARD_OVERHEAD_S = hang_guard.UNBLOCK_TIMEOUT_S + hang_guard.REAP_TIMEOUT_S
#: Bound of the waits of this file on its own helper processes and threads.
HELPER_TIMEOUT_S = 30.0


def test_guard_returns_the_result_and_reraises_the_error_as_is():
    assert run_guarded(lambda: 42, timeout_s=HELPER_TIMEOUT_S) == 42
    stream = sp.from_iterable(range(20)).map(identity).set_processing(backend="multiprocessing", num_cpu_workers=2, task_size=3)
    assert run_guarded(stream.to_list, timeout_s=HELPER_TIMEOUT_S, what="a short run") == list(range(20))

    error = UserError("from the guarded call")

    def raises() -> None:
        raise error

    with pytest.raises(UserError) as info:
        run_guarded(raises, timeout_s=HELPER_TIMEOUT_S)
    assert info.value is error
    assert info.traceback[-1].name == "raises"  # the traceback from the guarded thread is kept


def test_guard_fails_a_hung_multiprocessing_run_and_leaves_no_child():
    stream = sp.from_iterable(range(20)).map(fakes.block_forever)
    stream = stream.set_processing(backend="multiprocessing", num_cpu_workers=2, task_size=3, process_start_method="fork")
    start = time.monotonic()
    with pytest.raises(pytest.fail.Exception) as info:
        run_guarded(lambda: stream.to_list(), timeout_s=HUNG_RUN_DEADLINE_S, what="to_list over a map that blocks forever")
    elapsed = time.monotonic() - start
    message = str(info.value)

    assert message.startswith(f"deadlock: to_list over a map that blocks forever did not finish within {HUNG_RUN_DEADLINE_S:g} s")
    assert HUNG_RUN_DEADLINE_S <= elapsed < HUNG_RUN_DEADLINE_S + GUARD_OVERHEAD_S
    # Killing the workers unblocked the run, which saw them die and shut down.
    assert "after the kill, it raised WorkerCrashedError" in message, message
    assert "SIGKILL" in message
    # The stacks show the guarded thread inside the run, called from this test, and leave
    # out the guard's own thread.
    assert "(most recent call first)" in message and "in to_list" in message and "test_hang_guard.py" in message
    assert "Current thread" not in message
    assert worker_processes() == []
    assert fakes.streamproc_threads() == []
    assert not [t for t in threading.enumerate() if t.name.startswith("hang-guard-")]


def test_guard_says_when_the_guarded_thread_cannot_be_unblocked():
    release = threading.Event()  # a wait in this process: no kill can end it
    try:
        with pytest.raises(pytest.fail.Exception, match=r"^deadlock: an in-process wait did not finish within 0.2 s") as info:
            run_guarded(lambda: release.wait(HELPER_TIMEOUT_S), timeout_s=0.2, what="an in-process wait", unblock_timeout_s=0.2)
        assert "hang-guard-an in-process wait is STILL RUNNING after the kill" in str(info.value)
        assert "killed 0 process(es)" in str(info.value)
    finally:
        release.set()
    for thread in threading.enumerate():
        if thread.name.startswith("hang-guard-"):
            thread.join(HELPER_TIMEOUT_S)
            assert not thread.is_alive()


# A child that registers faulthandler on SIGUSR1 (as a worker may), says it is ready, blocks.
SIGUSR1_CHILD = textwrap.dedent(
    """
    import faulthandler, signal, sys, threading
    dump = open(sys.argv[1], "w")
    faulthandler.register(signal.SIGUSR1, file=dump, all_threads=True)
    open(sys.argv[2], "w").close()
    threading.Event().wait(60)
    """
)


def test_guard_asks_children_that_register_sigusr1_for_their_stacks(tmp_path: Path):
    dump, ready = tmp_path / "dump.txt", tmp_path / "ready"
    child = subprocess.Popen([sys.executable, "-I", "-c", SIGUSR1_CHILD, str(dump), str(ready)])
    try:
        wait_for_condition(ready.exists, HELPER_TIMEOUT_S, message="the child to register SIGUSR1")
        with pytest.raises(pytest.fail.Exception, match=r"^deadlock: ") as info:
            run_guarded(lambda: child.wait(HELPER_TIMEOUT_S), timeout_s=0.5, what="a wait on a child")
    finally:
        child.kill()
        child.wait(HELPER_TIMEOUT_S)
    assert f"asked pids [{child.pid}] to dump their stacks" in str(info.value)
    assert "after the kill, it returned -9" in str(info.value)  # child.wait() returned once killed
    assert child.returncode == -9
    assert "(most recent call first)" in dump.read_text()


def test_multiprocessing_servers_are_not_counted_as_workers(tmp_path: Path):
    # The forkserver (started with the resource tracker) is a direct child and no worker; the
    # worker it forks is a grandchild with the same command line, and is one.
    release = tmp_path / "release"
    process = multiprocessing.get_context("forkserver").Process(target=fakes.wait_for_file, args=(str(release),))
    process.start()
    try:
        me = psutil.Process()
        servers = [
            child
            for child in me.children()
            if any(server in " ".join(child.cmdline()) for server in MULTIPROCESSING_SERVERS)
        ]
        assert {"forkserver", "resource_tracker"} <= {
            name for child in servers for name in ("forkserver", "resource_tracker") if name in " ".join(child.cmdline())
        }
        workers = [p.pid for p in worker_processes()]
        assert workers == [process.pid]
        assert [p.pid for p in _live_children()] == workers
        assert psutil.Process(process.pid).ppid() in {s.pid for s in servers}  # a grandchild
    finally:
        release.touch()
        process.join(HELPER_TIMEOUT_S)
    assert process.exitcode == 0
    assert worker_processes() == []


# Run by a child pytest with this repository's pytest configuration and ``timeout = 2``: a
# plain hang, then a guarded run whose deadline is past the test's timeout.
TIMEOUT_PROBE = textwrap.dedent(
    """
    import threading

    import streamproc as sp
    from tests import multiprocessing_fakes as fakes
    from tests.hang_guard import run_guarded, worker_processes

    def test_hangs():
        threading.Event().wait(60)

    def test_guarded_run_past_the_test_timeout():
        stream = sp.from_iterable(range(20)).map(fakes.block_forever)
        stream = stream.set_processing(backend="multiprocessing", num_cpu_workers=2, process_start_method="fork")
        run_guarded(lambda: stream.to_list(), timeout_s=60)

    def test_after_the_hangs():
        assert worker_processes() == []  # the interrupted guard killed the workers
        assert not [t for t in threading.enumerate() if t.name.startswith(("streamproc-", "hang-guard-"))]
    """
)


def test_per_test_timeout_fails_the_test_and_the_run_goes_on(tmp_path: Path):
    (tmp_path / "test_probe.py").write_text(TIMEOUT_PROBE)
    root = Path(__file__).parents[1]
    command = [sys.executable, "-m", "pytest", "-c", str(root / "pyproject.toml"), "--rootdir", str(tmp_path), "-o", "timeout=2"]
    command += ["-p", "no:cacheprovider", "-q", str(tmp_path / "test_probe.py")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=HELPER_TIMEOUT_S * 2)
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "FAILED test_probe.py::test_hangs - Failed: Timeout (>2.0s) from pytest-timeout" in out, out
    assert "FAILED test_probe.py::test_guarded_run_past_the_test_timeout - Failed: Timeou" in out, out
    # timeout_method = "signal": only the tests that ran too long fail, and the run goes on.
    assert "2 failed, 1 passed" in out, out
