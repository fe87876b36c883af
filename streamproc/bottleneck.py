"""The bottleneck of a run, read out of its :class:`~streamproc.stats.RunStats` (main process).

The checks go from the most specific to the most general; the first that holds names the
limiting resource and one thing to change:

1. GPU workers idle (busy fraction under ``GPU_STARVED_BELOW``): they wait for batches, the
   CPU side is too slow -> add CPU workers or sort by length (less padding per batch).
   GPU workers busy (over ``GPU_SATURATED_ABOVE``) -> add GPU workers (or autocast).
2. The main process writes (sink time over ``MAIN_WRITES_ABOVE`` of the run) -> write in the
   workers: ``write_parquet`` and ``write_sql`` do on the multiprocessing backend.
3. Head-of-line blocking (reorder wait over ``REORDER_WAIT_ABOVE``, while the workers idle
   more than ``WORKERS_IDLE_ABOVE``) -> deterministic=False or a smaller task_size.
4. One task long against the run (``STRAGGLER_ABOVE``, several workers), and alone (the
   next longest under half of it: slow first tasks in every worker are start-up, such as
   imports, not a straggler) -> lower task_size.
5. Otherwise the run is compute-bound: the stage with the most seconds is named, with "add
   CPU workers" (or, with the simple backend, a parallel backend); when that stage's time is
   mostly its in-process forward, with "run forward on GPU workers".

Shares are fractions of the run's wall time (main process figures) or of the workers' summed
busy time (stages), so that the hint reads the same numbers as the report.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from .stats import RunStats, StageStats

GPU_STARVED_BELOW = 0.7
GPU_SATURATED_ABOVE = 0.85
MAIN_WRITES_ABOVE = 0.5
REORDER_WAIT_ABOVE = 0.3
#: Head-of-line blocking is named only when the CPU workers (or threads) idle more than this.
WORKERS_IDLE_ABOVE = 0.25
STRAGGLER_ABOVE = 0.3


@dataclass(frozen=True)
class Bottleneck:
    """The limiting resource of a run and one actionable hint; ``str()`` is the hint.

    Attributes:
        resource: ``"GPU workers"``, ``"main process"``, ``"CPU workers"``, ``"worker threads"``,
            ``"a long task"`` or ``"nothing"`` (no work measured).
        stage: the stage most to blame (its report name), or None.
        share: the figure behind the hint, a fraction (GPU idle share, main process write
            share, the stage's share of the worker time...).
        hint: what the numbers say and what to change.
    """

    resource: str
    stage: Optional[str]
    share: float
    hint: str

    def __str__(self) -> str:
        return self.hint


def _percent(share: float) -> str:
    return f"{share * 100:.0f}%"


def _slowest_stage(stats: RunStats, cpu_only: bool = False) -> Optional[StageStats]:
    rows = stats.stage_rows()
    if not rows:
        return None
    return max(rows, key=lambda s: s.seconds if cpu_only else s.seconds + s.forward_seconds)


#: Above this share of padding in a stage's batches, the hint also says to sort by length.
PADDING_WASTE_ABOVE = 0.4


def _padding_advice(stats: RunStats) -> str:
    """``"; 62% of the padded tokens are padding: sort by length"``, or nothing."""
    worst = max((1 - s.real_tokens / s.padded_tokens for s in stats.stages.values() if s.padded_tokens), default=0.0)
    return f"; {_percent(worst)} of the padded tokens are padding: sort by length" if worst > PADDING_WASTE_ABOVE else ""


def find_bottleneck(stats: RunStats) -> Bottleneck:
    """The first of the module docstring's checks that holds (main process)."""
    wall = stats.wall_seconds
    gpus = stats.workers("gpu")
    if gpus:
        busy = sum(g.busy_fraction for g in gpus) / len(gpus)
        stage = _slowest_stage(stats, cpu_only=True)
        name = stage.name if stage is not None else None
        if busy < GPU_STARVED_BELOW:
            idle = 1.0 - busy
            return Bottleneck(
                "GPU workers", name, idle,
                f"GPU workers idle {_percent(idle)} waiting for batches: add CPU workers or sort by length"
                + (f" (the slowest CPU stage is {name})" if name else ""),
            )
        if busy > GPU_SATURATED_ABOVE:
            return Bottleneck(
                "GPU workers", None, busy,
                f"GPU workers busy {_percent(busy)}: add GPU workers, or try autocast=True or a larger batch_size"
                + _padding_advice(stats),
            )
    main = stats.main
    if wall > 0 and main.sink_seconds / wall > MAIN_WRITES_ABOVE:
        share = main.sink_seconds / wall
        if stats.backend == "simple":
            advice = "use backend='multiprocessing' with write_parquet or write_sql, which then write in the workers"
        else:
            advice = (
                "write with write_parquet or write_sql, which write in the CPU workers (unless max_task_retries or "
                "task_timeout is set); write_jsonl and the in-memory sinks write in the main process"
            )
        return Bottleneck("main process", None, share, f"main process writes {_percent(share)} of the time: {advice}")
    # Waiting for an earlier task only limits the run if the workers idle meanwhile (the
    # window is full): with every worker busy, the wait is just the workers' compute time.
    if wall > 0 and main.reorder_wait_seconds / wall > REORDER_WAIT_ABOVE and _worker_idle_share(stats) > WORKERS_IDLE_ABOVE:
        share = main.reorder_wait_seconds / wall
        return Bottleneck(
            "main process", None, share,
            f"main process waits {_percent(share)} of the time for an earlier task (deterministic=True holds later "
            "outputs back): use deterministic=False or lower task_size",
        )
    runners = stats.task_runners
    alone = stats.second_task_seconds < stats.max_task_seconds / 2
    if wall > 0 and len(runners) > 1 and alone and stats.max_task_seconds / wall > STRAGGLER_ABOVE:
        share = stats.max_task_seconds / wall
        return Bottleneck("a long task", None, share, f"one task took {_percent(share)} of the run: lower task_size")
    stage = _slowest_stage(stats)
    total = stats.stage_seconds
    if stage is None or total <= 0:
        return Bottleneck("nothing", None, 0.0, "nothing measured: the run did no work")
    share = (stage.seconds + stage.forward_seconds) / total
    resource = runners[0].kind
    where = {"cpu": "CPU workers", "thread": "worker threads"}.get(resource, "main process")
    if stage.forward_seconds > stage.seconds:
        forward_share = stage.forward_seconds / total
        return Bottleneck(
            where, stage.name, forward_share,
            f"forward of {stage.name} takes {_percent(forward_share)} of the worker time, in the {where}: run it on "
            "GPU workers (backend='multiprocessing', gpu_worker_devices=[...]), or make it cheaper (autocast=True)"
            + _padding_advice(stats),
        )
    if where == "main process":
        advice = "CPU-bound in the main process: use backend='multiprocessing' to add CPU workers"
    elif where == "worker threads":
        advice = "CPU-bound: add CPU workers (backend='multiprocessing' if the stage holds the GIL)"
    else:
        advice = "CPU-bound: add CPU workers"
    return Bottleneck(where, stage.name, share, f"{stage.name} takes {_percent(share)} of the worker time: {advice}")


def _worker_idle_share(stats: RunStats) -> float:
    """The share of the CPU workers' (or threads') time after start-up they were not busy."""
    workers = [*stats.workers("cpu"), *stats.workers("thread")]
    available = sum(max(0.0, w.wall_seconds - w.startup_seconds) for w in workers)
    if available <= 0:
        return 1.0
    return max(0.0, 1.0 - sum(w.busy_seconds for w in workers) / available)
