"""``sp.WorkerPool``: worker processes (and GPU workers' models) kept warm across streams.

Every stream on a pool is compared with the simple backend's output; worker pids show which
processes served it (the same ones, or a replacement after a crash). Models are counted by a
side effect in a file: ``CountingModel.to`` appends a line in whichever process moves it.
GPU workers run on the CPU device (``gpu_worker_devices=["cpu"]``), with small integer
weights, so results are exact. Every run is under the hang guard; the autouse fixture of
``tests/conftest.py`` checks that no process or thread is left once the pool is closed.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import psutil
import pytest

import streamproc as sp
from streamproc.errors import WorkerCrashedError
from tests.hang_guard import run_guarded
from tests.utils import UserError, fn_raises

RUN_TIMEOUT_S = 120
RECORDS = 60
TASK_SIZE = 6


def times_ten(x: int) -> int:
    return x * 10


def is_even(x: int) -> bool:
    return x % 2 == 0


def pair_sums(batch: list[int]) -> list[int]:
    return [a + b for a, b in zip(batch, [*batch[1:], 0])]


def killed_at(x: int) -> int:
    """SIGKILL of the worker process running record 17 (an OOM kill, from inside)."""
    if x == 17:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def three_streams() -> list[sp.Stream]:
    source = sp.from_iterable(range(RECORDS))
    return [
        source.map(times_ten),
        source.filter(is_even).map(times_ten),
        source.map_batches(pair_sums, batch_size=4),
    ]


def expected(stream: sp.Stream) -> list[Any]:
    return stream.set_processing(backend="simple", task_size=TASK_SIZE).to_list()


def on(pool: sp.WorkerPool, stream: sp.Stream, **options: Any) -> list[Any]:
    """``stream``'s output on ``pool``, under the hang guard."""
    run = stream.set_processing(pool=pool, task_size=TASK_SIZE, **options)
    return run_guarded(run.to_list, RUN_TIMEOUT_S, f"a run on {pool!r}")


def assert_reaped(pids: dict[str, int]) -> None:
    for name, pid in pids.items():
        alive = psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        assert not alive, f"{name} (pid {pid}) is still running after close()"


# -- reuse ------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:process_start_method='fork'")  # torch ran here: a true warning
@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_three_streams_on_one_pool_give_the_fresh_outputs_on_the_same_processes(method: str) -> None:
    with sp.WorkerPool(num_cpu_workers=2, process_start_method=method) as pool:
        pids = pool.worker_pids()
        assert len(pids) == 2
        for stream in three_streams():
            assert on(pool, stream) == expected(stream)
            assert pool.worker_pids() == pids
        assert pool.runs_served == 3
    assert_reaped(pids)


def test_fresh_runs_and_pool_runs_agree_unordered_too() -> None:
    stream = sp.from_iterable(range(RECORDS)).map(times_ten)
    fresh = stream.set_processing(backend="multiprocessing", num_cpu_workers=2, task_size=TASK_SIZE).to_list()
    with sp.WorkerPool(num_cpu_workers=2) as pool:
        assert on(pool, stream) == fresh
        assert sorted(on(pool, stream, deterministic=False)) == sorted(fresh)


# -- models moved once ------------------------------------------------------------------------

torch = pytest.importorskip("torch")


class CountingModel(torch.nn.Module):
    """``y = x @ W.T`` with small integer weights; every ``.to()`` appends a line to ``counter``."""

    def __init__(self, counter: str) -> None:
        super().__init__()
        self.counter = counter
        self.linear = torch.nn.Linear(4, 2, bias=False)
        with torch.no_grad():
            self.linear.weight.copy_(torch.arange(8, dtype=torch.float32).reshape(2, 4) % 3 - 1)

    def to(self, *args: Any, **kwargs: Any) -> Any:
        with open(self.counter, "a") as file:
            file.write(f"{os.getpid()}\n")
        return super().to(*args, **kwargs)

    def forward(self, batch: Any) -> Any:
        return self.linear(batch)


def encode(records: list[int]) -> Any:
    return torch.tensor([[r + k for k in range(4)] for r in records], dtype=torch.float32)


def attach(records: list[int], out: Any) -> list[tuple[int, list[int]]]:
    return [(r, [int(v) for v in row]) for r, row in zip(records, out.tolist())]


def model_stream(counter: Path, offset: int) -> sp.Stream:
    # A new model object each time: equal in content, so one device copy serves them all.
    model = CountingModel(str(counter))
    return sp.from_iterable(range(offset, offset + RECORDS)).map_gpu(encode, model, attach, batch_size=5)


def moves(counter: Path) -> list[str]:
    return counter.read_text().split() if counter.exists() else []


