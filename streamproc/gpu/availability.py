"""Whether the devices a stream asks for exist on this machine (main process, before anything starts).

torch is imported only when a CUDA or MPS device is named: a "cpu" device never imports it.
Every backend that runs ``forward`` checks its devices here, before any worker starts
(:func:`check_device_specs` for ``gpu_worker_devices`` entries, device groups included).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Optional

from ..options import DeviceSpec, device_names


def check_device_specs(
    specs: Sequence[DeviceSpec], cuda_device_count: Optional[int] = None, mps_available: Optional[bool] = None
) -> None:
    """Raises ``ValueError`` naming ``gpu_worker_devices`` if a device, or a device of a group, is bad here.

    Each device of a group must exist (see :func:`check_devices_exist`), and a group must not
    name a device twice (``"cuda"`` is ``"cuda:0"``), except ``"cpu"``: ``("cpu", "cpu")``
    stands in for two devices in tests and on machines without accelerators.

    >>> check_device_specs(["cpu", ("cpu", "cpu"), ("cuda:0", "cuda:1")], cuda_device_count=2)
    >>> check_device_specs([("cuda", "cuda:0")], cuda_device_count=2)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: gpu_worker_devices: the group ('cuda', 'cuda:0') names cuda:0 twice...
    """
    for spec in specs:
        if isinstance(spec, str):
            continue
        seen: set[str] = set()
        for device in spec:
            name = "cuda:0" if device == "cuda" else device
            if name in seen and name != "cpu":
                raise ValueError(
                    f"gpu_worker_devices: the group {spec!r} names {name} twice: a group splits a model over distinct "
                    "devices; only 'cpu' may repeat (a stand-in for several devices, e.g. in tests)"
                )
            seen.add(name)
    check_devices_exist(device_names(tuple(specs)), cuda_device_count, mps_available)


def check_devices_exist(
    devices: Sequence[str], cuda_device_count: Optional[int] = None, mps_available: Optional[bool] = None
) -> None:
    """Raises ``ValueError`` naming ``gpu_worker_devices`` if a device is not on this machine.

    >>> check_devices_exist(["cpu", "cuda:1"], cuda_device_count=2)
    >>> check_devices_exist(["cuda:2"], cuda_device_count=2)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: gpu_worker_devices: 'cuda:2' does not exist here: 2 CUDA devices are visible (cuda:0 to cuda:1)...

    Args:
        devices: Device names, whose form ``set_processing`` already checked.
        cuda_device_count: How many CUDA devices are visible (default: torch's answer, asked
            only when a CUDA device is listed).
        mps_available: Whether MPS is usable (default: torch's answer, asked only when "mps"
            is listed).
    """
    cuda = [d for d in dict.fromkeys(devices) if d == "cuda" or d.startswith("cuda:")]
    if cuda:
        count = visible_cuda_devices() if cuda_device_count is None else cuda_device_count
        for device in cuda:
            index = int(device.partition(":")[2] or 0)  # plain "cuda" is the current device, cuda:0 at start
            if index >= count:
                raise ValueError(f"gpu_worker_devices: {device!r} does not exist here: {_describe_cuda(count)}")
    if "mps" in devices and not (_mps_available() if mps_available is None else mps_available):
        raise ValueError(
            "gpu_worker_devices: 'mps' is not available here (torch.backends.mps.is_available() is False: it needs "
            "Apple silicon and an MPS-enabled torch); use 'cpu' or a CUDA device"
        )


def _describe_cuda(count: int) -> str:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    env = f", CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else ""
    if count == 0:
        return f"no CUDA device is visible (torch.cuda.is_available() is False{env}); use 'cpu' to run GPU workers on the CPU"
    if count == 1:
        return f"1 CUDA device is visible (cuda:0{env})"
    return f"{count} CUDA devices are visible (cuda:0 to cuda:{count - 1}{env})"


def visible_cuda_devices() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _mps_available() -> bool:
    import torch

    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())
