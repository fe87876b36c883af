"""Overhead of the simple backend against the plain Python loop it replaces.

Two cases, each timed side by side in this one process, alternating the two sides for
``--repeat`` rounds (best and median reported; the ratio uses the best, the figure least
disturbed by whatever else runs on the machine):

* ``map``: ``sp.from_iterable(range(N)).map(f).to_list()`` against the generator pipeline
  ``list(f(x) for x in range(N))`` (``list(map(f, range(N)))`` is shown too, for reference).
  Target: streamproc <= 1.5x the generator pipeline.
* ``parquet``: read -> map -> write of an N-row file (an ``id`` and a ``text`` column, several
  row groups): ``sp.read_parquet(src).map(g).write_parquet(dst)`` against a single-process
  pyarrow loop (``ParquetFile.iter_batches`` -> ``to_pylist`` -> ``map`` -> ``Table.from_pylist``
  -> ``ParquetWriter``). Target: streamproc <= 1.3x the loop. Both outputs are checked equal.

Usage::

    python benchmarks/bench_simple.py                 # both cases, 1M records, 5 rounds
    python benchmarks/bench_simple.py --only parquet --repeat 3 --profile

``--profile`` prints the top functions of a cProfile run of each streamproc side; ``--check``
exits with 1 when a target is missed; ``--timer cpu`` times CPU seconds of this process instead
of wall seconds (steadier on a busy machine; the pyarrow loop's reader threads count too).
See docs/benchmarks.md for recorded figures.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import os
import platform
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

import streamproc as sp

MAP_TARGET = 1.5
PARQUET_TARGET = 1.3


@dataclass
class Result:
    case: str
    baseline: str
    baseline_s: list[float]
    streamproc_s: list[float]
    target: float
    extra: dict[str, list[float]]

    @property
    def ratio(self) -> float:
        return min(self.streamproc_s) / min(self.baseline_s)

    @property
    def met(self) -> bool:
        return self.ratio <= self.target


#: The clock: ``time.perf_counter`` (wall) by default; ``--timer cpu`` switches to
#: ``time.process_time`` (CPU seconds of this process, all its threads), which other
#: processes competing for the cores disturb much less.
CLOCK: Callable[[], float] = time.perf_counter


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    gc.collect()
    started = CLOCK()
    value = fn()
    return CLOCK() - started, value


def alternate(sides: dict[str, Callable[[], Any]], repeat: int) -> dict[str, list[float]]:
    """Runs each side ``repeat`` times, interleaved (A B C A B C ...), and returns the times."""
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(repeat):
        for name, fn in sides.items():
            seconds, value = timed(fn)
            times[name].append(seconds)
            del value
    return times


def profile(fn: Callable[[], Any], title: str, limit: int = 18) -> None:
    profiler = cProfile.Profile()
    profiler.enable()
    fn()
    profiler.disable()
    print(f"\n--- cProfile: {title} (tottime) ---")
    pstats.Stats(profiler, stream=sys.stdout).strip_dirs().sort_stats("tottime").print_stats(limit)


# -- case a: map over ints --------------------------------------------------------------------


def add_one(x: int) -> int:
    return x + 1


def bench_map(n: int, repeat: int, do_profile: bool) -> Result:
    sides = {
        "generator": lambda: list(add_one(x) for x in range(n)),  # the generator pipeline, as the issue states it
        "builtin map": lambda: list(map(add_one, range(n))),
        "streamproc": lambda: sp.from_iterable(range(n)).map(add_one).to_list(),
    }
    assert sides["streamproc"]() == sides["generator"](), "streamproc and the generator disagree"
    times = alternate(sides, repeat)
    if do_profile:
        profile(sides["streamproc"], f"streamproc map over {n:,} ints")
    extra = {"builtin map": times["builtin map"]}
    return Result("map", "list(f(x) for x in range(N))", times["generator"], times["streamproc"], MAP_TARGET, extra)


# -- case b: parquet read -> map -> write -------------------------------------------------------

_WORDS_TEXT = "the quick brown fox jumps over a lazy dog while streamproc reads parquet row groups in order"
WORDS = _WORDS_TEXT.split()


def make_parquet(path: Path, n: int, row_group_rows: int) -> None:
    """``n`` rows: ``id`` int64 and a ``text`` of 8 to 19 words, deterministic."""
    writer = pq.ParquetWriter(path, pa.schema([("id", pa.int64()), ("text", pa.string())]))
    for start in range(0, n, row_group_rows):
        ids = range(start, min(start + row_group_rows, n))
        texts = [" ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(8 + i % 12)) for i in ids]
        writer.write_table(pa.table({"id": pa.array(ids, pa.int64()), "text": texts}), row_group_size=row_group_rows)
    writer.close()


def enrich(record: dict[str, Any]) -> dict[str, Any]:
    """The per-record work: a typical light transformation (normalise, measure)."""
    text = record["text"]
    return {"id": record["id"], "text": text.capitalize(), "n_chars": len(text)}


def pyarrow_loop(src: Path, dst: Path, fn: Callable[[dict[str, Any]], dict[str, Any]]) -> int:
    """The plain single-process loop: what a user would write without streamproc."""
    rows = 0
    writer = None
    for batch in pq.ParquetFile(src).iter_batches():
        table = pa.Table.from_pylist([fn(r) for r in batch.to_pylist()])
        if writer is None:
            writer = pq.ParquetWriter(dst, table.schema)
        writer.write_table(table)
        rows += table.num_rows
    if writer is not None:
        writer.close()
    return rows


def bench_parquet(n: int, repeat: int, do_profile: bool, workdir: Path, row_group_rows: int) -> Result:
    src = workdir / "input.parquet"
    make_parquet(src, n, row_group_rows)
    base_out, sp_out = workdir / "baseline.parquet", workdir / "streamproc_out"
    sides = {
        "pyarrow loop": lambda: pyarrow_loop(src, base_out, enrich),
        "streamproc": lambda: sp.read_parquet(src).map(enrich).write_parquet(sp_out, overwrite=True),
    }
    sides["pyarrow loop"]()
    sides["streamproc"]()
    expected, got = pq.read_table(base_out), pq.read_table(sp_out)
    assert got.num_rows == expected.num_rows == n, f"row counts differ: {got.num_rows} vs {expected.num_rows}, expected {n}"
    assert got.equals(expected), "streamproc and the pyarrow loop wrote different tables"
    times = alternate(sides, repeat)
    if do_profile:
        profile(sides["streamproc"], f"streamproc parquet read -> map -> write, {n:,} rows")
    return Result("parquet", "pyarrow iter_batches loop", times["pyarrow loop"], times["streamproc"], PARQUET_TARGET, {})


# -- report -----------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def fmt(times: list[float]) -> str:
    return f"{min(times):7.3f} / {statistics.median(times):7.3f}"


def report(results: list[Result], n: int, repeat: int, timer: str) -> None:
    print(
        f"\nstreamproc {sp.__version__}, simple backend; N={n:,}; best / median of {repeat} ({timer} s); "
        f"Python {platform.python_version()}; {os.cpu_count()} CPUs ({cpu_model()})"
    )
    header = f"{'case':<8} {'baseline':<30} {'baseline s':>17} {'streamproc s':>17} {'ratio':>6} {'target':>7}  met"
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r.case:<8} {r.baseline:<30} {fmt(r.baseline_s):>17} {fmt(r.streamproc_s):>17} "
            f"{r.ratio:>5.2f}x {r.target:>6.2f}x  {'yes' if r.met else 'NO'}"
        )
        for name, times in r.extra.items():
            print(f"{'':<8} {'(reference) ' + name:<30} {fmt(times):>17}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="records per case (default: 1,000,000)")
    parser.add_argument("--repeat", type=int, default=5, help="rounds per side (default: 5)")
    parser.add_argument("--only", choices=("map", "parquet"), default=None, help="run one case")
    parser.add_argument("--row-group-rows", type=int, default=65_536, help="rows per row group of the input (default: 65536)")
    parser.add_argument("--profile", action="store_true", help="cProfile one streamproc run per case")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--timer", choices=("wall", "cpu"), default="wall", help="wall (default) or CPU time")
    args = parser.parse_args(argv)
    global CLOCK
    CLOCK = time.process_time if args.timer == "cpu" else time.perf_counter

    results = []
    if args.only in (None, "map"):
        results.append(bench_map(args.rows, args.repeat, args.profile))
    if args.only in (None, "parquet"):
        with tempfile.TemporaryDirectory(prefix="streamproc-bench-") as tmp:
            results.append(bench_parquet(args.rows, args.repeat, args.profile, Path(tmp), args.row_group_rows))
    report(results, args.rows, args.repeat, args.timer)
    return 1 if args.check and not all(r.met for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
