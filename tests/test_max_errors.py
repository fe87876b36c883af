"""``max_errors`` and the end-of-run warning of the error policy, on every backend.

Every run is under the hang guard; the autouse fixture of conftest.py checks that a run
stopped by ``TooManyErrorsError`` leaves no process or thread behind.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import pytest

import streamproc as sp
from streamproc.io.error_ledger import MIN_RECORDS_FOR_FRACTION
from tests.hang_guard import run_guarded
from tests.utils import MAX_PREFETCHED_TASKS, CountingSource, collect_until_error, identity, is_simple

RUN_TIMEOUT_S = 60.0


class FailsWhen:
    """Raises ``ValueError`` on records ``x`` with ``x % every == 0`` (from ``start`` on)."""

    def __init__(self, every: int, start: int = 0, error: type[Exception] = ValueError) -> None:
        self.every = every
        self.start = start
        self.error = error
        self.__name__ = "fails_when"

    def __call__(self, x: int) -> int:
        if x >= self.start and x % self.every == 0:
            raise self.error(f"bad {x}")
        return x


def key_error_on_7(x: int) -> int:
    if x == 7:
        raise KeyError(x)
    return x


def as_record(x: int) -> dict[str, int]:
    return {"x": x}


def run_collecting(stream: sp.Stream) -> tuple[list[Any], BaseException | None, list[warnings.WarningMessage]]:
    """Iterates ``stream`` under the hang guard: outputs, the error, the policy's warnings."""

    def go() -> tuple[list[Any], BaseException | None, list[warnings.WarningMessage]]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            outputs, exc = collect_until_error(stream)
        return outputs, exc, [w for w in caught if issubclass(w.category, sp.RecordsSkippedWarning)]

    return run_guarded(go, RUN_TIMEOUT_S, "the run")


# -- a count ----------------------------------------------------------------------------------------


def test_count_past_max_errors_stops_the_run(backend_options):
    stream = sp.from_iterable(range(40)).map(FailsWhen(10)).set_processing(task_size=5, on_error="skip", max_errors=3)
    _, exc, caught = run_collecting(stream.set_processing(**backend_options))
    assert type(exc) is sp.TooManyErrorsError and isinstance(exc, sp.StreamprocError)
    assert str(exc).startswith(
        "4 records failed, more than max_errors=3 allows (on_error='skip'): 4 ValueError in stage 1 (map(fails_when)); "
        "first: ValueError: bad 0 at "
    ), str(exc)
    assert caught == []  # the error says it all


def test_count_at_max_errors_completes_with_one_warning(backend_options):
    stream = sp.from_iterable(range(40)).map(FailsWhen(10)).map(key_error_on_7)
    stream = stream.set_processing(task_size=5, on_error="skip", max_errors=5, **backend_options)
    outputs, exc, caught = run_collecting(stream)
    assert exc is None
    assert outputs == [x for x in range(40) if x % 10 and x != 7]
    [warning] = caught
    assert str(warning.message) == (
        "streamproc: 5 records were dropped because processing them raised (on_error='skip'): "
        "4 ValueError in stage 1 (map(fails_when)), 1 KeyError in stage 2 (map(key_error_on_7)); "
        "not kept (on_error='dead_letter' with dead_letter_path= keeps them)"
    )
    assert warning.filename.endswith("tests/utils.py")  # collect_until_error's loop: the caller, not streamproc


def test_warning_points_at_the_sink_call():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sp.from_iterable(range(10)).map(key_error_on_7).set_processing(on_error="skip").to_list()
    [warning] = [w for w in caught if issubclass(w.category, sp.RecordsSkippedWarning)]
    assert warning.filename == __file__


def test_max_errors_zero_stops_at_the_first_error():
    stream = sp.from_iterable(range(40)).map(FailsWhen(10, start=25)).set_processing(on_error="skip", max_errors=0, task_size=5)
    outputs, exc, _ = run_collecting(stream)
    assert type(exc) is sp.TooManyErrorsError and str(exc).startswith("1 record failed, more than max_errors=0 allows")
    assert outputs == list(range(30))  # the tasks before the failing one (records 30-34)


def test_warning_names_where_the_dead_letters_are(tmp_path):
    stream = sp.from_iterable(range(10)).map(key_error_on_7)
    stream = stream.set_processing(on_error="dead_letter", dead_letter_path=str(tmp_path / "dead"))
    _, exc, [warning] = run_collecting(stream)
    assert exc is None
    assert str(warning.message).endswith(f"dead letters in {tmp_path / 'dead'} (dead-<task>.parquet)")
    assert str(warning.message).startswith("streamproc: 1 record was dropped because processing them raised")


def test_no_warning_when_nothing_failed(backend_options):
    stream = sp.from_iterable(range(30)).map(identity).set_processing(on_error="skip", task_size=4, **backend_options)
    outputs, exc, caught = run_collecting(stream)
    assert (outputs, exc, caught) == (list(range(30)), None, [])


# -- a fraction -------------------------------------------------------------------------------------


def test_fraction_is_checked_at_the_end_below_1000_records(backend_options):
    """200 records, a third failing, max 10%: every record is processed, then the run fails."""
    stream = sp.from_iterable(range(200)).map(FailsWhen(3)).set_processing(task_size=20, on_error="skip", max_errors=0.1)
    outputs, exc, caught = run_collecting(stream.set_processing(**backend_options))
    assert type(exc) is sp.TooManyErrorsError
    assert "67 records failed, more than max_errors=0.1 allows (67 of the 200 records seen)" in str(exc)
    assert sorted(outputs) == [x for x in range(200) if x % 3]  # everything came out first
    assert caught == []


def test_fraction_within_bounds_completes(backend_options):
    stream = sp.from_iterable(range(200)).map(FailsWhen(3)).set_processing(task_size=20, on_error="skip", max_errors=0.5)
    outputs, exc, [warning] = run_collecting(stream.set_processing(**backend_options))
    assert exc is None and len(outputs) == 133
    assert str(warning.message).startswith("streamproc: 67 of 200 records were dropped")


def test_fraction_stops_a_run_early_once_1000_records_were_seen(backend_options):
    """Every record failing from record 1,000 on: the run stops soon after, not at the end."""
    n, task_size = 20_000, 100
    source = CountingSource(range(n))
    stream = sp.from_iterable(source).map(FailsWhen(1, start=MIN_RECORDS_FOR_FRACTION))
    stream = stream.set_processing(task_size=task_size, on_error="skip", max_errors=0.25, **backend_options)
    outputs, exc, _ = run_collecting(stream)
    assert type(exc) is sp.TooManyErrorsError
    assert sorted(outputs) == list(range(MIN_RECORDS_FOR_FRACTION))
    # 25% of the records seen failed after 1,334 records: that task, plus what was read ahead.
    ahead = 0 if is_simple(backend_options) else MAX_PREFETCHED_TASKS
    assert source.pulled <= 1_400 + ahead * task_size < n


def test_too_many_errors_aborts_the_sink(backend_options, tmp_path):
    """The run stops like on any error: no part file half-written, the output not committed."""
    stream = sp.from_iterable(range(400)).map(FailsWhen(2)).map(as_record)
    stream = stream.set_processing(task_size=10, on_error="skip", max_errors=5)

    def write() -> Any:
        return stream.set_processing(**backend_options).write_parquet(tmp_path / "out", rows_per_file=50)

    with pytest.raises(sp.TooManyErrorsError):
        run_guarded(write, RUN_TIMEOUT_S)
    leftovers = [name for name in os.listdir(tmp_path / "out") if name.endswith(".inprogress")]
    assert leftovers == []
