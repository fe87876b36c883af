"""Joining a Ray cluster and sizing the actors of a run for it (main process).

``ray_address=None`` joins the cluster this process's ``ray.init`` already joined, else starts
a local one sized to :func:`~streamproc.backends.multiprocessing.cpu_budget.cpu_count`; Ray
shuts it down when the interpreter exits (design.md section 5), so later runs reuse it.
``"auto"`` or an address joins that cluster, and stays joined for later runs. streamproc never
calls ``ray.shutdown()``: a cluster the user started (or joined) is left as it was.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Optional

from ...options import DeviceSpec

if TYPE_CHECKING:
    from ...plan import Plan

#: What the ImportError says when Ray is not installed.
INSTALL_HINT = "pip install 'streamproc[ray]'"


def import_ray(what: str = "backend='ray'") -> ModuleType:
    """The ``ray`` module, or an ImportError naming the pip command (main process or actor)."""
    try:
        import ray
    except ImportError as exc:
        raise ImportError(f"{what} needs Ray, which is not installed: {INSTALL_HINT}") from exc
    return ray


def join_cluster(address: Optional[str]) -> ModuleType:
    """Connects this process to a cluster (see the module docstring); returns ``ray``.

    Raises:
        ImportError: Ray is not installed.
        ConnectionError: (Ray's) no cluster answers at ``address``.
    """
    ray = import_ray()
    if ray.is_initialized():
        return ray
    if address is None:
        from ..multiprocessing.cpu_budget import cpu_count

        # "local": a new cluster, even where a `ray start` one is running (ray.init() would join that one).
        ray.init(address="local", num_cpus=cpu_count(), logging_level="warning")
    else:
        ray.init(address=address, logging_level="warning")
    return ray


@dataclass(frozen=True)
class ActorSizing:
    """How many actors of each kind a run has, and the devices its GPU workers run ``forward`` on.

    CPU worker actors reserve no logical CPU (``num_cpus=0``, what Ray gives a running actor
    by default): a run's actors, and the warm ones kept between runs (see :mod:`.actor_pool`),
    never hold CPUs that other work on the cluster needs, such as the Ray Data tasks that feed
    ``sp.from_ray_dataset`` (reserving them deadlocked that source: issue 13), and a ``limit``'s
    inner run starts while the outer run's actors are busy. Their number follows the cluster's
    CPUs instead. ``gpus_per_gpu_worker``: 1, a fraction when there are more GPU workers than
    GPUs, 0 when every GPU worker runs on ``"cpu"`` in a cluster without GPUs. ``gpu_devices``:
    per GPU worker, the device inside its actor (None: the actor's GPU when it sees one, else
    the CPU; ``"cpu"`` as asked, for tests on logical GPUs).
    """

    num_cpu_workers: int
    gpu_devices: tuple[Optional[str], ...]
    gpus_per_gpu_worker: float


def size_actors(plan: Plan, cluster_cpus: float, cluster_gpus: float) -> ActorSizing:
    """How many actors of each kind, with what resources (pure; main process).

    The cluster's resources, not this machine's, decide: a driver without a GPU may ask for
    GPU workers on the cluster (design.md section 5). ``num_cpu_workers`` defaults to the
    cluster's CPUs (``ray.cluster_resources()``); GPU workers share the cluster's GPUs (a GPU
    worker without a GPU would quietly run on the CPU, so it waits for one, up to the start
    timeout).

    >>> from streamproc.plan import build_plan
    >>> import streamproc as sp
    >>> plan = build_plan(sp.from_iterable([]).set_processing(num_cpu_workers=4))
    >>> size_actors(plan, cluster_cpus=2, cluster_gpus=0)
    ActorSizing(num_cpu_workers=4, gpu_devices=(), gpus_per_gpu_worker=0.0)

    Raises:
        ValueError: a device group (model parallel is not available on Ray yet), or GPU
            workers on CUDA in a cluster without GPUs (they would never start).
    """
    options = plan.options
    num_cpu = options.num_cpu_workers or max(1, int(cluster_cpus))
    devices = _gpu_worker_devices(plan)
    if not devices:
        return ActorSizing(num_cpu, (), 0.0)
    if cluster_gpus <= 0:
        if any(device != "cpu" for device in devices):
            raise ValueError(
                f"backend='ray' with {len(devices)} GPU worker(s) (gpu_worker_devices={options.gpu_worker_devices}) "
                "needs GPUs in the Ray cluster, which has none (ray.cluster_resources() has no 'GPU'): start the "
                "cluster with GPUs, or use gpu_worker_devices=['cpu'] to run forward on the CPU"
            )
        return ActorSizing(num_cpu, devices, 0.0)
    return ActorSizing(num_cpu, devices, _round_down(min(1.0, cluster_gpus / len(devices))))


def _round_down(fraction: float) -> float:
    # Ray accepts resource amounts to 4 decimals; rounding up could ask for more than there is.
    return math.floor(fraction * 10_000) / 10_000


def _gpu_worker_devices(plan: Plan) -> tuple[Optional[str], ...]:
    """The device of each GPU worker (none without a ``map_gpu`` stage or GPU workers)."""
    options = plan.options
    count = options.effective_gpu_workers
    if not plan.has_gpu_stage or count == 0:
        return ()
    specs: tuple[DeviceSpec, ...] = options.gpu_worker_devices or ()
    devices: list[Optional[str]] = []
    for i in range(count):
        spec = specs[i % len(specs)] if specs else None
        if isinstance(spec, tuple):
            raise ValueError(
                f"gpu_worker_devices={options.gpu_worker_devices}: a device group (one GPU worker over several "
                "devices) is not available with backend='ray' yet; use backend='multiprocessing'"
            )
        # On a cluster Ray assigns each actor its GPU(s): "cuda:3" cannot name one of them.
        devices.append("cpu" if spec == "cpu" else None)
    return tuple(devices)


def spread_over_nodes(num_actors: int, node_cpus: dict[str, float]) -> list[Optional[str]]:
    """The node of each CPU worker actor: the nodes' CPUs shared out in proportion (pure; main process).

    CPU worker actors reserve no CPU (see :class:`ActorSizing`), and Ray's ``"SPREAD"``
    strategy does not spread actors that ask for nothing: they all land on one node. So the
    driver places them: actor ``i`` goes to the node with the fewest actors per CPU so far
    (the first such node in ``node_cpus`` order on a tie). None for every actor when no node
    has a CPU (Ray then places them).

    >>> spread_over_nodes(4, {"a": 1, "b": 1})
    ['a', 'b', 'a', 'b']
    >>> spread_over_nodes(3, {"big": 2, "small": 1})
    ['big', 'small', 'big']
    >>> spread_over_nodes(2, {})
    [None, None]
    """
    nodes = {node: cpus for node, cpus in node_cpus.items() if cpus > 0}
    if not nodes:
        return [None] * num_actors
    assigned = dict.fromkeys(nodes, 0)
    order = list(nodes)
    placed: list[Optional[str]] = []
    for _ in range(num_actors):
        node = min(order, key=lambda n: (assigned[n] / nodes[n], order.index(n)))
        assigned[node] += 1
        placed.append(node)
    return placed


def alive_node_cpus(ray: ModuleType) -> dict[str, float]:
    """The CPUs of each alive node of the cluster, by node id, in Ray's order (main process)."""
    return {
        node["NodeID"]: float(node.get("Resources", {}).get("CPU", 0))
        for node in ray.nodes()
        if node.get("Alive")
    }
