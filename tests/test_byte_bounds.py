"""Memory bounded in bytes (issue 10, item 2): tasks cut by record size, windows bounded in bytes.

* Pure parts, without processes: :func:`estimate_bytes`, :func:`fill_task` (tasks of an
  iterable cut by bytes as well as by ``task_size``; tiny records keep ``task_size``), the
  dispatcher's byte bounds under a random schedule, the reorder buffer's byte count, and the
  finer default task size of a small known-length input.
* End to end (hang guard; every backend compared with the simple one): 1 MiB records complete
  with the counted in-flight bytes within the budget plus one task per worker; the tasks cut by bytes are
  the same for every backend and worker count; a resumed write over byte-cut tasks gives the
  uninterrupted run's directory.

See NOTE [ streamproc byte bounds ] in :mod:`streamproc.execution.byte_budget`.
"""

from __future__ import annotations

import itertools
import random
from typing import Any, ClassVar

import pytest

import streamproc as sp
import streamproc.backends.multiprocessing.run as mp_run
import streamproc.backends.threads as threads_backend
from streamproc.execution import byte_budget
from streamproc.execution.byte_budget import (
    OBJECT_BYTES,
    TASK_TARGET_BYTES,
    ByteBudget,
    default_byte_budget,
    estimate_bytes,
    fill_task,
)
from streamproc.execution.dispatch import TaskDispatcher
from streamproc.execution.granularity import MIN_TASK_RECORDS, finer_task_size
from streamproc.execution.reorder import ReorderBuffer
from streamproc.execution.task import TaskOutput
from streamproc.io.memory import ItemsTask, IterableSource
from streamproc.plan import build_plan
from tests.hang_guard import run_guarded
from tests.parquet_dirs import FailsWhileFileExists, snapshot
from tests.utils import assert_same_as_simple, effective_backend

GUARD_S = 120
MIB = 1024 * 1024
#: 48 records of 1 MiB: 48 tasks of 1 record (TASK_TARGET_BYTES = 1 MiB), 1 task by count.
BIG_RECORDS = 48


def big_record(i: int) -> dict[str, Any]:
    return {"id": i, "blob": bytes([i % 251]) * MIB}


def blob_summary(record: dict[str, Any]) -> dict[str, Any]:
    """A map run in the workers: what the record held, and which task it was in."""
    return {"id": record["id"], "first": record["blob"][0], "size": len(record["blob"]), "task": sp.get_worker_info().task_key}


def same_blob(record: dict[str, Any]) -> dict[str, Any]:
    return {"id": record["id"], "blob": record["blob"]}


def task_sizes(source: IterableSource, task_size: int) -> list[int]:
    return [len(task.items) for task in source.iter_tasks(task_size)]


# --- estimates and cutting (pure) -------------------------------------------------------------


def test_estimate_counts_buffers_and_containers():
    assert estimate_bytes(b"x" * MIB) == MIB + OBJECT_BYTES
    assert estimate_bytes("é" * 10) == 10 + OBJECT_BYTES
    assert estimate_bytes(7) == estimate_bytes(None) == OBJECT_BYTES
    # A big container is sampled and scaled: 1,000 equal items count 1,000 times one.
    assert estimate_bytes([b"ab"] * 1000) == OBJECT_BYTES + 1000 * estimate_bytes(b"ab")
    assert estimate_bytes({"a": b"x" * 100}) == OBJECT_BYTES + estimate_bytes("a") + estimate_bytes(b"x" * 100)


def test_estimate_reads_nbytes_of_arrays_without_converting():
    np = pytest.importorskip("numpy")
    assert estimate_bytes(np.zeros(1000, dtype="float64")) == 8000 + OBJECT_BYTES
    pa = pytest.importorskip("pyarrow")
    table = pa.table({"x": list(range(1000))})
    assert estimate_bytes(table) == table.nbytes + OBJECT_BYTES


def test_estimate_of_a_cycle_or_deep_nesting_ends():
    cycle: list[Any] = []
    cycle.append(cycle)
    assert estimate_bytes(cycle) > 0
    deep: Any = b"x"
    for _ in range(1000):
        deep = [deep]
    assert estimate_bytes(deep) > 0


def test_big_records_make_tasks_of_a_few_records():
    source = IterableSource([big_record(i) for i in range(BIG_RECORDS)])
    sizes = task_sizes(source, 1024)
    per_task = TASK_TARGET_BYTES // estimate_bytes(big_record(0)) + 1
    assert sum(sizes) == BIG_RECORDS
    assert all(size <= per_task for size in sizes)
    assert sizes[:-1] == [sizes[0]] * (len(sizes) - 1)  # equal records: equal tasks
    tasks = list(source.iter_tasks(1024))
    assert [task.start for task in tasks] == list(itertools.accumulate([0, *sizes[:-1]]))
    assert all(source.task_bytes(task) == len(task.items) * estimate_bytes(big_record(0)) for task in tasks)


