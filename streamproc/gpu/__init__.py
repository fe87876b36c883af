"""Deep-learning helpers: device moves and autocast, model discovery, in-process forward.

One responsibility per module (design.md section 4):

* :mod:`.device`: moving (nested) tensors to a device, pinned memory, autocast dtypes, and
  splitting a batch's outputs into one row per record;
* :mod:`.models`: finding the ``torch.nn.Module``s reachable from ``forward``;
* :mod:`.model_content`: a model's tensors, content digest, bytes and dtypes on the device;
* :mod:`.model_cache`: :class:`ModelCache`, the models of one process on one device, keyed
  by content, dtype and device; loads, unloads and swaps under a memory budget;
* :mod:`.swap_schedule`: which uploaded batch a GPU worker computes next under a budget;
* :mod:`.forward`: :class:`DeviceForward` (one stage's forward on one device) and
  :class:`LocalForwardRunner` (forward in this process, batch after batch).
* :mod:`.partition` and :mod:`.placement`: model parallel, a model split over the devices of
  a device group (the split, as pure functions; moving the parts and their inputs).

torch is imported inside functions only: importing this package (or ``streamproc``) never
imports torch; only a stream with a ``map_gpu`` stage does, when it runs.
"""

from __future__ import annotations

from .device import default_device, map_tensors, resolve_autocast, split_rows, to_device
from .forward import DeviceForward, LocalForwardRunner, LocalForwardRunners
from .model_cache import ModelCache, ModelKey, ModelSettings
from .model_content import model_digest, model_nbytes
from .models import MODULE_SEARCH_DEPTH, find_modules

__all__ = [
    "MODULE_SEARCH_DEPTH",
    "DeviceForward",
    "LocalForwardRunner",
    "LocalForwardRunners",
    "ModelCache",
    "ModelKey",
    "ModelSettings",
    "default_device",
    "find_modules",
    "map_tensors",
    "model_digest",
    "model_nbytes",
    "resolve_autocast",
    "split_rows",
    "to_device",
]
