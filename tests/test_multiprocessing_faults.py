"""Faults at every process boundary of the multiprocessing backend (loky's ``crash_cases`` table).

Each case puts one fault at one boundary and checks what the sink raises, and how fast. Worker
boundaries get every fault: a user exception (which must keep its type, with the worker's
traceback as ``__cause__``), ``sys.exit``, ``os._exit(1)``, a segfault and an external SIGKILL
(the OOM killer's stand-in). Main-process boundaries (the source iterator, pickling tasks,
unpickling results, the parquet writer) only get exceptions: a crash there is the test
runner's own death. The autouse fixture of conftest.py checks that nothing is left behind.
"""

from __future__ import annotations

import multiprocessing.process
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import psutil
import pytest

import streamproc as sp
from streamproc.backends.multiprocessing import pool as executor
from tests import multiprocessing_fakes as fakes
from tests.utils import UserError, collect_until_error, identity, wait_for_condition

#: Every run of this file: 2 workers (one fails while the other works), 8 tasks of 5 records.
NUM_RECORDS, TASK_SIZE, NUM_WORKERS = 40, 5, 2
#: The record (and task) where faults fire: task 2 holds records 10-14.
FAULT_AT = 13
FAULT_TASK = FAULT_AT // TASK_SIZE
#: The most a faulty run may take to raise (crash detection is immediate; shutdown joins
#: with SHUTDOWN_JOIN_TIMEOUT_S at worst; spawn and torch imports add start-up time).
MAX_FAILURE_S = 30.0
#: From an external SIGKILL to the sink's WorkerCrashedError: the worker's sentinel wakes the
#: collector at once; this leaves room for a loaded machine ("within seconds, never a hang").
MAX_KILL_NOTICED_S = 10.0
#: How long a SIGKILL test waits for the victim to say it started.
STARTED_TIMEOUT_S = 30.0

START_METHODS = ["fork", "spawn"]
WORKER_FAULTS = ["raise", "sys_exit", "os_exit", "segfault", "sigkill"]


@pytest.fixture(autouse=True)
def no_temporary_files_left(request: pytest.FixtureRequest) -> Any:
    """After each test that had a temporary directory: no ``.inprogress`` part left in it."""
    yield
    tmp_path = request.node.funcargs.get("tmp_path")
    if tmp_path is not None:
        assert [p.name for p in tmp_path.rglob("*.inprogress")] == []


def mp_options(method: str = "fork", **changes: Any) -> dict[str, Any]:
    options = {"backend": "multiprocessing", "num_cpu_workers": NUM_WORKERS, "task_size": TASK_SIZE}
    return {**options, "process_start_method": method, **changes}


# -- the fault table ------------------------------------------------------------------------


def build_worker_boundary(boundary: str, fault: str, started_path: str) -> sp.Stream:
    """A stream over ``range(NUM_RECORDS)`` whose ``boundary`` (in a CPU worker) performs ``fault``."""

    def at(where: str, fn: Any = identity) -> fakes.FaultAt:
        return fakes.FaultAt(fault, FAULT_AT, where, fn, started_path)

    base = sp.from_iterable(range(NUM_RECORDS))
    if boundary == "reader":
        return sp.Stream(fakes.FaultySource(NUM_RECORDS, fault, FAULT_AT, started_path)).map(identity)
    if boundary == "stream_unpickling":
        return base.map(fakes.FaultAtUnpickle(fault, started_path))
    if boundary == "map":
        return base.map(at("map"))
    if boundary == "filter":
        return base.filter(at("filter", fakes.always_true))
    if boundary == "map_batches":
        return base.map_batches(at("map_batches", fakes.batch_identity), batch_size=3)
    if boundary == "prepare_batch":
        return base.map_gpu(at("prepare_batch", fakes.to_tensor), fakes.plus_one, fakes.keep_records, batch_size=3)
    if boundary == "forward":
        return base.map_gpu(fakes.to_tensor, at("forward", fakes.plus_one), fakes.keep_records, batch_size=3)
    if boundary == "postprocess":
        return base.map_gpu(fakes.to_tensor, fakes.plus_one, at("postprocess", fakes.keep_records), batch_size=3)
    if boundary == "result_pickling":
        return base.map(fakes.ReturnFaultAtPickle(fault, FAULT_AT, started_path))
    raise ValueError(boundary)


WORKER_BOUNDARIES = [
    "reader",
    "stream_unpickling",
    "map",
    "filter",
    "map_batches",
    "prepare_batch",
    "forward",
    "postprocess",
    "result_pickling",
]

