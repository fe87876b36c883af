"""Running a stage's ``forward`` on one device, under ``torch.inference_mode()``.

torch is imported inside functions only. :class:`LocalForwardRunner` runs in whatever process
calls it: the main process (simple backend), a CPU worker without GPU workers, or a GPU worker.
The models go through the process's :class:`~streamproc.gpu.model_cache.ModelCache`, which
the stages of one process share (:class:`LocalForwardRunners`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Optional

from ..errors import add_context_note
from .device import _pinned, map_tensors, resolve_autocast, to_device
from .model_cache import ModelCache, ModelSet, ModelSettings
from .model_content import cast_weights
from .models import find_modules
from .placement import DeviceSpec, PlaceHook, Placement, describe_device_spec, first_device, group_devices, place_modules

if TYPE_CHECKING:
    from ..plan import Stage


class DeviceForward:
    """Runs one stage's ``forward`` on one device, under ``torch.inference_mode()``.

    Modules reachable from ``forward`` are registered in the process's model cache
    (:meth:`start`), moved to the device (cast to ``model_dtype``) and put in eval mode; a
    ``forward`` given as a class (:class:`~streamproc.ops.WorkerClass`) is constructed there
    first, so its modules are found on the instance. Without a memory budget they move once, at
    start; with one, :meth:`compute` loads them when they are not on the device (a swap).
    :meth:`upload` starts a batch's host-to-device copy (from pinned memory, on a side CUDA
    stream, so that it overlaps the forward of the batch before it); :meth:`compute` runs
    forward on an uploaded batch and returns the outputs on the CPU. It runs in the process
    that owns the device: the main process (simple backend), a CPU worker without GPU
    workers, or a GPU worker.

    Args:
        stage: the stage's name, for error messages (a CUDA out-of-memory error names it).
        batch_size: the stage's batch size, to suggest a smaller one on out-of-memory.
        torch_threads: torch's intra-op thread count while ``forward`` runs (restored after);
            None leaves it as it is.
        device: a device name, or a group of them (model parallel: the models are split over
            the group by :func:`~streamproc.gpu.placement.place_modules`; inputs go to its first
            device); with ``place`` (the stage's ``place=`` hook) the hook places the models.
        cache: the model cache of the process (shared by its stages); None: a cache of this
            runner's own on ``device``, without budget or dtype. A model that is split or
            placed (a device group, ``place=``) is cast to the model dtype but not cached: a
            memory budget does not apply to it (an error).

    Inputs under ``model_dtype``: floating-point tensors of a batch are cast to the weights'
    dtype at upload (a float32 input to a bfloat16 ``Linear`` would raise a dtype mismatch);
    integer and boolean tensors (token ids, masks) are left as they are.
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
        cache: Optional[ModelCache] = None,
    ) -> None:
        self.forward = forward
        self.cache = cache if cache is not None else ModelCache(first_device(device) if device else None)
        self.models: ModelSet = ()
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
        """Finds the models and moves them to the device (all of them, unless over a budget).

        Raises:
            ValueError: the stage's models alone exceed ``gpu_memory_budget`` (see
                :meth:`ModelCache.register`).
        """
        import torch

        from ..ops import WorkerClass

        self.device = self.cache.device  # a group's first device
        if isinstance(self.forward, WorkerClass):
            self.forward = self.forward.build(f"{self.stage}, forward")
        modules = find_modules(self.forward)
        spec = self.device_name or str(self.device)
        if isinstance(spec, tuple) or self.place is not None:
            if self.cache.budget is not None:
                raise ValueError(
                    f"{self.stage}: gpu_memory_budget does not apply to a model split across devices "
                    f"({describe_device_spec(spec)}) or placed by place=: drop one of them"
                )
            for module in modules:
                cast_weights(module, self.cache.weights_dtype)
            self.placements = place_modules(modules, spec, self.stage, self.place)
        else:
            self.models = self.cache.register(modules, self.stage)
            self.cache.preload(self.models)
        self.input_dtype = self.cache.weights_dtype
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
                return self._as_input(to_device(batch, self.device)), None
            with torch.cuda.stream(self.copy_stream):
                on_device = self._as_input(to_device(_pinned(batch), self.device, non_blocking=True))
                ready = torch.cuda.Event()
                ready.record(self.copy_stream)
            return on_device, ready
        finally:
            self.h2d_seconds += time.perf_counter() - start

    def _as_input(self, on_device: Any) -> Any:
        """``on_device`` with its floating-point tensors in the weights' dtype (``model_dtype``)."""
        dtype = self.input_dtype
        if dtype is None:
            return on_device
        return map_tensors(on_device, lambda t: t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t)

    def models_loaded(self) -> bool:
        """Whether this stage's models are on the device now (no swap needed to compute)."""
        return self.cache.is_loaded(self.models)

    def compute(self, uploaded: tuple[Any, Any]) -> Any:
        """Runs forward on an uploaded batch; returns the outputs on the CPU.

        Loads the stage's models first if they are not on the device (a swap, timed by the
        cache, not in ``forward_seconds``).
        """
        import torch

        on_device, ready = uploaded
        # Between two forwards every microsecond is device idle time (and this code runs right
        # after a wait on the device, with cold caches): the common case (no thread count to
        # set, outputs already on the CPU) skips what it does not need.
        threads = self.torch_threads
        threads_before = torch.get_num_threads() if threads is not None else None
        try:
            if threads is not None and threads_before != threads:
                torch.set_num_threads(threads)
            with self.cache.using(self.models):
                start = time.perf_counter()
                outputs = self._forward_on_device(on_device, ready)
            computed = time.perf_counter()
            self.forward_seconds += computed - start
            self.batches += 1
            if isinstance(outputs, torch.Tensor) and outputs.device.type == "cpu":
                return outputs  # nothing to copy back
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
            if threads_before is not None and torch.get_num_threads() != threads_before:
                torch.set_num_threads(threads_before)

    def _forward_on_device(self, on_device: Any, ready: Any) -> Any:
        import torch

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
        return outputs

    def forward_batch(self, batch: Any) -> Any:
        """Upload, then compute: the outputs of ``forward(batch)`` on the CPU."""
        return self.compute(self.upload(batch))


