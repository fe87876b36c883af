"""How long ``write_parquet(resume=True)`` takes over an output whose parts are all committed.

Target (issue 8): under 1 s for 100 parts. Two steps, so that the resume can be timed as a
whole process (interpreter start and imports included) by an outside timer:

    python benchmarks/bench_resume.py setup DIR [--source parquet|iterable]   # input + 100 parts
    python benchmarks/bench_resume.py resume DIR [--source ...] [--backend simple|multiprocessing]

``setup`` writes DIR/in.parquet (100 row groups of 1,000 rows: one task each, ``task_size`` =
``rows_per_file`` = 1,000, so 100 parts) and the complete output DIR/out. ``resume`` reruns the
same stream with ``resume=True``, checks that it returns the 100 parts and changed none, and
prints the seconds ``write_parquet`` itself took (``perf_counter``). With ``--source
iterable`` the input is 100,000 in-memory records, re-iterated and skipped on resume.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq

import streamproc as sp

ROWS = 100_000
ROWS_PER_PART = 1_000


def _stream(directory: str, source: str, backend: str) -> sp.Stream:
    if source == "parquet":
        stream = sp.read_parquet(os.path.join(directory, "in.parquet"))
    else:
        stream = sp.from_iterable({"id": i, "text": f"document {i}"} for i in range(ROWS))
    options = {"backend": backend, "num_cpu_workers": 2} if backend != "simple" else {}
    return stream.map(lambda r: {**r, "length": len(r["text"])}).set_processing(task_size=ROWS_PER_PART, **options)


def setup(directory: str, source: str) -> None:
    os.makedirs(directory, exist_ok=True)
    table = pa.table({"id": list(range(ROWS)), "text": [f"document {i}" for i in range(ROWS)]})
    pq.write_table(table, os.path.join(directory, "in.parquet"), row_group_size=ROWS_PER_PART)
    paths = _stream(directory, source, "simple").write_parquet(
        os.path.join(directory, "out"), overwrite=True, rows_per_file=ROWS_PER_PART
    )
    assert len(paths) == ROWS // ROWS_PER_PART, len(paths)
    print(f"setup: {len(paths)} parts in {directory}/out")


def resume(directory: str, source: str, backend: str) -> None:
    out = os.path.join(directory, "out")
    before = {name: os.stat(os.path.join(out, name)).st_mtime_ns for name in os.listdir(out) if name.startswith("part-")}
    start = time.perf_counter()
    paths = _stream(directory, source, backend).write_parquet(out, resume=True, rows_per_file=ROWS_PER_PART)
    elapsed = time.perf_counter() - start
    after = {name: os.stat(os.path.join(out, name)).st_mtime_ns for name in os.listdir(out) if name.startswith("part-")}
    assert len(paths) == ROWS // ROWS_PER_PART and before == after, "resume rewrote parts"
    print(f"resume of {len(paths)} committed parts ({source} source, {backend} backend): write_parquet {elapsed:.3f} s")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["setup", "resume"])
    parser.add_argument("directory")
    parser.add_argument("--source", choices=["parquet", "iterable"], default="parquet")
    parser.add_argument("--backend", choices=["simple", "multiprocessing"], default="simple")
    args = parser.parse_args(argv)
    if args.step == "setup":
        setup(args.directory, args.source)
    else:
        resume(args.directory, args.source, args.backend)


if __name__ == "__main__":
    main(sys.argv[1:])
