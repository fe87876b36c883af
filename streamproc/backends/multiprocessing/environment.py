"""What the process allows: thread caps, fault handler, exit codes.

The CPU budget (``cpu_count``, default worker counts, worker-count checks) lives in
:mod:`.cpu_budget` and the start method in :mod:`.start_method`; both are re-exported here.

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

from .cpu_budget import MAX_WORKERS_ENV_VAR, WORKER_LIMIT_ENV_VAR, check_worker_counts, cpu_count, default_num_cpu_workers
from .start_method import (
    configure_forkserver,
    cuda_initialized_in_parent,
    default_start_method,
    resolve_start_method,
    torch_thread_pool_may_have_started,
)

__all__ = [
    "MAX_WORKERS_ENV_VAR",
    "THREAD_ENV_VARS",
    "WORKER_LIMIT_ENV_VAR",
    "cap_worker_threads",
    "check_worker_counts",
    "configure_forkserver",
    "cpu_count",
    "cuda_initialized_in_parent",
    "default_num_cpu_workers",
    "default_start_method",
    "enable_faulthandler",
    "format_exit_code",
    "resolve_start_method",
    "torch_thread_pool_may_have_started",
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
