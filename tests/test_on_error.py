"""``on_error="skip"``: failing records are dropped, the rest is unchanged, on every backend.

Every run goes through the hang guard and is compared with the simple backend's run of the
same stream, and with the same stream over the input without the bad records (with
``on_error="raise"``: the policy must not change what the good records give). Fakes that
travel to workers are at module level; torch is imported inside the callables only.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest

import streamproc as sp
from streamproc.execution.context import ExecutionContext
from streamproc.execution.task import Task, run_task
from streamproc.plan import build_plan
from tests.hang_guard import run_guarded
from tests.utils import (
    UserError,
    assert_outputs,
    assert_records_equal,
    assert_same_as_simple,
    batch_as_record,
    collect_until_error,
    fn_raises,
    identity,
)

#: Deadline of one guarded run (a hang fails the test with "deadlock").
RUN_TIMEOUT_S = 60.0
BAD = (3, 13, 14, 29)


def run(stream: sp.Stream, **options: Any) -> list[Any]:
    """``stream.to_list()`` under ``options`` and the hang guard, warnings of the policy silenced."""

    def go() -> list[Any]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", sp.RecordsSkippedWarning)
            return stream.set_processing(**options).to_list()

    return run_guarded(go, RUN_TIMEOUT_S, "the run")


def same_as_simple(stream: sp.Stream, **options: Any) -> list[Any]:
    def go() -> list[Any]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", sp.RecordsSkippedWarning)
            return assert_same_as_simple(stream, **options)

    return run_guarded(go, RUN_TIMEOUT_S, "the run and the simple backend's")


class RaisesAtAny:
    """A picklable callable that raises ``UserError`` on any record in ``bad`` (or a batch holding one)."""

    def __init__(self, bad: tuple[int, ...], fn: Any = identity) -> None:
        self.bad = set(bad)
        self.fn = fn
        self.__name__ = "raises_at_any"

    def __call__(self, value: Any, *args: Any) -> Any:
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, int) and v in self.bad for v in values):
            raise UserError(f"bad record in {value!r}")
        return self.fn(value, *args)


def is_even_or_raise(x: int) -> bool:
    if x in BAD:
        raise KeyError(x)
    return x % 2 == 0


# -- map, filter, flatten -----------------------------------------------------------------------


@pytest.mark.parametrize("task_size", [4, 1024])
def test_map_drops_failing_records_only(backend_options, task_size):
    stream = sp.from_iterable(range(40)).map(RaisesAtAny(BAD)).set_processing(task_size=task_size, on_error="skip")
    outputs = same_as_simple(stream, **backend_options)
    assert outputs == [x for x in range(40) if x not in BAD]


def test_filter_drops_records_whose_predicate_raises(backend_options):
    stream = sp.from_iterable(range(40)).filter(is_even_or_raise).set_processing(task_size=8, on_error="skip")
    outputs = same_as_simple(stream, **backend_options)
    assert outputs == [x for x in range(40) if x % 2 == 0 and x not in BAD]


def test_flatten_drops_records_that_cannot_be_iterated(backend_options):
    items: list[Any] = [[1, 2], [3], 7, [4, 5], None, [6]]
    stream = sp.from_iterable(items).flatten().set_processing(task_size=2, on_error="skip")
    assert same_as_simple(stream, **backend_options) == [1, 2, 3, 4, 5, 6]


def test_output_is_the_stream_over_the_input_without_the_bad_records(backend_options):
    """Downstream batches (their composition shows) are those of the clean input's stream."""

    def pipeline(source: sp.Stream, first: Any) -> sp.Stream:
        return source.map(first).map(lambda x: x * 10).map_batches(batch_as_record, batch_size=3)

    bad_stream = pipeline(sp.from_iterable(range(40)), RaisesAtAny(BAD)).set_processing(task_size=8, on_error="skip")
    # The clean input's tasks hold the same records as the bad input's tasks minus the bad ones.
    expected = []
    for start in range(0, 40, 8):
        task = [x for x in range(start, start + 8) if x not in BAD]
        expected += run(pipeline(sp.from_iterable(task), identity).set_processing(backend="simple"))
    outputs = run(bad_stream, **backend_options)
    assert_outputs(outputs, expected, backend_options)
    assert [x for batch in expected for x in batch] == [x * 10 for x in range(40) if x not in BAD]