def test_tiny_records_keep_the_task_size_layout():
    records = list(range(10_000))
    assert task_sizes(IterableSource(records), 1024) == [1024] * 9 + [784]
    assert task_sizes(IterableSource(iter(records)), 100) == [100] * 100
    strings = [f"record {i}" for i in range(3000)]
    assert task_sizes(IterableSource(strings), 1000) == [1000] * 3


def test_the_cut_depends_on_the_records_only():
    rng = random.Random(0)
    records = [b"x" * rng.choice([10, 1000, 300_000, 2 * MIB]) for _ in range(300)]
    first = [(t.start, len(t.items)) for t in IterableSource(records).iter_tasks(64)]
    again = [(t.start, len(t.items)) for t in IterableSource(iter(list(records))).iter_tasks(64)]
    assert first == again
    assert sum(n for _, n in first) == 300 and all(1 <= n <= 64 for _, n in first)


def test_a_record_larger_than_the_target_is_a_task_of_its_own():
    records = [b"x" * (3 * TASK_TARGET_BYTES)] * 3
    assert task_sizes(IterableSource(records), 1024) == [1, 1, 1]


def test_big_records_still_make_full_batches(backend_options):
    # Batches never span tasks: a task cut by bytes keeps the plan's largest batch (8 records).
    records = [big_record(i) for i in range(20)]
    stream = sp.from_iterable(records).map_batches(batch_sizes, batch_size=8)
    out = run_guarded(lambda: assert_same_as_simple(stream, **backend_options), GUARD_S, "full batches vs simple")
    assert [r["batch"] for r in out] == [8] * 16 + [4] * 4
    assert [r["id"] for r in out] == list(range(20))


def batch_sizes(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"id": r["id"], "batch": len(batch)} for r in batch]


def test_fill_task_keeps_what_it_pulled_when_the_source_raises():
    def failing():
        yield from (b"x" * 10 for _ in range(5))
        raise OSError("disk gone")

    records: list[Any] = []
    with pytest.raises(OSError, match="disk gone"):
        fill_task(failing(), records, task_size=100)
    assert len(records) == 5


def test_default_budget_is_a_capped_fraction_of_available_memory():
    assert default_byte_budget(available_bytes=10**15).in_flight_bytes == byte_budget.MAX_BUDGET_BYTES // 2
    assert default_byte_budget(available_bytes=10**6).reorder_bytes == byte_budget.MIN_BUDGET_BYTES // 2
    assert default_byte_budget().in_flight_bytes > 0
    with pytest.raises(ValueError, match="in_flight_bytes must be a positive int"):
        ByteBudget(in_flight_bytes=0, reorder_bytes=1)


# --- the dispatcher's and the reorder buffer's byte bounds (pure) ----------------------------


def test_dispatcher_bounds_the_bytes_in_flight_under_a_random_schedule():
    rng = random.Random(1)
    sizes = [rng.choice([1, 10, 100, 1000]) for _ in range(400)]
    budget = ByteBudget(in_flight_bytes=1500, reorder_bytes=10**9)
    workers, max_in_flight = 3, 4
    dispatcher = TaskDispatcher(
        enumerate(iter(sizes)), workers, max_in_flight, None, byte_budget=budget, task_bytes=lambda size: size
    )
    held: list[list[int]] = [[] for _ in range(workers)]
    handed = 0
    while handed < len(sizes) or any(held):
        worker = rng.randrange(workers)
        # next_task only when it would not wait (the test's thread is every worker at once).
        if handed < len(sizes) and dispatcher._may_read(worker) and rng.random() < 0.7:
            task = dispatcher.next_task(worker)
            assert task is not None
            held[worker].append(task.index)
            handed += 1
        elif held[worker]:
            dispatcher.task_finished(worker, held[worker].pop(0))
        else:
            continue
        assert dispatcher.in_flight_bytes == sum(sizes[i] for tasks in held for i in tasks)
        assert dispatcher.in_flight_bytes <= budget.in_flight_bytes + workers * max(sizes)
    assert dispatcher.peak_in_flight_bytes <= budget.in_flight_bytes + workers * max(sizes)
    assert dispatcher.peak_in_flight_bytes > budget.in_flight_bytes // 2  # the bound was reached


def test_a_worker_with_nothing_in_flight_always_gets_a_task():
    # Each task alone is over the budget: every worker still gets one (no deadlock).
    budget = ByteBudget(in_flight_bytes=10, reorder_bytes=10)
    dispatcher = TaskDispatcher(enumerate(iter([100] * 4)), 2, 2, None, byte_budget=budget, task_bytes=lambda size: size)
    first, second = dispatcher.next_task(0), dispatcher.next_task(1)
    assert first is not None and second is not None
    assert dispatcher.in_flight_bytes == 200
    dispatcher.task_finished(0, first.index)
    assert dispatcher.next_task(0) is not None


