"""What ``on_error="skip"`` costs when nothing fails (GitHub issue 8, Performance).

The overhead workload of bench_multiprocessing.py (workload 1): an identity ``map`` over 1M
ints, 2 CPU workers, multiprocessing backend, deterministic. One process runs the stream
``--repeats`` times with the given ``on_error`` and prints each run's seconds (process start
of the workers included, interpreter start excluded) and their median.

Usage::

    python benchmarks/bench_error_policy.py raise
    python benchmarks/bench_error_policy.py skip --repeats 7

Compare two invocations (raise vs skip) with any whole-process timer too (``/usr/bin/time -v``);
times are reported, never asserted. See docs/benchmarks.md for recorded figures.
"""

from __future__ import annotations

import argparse
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
    args = parser.parse_args()
    stream = sp.from_iterable(range(args.records)).map(identity)
    stream = stream.set_processing(backend="multiprocessing", num_cpu_workers=2, on_error=args.on_error)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        count = sum(1 for _ in stream)
        times.append(time.perf_counter() - start)
        assert count == args.records
    shown = " ".join(f"{t:.3f}" for t in times)
    print(f"on_error={args.on_error}: {args.records} records, runs {shown} s, median {statistics.median(times):.3f} s")


if __name__ == "__main__":
    main()
