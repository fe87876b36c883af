"""The model cache: the models of the ``map_gpu`` stages that one process runs, on one device.

One :class:`ModelCache` per process (or group of threads) that runs ``forward``: a GPU worker,
the main process of the simple backend, the threads backend's worker threads together, a CPU
worker without GPU workers. It runs there, never in the main process of a backend with GPU
workers. torch is imported inside functions only.

A model is identified by its *content* (:func:`~.model_content.model_digest`), its weights dtype on the device
and the device (:class:`ModelKey`): two stages whose ``forward`` reach equal models, whether the
same object or two copies (unpickled separately, loaded twice from one checkpoint), share one
device copy. The first module of a key found is the cache's own; a later equal module is a
*follower*: its parameters and buffers are made views of the first module's tensors after every
move, so that both run on the one copy.

Memory invariant (``gpu_memory_budget`` set): ``loaded_bytes <= budget``, where a model's
bytes are its parameters' and buffers' (each tensor once, in its dtype on the device). A model
moves to the device on :meth:`ModelCache.load`, evicting the least recently used models that
no caller is using (:meth:`ModelCache.using`), and back to host memory on eviction. Without a
budget every model stays on the device from its first load: there are no swaps.

Issues 10 and 11 (warm pools, throughput) keep one cache across runs: :meth:`ModelCache.register`
of a model already cached costs its digest only, and moves nothing.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from .model_content import cast_weights, format_bytes, model_digest, model_nbytes, outermost_modules, share_tensors

if TYPE_CHECKING:
    import torch

#: How long a thread waits for room on the device before it looks again (the models in the way
#: are in use by other threads of this process, which release them when their batches end).
ROOM_WAIT_INTERVAL_S = 1.0


@dataclass(frozen=True)
class ModelSettings:
    """The ``set_processing`` options a model cache follows (read where forward runs).

    Args:
        memory_budget: ``gpu_memory_budget``: bytes of parameters and buffers allowed on the
            device at once; None: every model stays on the device (no swaps).
        dtype: ``model_dtype``: a torch dtype or its name (``"bfloat16"``); floating-point
            weights are cast to it once, on the device; None: weights keep their dtype.
    """

    memory_budget: Optional[int] = None
    dtype: Any = None

    @classmethod
    def from_options(cls, options: Any) -> ModelSettings:
        """The settings of a run's :class:`~streamproc.options.ProcessingOptions`."""
        return cls(getattr(options, "gpu_memory_budget", None), getattr(options, "model_dtype", None))

    def torch_dtype(self) -> Optional[torch.dtype]:
        """``dtype`` as a ``torch.dtype`` (None: keep the weights' own)."""
        if self.dtype is None:
            return None
        import torch

        return getattr(torch, self.dtype) if isinstance(self.dtype, str) else self.dtype


@dataclass(frozen=True)
class ModelKey:
    """What identifies a model in a cache: its content digest, weights dtype and device."""

    digest: str
    dtype: Optional[str]
    device: str


#: The models one stage's forward reaches, as cache keys (each once, in the order found).
ModelSet = tuple[ModelKey, ...]


class _Entry:
    """One cached model: its own module, its followers, size and state (under the cache's lock)."""

    def __init__(self, key: ModelKey, module: Any, nbytes: int) -> None:
        self.key = key
        self.module = module
        self.followers: list[Any] = []
        self.nbytes = nbytes
        self.on_device = False
        self.cast = False  # weights cast to the model dtype (once, at the first load)
        self.users = 0
        self.last_used = 0


