"""Faults at every process boundary of the CPU workers and the main process (loky's ``crash_cases``).

Each case puts one fault at one boundary and checks what the sink raises, and how fast, under
the hang guard (tests/hang_guard.py: a hang fails with "deadlock"). Worker boundaries get every
fault: a user exception (which must keep its type, with the worker's traceback as
``__cause__``), ``sys.exit``, ``os._exit(1)``, a segfault and an external SIGKILL (the OOM
killer's stand-in), under fork; spawn and forkserver get one fault per boundary, rotated (see
``tests.fault_cases.table_cases``; all of them with ``STREAMPROC_FULL_FAULT_TABLE=1``).
Main-process boundaries (the source iterator, pickling tasks, unpickling results, the parquet
writer) only get exceptions: a crash there is the test runner's own death. GPU-worker
boundaries are in tests/test_gpu_faults.py. The autouse fixture of conftest.py checks that
nothing is left behind.
"""

from __future__ import annotations

import multiprocessing.process
import os
import re
import time
import warnings
from collections.abc import Iterator
from typing import Any

import psutil
import pytest

import streamproc as sp
from streamproc.backends.multiprocessing import pool as executor
from tests import multiprocessing_fakes as fakes
from tests.fault_cases import (
    FAULT_AT,
    FAULT_TASK,
    MAX_FAILURE_S,
    MAX_KILL_NOTICED_S,
    NUM_RECORDS,
    STARTED_TIMEOUT_S,
    TASK_SIZE,
    check_crash,
    check_prefix_of_whole_tasks,
    check_user_error,
    mp_options,
    run_with_fault,
    table_cases,
)
from tests.hang_guard import run_guarded
from tests.utils import UserError, identity, wait_for_condition

WORKER_FAULTS = ["raise", "sys_exit", "os_exit", "segfault", "sigkill"]


@pytest.fixture(autouse=True)
def no_temporary_files_left(request: pytest.FixtureRequest) -> Any:
    """After each test that had a temporary directory: no ``.inprogress`` part left in it."""
    yield
    tmp_path = request.node.funcargs.get("tmp_path")
    if tmp_path is not None:
        assert [p.name for p in tmp_path.rglob("*.inprogress")] == []


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


@pytest.mark.parametrize(
    ("method", "boundary", "fault"),
    [pytest.param(*case, id="-".join(case)) for case in table_cases(WORKER_BOUNDARIES, WORKER_FAULTS)],
)
def test_fault_at_worker_boundary(tmp_path, method, boundary, fault):
    started_path = tmp_path / "started"
    stream = build_worker_boundary(boundary, fault, str(started_path))
    what = f"a run with {fault} at {boundary} under {method}"
    outputs, exc, seconds = run_with_fault(stream, mp_options(method), fault, started_path, what)

    assert exc is not None, f"no error; outputs: {outputs}"
    assert seconds < (MAX_KILL_NOTICED_S if fault == "sigkill" else MAX_FAILURE_S)
    check_prefix_of_whole_tasks(outputs, before=FAULT_TASK * TASK_SIZE)
    if boundary == "result_pickling" and fault == "raise":
        # The output cannot be pickled: the worker sends the pickling error instead.
        assert type(exc) is sp.SerializationError, f"{type(exc).__name__}: {exc}"
        assert re.search(rf"output of task {FAULT_TASK} cannot be pickled.*cpu worker \d", str(exc)), str(exc)
    elif fault == "raise":
        # The user's own type; the worker's traceback, with the line that raised, as
        # __cause__; notes naming the worker, the task (or the stream loading) and the stage.
        notes = check_user_error(exc, fakes.RAISE_LINE)
        assert re.search(r"cpu worker \d", notes), notes
        if boundary == "stream_unpickling":
            assert "while loading the stream" in notes
        else:
            assert f"task {FAULT_TASK}" in notes
            assert "the source" in notes if boundary == "reader" else "raised in stage 1" in notes
            if boundary in ("prepare_batch", "forward", "postprocess"):
                assert f"{boundary}" in notes
    else:
        check_crash(exc, fault, r"cpu worker \d")


