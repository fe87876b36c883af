"""What ``on_error="skip"`` costs when nothing fails (GitHub issue 8, Performance).

The overhead workload of bench_multiprocessing.py (workload 1): an identity ``map`` over 1M
ints, 2 CPU workers, multiprocessing backend, deterministic. One process runs the stream
``--repeats`` times with the given ``on_error`` and prints each run's wall seconds (process
start of the workers included, interpreter start excluded) and CPU seconds (this process and
its reaped workers), and their medians. ``--backend simple`` runs the same stream in this
process alone: its CPU time isolates the engine's own per-record cost from the scheduling noise
of a shared machine.

Usage::

    python benchmarks/bench_error_policy.py raise
    python benchmarks/bench_error_policy.py skip --repeats 7
    python benchmarks/bench_error_policy.py skip --backend simple
    python benchmarks/bench_error_policy.py both --repeats 30   # alternating, in one process

Compare two invocations (raise vs skip) with any whole-process timer too (``/usr/bin/time -v``);
times are reported, never asserted. See docs/benchmarks.md for recorded figures.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time


def identity(x: int) -> int:
    return x


def main() -> None:
    import streamproc as sp

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("on_error", choices=["raise", "skip", "both"], help="both: alternate raise and skip runs")
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backend", choices=["multiprocessing", "simple"], default="multiprocessing")
    args = parser.parse_args()
    workers = 2 if args.backend == "multiprocessing" else 1
    policies = ["raise", "skip"] if args.on_error == "both" else [args.on_error]
    streams = {
        policy: sp.from_iterable(range(args.records))
        .map(identity)
        .set_processing(backend=args.backend, num_cpu_workers=workers, on_error=policy)
        for policy in policies
    }
    walls: dict[str, list[float]] = {policy: [] for policy in policies}
    cpus: dict[str, list[float]] = {policy: [] for policy in policies}
    for repeat in range(args.repeats):
        for policy in policies if repeat % 2 else policies[::-1]:  # alternate which goes first
            cpu_start, start = _cpu_seconds(), time.perf_counter()
            count = sum(1 for _ in streams[policy])
            walls[policy].append(time.perf_counter() - start)
            cpus[policy].append(_cpu_seconds() - cpu_start)
            assert count == args.records
    for policy in policies:
        wall, cpu = walls[policy], cpus[policy]
        print(
            f"on_error={policy} backend={args.backend}: {args.records} records, "
            f"wall {' '.join(f'{t:.3f}' for t in wall)} s (median {statistics.median(wall):.3f}), "
            f"cpu {' '.join(f'{t:.3f}' for t in cpu)} s (median {statistics.median(cpu):.3f})"
        )


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


if __name__ == "__main__":
    main()