def test_a_model_is_moved_to_the_device_once_for_three_streams(tmp_path: Path) -> None:
    counter = tmp_path / "moves.txt"
    streams = [model_stream(counter, offset) for offset in (0, 100, 200)]
    wanted = [expected(stream) for stream in streams]
    counter.unlink()  # the simple runs moved their models in this process
    with sp.WorkerPool(num_cpu_workers=2, gpu_worker_devices=["cpu"]) as pool:
        gpu_pid = pool.worker_pids()["gpu worker 0"]
        for stream, output in zip(streams, wanted):
            assert on(pool, stream) == output
        assert moves(counter) == [str(gpu_pid)]
    # The counter does count: a fresh run moves its model again, in its own GPU worker.
    fresh = streams[0].set_processing(num_cpu_workers=2, gpu_worker_devices=["cpu"], task_size=TASK_SIZE)
    assert run_guarded(fresh.to_list, RUN_TIMEOUT_S, "a fresh run") == wanted[0]
    assert len(moves(counter)) == 2 and moves(counter)[1] != str(gpu_pid)


def test_a_stream_without_gpu_stage_and_one_with_run_on_a_pool_with_gpu_workers(tmp_path: Path) -> None:
    counter = tmp_path / "moves.txt"
    plain, with_model = three_streams()[0], model_stream(counter, 0)
    wanted = expected(with_model)
    with sp.WorkerPool(num_cpu_workers=2, gpu_worker_devices=["cpu"]) as pool:
        assert on(pool, plain) == expected(plain)
        assert on(pool, with_model) == wanted
        assert on(pool, plain) == expected(plain)


# -- failures do not poison the pool ------------------------------------------------------------


def test_a_user_error_is_raised_and_the_next_stream_runs_on_the_same_workers() -> None:
    failing = sp.from_iterable(range(RECORDS)).map(fn_raises(at=23))
    good = three_streams()[0]
    with sp.WorkerPool(num_cpu_workers=2) as pool:
        pids = pool.worker_pids()
        with pytest.raises(UserError):
            on(pool, failing)
        assert on(pool, good) == expected(good)
        assert pool.worker_pids() == pids


@pytest.mark.parametrize("gpu_workers", [0, 1], ids=["cpu-only", "with-gpu-worker"])
def test_a_killed_worker_is_replaced_and_the_next_stream_runs(gpu_workers: int, tmp_path: Path) -> None:
    devices = ["cpu"] * gpu_workers or None
    killing = sp.from_iterable(range(RECORDS)).map(killed_at)
    good = model_stream(tmp_path / "moves.txt", 0) if gpu_workers else three_streams()[0]
    wanted = expected(good)
    with sp.WorkerPool(num_cpu_workers=2, num_gpu_workers=gpu_workers, gpu_worker_devices=devices) as pool:
        before = pool.worker_pids()
        with pytest.raises(WorkerCrashedError, match="SIGKILL"):
            on(pool, killing)
        after = pool.worker_pids()
        assert len(after) == len(before)
        assert len(set(after.values()) - set(before.values())) == 1  # one replacement
        if gpu_workers:
            assert after["gpu worker 0"] == before["gpu worker 0"]  # its models stay
        assert on(pool, good) == wanted
        assert on(pool, good) == wanted
        assert pool.restarts == 0


def test_a_crash_with_retries_is_survived_within_the_run_and_the_pool_goes_on() -> None:
    flaky = sp.from_iterable(range(RECORDS)).map(fn_raises(at=5))  # raises: not retried, reported
    good = three_streams()[2]
    with sp.WorkerPool(num_cpu_workers=2) as pool:
        with pytest.raises(UserError):
            on(pool, flaky, max_task_retries=2)
        assert on(pool, good, max_task_retries=2) == expected(good)


