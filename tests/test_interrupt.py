"""Ctrl-C while the source blocks: the run stops at once, whatever the number of workers.

Found with a source waiting on the network: Ctrl-C took 5 s per worker (2 workers: 10 s, 4:
20 s) and left every feeder thread alive. One feeder is inside the user's ``next()``, which
nothing can interrupt; the others waited for their turn at the source without a timeout, and
the shutdown joined each of them for ``SHUTDOWN_JOIN_TIMEOUT_S``. Now the waiting feeders return
as soon as the dispatcher stops, and the one inside the source exits, sending nothing, when the
source returns.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Optional

import pytest

import streamproc as sp
from tests import multiprocessing_fakes as fakes
from tests.utils import identity, wait_for_condition

TASK_SIZE = 3
#: How long the test waits for the source to block (worker start-up included).
BLOCKED_TIMEOUT_S = 30.0
#: From Ctrl-C to KeyboardInterrupt out of the sink. Terminating the workers takes well under
#: a second; generous for a loaded machine, and far below 5 s per worker.
MAX_INTERRUPT_S = 4.0
#: The longest the source stays blocked if the test never releases it (then it fails loudly).
SOURCE_RELEASE_TIMEOUT_S = 60.0
FEEDER_PREFIX = "streamproc-feeder-"


class BlockingSource:
    """Yields one task of records, then blocks inside ``next()`` until ``release`` is set.

    Runs in a feeder thread of the main process (iterable sources are read there).
    ``blocked`` is set, and ``reader`` names the thread, once it blocks.
    """

    def __init__(self) -> None:
        self.blocked = threading.Event()
        self.release = threading.Event()
        self.reader: Optional[str] = None

    def __iter__(self) -> Iterator[int]:
        yield from range(TASK_SIZE)
        self.reader = threading.current_thread().name
        self.blocked.set()
        if not self.release.wait(SOURCE_RELEASE_TIMEOUT_S):
            raise AssertionError("the test never released the source")
        yield from range(TASK_SIZE, 2 * TASK_SIZE)  # read after the stop: must be dropped


def feeder_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(FEEDER_PREFIX) and t.is_alive()]


def waiting_for_a_task(thread: threading.Thread) -> bool:
    """Whether ``thread`` is inside ``TaskDispatcher.next_task`` now (its stack, read at once)."""
    frame = sys._current_frames().get(thread.ident or 0)
    while frame is not None:
        if frame.f_code.co_name == "next_task" and frame.f_code.co_filename.endswith("dispatch.py"):
            return True
        frame = frame.f_back
    return False


def interrupt_main_when_blocked(source: BlockingSource, num_workers: int, interrupted_at: list[float]) -> None:
    """Test thread: Ctrl-C to the main thread once the source blocks and every feeder waits on it.

    ``pthread_kill`` targets the main thread, so its wait for results returns EINTR at once,
    as with a Ctrl-C at a terminal.
    """
    if not source.blocked.wait(BLOCKED_TIMEOUT_S):
        return
    wait_for_condition(
        lambda: len(feeder_threads()) == num_workers and all(waiting_for_a_task(t) for t in feeder_threads()),
        BLOCKED_TIMEOUT_S,
        message="every feeder to wait in next_task",
    )
    interrupted_at.append(time.monotonic())
    signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)


@pytest.mark.parametrize("num_workers", [2, 4])
def test_ctrl_c_while_the_source_blocks(num_workers, ctrl_c_raises):
    source = BlockingSource()
    stream = (
        sp.from_iterable(source)
        .map(identity)
        .set_processing(backend="multiprocessing", num_cpu_workers=num_workers, task_size=TASK_SIZE)
    )
    interrupted_at: list[float] = []
    interrupter = threading.Thread(
        target=interrupt_main_when_blocked, args=(source, num_workers, interrupted_at), name="test-interrupter", daemon=True
    )
    interrupter.start()
    try:
        with pytest.raises(KeyboardInterrupt), pytest.warns(RuntimeWarning, match=r"BlockingSource.*still blocked in next\(\)"):
            stream.to_list()
        elapsed = time.monotonic() - interrupted_at[0]
        interrupter.join(BLOCKED_TIMEOUT_S)
        # Every feeder but the one inside the source has exited, and every worker is reaped.
        assert [t.name for t in feeder_threads()] == [source.reader]
        assert fakes.live_worker_processes() == []
        assert elapsed < MAX_INTERRUPT_S, f"KeyboardInterrupt took {elapsed:.1f} s with {num_workers} workers"
    finally:
        source.release.set()
    # The last feeder exits once the source returns, sending nothing.
    wait_for_condition(lambda: feeder_threads() == [], message="the feeder inside the source to exit")
