"""limit(n), take(n) and count(): the first n records of the simple backend's order, on every
backend, reading the source only as far as the backend reads ahead, with every worker reaped."""

from __future__ import annotations

import os
from typing import Any

import pytest

import streamproc as sp
from streamproc.io.limit import CountSink
from tests.hang_guard import run_guarded, worker_processes
from tests.utils import (
    MAX_PREFETCHED_TASKS,
    CountingSource,
    UserError,
    add,
    assert_outputs,
    assert_same_as_simple,
    double,
    fn_raises,
    is_odd,
    reads_ahead,
)

RUN_TIMEOUT_S = 120


def guarded(fn: Any, what: str = "a limited run") -> Any:
    return run_guarded(fn, timeout_s=RUN_TIMEOUT_S, what=what)


def record_pid(x: Any) -> tuple[Any, int]:
    return (x, os.getpid())


@pytest.mark.parametrize("n", [0, 1, 7, 25, 200])
def test_limit_in_the_middle_matches_simple(backend_options, n):
    stream = sp.from_iterable(range(100)).map(double).filter(lambda x: x % 3).limit(n).map(add, kwargs={"k": 1})
    stream = stream.set_processing(task_size=4)
    expected = [x * 2 + 1 for x in range(100) if (x * 2) % 3][:n]
    assert guarded(lambda: assert_same_as_simple(stream, **backend_options)) == expected


def test_limit_at_the_end_and_chained_limits(backend_options):
    stream = sp.from_iterable(range(50)).map(double).limit(20).limit(30).filter(is_odd).limit(5).set_processing(task_size=3)
    # double() makes every record even: nothing is odd, so the last limit keeps nothing.
    assert guarded(lambda: assert_same_as_simple(stream, **backend_options)) == []
    stream = sp.from_iterable(range(50)).limit(20).map(add, kwargs={"k": 1}).limit(3).set_processing(task_size=3)
    assert guarded(lambda: assert_same_as_simple(stream, **backend_options)) == [1, 2, 3]


def test_map_batches_after_limit_sees_the_limited_records(backend_options):
    stream = sp.from_iterable(range(100)).limit(10).map_batches(lambda b: [sum(b)], batch_size=4).set_processing(task_size=4)
    assert guarded(lambda: assert_same_as_simple(stream, **backend_options)) == [6, 22, 17]


def test_limit_reads_the_source_only_as_far_as_the_backend_reads_ahead(backend_options):
    task_size, n = 10, 25
    source = CountingSource(range(100_000))
    stream = sp.from_iterable(source).map(double).limit(n).map(add, kwargs={"k": 1})
    out = guarded(lambda: stream.set_processing(task_size=task_size, **backend_options).to_list())
    assert_outputs(out, [x * 2 + 1 for x in range(n)], backend_options)
    if reads_ahead(backend_options):
        assert source.pulled <= n + MAX_PREFETCHED_TASKS * task_size
    else:
        assert source.pulled == 30  # the tasks holding the first 25 records, and no more


def test_limit_zero_reads_nothing(backend_options):
    source = CountingSource(range(100))
    assert guarded(lambda: sp.from_iterable(source).map(double).limit(0).set_processing(**backend_options).to_list()) == []
    assert source.iterations == 0


def test_limit_is_lazy():
    source = CountingSource(range(100))
    stream = sp.from_iterable(source).map(double).limit(5)
    assert source.iterations == 0
    assert "limit(5)" in repr(stream)


def test_options_set_after_limit_apply_to_the_ops_before_it():
    stream = sp.from_iterable(range(40)).map(record_pid).limit(30).set_processing(backend="multiprocessing", num_cpu_workers=2)
    out = guarded(stream.to_list)
    assert [x for x, _ in out] == list(range(30))
    assert os.getpid() not in {pid for _, pid in out}  # the inner map ran in CPU workers


def test_options_set_before_limit_stay_with_the_ops_before_it():
    stream = sp.from_iterable(range(40)).map(record_pid).set_processing(backend="multiprocessing", num_cpu_workers=2)
    out = guarded(stream.limit(10).map(record_pid).set_processing(backend="simple").to_list)
    # set_processing after the limit applies to both parts: here everything is simple again.
    assert {pid for (_, pid), _ in out} == {os.getpid()}


def test_limit_with_deterministic_false_gives_n_distinct_records(backend_options):
    options = {**backend_options, "deterministic": False}
    stream = sp.from_iterable(range(200)).map(double).limit(30).set_processing(task_size=7, **options)
    out = guarded(stream.to_list)
    assert len(out) == 30 and len(set(out)) == 30 and set(out) <= {x * 2 for x in range(200)}


def test_error_before_the_limit_keeps_the_users_type(backend_options):
    stream = (
        sp.from_iterable(range(100)).map(fn_raises(at=3)).limit(50).map(double).set_processing(task_size=2, **backend_options)
    )
    with pytest.raises(UserError, match="raised at 3"):
        guarded(stream.to_list)


def test_error_after_the_limit_is_not_reached_when_the_record_is_cut(backend_options):
    stream = sp.from_iterable(range(100)).limit(3).map(fn_raises(at=50)).set_processing(task_size=2, **backend_options)
    assert guarded(stream.to_list) == [0, 1, 2]


