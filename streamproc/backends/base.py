"""The backend contract: run a :class:`~streamproc.plan.Plan` and stream its output chunks.

A backend turns a plan into an iterator of ``(chunk, record_count)`` pairs, where a chunk is a
list of output records, or what the sink's ``finalize`` made of one (an Arrow table, JSON
text) in the process that ran the task. Chunks come in source order when
``plan.options.deterministic`` is True.

Example subclass (the simple backend, in full)::

    class SimpleBackend(Backend):
        name = "simple"

        def iter_chunks(self, plan, finalize=None):
            ctx = ExecutionContext("main process")
            for payload in plan.source.iter_tasks(plan.task_size):
                yield from iter_task_chunks(plan, payload, ctx, finalize)

Lifecycle guarantee: the returned iterator owns every process and thread the backend
starts; exhausting it, raising from it, or closing it (``close()``, garbage collection) stops
and reaps them all.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from ..execution import ChunkFinalizer
    from ..plan import Plan


class Backend(ABC):
    name: str

    @abstractmethod
    def iter_chunks(self, plan: Plan, finalize: Optional[ChunkFinalizer] = None) -> Iterator[tuple[Any, int]]:
        """Yields ``(chunk, record_count)`` pairs; see the module docstring."""


def get_backend(name: str) -> Backend:
    """The backend called ``name`` (imported on demand: workers' modules stay out of the core)."""
    if name == "simple":
        from .simple import SimpleBackend

        return SimpleBackend()
    if name == "multiprocessing":
        from .multiprocessing.executor import MultiprocessingBackend

        return MultiprocessingBackend()
    raise ValueError(f"unknown backend {name!r}")