class LocalForwardRunner:
    """Runs a stage's forward in this process, batch after batch (see :class:`DeviceForward`).

    Runs in the main process (simple backend), a worker thread, or a CPU worker without GPU
    workers. Without a memory budget it streams: one batch in, its outputs out. With one, it
    runs a task's batches of its stage as one *phase*: it reads them all (which runs the
    upstream stages, their forwards included, to the end of the task), keeps its models on the
    device while it computes them all, then yields the outputs. So each phase loads its
    models at most once: **at most one swap per task and stage** in the process, however many
    threads share the cache (a thread holds its models only while it computes, and waits for
    room, holding none, while other threads compute). The price: a task's prepared batches
    and outputs of one stage are in memory at once (one task's worth; size tasks with
    ``task_size``).
    """

    def __init__(self, device_forward: DeviceForward) -> None:
        self.device_forward = device_forward

    def run(self, batches: Iterator[tuple[list[Any], Any]]) -> Iterator[tuple[list[Any], Any]]:
        forward = self.device_forward
        if forward.cache.budget is None:
            for records, batch in batches:
                yield records, forward.forward_batch(batch)
            return
        phase = list(batches)
        if not phase:
            return
        if not forward.started:
            forward.start()
        with forward.cache.using(forward.models):
            done = [(records, forward.forward_batch(batch)) for records, batch in phase]
        del phase
        yield from done


class PhasedForwardRunner:
    """Under a memory budget, a CPU worker's runner of one stage whose forward runs on GPU
    workers: it reads the task's batches of the stage before sending the first one.

    Runs in a CPU worker. So the GPU workers receive a task's batches stage after stage
    (phases), and serve each phase with one model load at most (see
    :class:`~streamproc.gpu.swap_schedule.RoundSchedule`). Same price as
    :class:`LocalForwardRunner` with a budget: one task's prepared batches of a stage in memory.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        #: Where forward runs, for the run's stats (``StageStats.forward_where``).
        self.location = getattr(inner, "location", None)

    def run(self, batches: Iterator[tuple[list[Any], Any]]) -> Iterator[tuple[list[Any], Any]]:
        yield from self.inner.run(iter(list(batches)))


def phased(runner: Any, settings: Optional[ModelSettings]) -> Any:
    """``runner`` as a :class:`PhasedForwardRunner` when ``settings`` set a memory budget."""
    if settings is None or settings.memory_budget is None:
        return runner
    return PhasedForwardRunner(runner)


class LocalForwardRunners:
    """The forward-runner factory of one process, or of the threads of one: one
    :class:`DeviceForward` per stage, every stage's models in one :class:`ModelCache`.

    Runs where forward runs. Models move to the device under a lock, in the first thread that
    needs them; each thread then runs ``forward`` itself (torch releases the GIL). Forward runs
    on ``device``, else on CUDA, else on the CPU.

    Args:
        start_now: start a stage's :class:`DeviceForward` when its runner is made (the
            threads backend, and any run with a memory budget: a stage too large for it is an
            error before any batch runs); else at its first batch.
    """

    def __init__(
        self,
        device: Optional[DeviceSpec],
        autocast: Any,
        torch_threads: Optional[int] = None,
        settings: Optional[ModelSettings] = None,
        start_now: bool = False,
    ) -> None:
        self.cache = ModelCache(first_device(device) if device else None, settings)
        self.device = device
        self.autocast = autocast
        self.torch_threads = torch_threads
        self.start_now = start_now or self.cache.budget is not None
        self._lock = threading.Lock()
        self._forwards: dict[int, DeviceForward] = {}

    def __call__(self, stage: Stage) -> LocalForwardRunner:
        with self._lock:
            forward = self._forwards.get(stage.index)
            if forward is None:
                op: Any = stage.op
                forward = DeviceForward(
                    op.forward, self.device, self.autocast, stage.name, op.batch_size, self.torch_threads, op.place, self.cache
                )  # a forward class (WorkerClass) is constructed by DeviceForward.start, here
                if self.start_now:
                    forward.start()
                self._forwards[stage.index] = forward
        return LocalForwardRunner(forward)

    def add_swap_stats(self, stats: Any) -> None:
        """Adds the cache's swaps and seconds swapping to a :class:`~streamproc.stats.ProcessStats`."""
        stats.swaps += self.cache.swaps
        stats.swap_seconds += self.cache.swap_seconds


def shared_forward_runners(
    devices: Optional[Sequence[DeviceSpec]], autocast: Any, settings: Optional[ModelSettings] = None
) -> LocalForwardRunners:
    """The forward-runner factory of the threads backend's threads (one process).

    As in the simple backend, forward runs on the first of ``devices``, else on CUDA, else on
    the CPU. torch's thread count is left alone (see :func:`set_torch_threads`).
    """
    return LocalForwardRunners(devices[0] if devices else None, autocast, None, settings, start_now=True)


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
