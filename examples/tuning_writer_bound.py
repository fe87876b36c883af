"""Tuning case 3, writer-bound: the main process compresses what the workers produce.

Run ``python examples/tuning_writer_bound.py`` (CPU only, a few seconds). Two CPU workers
build records and turn them into JSON text; the main process gzips it into one
``.jsonl.gz`` file, in order. The report shows the main process writing most of the time and
says to write with ``write_parquet`` or ``write_sql``, which write in the CPU workers. ``--fixed``
does what it says: parquet part files written by the workers themselves (``write_parquet``).
See docs/tuning.md.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import streamproc as sp


def make_record(i: int) -> dict[str, object]:
    return {"id": i, "text": " ".join(f"token{(i * 7 + k) % 1000}" for k in range(200))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--fixed", action="store_true", help="write parquet in the workers instead")
    args = parser.parse_args()
    stream = sp.from_iterable(range(args.records)).map(make_record).set_processing(
        backend="multiprocessing", num_cpu_workers=args.workers
    )
    with tempfile.TemporaryDirectory() as tmp, sp.collect_stats() as stats:
        if args.fixed:
            stream.write_parquet(os.path.join(tmp, "out"))
        else:
            stream.write_jsonl(os.path.join(tmp, "out.jsonl.gz"))
    print(stats.report())


if __name__ == "__main__":
    main()