class FailsToLoad(torch.nn.Module):
    """A model whose unpickling raises (in the GPU worker that loads the run's forwards)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 2)

    def __setstate__(self, state: dict[str, Any]) -> None:
        raise UserError("cannot load this model")

    def forward(self, batch: Any) -> Any:
        return self.linear(batch)


def test_a_model_that_fails_to_load_fails_its_stream_not_the_gpu_worker(tmp_path: Path) -> None:
    failing = sp.from_iterable(range(RECORDS)).map_gpu(encode, FailsToLoad(), attach, batch_size=5)
    good = model_stream(tmp_path / "moves.txt", 0)
    wanted = expected(good)
    with sp.WorkerPool(num_cpu_workers=2, gpu_worker_devices=["cpu"]) as pool:
        pids = pool.worker_pids()
        with pytest.raises(UserError, match="cannot load this model"):
            on(pool, failing)
        assert on(pool, good) == wanted
        assert pool.worker_pids() == pids and pool.restarts == 0


def test_an_early_break_gives_the_workers_back() -> None:
    stream = three_streams()[0]
    with sp.WorkerPool(num_cpu_workers=2) as pool:
        pids = pool.worker_pids()

        def first_five() -> list[int]:
            taken = []
            for record in stream.set_processing(pool=pool, task_size=TASK_SIZE):
                taken.append(record)
                if len(taken) == 5:
                    break
            return taken

        assert run_guarded(first_five, RUN_TIMEOUT_S, "an early break") == expected(stream)[:5]
        gc.collect()  # the abandoned iterator shuts its run down (at once in CPython, by refcount)
        for other in three_streams():
            assert on(pool, other) == expected(other)
        assert pool.worker_pids() == pids


# -- concurrency --------------------------------------------------------------------------------


def test_streams_from_two_threads_take_turns_and_both_get_their_outputs() -> None:
    streams = three_streams()[:2]
    wanted = [expected(stream) for stream in streams]
    results: dict[int, Any] = {}

    def both() -> None:
        def run(i: int) -> None:
            try:
                results[i] = streams[i].set_processing(pool=pool, task_size=TASK_SIZE).to_list()
            except BaseException as exc:  # reported below, not lost in the thread
                results[i] = exc

        threads = [threading.Thread(target=run, args=(i,), name=f"test-client-{i}") for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    with sp.WorkerPool(num_cpu_workers=2) as pool:
        run_guarded(both, RUN_TIMEOUT_S, "two threads on one pool")
        assert [results[0], results[1]] == wanted
        assert pool.runs_served == 2


def test_a_second_stream_of_the_same_thread_that_cannot_share_is_refused_not_deadlocked() -> None:
    a, b = three_streams()[:2]
    with sp.WorkerPool(num_cpu_workers=1) as pool:

        def zipped(**options: Any) -> list[Any]:
            return list(zip(a.set_processing(pool=pool), b.set_processing(pool=pool, **options)))

        # Runs that share the workers interleave, even from one thread ...
        assert run_guarded(zipped, RUN_TIMEOUT_S, "zip of two streams on one pool") == list(zip(expected(a), expected(b)))
        # ... one that needs them alone (it retries tasks) would wait for the first for ever.
        with pytest.raises(RuntimeError, match="one at a time"):
            run_guarded(lambda: zipped(max_task_retries=1), RUN_TIMEOUT_S, "zip with a stream that cannot share")
        assert on(pool, a) == expected(a)


# -- options and lifetime -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "option",
    [{"num_cpu_workers": 2}, {"num_gpu_workers": 1}, {"gpu_worker_devices": ["cpu"]}, {"process_start_method": "spawn"}],
    ids=lambda option: next(iter(option)),
)
def test_options_the_pool_owns_are_refused_naming_them(option: dict[str, Any]) -> None:
    name = next(iter(option))
    stream = sp.from_iterable(range(3))
    with sp.WorkerPool(num_cpu_workers=1) as pool:
        with pytest.raises(ValueError, match=name):
            stream.set_processing(pool=pool, **option)
        with pytest.raises(ValueError, match=name):  # in either order
            stream.set_processing(**option).set_processing(pool=pool)


def test_another_backend_or_another_object_is_refused() -> None:
    stream = sp.from_iterable(range(3))
    with sp.WorkerPool(num_cpu_workers=1) as pool:
        with pytest.raises(ValueError, match="backend='threads'"):
            stream.set_processing(pool=pool, backend="threads")
        assert stream.set_processing(pool=pool, backend="multiprocessing").options.effective_backend == "multiprocessing"
        assert stream.set_processing(pool=pool).options.effective_backend == "multiprocessing"
    with pytest.raises(ValueError, match=r"pool must be a streamproc\.WorkerPool"):
        stream.set_processing(pool="127.0.0.1:8000")
    with pytest.raises(ValueError, match="num_cpu_workers"):
        sp.WorkerPool(num_cpu_workers=0)


def test_close_reaps_every_process_and_a_closed_pool_is_refused() -> None:
    pool = sp.WorkerPool(num_cpu_workers=2, gpu_worker_devices=["cpu"])
    pids = pool.worker_pids()
    assert len(pids) == 3
    pool.close()
    pool.close()  # idempotent
    assert_reaped(pids)
    with pytest.raises(ValueError, match="closed"):
        sp.from_iterable(range(3)).set_processing(pool=pool).to_list()


def test_garbage_collection_reaps_the_pool() -> None:
    pool = sp.WorkerPool(num_cpu_workers=2)
    stream = three_streams()[0]
    assert on(pool, stream) == expected(stream)
    pids = pool.worker_pids()
    del pool
    gc.collect()
    assert_reaped(pids)


def test_interpreter_exit_without_close_leaves_no_orphan(tmp_path: Path) -> None:
    script = (
        "import json, streamproc as sp\n"
        "pool = sp.WorkerPool(num_cpu_workers=2, gpu_worker_devices=['cpu'])\n"
        "assert sp.from_iterable(range(5)).set_processing(pool=pool).to_list() == list(range(5))\n"
        "print(json.dumps(pool.worker_pids()))\n"
    )
    paths = [str(Path(sp.__file__).parent.parent), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, paths))}
    command = [sys.executable, "-c", script]
    done = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    pids = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(pids) == 3
    assert_reaped(pids)


def test_the_docstring_example_runs() -> None:
    import doctest

    import streamproc.service.pool as module

    result = run_guarded(lambda: doctest.testmod(module), RUN_TIMEOUT_S, "the WorkerPool doctest")
    assert result.attempted == 3 and result.failed == 0
