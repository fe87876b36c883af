"""What the fault tables share (no test here): the run, the guard, the killer, the expectations.

A fault case puts one fault at one process boundary and runs the stream under
``run_guarded``: a hang fails the test with "deadlock" instead of hanging the suite. The
tables are in tests/test_multiprocessing_faults.py (CPU workers, the main process) and
tests/test_gpu_faults.py (GPU workers).

Which cases run (``table_cases``): by default, every fault at every boundary under fork, and
under spawn and forkserver one fault per boundary, rotated so that each fault also runs under
each method at least once; with ``STREAMPROC_FULL_FAULT_TABLE=1`` (``tox -e faults``), the
full product of boundaries, faults and start methods.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

import psutil

import streamproc as sp
from tests.hang_guard import run_guarded
from tests.utils import UserError, collect_until_error, wait_for_condition

#: Every run of the tables: 2 CPU workers (one fails while the other works), 8 tasks of 5 records.
NUM_RECORDS, TASK_SIZE, NUM_WORKERS = 40, 5, 2
#: The record (and task) where faults fire: task 2 holds records 10-14. Faults in a GPU worker
#: fire on the first batch it gets that holds a record >= FAULT_AT.
FAULT_AT = 13
FAULT_TASK = FAULT_AT // TASK_SIZE
#: The most a faulty run may take to raise: past it, the hang guard fails the test with
#: "deadlock". Crash detection is immediate; shutdown joins with SHUTDOWN_JOIN_TIMEOUT_S at
#: worst; spawn and forkserver add torch imports in each worker on a loaded 2-core machine.
MAX_FAILURE_S = 30.0
#: From an external SIGKILL to the sink's WorkerCrashedError: the worker's sentinel wakes the
#: collector at once; this leaves room for a loaded machine ("within seconds, never a hang").
MAX_KILL_NOTICED_S = 10.0
#: How long a SIGKILL case waits for the victim to say it started.
STARTED_TIMEOUT_S = 30.0

START_METHODS = ["fork", "spawn", "forkserver"]
#: Set to "1" to run the full product of boundaries, faults and start methods.
FULL_TABLE_ENV = "STREAMPROC_FULL_FAULT_TABLE"

# What each crash fault makes the sink raise: WorkerCrashedError, whose message matches this
# (the exit code or the signal). The worker's name and pid are checked by the tables.
CRASH_MATCHES = {
    "sys_exit": r"SystemExit\(3\)|exit code 3",
    "os_exit": r"exit code 1\b",
    "os_exit0": r"exit code 0\b",
    "segfault": r"SIGSEGV",
    "sigkill": r"SIGKILL",
}
#: Faults that kill the process outright: the error names its pid.
HARD_CRASHES = {"os_exit", "os_exit0", "segfault", "sigkill"}


def full_table() -> bool:
    """Whether ``STREAMPROC_FULL_FAULT_TABLE=1`` asks for the full product of the tables."""
    return os.environ.get(FULL_TABLE_ENV, "") == "1"


def table_cases(
    cases: Sequence[Any], faults: Sequence[str], boundary_of: Optional[Callable[[Any], str]] = None
) -> list[tuple[Any, ...]]:
    """The ``(method, case, fault)`` triples to run; a case is a boundary, or a boundary and
    where it runs (``boundary_of(case)`` names its boundary; by default the case is one).

    Under fork, every fault at every case. Under spawn and forkserver, ``max(boundaries,
    len(faults))`` runs: run ``i`` takes boundary ``i % boundaries`` (one of its cases, in turn)
    and fault ``(i + k) % len(faults)``, ``k`` the method's rank, so that every boundary and
    every fault run at least once per method, with different pairs under each method.
    Everything under every method with ``full_table()``.
    """
    groups: dict[str, list[Any]] = {}
    for case in cases:
        groups.setdefault(boundary_of(case) if boundary_of else case, []).append(case)
    boundaries = list(groups.values())
    chosen: list[tuple[Any, ...]] = []
    for rank, method in enumerate(START_METHODS):
        if method == "fork" or full_table():
            chosen += [(method, case, fault) for case in cases for fault in faults]
            continue
        for i in range(max(len(boundaries), len(faults))):
            group = boundaries[i % len(boundaries)]
            chosen.append((method, group[(i // len(boundaries) + rank) % len(group)], faults[(i + rank) % len(faults)]))
    return chosen


class Killer:
    """Kills, with SIGKILL, the worker that announces itself in ``started_path`` (from a thread).

    The victim is looked up among this process's descendants (psutil), so the test can only
    ever kill one of its own workers.
    """

    def __init__(self, started_path: Path) -> None:
        self.started_path = started_path
        self.killed_at: Optional[float] = None
        self.error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name="test-killer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            wait_for_condition(self.started_path.exists, STARTED_TIMEOUT_S, message="the victim to start")
            pid = int(self.started_path.read_text())
            descendants = {p.pid for p in psutil.Process().children(recursive=True)}
            assert pid in descendants, f"pid {pid} is not a worker of this test"
            self.killed_at = time.monotonic()
            os.kill(pid, signal.SIGKILL)
        except BaseException as exc:
            self.error = exc

    def join(self) -> None:
        self._thread.join(STARTED_TIMEOUT_S + 5)
        assert not self._thread.is_alive()
        if self.error is not None:
            raise self.error


def mp_options(method: str = "fork", **changes: Any) -> dict[str, Any]:
    """``set_processing`` kwargs of the tables: NUM_WORKERS CPU workers, TASK_SIZE, ``method``."""
    options = {"backend": "multiprocessing", "num_cpu_workers": NUM_WORKERS, "task_size": TASK_SIZE}
    return {**options, "process_start_method": method, **changes}


RunResult = tuple[list[Any], Optional[BaseException], float]


def run_with_fault(
    stream: sp.Stream, options: dict[str, Any], fault: str = "raise", started_path: Optional[Path] = None, what: str = "the run"
) -> RunResult:
    """Runs ``stream`` under ``options`` and the hang guard (deadline MAX_FAILURE_S); with the
    SIGKILL fault, a Killer kills the victim. Returns the outputs, the error and the seconds
    the error took (from the kill, for SIGKILL)."""
    killer = Killer(started_path) if fault == "sigkill" and started_path is not None else None
    start = time.monotonic()
    outputs, exc = run_guarded(lambda: collect_until_error(stream.set_processing(**options)), MAX_FAILURE_S, what)
    end = time.monotonic()
    if killer is not None:
        killer.join()
        assert killer.killed_at is not None
        start = killer.killed_at  # what matters: how fast the kill is noticed
    return outputs, exc, end - start


def check_prefix_of_whole_tasks(outputs: list[Any], before: int) -> None:
    """Deterministic runs: the outputs are whole tasks, in order, and no more than ``before`` records."""
    assert outputs == list(range(len(outputs))), outputs
    assert len(outputs) <= before and len(outputs) % TASK_SIZE == 0, outputs


def check_user_error(exc: BaseException, raise_line: str) -> str:
    """The user's own type, with the worker's traceback (the line that raised) as ``__cause__``.

    Returns the notes streamproc attached, one per line, for the caller's checks.
    """
    assert type(exc) is UserError, f"{type(exc).__name__}: {exc}"
    assert isinstance(exc.__cause__, sp.RemoteTraceback), repr(exc.__cause__)
    assert raise_line in str(exc.__cause__)
    assert "in do_fault" in str(exc.__cause__)
    return "\n".join(getattr(exc, "__notes__", []))


def check_crash(exc: BaseException, fault: str, worker: str) -> None:
    """A WorkerCrashedError naming ``worker`` (a regex: "cpu worker \\d", "gpu worker 1") and
    the exit code or signal of ``fault``, and the pid for a process killed outright."""
    assert type(exc) is sp.WorkerCrashedError, f"{type(exc).__name__}: {exc}"
    message = str(exc)
    assert re.search(rf"\b{worker}\b", message), message
    assert re.search(CRASH_MATCHES[fault], message), message
    if fault in HARD_CRASHES:
        assert re.search(r"\(pid \d+\)", message), message