def test_reorder_bytes_hold_back_tasks_past_the_released_one():
    budget = ByteBudget(in_flight_bytes=10**9, reorder_bytes=50)
    dispatcher = TaskDispatcher(enumerate(iter(range(10))), 2, 10, window=100, byte_budget=budget, task_bytes=lambda _: 1)
    assert [dispatcher.next_task(w).index for w in (0, 1)] == [0, 1]  # type: ignore[union-attr]
    dispatcher.set_released(0, reorder_bytes=60)  # task 1's outputs wait behind task 0
    assert not dispatcher._may_read(0)
    dispatcher.set_released(0, reorder_bytes=40)
    assert dispatcher._may_read(0)
    dispatcher.set_released(2, reorder_bytes=10**6)  # task 2 is the oldest unreleased: it may go
    assert dispatcher._may_read(0)


def test_reorder_buffer_counts_the_bytes_it_holds():
    for deterministic, hold in ((True, False), (False, True), (False, False)):
        buf = ReorderBuffer(deterministic, hold_tasks=hold)
        buf.add(TaskOutput(1, ["b"], 1, last=False), 30)
        buf.add(TaskOutput(1, ["c"], 1), 20)
        expected_held = 50
        assert buf.buffered_bytes == expected_held
        released = list(buf.pop_ready())
        assert buf.buffered_bytes == (50 if deterministic else 0)
        buf.add(TaskOutput(0, ["a"], 1), 5)
        released += list(buf.pop_ready())
        assert buf.buffered_bytes == 0 and len(released) == 3


def test_reset_task_drops_its_bytes():
    buf = ReorderBuffer(True, hold_tasks=True)
    buf.add(TaskOutput(0, ["a"], 1, last=False), 70)
    buf.reset_task(0)
    assert buf.buffered_bytes == 0


# --- finer tasks for a small known-length input (pure) ---------------------------------------


def test_a_small_list_is_cut_finer_a_generator_or_a_set_task_size_is_not():
    def plan_task_size(stream: sp.Stream) -> int:
        return build_plan(stream).task_size

    assert plan_task_size(sp.from_iterable(list(range(4096)))) == 512
    assert plan_task_size(sp.from_iterable(list(range(4096))).map_batches(lambda b: b, batch_size=100)) == 600
    assert plan_task_size(sp.from_iterable(iter(range(4096)))) == 1024
    assert plan_task_size(sp.from_iterable(list(range(4096))).set_processing(task_size=1000)) == 1000
    assert plan_task_size(sp.from_iterable(list(range(1_000_000)))) == 1024
    assert plan_task_size(sp.from_iterable(list(range(900)))) == 1024
    assert finer_task_size(1024, 2000) == MIN_TASK_RECORDS


