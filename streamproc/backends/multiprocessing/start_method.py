"""How worker processes start: fork when it is safe, else forkserver (Linux) or spawn.

Runs in the main process, before workers start. Stdlib only, and torch is *never* imported
here: where torch matters (CUDA state, its OpenMP pool) it is looked up in ``sys.modules``:
if the user has not imported it, there is nothing to inspect.

NOTE [ streamproc start methods ]
    Fork is by far the cheapest way to start a worker on Linux (no interpreter start-up, no
    re-import), but a forked child inherits the parent's memory and none of its threads, so
    two runtimes that keep state about threads break in it:

    * CUDA: a child forked after the parent initialised CUDA fails, or hangs, on its first
      CUDA call. So: never fork once CUDA is up here, and never fork CUDA GPU workers.
    * OpenMP (libgomp, which torch's CPU kernels and its bundled MKL use): the thread pool is
      created by the first parallel region and libgomp has no fork handler, so a child forked
      after that believes the pool's threads exist; its first parallel region with more than
      one thread waits for them forever in ``gomp_team_barrier_wait_end`` (a silent hang; GCC
      bug 52303, pytorch/pytorch#17199). There is no API to ask whether the pool exists, so
      :func:`torch_thread_pool_may_have_started` answers conservatively: torch is imported
      and runs more than one intra-op thread. Then workers that run torch (GPU workers, and
      CPU workers of a plan with a ``map_gpu`` stage) are not forked.

    Instead of fork, Linux uses forkserver: a clean server process (started once per
    interpreter, by exec) imports streamproc's worker modules and torch, and forks each worker
    from itself, so a worker starts in milliseconds rather than the seconds spawn needs to
    re-import torch (measured: a 2-worker run in a torch script, 4 s without the preload,
    0.04 s with it once the server is up). The server must run no user code: CPython's
    default preload, ``["__main__"]``, runs the user's script's module level in it since
    Python 3.13.8 / 3.14.1 (before, that preload silently did nothing: gh-126631), and a
    parallel torch op there would start the pool in the server, and every worker would hang
    again. So :func:`configure_forkserver` replaces that default; each worker still imports
    ``__main__`` itself, as under spawn. CUDA cases keep spawn: a fork server that other code
    started earlier, with ``__main__`` preloaded, may have initialised CUDA, and a GPU
    worker's model load dwarfs spawn's start-up anyway. macOS and Windows always spawn.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Optional

from ..._warnings import stacklevel_outside_streamproc

__all__ = [
    "FORKSERVER_PRELOAD",
    "configure_forkserver",
    "cuda_initialized_in_parent",
    "default_start_method",
    "resolve_start_method",
    "torch_thread_pool_may_have_started",
]

#: What the fork server imports before it forks workers (torch too when the parent has it),
#: so that workers do not each import them. A module that fails to import is skipped by the
#: server (CPython ignores ImportError there); tests/test_start_method_torch.py checks these.
FORKSERVER_PRELOAD = (
    "streamproc.backends.multiprocessing.cpu_worker",
    "streamproc.backends.multiprocessing.gpu_worker",
)

#: CPython's default forkserver preload (see NOTE [ streamproc start methods ]).
_CPYTHON_DEFAULT_PRELOAD = ["__main__"]


def _imported_torch_says(question: Callable[[Any], Any]) -> bool:
    """``question(torch)`` if torch is already imported, else False; never imports it.

    A half-imported or stubbed torch (the question raises) can have initialised nothing.
    """
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    try:
        return bool(question(torch))
    except Exception:
        return False


def cuda_initialized_in_parent() -> bool:
    """Whether CUDA has been initialised in *this* process (the parent of the workers to start).

    Only looks: torch is consulted if, and only if, it is already in ``sys.modules``; this
    function never imports it (importing torch costs seconds and can itself touch CUDA).

    >>> import sys
    >>> "torch" in sys.modules or cuda_initialized_in_parent() is False
    True
    """
    return _imported_torch_says(lambda torch: torch.cuda.is_initialized())


def torch_thread_pool_may_have_started() -> bool:
    """Whether torch's OpenMP thread pool may exist in this process (so forking is unsafe).

    True when torch is imported and runs more than one intra-op thread: libgomp creates its
    pool on the first parallel region, and a region only goes parallel with more than one
    thread. Conservative: importing torch alone starts no pool. Not exact the other way round
    either: a parent that ran a parallel op and then called ``torch.set_num_threads(1)`` keeps
    its pool; its forked workers are safe only while they run single-threaded too (they do,
    unless ``OMP_NUM_THREADS`` or ``torch_threads`` asks for more). Never imports torch.
    See NOTE [ streamproc start methods ].

    >>> "torch" in sys.modules or torch_thread_pool_may_have_started() is False
    True
    """
    return _imported_torch_says(lambda torch: int(torch.get_num_threads()) > 1)


def default_start_method(
    needs_gpu_workers: bool,
    *,
    runs_torch: bool = True,
    platform: Optional[str] = None,
    cuda_initialized: Optional[bool] = None,
    torch_pool_started: Optional[bool] = None,
) -> str:
    """The safest fast start method for workers of one kind; see NOTE [ streamproc start methods ].

    On Linux: "spawn" for CUDA GPU workers or once CUDA is initialised in this process;
    "forkserver" for workers that run torch once torch's OpenMP pool may have started here;
    "fork" otherwise. On macOS and Windows, always "spawn".

    >>> default_start_method(False, runs_torch=False, platform="linux", cuda_initialized=False)
    'fork'
    >>> default_start_method(True, platform="linux", cuda_initialized=False)
    'spawn'
    >>> default_start_method(False, platform="linux", cuda_initialized=True)
    'spawn'
    >>> default_start_method(False, runs_torch=True, platform="linux", cuda_initialized=False, torch_pool_started=True)
    'forkserver'
    >>> default_start_method(False, platform="darwin"), default_start_method(False, platform="win32")
    ('spawn', 'spawn')

    Args:
        needs_gpu_workers: Whether these workers use CUDA (GPU workers on a "cuda" device).
        runs_torch: Whether these workers may run torch code: True for GPU workers and for
            CPU workers of a plan with a ``map_gpu`` stage (``prepare_batch``, ``postprocess``
            and, without GPU workers, ``forward`` run there). The default, True, is the safe
            answer for a caller that cannot tell (a user ``map`` may call torch too).
        platform: ``sys.platform`` to decide for (default: this one); for tests.
        cuda_initialized: Whether CUDA is initialised in this process (default:
            :func:`cuda_initialized_in_parent`); for tests.
        torch_pool_started: Whether torch's OpenMP pool may have started in this process
            (default: :func:`torch_thread_pool_may_have_started`); for tests.

    Returns:
        "fork", "forkserver" or "spawn".
    """
    platform = sys.platform if platform is None else platform
    if not platform.startswith("linux"):
        return "spawn"
    if cuda_initialized is None:
        cuda_initialized = cuda_initialized_in_parent()
    if needs_gpu_workers or cuda_initialized:
        return "spawn"
    if runs_torch and (torch_thread_pool_may_have_started() if torch_pool_started is None else torch_pool_started):
        return "forkserver"
    return "fork"


def resolve_start_method(requested: Optional[str], needs_gpu_workers: bool, *, runs_torch: bool = True) -> str:
    """The start method for workers of one kind: ``requested`` where it is safe, else the default.

    Call it once per kind of worker: CPU workers with ``needs_gpu_workers=False,
    runs_torch=plan.has_gpu_stage``; GPU workers with ``needs_gpu_workers=<any device is
    "cuda...">, runs_torch=True``. When the result is "forkserver", the fork server is
    prepared too (:func:`configure_forkserver`).

    * ``requested=None``: :func:`default_start_method`.
    * "fork" for CUDA GPU workers (``needs_gpu_workers``): the default instead, silently:
      ``process_start_method`` is one option for the whole run, and only the CPU workers
      can honour it.
    * "fork" for workers that run torch once its OpenMP pool may have started here: kept,
      with a ``RuntimeWarning``. Not refused, unlike CUDA, because the hang needs a worker
      to run a parallel region with more than one thread, which ``OMP_NUM_THREADS=1`` or
      ``torch_threads=1`` rules out, and a user who asks for fork may want exactly that.

    >>> resolve_start_method("spawn", needs_gpu_workers=True)
    'spawn'
    >>> resolve_start_method(None, needs_gpu_workers=True)
    'spawn'

    Args:
        requested: The user's ``process_start_method``, or None for
            :func:`default_start_method`.
        needs_gpu_workers: Whether these workers use CUDA.
        runs_torch: Whether these workers may run torch code (see :func:`default_start_method`).

    Returns:
        "fork", "spawn" or "forkserver".

    Raises:
        ValueError: The method does not exist on this platform, or it is "fork" while CUDA is
            initialised in this process (the children would fail on their first CUDA call).
    """
    import multiprocessing  # absolute import: the stdlib, not this package (which shares its name)

    if requested is None:
        method = default_start_method(needs_gpu_workers, runs_torch=runs_torch)
    else:
        available = multiprocessing.get_all_start_methods()
        if requested not in available:
            raise ValueError(f"process_start_method={requested!r} is not available here: use one of {', '.join(available)}")
        method = requested
    if requested == "fork":
        if cuda_initialized_in_parent():
            raise ValueError(
                "process_start_method='fork' is unsafe: CUDA is already initialised in this process and forked "
                "workers would fail on their first CUDA call; use 'spawn' or 'forkserver'"
            )
        if needs_gpu_workers:
            method = default_start_method(needs_gpu_workers, runs_torch=runs_torch)
        elif runs_torch and torch_thread_pool_may_have_started():
            warnings.warn(
                "process_start_method='fork': torch already ran multi-threaded in this process, and a forked "
                "worker that runs torch with more than one thread hangs forever in OpenMP (libgomp does not "
                "survive fork); use 'forkserver' or 'spawn', or keep the workers single-threaded "
                "(OMP_NUM_THREADS=1, torch_threads=1)",
                RuntimeWarning,
                stacklevel=stacklevel_outside_streamproc(),
            )
    if method == "forkserver":
        configure_forkserver()
    return method


def forkserver_preload(current: Sequence[str], torch_imported: bool) -> list[str]:
    """The fork server's preload list: ``current`` plus :data:`FORKSERVER_PRELOAD` (and torch).

    CPython's default, ``["__main__"]``, is dropped (see NOTE [ streamproc start methods ]);
    any other list, the user's own, is kept and extended.

    >>> forkserver_preload(["__main__"], torch_imported=True)[-1]
    'torch'
    >>> forkserver_preload(["__main__", "mylib"], torch_imported=False)[:2]
    ['__main__', 'mylib']
    """
    base = [] if list(current) == _CPYTHON_DEFAULT_PRELOAD else list(current)
    wanted = [*FORKSERVER_PRELOAD, *(["torch"] if torch_imported else [])]
    return base + [name for name in wanted if name not in base]


def configure_forkserver() -> None:
    """Sets the fork server's preload (:func:`forkserver_preload`) before it starts.

    The fork server is per interpreter, shared by every ``forkserver`` context, and reads its
    preload list once, when it starts: setting the list later changes nothing, so calling
    this once per run is harmless. POSIX only (where "forkserver" exists).
    """
    from multiprocessing import forkserver

    current = getattr(getattr(forkserver, "_forkserver", None), "_preload_modules", _CPYTHON_DEFAULT_PRELOAD)
    forkserver.set_forkserver_preload(forkserver_preload(current, torch_imported="torch" in sys.modules))
