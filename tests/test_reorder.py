"""ReorderBuffer: putting finished task outputs back in order (pure: no process, no thread)."""

from __future__ import annotations

import doctest

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamproc.execution import reorder
from streamproc.execution.reorder import ReorderBuffer
from streamproc.execution.task import TaskOutput
from tests.utils import UserError


def add_chunk(buf: ReorderBuffer, task: int, chunk: object, count: int, last: bool) -> None:
    buf.add(TaskOutput(task, chunk, count, last=last))


def drain(buf: ReorderBuffer) -> list:
    """Every ``(chunk, count)`` that may be released now (empty end-of-task markers left out)."""
    return [(output.chunk, output.count) for output in buf.pop_ready() if output.chunk is not None]


def test_module_doctests():
    assert doctest.testmod(reorder).failed == 0


# -- deterministic ----------------------------------------------------------------------------


def test_deterministic_holds_later_tasks_until_earlier_ones_complete():
    buf = ReorderBuffer(deterministic=True)
    add_chunk(buf, 2, "c", 1, last=True)
    add_chunk(buf, 1, "b", 1, last=True)
    assert drain(buf) == []
    assert (buf.next_task, buf.tasks_done, buf.buffered_tasks) == (0, 0, 2)
    add_chunk(buf, 0, "a", 1, last=True)
    assert drain(buf) == [("a", 1), ("b", 1), ("c", 1)]
    assert (buf.next_task, buf.tasks_done, buf.buffered_tasks) == (3, 3, 0)


def test_deterministic_streams_chunks_of_the_current_task_before_it_completes():
    buf = ReorderBuffer(deterministic=True)
    add_chunk(buf, 0, "a1", 2, last=False)
    assert drain(buf) == [("a1", 2)]
    assert buf.next_task == 0 and buf.tasks_done == 0  # not complete yet
    add_chunk(buf, 1, "b1", 1, last=False)  # a later task: held
    add_chunk(buf, 0, "a2", 3, last=False)
    assert drain(buf) == [("a2", 3)]
    add_chunk(buf, 0, "a3", 1, last=True)
    add_chunk(buf, 1, "b2", 1, last=True)
    assert drain(buf) == [("a3", 1), ("b1", 1), ("b2", 1)]
    assert buf.tasks_done == 2


def test_deterministic_task_without_outputs_completes():
    buf = ReorderBuffer(deterministic=True)
    add_chunk(buf, 1, "b", 1, last=True)
    add_chunk(buf, 0, None, 0, last=True)  # a task whose records were all filtered out
    assert drain(buf) == [("b", 1)]
    assert buf.tasks_done == 2


def test_deterministic_error_at_k_is_raised_after_the_outputs_of_earlier_tasks():
    buf = ReorderBuffer(deterministic=True)
    error = UserError("task 2 failed")
    buf.add_error(2, error)
    add_chunk(buf, 3, "d", 1, last=True)  # a later task that finished: never released
    add_chunk(buf, 1, "b", 1, last=True)
    assert drain(buf) == []
    add_chunk(buf, 0, "a", 1, last=True)
    released = []
    with pytest.raises(UserError) as info:
        for output in buf.pop_ready():
            released.append((output.chunk, output.count))
    assert info.value is error
    assert released == [("a", 1), ("b", 1)]
    assert buf.next_task == 2


def test_deterministic_error_after_some_chunks_of_the_same_task():
    buf = ReorderBuffer(deterministic=True)
    add_chunk(buf, 0, "a1", 1, last=False)
    buf.add_error(0, UserError("later in task 0"))
    released = []
    with pytest.raises(UserError):
        for output in buf.pop_ready():
            released.append((output.chunk, output.count))
    assert released == [("a1", 1)]


def test_deterministic_error_at_task_zero_is_raised_at_once():
    buf = ReorderBuffer(deterministic=True)
    add_chunk(buf, 1, "b", 1, last=True)
    buf.add_error(0, UserError("first"))
    with pytest.raises(UserError, match="first"):
        drain(buf)


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_deterministic_output_is_task_order_whatever_the_arrival_order(data):
    # Chunks of one task arrive in order (one pipe per worker); tasks interleave freely.
    chunks_per_task = data.draw(st.lists(st.integers(min_value=1, max_value=4), min_size=1, max_size=8))
    pending = {task: [(f"{task}.{i}", i + 1, i == n - 1) for i in range(n)] for task, n in enumerate(chunks_per_task)}
    buf = ReorderBuffer(deterministic=True)
    released = []
    while pending:
        task = data.draw(st.sampled_from(sorted(pending)))
        chunk, count, last = pending[task].pop(0)
        if not pending[task]:
            del pending[task]
        add_chunk(buf, task, chunk, count, last)
        released += drain(buf)
        # Invariant: what is held is a subset of [next_task, next_task + tasks).
        assert all(buf.next_task <= t for t in buf._tasks)
    expected = [(f"{t}.{i}", i + 1) for t, n in enumerate(chunks_per_task) for i in range(n)]
    assert released == expected
    assert buf.tasks_done == len(chunks_per_task) and buf.buffered_tasks == 0


# -- not deterministic ------------------------------------------------------------------------


def test_not_deterministic_releases_in_arrival_order():
    buf = ReorderBuffer(deterministic=False)
    add_chunk(buf, 2, "c", 1, last=True)
    add_chunk(buf, 0, "a1", 1, last=False)
    assert drain(buf) == [("c", 1), ("a1", 1)]
    assert buf.tasks_done == 1
    add_chunk(buf, 0, None, 0, last=True)
    assert drain(buf) == []
    assert buf.tasks_done == 2
    assert buf.buffered_tasks == 0  # nothing is held per task


def test_not_deterministic_error_comes_after_what_already_arrived():
    buf = ReorderBuffer(deterministic=False)
    add_chunk(buf, 3, "d", 1, last=True)
    buf.add_error(1, UserError("first"))
    buf.add_error(2, UserError("second"))  # only the first error is kept
    released = []
    with pytest.raises(UserError, match="first"):
        for output in buf.pop_ready():
            released.append((output.chunk, output.count))
    assert released == [("d", 1)]
