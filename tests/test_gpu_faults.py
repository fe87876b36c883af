"""Faults at the boundaries of GPU workers (on the CPU), with 1 and with 2 GPU workers.

The GPU-worker half of the fault table (the CPU-worker half is in
tests/test_multiprocessing_faults.py; both share tests/fault_cases.py). Boundaries: ``forward``
in a GPU worker, the GPU worker's start-up (unpickling the model), pickling the outputs of
``forward`` to send them back, and ``prepare_batch``/``postprocess``, which run in the CPU
workers beside GPU workers. Every run has 2 CPU workers and ``gpu_worker_devices=["cpu"]``
(1 GPU worker) or ``["cpu", "cpu"]`` (2); a fault in a GPU worker fires in the first one or in
the second one only (``multiprocessing.current_process().name == "streamproc-gpu-1"``), on the
second batch that worker computes.

Faults: the CPU-worker ones and ``os._exit(0)``: a GPU worker that ends before the run is done
is a crash whatever its exit status. Expected: a user exception keeps its type, with the
worker's traceback as ``__cause__``; every other fault gives ``WorkerCrashedError`` naming the
worker ("gpu worker 1" for the second) and its exit code or signal; never a hang (the hang
guard fails the test with "deadlock"), never an orphan (the autouse leak check).
"""

from __future__ import annotations

import re
from typing import Any, Optional

import pytest

import streamproc as sp
from tests import multiprocessing_fakes as fakes
from tests.fault_cases import (
    FAULT_AT,
    FAULT_TASK,
    MAX_FAILURE_S,
    MAX_KILL_NOTICED_S,
    TASK_SIZE,
    check_crash,
    check_prefix_of_whole_tasks,
    check_user_error,
    mp_options,
    run_with_fault,
    table_cases,
)

pytest.importorskip("torch")

GPU_FAULTS = ["raise", "sys_exit", "os_exit", "os_exit0", "segfault", "sigkill"]
BATCH_SIZE = 3
#: More tasks (20) than the reorder window holds (REORDER_WINDOW_TASKS_PER_WORKER x 2 = 8): a
#: worker that stops answering holds the run up, as in a real run, instead of the others
#: finishing every task first (which ends the healthy GPU worker, and hides a hang).
GPU_NUM_RECORDS = 100
#: A fault in a GPU worker fires on the second batch it computes: one answer came back before.
FAULT_AT_BATCH = 2

#: Where a fault runs: a name, the number of GPU workers, the GPU worker that faults.
#: Boundaries in a GPU worker run in each of these; those in CPU workers in 1 and 2 GPU
#: workers (no GPU worker to pick: None).
IN_GPU_WORKER: list[tuple[str, int, Optional[int]]] = [("1gpu", 1, 0), ("2gpu-on-0", 2, 0), ("2gpu-on-1", 2, 1)]
IN_CPU_WORKER: list[tuple[str, int, Optional[int]]] = [("1gpu", 1, None), ("2gpu", 2, None)]
GPU_WORKER_BOUNDARIES = ["forward", "gpu_startup", "forward_output_pickling"]
CPU_WORKER_BOUNDARIES = ["prepare_batch", "postprocess"]
#: (boundary, where, number of GPU workers, faulting GPU worker or None)
CASES = [(b, *where) for b in GPU_WORKER_BOUNDARIES for where in IN_GPU_WORKER]
CASES += [(b, *where) for b in CPU_WORKER_BOUNDARIES for where in IN_CPU_WORKER]


def gpu_options(method: str, num_gpu_workers: int) -> dict[str, Any]:
    """The tables' options (2 CPU workers) with ``num_gpu_workers`` GPU workers on the CPU."""
    return mp_options(method, num_gpu_workers=num_gpu_workers, gpu_worker_devices=["cpu"] * num_gpu_workers)


