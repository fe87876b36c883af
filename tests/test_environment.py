"""environment.py: CPU budget (fake cgroup v1/v2 trees), start method, thread caps, exit codes.

Everything runs in-process: cgroup roots point at tmp_path, the affinity mask, platform and
torch are monkeypatched, and ``os.environ`` changes go through monkeypatch so they are undone.
"""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Optional

import pytest

from streamproc.backends.multiprocessing import cpu_budget
from streamproc.backends.multiprocessing import environment as env
from streamproc.backends.multiprocessing.environment import (
    MAX_WORKERS_ENV_VAR,
    THREAD_ENV_VARS,
    cap_worker_threads,
    cpu_count,
    cuda_initialized_in_parent,
    default_num_cpu_workers,
    default_start_method,
    format_exit_code,
    resolve_start_method,
    worker_env_overrides,
)

# --- fakes ------------------------------------------------------------------------------------


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def fake_v2(root: Path, cpu_max: Optional[str], own: str = "/", parents: Optional[dict[str, str]] = None) -> Path:
    """A cgroup v2 tree: /proc/self/cgroup says ``0::own``; ``cpu.max`` in the own cgroup."""
    proc = root / "proc_self_cgroup"
    write(proc, f"0::{own}\n")
    fs = root / "fs"
    own_dir = fs.joinpath(*[p for p in own.split("/") if p])
    own_dir.mkdir(parents=True, exist_ok=True)
    if cpu_max is not None:
        write(own_dir / "cpu.max", cpu_max + "\n")
    for rel, text in (parents or {}).items():
        write(fs / rel / "cpu.max", text + "\n")
    return proc