# What each fault raises at the sink: (exception type, regex its message matches).
CRASH_EXPECTATIONS: dict[str, tuple[type[BaseException], str]] = {
    "raise": (UserError, r"injected fault at "),
    "sys_exit": (sp.WorkerCrashedError, r"SystemExit|exit code 3"),
    "os_exit": (sp.WorkerCrashedError, r"exit code 1"),
    "segfault": (sp.WorkerCrashedError, r"SIGSEGV"),
    "sigkill": (sp.WorkerCrashedError, r"SIGKILL"),
}


def _expected(boundary: str, fault: str) -> tuple[type[BaseException], str]:
    if boundary == "result_pickling" and fault == "raise":
        # The output cannot be pickled: the worker sends the pickling error instead.
        return sp.SerializationError, r"output of task \d+ cannot be pickled"
    return CRASH_EXPECTATIONS[fault]


FAULT_TABLE = [(boundary, fault, *_expected(boundary, fault)) for boundary in WORKER_BOUNDARIES for fault in WORKER_FAULTS]

# Spawn starts slowly (a fresh interpreter per worker; torch too for map_gpu stages): under
# spawn, every fault at the boundaries whose code path depends on the start method (loading
# the stream, a user op, pickling results), and the user exception at the other CPU ones.
SPAWN_ALL_FAULTS = {"stream_unpickling", "map", "result_pickling"}
SPAWN_RAISE_ONLY = {"reader", "filter", "map_batches"}


def _table_params() -> list[Any]:
    params = []
    for method in START_METHODS:
        for boundary, fault, exc_type, match in FAULT_TABLE:
            if method == "spawn" and not (boundary in SPAWN_ALL_FAULTS or (boundary in SPAWN_RAISE_ONLY and fault == "raise")):
                continue
            params.append(pytest.param(method, boundary, fault, exc_type, match, id=f"{method}-{boundary}-{fault}"))
    return params


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


RunResult = tuple[list[Any], Optional[BaseException], float]


def run_with_fault(stream: sp.Stream, method: str, fault: str = "raise", started_path: Optional[Path] = None) -> RunResult:
    """Runs ``stream``; with the SIGKILL fault, a Killer kills the victim. Returns outputs, error, seconds."""
    killer = Killer(started_path) if fault == "sigkill" and started_path is not None else None
    start = time.monotonic()
    outputs, exc = collect_until_error(stream.set_processing(**mp_options(method)))
    end = time.monotonic()
    if killer is not None:
        killer.join()
        assert killer.killed_at is not None
        start = killer.killed_at  # what matters: how fast the kill is noticed
    return outputs, exc, end - start


@pytest.mark.parametrize(("method", "boundary", "fault", "expected_exc", "match"), _table_params())
def test_fault_at_worker_boundary(tmp_path, method, boundary, fault, expected_exc, match):
    started_path = tmp_path / "started"
    stream = build_worker_boundary(boundary, fault, str(started_path))
    outputs, exc, seconds = run_with_fault(stream, method, fault, started_path)

    assert exc is not None, f"no error; outputs: {outputs}"
    assert type(exc) is expected_exc, f"{type(exc).__name__}: {exc}"
    assert re.search(match, str(exc)), str(exc)
    assert seconds < (MAX_KILL_NOTICED_S if fault == "sigkill" else MAX_FAILURE_S)
    # Deterministic: the outputs are a prefix of whole tasks before the failing one.
    assert outputs == list(range(len(outputs)))
    assert len(outputs) <= FAULT_TASK * TASK_SIZE and len(outputs) % TASK_SIZE == 0
    notes = "\n".join(getattr(exc, "__notes__", []))
    if expected_exc is UserError:
        # The user's own type; the worker's traceback, with the line that raised, as
        # __cause__; notes naming the worker, the task (or the stream loading) and the stage.
        assert isinstance(exc.__cause__, sp.RemoteTraceback)
        assert fakes.RAISE_LINE in str(exc.__cause__)
        assert "in do_fault" in str(exc.__cause__)
        assert re.search(r"cpu worker \d", notes), notes
        if boundary == "stream_unpickling":
            assert "while loading the stream" in notes
        else:
            assert f"task {FAULT_TASK}" in notes
            assert "the source" in notes if boundary == "reader" else "raised in stage 1" in notes
            if boundary in ("prepare_batch", "forward", "postprocess"):
                assert f"{boundary}" in notes
    elif expected_exc is sp.WorkerCrashedError:
        assert re.search(r"cpu worker \d", str(exc)), str(exc)
    if fault in ("os_exit", "segfault", "sigkill"):
        assert re.search(r"\(pid \d+\)", str(exc)), str(exc)


