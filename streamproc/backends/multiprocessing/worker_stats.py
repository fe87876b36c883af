"""Counters of one worker process for one run: busy, waiting, blocked, start-up (runs in the worker).

A :class:`WorkerClock` lives in a CPU or GPU worker; it is read once per message or batch,
never per record. The worker sends :meth:`WorkerClock.run_stats` at the run's end (in
``RunEnded`` for a CPU worker, ``WorkerDone`` for a GPU worker) and the main process merges it
into the run's :class:`~streamproc.stats.RunStats`.

Start-up of the first run counts from the process's creation (spawn or fork, imports, the
plan's or the models' load); a later run on a warm worker counts from its ``StartRun``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

from ...stats import ProcessStats

T = TypeVar("T")

_clock = time.perf_counter


def _seconds_since_creation() -> float:
    """Seconds since this process was created (fork or spawn), to 10 ms; 0.0 where unknown.

    Linux: the process's start time and the uptime, both counted from boot in
    ``/proc``. (``psutil.Process().create_time()`` adds the boot time, rounded to the second.)
    """
    import os

    try:
        with open("/proc/self/stat") as f:
            # The command name (field 2) may hold spaces: count fields after its closing ')'.
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


class WorkerClock:
    """Where one worker's time goes during a run. See the module docstring.

    Invariant (per run): ``busy + input_wait + output_blocked + startup <= wall``, each one
    measured around a distinct blocking call or task.
    """

    def __init__(self, name: str, kind: str) -> None:
        self.name = name
        self.kind = kind
        self._age_at_start = _seconds_since_creation()
        self._start = _clock()
        self._first_run = True
        self.stats = ProcessStats(name, kind)

    def begin_run(self) -> None:
        """A run starts (``StartRun`` received): its counters start at zero."""
        if not self._first_run:
            self._start = _clock()
            self._age_at_start = 0.0
        self.stats = ProcessStats(self.name, self.kind)

    def loaded(self) -> None:
        """The run's plan (or models) are loaded: start-up ends here."""
        self.stats.startup_seconds = self._age_at_start + _clock() - self._start

    def timed(self, into: str, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)``, its seconds added to the counter ``into`` (e.g. ``"idle_seconds"``)."""
        start = _clock()
        try:
            return fn(*args)
        finally:
            setattr(self.stats, into, getattr(self.stats, into) + _clock() - start)

    # The two waits of every message, without timed()'s attribute lookup by name.
    def waiting_for_input(self, fn: Callable[[], T]) -> T:
        """``fn()`` (reading the next message), its seconds counted as waiting for input."""
        start = _clock()
        try:
            return fn()
        finally:
            self.stats.input_wait_seconds += _clock() - start

    def blocked_sending(self, fn: Callable[[bytes], T], data: bytes) -> T:
        """``fn(data)`` (sending a result), its seconds counted as blocked on output."""
        start = _clock()
        try:
            return fn(data)
        finally:
            self.stats.output_blocked_seconds += _clock() - start

    def busy(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` (a task) counted as busy, except the time it spent blocked sending outputs."""
        blocked = self.stats.output_blocked_seconds
        start = _clock()
        try:
            return fn(*args)
        finally:
            self.stats.busy_seconds += _clock() - start - (self.stats.output_blocked_seconds - blocked)

    def run_stats(self) -> ProcessStats:
        """This run's figures, its wall time up to now; the next run counts from its own start."""
        self.stats.wall_seconds = self._age_at_start + _clock() - self._start
        self._first_run = False
        return self.stats