#: Retries (tests/test_task_retries.py has the runs that survive): a fault that fires on every
#: attempt exhausts ``max_task_retries`` and ends as without retries, the count in the message.
RETRIED_FAULTS = ["os_exit", "segfault", "sys_exit"]


@pytest.mark.parametrize(
    ("method", "boundary", "fault"),
    [pytest.param("fork", b, f, id=f"fork-{b}-{f}") for b in WORKER_BOUNDARIES for f in RETRIED_FAULTS]
    + [pytest.param("spawn", "map", "segfault", id="spawn-map-segfault")],
)
def test_fault_at_worker_boundary_with_retries(tmp_path, method, boundary, fault):
    stream = build_worker_boundary(boundary, fault, str(tmp_path / "started"))
    what = f"a run with {fault} at {boundary} under {method}, max_task_retries=1"
    outputs, exc, _ = run_with_fault(stream, mp_options(method, max_task_retries=1), fault, what=what)
    assert exc is not None, f"no error; outputs: {outputs}"
    check_prefix_of_whole_tasks(outputs, before=FAULT_TASK * TASK_SIZE)
    check_crash(exc, fault, r"cpu worker \d")
    if fault != "sys_exit":  # sys.exit in user code is a user error: never retried
        assert "was retried 1 time(s)" in str(exc), str(exc)


# -- the fault table under the error policies ------------------------------------------------

#: Boundaries where user code runs on records: a raising record is the policy's to drop.
RECORD_BOUNDARIES = ["map", "filter", "map_batches", "prepare_batch", "forward", "postprocess"]
#: (method, boundary, fault, policy): every fault at every boundary under fork, for both
#: lenient policies (the table above is on_error="raise"); one case per policy under spawn.
POLICY_CASES = [
    *[
        ("fork", boundary, fault, policy)
        for policy in ("skip", "dead_letter")
        for boundary in WORKER_BOUNDARIES
        for fault in WORKER_FAULTS
    ],
    ("spawn", "map_batches", "raise", "skip"),
    ("spawn", "forward", "raise", "dead_letter"),
]


@pytest.mark.parametrize(("method", "boundary", "fault", "policy"), [pytest.param(*c, id="-".join(c)) for c in POLICY_CASES])
def test_fault_at_worker_boundary_under_error_policy(tmp_path, method, boundary, fault, policy):
    """A record that raises in user code is dropped (and dead-lettered); every other fault (a
    crash, a failing source, an output that cannot be pickled) stops the run as with "raise"."""
    import pyarrow.parquet as pq

    started_path = tmp_path / "started"
    dead = tmp_path / "dead"
    stream = build_worker_boundary(boundary, fault, str(started_path))
    options = mp_options(method, on_error=policy)
    if policy == "dead_letter":
        options["dead_letter_path"] = str(dead)
    what = f"a run with {fault} at {boundary} under {method}, on_error={policy}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sp.RecordsSkippedWarning)
        outputs, exc, seconds = run_with_fault(stream, options, fault, started_path, what)

    if fault == "raise" and boundary in RECORD_BOUNDARIES:
        assert exc is None, f"{type(exc).__name__}: {exc}"
        assert outputs == [x for x in range(NUM_RECORDS) if x != FAULT_AT]
        if policy == "dead_letter":
            [row] = pq.read_table(dead / f"dead-{FAULT_TASK:08d}.parquet").to_pylist()
            assert (row["record"], row["error_type"], row["task"]) == (str(FAULT_AT), "UserError", FAULT_TASK)
            assert row["stage"].startswith("stage 1 (") and fakes.RAISE_LINE in row["traceback"]
            assert os.listdir(dead) == [f"dead-{FAULT_TASK:08d}.parquet"]
        return
    assert exc is not None, f"no error; outputs: {outputs}"
    assert seconds < (MAX_KILL_NOTICED_S if fault == "sigkill" else MAX_FAILURE_S)
    check_prefix_of_whole_tasks(outputs, before=FAULT_TASK * TASK_SIZE)
    if fault != "raise":
        check_crash(exc, fault, r"cpu worker \d")
    elif boundary == "result_pickling":
        assert type(exc) is sp.SerializationError, f"{type(exc).__name__}: {exc}"
    else:  # the source, loading the stream: not a record's fault
        check_user_error(exc, fakes.RAISE_LINE)


