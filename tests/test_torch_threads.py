"""torch's intra-op thread count is the same wherever ``forward`` runs, so deterministic means identical.

A float32 sum is split across threads and the partial sums are added in a different order,
so the same forward gives different bits with 1 and with 2 threads. ``forward_threads``
(``torch_threads`` if set, else 1 with ``deterministic=True``) is applied around ``forward``
in the main process (simple backend), in CPU workers (``num_gpu_workers=0``) and in GPU
workers; the main process's own count is restored after.

Every multiprocessing run here is guarded: a worker forked after torch's OpenMP pool started
hangs forever once it runs torch with two threads (see tests/test_start_method_torch.py), so
on a timeout the guard dumps tracebacks and kills the workers, and the run fails instead.
"""

from __future__ import annotations

import contextlib
import faulthandler
import sys
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import psutil
import pytest

import streamproc as sp

torch = pytest.importorskip("torch")

#: Floats per record: large enough that torch splits one sum across two threads.
ROW_LENGTH = 2_000_000
SEEDS = list(range(6))
#: A run of six records takes seconds (the fork server's start included); far more means
#: its workers hang.
RUN_TIMEOUT_S = 60.0

CONFIGS = {
    "simple": {"backend": "simple"},
    "threads": {"backend": "threads", "num_cpu_workers": 2},
    "mp-forward-in-cpu-workers": {"backend": "multiprocessing", "num_cpu_workers": 2, "num_gpu_workers": 0},
    "mp-gpu-worker-on-cpu": {
        "backend": "multiprocessing",
        "num_cpu_workers": 2,
        "num_gpu_workers": 1,
        "gpu_worker_devices": ["cpu"],
    },
}


def row_sum(seed: int) -> Any:
    """The float32 sum of ``ROW_LENGTH`` normal floats drawn from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(ROW_LENGTH, generator=generator).sum()


def prepare(records: list[int]) -> Any:
    return torch.tensor(records)


def forward_sums(seeds: Any) -> Any:
    return torch.stack([row_sum(int(seed)) for seed in seeds])


def forward_thread_count(seeds: Any) -> Any:
    """The thread count forward ran with, after a parallel region (forked workers hang there)."""
    row_sum(0)
    return torch.full((len(seeds),), torch.get_num_threads())


def postprocess(records: list[int], outputs: Any) -> list[float]:
    return outputs.tolist()


@pytest.fixture
def two_main_threads() -> Iterator[None]:
    """The main process runs torch with 2 threads (as on any multi-core machine), restored after.

    And it ran a parallel op already, as a user's script does before it runs a stream: that
    starts torch's OpenMP pool here, the state in which forking a torch worker is unsafe.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    row_sum(0)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def hang_guard(timeout_s: float = RUN_TIMEOUT_S) -> Iterator[None]:
    """Kills this process's children if the block takes longer than ``timeout_s``.

    The run then fails with ``WorkerCrashedError`` instead of hanging; the tracebacks of this
    process are dumped first, and the test fails with "deadlock" either way.
    """
    done = threading.Event()
    fired = threading.Event()

    def watch() -> None:
        if done.wait(timeout_s):
            return
        fired.set()
        faulthandler.dump_traceback(file=sys.__stderr__ or sys.stderr)
        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                child.kill()

    watchdog = threading.Thread(target=watch, name="test-hang-guard", daemon=True)
    watchdog.start()
    try:
        yield
    except BaseException:
        if fired.is_set():
            pytest.fail(f"deadlock: the run did not finish within {timeout_s} s (workers killed)")
        raise
    finally:
        done.set()
        watchdog.join(timeout=10)
    if fired.is_set():
        pytest.fail(f"deadlock: the run did not finish within {timeout_s} s (workers killed)")


def run(forward: Any, **options: Any) -> list[float]:
    stream = sp.from_iterable(SEEDS).map_gpu(prepare, forward, postprocess, batch_size=2)
    with hang_guard():
        return stream.set_processing(task_size=2, **options).to_list()


def test_the_forward_below_depends_on_the_thread_count(two_main_threads: None) -> None:
    """The premise: with 1 and with 2 threads the sums differ, so the comparison below can fail."""
    with_two = [float(row_sum(seed)) for seed in SEEDS]
    torch.set_num_threads(1)
    with_one = [float(row_sum(seed)) for seed in SEEDS]
    assert with_one != with_two
    assert np.allclose(with_one, with_two, rtol=1e-5)  # only the rounding differs


@pytest.mark.parametrize("config", [c for c in CONFIGS if c != "simple"])
def test_deterministic_outputs_are_bit_identical_to_simple(two_main_threads: None, config: str) -> None:
    expected = run(forward_sums, deterministic=True, **CONFIGS["simple"])
    actual = run(forward_sums, deterministic=True, **CONFIGS[config])
    assert np.array_equal(np.array(actual, dtype=np.float32), np.array(expected, dtype=np.float32)), (actual, expected)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_deterministic_forward_runs_single_threaded_everywhere(two_main_threads: None, config: str) -> None:
    assert run(forward_thread_count, deterministic=True, **CONFIGS[config]) == [1.0] * len(SEEDS)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_torch_threads_applies_in_every_backend(two_main_threads: None, config: str) -> None:
    expected = [2.0] * len(SEEDS)
    assert run(forward_thread_count, torch_threads=2, **CONFIGS[config]) == expected
    assert run(forward_thread_count, torch_threads=2, deterministic=False, **CONFIGS[config]) == expected


@pytest.mark.parametrize("backend", ["simple", "threads"])
@pytest.mark.parametrize("torch_threads", [None, 1, 3])
def test_the_main_process_thread_count_is_restored_after_an_in_process_run(
    two_main_threads: None, torch_threads: Any, backend: str
) -> None:
    outputs = run(forward_thread_count, torch_threads=torch_threads, **CONFIGS[backend])
    assert outputs == [float(torch_threads or 1)] * len(SEEDS)
    assert torch.get_num_threads() == 2


def test_the_thread_count_is_restored_when_forward_raises(two_main_threads: None) -> None:
    def failing_forward(seeds: Any) -> Any:
        raise ValueError("boom in forward")

    with pytest.raises(ValueError, match="boom in forward"):
        run(failing_forward, torch_threads=3, **CONFIGS["simple"])
    assert torch.get_num_threads() == 2
