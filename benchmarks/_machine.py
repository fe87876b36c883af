"""Machine facts and CPU clocks shared by the benchmark scripts (imported as a sibling module: run the scripts as
``python benchmarks/bench_*.py``, which puts this folder on ``sys.path``)."""

from __future__ import annotations

import os
import platform


def busy_cpu_s() -> float:
    """CPU seconds all processes of the machine spent busy since boot (``/proc/stat``)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
    except OSError:
        return float("nan")
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    """CPU seconds of this process and of its reaped children (workers, child scripts)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def cpu_model_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    model = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return model
