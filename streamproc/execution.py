"""Running one task: read its records, chain the ops, cut the outputs into chunks.

This is the one code path that every backend shares, so that a task produces the same
records in the main process (simple backend) as in a CPU worker (multiprocessing backend).
It runs wherever the backend calls it; it starts no process and no thread.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Optional, Protocol

from .ops import MapGPU, _tagged

if TYPE_CHECKING:
    from .plan import Plan

#: Turns a task's list of output records into what travels to the sink (a list, an Arrow table...).
ChunkFinalizer = Callable[[list[Any]], Any]


class ForwardRunner(Protocol):
    """Runs ``forward`` of one ``map_gpu`` stage over ``(records, prepared_batch)`` pairs.

    ``run`` yields ``(records, outputs)`` pairs in the order it received them; outputs are on
    the host (CPU), ready for ``postprocess``.
    """

    def run(self, batches: Iterator[tuple[list[Any], Any]]) -> Iterator[tuple[list[Any], Any]]: ...


class ExecutionContext:
    """Per-process state shared by the tasks a process runs (forward runners, worker name).

    Args:
        where: names the process in error messages, e.g. ``"main process"`` or ``"cpu worker 2"``.
        make_forward_runner: builds the runner for a ``map_gpu`` stage; by default forward runs
            in this process (see :class:`streamproc.gpu.LocalForwardRunner`).
    """

    def __init__(
        self,
        where: str = "main process",
        make_forward_runner: Optional[Callable[[MapGPU, str], ForwardRunner]] = None,
        device: Optional[str] = None,
        autocast: Any = None,
    ) -> None:
        self.where = where
        self.device = device
        self.autocast = autocast
        self._make_forward_runner = make_forward_runner
        self._runners: dict[str, ForwardRunner] = {}

    def forward_runner(self, op: MapGPU, stage: str) -> ForwardRunner:
        runner = self._runners.get(stage)
        if runner is None:
            if self._make_forward_runner is not None:
                runner = self._make_forward_runner(op, stage)
            else:
                from .gpu import DeviceForward, LocalForwardRunner

                runner = LocalForwardRunner(DeviceForward(op.forward, self.device, self.autocast, stage, op.batch_size))
            self._runners[stage] = runner
        return runner


def iter_task_outputs(plan: Plan, payload: Any, ctx: ExecutionContext) -> Iterator[list[Any]]:
    """Streams the output records of one task, in chunks (source read included)."""
    chunks: Iterator[list[Any]] = _tagged(plan.source.read_task_chunks(payload, plan.chunk_size), "the source")
    for op, stage in zip(plan.ops, plan.stage_names):
        chunks = op.apply(chunks, ctx, stage)
    return chunks


def iter_task_chunks(
    plan: Plan, payload: Any, ctx: ExecutionContext, finalize: Optional[ChunkFinalizer] = None
) -> Iterator[tuple[Any, int]]:
    """Runs one task and yields ``(chunk, record_count)`` pairs.

    Small output lists (after a filter, or per batch) are merged until they hold at least
    ``plan.chunk_size`` records, so that a message carries many records. ``finalize`` (for
    example records -> Arrow table for parquet sinks) is applied to every chunk where the task
    runs, so a worker does that conversion rather than the main process.
    """
    size = plan.chunk_size
    pending: list[Any] = []
    for chunk in iter_task_outputs(plan, payload, ctx):
        if pending:
            pending.extend(chunk)
        else:
            pending = chunk
        if len(pending) >= size:
            yield (finalize(pending) if finalize is not None else pending), len(pending)
            pending = []
    if pending:
        yield (finalize(pending) if finalize is not None else pending), len(pending)
