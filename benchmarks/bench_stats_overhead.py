"""What the always-on run statistics cost on the overhead workload (issue 9, Performance).

The overhead workload: an identity ``map`` (``abs`` over ints) over 1M records, ``to_list``.
``full`` runs it as shipped; ``nostats`` replaces the per-task stage timer
(``execution.task.TaskTimer``) with one that measures nothing, in this process and, under the
default ``fork`` start method, in the CPU workers it forks, so the difference is the stage
timing's own cost (the workers' busy/wait clocks stay). Each process runs the stream
``--repeats`` times and prints the median CPU seconds (simple backend: this process) or wall
seconds (multiprocessing: 2 CPU workers). Times are reported, never asserted.

Usage::

    python benchmarks/bench_stats_overhead.py full --backend simple
    python benchmarks/bench_stats_overhead.py nostats --backend simple
    python benchmarks/bench_stats_overhead.py full --backend multiprocessing
    python benchmarks/bench_stats_overhead.py nostats --backend multiprocessing
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Iterator
from typing import Any


class _NoTimer:
    """A stand-in for ``TaskTimer`` that wraps nothing and reports no stats."""

    def __init__(self, plan: Any, ctx: Any) -> None:
        self.ctx = ctx

    def wrap(self, it: Iterator[Any]) -> Iterator[Any]:
        return it

    def stats(self) -> None:
        return None

    def take_source_records(self) -> int:
        return 0  # not counted: progress is off here

    source_records = 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["full", "nostats"])
    parser.add_argument("--backend", choices=["simple", "multiprocessing"], default="simple")
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=12)
    args = parser.parse_args()

    import streamproc as sp
    import streamproc.execution.task as task_module

    if args.mode == "nostats":
        task_module.TaskTimer = _NoTimer  # type: ignore[assignment,misc]
        task_module.timed_finalize = lambda finalize, timer: finalize  # type: ignore[assignment]
    workers = {"num_cpu_workers": 2} if args.backend == "multiprocessing" else {}
    stream = sp.from_iterable(range(args.records)).map(abs).set_processing(backend=args.backend, **workers)
    clock = time.process_time if args.backend == "simple" else time.perf_counter
    figures = []
    for _ in range(args.repeats):
        start = clock()
        assert len(stream.to_list()) == args.records
        figures.append(clock() - start)
    what = "cpu" if args.backend == "simple" else "wall"
    print(f"{args.mode} {args.backend}: {what} s median {statistics.median(figures):.3f}, min {min(figures):.3f}")


if __name__ == "__main__":
    main()
