"""The CPU worker actor: runs whole tasks of a run's plan through the shared core (runs in a Ray actor).

Protocol: the actor is constructed with the run's plan (one object in the object store, the
same for every actor: dill bytes of ``(cpu_plan, finalize, worker_writers)``), loaded once;
:meth:`CPUWorker.place` says where it runs. Each :meth:`CPUWorker.run_task` call gets one
pickled :class:`~streamproc.execution.task.Task` (a part group when the actors write parquet
parts) and answers one pickled :class:`TaskResult`: every output chunk of the task, then the
error that ended it, if any (a user exception travels as an
:class:`~streamproc.errors.ExceptionWithTraceback`). :meth:`CPUWorker.end_run` completes the
part files this actor wrote and returns its stats.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

from ...errors import ExceptionWithTraceback, SerializationError
from ...execution.context import ExecutionContext
from ...execution.serialization import dill_loads, dumps_message, loads_message
from ...execution.task import Task, TaskOutput, run_task
from ...stats import ProcessStats
from ..multiprocessing.messages import WorkerId
from ..multiprocessing.worker_runtime import as_crash
from .gpu import ActorPlace, ActorStarted, RayForwardRunner, actor_place


@dataclass(frozen=True)
class TaskResult:
    """What one task gave: its output chunks in order, then the error that ended it (or None)."""

    task_index: int
    outputs: tuple[TaskOutput, ...]
    error: Any = None  # an ExceptionWithTraceback where it is made; unpickled, the exception


@dataclass(frozen=True)
class RunEnd:
    """An actor's end of a run: the part files it wrote (paths, rows; None: no writer) and its stats."""

    paths: tuple[str, ...]
    rows: Optional[int]
    stats: ProcessStats


class CPUWorker:
    """Ray actor ``streamproc-<run>-cpu-<index>``; see the module docstring.

    Args:
        plan_bytes: the run's plan (passed as an object reference: Ray hands the actor its value).
        gpus: the run's GPU worker actors (empty: forward runs here, on the CPU).
        gpu_places: where each GPU worker runs, for error messages.
        gpu_cycle: the GPU workers this actor sends its batches to, in order.
    """

    def __init__(
        self,
        index: int,
        plan_bytes: bytes,
        gpus: Sequence[Any] = (),
        gpu_places: Sequence[ActorPlace] = (),
        gpu_cycle: Sequence[int] = (),
    ) -> None:
        import faulthandler

        from ..multiprocessing.worker_stats import WorkerClock

        faulthandler.enable()
        self.worker = WorkerId("cpu", index)
        self.name = f"ray {self.worker}"
        # Stats and stage rows know workers by their WorkerId name ("cpu worker 0"), on every backend.
        self.clock = WorkerClock(str(self.worker), "cpu")
        self.load_error: Any = None
        self.writer: Any = None
        try:
            self.plan, self.finalize, writers = dill_loads(plan_bytes)
            options = self.plan.options
            make_runner = (lambda stage: RayForwardRunner(gpus, gpu_places, gpu_cycle, stage.index)) if gpus else None
            # Without GPU workers, forward runs here on the CPU: CPU workers never touch CUDA.
            self.ctx = ExecutionContext(
                str(self.worker), device="cpu", autocast=options.autocast, torch_threads=options.forward_threads,
                make_forward_runner=make_runner, kind="cpu", index=index,
            )
            # deterministic=False write_parquet: this actor writes whole part groups into their files.
            self.writer = writers.open_in_worker(index) if writers is not None else None
        except BaseException as exc:  # reported by place(): an actor whose constructor raises only says it died
            crash = as_crash(exc, self.worker, "while loading the stream")
            self.load_error = ExceptionWithTraceback(crash, f"{self.name}, while loading the stream")
        self.clock.loaded()

    def place(self) -> ActorStarted:
        """Where this actor runs, or why it could not load the plan (the driver's first call)."""
        return ActorStarted(actor_place(self.name), self.load_error)

    def run_task(self, task_bytes: bytes) -> bytes:
        """Runs one task to its end; returns the pickled :class:`TaskResult` (never raises)."""
        task: Task = loads_message(task_bytes)
        outputs: list[TaskOutput] = []
        error: Optional[ExceptionWithTraceback] = None
        try:
            self.clock.busy(self._run, task, outputs)
        except BaseException as exc:
            # sys.exit() in user code, re-raised as is in the driver, would end the user's program.
            crash = as_crash(exc, self.worker, f"in task {task.task_key}")
            error = ExceptionWithTraceback(crash, f"{self.name}, task {task.task_key}")
        result = TaskResult(task.index, tuple(outputs), error)
        try:
            return dumps_message(result)
        except Exception as exc:  # an output that cannot be pickled: say so, as an error that can
            where = f"{self.name}, task {task.task_key}"
            failure = SerializationError(f"an output of {where} cannot be pickled to send it back to the driver: {exc}")
            return dumps_message(TaskResult(task.index, (), ExceptionWithTraceback(failure, where)))

    def _run(self, task: Task, outputs: list[TaskOutput]) -> None:
        if self.writer is not None:
            outputs.extend(self.writer.run_group(self.plan, task, self.ctx))
        else:
            outputs.extend(run_task(self.plan, task, self.ctx, self.finalize))

    def end_run(self) -> RunEnd:
        """Completes this actor's part files (if it writes any); its stats for the run."""
        paths: list[str] = []
        rows: Optional[int] = None
        if self.writer is not None:
            paths, rows = self.writer.close()
            self.writer = None
        stats = self.clock.run_stats()
        stats.input_wait_seconds = max(0.0, stats.wall_seconds - stats.startup_seconds - stats.busy_seconds)
        return RunEnd(tuple(paths), rows, stats)
