"""A hang guard that fails the test (CPython's ``_fail_on_deadlock``, loky's ``_check_deadlock``).

``faulthandler_timeout`` only dumps stacks, and a timing assert after a blocking ``to_list()``
never runs if the call hangs. ``run_guarded(fn, timeout_s, what)`` calls ``fn`` in a daemon
thread of this process and waits for it at most ``timeout_s``. If ``fn`` has not returned by
then, the guard:

1. dumps the stacks of the other threads of this process (``faulthandler.dump_traceback``)
   into the failure message, and asks each descendant that registered faulthandler on
   SIGUSR1 to dump its own (to its stderr, which pytest captures);
2. kills, with SIGKILL, every descendant of this process except multiprocessing's own servers
   (``MULTIPROCESSING_SERVERS``: shared by every run, never part of a hang, and restarted only
   if *multiprocessing* reaps them, so the guard leaves them alone);
3. waits up to ``UNBLOCK_TIMEOUT_S`` for ``fn``'s thread to end, killing any process started
   meanwhile: a run whose workers died notices it (their sentinels fire, their pipes break),
   raises ``WorkerCrashedError`` and shuts down, joining (reaping) its own processes;
4. reaps whatever is left and fails the test with ``pytest.fail("deadlock: ...")``, naming
   ``what``, the deadline, how ``fn``'s thread ended, the killed processes and the stacks.

If the thread still cannot end (it waits on something no kill breaks, such as a lock of this
process), it is left behind: it is a daemon thread, so it never keeps the interpreter from
exiting, and the failure message says it is still running. The test fails either way.

The same clean-up runs when the wait itself is interrupted (Ctrl-C, or pytest-timeout's SIGALRM
raising in the main thread): the children are killed before the exception goes on.

Kept free of streamproc imports: the guard must work whatever state the library is in.
"""

from __future__ import annotations

import faulthandler
import multiprocessing
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any, Optional, TypeVar

import psutil
import pytest

T = TypeVar("T")

#: After the kill: how long ``fn``'s thread gets to see its workers die and return. The run's
#: own shutdown joins each worker for at most SHUTDOWN_JOIN_TIMEOUT_S + KILL_JOIN_TIMEOUT_S
#: (5 + 2 s), and the collector wakes at least once per RESULT_WAIT_TIMEOUT_S (1 s).
UNBLOCK_TIMEOUT_S = 15.0
#: While it waits for ``fn``'s thread to end, the guard kills new descendants this often.
KILL_POLL_S = 0.1
#: How long killed processes get to be reaped (by their owner, else here).
REAP_TIMEOUT_S = 5.0
#: How long descendants that registered faulthandler on SIGUSR1 get to write their stacks
#: before the SIGKILL. A fixed grace, not a synchronisation: a dump that is late is only lost.
CHILD_DUMP_GRACE_S = 0.5
#: The stacks in the failure message are cut to this many characters (the start is kept).
MAX_STACKS_CHARS = 20_000

#: Server processes that ``multiprocessing`` starts once and keeps for the life of the
#: interpreter (spawn and forkserver start them): stdlib infrastructure, not a test's workers.
#: Recognised by their command line, and only as *direct* children: a forkserver's own
#: children (``streamproc-cpu-*`` workers under forkserver) carry the same command line and
#: are workers.
MULTIPROCESSING_SERVERS = ("from multiprocessing.resource_tracker import main", "from multiprocessing.forkserver import main")


def is_multiprocessing_server(proc: psutil.Process, parent_pid: int) -> bool:
    """Whether ``proc`` is a resource tracker or forkserver started by process ``parent_pid``."""
    try:
        return proc.ppid() == parent_pid and any(server in " ".join(proc.cmdline()) for server in MULTIPROCESSING_SERVERS)
    except psutil.Error:  # gone, or a zombie whose command line cannot be read
        return False


def worker_processes() -> list[psutil.Process]:
    """Every descendant of this process, zombies included, minus multiprocessing's servers."""
    me = psutil.Process()
    return [child for child in me.children(recursive=True) if not is_multiprocessing_server(child, me.pid)]


def describe_process(proc: psutil.Process) -> str:
    """``pid N (status): command line`` of ``proc``, as far as it can still be read."""
    try:
        with proc.oneshot():
            return f"pid {proc.pid} ({proc.status()}): {' '.join(proc.cmdline())[:120]}"
    except psutil.Error:
        return f"pid {proc.pid} (gone)"


class _Guarded:
    """``fn`` running in thread ``hang-guard-<what>``: its result or exception, once it ends."""

    def __init__(self, fn: Callable[[], Any], what: str) -> None:
        self.fn = fn
        self.result: Any = None
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._run, name=f"hang-guard-{what}", daemon=True)

    def _run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as exc:  # re-raised in the test's thread, with its own type
            self.error = exc


