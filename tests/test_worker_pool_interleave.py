"""Runs sharing one ``sp.WorkerPool`` interleave task by task, each keeping its guarantees.

Overlap is proved, not timed: an op of one stream waits on a ``multiprocessing.Manager`` event
that an op of the other stream sets, in whichever worker runs it. If the pool ran its streams
one after the other (the lock it had before), the waiting stream could never see the event set
and would fail (its wait times out: ``NotInterleavedError``), or the two would deadlock, which
the hang guard reports. Every output is compared with the simple backend's; every run is under
the hang guard, and the autouse fixture of ``tests/conftest.py`` checks that no process or
thread is left once the pool (and the manager) are closed.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

import streamproc as sp
from streamproc.errors import WorkerCrashedError
from tests.hang_guard import run_guarded
from tests.utils import UserError

RUN_TIMEOUT_S = 120
#: How long an op waits for the other stream's event before failing its run.
EVENT_WAIT_S = 45
RECORDS = 60
TASK_SIZE = 6


class NotInterleavedError(Exception):
    """The other stream's op never ran while this one waited: the runs did not overlap."""


class Op:
    """``x * 10``, and on the way: sets ``sets`` (every record), waits for ``waits`` (record ``wait_at``),
    raises ``UserError`` at ``raise_at``, SIGKILLs its own process at ``kill_at`` (after ``waits``)."""

    def __init__(self, sets: Any = None, waits: Any = None, wait_at: int = 0, raise_at: Any = None, kill_at: Any = None) -> None:
        self.sets, self.waits, self.wait_at, self.raise_at, self.kill_at = sets, waits, wait_at, raise_at, kill_at
        self.__name__ = "op"

    def __call__(self, x: int) -> int:
        if self.sets is not None:
            self.sets.set()
        if self.waits is not None and x == self.wait_at and not self.waits.wait(EVENT_WAIT_S):
            raise NotInterleavedError(f"record {x} waited {EVENT_WAIT_S} s for the other stream's op")
        if x == self.raise_at:
            raise UserError(f"raised at {x}")
        if x == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return x * 10


def stream_of(op: Op, records: int = RECORDS, offset: int = 0) -> sp.Stream:
    return sp.from_iterable(range(offset, offset + records)).map(op)


def expected(records: int = RECORDS, offset: int = 0) -> list[int]:
    plain = sp.from_iterable(range(offset, offset + records)).map(times_ten)
    return plain.set_processing(backend="simple", task_size=TASK_SIZE).to_list()


def times_ten(x: int) -> int:
    return x * 10


@contextmanager
def events(count: int) -> Iterator[list[Any]]:
    """``count`` events every worker can see (a manager's proxies pickle with the plan)."""
    with multiprocessing.Manager() as manager:
        yield [manager.Event() for _ in range(count)]


