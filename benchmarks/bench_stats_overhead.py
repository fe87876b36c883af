"""What the always-on run statistics cost on the overhead workload (issue 9, Performance).

The overhead workload: an identity ``map`` (``abs`` over ints) over 1M records, ``to_list``.
Modes:

* ``full``: as shipped;
* ``nostats``: the stage timer (``execution.timing.StageTimer``) replaced by one that measures
  nothing, in this process and, under the default ``fork`` start method, in the CPU workers
  it forks, so the difference is the stage timing's own cost (the workers' busy/wait clocks
  stay);
* ``bare``: ``nostats``, and the CPU workers' clocks (``WorkerClock``: busy, waiting,
  blocked, per message) replaced by ones that measure nothing: every statistic off.

Each process runs the stream ``--repeats`` times and prints the median CPU seconds (simple
backend: this process) or wall seconds (multiprocessing: 2 CPU workers). ``pairs A B`` runs
whole processes of mode A and mode B in turn (A B A B ..., ``--pairs`` of each, after one
warm-up pair) and prints the ratios A/B of their wall and CPU seconds (user + sys of the
process and its workers), pair by pair: min, median, max. Times are reported, never asserted.

Usage::

    python benchmarks/bench_stats_overhead.py full --backend simple
    python benchmarks/bench_stats_overhead.py nostats --backend multiprocessing
    python benchmarks/bench_stats_overhead.py pairs full nostats --backend multiprocessing --repeats 3 --pairs 10
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

MODES = ("full", "nostats", "bare")

_tagged: Callable[[Any, str], Iterator[Any]]  # streamproc.stage_tags.tagged, once a mode needs it


class _NoTimer:
    """A stand-in for ``StageTimer`` that wraps nothing and reports no stats."""

    finalize_seconds = 0.0
    task_source_records = 0

    def __init__(self, plan: Any, ctx: Any) -> None:
        self.ctx = ctx

    def wrap(self, it: Iterator[Any], layer: int, stage: str) -> Iterator[Any]:
        return _tagged(it, stage)  # the stage's error tag stays: only the timing goes

    def begin_task(self) -> None:
        pass

    def end_task(self) -> None:
        pass

    def take_source_records(self) -> int:
        return 0  # not counted: progress is off here

    def take(self) -> None:
        return None

    take_if_due = take


class _NoClock:
    """A stand-in for the CPU worker's ``WorkerClock`` that measures nothing."""

    def __init__(self, name: str, kind: str) -> None:
        from streamproc.stats import ProcessStats

        self.stats = ProcessStats(name, kind)

    def begin_run(self) -> None:
        pass

    def loaded(self) -> None:
        pass

    def waiting_for_input(self, fn: Callable[[], T]) -> T:
        return fn()

    def blocked_sending(self, fn: Callable[[bytes], T], data: bytes) -> T:
        return fn(data)

    def busy(self, fn: Callable[..., T], *args: Any) -> T:
        return fn(*args)

    def run_stats(self) -> Any:
        return self.stats


def _switch_off(mode: str) -> None:
    """Replaces the stats machinery named by ``mode`` (before any worker is forked)."""
    global _tagged
    # Imported in every mode, so that the modes differ in what they switch off only (a forked
    # worker starts from its parent's state: under an instruction counter, its imports too).
    import streamproc.backends.multiprocessing.cpu_worker as cpu_worker
    import streamproc.backends.simple as simple
    import streamproc.backends.threads as threads
    import streamproc.execution.task as task
    from streamproc.stage_tags import tagged as _tagged

    if mode == "full":
        return
    for module in (task, simple, threads, cpu_worker):
        module.StageTimer = _NoTimer  # type: ignore[assignment,misc]
    task.timed_finalize = lambda finalize, timer: finalize  # type: ignore[assignment]
    if mode == "bare":
        cpu_worker.WorkerClock = _NoClock  # type: ignore[assignment,misc]


def run_mode(args: argparse.Namespace) -> None:
    import streamproc as sp

    _switch_off(args.mode)
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


def _whole_process(mode: str, args: argparse.Namespace) -> tuple[float, float]:
    """Wall and CPU seconds (user + sys, workers included) of one process running ``mode``."""
    command = [sys.executable, os.path.abspath(__file__), mode, "--backend", args.backend,
               "--records", str(args.records), "--repeats", str(args.repeats)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def run_pairs(args: argparse.Namespace) -> None:
    a, b = args.mode_a, args.mode_b
    _whole_process(a, args), _whole_process(b, args)  # warm-up: file cache, bytecode
    rows: dict[str, list[float]] = {f"{a} wall s": [], f"{b} wall s": [], f"{a} cpu s": [], f"{b} cpu s": [],
                                    "wall ratio": [], "cpu ratio": []}
    for _ in range(args.pairs):
        (wall_a, cpu_a), (wall_b, cpu_b) = _whole_process(a, args), _whole_process(b, args)
        for key, value in ((f"{a} wall s", wall_a), (f"{b} wall s", wall_b), (f"{a} cpu s", cpu_a), (f"{b} cpu s", cpu_b),
                           ("wall ratio", wall_a / wall_b), ("cpu ratio", cpu_a / cpu_b)):
            rows[key].append(value)
    print(f"{a} vs {b}, {args.backend}, {args.pairs} pairs of whole processes "
          f"({args.repeats} runs of {args.records:,} records each)")
    for key, values in rows.items():
        print(f"  {key:>14}: min {min(values):.3f}  median {statistics.median(values):.3f}  max {max(values):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("mode", choices=[*MODES, "pairs"])
    parser.add_argument("mode_a", nargs="?", choices=MODES, default="full", help="pairs: the mode measured")
    parser.add_argument("mode_b", nargs="?", choices=MODES, default="nostats", help="pairs: the mode it is divided by")
    parser.add_argument("--backend", choices=["simple", "multiprocessing"], default="simple")
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--pairs", type=int, default=10)
    args = parser.parse_args()
    run_pairs(args) if args.mode == "pairs" else run_mode(args)


if __name__ == "__main__":
    main()
