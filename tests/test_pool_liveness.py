"""The process pool's liveness rules: each worker holds only its own pipe ends, any worker
exit during a run is a crash, and a spawned worker that dies at import says why.

The pool is driven directly here (no run): that is the seam a warm pool will use.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import signal
import subprocess
import sys
import textwrap
from typing import Any

import pytest

import streamproc as sp
from streamproc.backends.multiprocessing.backend import pool_for
from streamproc.backends.multiprocessing.messages import WorkerDone, WorkerStarted
from streamproc.backends.multiprocessing.pool import ProcessPool
from streamproc.execution.serialization import dumps_plan, loads_message
from tests import multiprocessing_fakes as fakes
from tests.utils import identity

#: Start-up of spawned workers importing torch on a loaded 2-core machine.
START_TIMEOUT_S = 60.0
SCRIPT_TIMEOUT_S = 120.0


def pipe_inode(fd: int, pid: str = "self") -> str:
    """``pipe:[12345]`` for a pipe descriptor (Linux /proc)."""
    return os.readlink(f"/proc/{pid}/fd/{fd}")


def pipe_inodes_of(pid: int) -> set[str]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = pipe_inode(int(fd), str(pid))
        except OSError:  # closed meanwhile
            continue
        if target.startswith("pipe:"):
            inodes.add(target)
    return inodes


def started_pool(method: str, gpu_devices: list[str]) -> ProcessPool:
    import torch

    stream = sp.from_iterable(range(4)).map(identity)
    if gpu_devices:
        stream = stream.map_gpu(torch.tensor, identity)
    plan = stream.set_processing(
        backend="multiprocessing", num_cpu_workers=2, gpu_worker_devices=gpu_devices or None, process_start_method=method
    ).plan()
    pool = pool_for(plan)
    # GPU workers with no forward to run: they wait for their CPU peers, which wait for a run.
    pool.start(dumps_plan(({}, None, None), plan) if gpu_devices else None)
    return pool


def wait_started(pool: ProcessPool) -> None:
    """Every worker said ``WorkerStarted``."""
    for worker in pool.workers:
        assert multiprocessing.connection.wait([worker.result_conn], START_TIMEOUT_S), f"{worker.id} did not start"
        assert isinstance(loads_message(worker.result_conn.recv_bytes()), WorkerStarted)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_each_worker_holds_only_its_own_pipe_ends(method):
    pool = started_pool(method, ["cpu", "cpu"])
    try:
        wait_started(pool)
        # What the main process still holds: every CPU worker's task writer and result reader, and
        # the GPU workers' status readers. No worker may hold a copy of another worker's ends.
        main_ends = {w.id: {pipe_inode(w.result_conn.fileno())} for w in pool.workers}
        for w in pool.cpu_workers:
            main_ends[w.id].add(pipe_inode(w.task_conn.fileno()))
        for worker in pool.workers:
            held = pipe_inodes_of(worker.process.pid)
            for other, inodes in main_ends.items():
                if other != worker.id:
                    assert not held & inodes, f"{worker.id} holds pipe ends of {other}"
    finally:
        pool.shutdown(broken=True)


def test_pool_shutdown_after_start_leaves_nothing():
    pool = started_pool("fork", [])
    wait_started(pool)
    pool.shutdown(broken=False)  # Stop: the idle workers exit by themselves
    assert [w.exitcode for w in pool.workers] == [0, 0]
    assert fakes.live_worker_processes() == []
    pool.shutdown(broken=False)  # idempotent


@pytest.mark.parametrize("victim", [0, 1])
@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_a_gpu_worker_exiting_with_status_0_is_a_crash(victim, method):
    # The hang of issue 7: with 2 GPU workers, os._exit(0) in forward on the second one
    # never ended the run (GPU worker 0 held its pipes; exit 0 counted as "finished").
    stream = (
        sp.from_iterable(range(60))
        .map_gpu(fakes.to_tensor, ExitOnGPUWorker(victim, fakes.plus_one), fakes.keep_records, batch_size=3)
        .set_processing(num_cpu_workers=2, gpu_worker_devices=["cpu", "cpu"], process_start_method=method, task_size=6)
    )
    with pytest.raises(sp.WorkerCrashedError, match=rf"gpu worker {victim} .*(exit code 0|no longer running)"):
        stream.to_list()


class ExitOnGPUWorker:
    """``fn``, except that it calls ``os._exit(0)`` in GPU worker ``victim`` (by process name)."""

    def __init__(self, victim: int, fn: Any) -> None:
        self.victim = victim
        self.fn = fn
        self.__name__ = f"exit_on_gpu_worker_{victim}"

    def __call__(self, batch: Any) -> Any:
        if multiprocessing.current_process().name == f"streamproc-gpu-{self.victim}":
            os._exit(0)
        return self.fn(batch)


NO_MAIN_GUARD = textwrap.dedent(
    """
    import streamproc as sp

    def double(x):
        return 2 * x

    # No `if __name__ == "__main__":`: under spawn, each worker re-imports this module.
    print(sp.from_iterable(range(10)).map(double).set_processing(
        backend="multiprocessing", num_cpu_workers=2, process_start_method="spawn").to_list())
    """
)


def test_spawn_without_a_main_guard_says_what_to_do(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(NO_MAIN_GUARD)
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=SCRIPT_TIMEOUT_S, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert result.returncode != 0
    assert "WorkerCrashedError" in result.stderr
    assert 'if __name__ == "__main__":' in result.stderr, result.stderr[-2000:]


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_a_gpu_worker_notices_its_only_cpu_peer_dying(method):
    stream = sp.from_iterable(range(4)).map_gpu(fakes.to_tensor, identity)
    plan = stream.set_processing(num_cpu_workers=1, gpu_worker_devices=["cpu"], process_start_method=method).plan()
    pool = pool_for(plan)
    pool.start(dumps_plan(({}, None, None), plan))
    try:
        wait_started(pool)
        (cpu,), (gpu,) = pool.cpu_workers, pool.gpu_workers
        os.kill(cpu.process.pid, signal.SIGKILL)
        # Not a hang: the GPU worker sees its peer gone, ends normally and says so.
        assert multiprocessing.connection.wait([gpu.result_conn], START_TIMEOUT_S), "the GPU worker did not notice"
        assert isinstance(loads_message(gpu.result_conn.recv_bytes()), WorkerDone)
        gpu.process.join(START_TIMEOUT_S)
        assert gpu.process.exitcode == 0
    finally:
        pool.shutdown(broken=True)