class ModelCache:
    """The models of one process's ``map_gpu`` stages on one device. See the module docstring.

    Thread-safe: the threads backend's threads share one cache (:meth:`using` keeps a model on
    the device while a thread computes with it). Runs where forward runs.

    Args:
        device: the device (None: CUDA when available, else the CPU; see
            :func:`~streamproc.gpu.device.default_device`), resolved at first use.
        settings: the memory budget and weights dtype.

    Example (on the CPU, a budget that holds one of two models)::

        cache = ModelCache("cpu", ModelSettings(memory_budget=model_nbytes(a)))
        models_a = cache.register([a], "stage 1 (map_gpu(...))")
        models_b = cache.register([b], "stage 2 (map_gpu(...))")
        cache.load(models_a)   # a moves to the device
        cache.load(models_b)   # a back to host memory, b to the device: cache.swaps == 1
    """

    def __init__(self, device: Optional[str] = None, settings: Optional[ModelSettings] = None) -> None:
        self.device_name = device
        self.settings = settings or ModelSettings()
        self.budget = self.settings.memory_budget
        self._device: Optional[torch.device] = None
        self._entries: dict[ModelKey, _Entry] = {}
        self._by_id: dict[int, ModelKey] = {}
        self._changed = threading.Condition()
        self._uses = 0
        #: Loads that moved other models off the device first, and their seconds (both moves).
        self.swaps = 0
        self.swap_seconds = 0.0

    @property
    def device(self) -> torch.device:
        """The cache's device, resolved once."""
        if self._device is None:
            import torch

            from .device import default_device

            self._device = torch.device(self.device_name or default_device())
        return self._device

    @property
    def weights_dtype(self) -> Optional[torch.dtype]:
        """The dtype floating-point weights have on the device (None: their own)."""
        return self.settings.torch_dtype()

    @property
    def loaded_bytes(self) -> int:
        """Bytes of the models on the device now."""
        with self._changed:
            return sum(entry.nbytes for entry in self._entries.values() if entry.on_device)

    def register(self, modules: Sequence[Any], owner: str) -> ModelSet:
        """Adds the modules one stage's forward reaches; returns their keys. Moves nothing.

        A module equal in content to a cached one (same key) becomes its follower: it will use
        the cached copy's tensors. A submodule of another listed module is not counted twice.

        Args:
            owner: the stage, e.g. ``"stage 2 (map_gpu(...))"``, for the error below.

        Raises:
            ValueError: with a memory budget, the stage's models together are larger than the
                budget (they could never be on the device at once). It names the stage, both
                sizes and the option.
        """
        dtype = self.weights_dtype
        dtype_name = str(dtype).removeprefix("torch.") if dtype is not None else None
        device = str(self.device)
        keys: list[ModelKey] = []
        with self._changed:
            for module in outermost_modules(modules):
                key = self._by_id.get(id(module))
                if key is None:
                    key = ModelKey(model_digest(module), dtype_name, device)
                    entry = self._entries.get(key)
                    if entry is None:
                        self._entries[key] = _Entry(key, module, model_nbytes(module, dtype))
                    elif entry.module is not module:
                        entry.followers.append(module)
                        if entry.on_device or entry.cast:
                            share_tensors(module, entry.module)
                    self._by_id[id(module)] = key
                if key not in keys:
                    keys.append(key)
            models = tuple(keys)
            needed = self._nbytes(models)
        if self.budget is not None and needed > self.budget:
            raise ValueError(
                f"{owner}: its model takes {format_bytes(needed)} on {device}, more than the "
                f"gpu_memory_budget of {format_bytes(self.budget)}: raise the budget, or cast the weights "
                f"with model_dtype (float16/bfloat16 halve float32 weights)"
            )
        return models

    def nbytes(self, models: ModelSet) -> int:
        """Bytes the ``models`` take on the device."""
        with self._changed:
            return self._nbytes(models)

    def is_loaded(self, models: ModelSet) -> bool:
        """Whether every one of ``models`` is on the device now."""
        entries = self._entries
        return all(entries[key].on_device for key in models)

    def preload(self, models: ModelSet) -> None:
        """Moves ``models`` to the device if they fit next to what is there (evicting nothing)."""
        with self._changed:
            missing = [self._entries[key] for key in models if not self._entries[key].on_device]
            if self.budget is None or self._loaded_bytes() + sum(e.nbytes for e in missing) <= self.budget:
                for entry in missing:
                    self._move_to_device(entry)

    def load(self, models: ModelSet) -> None:
        """Moves ``models`` to the device, first moving the least recently used models that no
        thread is using back to host memory while they would not fit (one swap, timed).

        If the models in the way are in use by other threads, waits until they are released.
        """
        with self._changed:
            self._load(models)

    def unload(self, models: ModelSet) -> None:
        """Moves ``models`` back to host memory (in their device dtype); they stay cached."""
        with self._changed:
            for key in models:
                entry = self._entries[key]
                if entry.users:
                    raise RuntimeError(f"model {key.digest[:12]} is in use: it cannot be unloaded")
                if entry.on_device:
                    self._move_to_host(entry)

    def using(self, models: ModelSet) -> contextlib.AbstractContextManager[None]:
        """Loads ``models`` and keeps them on the device until the block ends.

        Without a budget nothing is ever evicted: it only checks they are loaded, and the block
        is a ``nullcontext`` (a GPU worker enters one per batch, between two forwards, where a
        generator-based context manager's few microseconds are device idle time).
        """
        if self.budget is None:
            if not self.is_loaded(models):
                self.load(models)
            return contextlib.nullcontext()
        return self._held(models)

    @contextlib.contextmanager
    def _held(self, models: ModelSet) -> Iterator[None]:
        """``using`` under a budget: ``models`` loaded and counted as in use until the block ends."""
        with self._changed:
            self._load(models)
            for key in models:
                self._entries[key].users += 1
        try:
            yield
        finally:
            with self._changed:
                for key in models:
                    self._entries[key].users -= 1
                self._changed.notify_all()

    # -- under the lock ------------------------------------------------------------------------

    def _nbytes(self, models: ModelSet) -> int:
        return sum(self._entries[key].nbytes for key in models)

    def _loaded_bytes(self) -> int:
        return sum(entry.nbytes for entry in self._entries.values() if entry.on_device)

    def _load(self, models: ModelSet) -> None:
        self._uses += 1
        for key in models:
            self._entries[key].last_used = self._uses
        moving = 0.0  # seconds moving models (not waiting for other threads)
        evicted = False
        while True:
            missing = [self._entries[key] for key in models if not self._entries[key].on_device]
            if not missing:
                break
            need = sum(entry.nbytes for entry in missing)
            started = time.perf_counter()
            if self.budget is None or self._loaded_bytes() + need <= self.budget:
                for entry in missing:
                    self._move_to_device(entry)
                moving += time.perf_counter() - started
                break
            victims = [e for e in self._entries.values() if e.on_device and not e.users and e.key not in models]
            if victims:
                self._move_to_host(min(victims, key=lambda e: e.last_used))
                moving += time.perf_counter() - started
                evicted = True
            else:  # the models in the way are in use by other threads, which release them soon
                self._changed.wait(ROOM_WAIT_INTERVAL_S)
        if evicted:
            self.swaps += 1
            self.swap_seconds += moving

    def _move_to_device(self, entry: _Entry) -> None:
        module = entry.module
        module.to(self.device)
        if not entry.cast:
            cast_weights(module, self.weights_dtype)
            entry.cast = True
        module.eval()
        entry.on_device = True
        for follower in entry.followers:
            share_tensors(follower, module)

    def _move_to_host(self, entry: _Entry) -> None:
        entry.module.to("cpu")
        entry.on_device = False
        for follower in entry.followers:
            share_tensors(follower, entry.module)
        self._changed.notify_all()
