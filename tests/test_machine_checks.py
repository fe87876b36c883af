"""cpu_budget.check_worker_counts: worker counts the machine cannot hold are refused, naming the option.

Pure calls: the CPU count is faked (the ``machine`` fixture of test_environment.py's kind), the
descriptor limit and the open descriptors are passed in, the environment is a dict. The
end-to-end check (a multiprocessing run refuses before starting a process) needs the run to
call ``check_worker_counts``; ``set_processing`` itself must keep accepting any count.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

import streamproc as sp
from streamproc.backends.multiprocessing import cpu_budget
from streamproc.backends.multiprocessing.cpu_budget import (
    MAX_WORKERS_ENV_VAR,
    WORKER_LIMIT_ENV_VAR,
    check_worker_counts,
    fds_needed,
    worker_limit,
)

#: A descriptor limit no test reaches, so that only the worker-count rule is exercised.
PLENTY_OF_FDS = 1_000_000


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Pretends to be a 4-core machine with no affinity limit and no cgroup quota."""
    monkeypatch.setattr(cpu_budget.os, "cpu_count", lambda: 4)
    monkeypatch.setattr(cpu_budget.os, "sched_getaffinity", lambda pid: set(range(4)), raising=False)
    monkeypatch.setattr(cpu_budget, "_CGROUP_ROOT", str(tmp_path / "no-cgroup"))
    monkeypatch.setattr(cpu_budget, "_PROC_SELF_CGROUP", str(tmp_path / "no-proc-self-cgroup"))
    monkeypatch.delenv(WORKER_LIMIT_ENV_VAR, raising=False)
    monkeypatch.delenv(MAX_WORKERS_ENV_VAR, raising=False)


# -- the worker-count limit -------------------------------------------------------------------


def test_the_default_limit_is_at_least_64(machine: None) -> None:
    assert worker_limit({}) == 64  # max(64, 8 x 4)


def test_the_default_limit_grows_with_the_cpus(machine: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_budget.os, "cpu_count", lambda: 32)
    monkeypatch.setattr(cpu_budget.os, "sched_getaffinity", lambda pid: set(range(32)), raising=False)
    assert worker_limit({}) == 256


