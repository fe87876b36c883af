"""What every worker process does first, and the rules every worker follows.

Runs in CPU and GPU worker processes (nothing here runs in the main process). The prologue
(:func:`start_worker_process`) closes the descriptors a forked child inherited but does not
own, turns on faulthandler, leaves Ctrl-C to the main process, caps implicit thread pools and
starts the parent watchdog. :func:`as_crash` is the one rule for a ``BaseException`` that is
not an ``Exception`` (``sys.exit()`` in user code): the worker ends, and the run fails with a
streamproc error rather than exiting the user's main process.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
from collections.abc import Sequence
from typing import Any

from ...errors import WorkerCrashedError
from .environment import cap_worker_threads, enable_faulthandler
from .messages import WorkerId

#: How often the parent-death watchdog looks at ``os.getppid()``, and how often a blocked
#: wait re-checks what it waits for.
PARENT_CHECK_INTERVAL_S = 1.0


def watch_parent(parent_pid: int) -> None:
    """Exits this process when the parent is gone (torch DataLoader's ManagerWatchdog).

    A thread, so that it also fires while the main loop is blocked sending a large result.
    """
    # Under forkserver the parent is the fork server, not ``parent_pid``, and it outlives a killed
    # main process (every worker holds its "alive" pipe open): there, only multiprocessing's
    # parent sentinel (a pipe the main process holds open) tells. Under fork, a sibling worker
    # inherits that pipe too, so os.getppid() is what tells.
    parents = {parent_pid, os.getppid()}
    sentinel_parent = multiprocessing.parent_process()
    stop = threading.Event()
    while not stop.wait(PARENT_CHECK_INTERVAL_S):
        if os.getppid() not in parents or (sentinel_parent is not None and not sentinel_parent.is_alive()):
            os._exit(1)


def start_worker_process(worker: WorkerId, parent_pid: int, inherited: Sequence[Any]) -> None:
    """The prologue of every worker process; call it first thing.

    Args:
        worker: this worker, for thread names.
        parent_pid: the main process.
        inherited: connections a forked child inherited from the main process but must not hold
            (other workers' pipe ends). Holding a copy of another worker's write end would keep
            that pipe open after its owner died, and its reader would wait for ever: each
            worker holds only its own descriptors (as loky's ``popen_loky_posix`` passes
            a child only the descriptors it needs). Empty under spawn and forkserver, whose
            children inherit nothing.
    """
    for conn in inherited:
        conn.close()
    # Not faulthandler.enable(): it raises when a forked worker inherits a sys.stderr without
    # a file descriptor (pytest capsys, Jupyter), and the worker would die before reporting.
    enable_faulthandler()
    _dump_stacks_on_sigusr1()
    # Ctrl-C reaches the whole process group: the main process handles it and stops us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    cap_worker_threads()
    name = f"streamproc-{worker.kind}-{worker.index}-watchdog"
    threading.Thread(target=watch_parent, args=(parent_pid,), name=name, daemon=True).start()


def _dump_stacks_on_sigusr1() -> None:
    """``kill -USR1 <worker pid>`` prints every thread's stack (the tests' hang guard asks for it)."""
    import faulthandler
    import sys

    for stream in (sys.stderr, sys.__stderr__):
        try:
            if stream is not None:
                faulthandler.register(signal.SIGUSR1, file=stream, all_threads=True)
                return
        except (AttributeError, ValueError, OSError, RuntimeError):  # no usable fileno()
            continue


def as_crash(exc: BaseException, worker: WorkerId, doing: str) -> BaseException:
    """``exc`` itself if it is an ``Exception``; else a :class:`WorkerCrashedError` caused by it.

    ``sys.exit()`` (or any ``BaseException`` that is not an ``Exception``) raised by user code in
    a worker, re-raised as is in the main process, would exit the user's program: the worker
    ends instead, and the run fails with a streamproc error naming what the worker was doing.

    >>> str(as_crash(SystemExit(3), WorkerId("cpu", 1), "in task 4"))
    'cpu worker 1 stopped: user code raised SystemExit(3) in task 4'
    """
    if isinstance(exc, Exception):
        return exc
    args = ", ".join(map(repr, exc.args))
    crash = WorkerCrashedError(f"{worker} stopped: user code raised {type(exc).__name__}({args}) {doing}")
    crash.__cause__ = exc
    return crash
