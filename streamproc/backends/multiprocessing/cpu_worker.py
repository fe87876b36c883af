"""The CPU worker process: runs every op of a run's plan on the tasks it is sent.

Protocol: the worker says ``WorkerStarted``, then reads its task pipe. ``StartRun`` brings a
run's plan (loaded once, kept by run id: on a warm pool several runs' tasks interleave in one
pipe, each run with its own plan, context and stage timer); for each ``Task`` it sends the task's outputs as ``TaskChunk``
messages, the last with ``last=True``, or a ``TaskFailed`` carrying the user's exception and
traceback; ``EndRun`` completes what the run wrote here and is answered with ``RunEnded``.
An ``IsolatedTask`` runs record by record (see :mod:`.isolation`); with ``task_timeout`` a
watchdog thread may send ``TaskStuck`` (see :mod:`.watchdog`). With GPU workers, the next
task may start while one waits for its last GPU batches (see :mod:`.task_overlap`); its
messages still follow the task before it. It exits on ``Stop``, when its parent dies, or when a pipe breaks.

Only what a child process needs is imported here.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Sequence
from typing import Any, Optional

from ...errors import ExceptionWithTraceback, SerializationError
from ...execution.context import ExecutionContext
from ...execution.serialization import dill_loads, dumps_message, loads_message
from ...execution.task import Task, run_task
from ...execution.timing import StageTimer
from ...gpu.forward import phased
from ...gpu.model_cache import ModelSettings
from ...ops import MapGPU
from .crash_isolation import run_isolated
from .gpu_client import GPUChannel, GPUClient, RemoteForwardRunner
from .log_forwarding import apply_log_levels, forward_worker_logs
from .messages import (
    EndRun,
    IsolatedTask,
    RunEnded,
    StartRun,
    Stop,
    TaskChunk,
    TaskFailed,
    WorkerFailed,
    WorkerId,
    WorkerStarted,
)
from .task_overlap import AheadTask, TaskOverlap, TaskTurn
from .watchdog import TaskWatchdog
from .worker_runtime import as_crash, start_worker_process
from .worker_stats import WorkerClock


class _ResultSender:
    """Pickles and sends result messages; one that cannot be pickled becomes an error that can."""

    def __init__(self, conn: Any, worker: WorkerId, clock: Optional[WorkerClock] = None) -> None:
        self.conn = conn
        self.worker = worker
        # The task's thread and the watchdog's thread both send (see .watchdog).
        self._lock = threading.Lock()
        self.watchdog: Optional[TaskWatchdog] = None
        self.clock = clock

    def send(self, message: Any) -> None:
        try:
            data = dumps_message(message)
        except Exception as exc:
            data = dumps_message(self._unpicklable(message, exc))
        watchdog = self.watchdog
        if watchdog is None:  # the connection's own lock serialises this with log records
            self._send_bytes(data)
            return
        with self._lock:
            watchdog.sending = True  # waiting for the main process to read is not being stuck
            try:
                self._send_bytes(data)
            finally:
                watchdog.sending = False

    def _send_bytes(self, data: bytes) -> None:
        if self.clock is not None:  # a full pipe blocks here: backpressure from the main process
            self.clock.blocked_sending(self.conn.send_bytes, data)
        else:
            self.conn.send_bytes(data)

    def _unpicklable(self, message: Any, exc: Exception) -> Any:
        task = getattr(message, "task_index", None)
        what = "the exception raised in" if isinstance(message, TaskFailed) else "an output of"
        where = f"task {task}" if task is not None else "its run"
        error = SerializationError(f"{what} {where} cannot be pickled to send it back from {self.worker}: {exc}")
        carrier = ExceptionWithTraceback(error, f"{self.worker}, {where}")
        if isinstance(message, (TaskChunk, TaskFailed)):
            return TaskFailed(message.run_id, message.task_index, carrier)
        return WorkerFailed(self.worker, carrier, getattr(message, "run_id", None))


class _RunState:
    """What the worker holds for the run it is in: plan, context, and its own part writer."""

    def __init__(self, start: StartRun, worker: WorkerId, client: Optional[GPUClient]) -> None:
        self.run_id = start.run_id
        self.plan, finalize, writers = dill_loads(start.plan_bytes)
        options = self.plan.options
        models = ModelSettings.from_options(options)
        last_gpu_stage = max((stage.index for stage in self.plan.stages if isinstance(stage.op, MapGPU)), default=None)
        run_id = self.run_id
        make_runner = (
            (lambda stage: phased(RemoteForwardRunner(client, stage.index, run_id, stage.index == last_gpu_stage), models))
            if client is not None
            else None
        )
        # Without GPU workers (num_gpu_workers=0), forward runs here, on the CPU: CPU workers
        # never initialise CUDA (see design.md section 3).
        self.ctx = ExecutionContext(
            str(worker), device="cpu", autocast=options.autocast, torch_threads=options.forward_threads,
            make_forward_runner=make_runner, kind="cpu", index=worker.index, models=models,
        )
        # A run that writes in workers (write_parquet, see io/worker_parts.py) writes here:
        # the writer runs each task (a part group) into its file, and only counts go back.
        self.writer = writers.open_in_worker(worker.index) if writers is not None else None
        self.finalize = finalize
        # The run's stage figures are summed here and sent now and then (RunEnded: the rest),
        # unless the main process needs each task's own (see StartRun.per_task_stats).
        self.timer = None if start.per_task_stats else StageTimer(self.plan, self.ctx)
        self.per_task_stats = start.per_task_stats
        self.has_gpu_workers = client is not None
        self.models = models

    def may_overlap_tasks(self, task_timeout: Optional[float]) -> bool:
        """Whether this run's next task may start while one drains (see :mod:`.task_overlap`)."""
        options = self.plan.options
        return (
            self.has_gpu_workers
            and self.plan.has_gpu_stage
            and task_timeout is None
            and self.writer is None
            and not self.per_task_stats
            and options.on_error == "raise"
            and self.models.memory_budget is None
        )

    def end(self) -> tuple[list[str], Optional[int]]:
        """Completes this worker's part files (if any): their paths and rows (None: it wrote none)."""
        writer, self.writer = self.writer, None
        return writer.close() if writer is not None else ([], None)

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()
            self.writer = None


