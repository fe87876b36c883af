"""Messages between the main process and CPU workers, named by their role (loky style).

Every message is a small frozen dataclass pickled with the standard pickle (protocol 5) and
sent with ``Connection.send_bytes``; control messages are never bare ints or strings.

Main -> worker (task pipe):   ``Task`` ... ``Task``, then ``Stop``.
Worker -> main (result pipe): for each task, ``TaskChunk`` x n (the last one has ``last=True``)
or a ``TaskFailed``; ``WorkerFailed`` if the worker cannot start. With a worker-side sink
(``write_parquet`` with ``deterministic=False``), chunks carry only counts, and the worker
answers ``Stop`` with ``SinkClosed`` once its last part file is complete.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...execution.task import Task  # noqa: F401 (the main -> worker message is the shared core's Task)


@dataclass(frozen=True)
class WorkerId:
    """Names a worker: ``WorkerId("cpu", 3)`` is shown as ``cpu worker 3``."""

    kind: str
    index: int

    def __str__(self) -> str:
        return f"{self.kind} worker {self.index}"


@dataclass(frozen=True)
class Stop:
    """Asks a worker to exit once it has finished the tasks sent before."""


@dataclass(frozen=True)
class TaskChunk:
    """Up to ``chunk_size`` outputs of task ``task_index``; chunks of a task arrive in order."""

    task_index: int
    chunk: Any
    count: int
    last: bool


@dataclass(frozen=True)
class TaskFailed:
    """Task ``task_index`` raised; ``error`` is an ``ExceptionWithTraceback`` (the user's type)."""

    task_index: int
    error: Any


@dataclass(frozen=True)
class SinkClosed:
    """The worker wrote its last part file (worker-side sinks): the parts and their rows."""

    worker: WorkerId
    paths: list[str]
    rows: int


@dataclass(frozen=True)
class WorkerFailed:
    """The worker could not start (for example, the plan failed to unpickle)."""

    worker: WorkerId
    error: Any


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
    """Run forward of stage ``stage`` (index into the plan's ops) on ``batch`` (CPU tensors)."""

    stage: int
    batch_id: int
    batch: Any


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
class NoMoreBatches:
    """The CPU worker is stopping: it will send this GPU worker nothing more."""
