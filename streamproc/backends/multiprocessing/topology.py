"""Who talks to whom: GPU worker devices, CPU -> GPU channels, and the plan each side gets.

Pure functions of the plan and options (torch is imported only to count CUDA devices, and
only for streams with a ``map_gpu`` stage). Runs in the main process before workers start.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

from ..._warnings import stacklevel_outside_streamproc
from ...execution.schedule import get_dispatch_schedule
from ...plan import Plan
from .messages import ChannelKey, WorkerId


def resolve_gpu_devices(plan: Plan, cuda_device_count: Optional[int] = None) -> list[str]:
    """The device of each GPU worker to start ([] when forward runs in the CPU workers).

    ``gpu_worker_devices`` wins (cycled if ``num_gpu_workers`` asks for more workers than it
    lists); else one worker per visible CUDA device, or ``num_gpu_workers`` spread over them.
    Asking for GPU workers on a machine without CUDA runs them on the CPU, with a warning.
    """
    options = plan.options
    if not plan.has_gpu_stage or options.num_gpu_workers == 0:
        return []
    devices = options.gpu_worker_devices
    if devices:
        count = options.num_gpu_workers if options.num_gpu_workers is not None else len(devices)
        return [devices[i % len(devices)] for i in range(count)]
    if cuda_device_count is None:
        import torch

        cuda_device_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    count = options.num_gpu_workers if options.num_gpu_workers is not None else cuda_device_count
    if count and not cuda_device_count:
        message = f"num_gpu_workers={count} but no CUDA device is visible: the GPU workers run on the CPU"
        warnings.warn(message, stacklevel=stacklevel_outside_streamproc())
        return ["cpu"] * count
    return [f"cuda:{i % cuda_device_count}" for i in range(count)]


@dataclass(frozen=True)
class Topology:
    """The worker graph: ``cycles[i]`` is the GPU workers CPU worker ``i`` sends to, in order."""

    num_cpu_workers: int
    gpu_devices: tuple[str, ...]
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


def build_topology(num_cpu_workers: int, gpu_devices: list[str]) -> Topology:
    """Spreads CPU workers over GPU workers with :func:`get_dispatch_schedule`.

    >>> build_topology(4, ["cuda:0", "cuda:1"]).cycles
    ((0,), (0,), (1,), (1,))
    """
    num_gpu = len(gpu_devices)
    cycles = tuple(
        tuple(get_dispatch_schedule(cpu, num_cpu_workers, num_gpu)) if num_gpu else () for cpu in range(num_cpu_workers)
    )
    return Topology(num_cpu_workers, tuple(gpu_devices), cycles)
