"""Moving batches between host and device, autocast, and splitting outputs into rows.

torch is imported inside functions only: streams without a ``map_gpu`` stage never import it.
These helpers run wherever a batch is: :func:`to_device` and :func:`_pinned` in the process
that owns the device (the main process with the simple backend, a CPU worker without GPU
workers, or a GPU worker); :func:`split_rows` in the CPU worker (or main process) that runs
``postprocess``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional


def default_device() -> str:
    """``"cuda"`` when a CUDA device is usable here (``"cuda:{LOCAL_RANK}"`` under torchrun, the
    rank's own device), else ``"cpu"``."""
    import torch

    from ..execution.sharding import torchrun_local_device

    if not torch.cuda.is_available():
        return "cpu"
    return torchrun_local_device() or "cuda"


def map_tensors(obj: Any, fn: Callable[[Any], Any], from_numpy: bool = True) -> Any:
    """Applies ``fn`` to every tensor in a dict/list/tuple nesting; numpy arrays become tensors
    first unless ``from_numpy=False`` (then they, like every other leaf, are left as they are)."""
    import numpy as np
    import torch

    if from_numpy and isinstance(obj, np.ndarray) and obj.dtype != object:
        obj = torch.from_numpy(obj)
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn, from_numpy) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(map_tensors(v, fn, from_numpy) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(v, fn, from_numpy) for v in obj)
    return obj


def to_device(obj: Any, device: Any, non_blocking: bool = False) -> Any:
    """Moves every tensor (and numpy array, as a tensor) in a dict/list/tuple nesting to ``device``."""
    return map_tensors(obj, lambda tensor: tensor.to(device, non_blocking=non_blocking))


def _pinned(obj: Any) -> Any:
    """``obj`` with its CPU tensors copied to pinned memory (enables asynchronous copies)."""
    return map_tensors(obj, lambda t: t if t.is_pinned() or t.device.type != "cpu" else t.pin_memory())


def resolve_autocast(autocast: Any, device_type: str) -> Optional[Any]:
    """The torch dtype to autocast to, or None for no autocast."""
    import torch

    if autocast is None or autocast is False:
        return None
    if autocast is True:
        return torch.float16 if device_type == "cuda" else torch.bfloat16
    if isinstance(autocast, str):
        return getattr(torch, autocast)
    return autocast


def _to_numpy(value: Any) -> Any:
    if hasattr(value, "detach") and hasattr(value, "numpy"):  # torch.Tensor, without importing torch
        value = value.detach()
        if value.dtype.is_floating_point and value.dtype.itemsize < 4:  # bf16/fp16 have no numpy twin everywhere
            value = value.float()
        return value.numpy()
    return value


def split_rows(outputs: Any) -> list[Any]:
    """Splits batched outputs into one row per record (tensors become numpy arrays).

    Runs where ``postprocess`` runs (a CPU worker, or the main process with the simple backend).
    A dict of outputs gives one dict per record, a tuple one tuple per record; a 1-d tensor or
    array gives Python scalars, a list its items.

    >>> import numpy as np
    >>> split_rows({"a": np.array([1, 2]), "b": np.array([3, 4])})
    [{'a': 1, 'b': 3}, {'a': 2, 'b': 4}]

    Raises:
        ValueError: an output has no rows to split: a 0-d tensor or array, or a Python scalar
            (``forward`` reduced the batch, e.g. to a loss); or the values of a dict have
            different lengths. It is an :class:`UnsplittableOutputError`, whose ``what``
            lets :func:`streamproc.ops.default_postprocess` name the batch's size too.
    """
    return _split_rows(outputs, "")


class UnsplittableOutputError(ValueError):
    """Outputs of ``forward`` that :func:`split_rows` cannot split into one row per record.

    ``what`` completes "forward returned ...", e.g. "a 0-d output (a float32 scalar)".
    """

    def __init__(self, what: str) -> None:
        super().__init__(f"forward returned {what}: it has no rows to split")
        self.what = what


def _split_rows(outputs: Any, where: str) -> list[Any]:
    """:func:`split_rows` of ``outputs``, found at ``where`` in forward's outputs (for messages)."""
    if isinstance(outputs, dict):
        columns = {k: _split_rows(v, f"{where}[{k!r}]") for k, v in outputs.items()}
        lengths = {k: len(v) for k, v in columns.items()}
        if len(set(lengths.values())) > 1:
            raise UnsplittableOutputError(f"outputs{where} of different lengths per key {lengths}")
        return [dict(zip(columns, row)) for row in zip(*columns.values())]
    if isinstance(outputs, tuple):
        return list(zip(*(_split_rows(v, f"{where}[{i}]") for i, v in enumerate(outputs))))
    array = _to_numpy(outputs)
    ndim = getattr(array, "ndim", None)
    if ndim == 0 or (ndim is None and (array is None or isinstance(array, (bool, int, float, complex, str, bytes)))):
        # Iterating a 0-d array raises a bare TypeError ("iteration over a 0-d array").
        kind = f"dtype {array.dtype}" if ndim == 0 else "None" if array is None else f"{type(array).__name__} {array!r:.40}"
        at = f" as outputs{where}" if where else ""
        raise UnsplittableOutputError(f"a 0-d output ({kind}){at}")
    if ndim == 1:
        return array.tolist()
    return list(array)