def fake_v1(root: Path, quota: str, period: str = "100000", own: str = "/", controller_dir: str = "cpu,cpuacct") -> Path:
    """A cgroup v1 tree with the cpu controller mounted at ``fs/controller_dir``."""
    proc = root / "proc_self_cgroup"
    write(proc, f"12:memory:/whatever\n4:cpu,cpuacct:{own}\n3:cpuset:/\n")
    d = (root / "fs" / controller_dir).joinpath(*[p for p in own.split("/") if p])
    write(d / "cpu.cfs_quota_us", quota + "\n")
    write(d / "cpu.cfs_period_us", period + "\n")
    return proc


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Pretends to be a 16-core machine with no affinity limit, no cgroup and no env cap."""
    monkeypatch.setattr(env.os, "cpu_count", lambda: 16)
    monkeypatch.setattr(env.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setattr(cpu_budget, "_CGROUP_ROOT", str(tmp_path / "fs"))
    monkeypatch.setattr(cpu_budget, "_PROC_SELF_CGROUP", str(tmp_path / "proc_self_cgroup"))
    monkeypatch.delenv(MAX_WORKERS_ENV_VAR, raising=False)
    return tmp_path


# --- cgroup quota -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [("150000 100000", 1.5), ("200000 100000", 2.0), ("50000 100000", 0.5), ("max 100000", None), ("300000", 3.0)],
)
def test_cgroup_v2_cpu_max(tmp_path: Path, cpu_max: str, expected: Optional[float]) -> None:
    proc = fake_v2(tmp_path, cpu_max)
    assert cpu_budget._cgroup_cpu_quota(str(tmp_path / "fs"), str(proc)) == expected


@pytest.mark.parametrize(
    ("quota", "period", "expected"), [("250000", "100000", 2.5), ("-1", "100000", None), ("100000", "0", None)]
)
def test_cgroup_v1_cfs_quota(tmp_path: Path, quota: str, period: str, expected: Optional[float]) -> None:
    proc = fake_v1(tmp_path, quota, period)
    assert cpu_budget._cgroup_cpu_quota(str(tmp_path / "fs"), str(proc)) == expected


@pytest.mark.parametrize("controller_dir", ["cpu", "cpu,cpuacct", "cpuacct,cpu"])
def test_cgroup_v1_controller_mount_names(tmp_path: Path, controller_dir: str) -> None:
    proc = fake_v1(tmp_path, "300000", controller_dir=controller_dir)
    assert cpu_budget._cgroup_cpu_quota(str(tmp_path / "fs"), str(proc)) == 3.0


def test_cgroup_v2_own_cgroup_found_via_proc_self_cgroup(tmp_path: Path) -> None:
    proc = fake_v2(tmp_path, "400000 100000", own="/system.slice/job.scope")
    write(tmp_path / "fs" / "cpu.max", "max 100000\n")
    assert cpu_budget._cgroup_cpu_quota(str(tmp_path / "fs"), str(proc)) == 4.0


def test_cgroup_v2_parent_limit_binds_the_child(tmp_path: Path) -> None:
    proc = fake_v2(tmp_path, "800000 100000", own="/a/b", parents={"a": "200000 100000"})
    assert cpu_budget._cgroup_cpu_quota(str(tmp_path / "fs"), str(proc)) == 2.0


def test_cgroup_v1_nested_own_cgroup(tmp_path: Path) -> None:
    proc = fake_v1(tmp_path, "150000", own="/docker/abc")
    assert cpu_budget._cgroup_cpu_quota(str(tmp_path / "fs"), str(proc)) == 1.5


def test_container_without_cgroup_namespace_falls_back_to_root_files(tmp_path: Path) -> None:
    """/proc/self/cgroup names a host path that is not mounted here: read the files at the root."""
    proc = tmp_path / "proc_self_cgroup"
    write(proc, "0::/system.slice/docker-0123.scope\n")
    write(tmp_path / "fs" / "cpu.max", "200000 100000\n")
    assert cpu_budget._cgroup_cpu_quota(str(tmp_path / "fs"), str(proc)) == 2.0


def test_no_proc_self_cgroup_reads_root_files(tmp_path: Path) -> None:
    write(tmp_path / "fs" / "cpu.max", "100000 100000\n")
    assert cpu_budget._cgroup_cpu_quota(str(tmp_path / "fs"), str(tmp_path / "missing")) == 1.0


def test_hybrid_v1_and_v2_takes_the_smallest(tmp_path: Path) -> None:
    proc = tmp_path / "proc_self_cgroup"
    write(proc, "4:cpu,cpuacct:/\n0::/\n")
    write(tmp_path / "fs" / "cpu.max", "600000 100000\n")
    write(tmp_path / "fs" / "cpu" / "cpu.cfs_quota_us", "300000\n")
    write(tmp_path / "fs" / "cpu" / "cpu.cfs_period_us", "100000\n")
    assert cpu_budget._cgroup_cpu_quota(str(tmp_path / "fs"), str(proc)) == 3.0


@pytest.mark.parametrize("garbage", ["", "lots 100000", "100000 none"])
def test_unparsable_cgroup_files_are_ignored(tmp_path: Path, garbage: str) -> None:
    proc = fake_v2(tmp_path, garbage)
    assert cpu_budget._cgroup_cpu_quota(str(tmp_path / "fs"), str(proc)) is None


def test_no_cgroup_at_all(tmp_path: Path) -> None:
    assert cpu_budget._cgroup_cpu_quota(str(tmp_path / "nothing"), str(tmp_path / "nothing")) is None


def test_path_traversal_in_proc_self_cgroup_is_not_followed(tmp_path: Path) -> None:
    proc = tmp_path / "proc_self_cgroup"
    write(proc, "0::/../../elsewhere\n")
    write(tmp_path / "elsewhere" / "cpu.max", "100000 100000\n")
    write(tmp_path / "fs" / "cpu.max", "500000 100000\n")
    assert cpu_budget._cgroup_cpu_quota(str(tmp_path / "fs"), str(proc)) == 5.0


# --- cpu_count --------------------------------------------------------------------------------


def test_cpu_count_without_limits_is_os_cpu_count(machine: Path) -> None:
    assert cpu_count() == 16


def test_cpu_count_honours_affinity(machine: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(env.os, "sched_getaffinity", lambda pid: {0, 3, 5}, raising=False)
    assert cpu_count() == 3


def test_cpu_count_without_sched_getaffinity_uses_psutil(machine: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    psutil = pytest.importorskip("psutil")
    monkeypatch.delattr(env.os, "sched_getaffinity", raising=False)

    class FakeProcess:
        def cpu_affinity(self) -> list[int]:
            return [0, 1]

    monkeypatch.setattr(psutil, "Process", FakeProcess)
    assert cpu_count() == 2


@pytest.mark.parametrize(("cpu_max", "expected"), [("150000 100000", 2), ("400000 100000", 4), ("10000 100000", 1)])
def test_cpu_count_rounds_the_v2_quota_up(machine: Path, cpu_max: str, expected: int) -> None:
    fake_v2(machine, cpu_max)
    assert cpu_count() == expected


def test_cpu_count_honours_the_v1_quota(machine: Path) -> None:
    fake_v1(machine, "250000")
    assert cpu_count() == 3


def test_cpu_count_is_the_minimum_of_all_limits(machine: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_v2(machine, "800000 100000")
    monkeypatch.setattr(env.os, "sched_getaffinity", lambda pid: set(range(5)), raising=False)
    assert cpu_count() == 5
    monkeypatch.setattr(env.os, "cpu_count", lambda: 4)
    assert cpu_count() == 4


def test_cpu_count_when_os_cpu_count_is_unknown(machine: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(env.os, "cpu_count", lambda: None)
    assert cpu_count() == 1


def test_env_var_caps_cpu_count(machine: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MAX_WORKERS_ENV_VAR, "3")
    assert cpu_count() == 3
    monkeypatch.setenv(MAX_WORKERS_ENV_VAR, " 64 ")  # a cap, never a raise above the hardware
    assert cpu_count() == 16
    monkeypatch.setenv(MAX_WORKERS_ENV_VAR, "")  # blank means unset
    assert cpu_count() == 16


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_invalid_env_var_raises_naming_it(machine: Path, monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(MAX_WORKERS_ENV_VAR, value)
    with pytest.raises(ValueError, match=MAX_WORKERS_ENV_VAR):
        cpu_count()


def test_real_cpu_count_is_sane() -> None:
    assert 1 <= cpu_count() <= (os.cpu_count() or 1)


def test_default_num_cpu_workers(machine: Path) -> None:
    assert default_num_cpu_workers(0) == 16
    assert default_num_cpu_workers(2) == 14
    assert default_num_cpu_workers(16) == 1
    assert default_num_cpu_workers(100) == 1


@pytest.mark.parametrize("bad", [-1, 1.0, True, None])
def test_default_num_cpu_workers_rejects_bad_counts(bad: object) -> None:
    with pytest.raises(ValueError, match="num_gpu_workers"):
        default_num_cpu_workers(bad)  # type: ignore[arg-type]


# --- start method (the torch-pool rule: tests/test_start_method_torch.py) -------------------


@pytest.mark.parametrize(
    ("platform", "gpu", "cuda", "expected"),
    [
        ("linux", False, False, "fork"),
        ("linux", True, False, "spawn"),
        ("linux", False, True, "spawn"),
        ("linux", True, True, "spawn"),
        ("darwin", False, False, "spawn"),
        ("win32", False, False, "spawn"),
        ("darwin", True, True, "spawn"),
    ],
)
def test_default_start_method(platform: str, gpu: bool, cuda: bool, expected: str) -> None:
    assert default_start_method(gpu, platform=platform, cuda_initialized=cuda, torch_pool_started=False) == expected


def fake_torch(initialized: bool, num_threads: int = 1) -> types.ModuleType:
    torch = types.ModuleType("torch")
    torch.cuda = types.SimpleNamespace(is_initialized=lambda: initialized)  # type: ignore[attr-defined]
    calls: list[int] = []
    torch.set_num_threads = calls.append  # type: ignore[attr-defined]
    torch.get_num_threads = lambda: num_threads  # type: ignore[attr-defined]
    torch.calls = calls  # type: ignore[attr-defined]
    return torch


def test_cuda_initialized_in_parent_reads_torch_only_if_imported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    assert cuda_initialized_in_parent() is False
    assert "torch" not in sys.modules  # it did not import torch
    monkeypatch.setitem(sys.modules, "torch", fake_torch(initialized=True))
    assert cuda_initialized_in_parent() is True
    monkeypatch.setitem(sys.modules, "torch", fake_torch(initialized=False))
    assert cuda_initialized_in_parent() is False
    monkeypatch.setitem(sys.modules, "torch", types.ModuleType("torch"))  # half-imported: no .cuda
    assert cuda_initialized_in_parent() is False


def test_default_start_method_consults_cuda_state(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", fake_torch(initialized=True))
    assert default_start_method(False, platform="linux") == "spawn"
    monkeypatch.setitem(sys.modules, "torch", fake_torch(initialized=False))
    assert default_start_method(False, platform="linux") == "fork"


def test_importing_environment_does_not_import_torch() -> None:
    code = (
        "import sys, streamproc.backends.multiprocessing.environment as e\n"
        "e.cpu_count(); e.cap_worker_threads(); e.default_start_method(True); e.cuda_initialized_in_parent()\n"
        "e.torch_thread_pool_may_have_started(); e.resolve_start_method(None, needs_gpu_workers=False)\n"
        "e.check_worker_counts(2, 1)\n"
        "assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_resolve_start_method(monkeypatch: pytest.MonkeyPatch) -> None:
    import multiprocessing

    assert resolve_start_method("spawn", needs_gpu_workers=False) == "spawn"
    assert resolve_start_method(None, needs_gpu_workers=True) == "spawn"
    with pytest.raises(ValueError, match="not available"):
        resolve_start_method("teleport", needs_gpu_workers=False)
    if "fork" in multiprocessing.get_all_start_methods():
        monkeypatch.setitem(sys.modules, "torch", fake_torch(initialized=True))
        with pytest.raises(ValueError, match="CUDA is already initialised"):
            resolve_start_method("fork", needs_gpu_workers=False)
        monkeypatch.setitem(sys.modules, "torch", fake_torch(initialized=False))
        assert resolve_start_method("fork", needs_gpu_workers=False) == "fork"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork is the Linux default")
def test_fork_is_never_used_for_cuda_gpu_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    """process_start_method="fork" is for the CPU workers: CUDA GPU workers get the default."""
    monkeypatch.setitem(sys.modules, "torch", fake_torch(initialized=False))
    assert resolve_start_method("fork", needs_gpu_workers=True) == "spawn"
    assert resolve_start_method("fork", needs_gpu_workers=False, runs_torch=True) == "fork"


# --- thread caps ------------------------------------------------------------------------------


@pytest.fixture
def clean_thread_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in (*THREAD_ENV_VARS, "TOKENIZERS_PARALLELISM"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    return monkeypatch


def test_thread_env_vars_cover_the_common_pools() -> None:
    assert {"OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"} <= set(THREAD_ENV_VARS)


def test_worker_env_overrides_skips_user_settings() -> None:
    overrides = worker_env_overrides(2, environ={"OMP_NUM_THREADS": "8", "TOKENIZERS_PARALLELISM": "true"})
    assert "OMP_NUM_THREADS" not in overrides and "TOKENIZERS_PARALLELISM" not in overrides
    assert overrides["MKL_NUM_THREADS"] == overrides["OPENBLAS_NUM_THREADS"] == "2"
    assert worker_env_overrides(environ={}) == {**dict.fromkeys(THREAD_ENV_VARS, "1"), "TOKENIZERS_PARALLELISM": "false"}


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_thread_counts_raise(bad: object) -> None:
    with pytest.raises(ValueError, match="num_threads"):
        worker_env_overrides(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_threads"):
        cap_worker_threads(bad)  # type: ignore[arg-type]


def test_cap_worker_threads_sets_unset_variables(clean_thread_env: pytest.MonkeyPatch) -> None:
    clean_thread_env.setenv("MKL_NUM_THREADS", "6")
    cap_worker_threads()
    assert os.environ["OMP_NUM_THREADS"] == os.environ["OPENBLAS_NUM_THREADS"] == "1"
    assert os.environ["TOKENIZERS_PARALLELISM"] == "false"
    assert os.environ["MKL_NUM_THREADS"] == "6"  # the user's value wins
    assert "torch" not in sys.modules


def test_cap_worker_threads_resizes_imported_torch(clean_thread_env: pytest.MonkeyPatch) -> None:
    torch = fake_torch(initialized=False)
    clean_thread_env.setitem(sys.modules, "torch", torch)
    cap_worker_threads(2)
    assert torch.calls == [2]  # type: ignore[attr-defined]


def test_cap_worker_threads_gives_torch_the_users_omp_value(clean_thread_env: pytest.MonkeyPatch) -> None:
    torch = fake_torch(initialized=False)
    clean_thread_env.setitem(sys.modules, "torch", torch)
    clean_thread_env.setenv("OMP_NUM_THREADS", "4")
    cap_worker_threads(1)
    assert torch.calls == [4]  # type: ignore[attr-defined]
    clean_thread_env.setenv("OMP_NUM_THREADS", "lots")  # unusable: fall back to ours
    cap_worker_threads(1)
    assert torch.calls == [4, 1]  # type: ignore[attr-defined]


# --- exit codes -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exitcode", "expected"),
    [
        (-9, "SIGKILL (signal 9: likely the OOM killer or an external kill)"),
        (-11, "SIGSEGV (signal 11: segmentation fault)"),
        (-6, "SIGABRT (signal 6: aborted, e.g. a failed assertion in native code)"),
        (-15, "SIGTERM (signal 15: terminated)"),
        (1, "exit code 1"),
        (0, "exit code 0"),
        (-200, "signal 200"),
        (None, "no exit code (still running)"),
        (0xC0000005, "exit code 3221225477 (0xC0000005: access violation)"),
    ],
)
def test_format_exit_code(exitcode: Optional[int], expected: str) -> None:
    if sys.platform == "win32" and exitcode is not None and exitcode < 0:
        pytest.skip("POSIX signals")
    assert format_exit_code(exitcode) == expected


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_format_exit_code_of_a_real_killed_process() -> None:
    """A SIGKILLed child reports -9, the same convention as ``multiprocessing.Process.exitcode``.

    (A plain subprocess, not a multiprocessing one: spawn would also start the resource
    tracker, which outlives the test.)
    """
    import signal

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        proc.send_signal(signal.SIGKILL)
        assert format_exit_code(proc.wait(timeout=30)).startswith("SIGKILL (signal 9")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
