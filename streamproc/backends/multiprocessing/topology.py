"""Who talks to whom: GPU worker devices, CPU -> GPU channels, and the plan each side gets.

Pure functions of the plan and options (torch is imported only to look up CUDA and MPS
devices, and only for streams with a ``map_gpu`` stage). Runs in the main process before
workers start; a device the machine does not have is refused here.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

from ..._warnings import stacklevel_outside_streamproc
from ...execution.schedule import get_dispatch_schedule
from ...execution.sharding import torchrun_local_rank
from ...gpu.availability import check_device_specs, visible_cuda_devices
from ...options import DeviceSpec
from ...plan import Plan
from .messages import ChannelKey, WorkerId


def resolve_gpu_devices(
    plan: Plan, cuda_device_count: Optional[int] = None, mps_available: Optional[bool] = None
) -> list[DeviceSpec]:
    """The device of each GPU worker to start ([] when forward runs in the CPU workers).

    ``gpu_worker_devices`` wins (cycled if ``num_gpu_workers`` asks for more workers than it
    lists; a device group, e.g. ``("cuda:0", "cuda:1")``, is one entry: one worker owning all
    its devices, the model split over them); else, under torchrun (``LOCAL_RANK`` set), one worker (or ``num_gpu_workers``)
    on ``cuda:{LOCAL_RANK}``, the rank's own device; else one worker per visible CUDA device,
    or ``num_gpu_workers`` spread over them.
    Asking for GPU workers on a machine without CUDA runs them on the CPU, with a warning.
    Runs in the main process before any worker starts, so a listed device this machine does
    not have fails here, naming the option, rather than in a GPU worker's start-up. torch is
    imported only when CUDA or MPS must be looked up.

    Args:
        plan: The plan to run.
        cuda_device_count: How many CUDA devices are visible (default: torch's answer, 0
            without CUDA); for tests.
        mps_available: Whether Apple's MPS device is usable (default: torch's answer); for tests.

    Returns:
        One device name or group per GPU worker, e.g. ``["cuda:0", "cuda:1"]`` or
        ``[("cuda:0", "cuda:1")]``.

    Raises:
        ValueError: ``gpu_worker_devices`` lists (alone or in a group) "cuda"/"cuda:N" without
            a visible CUDA device, ``N`` at or above the number visible, or "mps" where MPS is
            unavailable; or a group names a device other than "cpu" twice (see
            :func:`check_device_specs`).
    """
    options = plan.options
    if not plan.has_gpu_stage or options.num_gpu_workers == 0:
        return []
    devices = options.gpu_worker_devices
    if devices:
        count = options.num_gpu_workers if options.num_gpu_workers is not None else len(devices)
        resolved = [devices[i % len(devices)] for i in range(count)]
        check_device_specs(resolved, cuda_device_count, mps_available)
        return resolved
    if cuda_device_count is None:
        cuda_device_count = visible_cuda_devices()
    local_rank = torchrun_local_rank()
    if local_rank is not None and cuda_device_count:
        if local_rank >= cuda_device_count:
            raise ValueError(
                f"LOCAL_RANK={local_rank} (torchrun) picks cuda:{local_rank} for the GPU workers, but only "
                f"{cuda_device_count} CUDA device(s) are visible here; set gpu_worker_devices= explicitly"
            )
        return [f"cuda:{local_rank}"] * (options.num_gpu_workers or 1)
    count = options.num_gpu_workers if options.num_gpu_workers is not None else cuda_device_count
    if count and not cuda_device_count:
        message = f"num_gpu_workers={count} but no CUDA device is visible: the GPU workers run on the CPU"
        warnings.warn(message, stacklevel=stacklevel_outside_streamproc())
        return ["cpu"] * count
    return [f"cuda:{i % cuda_device_count}" for i in range(count)]


@dataclass(frozen=True)
class Topology:
    """The worker graph: ``cycles[i]`` is the GPU workers CPU worker ``i`` sends to, in order.

    ``gpu_devices[g]`` is GPU worker ``g``'s device, or its group of devices (one worker).
    """

    num_cpu_workers: int
    gpu_devices: tuple[DeviceSpec, ...]
    cycles: tuple[tuple[int, ...], ...]

    @property
    def channels(self) -> list[ChannelKey]:
        return [
            ChannelKey(WorkerId("cpu", cpu), WorkerId("gpu", gpu))
            for cpu, cycle in enumerate(self.cycles)
            for gpu in sorted(set(cycle))
        ]

    def peers_of_gpu(self, gpu: int) -> list[int]:
        return [cpu for cpu, cycle in enumerate(self.cycles) if gpu in cycle]


def build_topology(num_cpu_workers: int, gpu_devices: Sequence[DeviceSpec]) -> Topology:
    """Spreads CPU workers over GPU workers with :func:`get_dispatch_schedule`.

    A device group is one GPU worker, like a single device.

    >>> build_topology(4, ["cuda:0", "cuda:1"]).cycles
    ((0,), (0,), (1,), (1,))
    >>> build_topology(2, [("cuda:0", "cuda:1")]).cycles
    ((0,), (0,))
    """
    num_gpu = len(gpu_devices)
    cycles = tuple(
        tuple(get_dispatch_schedule(cpu, num_cpu_workers, num_gpu)) if num_gpu else () for cpu in range(num_cpu_workers)
    )
    return Topology(num_cpu_workers, tuple(gpu_devices), cycles)
