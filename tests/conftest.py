"""Fixtures shared by the whole suite: backend parametrization and the leak check."""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

import psutil
import pytest

from tests.hang_guard import describe_process, worker_processes
from tests.ray_cluster import ray_session  # noqa: F401  (the Ray session cluster: imports Ray only when used)
from tests.utils import BACKEND_CONFIGS, RAY_CONFIGS, config_id

#: How long a test's processes and threads may take to go away after it ends. Backends join
#: their workers with timeouts before returning; this only absorbs the last reaping steps.
LEAK_CHECK_TIMEOUT_S = 5.0
LEAK_CHECK_POLL_S = 0.02
THREAD_PREFIX = "streamproc-"


@pytest.fixture(
    params=[pytest.param(c, marks=pytest.mark.ray) if c in RAY_CONFIGS else c for c in BACKEND_CONFIGS], ids=config_id
)
def backend_options(request: pytest.FixtureRequest) -> dict[str, Any]:
    """``set_processing`` kwargs of one backend configuration (see ``tests.utils.BACKEND_CONFIGS``).

    A test that takes this fixture runs once per configuration; a fresh dict each time, so a
    test may change it.
    """
    if request.param in RAY_CONFIGS:
        request.getfixturevalue("ray_session")
    return dict(request.param)


def _live_children() -> list[psutil.Process]:
    # Zombies count: a child that exited but was never reaped (joined) is a leak too. The
    # resource tracker and the forkserver are not (see tests.hang_guard.MULTIPROCESSING_SERVERS).
    return worker_processes()


def _live_streamproc_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX) and t.is_alive()]


@pytest.fixture(autouse=True)
def no_leaked_processes_or_threads() -> Any:
    """Fails a test that leaves a child process or a ``streamproc-*`` thread alive.

    Waits up to ``LEAK_CHECK_TIMEOUT_S`` (a deadline loop, not a fixed sleep) for them to go,
    then kills and reaps the leaked processes. Threads cannot be killed: those alive before the
    test started are not blamed on it, so that one leaking test does not fail all the next ones.
    """
    threads_before = set(_live_streamproc_threads())
    yield

    def leaks() -> tuple[list[psutil.Process], list[threading.Thread]]:
        return _live_children(), [t for t in _live_streamproc_threads() if t not in threads_before]

    deadline = time.monotonic() + LEAK_CHECK_TIMEOUT_S
    children, threads = leaks()
    while (children or threads) and time.monotonic() < deadline:
        time.sleep(LEAK_CHECK_POLL_S)
        children, threads = leaks()
    if not children and not threads:
        return
    described = [describe_process(child) for child in children]
    for child in children:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(children, timeout=LEAK_CHECK_TIMEOUT_S)
    pytest.fail(
        f"leaked after the test: {len(children)} child process(es) {described}, "
        f"{len(threads)} thread(s) {[t.name for t in threads]}"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skips ``@pytest.mark.gpu`` tests without a CUDA device (torch imported only if needed)."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture
def ctrl_c_raises() -> Any:
    """SIGINT raises ``KeyboardInterrupt`` in the main thread during the test, whatever the runner inherited.

    A process started in the background by a shell without job control (``cmd &`` in a
    script, as a CI runner may start the suite) inherits SIGINT ignored, and Python then keeps
    it ignored: a test that sends itself Ctrl-C would wait for an interrupt that never comes.
    """
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)

