"""Splitting a plan between the processes that run it: CPU workers and GPU workers.

Pure (no processes): the CPU side gets the plan with each ``map_gpu`` forward replaced, so
model weights never travel to CPU workers; the GPU side gets only the forwards. Every backend
with GPU workers (multiprocessing, Ray) uses this split.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..ops import BatchedOp, MapGPU
from ..plan import Plan, Stage


@dataclass(frozen=True)
class ForwardStage:
    """What a GPU worker needs of one ``map_gpu`` stage: its index, name, forward, batch size and ``place`` hook."""

    index: int
    name: str
    forward: Any
    batch_size: Any
    place: Any = None


def _forward_runs_on_gpu_workers(batch: Any) -> Any:
    raise RuntimeError("forward of this map_gpu stage runs on GPU workers, not in a CPU worker")


def split_plan(plan: Plan) -> tuple[Plan, dict[int, ForwardStage]]:
    """Splits a plan between CPU workers and GPU workers.

    Returns the plan for CPU workers, where each ``map_gpu`` forward is replaced by a
    placeholder, and the GPU workers' forwards by stage index.
    """
    forwards: dict[int, ForwardStage] = {}
    cpu_stages = []
    for stage in plan.stages:
        op = stage.op
        if isinstance(op, MapGPU):
            assert isinstance(op, BatchedOp)
            forwards[stage.index] = ForwardStage(stage.index, stage.name, op.forward, op.batch_size, op.place)
            stage = Stage(stage.index, stage.name, dataclasses.replace(op, forward=_forward_runs_on_gpu_workers, place=None))
        cpu_stages.append(stage)
    return dataclasses.replace(plan, stages=tuple(cpu_stages)), forwards
