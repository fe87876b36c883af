"""Workers that run torch are never forked once torch's OpenMP pool may have started.

See NOTE [ streamproc start methods ] in streamproc/backends/multiprocessing/start_method.py.
The end-to-end tests run a user script in a fresh interpreter (``OMP_NUM_THREADS=2``, a
parallel torch op at module level, then a ``map_gpu`` stream whose forward runs parallel ops
in the workers): forked, those workers hang forever in ``gomp_team_barrier_wait_end``. A
script that does not finish within ``DEADLOCK_TIMEOUT_S`` is killed (its whole process group)
and the test fails with "deadlock". The rest are pure decisions with a fake torch.
"""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import textwrap
import types
import warnings
from multiprocessing import forkserver
from pathlib import Path

import pytest

from streamproc.backends.multiprocessing import start_method
from streamproc.backends.multiprocessing.start_method import (
    FORKSERVER_PRELOAD,
    configure_forkserver,
    default_start_method,
    forkserver_preload,
    resolve_start_method,
    torch_thread_pool_may_have_started,
)

#: The script below takes seconds (a fresh interpreter, torch imported by it and by the fork
#: server, three workers); far more means its workers hang.
DEADLOCK_TIMEOUT_S = 180
REPO_ROOT = Path(__file__).resolve().parent.parent

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork is the default on Linux only")


def fake_torch(num_threads: int, cuda_initialized: bool = False) -> types.ModuleType:
    torch = types.ModuleType("torch")
    torch.get_num_threads = lambda: num_threads  # type: ignore[attr-defined]
    torch.cuda = types.SimpleNamespace(is_initialized=lambda: cuda_initialized)  # type: ignore[attr-defined]
    return torch


# -- detecting the pool -----------------------------------------------------------------------


def test_no_torch_no_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    assert torch_thread_pool_may_have_started() is False
    assert "torch" not in sys.modules  # looked, did not import


@pytest.mark.parametrize(("num_threads", "expected"), [(1, False), (2, True), (64, True)])
def test_the_pool_may_exist_when_torch_runs_several_threads(monkeypatch, num_threads, expected) -> None:
    monkeypatch.setitem(sys.modules, "torch", fake_torch(num_threads))
    assert torch_thread_pool_may_have_started() is expected


def test_a_half_imported_torch_has_no_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", types.ModuleType("torch"))  # no get_num_threads yet
    assert torch_thread_pool_may_have_started() is False


# -- the decision -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("needs_gpu", "runs_torch", "pool", "cuda", "expected"),
    [
        (False, False, False, False, "fork"),
        (False, False, True, False, "fork"),  # workers without torch may fork
        (False, True, False, False, "fork"),  # no pool yet: fork is safe
        (False, True, True, False, "forkserver"),  # the deadlock case
        (True, True, True, False, "spawn"),  # CUDA GPU workers: spawn, as before
        (False, True, True, True, "spawn"),  # CUDA initialised here: spawn, as before
    ],
)
def test_default_start_method_on_linux(needs_gpu, runs_torch, pool, cuda, expected) -> None:
    method = default_start_method(
        needs_gpu, runs_torch=runs_torch, platform="linux", cuda_initialized=cuda, torch_pool_started=pool
    )
    assert method == expected


@pytest.mark.parametrize("platform", ["darwin", "win32"])
def test_other_platforms_always_spawn(platform: str) -> None:
    assert default_start_method(False, runs_torch=True, platform=platform, torch_pool_started=True) == "spawn"


def test_runs_torch_defaults_to_the_safe_answer() -> None:
    assert default_start_method(False, platform="linux", cuda_initialized=False, torch_pool_started=True) == "forkserver"