def build_gpu_boundary(boundary: str, fault: str, gpu: Optional[int], started_path: str) -> sp.Stream:
    """A ``map_gpu`` stream over ``range(GPU_NUM_RECORDS)`` whose ``boundary`` performs ``fault``
    (in GPU worker ``gpu`` for the boundaries in GPU workers)."""
    base = sp.from_iterable(range(GPU_NUM_RECORDS))
    prepare: Any = fakes.to_tensor
    forward: Any = fakes.plus_one
    postprocess: Any = fakes.keep_records
    if boundary == "forward":
        assert gpu is not None
        forward = fakes.FaultInGPUWorker(fault, gpu, FAULT_AT_BATCH, started_path)
    elif boundary == "gpu_startup":
        assert gpu is not None
        forward = fakes.FaultAtGPUStartup(fault, gpu, started_path)
    elif boundary == "forward_output_pickling":
        assert gpu is not None
        forward = fakes.OutputsFaultAtPickle(fault, gpu, FAULT_AT_BATCH, started_path)
    elif boundary == "prepare_batch":
        prepare = fakes.FaultAt(fault, FAULT_AT, "prepare_batch", fakes.to_tensor, started_path)
    elif boundary == "postprocess":
        postprocess = fakes.FaultAt(fault, FAULT_AT, "postprocess", fakes.keep_records, started_path)
    else:
        raise ValueError(boundary)
    return base.map_gpu(prepare, forward, postprocess, batch_size=BATCH_SIZE)


def check_gpu_fault(boundary: str, fault: str, gpu: Optional[int], outputs: list[Any], exc: Optional[BaseException]) -> None:
    """What the sink must raise for ``fault`` at ``boundary`` (see the module docstring)."""
    assert exc is not None, f"no error; outputs: {outputs}"
    worker = r"cpu worker \d" if gpu is None else f"gpu worker {gpu}"
    if gpu is None:
        check_prefix_of_whole_tasks(outputs, before=FAULT_TASK * TASK_SIZE)
    else:
        # Which task holds the batch that faults depends on the schedule and on timing.
        check_prefix_of_whole_tasks(outputs, before=GPU_NUM_RECORDS - TASK_SIZE)
    if fault != "raise":
        check_crash(exc, fault, worker)
    elif boundary == "forward_output_pickling":
        # The outputs cannot be pickled: the GPU worker sends the pickling error instead.
        assert type(exc) is sp.SerializationError, f"{type(exc).__name__}: {exc}"
        assert re.search(rf"outputs of forward cannot be pickled.*\b{worker}\b", str(exc)), str(exc)
    else:
        notes = check_user_error(exc, fakes.RAISE_LINE)
        assert re.search(rf"\b{worker}\b", notes), notes
        if boundary == "gpu_startup":
            assert f"gpu worker {gpu} (cpu), at start-up" in notes, notes
        else:
            assert "raised in stage 1" in notes, notes
        if boundary == "forward":
            assert f"Traceback in gpu worker {gpu}" in str(exc.__cause__)
        if gpu is None:
            assert f"task {FAULT_TASK}" in notes and boundary in notes, notes


def _table_params() -> list[Any]:
    return [
        pytest.param(method, *case, fault, id=f"{method}-{case[0]}-{case[1]}-{fault}")
        for method, case, fault in table_cases(CASES, GPU_FAULTS, boundary_of=lambda case: case[0])
    ]


@pytest.mark.parametrize(("method", "boundary", "where", "num_gpu_workers", "gpu", "fault"), _table_params())
def test_fault_at_gpu_worker_boundary(tmp_path, method, boundary, where, num_gpu_workers, gpu, fault):
    started_path = tmp_path / "started"
    stream = build_gpu_boundary(boundary, fault, gpu, str(started_path))
    what = f"a run with {fault} at {boundary} ({where}) under {method}"
    outputs, exc, seconds = run_with_fault(stream, gpu_options(method, num_gpu_workers), fault, started_path, what)
    check_gpu_fault(boundary, fault, gpu, outputs, exc)
    assert seconds < (MAX_KILL_NOTICED_S if fault == "sigkill" else MAX_FAILURE_S)


@pytest.mark.parametrize("gpu", [1, 0], ids=["second", "first"])
def test_os_exit_0_in_forward_of_one_of_two_gpu_workers_is_a_crash(gpu):
    # The reproduction of the hang: 2 CPU workers, 2 GPU workers, fork; forward calls
    # os._exit(0) in one GPU worker only. A GPU worker that ends before the run is done is a
    # crash, whatever its exit status; the main process must not take it for a normal end.
    forward = fakes.FaultInGPUWorker("os_exit0", gpu, FAULT_AT_BATCH)
    stream = sp.from_iterable(range(GPU_NUM_RECORDS)).map_gpu(fakes.to_tensor, forward, fakes.keep_records, batch_size=BATCH_SIZE)
    what = f"a run whose forward calls os._exit(0) in gpu worker {gpu} of 2"
    outputs, exc, _ = run_with_fault(stream, gpu_options("fork", 2), what=what)
    check_gpu_fault("forward", "os_exit0", gpu, outputs, exc)
