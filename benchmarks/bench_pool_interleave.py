"""A small stream's time to first output while a large one runs on the same warm pool (issue 11, item 1).

Two threads share one ``sp.WorkerPool(num_cpu_workers=--workers)``. The large stream
(``--large`` records, ``--task-size`` records a task, each record ``--work`` rounds of integer
arithmetic in its worker) starts first; once its first output has arrived (it is running), the
small stream (``--small`` records, the same op) is asked for, and the benchmark times how long
until its first output and until its last, from that moment:

* ``interleaved``: the pool as it is: the small stream starts at once, its tasks interleaved
  with the large one's on the same workers;
* ``sequential``: what the pool did before runs interleaved (one run at a time, under a lock):
  the small stream starts when the large one has ended; reproduced here by starting it then.

Each of ``--repeats`` rounds runs both modes (in turn, on one pool started once), checks both
streams' outputs against the simple backend's, and prints one row; the last row gives the
medians and the ratio sequential / interleaved of the small stream's time to first output.
Times are reported, never asserted. See docs/benchmarks.md ("Warm pools") for recorded figures.

Usage::

    python benchmarks/bench_pool_interleave.py                  # 2 workers, 3 rounds
    python benchmarks/bench_pool_interleave.py --workers 4 --large 4000
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import streamproc as sp


class Work:
    """``(x, checksum)`` after ``rounds`` rounds of integer arithmetic (runs in a CPU worker)."""

    def __init__(self, rounds: int) -> None:
        self.rounds = rounds
        self.__name__ = "work"

    def __call__(self, x: int) -> tuple[int, int]:
        acc = x
        for i in range(self.rounds):
            acc = (acc * 31 + i) % 1_000_003
        return x, acc


def one_round(
    pool: sp.WorkerPool, mode: str, args: argparse.Namespace, wanted: tuple[list[Any], list[Any]]
) -> tuple[float, float]:
    """The small stream's seconds to first and to last output, from when it is asked for."""
    op = Work(args.work)
    large = sp.from_iterable(range(args.large)).map(op).set_processing(pool=pool, task_size=args.task_size)
    small = sp.from_iterable(range(10**6, 10**6 + args.small)).map(op).set_processing(pool=pool, task_size=args.task_size)
    large_running, large_done = threading.Event(), threading.Event()
    large_out: list[Any] = []

    def run_large() -> None:
        try:
            for record in large:
                large_out.append(record)
                large_running.set()
        finally:
            large_running.set()
            large_done.set()

    thread = threading.Thread(target=run_large, name="bench-large")
    thread.start()
    large_running.wait()
    asked = time.perf_counter()
    if mode == "sequential":
        large_done.wait()  # the old lock: the small run waits for the whole large one
    outputs = iter(small)
    small_out = [next(outputs)]
    first = time.perf_counter() - asked
    small_out += list(outputs)
    last = time.perf_counter() - asked
    thread.join()
    if (large_out, small_out) != wanted:
        raise SystemExit(f"MISMATCH in mode {mode}: outputs differ from the simple backend's")
    return first, last


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="CPU workers of the pool (default: 2)")
    parser.add_argument("--large", type=int, default=2000, help="records of the large stream (default: 2000)")
    parser.add_argument("--small", type=int, default=40, help="records of the small stream (default: 40)")
    parser.add_argument("--task-size", type=int, default=20, help="records per task (default: 20)")
    parser.add_argument("--work", type=int, default=20000, help="arithmetic rounds per record (default: 20000)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of both modes (default: 3)")
    parser.add_argument("--modes", nargs="+", choices=("interleaved", "sequential"), default=["interleaved", "sequential"])
    args = parser.parse_args(argv)

    op = Work(args.work)
    simple = {"backend": "simple", "task_size": args.task_size}
    wanted = (
        sp.from_iterable(range(args.large)).map(op).set_processing(**simple).to_list(),
        sp.from_iterable(range(10**6, 10**6 + args.small)).map(op).set_processing(**simple).to_list(),
    )
    print(f"large {args.large} records, small {args.small} records, {args.task_size} records/task, "
          f"{args.work} rounds/record, {args.workers} CPU workers")
    print(f"{'round':>5}  {'mode':<11}  {'first output s':>14}  {'last output s':>13}")
    firsts: dict[str, list[float]] = {mode: [] for mode in args.modes}
    lasts: dict[str, list[float]] = {mode: [] for mode in args.modes}
    with sp.WorkerPool(num_cpu_workers=args.workers) as pool:
        for repeat in range(args.repeats):
            for mode in args.modes:
                first, last = one_round(pool, mode, args, wanted)
                firsts[mode].append(first)
                lasts[mode].append(last)
                print(f"{repeat:>5}  {mode:<11}  {first:>14.3f}  {last:>13.3f}", flush=True)
    for mode in args.modes:
        print(f"{'median':>5}  {mode:<11}  {statistics.median(firsts[mode]):>14.3f}  {statistics.median(lasts[mode]):>13.3f}")
    if len(args.modes) == 2:
        ratio = statistics.median(firsts["sequential"]) / statistics.median(firsts["interleaved"])
        print(f"time to first output, sequential / interleaved: {ratio:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
