"""The multiprocessing backend: CPU worker processes (and GPU worker processes) on this machine.

:class:`MultiprocessingBackend` checks what depends on this machine (devices), wires a
:class:`~.pool.ProcessPool` for the plan (topology, start methods) and hands it to a
:class:`~.run._Run`, whose outputs the returned :class:`~streamproc.backends.base.RunHandle`
streams. See :mod:`.run` for the data flow and NOTE [ streamproc shutdown ]. With
``set_processing(pool=...)`` the run uses the :class:`~streamproc.WorkerPool`'s warm
processes instead (:mod:`streamproc.service.pool`).
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import TYPE_CHECKING

from ...options import device_names
from ...plan import Plan
from ...stats import RunStats
from ..base import Backend, BackendCapabilities, RunHandle
from .cpu_budget import check_worker_counts, default_num_cpu_workers
from .environment import resolve_start_method
from .pool import ProcessPool
from .run import _Run
from .topology import build_topology, resolve_gpu_devices

if TYPE_CHECKING:
    from ...io.sinks import Sink


def pool_for(plan: Plan) -> ProcessPool:
    """A pool (not started) sized and wired for ``plan``; raises ValueError on options this machine cannot honour.

    With ``pool=``, the :class:`~streamproc.WorkerPool`'s processes (started).
    """
    options = plan.options
    if options.pool is not None:
        return options.pool.process_pool()
    gpu_devices = resolve_gpu_devices(plan)  # refuses devices this machine does not have
    num_workers = options.num_cpu_workers or default_num_cpu_workers(len(gpu_devices))
    check_worker_counts(num_workers, len(gpu_devices))
    topology = build_topology(num_workers, gpu_devices)
    # CPU workers never touch CUDA, so they may fork (unless CUDA is initialised here, or they
    # run torch after the parent's OpenMP pool started: see start_method.py); GPU workers on
    # CUDA devices are spawned (or forkserver'd), never forked.
    cpu_start_method = resolve_start_method(
        options.process_start_method, needs_gpu_workers=False, runs_torch=plan.has_gpu_stage
    )
    uses_cuda = any(device.startswith("cuda") for device in device_names(tuple(gpu_devices)))
    gpu_start_method = resolve_start_method(options.process_start_method, needs_gpu_workers=uses_cuda, runs_torch=True)
    return ProcessPool(topology, cpu_start_method, gpu_start_method)


class MultiprocessingBackend(Backend):
    name = "multiprocessing"
    capabilities = BackendCapabilities(writes_in_workers=True, separate_processes=True)

    def run(self, plan: Plan, sink: Sink) -> RunHandle:
        stats = RunStats(self.name)
        warm = plan.options.pool
        if warm is not None:
            if plan.options.task_timeout is not None:
                # The stuck-task watchdog is set up when a worker starts (see watchdog.py).
                raise ValueError("set_processing(pool=...) does not support task_timeout= yet: drop one of them")
            # The plan travels to the workers: the pool stays here.
            plan = dataclasses.replace(plan, options=dataclasses.replace(plan.options, pool=None))
            run = _Run(plan, sink, warm.process_pool(), stats, lease=warm.lease())
        else:
            run = _Run(plan, sink, pool_for(plan), stats)
        outputs = run.outputs()
        # A half-consumed handle that is garbage collected still stops its processes.
        weakref.finalize(outputs, run.shutdown, True)
        return RunHandle(outputs, stats)
