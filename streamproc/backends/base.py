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

from abc import ABC, abstractmethod
from collections.abc import Generator
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Optional

from ..stats import RunStats

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
    ``stats`` as they are delivered.
    """

    def __init__(self, outputs: Generator[TaskOutput, None, None], stats: RunStats) -> None:
        self._outputs = outputs
        self.stats = stats

    def __iter__(self) -> RunHandle:
        return self

    def __next__(self) -> TaskOutput:
        try:
            output = next(self._outputs)
        except StopIteration:
            self.stats.finished = True
            raise
        self.stats.records_out += output.count
        if output.last:
            self.stats.tasks_done += 1
        return output

    def close(self) -> None:
        """Stops the run and reaps what it started (idempotent)."""
        self._outputs.close()

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
