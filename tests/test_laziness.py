"""Laziness and bounded prefetch, proven by recording what the source has yielded (more-itertools style)."""

from __future__ import annotations

from contextlib import closing

import pytest

import streamproc as sp
from tests.utils import (
    MAX_PREFETCHED_TASKS,
    CountingSource,
    UserError,
    always_true,
    batch_as_record,
    collect_until_error,
    identity,
    is_deterministic,
    reads_ahead,
)


def _assert_pulled_one_task(source: CountingSource, task_size: int, config: dict) -> None:
    """A backend that does not read ahead pulls exactly the first task; others whole tasks, boundedly many.

    Called once the iterator is closed: a backend that reads ahead pulls from a feeder thread,
    which may be in the middle of a task while the consumer holds its first output; closing
    joins it, and a task it had begun is then complete.
    """
    if not reads_ahead(config):
        assert source.pulled == task_size
    else:
        assert source.pulled % task_size == 0 or source.pulled == len(source.items)
        assert task_size <= source.pulled <= MAX_PREFETCHED_TASKS * task_size


def _assert_outputs_before_error(outputs: list, expected: list, config: dict) -> None:
    """Deterministic: exactly the outputs of the records read before the error, in order.
    Otherwise some of them, in any order, none twice, none from beyond the error."""
    if is_deterministic(config):
        assert outputs == expected
    else:
        assert len(set(outputs)) == len(outputs) and set(outputs) <= set(expected)


def test_building_a_stream_pulls_nothing(backend_options):
    source = CountingSource(range(100))
    stream = (
        sp.from_iterable(source)
        .map(identity)
        .filter(always_true)
        .map(lambda x: [x, x])
        .flatten()
        .map_batches(batch_as_record, batch_size=4)
        .set_processing(task_size=8, **backend_options)
    )
    repr(stream)
    stream.plan()
    iterator = iter(stream)  # a generator: nothing runs before the first next()
    assert source.iterations == 0
    assert source.pulled == 0
    iterator.close()
    assert source.pulled == 0


def test_building_a_gpu_stage_pulls_nothing():
    source = CountingSource(range(10))
    sp.from_iterable(source).map_gpu(identity, identity, batch_size=2).set_processing(batch_size=3)
    assert source.pulled == 0


@pytest.mark.parametrize("task_size", [1, 7, 100])
def test_first_output_pulls_one_task(backend_options, task_size):
    source = CountingSource(range(10_000))
    stream = sp.from_iterable(source).map(identity).set_processing(task_size=task_size, **backend_options)
    with closing(iter(stream)) as iterator:
        first = next(iterator)
        assert first == 0 or not is_deterministic(backend_options)
    _assert_pulled_one_task(source, task_size, backend_options)


def test_first_output_pulls_default_task_size(backend_options):
    # Default task size: 1024 source records.
    source = CountingSource(range(10_000))
    with closing(iter(sp.from_iterable(source).map(identity).set_processing(**backend_options))) as iterator:
        next(iterator)
    _assert_pulled_one_task(source, 1024, backend_options)


def test_first_output_pulls_task_sized_to_largest_batch(backend_options):
    # A batch of 2,000 records must fit in one task, so the default task grows to 2,000.
    source = CountingSource(range(10_000))
    stream = sp.from_iterable(source).map_batches(batch_as_record, batch_size=2000).set_processing(**backend_options)
    with closing(iter(stream)) as iterator:
        first = next(iterator)
        assert first == list(range(first[0], first[0] + 2000))  # one whole task
        assert first[0] == 0 or not is_deterministic(backend_options)
    _assert_pulled_one_task(source, 2000, backend_options)


def test_pulls_as_consumer_advances(backend_options):
    source = CountingSource(range(1000))
    stream = sp.from_iterable(source).set_processing(task_size=10, **backend_options)
    with closing(iter(stream)) as iterator:
        for _ in range(25):  # 25 records: from three tasks at least
            next(iterator)
        if not reads_ahead(backend_options):
            assert source.pulled == 30
        else:
            assert 30 <= source.pulled <= 30 + MAX_PREFETCHED_TASKS * 10


def test_breaking_out_early_stops_pulling(backend_options):
    source = CountingSource(range(10_000))
    stream = sp.from_iterable(source).map(identity).set_processing(task_size=5, **backend_options)
    for count, _ in enumerate(stream, start=1):
        if count == 13:
            break
    pulled = source.pulled
    assert pulled < len(source.items)
    # The abandoned run does not go on reading in the background.
    assert source.pulled == pulled


@pytest.mark.parametrize(
    ("fail_after", "task_size"),
    [(0, 3), (1, 3), (5, 3), (6, 3), (2, 10), (10, 10), (10, 1)],
)
def test_source_error_after_k_items_surfaces_after_k_outputs(backend_options, fail_after, task_size):
    source = CountingSource(range(20), fail_after=fail_after)
    stream = sp.from_iterable(source).map(identity).set_processing(task_size=task_size, **backend_options)
    outputs, exc = collect_until_error(stream)
    assert type(exc) is UserError
    _assert_outputs_before_error(outputs, list(range(fail_after)), backend_options)


def test_source_error_after_exhausting_items(backend_options):
    source = CountingSource(range(4), fail_after=4)
    outputs, exc = collect_until_error(sp.from_iterable(source).set_processing(task_size=3, **backend_options))
    assert type(exc) is UserError
    _assert_outputs_before_error(outputs, [0, 1, 2, 3], backend_options)


def test_generator_source_runs_once():
    # A generator is consumed lazily, and only once: a second run sees what is left (nothing).
    stream = sp.from_iterable(x for x in range(3))
    assert stream.to_list() == [0, 1, 2]
    assert stream.to_list() == []


def test_iterable_source_runs_again():
    source = CountingSource(range(3))
    stream = sp.from_iterable(source).map(lambda x: x + 1)
    assert stream.to_list() == [1, 2, 3]
    assert stream.to_list() == [1, 2, 3]
    assert source.iterations == 2
