"""Surviving worker deaths: ``max_task_retries`` and isolating a poisonous record (multiprocessing).

A CPU worker ends itself (SIGKILL, a segfault, ``os._exit``) on one record a given number of
times (marker files count the times across processes); the run replaces it and reruns its
tasks, and the output must equal the simple backend's on the same stream without the fault.
Past the retries, ``WorkerCrashedError`` says how often the task was retried; with
``on_error`` other than "raise", the task is isolated and the record that kills its workers
comes out as a ``RecordError`` in the ``errors`` of the task's last ``TaskOutput``. Pure state
(dispatcher requeue, reorder reset, retry decisions) is tested without processes. Every run
is under the hang guard; the autouse fixture of conftest.py checks nothing is left behind.
"""

from __future__ import annotations

from typing import Any, Optional

import pytest

import streamproc as sp
from streamproc.backends.multiprocessing.messages import RecordStarted, TaskStuck, WorkerId
from streamproc.backends.multiprocessing.retries import TaskRetries
from streamproc.backends.registry import get_backend
from streamproc.execution.dispatch import TaskDispatcher
from streamproc.execution.reorder import ReorderBuffer
from streamproc.execution.task import Task, TaskOutput
from streamproc.io.sinks import ListSink
from streamproc.plan import build_plan
from tests import retry_fakes as fakes
from tests.hang_guard import run_guarded
from tests.utils import assert_outputs, identity

NUM_RECORDS, TASK_SIZE = 40, 5
#: The record where the faults fire: task 2 holds records 10-14 (10 is its first).
MID_TASK, TASK_START = 13, 10
RUN_TIMEOUT_S = 60.0
CRASH_FAULTS = ["sigkill", "segfault", "os_exit"]


def mp(num_workers: int = 2, method: str = "fork", **changes: Any) -> dict[str, Any]:
    options = {"backend": "multiprocessing", "num_cpu_workers": num_workers, "task_size": TASK_SIZE}
    return {**options, "process_start_method": method, **changes}


def crashing_stream(
    fault: str, at: int, directory: str, times: Optional[int], spread: bool = False
) -> tuple[sp.Stream, sp.Stream]:
    """The stream whose ``map`` kills its worker on record ``at``, and the same without the fault.

    ``spread``: each record becomes three (``flatten``), so a task's outputs span several
    chunks and some reach the main process before the worker dies mid-task.
    """
    base = sp.from_iterable(range(NUM_RECORDS))
    faulty, clean = base.map(fakes.CrashAt(fault, at, directory, times)), base.map(identity)
    if spread:
        faulty, clean = faulty.map(fakes.repeat_three).flatten(), clean.map(fakes.repeat_three).flatten()
    return faulty, clean


def run_to_list(stream: sp.Stream, options: dict[str, Any], what: str) -> list[Any]:
    return run_guarded(lambda: stream.set_processing(**options).to_list(), RUN_TIMEOUT_S, what)


def run_outputs(stream: sp.Stream, options: dict[str, Any], what: str) -> list[TaskOutput]:
    """The ``TaskOutput`` s the backend's ``RunHandle`` yields (their ``errors`` included)."""

    def collect() -> list[TaskOutput]:
        plan = build_plan(stream.set_processing(**options))
        with get_backend(plan.options.effective_backend).run(plan, ListSink()) as handle:
            return list(handle)

    return run_guarded(collect, RUN_TIMEOUT_S, what)


def records_of(outputs: list[TaskOutput]) -> list[Any]:
    return [record for output in outputs if output.chunk for record in output.chunk]


# -- the worker dies, the task reruns -----------------------------------------------------------


@pytest.mark.parametrize("num_workers", [1, 2])
@pytest.mark.parametrize(("at", "spread"), [(TASK_START, False), (MID_TASK, True)], ids=["task-boundary", "mid-task"])
@pytest.mark.parametrize("fault", CRASH_FAULTS)
def test_a_dead_worker_is_replaced_and_its_task_rerun(tmp_path, fault, at, spread, num_workers):
    faulty, clean = crashing_stream(fault, at, str(tmp_path), times=1, spread=spread)
    expected = clean.set_processing(backend="simple").to_list()
    actual = run_to_list(faulty, mp(num_workers, max_task_retries=1), f"{fault} at record {at}")
    assert actual == expected
    assert (tmp_path / "fault-0").exists()  # the fault did fire


def test_under_spawn(tmp_path):
    faulty, clean = crashing_stream("sigkill", MID_TASK, str(tmp_path), times=1, spread=True)
    expected = clean.set_processing(backend="simple").to_list()
    assert run_to_list(faulty, mp(2, "spawn", max_task_retries=1), "sigkill under spawn") == expected
    assert (tmp_path / "fault-0").exists()


def test_each_rerun_may_die_up_to_the_limit(tmp_path):
    faulty, clean = crashing_stream("segfault", MID_TASK, str(tmp_path), times=3)
    expected = clean.set_processing(backend="simple").to_list()
    assert run_to_list(faulty, mp(2, max_task_retries=3), "three deaths, three reruns") == expected


