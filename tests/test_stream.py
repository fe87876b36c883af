"""Stream as an immutable builder: every op and set_processing returns a new stream."""

from __future__ import annotations

import dataclasses

import pytest

import streamproc as sp
from streamproc.options import ProcessingOptions
from streamproc.plan import build_plan
from tests.utils import add, always_true, batch_as_record, double, identity, is_odd

OPS = {
    "map": lambda s: s.map(double),
    "map_kwargs": lambda s: s.map(add, kwargs={"k": 1}),
    "filter": lambda s: s.filter(is_odd),
    "flatten": lambda s: s.map(lambda x: [x, x]).flatten(),
    "map_batches": lambda s: s.map_batches(batch_as_record, batch_size=2),
    "map_gpu": lambda s: s.map_gpu(identity, identity, batch_size=2),
    "set_processing": lambda s: s.set_processing(batch_size=2, task_size=5, show_progress=False),
}


@pytest.mark.parametrize("op", OPS.values(), ids=OPS.keys())
def test_op_returns_new_stream_and_leaves_old_one_unchanged(op):
    base = sp.from_iterable([1, 2, 3]).map(identity)
    repr_before, ops_before, options_before = repr(base), base.ops, base.options

    derived = op(base)

    assert derived is not base
    assert repr(base) == repr_before
    assert base.ops == ops_before
    assert base.options == options_before
    assert base.to_list() == [1, 2, 3]


def test_branches_of_one_stream_are_independent():
    base = sp.from_iterable(range(6)).map(double)
    odd_halves = base.map(lambda x: x // 2).filter(is_odd)
    plus_one = base.map(add, kwargs={"k": 1})
    assert odd_halves.to_list() == [1, 3, 5]
    assert plus_one.to_list() == [1, 3, 5, 7, 9, 11]
    assert base.to_list() == [0, 2, 4, 6, 8, 10]


def test_set_processing_keeps_earlier_options_and_does_not_touch_the_old_stream():
    base = sp.from_iterable(range(3))
    first = base.set_processing(task_size=5)
    second = first.set_processing(batch_size="7 tokens", batch_by="n")
    assert base.options == ProcessingOptions()
    assert first.options.task_size == 5 and first.options.batch_size is None
    assert second.options.task_size == 5
    assert str(second.options.batch_size) == "7 tokens"
    assert second.options.batch_by == "n"
    assert second.ops == base.ops == ()


def test_map_kwargs_are_copied_when_the_op_is_built():
    kwargs = {"k": 1}
    stream = sp.from_iterable([1, 2]).map(add, kwargs=kwargs)
    kwargs["k"] = 100
    assert stream.to_list() == [2, 3]


def test_ops_are_frozen():
    op = sp.from_iterable([1]).map(double).ops[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        op.fn = identity  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        ProcessingOptions().task_size = 3  # type: ignore[misc]


def test_repr_lists_source_ops_and_changed_options():
    stream = (
        sp.from_iterable([1, 2, 3])
        .map(double)
        .filter(is_odd)
        .flatten()
        .map_batches(batch_as_record, batch_size=4)
        .map_gpu(identity, identity, batch_size="64 tokens")
        .set_processing(task_size=5, batch_size=3)
    )
    assert repr(stream) == (
        "Stream(from_iterable([1, 2, 3])\n"
        "  .map(double)\n"
        "  .filter(is_odd)\n"
        "  .flatten()\n"
        "  .map_batches(batch_as_record, batch_size='4 records')\n"
        "  .map_gpu(identity, identity, batch_size='64 tokens')\n"
        "  .set_processing(batch_size='3 records', task_size=5))"
    )
    assert repr(sp.from_iterable([1])) == "Stream(from_iterable([1]))"


def test_plan_resolves_defaults_without_changing_the_stream():
    stream = sp.from_iterable(range(3)).map_batches(batch_as_record).map_batches(batch_as_record, batch_size=5000)
    plan = build_plan(stream.set_processing(batch_size="9 records"))
    assert [str(op.batch_size) for op in plan.ops] == ["9 records", "5000 records"]
    assert plan.task_size == 5000  # the largest record batch size, above the 1024 default
    assert stream.ops[0].batch_size is None  # resolving the plan did not fill in the stream's op
    assert build_plan(sp.from_iterable([1]).map(always_true)).task_size == 1024
    assert build_plan(sp.from_iterable([1]).set_processing(task_size=3)).task_size == 3


def test_op_arguments_are_checked_when_the_op_is_built():
    stream = sp.from_iterable([1])
    with pytest.raises(TypeError, match="fn must be callable"):
        stream.map(3)
    with pytest.raises(TypeError, match="kwargs must be a dict"):
        stream.map(add, kwargs=[("k", 1)])
    with pytest.raises(TypeError, match="pred must be callable"):
        stream.filter("x")
    with pytest.raises(TypeError, match="fn must be callable"):
        stream.map_batches(None)
    with pytest.raises(TypeError, match="forward must be callable"):
        stream.map_gpu(identity, 1)
    with pytest.raises(TypeError, match="postprocess must be callable"):
        stream.map_gpu(identity, identity, postprocess="x")
    with pytest.raises(ValueError, match="batch_size"):
        stream.map_batches(identity, batch_size="ten")
    with pytest.raises(ValueError, match="batch_by"):
        stream.map_gpu(identity, identity, batch_size="10 tokens", batch_by=3)
    with pytest.raises(TypeError, match="needs an iterable"):
        sp.from_iterable(5)
    with pytest.raises(TypeError, match="DataFrame"):
        sp.from_pandas([{"a": 1}])