# -- faults at main-process boundaries --------------------------------------------------------


def failing_generator(k: int) -> Iterator[int]:
    yield from range(k)
    raise UserError(f"source failed after {k} items")


@pytest.mark.parametrize(("method", "k"), [("fork", 0), ("fork", 7), ("fork", 13), ("spawn", 13), ("forkserver", 13)])
def test_source_iterator_raising_in_the_main_process(method, k):
    stream = sp.from_iterable(failing_generator(k)).map(identity)
    outputs, exc, _ = run_with_fault(stream, mp_options(method), what=f"a run whose source raises after {k} items")
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
        pytest.param("forkserver", (x for x in "ab"), TypeError, id="forkserver-generator"),
    ],
)
def test_record_that_cannot_be_pickled_for_a_worker(method, record, cause_type):
    records = [*range(FAULT_AT), record, *range(FAULT_AT + 1, NUM_RECORDS)]
    stream = sp.from_iterable(records).map(identity)
    outputs, exc, _ = run_with_fault(stream, mp_options(method), what="a run with a record that cannot be pickled")
    assert type(exc) is sp.SerializationError
    assert f"task {FAULT_TASK} holds a record that cannot be pickled" in str(exc)
    assert isinstance(exc.__cause__, cause_type)
    assert outputs == list(range(FAULT_TASK * TASK_SIZE))


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_output_that_cannot_be_pickled_in_the_worker(method):
    stream = sp.from_iterable(range(NUM_RECORDS)).map(fakes.GeneratorAt(FAULT_AT))
    outputs, exc, _ = run_with_fault(stream, mp_options(method), what="a run with an output that cannot be pickled")
    assert type(exc) is sp.SerializationError
    assert f"an output of task {FAULT_TASK} cannot be pickled" in str(exc)
    assert re.search(r"cpu worker \d", str(exc))
    assert outputs == list(range(FAULT_TASK * TASK_SIZE))


def test_user_exception_that_cannot_be_pickled():
    stream = sp.from_iterable(range(NUM_RECORDS)).map(fakes.RaiseUnpicklableErrorAt(FAULT_AT))
    outputs, exc, _ = run_with_fault(stream, mp_options("fork"), what="a run raising an exception that cannot be pickled")
    # It comes out as the user's type, without the generator it held (tests/test_error_carriers.py).
    assert type(exc) is fakes.UnpicklableError
    assert str(exc) == "cannot travel"
    assert not hasattr(exc, "state")
    assert outputs == list(range(FAULT_TASK * TASK_SIZE))


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_output_that_cannot_be_unpickled_in_the_main_process(method):
    stream = sp.from_iterable(range(NUM_RECORDS)).map(fakes.ReturnFailsToUnpickleInMain(os.getpid(), FAULT_AT))
    outputs, exc, _ = run_with_fault(stream, mp_options(method), what="a run with an output that cannot be unpickled")
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
        pytest.param("forkserver", MIXED_ACROSS_CHUNKS, id="forkserver-across-chunks-in-main"),
    ],
)
def test_writer_schema_error_leaves_no_partial_file(tmp_path, method, records):
    import pyarrow.parquet as pq

    out = tmp_path / "out"
    stream = sp.from_iterable(records).set_processing(**mp_options(method))
    with pytest.raises(sp.SchemaError, match="'x'"):
        run_guarded(
            lambda: stream.write_parquet(out, row_group_size=TASK_SIZE, rows_per_file=TASK_SIZE),
            MAX_FAILURE_S,
            "write_parquet of records whose schema changes",
        )
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
        run_guarded(stream.to_list, MAX_FAILURE_S, "to_list of a stream with an unpicklable callable")
    message = str(info.value)
    assert "uses_a_generator" in message and "stage 2" in message
    assert started == []
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= children_before