def run_cpu_worker(
    index: int,
    task_conn: Any,
    result_conn: Any,
    parent_pid: int,
    inherited: Sequence[Any] = (),
    gpu_channels: Optional[dict[int, GPUChannel]] = None,
    gpu_cycle: Optional[list[int]] = None,
    alive_conn: Any = None,
    task_timeout: Optional[float] = None,
    progress: Any = None,
) -> None:
    """Entry point of process ``streamproc-cpu-<index>``. See the module docstring.

    With GPU workers, ``gpu_channels`` maps each GPU worker of this worker's dispatch cycle
    ``gpu_cycle`` to its channel (batch pipe writer, output pipe reader, liveness pipe);
    ``map_gpu`` stages then send their prepared batches there instead of running forward here.
    ``alive_conn`` is the write end of this worker's liveness pipe (with GPU workers): held,
    never written; its GPU workers see EOF when this process ends. ``inherited``: see
    :func:`.worker_runtime.start_worker_process`. ``task_timeout`` starts the stuck-task
    watchdog, which publishes progress in the shared double ``progress`` (see :mod:`.watchdog`).
    """
    worker = WorkerId("cpu", index)
    start_worker_process(worker, parent_pid, inherited)
    clock = WorkerClock(str(worker), "cpu")
    result_conn = forward_worker_logs(worker, result_conn)
    sender = _ResultSender(result_conn, worker, clock)
    client = GPUClient(worker, gpu_channels, gpu_cycle or [], parent_pid) if gpu_channels else None
    runs: dict[int, _RunState] = {}  # the active runs (one, but on a warm pool shared by several)
    if task_timeout is not None:
        sender.watchdog = TaskWatchdog(worker, task_timeout, sender.send, progress)

    def run_task_in_turn(message: Task | IsolatedTask, turn: TaskTurn) -> None:
        task = message.task if isinstance(message, IsolatedTask) else message
        _run_task(runs[task.run_id], message, sender, worker, turn)

    overlap = TaskOverlap(worker, task_conn, run_task_in_turn)
    if client is not None:
        client.overlap = overlap
    try:
        sender.send(WorkerStarted(worker))
        while True:
            message = overlap.next_message(lambda: loads_message(clock.waiting_for_input(task_conn.recv_bytes)))
            if isinstance(message, AheadTask):  # started while the task before it drained
                clock.busy(message.join)
            elif isinstance(message, (Task, IsolatedTask)):
                task = message.task if isinstance(message, IsolatedTask) else message
                assert task.run_id in runs, f"task of run {task.run_id} outside it"
                clock.busy(overlap.run, message)
            elif isinstance(message, StartRun):
                if not runs:  # overlapping runs share the process figures (see RunEnded.stats)
                    clock.begin_run()
                runs[message.run_id] = started = _start_run(message, worker, client, sender)
                # Tasks overlap within one run, while it has the worker alone (a shared worker's
                # pipe interleaves runs: the task read ahead would be another run's).
                overlap.run_id = started.run_id if len(runs) == 1 and started.may_overlap_tasks(task_timeout) else None
                clock.loaded()
            elif isinstance(message, EndRun):
                overlap.run_id = None
                ended = runs.pop(message.run_id, None)
                if ended is not None:
                    _end_run(ended, sender, worker, clock)
                    if runs:
                        clock.begin_run()
            elif isinstance(message, Stop):
                break
    except (EOFError, BrokenPipeError):
        pass  # the main process closed our pipes: it is shutting down
    finally:
        if sender.watchdog is not None:
            sender.watchdog.stop()
        for run in runs.values():
            run.abort()
        if client is not None:
            client.close()
        result_conn.close()


