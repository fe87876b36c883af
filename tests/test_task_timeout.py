"""Stuck tasks: ``task_timeout`` (multiprocessing backend; the simple and threads backends refuse it).

A ``map`` fn blocks for ever on one record (an Event that never fires, ``signal.pause()``, or a
regex that backtracks for ever holding the GIL, which only the main process's backstop can
see). The run raises ``TaskTimeoutError`` naming the worker, its pid, the stage and the record,
with the worker's Python stack; with ``on_error`` the task is isolated and the stuck record
comes out as a ``RecordError`` (``error_type="TaskTimeoutError"``). Nothing here synchronises
with sleep: the hang is real and only the timeout ends it. Every run is under the hang guard.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

import streamproc as sp
from streamproc.backends.multiprocessing.watchdog import progress_signature
from tests import retry_fakes as fakes
from tests.hang_guard import run_guarded
from tests.test_task_retries import NUM_RECORDS, TASK_SIZE, mp, records_of, run_outputs
from tests.utils import collect_until_error

STUCK_AT = 13
#: Seconds without progress before the run gives up on a task. Small, so the tests are quick;
#: generous enough for a loaded 2-core machine (a record takes microseconds).
TIMEOUT_S = 1.5
RUN_TIMEOUT_S = 60.0


def hanging_stream(how: str = "event") -> sp.Stream:
    return sp.from_iterable(range(NUM_RECORDS)).map(fakes.HangAt(STUCK_AT, how))


def run_until_error(stream: sp.Stream, options: dict[str, Any], what: str) -> tuple[list[Any], BaseException]:
    outputs, exc = run_guarded(lambda: collect_until_error(stream.set_processing(**options)), RUN_TIMEOUT_S, what)
    assert exc is not None, f"no error; outputs {outputs}"
    return outputs, exc


@pytest.mark.parametrize("how", ["event", "pause"])
def test_a_stuck_task_raises_with_worker_stage_record_and_stack(how):
    outputs, exc = run_until_error(hanging_stream(how), mp(2, task_timeout=TIMEOUT_S), f"a map that hangs ({how})")
    assert type(exc) is sp.TaskTimeoutError, f"{type(exc).__name__}: {exc}"
    message = str(exc)
    assert re.search(r"task 2 made no progress for [\d.]+ s \(task_timeout=1.5\) in cpu worker \d \(pid \d+\)", message), message
    assert "in stage 1 (map(hang_at_13))" in message
    assert "items 10 to 14" in message  # where the task's records are (task 2 of 5-record tasks)
    # The worker's stack, from its entry point to the blocking call, not the parent's frames.
    stack = message.split("Python stack of the worker's task thread (most recent call last):\n", 1)[1]
    assert stack.lstrip().startswith('File "') and "in run_cpu_worker" in stack.splitlines()[0], stack
    assert ("threading.Event().wait()" if how == "event" else "signal.pause()") in stack
    assert outputs == list(range(len(outputs))) and len(outputs) <= STUCK_AT - STUCK_AT % TASK_SIZE


def test_the_backstop_kills_a_worker_that_holds_the_gil():
    _, exc = run_until_error(hanging_stream("gil"), mp(2, task_timeout=TIMEOUT_S), "a regex that never releases the GIL")
    assert type(exc) is sp.TaskTimeoutError, f"{type(exc).__name__}: {exc}"
    assert re.search(r"task 2 made no progress .* in cpu worker \d \(pid \d+\)", str(exc)), str(exc)
    assert "its watchdog thread did not run" in str(exc)


def test_under_spawn():
    _, exc = run_until_error(hanging_stream(), mp(2, "spawn", task_timeout=TIMEOUT_S), "a map that hangs, spawn")
    assert type(exc) is sp.TaskTimeoutError and "stage 1 (map(hang_at_13))" in str(exc), str(exc)


@pytest.mark.parametrize("how", ["event", "gil"])
def test_with_on_error_the_stuck_record_is_isolated_and_reported(how):
    options = mp(2, task_timeout=TIMEOUT_S, on_error="skip")
    outputs = run_outputs(hanging_stream(how), options, f"a stuck record isolated ({how})")
    assert records_of(outputs) == [x for x in range(NUM_RECORDS) if x != STUCK_AT]
    errors = [(output.task_index, output.last, error) for output in outputs for error in output.errors]
    assert len(errors) == 1, errors
    task_index, last, error = errors[0]
    assert (task_index, last, error.error_type, error.record) == (STUCK_AT // TASK_SIZE, True, "TaskTimeoutError", str(STUCK_AT))
    assert error.source == f"item {STUCK_AT}"  # the iterable source names the item
    assert f"record {STUCK_AT % TASK_SIZE} of the task" in error.message
    if how == "event":
        assert error.stage == "stage 1 (map(hang_at_13))" and "threading.Event().wait()" in error.traceback


def test_a_slow_task_that_progresses_does_not_time_out():
    # Each record takes a tenth of the timeout; the task (20 records) takes twice the timeout.
    stream = sp.from_iterable(range(40)).map(fakes.SlowIdentity(TIMEOUT_S / 10))
    options = {**mp(2, task_timeout=TIMEOUT_S), "task_size": 20}
    assert run_guarded(lambda: stream.set_processing(**options).to_list(), RUN_TIMEOUT_S, "slow") == list(range(40))


@pytest.mark.parametrize("backend", ["simple", "threads"])
def test_backends_without_worker_processes_refuse_task_timeout(backend):
    stream = sp.from_iterable(range(3)).set_processing(backend=backend, task_timeout=5)
    expected = r"task_timeout=5 needs a backend that runs tasks in worker processes \('multiprocessing'\)"
    with pytest.raises(ValueError, match=expected):
        stream.to_list()


def _record_fn(x: Any) -> Any:
    import sys

    return progress_signature(sys._getframe())


def test_progress_signature_changes_per_record_of_a_map():
    import streamproc.ops  # noqa: F401 (the frames below must be streamproc's own)

    signatures = sp.from_iterable(range(2)).map(_record_fn).set_processing(backend="simple").to_list()
    first, second = signatures
    assert first and second and first[0] is second[0]  # the same op loop...
    assert first[1] is not second[1]  # ...but a new user call per record
