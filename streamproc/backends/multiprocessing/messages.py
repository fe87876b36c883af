"""Messages between the processes of the multiprocessing backend, named by their role (loky style).

Every message is a small frozen dataclass pickled with the standard pickle (protocol 5, dill
as a fallback) and sent with ``Connection.send_bytes``; control messages are never bare ints
or strings. Run-scoped messages carry the ``run_id`` of the run they belong to, so a pool
kept warm across runs can never mix two runs' tasks or results.

Main -> CPU worker (task pipe): ``StartRun``, ``Task`` ... ``Task``, ``EndRun``; then ``Stop``.
A task being isolated after crashes (see :mod:`.retries`) comes as an ``IsolatedTask``, whose
worker says ``RecordStarted`` before each record; a watchdog thread of the worker may send
``TaskStuck`` when ``task_timeout`` passes without progress.
CPU worker -> main (result pipe): ``WorkerStarted`` first; per task, ``TaskChunk`` x n (the last
with ``last=True``) or a ``TaskFailed``; ``RunEnded`` in answer to ``EndRun`` (with the rows its
own part files hold when the run writes in workers); ``WorkerFailed`` when it cannot go on.
GPU worker -> main (status pipe): ``WorkerStarted``, then ``WorkerDone`` at a normal end, or
``WorkerFailed``. Main -> GPU worker (control pipe, pools that replace workers): ``PeerReplaced``;
on a warm pool (:class:`streamproc.WorkerPool`), ``StartGPURun`` before each run's first task and
``EndGPURun`` after its last. Runs sharing a warm pool interleave on its workers: a CPU worker
holds the plan of every run it was sent ``StartRun`` for until that run's ``EndRun``, and a GPU
worker serves each ``ForwardRequest`` with the forward of its ``(run_id, stage)``.
A worker that exits without its last message has crashed, whatever its
exit code. Any worker -> main pipe may also carry ``LogRecordMessage``s at any time (the
worker's ``logging`` records, see :mod:`.log_forwarding`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from ...execution.task import Task, TaskOutput
from ...stats import ProcessStats, TaskStats


@dataclass(frozen=True)
class WorkerId:
    """Names a worker: ``WorkerId("cpu", 3)`` is shown as ``cpu worker 3``."""

    kind: str
    index: int

    def __str__(self) -> str:
        return f"{self.kind} worker {self.index}"


#: ``(logger name, level)`` pairs, ``""`` for the root logger: the main process's logging levels.
LogLevels = tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class StartRun:
    """Run ``run_id`` begins: ``plan_bytes`` is the dill of ``(cpu plan, finalize, worker writers)``.

    ``log_levels``: the main process's logging levels, for the worker to apply.
    ``per_task_stats``: send each task's stats with its last output (a run that replaces dead
    workers: what a dead worker had summed would be lost), instead of summing them in the
    worker (sent now and then, and the rest in ``RunEnded``).
    """

    run_id: int
    plan_bytes: bytes
    log_levels: LogLevels = ()
    per_task_stats: bool = False


@dataclass(frozen=True)
class EndRun:
    """Run ``run_id`` hands out no more tasks: complete what it wrote here, answer ``RunEnded``."""

    run_id: int


@dataclass(frozen=True)
class Stop:
    """Asks a worker to exit once it has finished what was sent before."""


@dataclass(frozen=True)
class WorkerStarted:
    """The worker runs streamproc code (sent first: a worker dying before it died at start-up)."""

    worker: WorkerId


@dataclass(frozen=True)
class WorkerDone:
    """A GPU worker ends normally: all its CPU peers said ``NoMoreBatches``; ``stats``: its run's figures."""

    worker: WorkerId
    stats: Optional[ProcessStats] = None


@dataclass(frozen=True)
class TaskChunk:
    """One :class:`TaskOutput` (up to ``chunk_size`` outputs of a task); a task's chunks arrive in order."""

    run_id: int
    output: TaskOutput

    @property
    def task_index(self) -> int:
        return self.output.task_index

    @property
    def last(self) -> bool:
        return self.output.last


@dataclass(frozen=True)
class TaskFailed:
    """Task ``task_index`` raised; ``error`` is an ``ExceptionWithTraceback`` (the user's type)."""

    run_id: int
    task_index: int
    error: Any


