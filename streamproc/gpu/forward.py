"""Running a stage's ``forward`` on one device, under ``torch.inference_mode()``.

torch is imported inside functions only. :class:`LocalForwardRunner` runs in whatever process
calls it: the main process (simple backend), a CPU worker without GPU workers, or a GPU worker.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Optional

from ..errors import add_context_note
from .device import _pinned, default_device, resolve_autocast, to_device
from .models import find_modules
from .placement import DeviceSpec, PlaceHook, Placement, first_device, group_devices, place_modules

if TYPE_CHECKING:
    from ..plan import Stage


class DeviceForward:
    """Runs one stage's ``forward`` on one device, under ``torch.inference_mode()``.

    Modules reachable from ``forward`` are moved to the device once (:meth:`start`) and put in
    eval mode; a ``forward`` given as a class (:class:`~streamproc.ops.WorkerClass`) is
    constructed there first, so its modules are found on the instance. :meth:`upload` starts a
    batch's host-to-device copy (from pinned memory, on a side CUDA stream, so that it overlaps
    the forward of the batch before it);
    :meth:`compute` runs forward on an uploaded batch and returns the outputs on the CPU. It
    runs in the process that owns the device: the main process (simple backend), a CPU worker
    without GPU workers, or a GPU worker.

    Args:
        stage: the stage's name, for error messages (a CUDA out-of-memory error names it).
        batch_size: the stage's batch size, to suggest a smaller one on out-of-memory.
        torch_threads: torch's intra-op thread count while ``forward`` runs (restored after);
            None leaves it as it is.
        device: a device name, or a group of them (model parallel: the models are split over
            the group by :func:`~streamproc.gpu.placement.place_modules`; inputs go to its first
            device); with ``place`` (the stage's ``place=`` hook) the hook places the models.
    """

    def __init__(
        self,
        forward: Callable[[Any], Any],
        device: Optional[DeviceSpec] = None,
        autocast: Any = None,
        stage: str = "map_gpu stage",
        batch_size: Any = None,
        torch_threads: Optional[int] = None,
        place: Optional[PlaceHook] = None,
    ) -> None:
        self.forward = forward
        self.torch_threads = torch_threads
        self.device_name = device
        self.autocast = autocast
        self.stage = stage
        self.batch_size = batch_size
        self.started = False
        # Seconds and batches of this runner, for the GPU worker's stats (read at its end).
        # On CUDA the copy to the device is asynchronous: h2d_seconds is the host's time to
        # pin and issue it; forward_seconds waits for the kernels (a stream synchronize that
        # the copy back would do anyway), so d2h_seconds is the copy back alone.
        self.h2d_seconds = 0.0
        self.forward_seconds = 0.0
        self.d2h_seconds = 0.0
        self.batches = 0
        self.place = place
        #: Where each model's parts went (device groups and ``place=`` only), set by :meth:`start`.
        self.placements: list[Placement] = []

    def start(self) -> None:
        """Picks the device and moves the models there (once)."""
        import torch

        from ..ops import WorkerClass

        spec = self.device_name or default_device()
        self.device = torch.device(first_device(spec))
        if isinstance(self.forward, WorkerClass):
            self.forward = self.forward.build(f"{self.stage}, forward")
        if isinstance(spec, tuple) or self.place is not None:
            self.placements = place_modules(find_modules(self.forward), spec, self.stage, self.place)
        else:
            for module in find_modules(self.forward):
                module.to(self.device)
                module.eval()
        self.autocast_dtype = resolve_autocast(self.autocast, self.device.type)
        self.is_cuda = self.device.type == "cuda"
        self.cuda_devices = [d for d in map(torch.device, group_devices(spec)) if d.type == "cuda"]
        self.copy_stream = torch.cuda.Stream(self.device) if self.is_cuda else None
        self.started = True

    def upload(self, batch: Any) -> tuple[Any, Any]:
        """Starts copying ``batch`` to the device; returns ``(on_device_batch, ready_event)``."""
        import torch

        if not self.started:
            self.start()
        start = time.perf_counter()
        try:
            if not self.is_cuda:
                return to_device(batch, self.device), None
            with torch.cuda.stream(self.copy_stream):
                on_device = to_device(_pinned(batch), self.device, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record(self.copy_stream)
            return on_device, ready
        finally:
            self.h2d_seconds += time.perf_counter() - start

    def compute(self, uploaded: tuple[Any, Any]) -> Any:
        """Runs forward on an uploaded batch; returns the outputs on the CPU."""
        import torch

        on_device, ready = uploaded
        threads_before = torch.get_num_threads()
        try:
            if self.torch_threads is not None and threads_before != self.torch_threads:
                torch.set_num_threads(self.torch_threads)
            start = time.perf_counter()
            if ready is not None:
                torch.cuda.current_stream(self.device).wait_event(ready)
            with torch.inference_mode():
                if self.autocast_dtype is not None:
                    with torch.autocast(self.device.type, dtype=self.autocast_dtype):
                        outputs = self.forward(on_device)
                else:
                    outputs = self.forward(on_device)
            for device in self.cuda_devices:  # every device of a group computed a part
                torch.cuda.current_stream(device).synchronize()
            computed = time.perf_counter()
            self.forward_seconds += computed - start
            self.batches += 1
            on_host = to_device(outputs, "cpu")
            self.d2h_seconds += time.perf_counter() - computed
            return on_host
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


def shared_forward_runners(devices: Optional[Sequence[DeviceSpec]], autocast: Any) -> Callable[[Stage], LocalForwardRunner]:
    """A forward-runner factory for threads of one process: one :class:`DeviceForward` per stage.

    Models move to the device once, under a lock, in the first thread that needs them; each
    thread then runs ``forward`` itself (torch releases the GIL). As in the simple backend,
    forward runs on the first of ``devices``, else on CUDA, else on the CPU. torch's thread
    count is left alone (see :func:`set_torch_threads`).
    """
    lock = threading.Lock()
    forwards: dict[int, DeviceForward] = {}
    device = devices[0] if devices else None

    def runner(stage: Stage) -> LocalForwardRunner:
        with lock:
            if stage.index not in forwards:
                op: Any = stage.op
                forward = DeviceForward(op.forward, device, autocast, stage.name, op.batch_size, place=op.place)
                forward.start()
                forwards[stage.index] = forward
        return LocalForwardRunner(forwards[stage.index])

    return runner


def set_torch_threads(threads: Optional[int]) -> Callable[[], None]:
    """Sets torch's intra-op thread count (process-wide) to ``threads``; returns the undo.

    None leaves it as it is. Imports torch: call it for streams that run torch anyway.
    """
    if threads is None:
        return lambda: None
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    return lambda: torch.set_num_threads(before)
