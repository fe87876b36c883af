"""Run statistics: what a run handle reports about the run it drives.

This is the seam the observability issue fills in (per-stage times, worker busy and wait
times, the bottleneck report). For now a run counts only what the main process sees anyway:
tasks and records delivered to the sink. Values are updated in the main process only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TaskStats:
    """Counters one task's execution reports with its outputs (``TaskOutput.stats``).

    Empty until the stats issue measures per-stage times where the task runs; it travels with
    the task's last output, so no counter lives in a global.
    """

    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunStats:
    """What one run delivered: filled in by the run handle as outputs reach the sink."""

    backend: str
    tasks_done: int = 0
    records_out: int = 0
    finished: bool = False
