"""map_gpu with a tiny torch model on the CPU: batching, outputs, postprocess, models, autocast.

Weights and inputs are small integers and halves, so every float result is exact whatever
the kernel or thread count: backends can be compared with ``==``.
"""

from __future__ import annotations

import numpy as np
import pytest

import streamproc as sp
from tests.utils import assert_records_equal, assert_same_as_simple, identity, runs_in_separate_processes

torch = pytest.importorskip("torch")


class TinyModel(torch.nn.Module):
    """y = W x + b with fixed weights; dropout that would scramble outputs if left in train mode.

    Counts the calls to ``.to()`` (``moves``), which streamproc uses to put it on the device.
    """

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 2)
        with torch.no_grad():
            self.linear.weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [0.0, 1.0, -1.0]]))
            self.linear.bias.copy_(torch.tensor([0.5, -2.0]))
        self.dropout = torch.nn.Dropout(p=0.5)
        self.moves = 0

    def to(self, *args, **kwargs):  # type: ignore[no-untyped-def, override]
        self.moves += 1
        return super().to(*args, **kwargs)

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.linear(self.dropout(x))


def expected_y(v: list[float]) -> list[float]:
    return [v[0] + 2 * v[1] + 3 * v[2] + 0.5, v[1] - v[2] - 2.0]


VECTORS = [[float(i), float(i % 3), float(-i)] for i in range(10)]


def stack_vectors(records: list[list[float]]):  # type: ignore[no-untyped-def]
    return torch.tensor(records, dtype=torch.float32)


def stack_ids(records: list[dict]):  # type: ignore[no-untyped-def]
    return torch.tensor([r["id"] for r in records])


def times_ten(batch):  # type: ignore[no-untyped-def]
    return batch * 10


def batch_ids_postprocess(records: list[dict], outputs) -> list[dict]:  # type: ignore[no-untyped-def]
    """One record per input, showing the batch it was in and the forward output."""
    ids = tuple(r["id"] for r in records)
    return [{"id": r["id"], "batch": ids, "y": int(y)} for r, y in zip(records, outputs.tolist())]


def test_default_postprocess_yields_numpy_rows(backend_options):
    model = TinyModel()
    stream = sp.from_iterable(VECTORS).map_gpu(stack_vectors, model, batch_size=4)
    rows = assert_same_as_simple(stream, **backend_options)
    assert len(rows) == len(VECTORS)
    for row, vector in zip(rows, VECTORS):
        assert isinstance(row, np.ndarray) and row.dtype == np.float32 and row.shape == (2,)
        assert row.tolist() == expected_y(vector)


def test_one_dimensional_outputs_give_python_scalars(backend_options):
    stream = sp.from_iterable([1.0, 2.0, 3.5]).map_gpu(torch.tensor, times_ten, batch_size=2)
    assert assert_same_as_simple(stream, **backend_options) == [10.0, 20.0, 35.0]


def dict_forward(batch):  # type: ignore[no-untyped-def]
    # numpy inputs from prepare_batch arrive as tensors on the device
    assert isinstance(batch["x"], torch.Tensor) and isinstance(batch["mask"], torch.Tensor)
    return {"sum": (batch["x"] * batch["mask"]).sum(dim=1), "first": batch["x"][:, 0]}


def prepare_dict(records: list[list[int]]) -> dict:
    return {"x": np.array(records, dtype=np.int64), "mask": torch.tensor([[1, 0, 1]] * len(records))}


def test_dict_inputs_and_outputs(backend_options):
    stream = sp.from_iterable([[1, 2, 3], [4, 5, 6], [7, 8, 9]]).map_gpu(prepare_dict, dict_forward, batch_size=2)
    assert assert_same_as_simple(stream, **backend_options) == [
        {"sum": 4, "first": 1},
        {"sum": 10, "first": 4},
        {"sum": 16, "first": 7},
    ]


def tuple_forward(batch):  # type: ignore[no-untyped-def]
    return batch + 1, batch * 2


def test_tuple_outputs_give_tuples(backend_options):
    stream = sp.from_iterable([1, 2, 3]).map_gpu(torch.tensor, tuple_forward)
    assert assert_same_as_simple(stream, **backend_options) == [(2, 2), (3, 4), (4, 6)]