def test_raise_is_todays_code_path():
    """``on_error="raise"``: no policy object, no errors or counts on the outputs."""
    stream = sp.from_iterable(range(10)).map(identity).set_processing(task_size=4)
    plan = build_plan(stream)
    ctx = ExecutionContext()
    outputs = list(run_task(plan, Task(0, next(iter(plan.source.iter_tasks(plan.task_size)))), ctx))
    assert ctx.error_policy is None
    assert [(o.chunk, o.errors, o.stats) for o in outputs] == [([0, 1, 2, 3], (), None)]
    _, exc = collect_until_error(sp.from_iterable(range(10)).map(fn_raises(at=3)))
    assert type(exc) is UserError


def test_skip_reports_errors_and_records_in_with_the_outputs():
    stream = sp.from_iterable(range(10)).map(RaisesAtAny((1, 2))).set_processing(task_size=4, on_error="skip")
    for max_errors, stats in [(None, None), (5, None), (0.5, {"records_in": 4})]:
        plan = build_plan(stream.set_processing(max_errors=max_errors))
        payload = next(iter(plan.source.iter_tasks(plan.task_size)))
        outputs = list(run_task(plan, Task(0, payload, key=5), ExecutionContext()))
        [output] = outputs
        assert output.chunk == [0, 3] and output.last
        assert [(e.task, e.stage, e.error_type, e.record) for e in output.errors] == [
            (5, "stage 1 (map(raises_at_any))", "UserError", "1"),
            (5, "stage 1 (map(raises_at_any))", "UserError", "2"),
        ]
        # Records in: only for a fractional max_errors, the one reader of the count.
        assert (output.stats.extra if output.stats is not None else None) == stats


def test_engine_errors_are_not_skipped(backend_options):
    """A failing source is not a record's fault: it stops the run under every policy."""
    from tests.utils import CountingSource

    stream = sp.from_iterable(CountingSource(range(20), fail_after=10)).map(identity)
    _, exc = run_guarded(
        lambda: collect_until_error(stream.set_processing(on_error="skip", task_size=4, **backend_options)), RUN_TIMEOUT_S
    )
    assert type(exc) is UserError and "source failed after 10 items" in str(exc)


# -- map_batches: bisection -----------------------------------------------------------------------


def batch_or_raise(batch: list[int]) -> list[list[int]]:
    if 13 in batch or 40 in batch:
        raise UserError(f"batch {batch} holds a bad record")
    return [list(batch)]


def test_failing_batch_is_split_until_only_the_bad_record_is_dropped(backend_options):
    stream = sp.from_iterable(range(48)).map_batches(batch_or_raise, batch_size=8).set_processing(task_size=24, on_error="skip")
    outputs = same_as_simple(stream, **backend_options)
    assert outputs == [
        list(range(0, 8)),  # never failed: its composition (and bits) are unchanged
        list(range(8, 12)),  # [8..15] failed: halves [8..11] ok, [12..15] failed
        [12],  # [12, 13] failed: [12] ok, [13] dropped
        [14, 15],
        list(range(16, 24)),
        list(range(24, 32)),
        list(range(32, 40)),
        # [40..47] failed: [40..43] failed -> [40, 41] failed -> [40] dropped, [41] ok; [42, 43]; [44..47]
        [41],
        [42, 43],
        list(range(44, 48)),
    ]


def test_batch_whose_every_record_fails_is_dropped_whole(backend_options):
    stream = sp.from_iterable(range(10)).map_batches(RaisesAtAny(tuple(range(4, 8))), batch_size=4)
    outputs = same_as_simple(stream.set_processing(on_error="skip"), **backend_options)
    assert outputs == [0, 1, 2, 3, 8, 9]


# -- map_gpu: prepare_batch, forward, postprocess ---------------------------------------------------


def to_tensor(records: list[int]) -> Any:
    import torch

    return torch.tensor(records, dtype=torch.float64)


def halve(batch: Any) -> Any:
    return batch / 2


def as_floats(records: list[int], outputs: Any) -> list[float]:
    return [float(v) for v in outputs]


class ForwardRaisesAt:
    """A forward that raises ``error(message)`` on a batch holding ``at`` (a tensor's value)."""

    def __init__(self, at: int, error: type[Exception] = UserError, message: str = "bad batch") -> None:
        self.at = at
        self.error = error
        self.message = message
        self.__name__ = "forward_raises_at"

    def __call__(self, batch: Any) -> Any:
        if bool((batch == self.at).any()):
            raise self.error(self.message)
        return batch / 2


class ForwardOOMAbove:
    """A forward that raises an out-of-memory error for batches of more than ``limit`` records."""

    def __init__(self, limit: int, cuda_class: bool) -> None:
        self.limit = limit
        self.cuda_class = cuda_class
        self.__name__ = "forward_oom_above"

    def __call__(self, batch: Any) -> Any:
        import torch

        if len(batch) > self.limit:
            if self.cuda_class:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
            raise RuntimeError("CUDA error: out of memory")
        return batch / 2