def in_threads(*calls: Callable[[], Any]) -> list[Any]:
    """Runs each call in its own thread, under one hang guard; their results (or exceptions), in order."""
    results: list[Any] = [None] * len(calls)

    def run_all() -> None:
        def run(i: int) -> None:
            try:
                results[i] = calls[i]()
            except BaseException as exc:  # checked by the test, not lost in the thread
                results[i] = exc

        threads = [threading.Thread(target=run, args=(i,), name=f"test-client-{i}") for i in range(len(calls))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    run_guarded(run_all, RUN_TIMEOUT_S, f"{len(calls)} streams on one pool")
    return results


def on(pool: sp.WorkerPool, stream: sp.Stream, **options: Any) -> Callable[[], list[Any]]:
    return stream.set_processing(pool=pool, task_size=TASK_SIZE, **options).to_list


# -- overlap ------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:process_start_method='fork'")  # torch ran here: a true warning
@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_two_streams_from_two_threads_run_at_once_and_give_the_simple_outputs(method: str) -> None:
    with events(2) as (a_ran, b_ran), sp.WorkerPool(num_cpu_workers=2, process_start_method=method) as pool:
        pids = pool.worker_pids()
        # Each stream's first record waits until a record of the other ran: whichever ran first
        # under a lock would wait for ever.
        a = stream_of(Op(sets=a_ran, waits=b_ran))
        b = stream_of(Op(sets=b_ran, waits=a_ran, wait_at=100), offset=100)
        results = in_threads(on(pool, a), on(pool, b))
        assert results == [expected(), expected(offset=100)]
        assert pool.worker_pids() == pids and pool.runs_served == 2
        # Unordered runs interleave too.
        a_ran.clear()
        b_ran.clear()
        results = in_threads(on(pool, a, deterministic=False), on(pool, b, deterministic=False))
        assert [sorted(r) for r in results] == [expected(), expected(offset=100)]


def test_two_streams_of_one_thread_interleave_through_zip() -> None:
    with sp.WorkerPool(num_cpu_workers=2) as pool:
        a = stream_of(Op()).set_processing(pool=pool, task_size=TASK_SIZE)
        b = stream_of(Op(), offset=100).set_processing(pool=pool, task_size=TASK_SIZE)
        zipped = run_guarded(lambda: list(zip(a, b)), RUN_TIMEOUT_S, "zip of two streams on one pool")
        assert zipped == list(zip(expected(), expected(offset=100)))


# -- one run's end concerns that run only ---------------------------------------------------------


def test_a_user_error_in_one_run_fails_that_run_only() -> None:
    with events(1) as (a_ran,), sp.WorkerPool(num_cpu_workers=2) as pool:
        pids = pool.worker_pids()
        failing = stream_of(Op(sets=a_ran, raise_at=23))
        other = stream_of(Op(waits=a_ran, wait_at=100), offset=100)
        error, output = in_threads(on(pool, failing), on(pool, other))
        assert isinstance(error, UserError) and "raised at 23" in str(error)
        assert output == expected(offset=100)
        assert pool.worker_pids() == pids
        assert in_threads(on(pool, stream_of(Op())))[0] == expected()


def test_an_early_break_of_one_run_leaves_the_other_running() -> None:
    with events(1) as (a_ran,), sp.WorkerPool(num_cpu_workers=2) as pool:
        breaking = stream_of(Op(sets=a_ran)).set_processing(pool=pool, task_size=TASK_SIZE)

        def first_five() -> list[int]:
            taken = []
            for record in breaking:
                taken.append(record)
                if len(taken) == 5:
                    break
            return taken

        taken, output = in_threads(first_five, on(pool, stream_of(Op(waits=a_ran, wait_at=100), offset=100)))
        assert taken == expected()[:5]
        assert output == expected(offset=100)
        assert in_threads(on(pool, stream_of(Op())))[0] == expected()
        assert pool.runs_served == 3


def test_a_killed_worker_fails_the_run_that_had_a_task_there_and_the_other_goes_on() -> None:
    with events(3) as (b_running, a_ran, kill_now), sp.WorkerPool(num_cpu_workers=2) as pool:
        before = pool.worker_pids()
        # B: one task, which starts before A's first, waits for one of A's records (overlap),
        # and is over before A's record 17 kills its worker (once B's consumer saw its output).
        small = stream_of(Op(sets=b_running, waits=a_ran, wait_at=100), records=12, offset=100)
        small_run = small.set_processing(pool=pool, task_size=12)
        killing = stream_of(Op(sets=a_ran, waits=kill_now, wait_at=17, kill_at=17))

        def run_small() -> list[int]:
            outputs = iter(small_run)
            taken = [next(outputs)]
            kill_now.set()
            return taken + list(outputs)

        def run_killing() -> list[int]:
            if not b_running.wait(EVENT_WAIT_S):
                raise NotInterleavedError("the small stream never started")
            return on(pool, killing)()

        error, output = in_threads(run_killing, run_small)
        assert isinstance(error, WorkerCrashedError) and "SIGKILL" in str(error)
        assert output == expected(records=12, offset=100)
        after = pool.worker_pids()
        assert len(after) == 2 and len(set(after.values()) - set(before.values())) == 1  # one replacement
        assert in_threads(on(pool, stream_of(Op())))[0] == expected()


def test_runs_that_retry_tasks_take_turns_with_the_others() -> None:
    with sp.WorkerPool(num_cpu_workers=2) as pool:
        results = in_threads(on(pool, stream_of(Op()), max_task_retries=1), on(pool, stream_of(Op(), offset=100)))
        assert results == [expected(), expected(offset=100)]


# -- models ---------------------------------------------------------------------------------------

torch = pytest.importorskip("torch")


def test_three_concurrent_streams_with_equal_models_load_it_once(tmp_path: Path) -> None:
    from tests.test_worker_pool import expected as simple_output
    from tests.test_worker_pool import model_stream, moves

    counter = tmp_path / "moves.txt"
    streams = [model_stream(counter, offset) for offset in (0, 100, 200)]
    wanted = [simple_output(stream) for stream in streams]
    counter.unlink()  # the simple runs moved their models in this process
    with sp.WorkerPool(num_cpu_workers=2, gpu_worker_devices=["cpu"]) as pool:
        gpu_pid = pool.worker_pids()["gpu worker 0"]
        assert in_threads(*(on(pool, stream) for stream in streams)) == wanted
        assert moves(counter) == [str(gpu_pid)]
        assert pool.restarts == 0


def test_streams_with_other_model_settings_take_turns_and_both_get_their_outputs(tmp_path: Path) -> None:
    from tests.test_worker_pool import expected as simple_output
    from tests.test_worker_pool import model_stream

    counter = tmp_path / "moves.txt"
    streams = [model_stream(counter, offset) for offset in (0, 100)]
    wanted = [simple_output(stream) for stream in streams]
    with sp.WorkerPool(num_cpu_workers=2, gpu_worker_devices=["cpu"]) as pool:
        # Another model_dtype (float32 casts nothing here) is another cache on the device: they take turns.
        results = in_threads(on(pool, streams[0]), on(pool, streams[1], model_dtype=torch.float32))
        assert results == wanted
        assert pool.runs_served == 2 and pool.restarts == 0
