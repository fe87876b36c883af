"""The Ray backend on one session cluster: equivalence, faults, no actor left behind, I/O on the actors.

Run by ``tox -e ray`` (marked ``ray``; skipped without Ray). The cluster is tests/ray_cluster.py's:
2 CPUs and 2 logical GPUs, so GPU worker actors run ``forward`` on "cpu".
"""

from __future__ import annotations

import gc
import os
from typing import Any

import pyarrow.parquet as pq
import pytest

import streamproc as sp
from streamproc.backends.ray.actor_pool import release_warm_actors, warm_actor_names
from streamproc.errors import RemoteTraceback
from tests.hang_guard import run_guarded
from tests.ray_cluster import (
    assert_no_actor_kept,
    streamproc_actors,
    wait_until_no_streamproc_actor,
    wait_until_only_warm_actors,
)
from tests.ray_fakes import kill_in_forward
from tests.retry_fakes import CrashAt, keep_records, plus_one_tensor, to_tensor
from tests.utils import UserError, assert_same_as_simple, double, fn_raises, is_odd

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_session")]
pytest.importorskip("ray")

#: Every run of these tests ends well within this (actor start-up is seconds on a loaded machine).
RUN_TIMEOUT_S = 120.0
RAY = {"backend": "ray", "num_cpu_workers": 2}


def run(fn: Any, what: str) -> Any:
    return run_guarded(fn, timeout_s=RUN_TIMEOUT_S, what=what)


@pytest.fixture(autouse=True)
def no_actor_left_behind() -> Any:
    """Every test ends with no streamproc actor alive on the cluster but the warm ones kept by a
    completed run (whatever its exit path; the fault tests check that none is kept)."""
    yield
    assert wait_until_only_warm_actors() == []


def numbers(n: int = 3000) -> sp.Stream:
    return sp.from_iterable(range(n)).set_processing(task_size=100)


# -- equivalence ---------------------------------------------------------------------------


@pytest.mark.parametrize("deterministic", [True, False])
def test_map_filter_map_batches_same_as_simple(deterministic: bool) -> None:
    stream = numbers().map(double).map(lambda x: x + 1).filter(is_odd).map_batches(lambda b: [sum(b)], batch_size=7)
    run(lambda: assert_same_as_simple(stream, **RAY, deterministic=deterministic), "map/filter/map_batches on Ray")


def test_parquet_row_groups_are_read_by_the_actors(tmp_path: Any) -> None:
    import pyarrow as pa

    for i in range(3):
        pq.write_table(pa.table({"id": list(range(i * 500, (i + 1) * 500))}), tmp_path / f"f{i}.parquet", row_group_size=100)
    stream = sp.read_parquet(str(tmp_path)).map(lambda r: {"id": r["id"], "pid": os.getpid()})
    out = run(lambda: stream.set_processing(**RAY).to_list(), "read_parquet on Ray")
    assert [r["id"] for r in out] == list(range(1500))
    assert os.getpid() not in {r["pid"] for r in out}  # decoded in the actors, not in the driver


def test_gpu_worker_actors_on_logical_gpus_same_as_simple() -> None:
    stream = numbers(600).map_gpu(to_tensor, plus_one_tensor, keep_records, batch_size=16)
    options = {**RAY, "num_gpu_workers": 2, "gpu_worker_devices": ["cpu"]}
    def run_with_stats() -> Any:
        with sp.collect_stats() as stats:  # collects the runs of its own thread
            assert_same_as_simple(stream, **options)
        return stats

    stats = run(run_with_stats, "map_gpu on Ray GPU actors")
    processes = stats.runs[-1].processes
    gpus = [p for name, p in processes.items() if name.startswith("gpu worker")]
    assert len(gpus) == 2 and all(p.batches > 0 for p in gpus), processes
    assert sum(p.batches for p in gpus) == 600 // 100 * 7  # 7 batches of <= 16 per 100-record task


