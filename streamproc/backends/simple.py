"""The simple backend: every task in order, in the calling thread of the main process.

It is the reference: every other backend's deterministic output must equal its output.
``forward`` of ``map_gpu`` stages runs here too, on the first of ``gpu_worker_devices`` if
given, else on CUDA when available, else on the CPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Optional

from ..errors import add_context_note
from ..execution import ChunkFinalizer, ExecutionContext, iter_task_chunks
from ..plan import Plan
from .base import Backend


class SimpleBackend(Backend):
    name = "simple"

    def iter_chunks(self, plan: Plan, finalize: Optional[ChunkFinalizer] = None) -> Iterator[tuple[Any, int]]:
        devices = plan.options.gpu_worker_devices
        ctx = ExecutionContext("main process", device=devices[0] if devices else None, autocast=plan.options.autocast)
        task_index = 0
        try:
            for payload in plan.source.iter_tasks(plan.task_size):
                yield from iter_task_chunks(plan, payload, ctx, finalize)
                task_index += 1
        except Exception as exc:
            add_context_note(exc, f"streamproc: while running task {task_index} in the main process (simple backend)")
            raise
