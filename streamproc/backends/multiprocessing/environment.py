"""What the process allows: start method, thread caps, fault handler, exit codes.

The CPU budget (``cpu_count``, default worker counts) lives in :mod:`.cpu_budget` and is
re-exported here.

Pure helpers for the multiprocessing executor, importable from a child process at no cost:
stdlib only at module level (``psutil`` is imported lazily, as a fallback), and torch is
*never* imported here. Where torch matters (CUDA state, torch's thread pool) it is looked up
in ``sys.modules``: if the user has not imported it, there is nothing to inspect or to cap.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Mapping
from typing import Optional

from .cpu_budget import MAX_WORKERS_ENV_VAR, cpu_count, default_num_cpu_workers

__all__ = [
    "MAX_WORKERS_ENV_VAR",
    "THREAD_ENV_VARS",
    "cap_worker_threads",
    "cpu_count",
    "cuda_initialized_in_parent",
    "default_num_cpu_workers",
    "default_start_method",
    "enable_faulthandler",
    "format_exit_code",
    "resolve_start_method",
    "worker_env_overrides",
]

logger = logging.getLogger(__name__)

#: Variables that size the implicit thread pools of native libraries (OpenMP, MKL,
#: OpenBLAS, Apple Accelerate, BLIS, numexpr), set to the per-worker thread count.
THREAD_ENV_VARS = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "BLIS_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)

#: Set to "false" in workers: HF tokenizers' Rust pool would otherwise start one thread per
#: core in every worker (and warns, then disables itself, after a fork).
TOKENIZERS_PARALLELISM_ENV_VAR = "TOKENIZERS_PARALLELISM"

_SIGNAL_REASONS = {
    "SIGKILL": "likely the OOM killer or an external kill",
    "SIGSEGV": "segmentation fault",
    "SIGBUS": "bus error, e.g. a truncated memory-mapped file or /dev/shm full",
    "SIGABRT": "aborted, e.g. a failed assertion in native code",
    "SIGFPE": "floating-point exception",
    "SIGILL": "illegal instruction, e.g. a binary built for another CPU",
    "SIGTERM": "terminated",
    "SIGINT": "interrupted",
    "SIGHUP": "hangup",
    "SIGPIPE": "broken pipe",
}
# Windows reports crashes as NTSTATUS exit codes rather than signals.
_NTSTATUS_REASONS = {
    0xC0000005: "access violation",
    0xC00000FD: "stack overflow",
    0xC0000409: "stack buffer overrun",
}



# --- Start method -----------------------------------------------------------------------------


def cuda_initialized_in_parent() -> bool:
    """Whether CUDA has been initialised in *this* process (the parent of the workers to start).

    Only looks: torch is consulted if, and only if, it is already in ``sys.modules``; this
    function never imports it (importing torch costs seconds and can itself touch CUDA).

    >>> import sys
    >>> "torch" in sys.modules or cuda_initialized_in_parent() is False
    True
    """
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    try:
        return bool(torch.cuda.is_initialized())
    except Exception:  # a half-imported or stubbed torch: it cannot have initialised CUDA
        return False


def default_start_method(
    needs_gpu_workers: bool,
    *,
    platform: Optional[str] = None,
    cuda_initialized: Optional[bool] = None,
) -> str:
    """The safest fast start method for this run's worker processes.

    On Linux, "fork" when no GPU worker is requested and CUDA was not initialised in this
    process; otherwise "spawn". On macOS and Windows, always "spawn".

    Why: fork is by far the fastest way to start a worker on Linux (no interpreter start-up,
    no re-import, copy-on-write memory), but the CUDA runtime does not survive a fork: a
    child forked after the parent initialised CUDA fails, or hangs, on its first CUDA call.
    So never fork once CUDA is up in the parent, and never for a run that has GPU workers,
    whose start-up cost (loading a model) dwarfs spawn's anyway. macOS cannot fork safely
    (system frameworks are not fork-safe; CPython's default there is spawn since 3.8) and
    Windows has no fork. "forkserver" is never the default but may be chosen explicitly
    (``process_start_method``); see :func:`resolve_start_method`.

    >>> default_start_method(False, platform="linux", cuda_initialized=False)
    'fork'
    >>> default_start_method(True, platform="linux", cuda_initialized=False)
    'spawn'
    >>> default_start_method(False, platform="linux", cuda_initialized=True)
    'spawn'
    >>> default_start_method(False, platform="darwin"), default_start_method(False, platform="win32")
    ('spawn', 'spawn')

    Args:
        needs_gpu_workers: Whether the run starts GPU workers.
        platform: ``sys.platform`` to decide for (default: this one); for tests.
        cuda_initialized: Whether CUDA is initialised in this process (default:
            :func:`cuda_initialized_in_parent`); for tests.

    Returns:
        "fork" or "spawn".
    """
    platform = sys.platform if platform is None else platform
    if not platform.startswith("linux"):
        return "spawn"
    if cuda_initialized is None:
        cuda_initialized = cuda_initialized_in_parent()
    return "spawn" if needs_gpu_workers or cuda_initialized else "fork"


def resolve_start_method(requested: Optional[str], needs_gpu_workers: bool) -> str:
    """The start method to use: ``requested`` when given and safe, else the default.

    >>> resolve_start_method("spawn", needs_gpu_workers=True)
    'spawn'
    >>> resolve_start_method(None, needs_gpu_workers=True)
    'spawn'

    Args:
        requested: The user's ``process_start_method``, or None for
            :func:`default_start_method`.
        needs_gpu_workers: Whether the run starts GPU workers.

    Returns:
        "fork", "spawn" or "forkserver".

    Raises:
        ValueError: The method does not exist on this platform, or it is "fork" while CUDA is
            initialised in this process (the children would fail on their first CUDA call).
    """
    if requested is None:
        return default_start_method(needs_gpu_workers)
    import multiprocessing  # absolute import: the stdlib, not this package (which shares its name)

    available = multiprocessing.get_all_start_methods()
    if requested not in available:
        raise ValueError(f"process_start_method={requested!r} is not available here: use one of {', '.join(available)}")
    if requested == "fork" and cuda_initialized_in_parent():
        raise ValueError(
            "process_start_method='fork' is unsafe: CUDA is already initialised in this process and forked "
            "workers would fail on their first CUDA call; use 'spawn' or 'forkserver'"
        )
    return requested


# --- Thread caps ------------------------------------------------------------------------------


def worker_env_overrides(num_threads: int = 1, environ: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """Environment variables that cap a worker's implicit thread pools, minus those already set.

    Meant for the parent, before starting "spawn"/"forkserver" workers, because a native
    library sizes its pool from these variables once, when it is loaded: setting them inside
    a worker after numpy or torch was imported there is too late. A variable the user has
    set (to anything) is left alone.

    >>> worker_env_overrides(2, environ={"OMP_NUM_THREADS": "8"})["MKL_NUM_THREADS"]
    '2'
    >>> "OMP_NUM_THREADS" in worker_env_overrides(2, environ={"OMP_NUM_THREADS": "8"})
    False
    >>> worker_env_overrides(environ={})["TOKENIZERS_PARALLELISM"]
    'false'

    Args:
        num_threads: Threads per worker for each native pool, at least 1.
        environ: The environment to compare with (default: ``os.environ``).

    Returns:
        The variables to set, ``{name: value}``.

    Raises:
        ValueError: ``num_threads`` is not an int ``>= 1``.
    """
    if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
        raise ValueError(f"num_threads must be an int >= 1, got {num_threads!r}")
    environ = os.environ if environ is None else environ
    wanted = dict.fromkeys(THREAD_ENV_VARS, str(num_threads))
    wanted[TOKENIZERS_PARALLELISM_ENV_VAR] = "false"
    return {name: value for name, value in wanted.items() if name not in environ}


def cap_worker_threads(num_threads: int = 1) -> None:
    """Caps this worker's implicit thread pools; call it first thing in every worker process.

    Sets the variables of :func:`worker_env_overrides` that the user has not set (so
    libraries imported from now on start small pools), and, if torch is already imported
    (a forked worker inherits it), resizes torch's intra-op pool to the effective
    ``OMP_NUM_THREADS``: the user's value when they set one, else ``num_threads``. Without
    this, N workers each start one thread per core and the machine runs N x cores threads.
    Never imports torch.

    Args:
        num_threads: Threads per worker for each native pool, at least 1.

    Raises:
        ValueError: ``num_threads`` is not an int ``>= 1``.
    """
    os.environ.update(worker_env_overrides(num_threads))
    torch = sys.modules.get("torch")
    set_num_threads = getattr(torch, "set_num_threads", None)
    if set_num_threads is None:
        return
    try:
        torch_threads = int(os.environ["OMP_NUM_THREADS"])
    except ValueError:
        torch_threads = num_threads
    set_num_threads(torch_threads if torch_threads >= 1 else num_threads)


def enable_faulthandler() -> None:
    """Turns on :mod:`faulthandler` in a worker, writing to the process's real stderr.

    ``faulthandler.enable()`` writes to ``sys.stderr``'s file descriptor and raises when it
    has none: a forked worker inherits the parent's ``sys.stderr``, which Jupyter, IDEs and
    pytest's ``capsys`` replace with in-memory streams, and the worker would die before its
    first task. Falls back to ``sys.__stderr__`` (fd 2), and to nothing if that fails too.
    """
    import faulthandler

    for stream in (sys.stderr, sys.__stderr__):
        if stream is None:
            continue
        try:
            faulthandler.enable(file=stream)
            return
        except (AttributeError, ValueError, OSError, RuntimeError):  # no usable fileno()
            continue


# --- Exit codes -------------------------------------------------------------------------------


def format_exit_code(exitcode: Optional[int]) -> str:
    """Describes a worker's ``Process.exitcode`` for an error message, with the likely cause.

    >>> format_exit_code(-9)
    'SIGKILL (signal 9: likely the OOM killer or an external kill)'
    >>> format_exit_code(-11)
    'SIGSEGV (signal 11: segmentation fault)'
    >>> format_exit_code(1)
    'exit code 1'
    >>> format_exit_code(None)
    'no exit code (still running)'

    A negative code ``-N`` means the process was killed by signal ``N`` (the convention of
    :attr:`multiprocessing.Process.exitcode`); a signal this platform does not know is shown by
    number. On Windows, well-known crash statuses are named too.

    Args:
        exitcode: ``Process.exitcode``: None while running, ``-N`` for signal N, else the code.

    Returns:
        A short human-readable description.
    """
    if exitcode is None:
        return "no exit code (still running)"
    if exitcode < 0:
        signum = -exitcode
        try:
            name = signal.Signals(signum).name
        except ValueError:
            return f"signal {signum}"
        reason = _SIGNAL_REASONS.get(name)
        return f"{name} (signal {signum}: {reason})" if reason else f"{name} (signal {signum})"
    reason = _NTSTATUS_REASONS.get(exitcode)
    return f"exit code {exitcode} (0x{exitcode:08X}: {reason})" if reason else f"exit code {exitcode}"