MAP_GPU_PARTS = {
    "prepare_batch": lambda: (fn_raises(at=13, fn=to_tensor), halve, as_floats),
    "forward": lambda: (to_tensor, ForwardRaisesAt(13), as_floats),
    "postprocess": lambda: (to_tensor, halve, fn_raises(at=13, fn=as_floats)),
}


@pytest.mark.parametrize("part", MAP_GPU_PARTS)
def test_map_gpu_drops_the_record_that_fails_alone(backend_options, part):
    pytest.importorskip("torch")
    stream = sp.from_iterable(range(32)).map_gpu(*MAP_GPU_PARTS[part](), batch_size=8)
    outputs = same_as_simple(stream.set_processing(task_size=16, on_error="skip"), **backend_options)
    assert outputs == [x / 2 for x in range(32) if x != 13]


GPU_WORKERS = {"backend": "multiprocessing", "num_cpu_workers": 2, "num_gpu_workers": 1, "gpu_worker_devices": ["cpu"]}


class RecordingForward:
    """A forward that raises on a batch holding 13 and returns the batch's size with each row."""

    __name__ = "recording_forward"

    def __call__(self, batch: Any) -> Any:
        import torch

        if bool((batch == 13).any()):
            raise UserError("bad batch")
        return torch.stack([batch, torch.full_like(batch, len(batch))], dim=1)


def value_and_batch_size(records: list[int], outputs: Any) -> list[tuple[float, int]]:
    return [(float(row[0]), int(row[1])) for row in outputs]


@pytest.mark.parametrize("method", [None, "spawn"], ids=["default-method", "spawn"])
def test_forward_error_in_a_gpu_worker_is_split_and_retried_there(method):
    """The halves are new batches sent to the GPU worker, which survives the errors."""
    pytest.importorskip("torch")
    stream = sp.from_iterable(range(48)).map_gpu(to_tensor, RecordingForward(), value_and_batch_size, batch_size=8)
    stream = stream.set_processing(task_size=16, on_error="skip")
    outputs = run(stream, **GPU_WORKERS, process_start_method=method)
    expected_sizes = {x: 8 for x in range(48)}
    expected_sizes.update({8: 4, 9: 4, 10: 4, 11: 4, 12: 1, 14: 2, 15: 2})
    assert outputs == [(float(x), expected_sizes[x]) for x in range(48) if x != 13]
    assert_records_equal(outputs, run(stream, backend="simple"))


def test_every_batch_failing_in_a_gpu_worker_keeps_the_worker_alive():
    pytest.importorskip("torch")
    bad = tuple(range(0, 40, 3))
    stream = sp.from_iterable(range(40)).map_gpu(to_tensor, RaisesAtTensor(bad), as_floats, batch_size=4)
    outputs = run(stream.set_processing(task_size=8, on_error="skip"), **GPU_WORKERS)
    assert outputs == [x / 2 for x in range(40) if x not in bad]


class RaisesAtTensor:
    def __init__(self, bad: tuple[int, ...]) -> None:
        self.bad = bad
        self.__name__ = "raises_at_tensor"

    def __call__(self, batch: Any) -> Any:
        if any(bool((batch == b).any()) for b in self.bad):
            raise ValueError("bad value in batch")
        return batch / 2


@pytest.mark.parametrize("cuda_class", [True, False], ids=["OutOfMemoryError", "RuntimeError"])
def test_out_of_memory_batches_degrade_to_smaller_ones(backend_options, cuda_class):
    """A batch too large for the device is split until it fits: no record is lost."""
    pytest.importorskip("torch")
    stream = sp.from_iterable(range(20)).map_gpu(to_tensor, ForwardOOMAbove(3, cuda_class), as_floats, batch_size=8)

    def go() -> tuple[list[Any], list[warnings.WarningMessage]]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            outputs = stream.set_processing(on_error="skip", **backend_options).to_list()
        return outputs, list(caught)

    outputs, caught = run_guarded(go, RUN_TIMEOUT_S)
    assert outputs == [x / 2 for x in range(20)]
    assert not [w for w in caught if issubclass(w.category, sp.RecordsSkippedWarning)]


def test_out_of_memory_still_raises_with_on_error_raise():
    torch = pytest.importorskip("torch")
    stream = sp.from_iterable(range(20)).map_gpu(to_tensor, ForwardOOMAbove(3, True), as_floats, batch_size=8)
    _, exc = collect_until_error(stream)
    assert type(exc) is torch.cuda.OutOfMemoryError


