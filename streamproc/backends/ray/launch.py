"""Starting a run's Ray actors: their names, resources and placement (runs in the driver).

Every actor is named after its run's token (unique on the cluster, so several drivers may
share it) and asks for no CPU (``num_cpus=0``, see :class:`~.cluster.ActorSizing`): a warm
actor holds none between runs. Actors are never restarted by Ray (``max_restarts=0``): a run
replaces a dead one itself, under ``max_task_retries``.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, Optional

from .actors import RunActor, remote_class
from .cluster import ActorSizing
from .cpu import CPUWorker
from .gpu import GPUWorker


def start_gpu_actors(ray: ModuleType, token: str, sizing: ActorSizing, forwards_bytes: Optional[bytes]) -> list[RunActor]:
    """One GPU worker actor per device of ``sizing``; the forwards go to the object store once for all."""
    remote = remote_class(ray, GPUWorker)
    forwards_ref = ray.put(forwards_bytes)
    actors = []
    for index, device in enumerate(sizing.gpu_devices):
        name = f"{token}-gpu-{index}"
        handle = remote.options(name=name, num_cpus=0, num_gpus=sizing.gpus_per_gpu_worker, max_restarts=0).remote(
            index, device, forwards_ref
        )
        actors.append(RunActor(handle, name))
    return actors


def start_cpu_actor(ray: ModuleType, token: str, index: int, generation: int, node: Optional[str]) -> RunActor:
    """CPU worker actor ``index`` (``generation`` > 0: a replacement), on node ``node`` if given.

    A hard affinity: a soft one falls back to the driver's node whenever the chosen raylet is
    slow to answer (a loaded machine), which left every actor on one node. Without a node, it
    goes wherever Ray spreads it.
    """
    name = f"{token}-cpu-{index}" + (f"-r{generation}" if generation else "")
    strategy: Any = "SPREAD"
    if node is not None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        strategy = NodeAffinitySchedulingStrategy(node, soft=False)
    options = {"name": name, "num_cpus": 0, "max_restarts": 0, "scheduling_strategy": strategy}
    handle = remote_class(ray, CPUWorker).options(**options).remote(index)
    return RunActor(handle, name, generation=generation)
