"""Presenting a :class:`~streamproc.stats.RunStats`: the fixed-width report, dicts, a DataFrame.

Runs in the main process. pandas is imported by :func:`run_to_pandas` only.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas

    from .stats import ProcessStats, RunStats, StageStats

_NAME_WIDTH = 44


def _short(text: str, width: int = _NAME_WIDTH) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _stage_rows(stats: RunStats) -> list[tuple[str, str, str, str, str, float]]:
    """(name, where, in, out, batches, seconds) per report line, forward on its own line."""
    rows: list[tuple[str, str, str, str, str, float]] = []
    for stage in stats.stage_rows():
        counts = f"{stage.records_in:,}", f"{stage.records_out:,}", f"{stage.batches:,}"
        rows.append((stage.name, stage.where, *counts, stage.seconds))
        if stage.forward_batches:
            where = stage.forward_where or stage.where
            label = "  forward (waiting for it)" if where == "GPU workers" else "  forward"
            rows.append((label, where, "", "", f"{stage.forward_batches:,}", stage.forward_seconds))
    return rows


def format_report(stats: RunStats) -> str:
    """The report: a stage table, a process table, padding and the bottleneck line."""
    done = "" if stats.finished else " (not finished)"
    lines = [
        f"streamproc run stats: backend={stats.backend}, {stats.tasks_done:,} tasks, "
        f"{stats.records_out:,} records out, {stats.wall_seconds:.2f} s wall{done}",
        "",
        f"{'stage':<{_NAME_WIDTH}} {'where':<15} {'records in':>11} {'records out':>11} {'batches':>8} "
        f"{'seconds':>9} {'share':>6}",
    ]
    total = stats.stage_seconds
    for name, where, n_in, n_out, batches, seconds in _stage_rows(stats):
        share = f"{seconds / total * 100:5.1f}%" if total > 0 else ""
        place = _short(where, 15)
        lines.append(f"{_short(name):<{_NAME_WIDTH}} {place:<15} {n_in:>11} {n_out:>11} {batches:>8} {seconds:>9.3f} {share:>6}")
    lines.append(f"{'total (stage seconds, summed over workers)':<{_NAME_WIDTH + 49}} {total:>9.3f}")
    lines += ["", f"{'process':<30} {'wall s':>8} {'start-up s':>10} {'busy s':>8} {'waiting s':>9} {'blocked s':>9} {'busy':>5}"]
    for process in stats.processes.values():
        lines.append(
            f"{_short(process.name, 30):<30} {process.wall_seconds:>8.2f} {process.startup_seconds:>10.2f} "
            f"{_busy(process):>8.2f} {_waiting(process):>9.2f} {process.output_blocked_seconds:>9.2f} "
            f"{process.busy_fraction * 100:>4.0f}%"
        )
    lines += _detail_lines(stats)
    lines += ["", f"bottleneck: {stats.bottleneck.hint}"]
    return "\n".join(lines)


def _busy(process: ProcessStats) -> float:
    if process.kind == "gpu":
        return process.h2d_seconds + process.forward_seconds + process.d2h_seconds
    return process.busy_seconds


def _waiting(process: ProcessStats) -> float:
    return process.idle_seconds if process.kind == "gpu" else process.input_wait_seconds


def _detail_lines(stats: RunStats) -> list[str]:
    main = stats.main
    lines = [
        "",
        f"main process: source iteration {main.source_seconds:.2f} s, reorder wait {main.reorder_wait_seconds:.2f} s, "
        f"sink writes {main.sink_seconds:.2f} s",
    ]
    for gpu in stats.workers("gpu"):
        lines.append(
            f"{gpu.name}: forward {gpu.forward_seconds:.2f} s, host-to-device {gpu.h2d_seconds:.2f} s, "
            f"device-to-host {gpu.d2h_seconds:.2f} s, idle {gpu.idle_seconds:.2f} s, {gpu.batches:,} batches, "
            f"busy {gpu.busy_fraction * 100:.0f}% of {gpu.wall_seconds - gpu.startup_seconds:.2f} s after start-up"
        )
    for process in stats.processes.values():
        if process.swaps:
            lines.append(f"{process.name}: {process.swaps:,} model swaps, {process.swap_seconds:.2f} s swapping")
    for stage in stats.stage_rows():
        if stage.padded_tokens:
            waste = 1 - stage.real_tokens / stage.padded_tokens
            lines.append(
                f"{_short(stage.name)}: {stage.real_tokens:,} real tokens in {stage.padded_tokens:,} padded "
                f"({waste * 100:.0f}% padding)"
            )
    return lines


def _stage_dict(stage: StageStats, total: float) -> dict[str, Any]:
    row = dataclasses.asdict(stage)
    row["share"] = (stage.seconds + stage.forward_seconds) / total if total > 0 else 0.0
    return row


def _process_dict(process: ProcessStats) -> dict[str, Any]:
    row = dataclasses.asdict(process)
    row["busy_fraction"] = process.busy_fraction
    return row


def run_to_dict(stats: RunStats) -> dict[str, Any]:
    """Plain data (JSON-serialisable): totals, ``stages``, ``processes``, ``bottleneck``."""
    total = stats.stage_seconds
    bottleneck = stats.bottleneck
    return {
        "backend": stats.backend,
        "tasks_done": stats.tasks_done,
        "records_out": stats.records_out,
        "finished": stats.finished,
        "wall_seconds": stats.wall_seconds,
        "stage_seconds": total,
        "max_task_seconds": stats.max_task_seconds,
        "stages": [_stage_dict(stage, total) for stage in stats.stage_rows()],
        "processes": [_process_dict(process) for process in stats.processes.values()],
        "bottleneck": dataclasses.asdict(bottleneck),
    }


def run_to_pandas(stats: RunStats) -> pandas.DataFrame:
    """One row per stage (``row="stage"``) and per process (``row="process"``)."""
    import pandas as pd

    data = run_to_dict(stats)
    rows = [{"row": "stage", **stage} for stage in data["stages"]]
    rows += [{"row": "process", **process} for process in data["processes"]]
    return pd.DataFrame(rows)
