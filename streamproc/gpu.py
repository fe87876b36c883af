"""Deep-learning helpers: device moves, model discovery, in-process forward, output splitting.

torch is imported inside functions only: streams without a ``map_gpu`` stage never import it.
:class:`LocalForwardRunner` runs in whatever process calls it: the main process (simple
backend), a CPU worker without GPU workers, or a GPU worker.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator
from typing import Any, Optional

from .errors import add_context_note

#: How deep to look through closures, attributes and containers for ``torch.nn.Module``s.
MODULE_SEARCH_DEPTH = 3


def default_device() -> str:
    """``"cuda"`` when a CUDA device is usable here, else ``"cpu"``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def map_tensors(obj: Any, fn: Callable[[Any], Any]) -> Any:
    """Applies ``fn`` to every tensor (numpy arrays become tensors first) in a dict/list/tuple nesting."""
    import numpy as np
    import torch

    if isinstance(obj, np.ndarray) and obj.dtype != object:
        obj = torch.from_numpy(obj)
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(map_tensors(v, fn) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(v, fn) for v in obj)
    return obj


def to_device(obj: Any, device: Any, non_blocking: bool = False) -> Any:
    """Moves every tensor (and numpy array, as a tensor) in a dict/list/tuple nesting to ``device``."""
    return map_tensors(obj, lambda tensor: tensor.to(device, non_blocking=non_blocking))


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


class DeviceForward:
    """Runs one stage's ``forward`` on one device, under ``torch.inference_mode()``.

    Modules reachable from ``forward`` are moved to the device once (:meth:`start`) and put in
    eval mode. :meth:`upload` starts a batch's host-to-device copy (from pinned memory, on a
    side CUDA stream, so that it overlaps the forward of the batch before it);
    :meth:`compute` runs forward on an uploaded batch and returns the outputs on the CPU. It
    runs in the process that owns the device: the main process (simple backend), a CPU worker
    without GPU workers, or a GPU worker.

    Args:
        stage: the stage's name, for error messages (a CUDA out-of-memory error names it).
        batch_size: the stage's batch size, to suggest a smaller one on out-of-memory.
        torch_threads: torch's intra-op thread count while ``forward`` runs (restored after);
            None leaves it as it is.
    """

    def __init__(
        self,
        forward: Callable[[Any], Any],
        device: Optional[str] = None,
        autocast: Any = None,
        stage: str = "map_gpu stage",
        batch_size: Any = None,
        torch_threads: Optional[int] = None,
    ) -> None:
        self.forward = forward
        self.torch_threads = torch_threads
        self.device_name = device
        self.autocast = autocast
        self.stage = stage
        self.batch_size = batch_size
        self.started = False

    def start(self) -> None:
        """Picks the device and moves the models there (once)."""
        import torch

        self.device = torch.device(self.device_name or default_device())
        for module in find_modules(self.forward):
            module.to(self.device)
            module.eval()
        self.autocast_dtype = resolve_autocast(self.autocast, self.device.type)
        self.is_cuda = self.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(self.device) if self.is_cuda else None
        self.started = True

    def upload(self, batch: Any) -> tuple[Any, Any]:
        """Starts copying ``batch`` to the device; returns ``(on_device_batch, ready_event)``."""
        import torch

        if not self.started:
            self.start()
        if not self.is_cuda:
            return to_device(batch, self.device), None
        with torch.cuda.stream(self.copy_stream):
            on_device = to_device(_pinned(batch), self.device, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self.copy_stream)
        return on_device, ready

    def compute(self, uploaded: tuple[Any, Any]) -> Any:
        """Runs forward on an uploaded batch; returns the outputs on the CPU."""
        import torch

        on_device, ready = uploaded
        threads_before = torch.get_num_threads()
        try:
            if self.torch_threads is not None and threads_before != self.torch_threads:
                torch.set_num_threads(self.torch_threads)
            if ready is not None:
                torch.cuda.current_stream(self.device).wait_event(ready)
            with torch.inference_mode():
                if self.autocast_dtype is not None:
                    with torch.autocast(self.device.type, dtype=self.autocast_dtype):
                        outputs = self.forward(on_device)
                else:
                    outputs = self.forward(on_device)
            return to_device(outputs, "cpu")
        except torch.cuda.OutOfMemoryError as exc:
            size = f" (now {self.batch_size})" if self.batch_size is not None else ""
            add_context_note(
                exc,
                f"streamproc: CUDA ran out of memory in {self.stage} on {self.device}: "
                f"try a smaller batch_size{size} for this map_gpu stage, or autocast=True",
            )
            raise
        finally:
            if torch.get_num_threads() != threads_before:
                torch.set_num_threads(threads_before)

    def forward_batch(self, batch: Any) -> Any:
        """Upload, then compute: the outputs of ``forward(batch)`` on the CPU."""
        return self.compute(self.upload(batch))


class LocalForwardRunner:
    """Runs a stage's forward in this process, batch after batch (see :class:`DeviceForward`)."""

    def __init__(self, device_forward: DeviceForward) -> None:
        self.device_forward = device_forward

    def run(self, batches: Iterator[tuple[list[Any], Any]]) -> Iterator[tuple[list[Any], Any]]:
        forward_batch = self.device_forward.forward_batch
        for records, batch in batches:
            yield records, forward_batch(batch)


def _pinned(obj: Any) -> Any:
    """``obj`` with its CPU tensors copied to pinned memory (enables asynchronous copies)."""
    return map_tensors(obj, lambda t: t if t.is_pinned() or t.device.type != "cpu" else t.pin_memory())


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