def run_guarded(
    fn: Callable[[], T], timeout_s: float, what: str = "the guarded call", unblock_timeout_s: float = UNBLOCK_TIMEOUT_S
) -> T:
    """Runs ``fn()`` in a daemon thread; fails the test with "deadlock: ..." after ``timeout_s``.

    Runs in the test's process (the thread); ``fn`` may start worker processes, which are what
    the guard kills on a hang. See the module docstring for what happens on a timeout.

    >>> run_guarded(lambda: 1 + 1, timeout_s=5)
    2

    Args:
        fn: The blocking call, e.g. ``lambda: stream.to_list()`` or
            ``lambda: collect_until_error(stream)``.
        timeout_s: The deadline, in seconds, for ``fn`` to return or raise.
        what: What ``fn`` runs, for the failure message and the thread's name.
        unblock_timeout_s: After the kill, how long ``fn``'s thread gets to end.

    Returns:
        What ``fn`` returned.

    Raises:
        BaseException: Whatever ``fn`` raised, as is (its own type and traceback).
        pytest.fail.Exception: ``fn`` did not end within ``timeout_s`` ("deadlock: ...").
    """
    guarded = _Guarded(fn, what)
    start = time.monotonic()
    guarded.thread.start()
    try:
        guarded.thread.join(timeout_s)
    except BaseException:
        # Interrupted while waiting (KeyboardInterrupt, pytest-timeout's signal): leave no child.
        _kill_and_reap(guarded, unblock_timeout_s)
        raise
    if guarded.thread.is_alive():
        stacks = _dump_stacks()
        killed = _kill_and_reap(guarded, unblock_timeout_s)
        pytest.fail(_deadlock_message(what, timeout_s, time.monotonic() - start, guarded, killed, stacks), pytrace=False)
    if guarded.error is not None:
        raise guarded.error
    return guarded.result


def _dump_stacks() -> str:
    """The stacks of this process's other threads; asks children that can for theirs."""
    with tempfile.TemporaryFile(mode="w+") as f:
        faulthandler.dump_traceback(file=f, all_threads=True)
        f.seek(0)
        blocks = f.read().split("\n\n")
    # The current thread is the guard itself, waiting in the test: no news there.
    stacks = "\n\n".join(block for block in blocks if not block.startswith("Current thread"))
    asked = [proc for proc in worker_processes() if _dumps_on_sigusr1(proc.pid)]
    for proc in asked:
        try:
            os.kill(proc.pid, signal.SIGUSR1)
        except ProcessLookupError:
            pass
    if asked:
        time.sleep(CHILD_DUMP_GRACE_S)
        stacks += f"\n(asked pids {[p.pid for p in asked]} to dump their stacks to their stderr, with SIGUSR1)\n"
    return stacks


def _dumps_on_sigusr1(pid: int) -> bool:
    """Whether process ``pid`` catches SIGUSR1 (``faulthandler.register``): Linux only, else False.

    Sending SIGUSR1 to a process that does not catch it would kill it with the wrong signal.
    """
    try:
        with open(f"/proc/{pid}/status") as f:
            caught = next(line for line in f if line.startswith("SigCgt:"))
    except (OSError, StopIteration):
        return False
    return bool(int(caught.split()[1], 16) & (1 << (signal.SIGUSR1 - 1)))


def _kill_and_reap(guarded: _Guarded, unblock_timeout_s: float) -> list[str]:
    """Kills every worker process until ``guarded``'s thread ends (or ``unblock_timeout_s``
    passes), then reaps what is left. Returns the descriptions of the killed processes.

    Killing goes on while the thread ends: a process started after the first kill (a run that
    was still starting its workers, or one that replaces a crashed worker) would hang it again.
    """
    killed: dict[int, psutil.Process] = {}
    described: list[str] = []
    deadline = time.monotonic() + unblock_timeout_s
    while True:
        for proc in worker_processes():
            if proc.pid in killed:
                continue
            described.append(describe_process(proc))
            killed[proc.pid] = proc
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        # The owner (the run's shutdown, multiprocessing) reaps its own processes: a process
        # reaped behind multiprocessing's back would look alive to it forever.
        guarded.thread.join(min(KILL_POLL_S, max(0.0, deadline - time.monotonic())))
        if not guarded.thread.is_alive() or time.monotonic() >= deadline:
            break
    multiprocessing.active_children()  # joins finished multiprocessing children
    psutil.wait_procs(list(killed.values()), timeout=REAP_TIMEOUT_S)
    return described


def _deadlock_message(what: str, timeout_s: float, elapsed_s: float, guarded: _Guarded, killed: list[str], stacks: str) -> str:
    if guarded.thread.is_alive():
        ended = f"{guarded.thread.name} is STILL RUNNING after the kill (left behind as a daemon thread)"
    elif guarded.error is not None:
        ended = f"after the kill, it raised {type(guarded.error).__name__}: {guarded.error}"
    else:
        ended = f"after the kill, it returned {guarded.result!r:.300}"
    if len(stacks) > MAX_STACKS_CHARS:
        stacks = stacks[:MAX_STACKS_CHARS] + "\n[... cut]"
    return (
        f"deadlock: {what} did not finish within {timeout_s:g} s; {ended} ({elapsed_s:.1f} s in all).\n"
        f"killed {len(killed)} process(es) with SIGKILL: {killed}\n"
        f"stacks when the deadline passed:\n{stacks}"
    )