def test_stats_have_one_entry_per_cpu_actor() -> None:
    def run_with_stats() -> Any:
        with sp.collect_stats() as stats:  # collects the runs of its own thread
            numbers().map(double).set_processing(**RAY).to_list()
        return stats

    run_stats = run(run_with_stats, "stats on Ray").runs[-1]
    cpus = {name: p for name, p in run_stats.processes.items() if p.kind == "cpu"}
    assert sorted(cpus) == ["cpu worker 0", "cpu worker 1"]
    assert sum(p.tasks for p in cpus.values()) == 30
    assert run_stats.tasks_done == 30 and run_stats.records_out == 3000


def test_limit_same_as_simple() -> None:
    stream = numbers().map(double).limit(250).map(lambda x: x + 1)
    run(lambda: assert_same_as_simple(stream, **RAY), "limit on Ray")


def test_a_completed_run_keeps_its_cpu_actors_warm_for_the_next_one() -> None:
    release_warm_actors()
    stream = numbers().map(lambda x: os.getpid())
    first = set(run(lambda: stream.set_processing(**RAY).to_list(), "a first run on Ray"))
    kept = warm_actor_names()
    assert len(kept) == 2 and wait_until_only_warm_actors() == [] and sorted(streamproc_actors()) == sorted(kept)
    second = set(run(lambda: stream.set_processing(**RAY).to_list(), "the same sizing again"))
    # The same actors served the second run (fresh ones would have new names and processes).
    # Which of the two ran tasks is timing: the first actor to start may run them all.
    assert warm_actor_names() == kept and len(first | second) <= 2
    # Another number of CPU workers: the warm set is killed, the new run's actors are kept instead.
    assert run(lambda: numbers().map(double).set_processing(backend="ray", num_cpu_workers=1).to_list(), "1 actor") == [
        2 * x for x in range(3000)
    ]
    assert len(warm_actor_names()) == 1 and not set(kept) & set(warm_actor_names())
    assert wait_until_only_warm_actors() == []
    assert release_warm_actors() == 1
    assert wait_until_no_streamproc_actor() == []


# -- faults ------------------------------------------------------------------------------------


def test_user_error_keeps_its_type_and_the_actor_traceback() -> None:
    stream = numbers().map(fn_raises(at=1234)).set_processing(**RAY)
    with pytest.raises(UserError) as info:
        run(stream.to_list, "user error on Ray")
    exc = info.value
    assert type(exc) is UserError
    assert isinstance(exc.__cause__, RemoteTraceback)
    assert "raise self.exc" in str(exc.__cause__) and "ray cpu worker" in str(exc.__cause__)
    notes = getattr(exc, "__notes__", [])
    assert any("task 12 reads items 1200 to 1299" in note for note in notes), notes
    assert_no_actor_kept()  # the run took the warm actors (if any) and killed them


def test_outputs_before_a_failed_task_come_out_first() -> None:
    outputs: list[Any] = []

    def consume() -> None:
        for record in numbers().map(fn_raises(at=1234)).set_processing(**RAY):
            outputs.append(record)

    with pytest.raises(UserError):
        run(consume, "outputs before an error on Ray")
    assert outputs == list(range(1200))
    assert_no_actor_kept()  # the run took the warm actors (if any) and killed them


def test_killed_actor_raises_worker_crashed_error_naming_actor_and_node(tmp_path: Any) -> None:
    stream = numbers().map(CrashAt("sigkill", at=1500, directory=str(tmp_path))).set_processing(**RAY)
    with pytest.raises(sp.WorkerCrashedError) as info:
        run(stream.to_list, "killed actor on Ray")
    message = str(info.value)
    assert "ray cpu worker" in message and "node " in message and "15" in message.split("holding task(s)")[1], message
    assert_no_actor_kept()  # the run took the warm actors (if any) and killed them


def test_killed_actor_task_is_rerun_with_max_task_retries(tmp_path: Any) -> None:
    # Not assert_same_as_simple: the simple backend would run the fault in this very process.
    stream = numbers().map(CrashAt("sigkill", at=1500, directory=str(tmp_path), times=1)).set_processing(**RAY)
    assert run(lambda: stream.set_processing(max_task_retries=1).to_list(), "retried task on Ray") == list(range(3000))
    assert os.path.exists(tmp_path / "fault-0")  # the fault did fire