# -- faults at main-process boundaries --------------------------------------------------------


def failing_generator(k: int) -> Iterator[int]:
    yield from range(k)
    raise UserError(f"source failed after {k} items")


@pytest.mark.parametrize(("method", "k"), [("fork", 0), ("fork", 7), ("fork", 13), ("spawn", 13)])
def test_source_iterator_raising_in_the_main_process(method, k):
    outputs, exc, _ = run_with_fault(sp.from_iterable(failing_generator(k)).map(identity), method)
    assert type(exc) is UserError
    assert str(exc) == f"source failed after {k} items"
    assert outputs == list(range(k))  # deterministic: exactly the k records before the error
    assert any("main process" in note for note in exc.__notes__)


@pytest.mark.parametrize(
    ("method", "record", "cause_type"),
    [
        pytest.param("fork", (x for x in "ab"), TypeError, id="fork-generator"),
        pytest.param("fork", fakes.RaisesWhenPickled(), UserError, id="fork-reduce-raises"),
        pytest.param("spawn", fakes.RaisesWhenPickled(), UserError, id="spawn-reduce-raises"),
    ],
)
def test_record_that_cannot_be_pickled_for_a_worker(method, record, cause_type):
    records = [*range(FAULT_AT), record, *range(FAULT_AT + 1, NUM_RECORDS)]
    outputs, exc, _ = run_with_fault(sp.from_iterable(records).map(identity), method)
    assert type(exc) is sp.SerializationError
    assert f"task {FAULT_TASK} holds a record that cannot be pickled" in str(exc)
    assert isinstance(exc.__cause__, cause_type)
    assert outputs == list(range(FAULT_TASK * TASK_SIZE))


@pytest.mark.parametrize("method", START_METHODS)
def test_output_that_cannot_be_pickled_in_the_worker(method):
    outputs, exc, _ = run_with_fault(sp.from_iterable(range(NUM_RECORDS)).map(fakes.GeneratorAt(FAULT_AT)), method)
    assert type(exc) is sp.SerializationError
    assert f"an output of task {FAULT_TASK} cannot be pickled" in str(exc)
    assert re.search(r"cpu worker \d", str(exc))
    assert outputs == list(range(FAULT_TASK * TASK_SIZE))


def test_user_exception_that_cannot_be_pickled():
    stream = sp.from_iterable(range(NUM_RECORDS)).map(fakes.RaiseUnpicklableErrorAt(FAULT_AT))
    outputs, exc, _ = run_with_fault(stream, "fork")
    # It comes out as the user's type, without the generator it held (tests/test_error_carriers.py).
    assert type(exc) is fakes.UnpicklableError
    assert str(exc) == "cannot travel"
    assert not hasattr(exc, "state")
    assert outputs == list(range(FAULT_TASK * TASK_SIZE))


@pytest.mark.parametrize("method", START_METHODS)
def test_output_that_cannot_be_unpickled_in_the_main_process(method):
    stream = sp.from_iterable(range(NUM_RECORDS)).map(fakes.ReturnFailsToUnpickleInMain(os.getpid(), FAULT_AT))
    outputs, exc, _ = run_with_fault(stream, method)
    assert type(exc) is sp.SerializationError
    assert "cannot be unpickled in the main process" in str(exc)
    assert type(exc.__cause__) is UserError
    assert outputs == list(range(len(outputs))) and len(outputs) <= FAULT_TASK * TASK_SIZE


# A string among ints inside one task: the worker's Arrow conversion fails.
MIXED_IN_A_CHUNK = [{"x": i} for i in range(FAULT_AT)] + [{"x": "text"}] + [{"x": i} for i in range(5)]
# Ints in the first tasks, strings later: the main process's writer fails.
MIXED_ACROSS_CHUNKS = [{"x": i} for i in range(2 * TASK_SIZE)] + [{"x": f"s{i}"} for i in range(20)]


@pytest.mark.parametrize(
    ("method", "records"),
    [
        pytest.param("fork", MIXED_IN_A_CHUNK, id="fork-in-a-worker-chunk"),
        pytest.param("fork", MIXED_ACROSS_CHUNKS, id="fork-across-chunks-in-main"),
        pytest.param("spawn", MIXED_IN_A_CHUNK, id="spawn-in-a-worker-chunk"),
    ],
)
def test_writer_schema_error_leaves_no_partial_file(tmp_path, method, records):
    import pyarrow.parquet as pq

    out = tmp_path / "out"
    stream = sp.from_iterable(records).set_processing(**mp_options(method))
    with pytest.raises(sp.SchemaError, match="'x'"):
        stream.write_parquet(out, row_group_size=TASK_SIZE, rows_per_file=TASK_SIZE)
    assert [p.name for p in tmp_path.rglob("*inprogress*")] == []
    for part in out.glob("*.parquet"):
        assert pq.read_table(part).num_rows == TASK_SIZE  # a part that exists is complete


