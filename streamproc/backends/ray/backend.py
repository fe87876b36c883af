"""The Ray backend: the same stream on a Ray cluster, CPU and GPU workers as Ray actors.

:class:`RayBackend` joins the cluster (:mod:`.cluster`), then a :class:`~.run._RayRun` starts
the run's actors and streams its outputs through the returned
:class:`~streamproc.backends.base.RunHandle`. See :mod:`.run` for the data flow and NOTE
[ streamproc ray shutdown ].
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

from ...plan import Plan
from ...stats import RunStats
from ..base import Backend, BackendCapabilities, RunHandle
from .cluster import join_cluster
from .run import _RayRun

if TYPE_CHECKING:
    from ...io.sinks import Sink


class RayBackend(Backend):
    """CPU worker actors run whole tasks (read, ops, finalize, part files); GPU worker actors run ``forward``.

    ``num_cpu_workers`` (default: the cluster's CPUs), ``num_gpu_workers`` and
    ``gpu_worker_devices`` size the actors (each GPU worker asks Ray for one GPU, or a share
    when there are more GPU workers than GPUs; ``"cpu"`` runs forward on the CPU, for logical
    GPUs in tests); ``ray_address`` picks the cluster. ``max_task_retries`` reruns the tasks of
    an actor that died on a fresh actor (not when the actors write parquet parts: a part group
    is not rerun, as with multiprocessing). ``task_timeout`` is refused (not available on Ray
    yet), as are device groups.
    """

    name = "ray"
    capabilities = BackendCapabilities(writes_in_workers=True, separate_processes=True)

    def run(self, plan: Plan, sink: Sink) -> RunHandle:
        if plan.options.task_timeout is not None:
            raise ValueError(
                f"task_timeout={plan.options.task_timeout:g} is not available with backend='ray' yet: "
                "use backend='multiprocessing', or leave task_timeout=None"
            )
        ray = join_cluster(plan.options.ray_address)
        stats = RunStats(self.name)
        run = _RayRun(plan, sink, ray, stats)
        outputs = run.outputs()
        weakref.finalize(outputs, run.shutdown)  # a handle garbage collected half-read kills its actors
        return RunHandle(outputs, stats)
