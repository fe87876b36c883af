"""The CPU budget of this process: how many workers the machine and its container allow.

:func:`cpu_count` is the minimum of ``os.cpu_count()``, the affinity mask and the cgroup CPU
quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us / cpu.cfs_period_us``), at least 1, capped by
``STREAMPROC_MAX_WORKERS``. :func:`check_worker_counts` refuses worker counts the machine
cannot hold. Stdlib only at module level (``psutil`` lazily, as a fallback). Runs in the
main process, before workers start.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Optional

logger = logging.getLogger(__name__)

#: Caps :func:`cpu_count` (and so every default worker count) when set to a positive int.
MAX_WORKERS_ENV_VAR = "STREAMPROC_MAX_WORKERS"

#: Sets the most worker processes (CPU + GPU) one run may start, replacing the default
#: ``max(MIN_WORKER_LIMIT, WORKER_LIMIT_PER_CPU * cpu_count())``.
WORKER_LIMIT_ENV_VAR = "STREAMPROC_WORKER_LIMIT"
MIN_WORKER_LIMIT = 64
WORKER_LIMIT_PER_CPU = 8

# Descriptors the main process holds while it starts workers, an estimate from above: per
# CPU worker its task and result pipe ends, its sentinel and, while it starts, the child's
# ends and fork's own pipe; per GPU worker its status pipe and sentinel; per CPU -> GPU
# channel two pipes, all four ends open until both sides started. Measured on Linux (peak
# over a run, fork/forkserver/spawn): 8 CPU workers +34..41, 16 +66, 16 CPU + 4 GPU workers
# (16 channels) +84; these constants give 112, 160 and 240 with the headroom.
FDS_PER_CPU_WORKER = 6
FDS_PER_GPU_WORKER = 4
FDS_PER_CHANNEL = 4
#: Left free for what the run opens besides pipes: source and sink files, the wakeup pipe.
FDS_HEADROOM = 64

# Module-level so tests can point them at fake trees (see tests/test_environment.py).
_CGROUP_ROOT = "/sys/fs/cgroup"
_PROC_SELF_CGROUP = "/proc/self/cgroup"
# A cgroup v1 cpu controller is mounted under one of these names (``cpu`` is usually a
# symlink to ``cpu,cpuacct``; reading a directory twice is harmless, we take the minimum).
_CGROUP_V1_CPU_DIRS = ("cpu", "cpu,cpuacct", "cpuacct,cpu")


# --- CPU budget -------------------------------------------------------------------------------


def cpu_count() -> int:
    """The number of CPUs this process may actually use, at least 1.

    The minimum of ``os.cpu_count()``, the affinity mask (``taskset``, Slurm, ``docker
    --cpuset-cpus``) and the cgroup CPU quota rounded up (``docker --cpus=1.5`` gives 2),
    then capped by the ``STREAMPROC_MAX_WORKERS`` environment variable when it is set.
    ``os.cpu_count()`` alone counts the host's cores, so a container limited to 2 CPUs on a
    64-core host would otherwise start 64 workers that share 2 CPUs' worth of time.

    >>> cpu_count() >= 1
    True

    Returns:
        The CPU budget, ``>= 1``.

    Raises:
        ValueError: ``STREAMPROC_MAX_WORKERS`` is set to something other than a positive int.
    """
    cap = _max_workers_from_env()
    count = _machine_cpu_count()
    return count if cap is None else min(count, cap)


def _machine_cpu_count() -> int:
    """:func:`cpu_count` without the ``STREAMPROC_MAX_WORKERS`` cap."""
    counts = [os.cpu_count() or 1]
    affinity = _affinity_count()
    if affinity is not None:
        counts.append(affinity)
    quota = _cgroup_cpu_quota(_CGROUP_ROOT, _PROC_SELF_CGROUP)
    if quota is not None:
        counts.append(math.ceil(quota))
    return max(1, min(counts))


def _max_workers_from_env(environ: Optional[Mapping[str, str]] = None) -> Optional[int]:
    """The value of ``STREAMPROC_MAX_WORKERS``, or None when unset or blank."""
    return _positive_int_from_env(MAX_WORKERS_ENV_VAR, environ, example=4)


def _positive_int_from_env(name: str, environ: Optional[Mapping[str, str]], example: int) -> Optional[int]:
    raw = (os.environ if environ is None else environ).get(name, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{name}={raw!r} is invalid: expected a positive integer such as {example}")
    return value


def _affinity_count() -> Optional[int]:
    """How many CPUs the affinity mask allows, or None where it cannot be read."""
    if hasattr(os, "sched_getaffinity"):  # Linux and some BSDs
        try:
            return len(os.sched_getaffinity(0)) or None
        except OSError:
            return None
    try:  # Windows, FreeBSD: psutil knows how; macOS has no affinity at all
        import psutil

        return len(psutil.Process().cpu_affinity()) or None  # type: ignore[arg-type]
    except Exception:  # ImportError, AttributeError (no cpu_affinity here), psutil.Error
        return None


def _cgroup_cpu_quota(root: str = _CGROUP_ROOT, proc_self_cgroup: str = _PROC_SELF_CGROUP) -> Optional[float]:
    """The cgroup CPU quota of this process in CPUs (``1.5`` for ``docker --cpus=1.5``), or None.

    Reads cgroup v2 ``cpu.max`` ("quota period", or "max period" for no limit) and cgroup v1
    ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (a quota of -1 means no limit), in the
    process's own cgroup (found in ``/proc/self/cgroup``) and every ancestor up to ``root``,
    since a parent's limit binds its children too. When that cgroup is not visible under
    ``root`` (a container without a cgroup namespace mounts its own cgroup *at* ``root``), the
    files directly under ``root`` are read instead. The smallest limit found wins; files that
    are missing or unreadable are skipped.

    >>> _cgroup_cpu_quota("/nonexistent", "/nonexistent") is None
    True

    Args:
        root: Where the cgroup filesystem is mounted (the v1 controllers in sub-directories).
        proc_self_cgroup: The file listing this process's cgroups.

    Returns:
        The quota in CPUs, or None when no limit is set (or none can be read).
    """
    v2_path, v1_cpu_path = _own_cgroup_paths(proc_self_cgroup)
    base = Path(root)
    quotas = [q for d in _cgroup_dirs(base, v2_path) if (q := _read_cpu_max(d / "cpu.max")) is not None]
    for name in _CGROUP_V1_CPU_DIRS:
        if (base / name).is_dir():
            quotas += [q for d in _cgroup_dirs(base / name, v1_cpu_path) if (q := _read_cfs_quota(d)) is not None]
    return min(quotas, default=None)


def _own_cgroup_paths(proc_self_cgroup: str) -> tuple[Optional[str], Optional[str]]:
    """This process's (cgroup v2 path, cgroup v1 ``cpu`` controller path), each None if absent.

    Lines read ``hierarchy-id:controllers:path``: ``0::/path`` for v2, ``4:cpu,cpuacct:/path``
    for v1.
    """
    v2 = v1 = None
    try:
        text = Path(proc_self_cgroup).read_text()
    except OSError:
        return None, None
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            v2 = path
        elif "cpu" in controllers.split(","):
            v1 = path
    return v2, v1


def _cgroup_dirs(base: Path, own_path: Optional[str]) -> Iterator[Path]:
    """``base/own_path`` and its ancestors up to ``base`` when it exists, else ``base`` alone."""
    parts = [p for p in (own_path or "").split("/") if p]
    if ".." in parts or not (base.joinpath(*parts)).is_dir():
        yield base
        return
    for depth in range(len(parts), -1, -1):
        yield base.joinpath(*parts[:depth])


def _read_cpu_max(path: Path) -> Optional[float]:
    try:
        fields = path.read_text().split()
    except OSError:
        return None
    if not fields or fields[0] == "max":
        return None
    try:
        quota = int(fields[0])
        period = int(fields[1]) if len(fields) > 1 else 100_000  # the kernel's default period
    except ValueError:
        logger.debug("ignoring unparsable %s: %r", path, fields)
        return None
    return quota / period if quota > 0 and period > 0 else None


def _read_cfs_quota(directory: Path) -> Optional[float]:
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        period = int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None  # quota -1: no limit


def default_num_cpu_workers(num_gpu_workers: int) -> int:
    """How many CPU workers to start when the user did not say: one per spare CPU, at least 1.

    Each GPU worker is given a whole CPU: its Python loop (kernel launches, host-device
    copies) is on the critical path of the GPU, and a GPU worker that waits for a core
    leaves the GPU idle, which costs far more than one CPU worker fewer. The main process
    gets no CPU of its own: it mostly waits on pipes, and splittable sources are read in the
    workers.

    >>> n = cpu_count()
    >>> default_num_cpu_workers(0) == n, default_num_cpu_workers(1) == max(1, n - 1)
    (True, True)
    >>> default_num_cpu_workers(10_000)
    1

    Args:
        num_gpu_workers: How many GPU workers will run beside the CPU workers.

    Returns:
        ``max(1, cpu_count() - num_gpu_workers)``.

    Raises:
        ValueError: ``num_gpu_workers`` is not an int ``>= 0``.
    """
    if isinstance(num_gpu_workers, bool) or not isinstance(num_gpu_workers, int) or num_gpu_workers < 0:
        raise ValueError(f"num_gpu_workers must be an int >= 0, got {num_gpu_workers!r}")
    return max(1, cpu_count() - num_gpu_workers)


# --- Worker-count checks ----------------------------------------------------------------------


def worker_limit(environ: Optional[Mapping[str, str]] = None) -> int:
    """The most worker processes (CPU + GPU) one run may start on this machine.

    ``STREAMPROC_WORKER_LIMIT`` when set, else ``max(64, 8 x CPUs)`` (the CPUs of
    :func:`cpu_count` before the ``STREAMPROC_MAX_WORKERS`` cap, which only sizes defaults):
    far more than the CPUs can keep busy, even for I/O-bound ops, and far fewer than the
    thousands that exhaust memory and descriptors before any error names the option.

    >>> worker_limit({"STREAMPROC_WORKER_LIMIT": "500"})
    500
    >>> worker_limit({}) >= 64
    True

    Raises:
        ValueError: ``STREAMPROC_WORKER_LIMIT`` is set to something other than a positive int.
    """
    limit = _positive_int_from_env(WORKER_LIMIT_ENV_VAR, environ, example=256)
    return limit if limit is not None else max(MIN_WORKER_LIMIT, WORKER_LIMIT_PER_CPU * _machine_cpu_count())


def fds_needed(num_cpu_workers: int, num_gpu_workers: int) -> int:
    """File descriptors the main process needs to start the workers, headroom included.

    An estimate from above (see ``FDS_PER_*``); CPU worker ``p`` talks to
    ``len(set(cycle_p))`` GPU workers, ``P + C - gcd(P, C)`` channels in all (NOTE [ streamproc
    dispatch schedule ], guarantee 2).

    >>> fds_needed(4, 0), fds_needed(4, 2)
    (88, 112)
    """
    channels = num_cpu_workers + num_gpu_workers - math.gcd(num_cpu_workers, num_gpu_workers) if num_gpu_workers else 0
    return (
        FDS_PER_CPU_WORKER * num_cpu_workers + FDS_PER_GPU_WORKER * num_gpu_workers + FDS_PER_CHANNEL * channels + FDS_HEADROOM
    )


def check_worker_counts(
    num_cpu_workers: int,
    num_gpu_workers: int,
    *,
    environ: Optional[Mapping[str, str]] = None,
    fd_limit: Optional[int] = None,
    open_fds: Optional[int] = None,
) -> None:
    """Refuses worker counts this machine cannot hold, before any process starts.

    A machine check, so it belongs to the backend, not to ``set_processing`` (design.md
    section 5): the same stream may run elsewhere with more CPUs. Call it with the counts the
    run will start (defaults resolved). Without it, ``num_cpu_workers=10000`` started
    thousands of processes until the kernel killed the run, or failed with a bare ``EMFILE``.

    >>> check_worker_counts(2, 1)
    >>> check_worker_counts(10_000, 0, environ={})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: num_cpu_workers=10000 asks for 10000 worker processes, ...

    Args:
        num_cpu_workers: CPU workers to start, ``>= 1``.
        num_gpu_workers: GPU workers to start, ``>= 0``.
        environ: The environment to read ``STREAMPROC_WORKER_LIMIT`` from (default:
            ``os.environ``); for tests.
        fd_limit: The soft ``RLIMIT_NOFILE`` (default: this process's; none on Windows).
        open_fds: Descriptors already open in this process (default: counted, where possible).

    Raises:
        ValueError: More workers than :func:`worker_limit`, or more descriptors than the
            soft ``RLIMIT_NOFILE`` allows (:func:`fds_needed` plus those already open); the
            message names the options and what would fix it.
    """
    total = num_cpu_workers + num_gpu_workers
    limit = worker_limit(environ)
    if total > limit:
        asked = f"num_cpu_workers={num_cpu_workers}" + (f" and num_gpu_workers={num_gpu_workers}" if num_gpu_workers else "")
        why = "" if (environ if environ is not None else os.environ).get(WORKER_LIMIT_ENV_VAR, "").strip() else (
            f" (max({MIN_WORKER_LIMIT}, {WORKER_LIMIT_PER_CPU} x {_machine_cpu_count()} CPUs))"
        )
        raise ValueError(
            f"{asked} asks for {total} worker processes, more than the limit of {limit} on this machine{why}; "
            f"use fewer workers (the default is one per CPU), or set {WORKER_LIMIT_ENV_VAR} to raise the limit"
        )
    soft = _soft_fd_limit() if fd_limit is None else fd_limit
    if soft is None:
        return
    already = _open_fd_count() if open_fds is None else open_fds
    needed = fds_needed(num_cpu_workers, num_gpu_workers)
    if already + needed > soft:
        raise ValueError(
            f"num_cpu_workers={num_cpu_workers} and num_gpu_workers={num_gpu_workers} need about {needed} file "
            f"descriptors for their pipes, and this process already has {already} open, but the open-files limit "
            f"(RLIMIT_NOFILE) is {soft}; use fewer workers, or raise the limit (`ulimit -n`, or "
            "resource.setrlimit(resource.RLIMIT_NOFILE, ...) up to the hard limit)"
        )


def _soft_fd_limit() -> Optional[int]:
    """This process's soft ``RLIMIT_NOFILE``, or None where there is none (Windows) or unlimited."""
    try:
        import resource
    except ImportError:  # Windows: no descriptor limit of this kind
        return None
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


def _open_fd_count() -> int:
    """How many descriptors this process has open (0 where that cannot be counted)."""
    for fd_dir in ("/proc/self/fd", "/dev/fd"):  # Linux; macOS and the BSDs
        try:
            return max(0, len(os.listdir(fd_dir)) - 1)  # minus the one listdir itself opened
        except OSError:
            continue
    if sys.platform == "win32":
        return 0
    try:
        import psutil

        return int(psutil.Process().num_fds())
    except Exception:  # ImportError, psutil.Error
        return 0