# -- failing fast, before any worker starts -------------------------------------------------


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_unpicklable_callable_fails_before_any_worker_starts(monkeypatch, method):
    gen = (x for x in range(3))

    def uses_a_generator(x: int) -> int:
        return x if gen else -x

    started: list[Any] = []
    original_start = multiprocessing.process.BaseProcess.start

    def recording_start(self: Any) -> None:
        started.append(self.name)
        original_start(self)

    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", recording_start)
    children_before = {p.pid for p in psutil.Process().children(recursive=True)}
    stream = sp.from_iterable(range(10)).map(identity).map(uses_a_generator).set_processing(**mp_options(method))
    with pytest.raises(sp.SerializationError) as info:
        stream.to_list()
    message = str(info.value)
    assert "uses_a_generator" in message and "stage 2" in message
    assert started == []
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= children_before


# -- crashes around shutdown, and big messages --------------------------------------------------


def test_worker_dying_while_it_is_terminated():
    stream = sp.from_iterable(range(1000)).map(fakes.die_on_sigterm).set_processing(**mp_options())
    start = time.monotonic()
    for record in stream:
        if record == 3:
            break  # shutdown terminates the workers, which die with exit code 7: no error
    assert time.monotonic() - start < executor.SHUTDOWN_JOIN_TIMEOUT_S


def test_worker_ignoring_sigterm_is_killed_at_shutdown(tmp_path):
    started_path = tmp_path / "started"
    stream = sp.from_iterable(range(100)).map(fakes.IgnoreSigtermAndBlock(7, str(started_path))).set_processing(**mp_options())
    iterator = iter(stream)
    assert next(iterator) == 0
    wait_for_condition(started_path.exists, STARTED_TIMEOUT_S, message="the worker to block")
    start = time.monotonic()
    iterator.close()
    # Terminate, wait SHUTDOWN_JOIN_TIMEOUT_S, then SIGKILL: bounded, never a hang.
    assert time.monotonic() - start < executor.SHUTDOWN_JOIN_TIMEOUT_S + executor.KILL_JOIN_TIMEOUT_S + 2.0


def test_worker_dying_at_exit_after_a_complete_run():
    # The worker dies after it has sent every result: depending on which the main process
    # notices first, the run completes or reports the crash. Either way: no hang, no leak,
    # and never a partial result passed off as complete.
    stream = sp.from_iterable(range(50)).map(fakes.register_abnormal_exit).set_processing(**mp_options())
    start = time.monotonic()
    outputs, exc = collect_until_error(stream)
    assert time.monotonic() - start < MAX_FAILURE_S
    if exc is None:
        assert outputs == list(range(50))
    else:
        assert type(exc) is sp.WorkerCrashedError
        assert "exit code 5" in str(exc)


@pytest.mark.parametrize("method", START_METHODS)
def test_big_messages_both_ways_do_not_deadlock(method):
    records = [fakes.big_record(i) for i in range(24)]
    stream = sp.from_iterable(records).map(fakes.double_big).set_processing(**mp_options(method, task_size=3))
    start = time.monotonic()
    outputs = stream.to_list()
    assert time.monotonic() - start < MAX_FAILURE_S
    assert len(outputs) == len(records)
    assert all(out == rec + rec for out, rec in zip(outputs, records))


def test_crash_with_big_messages_in_flight():
    records = [fakes.big_record(i) for i in range(40)]
    stream = sp.from_iterable(records).map(fakes.CrashOnBig(FAULT_AT)).set_processing(**mp_options(task_size=3))
    start = time.monotonic()
    outputs, exc = collect_until_error(stream)
    assert type(exc) is sp.WorkerCrashedError
    assert "exit code 1" in str(exc)
    assert time.monotonic() - start < MAX_FAILURE_S
    assert len(outputs) <= FAULT_AT


def test_early_break_with_big_messages_in_flight():
    # Workers are blocked sending big results nobody reads, feeders blocked sending big tasks.
    stream = sp.from_iterable(fakes.big_record(i) for i in range(200)).map(fakes.double_big)
    iterator = iter(stream.set_processing(**mp_options(task_size=2)))
    next(iterator)
    start = time.monotonic()
    iterator.close()
    assert time.monotonic() - start < executor.SHUTDOWN_JOIN_TIMEOUT_S