def test_killed_gpu_actor_raises_worker_crashed_error_naming_it() -> None:
    stream = numbers(300).map_gpu(to_tensor, kill_in_forward, keep_records, batch_size=16)
    stream = stream.set_processing(**RAY, num_gpu_workers=1, gpu_worker_devices=["cpu"])
    with pytest.raises(sp.WorkerCrashedError, match=r"ray gpu worker 0 \(actor pid \d+, node "):
        run(stream.to_list, "killed GPU actor on Ray")


def test_early_break_kills_the_actors() -> None:
    def take_two() -> list[Any]:
        taken = []
        for record in numbers().map(double).set_processing(**RAY):
            taken.append(record)
            if len(taken) == 2:
                break
        return taken

    assert run(take_two, "early break on Ray") == [0, 2]
    assert_no_actor_kept()  # the run took the warm actors (if any) and killed them


def test_garbage_collected_iterator_kills_the_actors() -> None:
    def first_then_drop() -> Any:
        iterator = iter(numbers().map(double).set_processing(**RAY))
        first = next(iterator)
        del iterator
        gc.collect()
        return first

    assert run(first_then_drop, "GC on Ray") == 0
    assert_no_actor_kept()  # the run took the warm actors (if any) and killed them


def test_keyboard_interrupt_in_the_consumer_kills_the_actors() -> None:
    def interrupted() -> None:
        for _ in numbers().map(double).set_processing(**RAY):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(interrupted, "KeyboardInterrupt on Ray")
    assert_no_actor_kept()  # the run took the warm actors (if any) and killed them


def test_on_error_skip_same_as_other_backends() -> None:
    stream = numbers().map(fn_raises(at=77)).set_processing(on_error="skip")
    with pytest.warns(sp.RecordsSkippedWarning):
        out = run(lambda: stream.set_processing(**RAY).to_list(), "on_error=skip on Ray")
    assert out == [x for x in range(3000) if x != 77]


# -- parquet parts written by the actors -------------------------------------------------------


def parts(directory: Any) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.endswith(".parquet"))


def test_write_parquet_in_the_actors_has_the_part_layout(tmp_path: Any) -> None:
    stream = numbers().map(lambda x: {"x": x})
    expected_dir, actual_dir = tmp_path / "simple", tmp_path / "ray"
    stream.set_processing(backend="simple").write_parquet(str(expected_dir), rows_per_file=500)
    run(
        lambda: stream.set_processing(**RAY, deterministic=False).write_parquet(str(actual_dir), rows_per_file=500),
        "write_parquet in Ray actors",
    )
    assert parts(actual_dir) == parts(expected_dir) and len(parts(actual_dir)) == 6
    for name in parts(expected_dir):
        assert pq.read_table(actual_dir / name).equals(pq.read_table(expected_dir / name)), name


def test_resume_after_a_crash_completes_the_output(tmp_path: Any) -> None:
    out, expected_dir = tmp_path / "out", tmp_path / "simple"
    numbers().map(lambda x: {"x": x}).set_processing(backend="simple").write_parquet(str(expected_dir), rows_per_file=500)
    crashing = numbers().map(CrashAt("sigkill", at=2100, directory=str(tmp_path))).map(lambda x: {"x": x})
    with pytest.raises(sp.WorkerCrashedError):
        run(lambda: crashing.set_processing(**RAY, deterministic=False).write_parquet(str(out), rows_per_file=500, resume=True),
            "crashing write on Ray")
    committed = parts(out)
    assert len(committed) < 6  # the part of record 2100 is not there
    stream = numbers().map(lambda x: {"x": x})
    run(lambda: stream.set_processing(**RAY, deterministic=False).write_parquet(str(out), rows_per_file=500, resume=True),
        "resumed write on Ray")
    assert set(committed) <= set(parts(out)) and parts(out) == parts(expected_dir)
    for name in parts(expected_dir):
        assert pq.read_table(out / name).equals(pq.read_table(expected_dir / name)), name
