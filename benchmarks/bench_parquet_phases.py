"""Where the CPU of issue 10's parquet row goes: CPU seconds per phase, the loop against streamproc.

The workload is ``bench_round2 --workload parquet``'s: 1M rows (an int ``id``, a ~100-char
``text``; 4 files of 5 row groups), ``map(add_length)``, written with ``deterministic=True``
by 2 CPU workers (fork), ``rows_per_file=100_000`` (10 parts, written in the workers) and the
default layout (1 part, written by the main process). Against it, the single-process pyarrow
loop of ``bench_multiprocessing.pyarrow_loop`` (batches of 65,536 rows), timed phase by phase.

Phases, each in CPU seconds (``time.process_time`` of the process that runs it, summed over
the processes), measured by wrapping streamproc's own functions per chunk (about 140 calls
each: no per-record timer):

* ``read``: decoding row groups into Arrow batches (``ParquetSource.read_task_chunks``, minus
  the next phase);
* ``to records``: Arrow batch -> dicts (``batch_to_records``);
* ``map``: the user's function over each chunk (the map stage's generator, minus its source's);
* ``from records``: dicts -> Arrow table (the sink's ``ArrowTableFinalizer``);
* ``write``: the part writer's ``write`` (buffering, row groups encoded and compressed);
* ``commit``: the part writer's ``commit`` (last row group, footer, move to the final name);
* ``worker other``: the rest of the workers' CPU (start-up after the fork, the task loop,
  stats, messages to the main process);
* ``main``: the main process's CPU during the run, every thread (plan, footers, dispatch,
  reorder, manifest commits; with one part, also that part's write and commit, which are then
  counted in ``write`` and ``commit`` and taken out of ``main``).

Usage (run with ``PYTHONPATH`` on the streamproc to measure: any commit since the worker-side
parquet parts)::

    python benchmarks/bench_parquet_phases.py --repeats 5

Prints the median of each phase over the repeats, and each side's median wall time. Times are
reported, never asserted.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import bench_multiprocessing as mpb  # sibling modules: run as python benchmarks/bench_parquet_phases.py
import pyarrow as pa
import pyarrow.parquet as pq
from _machine import cpu_model_name

import streamproc as sp
import streamproc.ops as sp_ops
from streamproc.io import parquet as sp_parquet
from streamproc.io import parquet_parts, worker_parts, write_schema

PHASES = ["read", "to records", "map", "from records", "write", "commit", "worker other", "main"]
ROWS = 1_000_000


class PhaseClock:
    """CPU seconds per phase in this process (a forked worker inherits a copy, and writes it out)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        self.dump_dir: Path | None = None

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] += seconds

    def reset(self) -> None:
        self.seconds = dict.fromkeys(PHASES, 0.0)


CLOCK = PhaseClock()


def _timed_generator(gen: Iterator[Any], phase: str, minus: tuple[str, ...] = ()) -> Iterator[Any]:
    """Yields ``gen``'s items; adds the CPU of each ``next`` to ``phase``, less what ``minus`` phases gained meanwhile."""
    while True:
        inner = sum(CLOCK.seconds[p] for p in minus)
        t0 = time.process_time()
        try:
            item = next(gen)
        except StopIteration:
            CLOCK.add(phase, time.process_time() - t0 - (sum(CLOCK.seconds[p] for p in minus) - inner))
            return
        CLOCK.add(phase, time.process_time() - t0 - (sum(CLOCK.seconds[p] for p in minus) - inner))
        yield item


def _timed_call(fn: Callable[..., Any], phase: str) -> Callable[..., Any]:
    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            CLOCK.add(phase, time.process_time() - t0)

    return timed


MAIN_PID = os.getpid()


def _dump_if_worker() -> None:
    """A worker's phase figures so far, to ``dump_dir`` (it ends with ``os._exit``: no hook at exit)."""
    if os.getpid() != MAIN_PID and CLOCK.dump_dir is not None:
        (CLOCK.dump_dir / f"worker-{os.getpid()}.json").write_text(json.dumps(CLOCK.seconds))


def install() -> None:
    """Wraps streamproc's phase functions (before the workers fork, so that they inherit them)."""
    sp_parquet.batch_to_records = _timed_call(sp_parquet.batch_to_records, "to records")  # type: ignore[assignment]
    read_task_chunks = sp_parquet.ParquetSource.read_task_chunks
    sp_parquet.ParquetSource.read_task_chunks = lambda self, payload, size: _timed_generator(  # type: ignore[method-assign]
        read_task_chunks(self, payload, size), "read", ("to records",)
    )
    apply = sp_ops.Map.apply
    sp_ops.Map.apply = lambda self, chunks, ctx, stage: _timed_generator(  # type: ignore[method-assign]
        apply(self, chunks, ctx, stage), "map", ("read", "to records")
    )
    finalize = _timed_call(write_schema.ArrowTableFinalizer.__call__, "from records")

    def dumping_finalize(self: Any, records: list[Any]) -> Any:
        try:
            return finalize(self, records)
        finally:
            _dump_if_worker()  # with one part, the workers run no part group: they dump here

    write_schema.ArrowTableFinalizer.__call__ = dumping_finalize  # type: ignore[method-assign]
    parquet_parts.PartFileWriter.write = _timed_call(parquet_parts.PartFileWriter.write, "write")  # type: ignore[method-assign]
    parquet_parts.PartFileWriter.commit = _timed_call(parquet_parts.PartFileWriter.commit, "commit")  # type: ignore[method-assign]
    run_group = worker_parts.WorkerPartWriter.run_group

    def dumping_run_group(self: Any, *args: Any, **kwargs: Any) -> Iterator[Any]:
        yield from run_group(self, *args, **kwargs)
        _dump_if_worker()

    worker_parts.WorkerPartWriter.run_group = dumping_run_group  # type: ignore[method-assign]


