"""The forwards a GPU worker serves, by run (runs in the GPU worker process).

A GPU worker started by a run loads that run's ``map_gpu`` forwards at start-up (run id None);
a warm pool's worker loads each later run's with ``StartGPURun`` and drops them with
``EndGPURun``, keeping one model cache per model settings, so that runs sharing the worker
share its models. :func:`batch_picker` decides which uploaded batch is computed next.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Optional

from ...errors import ExceptionWithTraceback
from ...execution.serialization import dill_loads, dumps_message
from ...gpu.placement import DeviceSpec, first_device
from .log_forwarding import apply_log_levels
from .messages import ForwardRequest, StartGPURun, WorkerFailed, WorkerId

if TYPE_CHECKING:
    from ...gpu import DeviceForward, ModelCache
    from ...gpu.model_cache import ModelSettings


def load_forwards(
    forwards_bytes: bytes, device: DeviceSpec, caches: dict[Any, ModelCache]
) -> tuple[dict[int, DeviceForward], Optional[ModelSettings]]:
    """The started runners of a run's ``map_gpu`` stages (GPU worker), from ``forwards_bytes``."""
    stages, autocast, torch_threads, *rest = dill_loads(forwards_bytes)
    apply_log_levels(rest[0] if rest else ())
    settings = rest[1] if len(rest) > 1 else None
    if settings not in caches:
        from ...gpu import ModelCache

        caches[settings] = ModelCache(first_device(device), settings)
    return device_forwards(stages, device, autocast, torch_threads, settings, caches[settings]), settings


def start_gpu_run(
    start: StartGPURun, worker: WorkerId, device: DeviceSpec, caches: dict[Any, ModelCache], status_conn: Any, where: str
) -> tuple[dict[int, DeviceForward], Optional[ModelSettings]]:
    """A warm pool's next run (GPU worker): its runners, its models through the kept caches.

    A failure to load (the user's ``__setstate__`` or ``.to()`` raising) ends the run, not the
    worker: it goes to the main process as ``WorkerFailed`` and the run's batches are answered
    with ``ForwardFailed``; the worker waits for the next run.
    """
    try:
        return load_forwards(start.forwards_bytes, device, caches)
    except Exception as exc:
        failed = WorkerFailed(worker, ExceptionWithTraceback(exc, f"{where}, loading run {start.run_id}"), start.run_id)
        status_conn.send_bytes(dumps_message(failed))
        return {}, None


def device_forwards(
    stages: dict[int, Any],
    device: DeviceSpec,
    autocast: Any,
    torch_threads: Optional[int],
    settings: Optional[ModelSettings],
    cache: Optional[ModelCache] = None,
) -> dict[int, DeviceForward]:
    """One started :class:`DeviceForward` per stage, all on ``device``, sharing one model cache
    (a device group: its first device; models split across the group are not cached).

    Stages start in index order, each moving its models to the device while they fit the
    budget (all of them without one); a stage whose models alone exceed it raises ValueError.
    """
    from ...gpu import DeviceForward, ModelCache

    if cache is None:
        cache = ModelCache(first_device(device), settings)
    runners = {
        stage_index: DeviceForward(
            stage.forward, device, autocast, stage.name, stage.batch_size, torch_threads, stage.place, cache
        )
        for stage_index, stage in stages.items()
    }
    for runner in runners.values():
        runner.start()
    return runners


#: A batch on the device: (the sender of the CPU peer that asked, its request, the uploaded batch).
Uploaded = tuple[Any, ForwardRequest, Any]
#: ``(run id, stage index)``; run id None: the run the worker was started with.
StageKey = tuple[Optional[int], int]


def runner_of(runners: dict[StageKey, DeviceForward], request: ForwardRequest) -> Optional[DeviceForward]:
    """The forward serving ``request``: its run's stage, else the start-up run's (a one-run pool)."""
    runner = runners.get((request.run_id, request.stage))
    return runner if runner is not None else runners.get((None, request.stage))


def end_gpu_run(run_id: int, runners: dict[StageKey, DeviceForward], uploaded: collections.deque[Uploaded]) -> None:
    """Drops run ``run_id``'s forwards and its batches not computed (GPU worker; its tasks are over)."""
    for key in [key for key in runners if key[0] == run_id]:
        del runners[key]
    for entry in [entry for entry in uploaded if entry[1].run_id == run_id]:
        uploaded.remove(entry)


def batch_picker(
    runners: dict[StageKey, DeviceForward], settings: Optional[ModelSettings]
) -> Callable[[collections.deque[Uploaded]], Uploaded]:
    """Takes the next batch to compute out of ``uploaded``: the oldest without a memory budget;
    with one, as :class:`~streamproc.gpu.swap_schedule.RoundSchedule` says (loaded models first)."""
    if settings is None or settings.memory_budget is None:
        return collections.deque.popleft
    from ...gpu.swap_schedule import RoundSchedule

    schedule = RoundSchedule()

    def is_loaded(entry: Uploaded) -> bool:
        runner = runner_of(runners, entry[1])
        return runner is not None and runner.models_loaded()

    def pick(uploaded: collections.deque[Uploaded]) -> Uploaded:
        chosen = schedule.pick(uploaded, is_loaded)
        entry = uploaded[chosen]
        del uploaded[chosen]
        return entry

    return pick