def test_custom_postprocess_may_change_the_number_of_records(backend_options):
    def one_per_batch(records, outputs):  # type: ignore[no-untyped-def]
        return [{"n": len(records), "total": int(outputs.sum())}]

    stream = sp.from_iterable([{"id": i} for i in range(5)]).map_gpu(stack_ids, times_ten, one_per_batch, batch_size=2)
    assert assert_same_as_simple(stream, **backend_options) == [
        {"n": 2, "total": 10},
        {"n": 2, "total": 50},
        {"n": 1, "total": 40},
    ]


def test_default_postprocess_rejects_outputs_of_another_length(backend_options):
    stream = sp.from_iterable([1.0, 2.0, 3.0]).map_gpu(torch.tensor, lambda t: t.sum(dim=0, keepdim=True), batch_size=3)
    with pytest.raises(ValueError, match="pass a postprocess function"):
        stream.set_processing(**backend_options).to_list()


RECORDS = [{"id": i, "text": "x" * n} for i, n in enumerate([2, 3, 1, 4, 2, 1, 9, 1])]


@pytest.mark.parametrize(
    ("batch_size", "batch_by", "expected_batches"),
    [
        (3, None, [(0, 1, 2), (3, 4, 5), (6, 7)]),
        ("3", None, [(0, 1, 2), (3, 4, 5), (6, 7)]),
        ("3 records", None, [(0, 1, 2), (3, 4, 5), (6, 7)]),
        ("6 tokens", "text", [(0, 1, 2), (3, 4), (5,), (6,), (7,)]),
        ("6 tokens", lambda r: len(r["text"]), [(0, 1, 2), (3, 4), (5,), (6,), (7,)]),
        ("8 padded_tokens", "text", [(0, 1), (2, 3), (4, 5), (6,), (7,)]),
        ("8 padded_tokens", lambda r: len(r["text"]), [(0, 1), (2, 3), (4, 5), (6,), (7,)]),
    ],
    ids=["int", "str", "records", "tokens-field", "tokens-callable", "padded-field", "padded-callable"],
)
def test_batch_size_forms(backend_options, batch_size, batch_by, expected_batches):
    stream = sp.from_iterable(RECORDS).map_gpu(
        stack_ids, times_ten, batch_ids_postprocess, batch_size=batch_size, batch_by=batch_by
    )
    out = assert_same_as_simple(stream, **backend_options)
    assert [r["y"] for r in out] == [10 * i for i in range(8)]
    assert list(dict.fromkeys(r["batch"] for r in out)) == expected_batches


def test_set_processing_batch_size_is_the_default(backend_options):
    stream = (
        sp.from_iterable(RECORDS)
        .map_gpu(stack_ids, times_ten, batch_ids_postprocess)
        .set_processing(batch_size="6 tokens", batch_by="text")
    )
    out = assert_same_as_simple(stream, **backend_options)
    assert list(dict.fromkeys(r["batch"] for r in out)) == [(0, 1, 2), (3, 4), (5,), (6,), (7,)]


def test_batches_never_span_tasks(backend_options):
    stream = (
        sp.from_iterable(RECORDS).map_gpu(stack_ids, times_ten, batch_ids_postprocess, batch_size=3).set_processing(task_size=4)
    )
    out = assert_same_as_simple(stream, **backend_options)
    assert list(dict.fromkeys(r["batch"] for r in out)) == [(0, 1, 2), (3,), (4, 5, 6), (7,)]


class ModelState:
    """A forward (callable object holding the model) that reports the model's state per row."""

    def __init__(self) -> None:
        self.model = TinyModel()

    def __call__(self, batch):  # type: ignore[no-untyped-def]
        n = batch.shape[0]
        return {
            "y": self.model(batch),
            "training": torch.full((n,), self.model.training),
            "moves": torch.full((n,), self.model.moves),
            "inference_mode": torch.full((n,), torch.is_inference_mode_enabled()),
            "on_device": torch.full((n,), batch.device == self.model.linear.weight.device),
        }