def test_deterministic_false_loses_and_duplicates_nothing(tmp_path):
    faulty, clean = crashing_stream("sigkill", MID_TASK, str(tmp_path), times=1, spread=True)
    expected = clean.set_processing(backend="simple").to_list()
    options = mp(2, max_task_retries=1, deterministic=False)
    assert_outputs(run_to_list(faulty, options, "sigkill, deterministic=False"), expected, options)


@pytest.mark.parametrize("fault", CRASH_FAULTS)
def test_past_the_retries_the_crash_is_raised_with_the_count(tmp_path, fault):
    faulty, _ = crashing_stream(fault, MID_TASK, str(tmp_path), times=None)
    with pytest.raises(sp.WorkerCrashedError, match=r"cpu worker \d \(pid \d+\).*task 2 was retried 2 time\(s\)"):
        run_to_list(faulty, mp(2, max_task_retries=2), "a task that always kills its worker")


@pytest.mark.parametrize("deterministic", [True, False])
def test_a_user_error_is_raised_not_retried(deterministic):
    from tests.utils import UserError, fn_raises

    stream = sp.from_iterable(range(NUM_RECORDS)).map(fn_raises(at=MID_TASK))
    with pytest.raises(UserError, match=f"raised at {MID_TASK}"):
        run_to_list(stream, mp(2, max_task_retries=2, deterministic=deterministic), "a user error with retries on")


def test_without_retries_a_crash_still_raises(tmp_path):
    faulty, _ = crashing_stream("sigkill", MID_TASK, str(tmp_path), times=1)
    with pytest.raises(sp.WorkerCrashedError, match=r"SIGKILL"):
        run_to_list(faulty, mp(2), "max_task_retries=0")


# -- with GPU workers: the GPU workers take the replacement as their peer ---------------------


@pytest.mark.parametrize("num_gpu_workers", [1, 2])
def test_with_gpu_workers(tmp_path, num_gpu_workers):
    pytest.importorskip("torch")
    base = sp.from_iterable(range(NUM_RECORDS))
    gpu = (fakes.to_tensor, fakes.plus_one_tensor, fakes.keep_records)
    faulty = base.map(fakes.CrashAt("sigkill", MID_TASK, str(tmp_path), times=2)).map_gpu(*gpu, batch_size=3)
    expected = base.map(identity).map_gpu(*gpu, batch_size=3).set_processing(backend="simple").to_list()
    options = mp(2, max_task_retries=2, num_gpu_workers=num_gpu_workers, gpu_worker_devices=["cpu"] * num_gpu_workers)
    assert run_to_list(faulty, options, f"a CPU worker dies twice beside {num_gpu_workers} GPU workers") == expected


def test_with_a_gpu_worker_under_spawn(tmp_path):
    pytest.importorskip("torch")
    base = sp.from_iterable(range(NUM_RECORDS))
    gpu = (fakes.to_tensor, fakes.plus_one_tensor, fakes.keep_records)
    faulty = base.map(fakes.CrashAt("os_exit", MID_TASK, str(tmp_path), times=1)).map_gpu(*gpu, batch_size=3)
    expected = base.map(identity).map_gpu(*gpu, batch_size=3).set_processing(backend="simple").to_list()
    options = mp(2, "spawn", max_task_retries=1, num_gpu_workers=1, gpu_worker_devices=["cpu"])
    assert run_to_list(faulty, options, "a CPU worker dies beside a GPU worker, spawn") == expected


def test_a_gpu_worker_death_is_not_retried(tmp_path):
    pytest.importorskip("torch")
    from tests.multiprocessing_fakes import FaultInGPUWorker

    forward = FaultInGPUWorker("segfault", gpu=0, at_batch=2)
    stream = sp.from_iterable(range(NUM_RECORDS)).map_gpu(fakes.to_tensor, forward, fakes.keep_records, batch_size=3)
    options = mp(2, max_task_retries=2, num_gpu_workers=1, gpu_worker_devices=["cpu"])
    with pytest.raises(sp.WorkerCrashedError, match=r"gpu worker 0 \(pid \d+\).*SIGSEGV"):
        run_to_list(stream, options, "a GPU worker dies with retries on")


# -- isolation: a poisonous record -------------------------------------------------------------


