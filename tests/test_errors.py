"""Errors raised by user code come out of the sink as the user's own type, naming the stage."""

from __future__ import annotations

import traceback

import pytest

import streamproc as sp
from tests.utils import (
    UserError,
    always_true,
    batch_as_record,
    collect_until_error,
    fn_raises,
    identity,
    is_deterministic,
    runs_in_separate_processes,
    stage_notes,
)

torch = pytest.importorskip("torch")


def to_tensor(records: list[int]):  # type: ignore[no-untyped-def]
    return torch.tensor(records)


def plus_one(batch):  # type: ignore[no-untyped-def]
    return batch + 1


def keep_records(records: list[int], outputs) -> list[int]:  # type: ignore[no-untyped-def]
    return list(records)


RAISES = fn_raises(at=5)

# (failing stage, the stage's description in the note). The failing stage is stage 2, after a
# map, and before two more stages that must not claim the error as it passes through them.
CASES = {
    "map": (lambda s: s.map(RAISES), "stage 2 (map(raises_at_5))"),
    "filter": (lambda s: s.filter(fn_raises(at=5, fn=always_true)), "stage 2 (filter(raises_at_5))"),
    "map_batches": (
        lambda s: s.map_batches(fn_raises(at=5, fn=list), batch_size=4),
        "stage 2 (map_batches(raises_at_5, batch_size='4 records'))",
    ),
    "prepare_batch": (
        lambda s: s.map_gpu(fn_raises(at=5, fn=to_tensor), plus_one, batch_size=4),
        "stage 2 (map_gpu(raises_at_5, plus_one, batch_size='4 records')), prepare_batch",
    ),
    "forward": (
        lambda s: s.map_gpu(to_tensor, fn_raises(at=5, fn=plus_one), batch_size=4),
        "stage 2 (map_gpu(to_tensor, raises_at_5, batch_size='4 records')), forward",
    ),
    "postprocess": (
        lambda s: s.map_gpu(to_tensor, plus_one, fn_raises(at=5, fn=keep_records), batch_size=4),
        "stage 2 (map_gpu(to_tensor, plus_one, raises_at_5, batch_size='4 records')), postprocess",
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_user_error_keeps_its_type_and_names_the_stage(backend_options, case):
    build, where = case
    stream = build(sp.from_iterable(range(20)).map(identity)).map(identity).map_batches(batch_as_record, batch_size=3)
    outputs, exc = collect_until_error(stream.set_processing(task_size=8, **backend_options))
    assert type(exc) is UserError, exc
    assert exc.args == ("raised at 5",)
    assert stage_notes(exc) == [f"streamproc: raised in {where}"]
    if is_deterministic(backend_options):
        # Records 0-4 are in the first task (0-7), whose chunk never completes.
        assert outputs == []
    if runs_in_separate_processes(backend_options):
        # The worker's traceback is attached, with the line that raised.
        assert isinstance(exc.__cause__, sp.RemoteTraceback)
        assert "raise self.exc(" in str(exc.__cause__)
    else:  # the exception object itself: its own traceback reaches the line that raised
        assert "raise self.exc(" in "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def test_outputs_of_earlier_tasks_come_out_before_the_error(backend_options):
    stream = sp.from_iterable(range(100)).map(fn_raises(at=42)).set_processing(task_size=10, **backend_options)
    outputs, exc = collect_until_error(stream)
    assert type(exc) is UserError
    if is_deterministic(backend_options):
        assert outputs == list(range(40))  # tasks 0-3 complete; task 4 (40-49) fails
    else:  # other tasks may finish first, but nothing of the failed task comes out, nor twice
        assert len(set(outputs)) == len(outputs) and not set(outputs) & set(range(40, 50))


def test_note_names_the_task(backend_options):
    stream = sp.from_iterable(range(100)).map(fn_raises(at=42)).set_processing(task_size=10, **backend_options)
    _, exc = collect_until_error(stream)
    assert any("task 4" in note for note in exc.__notes__), exc.__notes__


def test_error_from_a_second_map_is_not_claimed_by_the_first(backend_options):
    stream = sp.from_iterable(range(10)).map(identity).map(fn_raises(at=3)).set_processing(**backend_options)
    _, exc = collect_until_error(stream)
    assert stage_notes(exc) == ["streamproc: raised in stage 2 (map(raises_at_3))"]


@pytest.mark.parametrize("exc_type", [KeyError, ValueError, ZeroDivisionError, UserError])
def test_builtin_and_user_exception_types_are_kept(backend_options, exc_type):
    stream = sp.from_iterable(range(10)).map(fn_raises(at=2, exc=exc_type)).set_processing(**backend_options)
    _, exc = collect_until_error(stream)
    assert type(exc) is exc_type


def test_flatten_of_a_non_iterable_record(backend_options):
    _, exc = collect_until_error(sp.from_iterable([[1], 2]).flatten().set_processing(**backend_options))
    assert type(exc) is TypeError
    assert stage_notes(exc) == ["streamproc: raised in stage 1 (flatten())"]


def test_token_batch_of_dicts_without_batch_by(backend_options):
    stream = sp.from_iterable([{"text": "a"}]).map_batches(batch_as_record, batch_size="8 tokens")
    _, exc = collect_until_error(stream.set_processing(**backend_options))
    assert type(exc) is TypeError
    assert "pass batch_by" in str(exc)


def test_source_error_keeps_its_type(backend_options, tmp_path):
    (tmp_path / "a.jsonl").write_text('{"a": 1}\nnot json\n')
    outputs, exc = collect_until_error(sp.read_jsonl(tmp_path / "a.jsonl").map(identity).set_processing(**backend_options))
    assert outputs == []  # both lines are in one task, which fails
    assert type(exc) is ValueError
    assert "line 2" in str(exc)
    assert any("the source" in note for note in exc.__notes__), exc.__notes__


def test_error_in_the_consumer_stops_the_run(backend_options):
    pulled = []

    def source():  # type: ignore[no-untyped-def]
        for i in range(10_000):
            pulled.append(i)
            yield i

    with pytest.raises(UserError):
        for record in sp.from_iterable(source()).set_processing(task_size=10, **backend_options):
            if record == 15:
                raise UserError("consumer")
    count = len(pulled)
    assert count < 10_000
    assert len(pulled) == count
