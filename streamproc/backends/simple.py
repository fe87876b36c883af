"""The simple backend: every task in order, in the calling thread of the main process.

It is the reference: every other backend's deterministic output must equal its output.
``forward`` of ``map_gpu`` stages runs here too, on the first of ``gpu_worker_devices`` if
given (a device group: the model split over its devices, in this process), else on CUDA when
available, else on the CPU.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import TYPE_CHECKING

from ..errors import add_context_note
from ..execution.context import ExecutionContext
from ..execution.task import Task, TaskOutput, iter_selected_payloads, run_task
from ..execution.timing import StageTimer, timed_payloads
from ..gpu.availability import check_device_specs
from ..gpu.model_cache import ModelSettings
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
        where, device=devices[0] if devices else None, autocast=options.autocast, torch_threads=options.forward_threads,
        models=ModelSettings.from_options(options),
    )


#: The backends that honour ``task_timeout`` (they can kill a stuck task's process).
TASK_TIMEOUT_BACKENDS = ("multiprocessing",)


def refuse_task_timeout(plan: Plan, backend: str) -> None:
    """Raises ``ValueError`` at run start if ``task_timeout`` is set: a task running in this
    process (a thread of it) cannot be stopped. ``max_task_retries`` is accepted and has no
    effect here: no worker can die apart from the process itself."""
    timeout = plan.options.task_timeout
    if timeout is not None:
        raise ValueError(
            f"task_timeout={timeout:g} needs a backend that runs tasks in worker processes "
            f"({', '.join(repr(name) for name in TASK_TIMEOUT_BACKENDS)}); backend={backend!r} runs them in this "
            f"process, where a stuck task cannot be stopped"
        )


def check_forward_device(plan: Plan) -> None:
    """Raises ``ValueError`` now if ``forward`` would run on a device (of a group) this machine lacks."""
    devices = plan.options.gpu_worker_devices
    if plan.has_gpu_stage and devices:
        check_device_specs(devices[:1])


class SimpleBackend(Backend):
    """Every task in order in the calling thread. ``max_task_retries`` has no effect (no worker
    process can die); ``task_timeout`` is refused (see :func:`refuse_task_timeout`)."""

    name = "simple"

    def run(self, plan: Plan, sink: Sink) -> RunHandle:
        refuse_task_timeout(plan, self.name)
        check_forward_device(plan)
        stats = RunStats(self.name)
        return RunHandle(self._outputs(plan, sink, stats), stats)

    def _outputs(self, plan: Plan, sink: Sink, stats: RunStats) -> Generator[TaskOutput, None, None]:
        ctx = forward_context(plan, "main process")
        finalize = sink.finalizer()
        timer = StageTimer(plan, ctx)  # sums the tasks' stage figures: nothing built per task
        task_index, key = 0, 0
        try:
            for key, payload in timed_payloads(iter_selected_payloads(plan), stats.main):
                yield from run_task(plan, Task(task_index, payload, key=key), ctx, finalize, timer)
                task_index += 1
                key += 1  # a failure of the source is while producing the next task
        except Exception as exc:
            add_context_note(exc, f"streamproc: while running task {key} in the main process (simple backend)")
            raise
        finally:
            if ctx.local_forwards is not None:  # swaps under gpu_memory_budget
                ctx.local_forwards.add_swap_stats(stats.main)
        rest = timer.take()
        if rest is not None:
            stats.add_task(rest)
