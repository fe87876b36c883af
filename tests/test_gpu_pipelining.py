"""No drain between tasks: a CPU worker prepares its next task while the last batches of the
one before are in ``forward`` (issue 10, item 4; see streamproc/backends/multiprocessing/task_overlap.py).

GPU workers run on the CPU (``gpu_worker_devices=["cpu"]``). Overlap is proven without a
sleep: the forward of task 1's last batch waits until task 2's ``prepare_batch`` has run
(a file it creates), which can only happen if task 2 starts before task 1 has its last
answer; with a drain, that forward would wait forever (it gives up after
``OVERLAP_WAIT_S`` and the run fails, well inside the hang guard's deadline). Every run is
compared with the simple backend, runs under the hang guard, and the autouse fixture of
``tests/conftest.py`` fails a test that leaves a process or a ``streamproc-*`` thread behind.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

import streamproc as sp
from streamproc.backends.multiprocessing.tensor_transport import SHM_DIR, segment_owner_prefix
from tests.hang_guard import run_guarded
from tests.test_gpu_workers import gpu_workers as gpu_workers_on_cpu
from tests.utils import UserError, assert_same_as_simple

torch = pytest.importorskip("torch")

RUN_TIMEOUT_S = 120.0
#: How long the stand-in forward waits for the next task's prepare before it gives up.
OVERLAP_WAIT_S = 30.0
#: How often it looks (a condition polled with a deadline, not a sleep that synchronises).
OVERLAP_POLL_S = 0.005
TASK_SIZE = 8
BATCH_SIZE = 3


def gpu_workers(cpu: int, gpu: int, **options: Any) -> dict[str, Any]:
    """``set_processing`` kwargs: tests/test_gpu_workers.py's, with tasks of ``TASK_SIZE`` records."""
    return gpu_workers_on_cpu(cpu, gpu, task_size=TASK_SIZE, **options)


def prepare(batch: list[int]) -> Any:
    return torch.tensor(batch, dtype=torch.int64)


def double(x: Any) -> Any:
    return x * 2


def no_segments_left() -> bool:
    prefix = segment_owner_prefix(os.getpid())
    return not os.path.isdir(SHM_DIR) or not [n for n in os.listdir(SHM_DIR) if n.startswith(prefix)]


def same(x: Any) -> Any:
    return x


def as_ints(records: list[int], outputs: Any) -> list[int]:
    return [int(v) for v in outputs]


LAST_OF_TASK_1, FIRST_OF_TASK_2 = 2 * TASK_SIZE - 1, 2 * TASK_SIZE


def signalling_prepare(signal: Path) -> Any:
    """A ``prepare_batch`` that creates ``signal`` when it prepares task 2's first record."""
    path = str(signal)

    def prepare_and_signal(batch: list[int]) -> Any:
        if FIRST_OF_TASK_2 in batch:
            Path(path).touch()
        return torch.tensor(batch, dtype=torch.int64)

    return prepare_and_signal


def waiting_forward(signal: Path, fail_after_wait: bool = False) -> Any:
    """A doubling ``forward`` that, on task 1's last batch, waits for ``signal`` (then raises if asked)."""
    path = str(signal)

    def forward(x: Any) -> Any:
        if LAST_OF_TASK_1 in x.tolist():
            deadline = time.monotonic() + OVERLAP_WAIT_S
            while not os.path.exists(path):
                if time.monotonic() > deadline:
                    raise TimeoutError("task 2 was not prepared while task 1's last batch was in forward: a drain")
                time.sleep(OVERLAP_POLL_S)
            if fail_after_wait:
                raise UserError("forward failed on task 1's last batch")
        return x * 2

    return forward


def overlap_stream(n: int, signal: Path, fail_after_wait: bool = False) -> sp.Stream:
    """``n`` ints; task 1's last batch's forward waits for task 2's first prepare (see the module docstring)."""
    return sp.from_iterable(range(n)).map_gpu(
        signalling_prepare(signal), waiting_forward(signal, fail_after_wait), batch_size=BATCH_SIZE
    )


@pytest.mark.parametrize("cpu,gpu", [(1, 1), (1, 2), (2, 1), (2, 2)])
def test_many_small_tasks_give_the_simple_backends_outputs(cpu: int, gpu: int) -> None:
    stream = sp.from_iterable(range(203)).map_gpu(prepare, double, batch_size=BATCH_SIZE)
    outputs = run_guarded(lambda: assert_same_as_simple(stream, **gpu_workers(cpu, gpu)), RUN_TIMEOUT_S, "many small tasks")
    assert outputs == [2 * i for i in range(203)]


@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_every_start_method(method: str) -> None:
    stream = sp.from_iterable(range(61)).map_gpu(prepare, double, batch_size=BATCH_SIZE)
    options = gpu_workers(1, 1, process_start_method=method)
    outputs = run_guarded(lambda: assert_same_as_simple(stream, **options), RUN_TIMEOUT_S, f"a run under {method}")
    assert outputs == [2 * i for i in range(61)]


@pytest.mark.parametrize("gpu", [1, 2])
def test_next_task_is_prepared_while_the_last_batches_are_in_forward(tmp_path: Path, gpu: int) -> None:
    stream = overlap_stream(5 * TASK_SIZE + 3, tmp_path / "task-2-prepared")
    outputs = run_guarded(lambda: stream.set_processing(**gpu_workers(1, gpu)).to_list(), RUN_TIMEOUT_S, "overlap")
    assert outputs == [2 * i for i in range(5 * TASK_SIZE + 3)]