# -- crashes around shutdown, and big messages --------------------------------------------------


def first_records_then_break(stream: sp.Stream, last: int) -> list[Any]:
    """Iterates ``stream`` up to the record ``last``, then breaks out (shutting the run down)."""
    outputs = []
    for record in stream:
        outputs.append(record)
        if record == last:
            break
    return outputs


def test_worker_dying_while_it_is_terminated():
    stream = sp.from_iterable(range(1000)).map(fakes.die_on_sigterm).set_processing(**mp_options())
    start = time.monotonic()
    # Shutdown terminates the workers, which die with exit code 7: no error.
    outputs = run_guarded(lambda: first_records_then_break(stream, 3), MAX_FAILURE_S, "a run broken out of early")
    assert outputs == [0, 1, 2, 3]
    assert time.monotonic() - start < executor.SHUTDOWN_JOIN_TIMEOUT_S


def test_worker_ignoring_sigterm_is_killed_at_shutdown(tmp_path):
    started_path = tmp_path / "started"
    stream = sp.from_iterable(range(100)).map(fakes.IgnoreSigtermAndBlock(7, str(started_path))).set_processing(**mp_options())
    iterator = iter(stream)
    assert run_guarded(lambda: next(iterator), MAX_FAILURE_S, "the first record") == 0
    wait_for_condition(started_path.exists, STARTED_TIMEOUT_S, message="the worker to block")
    start = time.monotonic()
    run_guarded(iterator.close, MAX_FAILURE_S, "closing a run whose worker ignores SIGTERM")
    # Terminate, wait SHUTDOWN_JOIN_TIMEOUT_S, then SIGKILL: bounded, never a hang.
    assert time.monotonic() - start < executor.SHUTDOWN_JOIN_TIMEOUT_S + executor.KILL_JOIN_TIMEOUT_S + 2.0


def test_worker_dying_at_exit_after_a_complete_run():
    # The worker dies after it has sent every result: depending on which the main process
    # notices first, the run completes or reports the crash. Either way: no hang, no leak,
    # and never a partial result passed off as complete.
    stream = sp.from_iterable(range(50)).map(fakes.register_abnormal_exit)
    outputs, exc, _ = run_with_fault(stream, mp_options(), what="a run whose workers exit with code 5 at the end")
    if exc is None:
        assert outputs == list(range(50))
    else:
        assert type(exc) is sp.WorkerCrashedError
        assert "exit code 5" in str(exc)


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_big_messages_both_ways_do_not_deadlock(method):
    records = [fakes.big_record(i) for i in range(24)]
    stream = sp.from_iterable(records).map(fakes.double_big).set_processing(**mp_options(method, task_size=3))
    outputs = run_guarded(stream.to_list, MAX_FAILURE_S, "to_list of big records")
    assert len(outputs) == len(records)
    assert all(out == rec + rec for out, rec in zip(outputs, records))


def test_crash_with_big_messages_in_flight():
    records = [fakes.big_record(i) for i in range(40)]
    stream = sp.from_iterable(records).map(fakes.CrashOnBig(FAULT_AT))
    outputs, exc, _ = run_with_fault(stream, mp_options(task_size=3), what="a run that crashes with big messages in flight")
    assert exc is not None
    check_crash(exc, "os_exit", r"cpu worker \d")
    assert len(outputs) <= FAULT_AT


def test_early_break_with_big_messages_in_flight():
    # Workers are blocked sending big results nobody reads, feeders blocked sending big tasks.
    stream = sp.from_iterable(fakes.big_record(i) for i in range(200)).map(fakes.double_big)
    iterator = iter(stream.set_processing(**mp_options(task_size=2)))
    run_guarded(lambda: next(iterator), MAX_FAILURE_S, "the first big record")
    start = time.monotonic()
    run_guarded(iterator.close, MAX_FAILURE_S, "closing a run with big messages in flight")
    assert time.monotonic() - start < executor.SHUTDOWN_JOIN_TIMEOUT_S
