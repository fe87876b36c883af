"""Deep-learning helpers: device moves, model discovery, in-process forward, output splitting.

torch is imported inside functions only: streams without a ``map_gpu`` stage never import it.
:class:`LocalForwardRunner` runs in whatever process calls it: the main process (simple
backend), a CPU worker without GPU workers, or a GPU worker.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from typing import Any, Callable, Optional

#: How deep to look through closures, attributes and containers for ``torch.nn.Module``s.
MODULE_SEARCH_DEPTH = 3


def default_device() -> str:
    """``"cuda"`` when a CUDA device is usable here, else ``"cpu"``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def to_device(obj: Any, device: Any, non_blocking: bool = False) -> Any:
    """Moves every tensor (and numpy array, as a tensor) in a dict/list/tuple nesting to ``device``."""
    import numpy as np
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=non_blocking)
    if isinstance(obj, np.ndarray) and obj.dtype != object:
        return torch.from_numpy(obj).to(device, non_blocking=non_blocking)
    if isinstance(obj, dict):
        return {k: to_device(v, device, non_blocking) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(to_device(v, device, non_blocking) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device, non_blocking) for v in obj)
    return obj


def find_modules(obj: Any, depth: int = MODULE_SEARCH_DEPTH) -> list[Any]:
    """Finds the ``torch.nn.Module``s reachable from a callable.

    Looks at the object itself, a bound method's ``__self__``, a function's closure cells and
    the globals its code names, ``functools.partial`` arguments, and the attributes of
    callable objects, ``depth`` levels deep.
    """
    import functools

    import torch

    found: dict[int, Any] = {}
    seen: set[int] = set()

    def visit(value: Any, level: int) -> None:
        if id(value) in seen or level < 0:
            return
        seen.add(id(value))
        if isinstance(value, torch.nn.Module):
            found.setdefault(id(value), value)
            return
        if isinstance(value, types.MethodType):
            visit(value.__self__, level)
            visit(value.__func__, level)
        elif isinstance(value, types.FunctionType):
            for cell in value.__closure__ or ():
                try:
                    visit(cell.cell_contents, level - 1)
                except ValueError:  # empty cell
                    pass
            for name in value.__code__.co_names:
                if name in value.__globals__:
                    visit(value.__globals__[name], level - 1)
        elif isinstance(value, functools.partial):
            visit(value.func, level)
            for arg in (*value.args, *value.keywords.values()):
                visit(arg, level - 1)
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item, level - 1)
        elif isinstance(value, dict):
            for item in value.values():
                visit(item, level - 1)
        elif not isinstance(value, (type, types.ModuleType)) and hasattr(value, "__dict__"):
            for item in vars(value).values():
                visit(item, level - 1)

    visit(obj, depth)
    return list(found.values())


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


class LocalForwardRunner:
    """Runs ``forward`` in this process on ``device``, under ``torch.inference_mode()``.

    Modules reachable from ``forward`` are moved to the device once, on the first batch, and
    put in eval mode. Outputs are returned on the CPU.
    """

    def __init__(self, forward: Callable[[Any], Any], device: Optional[str] = None, autocast: Any = None) -> None:
        self.forward = forward
        self.device_name = device
        self.autocast = autocast
        self._started = False

    def start(self) -> None:
        """Picks the device and moves the models there (once)."""
        import torch

        self.device = torch.device(self.device_name or default_device())
        for module in find_modules(self.forward):
            module.to(self.device)
            module.eval()
        self.autocast_dtype = resolve_autocast(self.autocast, self.device.type)
        self._started = True

    def forward_batch(self, batch: Any) -> Any:
        """Moves ``batch`` to the device, runs forward, and returns the outputs on the CPU."""
        import torch

        if not self._started:
            self.start()
        on_device = to_device(batch, self.device, non_blocking=self.device.type == "cuda")
        with torch.inference_mode():
            if self.autocast_dtype is not None:
                with torch.autocast(self.device.type, dtype=self.autocast_dtype):
                    outputs = self.forward(on_device)
            else:
                outputs = self.forward(on_device)
        return to_device(outputs, "cpu")

    def run(self, batches: Iterator[tuple[list[Any], Any]]) -> Iterator[tuple[list[Any], Any]]:
        for records, batch in batches:
            yield records, self.forward_batch(batch)


def _to_numpy(value: Any) -> Any:
    if hasattr(value, "detach") and hasattr(value, "numpy"):  # torch.Tensor, without importing torch
        value = value.detach()
        if value.dtype.is_floating_point and value.dtype.itemsize < 4:  # bf16/fp16 have no numpy twin everywhere
            value = value.float()
        return value.numpy()
    return value


def split_rows(outputs: Any) -> list[Any]:
    """Splits batched outputs into one row per record (tensors become numpy arrays).

    >>> import numpy as np
    >>> split_rows({"a": np.array([1, 2]), "b": np.array([3, 4])})
    [{'a': 1, 'b': 3}, {'a': 2, 'b': 4}]
    """
    if isinstance(outputs, dict):
        columns = {k: split_rows(v) for k, v in outputs.items()}
        lengths = {len(v) for v in columns.values()}
        if len(lengths) > 1:
            raise ValueError(f"forward outputs have different lengths per key: { {k: len(v) for k, v in columns.items()} }")
        return [dict(zip(columns, row)) for row in zip(*columns.values())]
    if isinstance(outputs, tuple):
        return list(zip(*(split_rows(v) for v in outputs)))
    array = _to_numpy(outputs)
    if hasattr(array, "tolist") and getattr(array, "ndim", 1) == 1:
        return array.tolist()
    return list(array)