@pytest.mark.parametrize("fault", CRASH_FAULTS)
def test_a_poisonous_record_is_isolated_and_reported(tmp_path, fault):
    faulty, _ = crashing_stream(fault, MID_TASK, str(tmp_path), times=None)
    outputs = run_outputs(faulty, mp(2, max_task_retries=1, on_error="skip"), f"a record that always {fault}s its worker")
    assert records_of(outputs) == [x for x in range(NUM_RECORDS) if x != MID_TASK]
    errors = [(output.task_index, output.last, error) for output in outputs for error in output.errors]
    assert len(errors) == 1, errors
    task_index, last, error = errors[0]
    assert (task_index, last) == (MID_TASK // TASK_SIZE, True)
    assert error.error_type == "WorkerCrashedError"
    assert error.record == str(MID_TASK)
    assert error.task == MID_TASK // TASK_SIZE
    assert error.source == f"item {MID_TASK}"  # the iterable source names the item
    code = {"sigkill": "SIGKILL", "segfault": "SIGSEGV", "os_exit": "exit code 1"}[fault]
    assert code in error.message and "cpu worker" in error.message


def test_two_poisonous_records_of_one_task_and_the_outputs_between_them(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(), second.mkdir()
    stream = (
        sp.from_iterable(range(NUM_RECORDS))
        .map(fakes.CrashAt("segfault", 11, str(first), times=None))
        .map(fakes.CrashAt("sigkill", 13, str(second), times=None))
        .map(fakes.repeat_three)
        .flatten()
    )
    outputs = run_outputs(stream, mp(2, max_task_retries=1, on_error="dead_letter", dead_letter_path=str(tmp_path / "dl")), "two")
    assert records_of(outputs) == [x for x in range(NUM_RECORDS) if x not in (11, 13) for _ in range(3)]
    assert sorted(error.record for output in outputs for error in output.errors) == ["11", "13"]


def test_isolation_beside_a_gpu_worker(tmp_path):
    pytest.importorskip("torch")
    gpu = (fakes.to_tensor, fakes.plus_one_tensor, fakes.keep_records)
    stream = sp.from_iterable(range(NUM_RECORDS)).map(fakes.CrashAt("sigkill", MID_TASK, str(tmp_path), times=None))
    options = mp(2, max_task_retries=1, on_error="skip", num_gpu_workers=1, gpu_worker_devices=["cpu"])
    outputs = run_outputs(stream.map_gpu(*gpu, batch_size=3), options, "isolation with a GPU worker")
    assert records_of(outputs) == [x for x in range(NUM_RECORDS) if x != MID_TASK]
    assert [error.record for output in outputs for error in output.errors] == [str(MID_TASK)]


def test_max_task_retries_has_no_effect_in_process_backends():
    stream = sp.from_iterable(range(NUM_RECORDS)).map(identity)
    for backend in ("simple", "threads"):
        assert stream.set_processing(backend=backend, max_task_retries=3).to_list() == list(range(NUM_RECORDS))


# -- pure state: no process ---------------------------------------------------------------------


def test_dispatcher_requeues_to_the_same_worker_first_and_holds_until_finished():
    dispatcher = TaskDispatcher(iter(enumerate("abc")), num_workers=2, max_in_flight=2, window=None, hold_until_finished=True)
    first, second = dispatcher.next_task(0), dispatcher.next_task(1)
    assert (first.index, second.index) == (0, 1)
    dispatcher.requeue(0, [first])
    assert dispatcher.next_task(0) == first  # before the source's next task
    assert dispatcher.next_task(0).index == 2
    dispatcher.task_finished(0), dispatcher.task_finished(0), dispatcher.task_finished(1)
    assert dispatcher.next_task(1) is None  # everything finished: now it may stop


def test_reorder_holds_a_task_until_its_last_chunk_and_resets_it():
    for deterministic in (True, False):
        buffer = ReorderBuffer(deterministic, hold_tasks=True)
        buffer.add(TaskOutput(0, ["a"], 1, last=False))
        assert list(buffer.pop_ready()) == []
        buffer.reset_task(0)
        buffer.add(TaskOutput(0, ["a2"], 1, last=False))
        buffer.add(TaskOutput(0, ["b2"], 1, last=True))
        assert [output.chunk for output in buffer.pop_ready()] == [["a2"], ["b2"]]
        assert buffer.tasks_done == 1


def test_retry_decisions():
    retries = TaskRetries(1, isolate=True, task_timeout=None, locate=lambda payload, row: f"at {row}")
    task = Task(3, payload=[0, 1, 2])
    crash = sp.WorkerCrashedError("cpu worker 0 (pid 1) died: SIGKILL")
    assert retries.after_death(task, crash, None) is True  # rerun 1 of 1
    assert retries.after_death(task, crash, None) is True  # isolated now
    assert b"IsolatedTask" in retries.encode(task)
    retries.record_started(RecordStarted(0, 3, 1, "1"))
    assert retries.after_death(task, crash, None) is False  # continues after record 1
    last = retries.on_output(TaskOutput(3, None, 0, last=True))
    assert [(e.source, e.error_type, e.record) for e in last.errors] == [("at 1", "WorkerCrashedError", "1")]
    no_isolation = TaskRetries(0, isolate=False, task_timeout=2.0, locate=lambda payload, row: "here")
    stuck = TaskStuck(0, 3, WorkerId("cpu", 0), 1, "stage 1 (map(f))", None, 2.5, "  File x")
    with pytest.raises(sp.TaskTimeoutError, match=r"cpu worker 0 \(pid 1\), in stage 1 \(map\(f\)\)"):
        no_isolation.after_death(task, crash, stuck)