class LinearForward:
    """A float32 linear layer (rows independent, as in inference), raising on a batch holding ``bad``."""

    def __init__(self, bad: Any) -> None:
        import torch

        torch.manual_seed(0)
        self.bad = bad
        self.model = torch.nn.Linear(4, 3)
        self.__name__ = "linear_forward"

    def __call__(self, batch: Any) -> Any:
        if self.bad is not None and bool((batch[:, 0] == self.bad).any()):
            raise UserError("bad")
        return self.model(batch)


def features(records: list[int]) -> Any:
    import torch

    return torch.tensor([[x, x / 2, x / 3, 1.0] for x in records], dtype=torch.float32)


def rows(records: list[int], outputs: Any) -> list[Any]:
    return list(outputs.numpy())


def test_survivors_of_a_split_batch_are_equal_within_float_tolerance(backend_options):
    """Survivors: ``torch.testing.assert_close`` (float32: rtol 1.3e-6, atol 1e-5); batches that
    never failed: bit-identical."""
    torch = pytest.importorskip("torch")
    stream = sp.from_iterable(range(32)).map_gpu(features, LinearForward(13), rows, batch_size=8)
    outputs = same_as_simple(stream.set_processing(on_error="skip", task_size=16), **backend_options)
    clean = run(sp.from_iterable(range(32)).map_gpu(features, LinearForward(None), rows, batch_size=8))
    survivors = [x for x in range(32) if x != 13]
    assert len(outputs) == len(survivors)
    for x, got in zip(survivors, outputs):
        if 8 <= x < 16:  # the split batch
            torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(clean[x]))
        else:
            assert got.tobytes() == clean[x].tobytes(), x


@pytest.mark.parametrize("backend", ["multiprocessing", "threads"])
def test_non_deterministic_runs_drop_the_same_records(backend, tmp_path):
    """deterministic=False: the same multiset of outputs, the same dead letters per task."""
    stream = sp.from_iterable(range(60)).map(RaisesAtAny(BAD)).map_batches(bad_batch_of_fifty, batch_size=4)
    options = {"task_size": 6, "on_error": "dead_letter"}
    expected = run(stream, backend="simple", dead_letter_path=str(tmp_path / "simple"), **options)
    outputs = run(
        stream,
        backend=backend,
        num_cpu_workers=3,
        deterministic=False,
        dead_letter_path=str(tmp_path / backend),
        **options,
    )
    assert_records_equal(outputs, expected, ordered=False)
    assert expected == [x for x in range(60) if x not in BAD and x != 50]
    import pyarrow.parquet as pq

    def rows(path: Any) -> dict[str, list[tuple[str, str]]]:
        return {p.name: [(r["record"], r["stage"]) for r in pq.read_table(p).to_pylist()] for p in sorted(path.iterdir())}

    assert rows(tmp_path / backend) == rows(tmp_path / "simple")
    assert list(rows(tmp_path / "simple")) == [
        "dead-00000000.parquet",
        "dead-00000002.parquet",
        "dead-00000004.parquet",
        "dead-00000008.parquet",
    ]


def bad_batch_of_fifty(batch: list[int]) -> list[int]:
    if 50 in batch:
        raise ValueError("fifty")
    return batch


def tensor_with_junk_at_13(records: list[int]) -> Any:
    """A prepared batch that cannot be pickled (a generator in it) when it holds record 13."""
    batch: dict[str, Any] = {"x": to_tensor(records)}
    if 13 in records:
        batch["junk"] = (x for x in records)
    return batch


def rows_with_batch_size(batch: dict[str, Any]) -> Any:
    import torch

    x = batch["x"]
    return torch.stack([x, torch.full_like(x, len(x))], dim=1)


def test_batch_that_cannot_be_sent_to_a_gpu_worker_is_isolated_the_others_kept_whole():
    """The send fails in the CPU worker while other batches are in flight: those are retried
    whole (same composition), and only record 13 is dropped."""
    pytest.importorskip("torch")
    stream = sp.from_iterable(range(48)).map_gpu(tensor_with_junk_at_13, rows_with_batch_size, value_and_batch_size, batch_size=4)
    outputs = run(stream.set_processing(task_size=48, on_error="skip"), **GPU_WORKERS)
    sizes = {x: 4 for x in range(48)}
    sizes.update({12: 1, 14: 2, 15: 2})  # [12..15] -> [12, 13] -> [12] ok, [13] dropped; [14, 15] ok
    assert outputs == [(float(x), sizes[x]) for x in range(48) if x != 13]