def test_finer_tasks_are_the_same_for_every_backend(backend_options):
    stream = sp.from_iterable([{"id": i} for i in range(3000)]).map(task_of)
    out = run_guarded(lambda: assert_same_as_simple(stream, **backend_options), GUARD_S, "finer tasks vs simple")
    # ceil(3000 / 8) = 375 records per task (no batched op: no rounding to batches): 8 tasks.
    assert [r["task"] for r in out] == [i // 375 for i in range(3000)]


def task_of(record: dict[str, Any]) -> dict[str, Any]:
    return {"id": record["id"], "task": sp.get_worker_info().task_key}


# --- end to end ---------------------------------------------------------------------------------


class _RecordingDispatcher(TaskDispatcher):
    """A dispatcher that remembers itself and the largest reorder bytes it was told."""

    made: ClassVar[list[_RecordingDispatcher]] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.peak_reorder_bytes = 0
        self.budget = kwargs.get("byte_budget")
        _RecordingDispatcher.made.append(self)

    def set_released(self, next_task: int, reorder_bytes: int = 0) -> None:
        self.peak_reorder_bytes = max(self.peak_reorder_bytes, reorder_bytes)
        super().set_released(next_task, reorder_bytes)


SMALL_BUDGET = ByteBudget(in_flight_bytes=6 * MIB, reorder_bytes=6 * MIB)


@pytest.fixture
def small_budget(monkeypatch):
    """Runs with a 6 MiB + 6 MiB budget, their dispatchers recorded (both run in this process)."""
    _RecordingDispatcher.made = []
    for module in (mp_run, threads_backend):
        monkeypatch.setattr(module, "TaskDispatcher", _RecordingDispatcher)
        monkeypatch.setattr(module, "default_byte_budget", lambda: SMALL_BUDGET)
    return _RecordingDispatcher.made


def test_one_mib_records_run_within_the_byte_budget(backend_options, small_budget):
    records = [big_record(i) for i in range(BIG_RECORDS)]
    stream = sp.from_iterable(records).map(blob_summary)
    out = run_guarded(lambda: assert_same_as_simple(stream, **backend_options), GUARD_S, "1 MiB records vs simple")
    assert [r["id"] for r in out] == list(range(BIG_RECORDS))
    assert all(r["size"] == MIB and r["first"] == r["id"] % 251 for r in out)
    task_bytes = max(t.nbytes for t in IterableSource(records).iter_tasks(1024))
    if effective_backend(backend_options) == "simple":
        assert not small_budget
        return
    (dispatcher,) = small_budget
    assert dispatcher.total_tasks == len(list(IterableSource(records).iter_tasks(1024)))
    workers = backend_options.get("num_cpu_workers", 1)
    assert 0 < dispatcher.peak_in_flight_bytes <= SMALL_BUDGET.in_flight_bytes + workers * task_bytes
    assert dispatcher.in_flight_bytes == 0  # every task's bytes were given back


def test_reorder_bytes_stay_within_the_budget_plus_the_tasks_in_flight(small_budget):
    # Big outputs (the records themselves) held behind a slow first task.
    records = [big_record(i) for i in range(BIG_RECORDS)]
    stream = sp.from_iterable(records).map(same_blob).set_processing(backend="multiprocessing", num_cpu_workers=2)
    out = run_guarded(lambda: stream.to_list(), GUARD_S, "1 MiB outputs")
    assert [r["id"] for r in out] == list(range(BIG_RECORDS)) and out[5]["blob"] == records[5]["blob"]
    (dispatcher,) = small_budget
    task_message = 2 * MIB  # one task's outputs (1 record of 1 MiB), pickled, with a margin
    bound = SMALL_BUDGET.reorder_bytes + 2 * mp_run.MAX_TASKS_IN_FLIGHT_PER_WORKER * task_message
    assert dispatcher.peak_reorder_bytes <= bound < BIG_RECORDS * MIB


def test_byte_cut_tasks_are_the_same_for_every_backend_and_worker_count(backend_options):
    sizes = [10, 200_000, 3 * MIB, 50, 900_000] * 8  # tasks of 1 to 20-odd records
    records = [{"id": i, "blob": b"y" * size} for i, size in enumerate(sizes)]
    stream = sp.from_iterable(records).map(blob_summary).set_processing(task_size=64)
    out = run_guarded(lambda: assert_same_as_simple(stream, **backend_options), GUARD_S, "byte-cut tasks vs simple")
    expected: list[int] = []
    for key, task in enumerate(IterableSource(records).iter_tasks(64)):
        expected += [key] * len(task.items)
    assert [r["task"] for r in out] == expected
    assert len(set(expected)) > len(records) // 64 + 1  # cut by bytes, not only by count


@pytest.mark.parametrize(
    "config",
    [{"backend": "simple"}, {"backend": "multiprocessing", "num_cpu_workers": 2}, {"backend": "threads", "num_cpu_workers": 2}],
    ids=lambda c: c["backend"],
)
def test_resume_over_byte_cut_tasks_completes_the_uninterrupted_output(tmp_path, config):
    records = [{"x": i, "blob": b"z" * (512 * 1024)} for i in range(40)]  # tasks of 2 records
    layout = {"rows_per_file": 16, "row_group_size": 8}  # G = 16 // 16 = 1 task per part

    def write(stream: sp.Stream, out: Any, **kwargs: Any) -> None:
        run_guarded(lambda: stream.write_parquet(out, **layout, **kwargs), GUARD_S, "write_parquet")

    write(sp.from_iterable(records).map(same_x).set_processing(task_size=16), tmp_path / "reference")
    flag = tmp_path / "failing"
    flag.write_text("")
    failing = sp.from_iterable(records).map(FailsWhileFileExists(str(flag), at=29)).map(same_x)
    with pytest.raises(RuntimeError, match="failing at 29"):
        write(failing.set_processing(task_size=16, **config), tmp_path / "out")
    flag.unlink()
    write(failing.set_processing(task_size=16, **config), tmp_path / "out", resume=True)
    assert snapshot(tmp_path / "out") == snapshot(tmp_path / "reference")
    assert len(list((tmp_path / "reference").glob("part-*.parquet"))) == 20  # 40 records / 2 per task


def same_x(record: dict[str, Any]) -> dict[str, Any]:
    return {"x": record["x"], "blob": record["blob"]}


def test_items_task_of_an_old_pickle_still_reads():
    # ItemsTask gained ``nbytes`` (default 0): a two-field payload is a task of unknown size.
    task = ItemsTask(0, [1, 2])
    assert IterableSource([]).task_bytes(task) == 0 and list(IterableSource([]).read_task(task)) == [1, 2]
