"""Tensors in messages (execution/tensor_pickling.py): the raw-bytes path and torch's own, both exact."""

from __future__ import annotations

from typing import Any

import pytest

from streamproc.execution.serialization import _STD_PICKLE, dumps_message, loads_message

torch = pytest.importorskip("torch")


def round_trip(value: Any) -> Any:
    data = dumps_message({"value": value})
    assert data[:1] == _STD_PICKLE  # never the dill fallback
    return loads_message(data)["value"]


def same_tensor(back: Any, tensor: Any) -> None:
    assert type(back) is type(tensor)
    assert back.dtype == tensor.dtype and back.shape == tensor.shape and back.stride() == tensor.stride()
    assert back.requires_grad == tensor.requires_grad
    assert torch.equal(back.detach(), tensor.detach())


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int8, torch.uint8, torch.bool]
)
def test_a_contiguous_tensor_of_every_dtype_comes_back_equal_and_writable(dtype: Any) -> None:
    tensor = (torch.arange(24) % 7).to(dtype).reshape(2, 3, 4)
    back = round_trip(tensor)
    same_tensor(back, tensor)
    back[0, 0, 0] = back[1, 2, 3]  # writable: forward and postprocess may work in place


def test_a_scalar_tensor_and_an_empty_one() -> None:
    same_tensor(round_trip(torch.tensor(5)), torch.tensor(5))
    same_tensor(round_trip(torch.zeros(0, 8)), torch.zeros(0, 8))


def test_a_contiguous_slice_sends_its_own_elements_only() -> None:
    base = torch.arange(1_000_000, dtype=torch.float64)
    piece = base[10:20]
    same_tensor(round_trip(piece), piece)
    assert len(dumps_message(piece)) < 1_000  # not the 8 MB storage it is a view of


def test_what_the_raw_path_would_lose_keeps_torchs_pickling() -> None:
    transposed = torch.arange(12).reshape(3, 4).t()  # strides kept
    expanded = torch.arange(4).expand(3, 4)
    grad = torch.ones(3, requires_grad=True)
    parameter = torch.nn.Parameter(torch.ones(2, 2))
    conjugated = torch.ones(3, dtype=torch.complex64).conj()
    for tensor in (transposed, expanded, grad, parameter, conjugated):
        same_tensor(round_trip(tensor), tensor)


def test_nested_batches_with_other_leaves() -> None:
    batch = {"input_ids": torch.arange(6).reshape(2, 3), "mask": torch.ones(2, 3, dtype=torch.bool), "names": ["a", "b"]}
    back = round_trip([batch, (batch["input_ids"], 3)])
    same_tensor(back[0]["input_ids"], batch["input_ids"])
    same_tensor(back[0]["mask"], batch["mask"])
    assert back[0]["names"] == ["a", "b"] and back[1][1] == 3


class Registered:
    def __init__(self, value: int) -> None:
        self.value = value


def _rebuild_registered(value: int) -> Registered:
    return Registered(value + 1)  # marks that the registered reducer ran


def test_a_copyreg_reducer_registered_after_the_first_message_still_applies() -> None:
    import copyreg

    round_trip(torch.ones(2))  # the table exists now
    copyreg.pickle(Registered, lambda obj: (_rebuild_registered, (obj.value,)))
    try:
        assert round_trip(Registered(1)).value == 2
    finally:
        del copyreg.dispatch_table[Registered]