@dataclass(frozen=True)
class RunEnded:
    """The worker finished run ``run_id``; ``rows`` its part files hold (None: it wrote none).

    ``stats``: its process figures; ``tasks``: its tasks' stage figures not yet sent (None: none).
    """

    run_id: int
    worker: WorkerId
    paths: list[str]
    rows: Optional[int]
    stats: Optional[ProcessStats] = None
    tasks: Optional[TaskStats] = None


@dataclass(frozen=True)
class WorkerFailed:
    """The worker cannot go on with run ``run_id`` (its plan failed to load, its part files failed
    to complete...); ``run_id`` None: with any run (it is ending)."""

    worker: WorkerId
    error: Any
    run_id: Optional[int] = None


@dataclass(frozen=True)
class LogRecordMessage:
    """A ``logging`` record emitted in ``worker``: a pickle-safe ``LogRecord.__dict__``."""

    worker: WorkerId
    record: dict[str, Any]


@dataclass(frozen=True)
class ChannelKey:
    """The endpoints of one CPU worker -> GPU worker pipe pair (batches one way, outputs back)."""

    src: WorkerId
    dst: WorkerId


# CPU worker <-> GPU worker (one pipe pair per ChannelKey):
#   CPU -> GPU: ForwardRequest ... ForwardRequest, then NoMoreBatches when the CPU worker stops.
#   GPU -> CPU: one ForwardResult or ForwardFailed per request, in the order of the requests.


@dataclass(frozen=True)
class ForwardRequest:
    """Run forward of stage ``stage`` (1-based index into the plan's stages) of run ``run_id`` on
    ``batch`` (CPU tensors); ``run_id`` None: of the one run the GPU worker was started for."""

    stage: int
    batch_id: int
    batch: Any
    run_id: Optional[int] = None


@dataclass(frozen=True)
class ForwardResult:
    batch_id: int
    outputs: Any


@dataclass(frozen=True)
class ForwardFailed:
    """``forward`` raised on this batch; ``error`` is an ``ExceptionWithTraceback``."""

    batch_id: int
    error: Any


@dataclass(frozen=True)
class PeerReplaced:
    """Main -> GPU worker (control pipe): CPU worker ``peer`` was replaced; its new pipe ends
    (batch reader, output writer, liveness reader) follow as descriptors."""

    peer: int


@dataclass(frozen=True)
class StartGPURun:
    """Main -> GPU worker (control pipe), on a warm pool: run ``run_id``'s ``map_gpu`` stages.

    ``forwards_bytes`` is the dill of ``(forwards, autocast, torch_threads, log levels, model
    settings)``, as a GPU worker of a one-run pool gets at start-up. Sent before any CPU worker
    gets the run's ``StartRun``, so it is read before the run's first ``ForwardRequest``. The
    worker keeps its model caches: a model equal to one already on the device is not moved again.
    """

    run_id: int
    forwards_bytes: bytes


@dataclass(frozen=True)
class EndGPURun:
    """Main -> GPU worker (control pipe), on a warm pool: run ``run_id`` sends no more batches;
    its stages' forwards are dropped (their models stay in the worker's model cache)."""

    run_id: int


@dataclass(frozen=True)
class NoMoreBatches:
    """The CPU worker is stopping: it will send this GPU worker nothing more."""


# Retries and stuck tasks (see :mod:`.retries` and :mod:`.watchdog`).


@dataclass(frozen=True)
class IsolatedTask:
    """Run ``task`` record by record, from its record ``start_row`` on (records before it are done).

    Each record goes alone through every stage; the worker says ``RecordStarted`` before each
    one, so that when the worker dies (or hangs) the main process knows the record.
    """

    task: Task
    start_row: int

    @property
    def index(self) -> int:
        return self.task.index


@dataclass(frozen=True)
class RecordStarted:
    """Isolation: the worker starts record ``row`` of task ``task_index``; ``record`` is its text."""

    run_id: int
    task_index: int
    row: int
    record: str


@dataclass(frozen=True)
class TaskStuck:
    """The worker's watchdog saw no record or batch of task ``task_index`` finish for ``seconds``.

    ``stage`` is the stage the worker is in, ``row`` the record (isolation only, else None),
    ``stack`` the formatted Python stack of the thread running the task.
    """

    run_id: int
    task_index: int
    worker: WorkerId
    pid: int
    stage: str
    row: Optional[int]
    seconds: float
    stack: str
