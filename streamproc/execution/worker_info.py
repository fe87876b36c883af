"""``sp.get_worker_info()``: which worker runs the op calling it, and the current task's seed.

The info lives in a context variable. :func:`running_as` sets it around each ``next()`` of a
task's output iterator (see :func:`streamproc.execution.task.run_task`), so it is current while
the task's ops run and never leaks into the code that consumes the outputs (the main process's
loop over a simple-backend stream sees none). A GPU worker sets it once, for the process
(:func:`set_process_info`). Runs wherever tasks run: main process, worker thread, CPU worker,
GPU worker. No global mutable state beyond the context variable.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Optional, TypeVar, Union

if TYPE_CHECKING:
    from ..plan import Plan

T = TypeVar("T")

#: What kind of worker runs an op: the main process (simple backend), a thread (threads
#: backend), a CPU worker process or a GPU worker process (multiprocessing backend).
WorkerKind = Literal["main", "thread", "cpu", "gpu"]

#: The base of every task seed (a run-independent constant: the same task key gives the same
#: seed in every run, on every backend, for any worker count).
BASE_SEED = 0x5EED

_MASK64 = (1 << 64) - 1

_current: contextvars.ContextVar[Optional[Union[WorkerInfo, TaskInfo]]] = contextvars.ContextVar(
    "streamproc_worker_info", default=None
)


@dataclass(frozen=True)
class WorkerInfo:
    """Where the calling op runs, as :func:`get_worker_info` returns it.

    Attributes:
        kind: ``"main"``, ``"thread"``, ``"cpu"`` or ``"gpu"``.
        index: the worker's index among those of its kind (0 in the main process).
        rank: the shard rank of this job (``set_processing(shard=...)``; 0 unsharded, and in a
            GPU worker, which serves batches of tasks and does not know the plan's shard).
        device: the device ``forward`` runs on in this process (``"cpu"``, ``"cuda:0"``...), or
            None where forward does not run here (a CPU worker that sends batches to GPU
            workers, or a stream without ``map_gpu``). A worker owning a device group (model
            parallel) reports the group's first device, where its inputs arrive.
        seed: a 63-bit seed derived from the current task's key (its number in the whole
            stream, :attr:`~streamproc.execution.task.Task.task_key`) and a base seed: the same
            task gets the same seed on any backend and any worker count. None in a GPU worker,
            whose batches come from many tasks.
        task_key: the current task's key (None in a GPU worker).
    """

    kind: WorkerKind
    index: int
    rank: int
    device: Optional[str]
    seed: Optional[int]
    task_key: Optional[int] = None


class TaskInfo:
    """The :class:`WorkerInfo` of one task, built on first use: ``make(plan, task_key)``.

    Runs where the task runs; ``make`` is the context's
    :meth:`~streamproc.execution.context.ExecutionContext.worker_info`.
    """

    __slots__ = ("_info", "_make", "_plan", "_task_key")

    def __init__(self, make: Callable[[Plan, int], WorkerInfo], plan: Plan, task_key: int) -> None:
        self._make = make
        self._plan = plan
        self._task_key = task_key
        self._info: Optional[WorkerInfo] = None

    def resolve(self) -> WorkerInfo:
        info = self._info
        if info is None:
            info = self._info = self._make(self._plan, self._task_key)
        return info


#: What the context variable holds: a process's info (GPU worker), or a task's, built on first use.
CurrentInfo = Union[WorkerInfo, TaskInfo]


def set_current(info: CurrentInfo) -> contextvars.Token[Optional[CurrentInfo]]:
    """Makes ``info`` current (until :func:`reset_current` of the token returned)."""
    return _current.set(info)


def reset_current(token: contextvars.Token[Optional[CurrentInfo]]) -> None:
    """Restores what was current before the :func:`set_current` that returned ``token``."""
    _current.reset(token)


def task_seed(task_key: int, base_seed: int = BASE_SEED) -> int:
    """The seed of task ``task_key``: a SplitMix64 mix of the two numbers (63 bits, non-negative).

    >>> task_seed(3) == task_seed(3), task_seed(3) != task_seed(4)
    (True, True)
    """
    z = (base_seed * 0x9E3779B97F4A7C15 + task_key + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def get_worker_info() -> WorkerInfo:
    """The :class:`WorkerInfo` of the worker running the calling op (inside a running op only).

    Call it from a ``map``/``filter``/``map_batches``/``map_gpu`` callable, or from the
    constructor of a class passed to them (built once per worker, where it runs). Seed random
    generators with ``info.seed`` so that a stochastic op gives the same output whatever the
    backend and the number of workers::

        def augment(record):
            rng = random.Random(sp.get_worker_info().seed)   # one generator per task, ideally cached
            ...

    Raises:
        RuntimeError: called outside a running op (e.g. in the main program, or while
            iterating over a stream's outputs).
    """
    info = _current.get()
    if isinstance(info, TaskInfo):
        return info.resolve()
    if info is None:
        raise RuntimeError(
            "sp.get_worker_info() is only valid inside a running op (a map, filter, map_batches or "
            "map_gpu callable, or the constructor of a class passed to one); it was called outside any run"
        )
    return info


def current_worker_info() -> Optional[WorkerInfo]:
    """The current info, or None outside a running op (for streamproc's own code)."""
    info = _current.get()
    return info.resolve() if isinstance(info, TaskInfo) else info


def running_as(it: Iterator[T], info: CurrentInfo) -> Iterator[T]:
    """Yields from ``it`` with ``info`` current during each of its ``next()`` calls (not between).

    Two context-variable operations per item (a task's chunk): never per record. Closing this
    iterator closes ``it`` (with ``info`` current, as its clean-up may run user code).
    """
    try:
        while True:
            token = _current.set(info)
            try:
                item = next(it)
            except StopIteration:
                return
            finally:
                _current.reset(token)
            yield item
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            token = _current.set(info)
            try:
                close()
            finally:
                _current.reset(token)


def set_process_info(info: WorkerInfo) -> None:
    """Makes ``info`` current for the rest of this thread's life (a GPU worker's main loop)."""
    _current.set(info)