@linux_only
def test_resolve_reads_the_pool_state(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(forkserver._forkserver, "_preload_modules", ["__main__"])  # restored after
    monkeypatch.setitem(sys.modules, "torch", fake_torch(num_threads=4))
    assert resolve_start_method(None, needs_gpu_workers=False, runs_torch=True) == "forkserver"
    assert resolve_start_method(None, needs_gpu_workers=False, runs_torch=False) == "fork"
    monkeypatch.setitem(sys.modules, "torch", fake_torch(num_threads=1))
    assert resolve_start_method(None, needs_gpu_workers=False, runs_torch=True) == "fork"


@linux_only
def test_an_explicit_fork_is_kept_with_a_warning_naming_the_option(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", fake_torch(num_threads=2))
    with pytest.warns(RuntimeWarning, match=r"process_start_method='fork'.*hangs forever in OpenMP") as record:
        assert resolve_start_method("fork", needs_gpu_workers=False, runs_torch=True) == "fork"
    assert len(record) == 1
    assert record[0].filename == __file__  # points at the caller, not at streamproc
    assert "OMP_NUM_THREADS=1" in str(record[0].message)


@linux_only
def test_an_explicit_fork_without_risk_does_not_warn(monkeypatch: pytest.MonkeyPatch) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monkeypatch.setitem(sys.modules, "torch", fake_torch(num_threads=2))
        assert resolve_start_method("fork", needs_gpu_workers=False, runs_torch=False) == "fork"
        monkeypatch.setitem(sys.modules, "torch", fake_torch(num_threads=1))
        assert resolve_start_method("fork", needs_gpu_workers=False, runs_torch=True) == "fork"


# -- the fork server --------------------------------------------------------------------------


def test_forkserver_preload_replaces_cpythons_default() -> None:
    assert forkserver_preload(["__main__"], torch_imported=False) == list(FORKSERVER_PRELOAD)
    assert forkserver_preload(["__main__"], torch_imported=True) == [*FORKSERVER_PRELOAD, "torch"]


def test_forkserver_preload_keeps_the_users_list() -> None:
    assert forkserver_preload(["__main__", "mylib"], torch_imported=True) == ["__main__", "mylib", *FORKSERVER_PRELOAD, "torch"]
    assert forkserver_preload([], torch_imported=False) == list(FORKSERVER_PRELOAD)
    once = forkserver_preload(["__main__"], torch_imported=True)
    assert forkserver_preload(once, torch_imported=True) == once  # idempotent


@linux_only
def test_configure_forkserver_sets_the_shared_preload(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(forkserver._forkserver, "_preload_modules", ["__main__"])  # restored after
    configure_forkserver()
    expected = [*FORKSERVER_PRELOAD, *(["torch"] if "torch" in sys.modules else [])]
    assert forkserver._forkserver._preload_modules == expected


@linux_only
def test_resolving_to_forkserver_configures_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(forkserver._forkserver, "_preload_modules", ["__main__"])
    assert resolve_start_method("forkserver", needs_gpu_workers=False) == "forkserver"
    assert forkserver._forkserver._preload_modules[: len(FORKSERVER_PRELOAD)] == list(FORKSERVER_PRELOAD)


def test_preloaded_modules_exist_and_do_not_import_torch() -> None:
    """The server skips a module it cannot import, silently: a rename must fail here instead."""
    code = "import importlib, sys\n" + "".join(f"importlib.import_module({name!r})\n" for name in FORKSERVER_PRELOAD)
    code += "assert 'torch' not in sys.modules, 'a worker module imported torch'\n"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    for name in FORKSERVER_PRELOAD:
        importlib.import_module(name)


def test_start_method_module_never_imports_torch() -> None:
    code = (
        "import sys\n"
        "from streamproc.backends.multiprocessing import start_method as s\n"
        "s.torch_thread_pool_may_have_started(); s.default_start_method(False)\n"
        "assert 'torch' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert start_method.__name__ in sys.modules


# -- end to end: the run that used to hang ----------------------------------------------------

SCRIPT = """
import sys

import torch

import streamproc as sp

# Module-level warm-up, as scripts do: this parallel region starts torch's OpenMP pool.
torch.randn(2_000_000).sum()


def prepare(records):
    return torch.tensor(records, dtype=torch.float32)


def forward(batch):
    weights = torch.ones(512, 512)
    rows = batch.reshape(-1, 1).expand(-1, 512) @ weights  # a multi-threaded matmul
    return rows[:, 0] + torch.randn(2_000_000).sum() * 0  # and a multi-threaded reduction


if __name__ == "__main__":
    assert torch.get_num_threads() == 2, torch.get_num_threads()
    # deterministic=False: forward runs with the workers' OMP_NUM_THREADS=2 threads.
    options = dict(backend="multiprocessing", num_cpu_workers=2, deterministic=False, task_size=8)
    if sys.argv[1] == "gpu-worker-on-cpu":
        options.update(num_gpu_workers=1, gpu_worker_devices=["cpu"])
    else:
        options.update(num_gpu_workers=0)
    stream = sp.from_iterable(range(64)).map_gpu(prepare, forward, batch_size=4).set_processing(**options)
    outputs = stream.to_list()
    assert sorted(outputs) == [512.0 * i for i in range(64)], outputs
    print("finished", len(outputs))
"""


def run_script_or_fail_on_deadlock(script: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Runs ``script`` in its own process group; kills the group and fails on a timeout."""
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(REPO_ROOT), "PYTHONFAULTHANDLER": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,  # its own process group: the workers die with it
    )
    try:
        stdout, stderr = proc.communicate(timeout=DEADLOCK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=30)
        pytest.fail(f"deadlock: {script.name} {' '.join(args)} did not finish within {DEADLOCK_TIMEOUT_S} s\n{stderr[-3000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@linux_only
@pytest.mark.parametrize("config", ["gpu-worker-on-cpu", "forward-in-cpu-workers"])
def test_a_torch_script_with_omp_threads_does_not_hang(tmp_path: Path, config: str) -> None:
    script = tmp_path / "user_script.py"
    script.write_text(textwrap.dedent(SCRIPT))
    result = run_script_or_fail_on_deadlock(script, config)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "finished 64"
