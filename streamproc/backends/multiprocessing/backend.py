"""The multiprocessing backend: CPU worker processes (and GPU worker processes) on this machine."""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

from ...plan import Plan
from ...stats import RunStats
from ..base import Backend, BackendCapabilities, RunHandle
from .run import _Run

if TYPE_CHECKING:
    from ...io.sinks import Sink


class MultiprocessingBackend(Backend):
    name = "multiprocessing"
    capabilities = BackendCapabilities(writes_in_workers=True, separate_processes=True)

    def run(self, plan: Plan, sink: Sink) -> RunHandle:
        run = _Run(plan, sink)
        outputs = run.outputs()
        # A half-consumed handle that is garbage collected still stops its processes.
        weakref.finalize(outputs, run.shutdown, True)
        return RunHandle(outputs, RunStats(self.name))