def _start_run(start: StartRun, worker: WorkerId, client: Optional[GPUClient], sender: _ResultSender) -> _RunState:
    apply_log_levels(start.log_levels)
    try:
        return _RunState(start, worker, client)
    except BaseException as exc:
        error = as_crash(exc, worker, "while loading the stream")
        loading = ExceptionWithTraceback(error, f"{worker}, while loading the stream")
        sender.send(WorkerFailed(worker, loading, start.run_id))
        sys.exit(1)


def _end_run(run: _RunState, sender: _ResultSender, worker: WorkerId, clock: WorkerClock) -> None:
    try:
        paths, rows = run.end()
    except Exception as exc:
        sender.send(WorkerFailed(worker, ExceptionWithTraceback(exc, f"{worker}, completing its part files"), run.run_id))
        return
    stats = clock.run_stats()
    if run.ctx.local_forwards is not None:  # forward ran here (no GPU workers): its swaps
        run.ctx.local_forwards.add_swap_stats(stats)
    tasks = run.timer.take() if run.timer is not None else None
    sender.send(RunEnded(run.run_id, worker, paths, rows, stats, tasks))


def _run_task(
    run: _RunState, message: Task | IsolatedTask, sender: _ResultSender, worker: WorkerId, turn: Optional[TaskTurn] = None
) -> None:
    """Runs one task (the worker's main thread, or a task's own thread: see :mod:`.task_overlap`).

    Its messages go out in ``turn``: after the last one of the task before it.
    """
    task = message.task if isinstance(message, IsolatedTask) else message
    send: Any = sender.send if turn is None else (lambda out: turn.send(sender.send, out))
    watchdog = sender.watchdog
    if watchdog is not None:
        watchdog.begin_task(run.run_id, task.index)
    try:
        if isinstance(message, IsolatedTask):
            begin_record = watchdog.begin_record if watchdog is not None else (lambda row: None)
            run_isolated(run.plan, message, run.ctx, run.finalize, send, begin_record)
        else:
            # A run that writes in workers gets whole part groups (never retried: see retries.py).
            if run.writer is not None:
                outputs = run.writer.run_group(run.plan, task, run.ctx, run.timer)
            else:
                timer = None if turn is not None and turn.ahead else run.timer  # see TaskTurn.ahead
                outputs = run_task(run.plan, task, run.ctx, run.finalize, timer)
            for output in outputs:
                send(TaskChunk(run.run_id, output))
    except BaseException as exc:
        error = as_crash(exc, worker, f"in task {task.index}")
        send(TaskFailed(run.run_id, task.index, ExceptionWithTraceback(error, f"{worker}, task {task.index}")))
        if error is not exc:
            raise  # the worker ends (sys.exit in user code): see as_crash
    finally:
        if watchdog is not None:
            watchdog.end_task()
