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
    parser.add_argument("on_error", choices=["raise", "skip"])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backend", choices=["multiprocessing", "simple"], default="multiprocessing")
    args = parser.parse_args()
    stream = sp.from_iterable(range(args.records)).map(identity)
    workers = 2 if args.backend == "multiprocessing" else 1
    stream = stream.set_processing(backend=args.backend, num_cpu_workers=workers, on_error=args.on_error)
    walls, cpus = [], []
    for _ in range(args.repeats):
        cpu_start, start = _cpu_seconds(), time.perf_counter()
        count = sum(1 for _ in stream)
        walls.append(time.perf_counter() - start)
        cpus.append(_cpu_seconds() - cpu_start)
        assert count == args.records
    print(
        f"on_error={args.on_error} backend={args.backend}: {args.records} records, "
        f"wall {' '.join(f'{t:.3f}' for t in walls)} s (median {statistics.median(walls):.3f}), "
        f"cpu {' '.join(f'{t:.3f}' for t in cpus)} s (median {statistics.median(cpus):.3f})"
    )


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


if __name__ == "__main__":
    main()
