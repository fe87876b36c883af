"""The backend contract: run a :class:`~streamproc.plan.Plan`, stream its :class:`TaskOutput` s.

A backend turns a plan into a :class:`RunHandle`: an iterator of
:class:`~streamproc.execution.task.TaskOutput` chunks (lists of output records, or what the
sink's ``finalize`` made of them in the process that ran the task), in task order when
``plan.options.deterministic`` is True, with ``close()`` and the run's
:class:`~streamproc.stats.RunStats`. A backend declares what it can do in
:class:`BackendCapabilities`; sinks ask (they never test a backend's name).

Example subclass (the simple backend, in full)::

    class SimpleBackend(Backend):
        name = "simple"
        capabilities = BackendCapabilities()

        def run(self, plan, sink):
            ctx = ExecutionContext("main process")
            tasks = (Task(i, p, key=k) for i, (k, p) in enumerate(iter_selected_payloads(plan)))
            outputs = (out for task in tasks for out in run_task(plan, task, ctx, sink.finalizer()))
            return RunHandle(outputs, RunStats(self.name))

Lifecycle guarantee: the handle owns every process and thread the backend starts;
exhausting it, raising from it, or closing it (``close()``, leaving a ``with`` block,
garbage collection) stops and reaps them all. Output order: a task's chunks in order; tasks
in index order when deterministic, as they finish otherwise.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Generator
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Optional, TypeVar

from ..stats import RunStats

T = TypeVar("T")

if TYPE_CHECKING:
    from ..execution.task import TaskOutput
    from ..io.sinks import Sink
    from ..plan import Plan


@dataclass(frozen=True)
class BackendCapabilities:
    """What a backend can do, for sinks and options to ask.

    Attributes:
        writes_in_workers: a sink's per-worker writers (``Sink.worker_writers``) can run where
            the tasks run, so only counts travel back to the main process.
        separate_processes: tasks run in other processes, so the plan is serialized and
            shared state (open files, locks) captured by user callables cannot work.
    """

    writes_in_workers: bool = False
    separate_processes: bool = False


class RunHandle:
    """One run of a plan: iterate it for :class:`TaskOutput` s; ``close()`` stops the run.

    Made by a backend from the generator of its outputs, whose ``close()`` (GeneratorExit at
    its current ``yield``) runs the backend's shutdown. Counts tasks and records into
    ``stats`` as they are delivered, merges each task's :class:`~streamproc.stats.TaskStats`,
    and times the main process: its wall time, and its time inside ``next()`` (waiting for
    outputs; with the simple backend, running the tasks). The backend adds what its
    processes measured (see :class:`~streamproc.stats.RunStats`) before its generator ends.
    """

    def __init__(self, outputs: Generator[TaskOutput, None, None], stats: RunStats) -> None:
        self._outputs = outputs
        self.stats = stats
        self._started = time.perf_counter()
        self._in_next_seconds = 0.0
        self._ended = False

    def __iter__(self) -> RunHandle:
        return self

    def __next__(self) -> TaskOutput:
        start = time.perf_counter()
        try:
            output = next(self._outputs)
        except StopIteration:
            self._in_next_seconds += time.perf_counter() - start
            self.stats.finished = True
            self._end()
            raise
        self._in_next_seconds += time.perf_counter() - start
        stats = self.stats
        stats.records_out += output.count
        if output.last:
            stats.tasks_done += 1
        if output.stats is not None:
            stats.add_task(output.stats)
        return output

    def timed_write(self, write: Callable[[TaskOutput], None]) -> Callable[[TaskOutput], None]:
        """``write`` (a sink's), its time added to the main process's ``sink_seconds``."""
        main = self.stats.main

        def timed(output: TaskOutput) -> None:
            start = time.perf_counter()
            try:
                write(output)
            finally:
                main.sink_seconds += time.perf_counter() - start

        return timed

    def timed_commit(self, commit: Callable[[], T]) -> T:
        """``commit()`` (a sink's, after the run's outputs), counted as sink time of the run.

        A sink may write most at its commit (a buffered last row group): the run's wall time
        and the main process's busy and sink times include it.
        """
        start = time.perf_counter()
        try:
            return commit()
        finally:
            seconds = time.perf_counter() - start
            stats, main = self.stats, self.stats.main
            main.sink_seconds += seconds
            main.busy_seconds += seconds
            main.wall_seconds += seconds
            stats.wall_seconds += seconds

    def _end(self) -> None:
        """Completes the main process's figures (once, at the end or at ``close()``)."""
        if self._ended:
            return
        self._ended = True
        stats, main = self.stats, self.stats.main
        stats.wall_seconds = main.wall_seconds = time.perf_counter() - self._started
        if stats.task_runners[0] is main:  # the tasks ran inside next(): that is the main process busy
            main.busy_seconds = stats.task_seconds
            main.input_wait_seconds = max(0.0, self._in_next_seconds - stats.task_seconds - main.source_seconds)
        else:  # start-up (serializing the plan, starting workers) happens inside the first next()
            main.input_wait_seconds = max(0.0, self._in_next_seconds - main.startup_seconds)
            main.busy_seconds = max(0.0, main.wall_seconds - self._in_next_seconds)

    def close(self) -> None:
        """Stops the run and reaps what it started (idempotent)."""
        self._outputs.close()
        self._end()

    def __enter__(self) -> RunHandle:
        return self

    def __exit__(
        self, exc_type: Optional[type[BaseException]], exc: Optional[BaseException], tb: Optional[TracebackType]
    ) -> None:
        self.close()


class Backend(ABC):
    """Runs plans. One instance per run; see the module docstring."""

    name: str
    capabilities: BackendCapabilities = BackendCapabilities()

    @abstractmethod
    def run(self, plan: Plan, sink: Sink) -> RunHandle:
        """Starts running ``plan`` for ``sink``; see the module docstring.

        ``sink.finalizer()`` runs where each task runs; when ``sink.in_workers`` is set (only
        if :attr:`capabilities` allows it), each worker writes through
        ``sink.worker_writers().open_in_worker(i)`` instead and only counts come back.

        Raises:
            ValueError: an option this backend cannot honour on this machine (a worker count
                far above the CPUs, a device that is not there), before anything starts.
        """