def run_streamproc(src: Path, out: Path, rows_per_file: int | None, dump_dir: Path) -> tuple[float, dict[str, float]]:
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(dump_dir, ignore_errors=True)
    dump_dir.mkdir()
    CLOCK.reset()
    CLOCK.dump_dir = dump_dir
    gc.collect()
    self0, children0 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    stream = sp.read_parquet(str(src)).map(mpb.add_length)
    stream = stream.set_processing(backend="multiprocessing", num_cpu_workers=2, deterministic=True)
    stream.write_parquet(out, overwrite=True, **({} if rows_per_file is None else {"rows_per_file": rows_per_file}))
    wall = time.perf_counter() - t0
    self1, children1 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    main_cpu = (self1.ru_utime - self0.ru_utime) + (self1.ru_stime - self0.ru_stime)
    workers_cpu = (children1.ru_utime - children0.ru_utime) + (children1.ru_stime - children0.ru_stime)
    phases = dict.fromkeys(PHASES, 0.0)
    for name, seconds in CLOCK.seconds.items():  # the main process's own phases (its part writer)
        phases[name] += seconds
    main_phases = sum(CLOCK.seconds.values())
    worker_phases = 0.0
    for dump in dump_dir.glob("worker-*.json"):
        for name, seconds in json.loads(dump.read_text()).items():
            phases[name] += seconds
            worker_phases += seconds
    phases["main"] = main_cpu - main_phases
    phases["worker other"] = workers_cpu - worker_phases
    return wall, phases


def run_loop(paths: list[str], out: Path) -> tuple[float, dict[str, float]]:
    """``bench_multiprocessing.pyarrow_loop``, timed phase by phase (the same calls, in the same order)."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    gc.collect()
    phases = dict.fromkeys(PHASES, 0.0)
    t0, c0 = time.perf_counter(), time.process_time()
    writer = None
    clock = time.process_time
    for path in paths:
        batches = pq.ParquetFile(path).iter_batches(batch_size=65_536)
        while True:
            t = clock()
            batch = next(batches, None)
            phases["read"] += clock() - t
            if batch is None:
                break
            t = clock()
            records = batch.to_pylist()
            phases["to records"] += clock() - t
            t = clock()
            records = [mpb.add_length(r) for r in records]
            phases["map"] += clock() - t
            t = clock()
            table = pa.Table.from_pylist(records)
            phases["from records"] += clock() - t
            t = clock()
            if writer is None:
                writer = pq.ParquetWriter(out / "part-00000.parquet", table.schema)
            writer.write_table(table)
            phases["write"] += clock() - t
    t = clock()
    assert writer is not None
    writer.close()
    phases["commit"] += clock() - t
    wall = time.perf_counter() - t0
    phases["main"] = (time.process_time() - c0) - sum(phases.values())
    return wall, phases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    install()
    print(
        f"# bench_parquet_phases --repeats {args.repeats}: {cpu_model_name()}, {os.cpu_count()} CPUs; "
        f"streamproc from {os.path.dirname(sp.__file__)}; loadavg {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    sides: dict[str, list[tuple[float, dict[str, float]]]] = {"loop": [], "sp 10 parts": [], "sp 1 part": []}
    with tempfile.TemporaryDirectory(prefix="bench_parquet_phases_") as tmp_name:
        tmp = Path(tmp_name)
        paths = mpb.generate_parquet(tmp / "in", ROWS, 4, 5)
        for _ in range(args.repeats):  # rounds alternate the sides
            sides["loop"].append(run_loop(paths, tmp / "out"))
            sides["sp 10 parts"].append(run_streamproc(tmp / "in", tmp / "out", 100_000, tmp / "dumps"))
            sides["sp 1 part"].append(run_streamproc(tmp / "in", tmp / "out", None, tmp / "dumps"))
            for pq_file in (tmp / "out").glob("*.parquet"):
                assert pq.ParquetFile(pq_file).metadata.num_rows > 0
    names = list(sides)
    print()
    print("| phase (CPU s, median of the rounds) | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for phase in PHASES:
        cells = [f"{statistics.median(r[1][phase] for r in sides[n]):.3f}" for n in names]
        print(f"| {phase} | " + " | ".join(cells) + " |")
    totals = [f"{statistics.median(sum(r[1].values()) for r in sides[n]):.3f}" for n in names]
    print("| **total CPU** | " + " | ".join(totals) + " |")
    walls = [f"{statistics.median(r[0] for r in sides[n]):.3f} (best {min(r[0] for r in sides[n]):.3f})" for n in names]
    print("| wall s, median (best) | " + " | ".join(walls) + " |")
    loop_wall = statistics.median(r[0] for r in sides["loop"])
    print(
        "| wall / the loop's (medians) | "
        + " | ".join(f"{statistics.median(r[0] for r in sides[n]) / loop_wall:.2f}x" for n in names)
        + " |"
    )
    print(f"\nloadavg at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