def test_take_returns_the_first_records_and_stops_reading(backend_options):
    source = CountingSource(range(100_000))
    stream = sp.from_iterable(source).map(double).set_processing(task_size=10, **backend_options)
    out = guarded(lambda: stream.take(12))
    if backend_options.get("deterministic", True):
        assert out == [x * 2 for x in range(12)]
    assert len(out) == 12
    bound = 12 + MAX_PREFETCHED_TASKS * 10 if reads_ahead(backend_options) else 20
    assert source.pulled <= bound
    assert guarded(lambda: sp.from_iterable(range(5)).set_processing(**backend_options).take(10)) == [0, 1, 2, 3, 4]
    assert sp.from_iterable(CountingSource(range(5))).take(0) == []


def test_count_matches_simple(backend_options):
    stream = sp.from_iterable(range(1000)).filter(is_odd).map(double).set_processing(task_size=64)
    expected = len(stream.set_processing(backend="simple").to_list())
    assert guarded(lambda: stream.set_processing(**backend_options).count()) == expected == 500
    assert guarded(lambda: sp.from_iterable([]).set_processing(**backend_options).count()) == 0
    assert guarded(lambda: sp.from_iterable(range(100)).limit(42).set_processing(**backend_options).count()) == 42


def test_count_ships_counts_not_records():
    sink = CountSink()
    finalize = sink.finalizer()
    assert finalize([{"a": 1}, {"a": 2}, {"a": 3}]) == 3  # runs where the chunk is produced


@pytest.mark.parametrize("method", ["limit", "take"])
@pytest.mark.parametrize(("n", "exc"), [(-1, ValueError), ("3", TypeError), (2.0, TypeError), (True, TypeError)])
def test_bad_n_raises_naming_the_method(method, n, exc):
    with pytest.raises(exc, match=method):
        getattr(sp.from_iterable(range(3)), method)(n)


def _break_after_first(stream: sp.Stream) -> Any:
    records = iter(stream)
    first = next(records)
    records.close()  # the consumer leaves early: both runs must stop and reap their workers
    return first


@pytest.mark.parametrize(
    "outer", [{"backend": "multiprocessing", "num_cpu_workers": 2}, {"backend": "threads", "num_cpu_workers": 2}]
)
def test_leaving_early_stops_the_run_before_the_limit_too(outer):
    stream = sp.from_iterable(range(10**6)).map(double).limit(10**5).map(add, kwargs={"k": 1})
    stream = stream.set_processing(task_size=10, **outer)
    assert guarded(lambda: _break_after_first(stream)) == 1


@pytest.mark.parametrize(
    "outer", [{"backend": "multiprocessing", "num_cpu_workers": 2}, {"backend": "threads", "num_cpu_workers": 2}]
)
def test_an_error_after_the_limit_stops_the_run_before_it_too(outer):
    stream = sp.from_iterable(range(10**6)).map(double).limit(10**5).map(fn_raises(at=40)).set_processing(task_size=10, **outer)
    with pytest.raises(UserError, match="raised at 40"):
        guarded(stream.to_list)


def test_stopping_a_dispatcher_closes_its_source_generator():
    # What stops a limit's inner run when the outer run stops on an error (the error's
    # traceback would otherwise keep the suspended generator, and the inner workers, alive).
    from streamproc.execution.dispatch import TaskDispatcher

    closed = []

    def payloads():
        try:
            yield from enumerate(range(100))
        finally:
            closed.append(True)

    dispatcher = TaskDispatcher(payloads(), num_workers=1, max_in_flight=2, window=None)
    assert dispatcher.next_task(0) is not None
    dispatcher.stop()
    assert closed == [True]
    assert dispatcher.next_task(0) is None


def test_the_run_before_the_limit_has_stopped_when_its_last_record_goes_on():
    # n <= task_size: the one outer task is handed on only after the inner run was closed, so
    # when the first output arrives, only the outer run's two workers are left.
    stream = sp.from_iterable(range(10**6)).map(double).limit(5).map(add, kwargs={"k": 1})
    stream = stream.set_processing(backend="multiprocessing", num_cpu_workers=2, task_size=10)

    def first_output_and_live_workers() -> tuple[Any, int]:
        records = iter(stream)
        try:
            return next(records), len(worker_processes())
        finally:
            records.close()

    assert guarded(first_output_and_live_workers) == (1, 2)


def _fails_on_3_mod_7(x: int) -> int:
    if x % 7 == 3:
        raise ValueError(f"bad {x}")
    return x


def test_dead_letters_before_and_after_a_limit_do_not_meet(tmp_path: Any) -> None:
    """Both runs of a limit number their tasks from 0: the inner run's dead letters go to
    ``before-limit/`` under ``dead_letter_path``, the outer run's to the path itself."""
    import warnings

    import pyarrow.parquet as pq

    dead = tmp_path / "dead"
    stream = (
        sp.from_iterable(range(30)).map(_fails_on_3_mod_7).limit(20).map(lambda x: x + 3).map(_fails_on_3_mod_7)
        .set_processing(on_error="dead_letter", dead_letter_path=str(dead), task_size=5)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sp.RecordsSkippedWarning)
        out = run_guarded(stream.to_list, 60)
    first_20 = [x for x in range(30) if x % 7 != 3][:20]
    assert out == [x + 3 for x in first_20 if (x + 3) % 7 != 3]
    inner = sorted(r["record"] for p in (dead / "before-limit").glob("dead-*.parquet") for r in pq.read_table(p).to_pylist())
    outer = sorted(r["record"] for p in dead.glob("dead-*.parquet") for r in pq.read_table(p).to_pylist())
    # The simple inner run reads to the end of the task holding its 20th output (items 20-24).
    assert inner == sorted(str(x) for x in range(25) if x % 7 == 3)
    assert outer == sorted(str(x + 3) for x in first_20 if (x + 3) % 7 == 3)
