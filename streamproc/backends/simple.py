"""The simple backend: every task in order, in the calling thread of the main process.

It is the reference: every other backend's deterministic output must equal its output.
``forward`` of ``map_gpu`` stages runs here too, on the first of ``gpu_worker_devices`` if
given, else on CUDA when available, else on the CPU.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import TYPE_CHECKING

from ..errors import add_context_note
from ..execution.context import ExecutionContext
from ..execution.task import Task, TaskOutput, iter_selected_payloads, run_task
from ..gpu.availability import check_devices_exist
from ..plan import Plan
from ..stats import RunStats
from .base import Backend, RunHandle

if TYPE_CHECKING:
    from ..io.sinks import Sink


def forward_context(plan: Plan, where: str) -> ExecutionContext:
    """The context of a process or thread that runs ``forward`` itself (no GPU workers)."""
    options = plan.options
    devices = options.gpu_worker_devices
    return ExecutionContext(
        where, device=devices[0] if devices else None, autocast=options.autocast, torch_threads=options.forward_threads
    )


def check_forward_device(plan: Plan) -> None:
    """Raises ``ValueError`` now if ``forward`` would run on a device this machine lacks."""
    devices = plan.options.gpu_worker_devices
    if plan.has_gpu_stage and devices:
        check_devices_exist(devices[:1])


class SimpleBackend(Backend):
    name = "simple"

    def run(self, plan: Plan, sink: Sink) -> RunHandle:
        check_forward_device(plan)
        return RunHandle(self._outputs(plan, sink), RunStats(self.name))

    def _outputs(self, plan: Plan, sink: Sink) -> Generator[TaskOutput, None, None]:
        ctx = forward_context(plan, "main process")
        finalize = sink.finalizer()
        task_index, key = 0, 0
        try:
            for key, payload in iter_selected_payloads(plan):
                yield from run_task(plan, Task(task_index, payload, key=key), ctx, finalize)
                task_index += 1
                key += 1  # a failure of the source is while producing the next task
        except Exception as exc:
            add_context_note(exc, f"streamproc: while running task {key} in the main process (simple backend)")
            raise