def test_models_are_moved_once_and_put_in_eval_mode(backend_options):
    # One run per fresh model: a second run in this process would move the same model again.
    forward = ModelState()
    assert forward.model.training
    stream = sp.from_iterable(VECTORS).map_gpu(stack_vectors, forward, batch_size=3)  # 4 batches
    rows = stream.set_processing(**backend_options).to_list()
    for row, vector in zip(rows, VECTORS):
        assert row["y"].tolist() == expected_y(vector)  # dropout off: eval mode
        assert row["training"] is False
        assert row["moves"] == 1  # moved to the device once, before the first batch, not per batch
        assert row["inference_mode"] is True
        assert row["on_device"] is True
    if not runs_in_separate_processes(backend_options):  # this very model ran, not a copy
        assert not forward.model.training
        assert forward.model.moves == 1


def test_models_are_found_through_closures_and_bound_methods():
    model_in_closure, model_bound = TinyModel(), TinyModel()

    def closure_forward(batch):  # type: ignore[no-untyped-def]
        return model_in_closure(batch)

    for forward, model in [(closure_forward, model_in_closure), (model_bound.forward, model_bound)]:
        rows = sp.from_iterable(VECTORS).map_gpu(stack_vectors, forward).set_processing(backend="simple").to_list()
        assert [row.tolist() for row in rows] == [expected_y(v) for v in VECTORS]
        assert not model.training
        assert model.moves == 1


def test_forward_runs_on_the_named_device():
    forward = ModelState()
    stream = sp.from_iterable(VECTORS).map_gpu(stack_vectors, forward, batch_size=4)
    rows = stream.set_processing(backend="simple", gpu_worker_devices=["cpu"]).to_list()
    assert all(row["on_device"] and row["moves"] == 1 for row in rows)
    assert forward.model.linear.weight.device.type == "cpu"


def dtype_postprocess(records, outputs):  # type: ignore[no-untyped-def]
    return [str(outputs.dtype)] * len(records)


@pytest.mark.parametrize(
    ("autocast", "dtype"),
    [(None, "torch.float32"), (False, "torch.float32"), (True, "torch.bfloat16"), ("bfloat16", "torch.bfloat16")],
)
def test_autocast_on_cpu(backend_options, autocast, dtype):
    stream = sp.from_iterable(VECTORS).map_gpu(stack_vectors, TinyModel(), dtype_postprocess, batch_size=4)
    out = stream.set_processing(autocast=autocast, **backend_options).to_list()
    assert out == [dtype] * len(VECTORS)


def test_autocast_torch_dtype_and_default_postprocess(backend_options):
    stream = sp.from_iterable(VECTORS).map_gpu(stack_vectors, TinyModel(), batch_size=4).set_processing(autocast=torch.bfloat16)
    rows = assert_same_as_simple(stream, **backend_options)
    for row, vector in zip(rows, VECTORS):
        # bfloat16 has no numpy twin: rows come back as float32, values rounded to bfloat16
        assert row.dtype == np.float32
        np.testing.assert_allclose(row, expected_y(vector), rtol=1e-2, atol=0.1)


def test_map_gpu_between_cpu_ops(backend_options):
    stream = (
        sp.from_iterable(range(12))
        .map(lambda i: {"id": i})
        .map_gpu(stack_ids, times_ten, batch_ids_postprocess, batch_size=5)
        .filter(lambda r: r["y"] % 50 == 0)
        .map(lambda r: (r["id"], len(r["batch"])))
        .set_processing(task_size=6)
    )
    out = assert_same_as_simple(stream, **backend_options)
    # Tasks 0..5 and 6..11: batches (0-4) (5) (6-10) (11); the filter keeps ids 0, 5, 10.
    assert out == [(0, 5), (5, 1), (10, 5)]


def test_identity_forward_keeps_records_intact(backend_options):
    records = [{"id": i} for i in range(7)]
    stream = sp.from_iterable(records).map_gpu(stack_ids, identity, lambda recs, out: recs, batch_size=3)
    assert_records_equal(assert_same_as_simple(stream, **backend_options), records)


@pytest.mark.gpu
def test_forward_runs_on_cuda():
    forward = ModelState()
    stream = (
        sp.from_iterable(VECTORS)
        .map_gpu(stack_vectors, forward, batch_size=4)
        .set_processing(backend="simple", gpu_worker_devices=["cuda:0"])
    )
    rows = stream.to_list()
    assert all(row["on_device"] and row["moves"] == 1 for row in rows)
    assert forward.model.linear.weight.device.type == "cuda"
    assert [row["y"].tolist() for row in rows] == [expected_y(v) for v in VECTORS]
