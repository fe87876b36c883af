"""The CPU worker actor: runs whole tasks of a run's plan through the shared core (runs in a Ray actor).

Protocol: the actor is constructed bare (its index only: nothing to load, so it starts in the
time Ray takes to start a worker process) and may serve several runs in turn (a warm actor, see
:mod:`.actor_pool`). :meth:`CPUWorker.begin_run` brings a run's plan (one object in the object
store, the same for every actor: dill bytes of ``(cpu_plan, finalize, worker_writers)``),
loaded once, and answers where the actor runs or why the plan did not load. Each
:meth:`CPUWorker.run_task` call gets one pickled :class:`~streamproc.execution.task.Task` (a
part group when the actors write parquet parts) and answers one pickled :class:`TaskResult`:
every output chunk of the task, then the error that ended it, if any (a user exception travels
as an :class:`~streamproc.errors.ExceptionWithTraceback`). :meth:`CPUWorker.end_run`
completes the part files this actor wrote, returns its stats and drops the run's plan.

Only what a task needs is imported here: no torch unless the plan's ops import it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

from ...errors import ExceptionWithTraceback, SerializationError
from ...execution.context import ExecutionContext
from ...execution.serialization import dill_loads, dumps_message, loads_message
from ...execution.task import Task, TaskOutput, run_task
from ...execution.timing import StageTimer
from ...stats import ProcessStats, TaskStats
from ..multiprocessing.messages import WorkerId
from ..multiprocessing.worker_runtime import as_crash
from ..multiprocessing.worker_stats import WorkerClock
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
    #: The run's stage figures summed here and not yet sent with an output (None: none).
    tasks: Optional[TaskStats] = None


class _RunState:
    """What a CPU worker actor holds for the run it is in: plan, context, part writer, timer."""

    def __init__(
        self, worker: WorkerId, plan_bytes: bytes, gpus: Sequence[Any], gpu_places: Sequence[ActorPlace],
        gpu_cycle: Sequence[int], per_task_stats: bool,
    ) -> None:
        from ...gpu.forward import phased
        from ...gpu.model_cache import ModelSettings

        self.plan, self.finalize, writers = dill_loads(plan_bytes)
        options = self.plan.options
        models = ModelSettings.from_options(options)
        make_runner = (
            (lambda stage: phased(RayForwardRunner(gpus, gpu_places, gpu_cycle, stage.index), models)) if gpus else None
        )
        # Without GPU workers, forward runs here on the CPU: CPU workers never touch CUDA.
        self.ctx = ExecutionContext(
            str(worker), device="cpu", autocast=options.autocast, torch_threads=options.forward_threads,
            make_forward_runner=make_runner, kind="cpu", index=worker.index, models=models,
        )
        # deterministic=False write_parquet: this actor writes whole part groups into their files.
        self.writer = writers.open_in_worker(worker.index) if writers is not None else None
        # Stage figures are summed here and sent now and then (and at end_run), unless the
        # driver needs each task's own: a run that replaces dead actors (max_task_retries).
        self.timer = None if per_task_stats else StageTimer(self.plan, self.ctx)


class CPUWorker:
    """Ray actor ``streamproc-<token>-cpu-<index>``; see the module docstring."""

    def __init__(self, index: int) -> None:
        import faulthandler

        faulthandler.enable()
        self.worker = WorkerId("cpu", index)
        self.name = f"ray {self.worker}"
        # Stats and stage rows know workers by their WorkerId name ("cpu worker 0"), on every backend.
        self.clock = WorkerClock(str(self.worker), "cpu")
        self.run: Optional[_RunState] = None
        self.load_error: Any = None

    def begin_run(
        self, plan_bytes: bytes, gpus: Sequence[Any] = (), gpu_places: Sequence[ActorPlace] = (),
        gpu_cycle: Sequence[int] = (), per_task_stats: bool = False,
    ) -> ActorStarted:
        """Loads a run's plan (Ray hands the object store's bytes); where this actor runs, or why it failed.

        ``gpus``: the run's GPU worker actors (empty: forward runs here, on the CPU);
        ``gpu_places``: where they run (for errors); ``gpu_cycle``: those this actor sends its batches
        to, in order (:func:`~streamproc.execution.schedule.get_dispatch_schedule`).
        """
        self.clock.begin_run()
        self.run, self.load_error = None, None
        try:
            self.run = _RunState(self.worker, plan_bytes, gpus, gpu_places, gpu_cycle, per_task_stats)
        except BaseException as exc:  # the user's __setstate__ or import raised: the run's error, not a crash
            crash = as_crash(exc, self.worker, "while loading the stream")
            self.load_error = ExceptionWithTraceback(crash, f"{self.name}, while loading the stream")
        self.clock.loaded()
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
        run = self.run
        if run is None:  # the driver sends tasks only after begin_run answered without an error
            raise RuntimeError(f"{self.name} got task {task.task_key} outside a run")
        if run.writer is not None:
            outputs.extend(run.writer.run_group(run.plan, task, run.ctx, run.timer))
        else:
            outputs.extend(run_task(run.plan, task, run.ctx, run.finalize, run.timer))

    def end_run(self) -> RunEnd:
        """Completes this actor's part files (if it writes any); its stats; drops the run's plan."""
        run, self.run = self.run, None
        paths: list[str] = []
        rows: Optional[int] = None
        tasks: Optional[TaskStats] = None
        if run is not None:
            if run.writer is not None:
                paths, rows = run.writer.close()
            tasks = run.timer.take() if run.timer is not None else None
        stats = self.clock.run_stats()
        stats.input_wait_seconds = max(0.0, stats.wall_seconds - stats.startup_seconds - stats.busy_seconds)
        return RunEnd(tuple(paths), rows, stats, tasks)