def test_streamproc_max_workers_does_not_lower_the_limit(machine: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """STREAMPROC_MAX_WORKERS sizes the defaults; an explicit count above it is still fine."""
    monkeypatch.setenv(MAX_WORKERS_ENV_VAR, "1")
    assert worker_limit({}) == 64
    check_worker_counts(8, 0, environ={}, fd_limit=PLENTY_OF_FDS, open_fds=0)


@pytest.mark.parametrize(("num_cpu", "num_gpu"), [(64, 0), (60, 4), (1, 0), (63, 1)])
def test_counts_up_to_the_limit_are_accepted(machine: None, num_cpu: int, num_gpu: int) -> None:
    check_worker_counts(num_cpu, num_gpu, environ={}, fd_limit=PLENTY_OF_FDS, open_fds=0)


def test_an_absurd_cpu_worker_count_is_refused_naming_the_option(machine: None) -> None:
    with pytest.raises(ValueError, match=r"num_cpu_workers=10000 asks for 10000 worker processes") as info:
        check_worker_counts(10_000, 0, environ={}, fd_limit=PLENTY_OF_FDS, open_fds=0)
    message = str(info.value)
    assert "limit of 64" in message and "max(64, 8 x 4 CPUs)" in message
    assert WORKER_LIMIT_ENV_VAR in message  # says how to go above it
    assert "num_gpu_workers" not in message  # none were asked for


def test_gpu_workers_count_towards_the_limit(machine: None) -> None:
    with pytest.raises(ValueError, match=r"num_cpu_workers=60 and num_gpu_workers=5 asks for 65 worker processes"):
        check_worker_counts(60, 5, environ={}, fd_limit=PLENTY_OF_FDS, open_fds=0)


def test_the_env_var_sets_the_limit(machine: None) -> None:
    environ = {WORKER_LIMIT_ENV_VAR: "500"}
    check_worker_counts(500, 0, environ=environ, fd_limit=PLENTY_OF_FDS, open_fds=0)
    with pytest.raises(ValueError, match=r"more than the limit of 500 on this machine; use fewer"):
        check_worker_counts(501, 0, environ=environ, fd_limit=PLENTY_OF_FDS, open_fds=0)
    with pytest.raises(ValueError, match=r"more than the limit of 2 "):
        check_worker_counts(3, 0, environ={WORKER_LIMIT_ENV_VAR: "2"}, fd_limit=PLENTY_OF_FDS, open_fds=0)


@pytest.mark.parametrize("value", ["0", "-3", "many", "2.5"])
def test_an_invalid_env_var_is_refused_naming_it(machine: None, value: str) -> None:
    with pytest.raises(ValueError, match=f"{WORKER_LIMIT_ENV_VAR}='{value}' is invalid"):
        check_worker_counts(2, 0, environ={WORKER_LIMIT_ENV_VAR: value}, fd_limit=PLENTY_OF_FDS, open_fds=0)


def test_the_real_environment_is_read_by_default(machine: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(WORKER_LIMIT_ENV_VAR, "3")
    with pytest.raises(ValueError, match="limit of 3"):
        check_worker_counts(4, 0, fd_limit=PLENTY_OF_FDS, open_fds=0)


# -- file descriptors -------------------------------------------------------------------------


def test_fds_needed_counts_workers_and_channels() -> None:
    # 8 CPU + 2 GPU workers: 8 + 2 - gcd(8, 2) = 8 channels.
    assert fds_needed(8, 2) == 6 * 8 + 4 * 2 + 4 * 8 + 64
    # 3 CPU + 2 GPU workers: 3 + 2 - 1 = 4 channels (one CPU worker talks to both).
    assert fds_needed(3, 2) == 6 * 3 + 4 * 2 + 4 * 4 + 64
    assert fds_needed(1, 0) == 6 + 64


def test_fds_needed_is_an_upper_bound_of_what_a_run_uses() -> None:
    """Measured peaks (see cpu_budget.FDS_PER_CPU_WORKER): the estimate stays above them."""
    for (num_cpu, num_gpu), measured in {(8, 0): 41, (16, 0): 66, (16, 4): 84}.items():
        assert fds_needed(num_cpu, num_gpu) > measured


def test_a_low_descriptor_limit_is_refused_naming_it(machine: None) -> None:
    needed = fds_needed(40, 0)
    check_worker_counts(40, 0, environ={}, fd_limit=needed + 10, open_fds=10)
    with pytest.raises(ValueError, match=r"num_cpu_workers=40 and num_gpu_workers=0 need about \d+ file descriptors") as info:
        check_worker_counts(40, 0, environ={}, fd_limit=needed + 10, open_fds=11)
    message = str(info.value)
    assert f"open-files limit (RLIMIT_NOFILE) is {needed + 10}" in message
    assert "already has 11 open" in message and "ulimit -n" in message


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_NOFILE is POSIX")
def test_the_real_descriptor_limit_is_read_by_default(machine: None, monkeypatch: pytest.MonkeyPatch) -> None:
    import resource

    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        pytest.skip("no descriptor limit here")
    monkeypatch.setenv(WORKER_LIMIT_ENV_VAR, str(10 * soft))  # so that the descriptors decide
    with pytest.raises(ValueError, match=f"RLIMIT_NOFILE\\) is {soft}"):
        check_worker_counts(soft, 0)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts /proc/self/fd")
def test_open_descriptors_are_counted() -> None:
    before = cpu_budget._open_fd_count()
    reader, writer = os.pipe()
    try:
        assert cpu_budget._open_fd_count() == before + 2
    finally:
        os.close(reader)
        os.close(writer)


def test_set_processing_keeps_accepting_any_count() -> None:
    """A machine check belongs to the backend: the stream may run on a bigger machine."""
    stream = sp.from_iterable([1]).set_processing(num_cpu_workers=10_000, num_gpu_workers=500)
    assert stream.options.num_cpu_workers == 10_000


@pytest.mark.parametrize("backend", ["simple", "threads"])
def test_in_process_backends_refuse_a_forward_device_this_machine_lacks(backend):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    stream = sp.from_iterable([1.0, 2.0]).map_gpu(torch.tensor, lambda t: t * 2)
    with pytest.raises(ValueError, match=r"gpu_worker_devices: 'cuda:0' does not exist here"):
        stream.set_processing(backend=backend, gpu_worker_devices=["cuda:0"]).to_list()