def test_a_two_stage_plan_overlaps_at_its_last_stage(tmp_path: Path) -> None:
    """The next task starts at the last ``map_gpu`` stage's drain: its first stage's prepare
    (which needs no GPU answer) runs while the last stage's forward of task 1 waits."""
    signal = tmp_path / "task-2-prepared"
    stream = (
        sp.from_iterable(range(4 * TASK_SIZE))
        .map_gpu(signalling_prepare(signal), same, as_ints, batch_size=2)
        .map_gpu(prepare, waiting_forward(signal), batch_size=BATCH_SIZE)
    )
    outputs = run_guarded(lambda: stream.set_processing(**gpu_workers(1, 1)).to_list(), RUN_TIMEOUT_S, "two stages")
    assert outputs == [2 * i for i in range(4 * TASK_SIZE)]


def test_an_error_in_forward_belongs_to_its_task_while_the_next_is_prepared(tmp_path: Path) -> None:
    signal = tmp_path / "task-2-prepared"
    stream = overlap_stream(5 * TASK_SIZE, signal, fail_after_wait=True).set_processing(**gpu_workers(1, 1))
    seen: list[int] = []

    def run() -> None:
        for value in stream:
            seen.append(value)

    with pytest.raises(UserError, match="task 1's last batch") as info:
        run_guarded(run, RUN_TIMEOUT_S, "an error in task 1")
    assert signal.exists()  # task 2 was prepared before task 1 failed: they overlapped
    assert seen == [2 * i for i in range(TASK_SIZE)]  # task 0 only: nothing of task 2 came before
    notes = getattr(info.value, "__notes__", [])
    assert any(note.startswith("streamproc: task 1 reads") for note in notes), notes
    assert no_segments_left()


def test_early_break_mid_pipeline_stops_every_worker(tmp_path: Path) -> None:
    stream = sp.from_iterable(range(400)).map_gpu(prepare, double, batch_size=BATCH_SIZE).set_processing(**gpu_workers(2, 2))

    def take_some() -> list[int]:
        got: list[int] = []
        iterator = iter(stream)
        for value in iterator:
            got.append(value)
            if len(got) == 3 * TASK_SIZE + 1:  # inside task 3, with tasks 4 and 5 in flight
                break
        iterator.close()  # type: ignore[attr-defined]
        return got

    got = run_guarded(take_some, RUN_TIMEOUT_S, "an early break")
    assert got == [2 * i for i in range(3 * TASK_SIZE + 1)]
    assert no_segments_left()


def test_large_tensors_travel_through_shared_memory_and_leave_nothing() -> None:
    """Batches and outputs above the crossover (4 MiB each) go through /dev/shm, both ways."""

    def big(batch: list[int]) -> Any:
        return {"x": torch.arange(len(batch) * 2**19, dtype=torch.int64).reshape(len(batch), -1) + batch[0]}

    def forward(inputs: Any) -> Any:
        return {"y": inputs["x"] * 2, "view": inputs["x"][:, ::2]}  # a strided view comes back too

    def postprocess(records: list[int], outputs: Any) -> list[tuple[int, int, tuple[int, ...]]]:
        y, view = outputs["y"], outputs["view"]
        return [(int(y[i].sum()), int(view[i].sum()), tuple(view.stride())) for i in range(len(records))]

    stream = sp.from_iterable(range(20)).map_gpu(big, forward, postprocess, batch_size=4)
    outputs = run_guarded(lambda: assert_same_as_simple(stream, **gpu_workers(2, 1)), RUN_TIMEOUT_S, "large tensors")
    assert len(outputs) == 20
    assert no_segments_left()


@pytest.mark.parametrize("options", [{"on_error": "skip"}, {"task_timeout": 60.0}, {"max_task_retries": 1}])
def test_runs_that_do_not_overlap_still_match_the_simple_backend(options: dict[str, Any]) -> None:
    stream = sp.from_iterable(range(50)).map_gpu(prepare, double, batch_size=BATCH_SIZE)
    outputs = run_guarded(lambda: assert_same_as_simple(stream, **gpu_workers(1, 1, **options)), RUN_TIMEOUT_S, "no overlap")
    assert outputs == [2 * i for i in range(50)]


def test_stats_and_progress_counts_are_exact_when_tasks_overlap(tmp_path: Path) -> None:
    """Overlapped tasks time themselves (TaskTurn.ahead): counts add up as without overlap."""
    n = 6 * TASK_SIZE + 5
    stream = overlap_stream(n, tmp_path / "task-2-prepared").set_processing(**gpu_workers(1, 1))

    def run() -> tuple[list[int], Any]:
        with sp.collect_stats() as collected:
            out = stream.to_list()
        (stats,) = collected.runs
        return out, stats

    out, stats = run_guarded(run, RUN_TIMEOUT_S, "stats under overlap")
    assert out == [2 * i for i in range(n)]
    assert stats.tasks_done == 7 and stats.records_out == n
    rows = [(s.index, s.records_in, s.records_out, s.batches) for s in stats.stage_rows() if s.index >= 0]
    batches = 6 * -(-TASK_SIZE // BATCH_SIZE) + -(-5 // BATCH_SIZE)
    assert rows == [(0, n, n, 7), (1, n, n, batches)]
    assert sum(p.tasks for p in stats.processes.values()) == 7
