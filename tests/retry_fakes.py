"""Fakes of the retry and stuck-task tests (tests/test_task_retries.py, tests/test_task_timeout.py).

Light to import (standard library and streamproc's core only), as tests/multiprocessing_fakes.py:
under spawn each worker imports this module. Faults that must fire a given number of times
across worker processes count through marker files created with ``O_EXCL`` (one process wins
each), never through a counter each process would hold its own copy of.
"""

from __future__ import annotations

import faulthandler
import os
import re
import signal
import threading
from typing import Any, Optional


def _claim(directory: str, times: Optional[int]) -> bool:
    """Whether this call is one of the first ``times`` (None: every call) to get here."""
    if times is None:
        return True
    for attempt in range(times):
        try:
            os.close(os.open(os.path.join(directory, f"fault-{attempt}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            continue
        return True
    return False


def kill_this_process(fault: str) -> None:
    """Ends the calling process: ``sigkill`` (as the OOM killer), ``segfault`` or ``os_exit``."""
    if fault == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif fault == "segfault":
        faulthandler.disable()  # no dump on the test's stderr
        faulthandler._sigsegv()
    elif fault == "os_exit":
        os._exit(1)
    raise ValueError(fault)


class CrashAt:
    """A ``map`` fn: identity, but on record ``at`` it ends its process (``times`` times in all,
    None: every time). ``in_gpu_worker``-free: runs in CPU workers only."""

    def __init__(self, fault: str, at: int, directory: str, times: Optional[int] = 1) -> None:
        self.fault = fault
        self.at = at
        self.directory = directory
        self.times = times
        self.__name__ = f"crash_at_{at}"

    def __call__(self, x: Any) -> Any:
        if x == self.at and _claim(self.directory, self.times):
            kill_this_process(self.fault)
        return x


class HangAt:
    """A ``map`` fn: identity, but on record ``at`` it blocks for ever (``how``: an Event that
    never fires, ``signal.pause()``, or a regex that backtracks for ever holding the GIL)."""

    def __init__(self, at: int, how: str = "event") -> None:
        self.at = at
        self.how = how
        self.__name__ = f"hang_at_{at}"

    def __call__(self, x: Any) -> Any:
        if x == self.at:
            if self.how == "event":
                threading.Event().wait()
            elif self.how == "pause":
                signal.pause()
            elif self.how == "gil":
                # Catastrophic backtracking: the re engine never releases the GIL.
                re.match(r"(a+)+$", "a" * 64 + "b")
        return x


def repeat_three(x: Any) -> list[Any]:
    """For ``flatten``: three outputs per record, so a task's outputs span several chunks."""
    return [x, x, x]


def plus_one_tensor(batch: Any) -> Any:
    return batch + 1


def to_tensor(records: list[Any]) -> Any:
    import torch

    return torch.tensor(records)


def keep_records(records: list[Any], outputs: Any) -> list[Any]:
    return [r + 1000 * 0 for r in records]


class SlowIdentity:
    """A ``map`` fn that takes ``seconds`` per record (CPU load, not a synchronisation)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.__name__ = "slow_identity"

    def __call__(self, x: Any) -> Any:
        import time

        time.sleep(self.seconds)
        return x
