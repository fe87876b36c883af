"""Peak memory of a 1,000,000-row parquet job stays bounded (it does not grow with the data).

The job runs in a fresh subprocess so that its peak RSS and traced memory are its own, not
the test runner's. Python records are where a streaming bug would show (a task or a file
turned into dicts at once), so the main bound is on the Python heap, measured with
tracemalloc; Arrow's own pool and the RSS get looser sanity bounds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import streamproc as sp

ROWS = 1_000_000
ROW_GROUP_ROWS = 10_000  # 100 row groups (tasks) in 2 files
MB = 1_000_000

# The job, run as a script: warm up on a tiny file (imports, lazy initialisation and
# allocator arenas are not growth with the data), then measure the real run.
JOB = r"""
import json, sys, tracemalloc
import psutil, pyarrow as pa
import streamproc as sp

def peak_rss():
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over exec, so a child of a
    # large parent (this test's runner, which just built the input) would report the parent's peak.
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))

def clean(record):
    return {"id": record["id"], "text": record["text"].upper(), "length": len(record["text"])}

def run(src, dst, options):
    return sp.read_parquet(src).map(clean).set_processing(**options).write_parquet(dst)

small, big, out, options = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
run(small, out + "-warmup", options)
try:
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets VmHWM to the current RSS: the warm-up's peak does not count
except OSError:
    pass
rss_before = psutil.Process().memory_info().rss
tracemalloc.start()
parts = run(big, out, options)
traced_peak = tracemalloc.get_traced_memory()[1]
tracemalloc.stop()
rss_peak = peak_rss()
print(json.dumps({
    "parts": parts,
    "traced_peak": traced_peak,
    "arrow_peak": pa.default_memory_pool().max_memory(),
    "rss_growth": rss_peak - rss_before,
}))
"""


def make_input(directory: Path) -> None:
    directory.mkdir()
    ids = pa.array(range(ROWS), pa.int64())
    # ~130 bytes of text per row: ~146 MB as Arrow, ~400 MB as Python dicts (measured: about
    # 400 bytes per record for dict + key refs + int + str objects).
    text = pa.array([f"document number {i:09d} " + "lorem ipsum dolor sit amet " * 4 for i in range(ROWS)])
    table = pa.table({"id": ids, "text": text})
    half = ROWS // 2
    pq.write_table(table.slice(0, half), directory / "a.parquet", row_group_size=ROW_GROUP_ROWS)
    pq.write_table(table.slice(half), directory / "b.parquet", row_group_size=ROW_GROUP_ROWS)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak RSS from /proc/self/status")
@pytest.mark.parametrize(
    "options", [{"backend": "simple"}, {"backend": "threads", "num_cpu_workers": 3}], ids=["simple", "threads"]
)
def test_million_row_parquet_job_has_bounded_peak_memory(tmp_path, options):
    # Backends that run everything in the measured process. (With worker processes, the
    # records live in the workers; their memory is theirs to bound and test.) Threads add, per
    # thread, one decoded slice and the chunks of the reorder window, converted to Arrow there.
    make_input(tmp_path / "in")
    pq.write_table(pa.table({"id": range(3000), "text": ["lorem ipsum"] * 3000}), tmp_path / "small.parquet", row_group_size=1000)
    repo_root = Path(sp.__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo_root), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            JOB,
            str(tmp_path / "small.parquet"),
            str(tmp_path / "in"),
            str(tmp_path / "out"),
            json.dumps(options),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout.strip().splitlines()[-1])

    # Every row was written: one part (rows_per_file defaults to 1,000,000).
    assert [os.path.basename(p) for p in stats["parts"]] == ["part-000000.parquet"]
    metadata = pq.ParquetFile(stats["parts"][0]).metadata
    assert metadata.num_rows == ROWS
    assert pq.read_table(stats["parts"][0], columns=["length"]).column("length").to_pylist()[:2] == [134, 134]

    # Python heap: in flight are one slice of decoded rows (READ_BATCH_ROWS = 8,192 dicts) and
    # one output chunk (1,024 dicts): about 4 MB measured (three threads, each with its slice
    # and chunk: 21 MB measured). 32 MB is still more than 10x below the ~400 MB that the
    # records of the dataset take.
    assert stats["traced_peak"] < 32 * MB, stats
    # Arrow: the writer buffers one output row group (65,536 rows, ~11 MB) plus the concat of
    # it, and the reader one input row group: ~22 MB measured, against ~146 MB of input data.
    assert stats["arrow_peak"] < 64 * MB, stats
    # The whole process, allocator slack included: 55-80 MB measured, and the same with half
    # the rows. Loading the data as records would alone take ~400 MB. Each extra thread adds
    # its allocator caches and working set: 168-172 MB measured with three threads, for a
    # quarter, half and all of the rows alike.
    extra_threads = options.get("num_cpu_workers", 1) - 1
    assert stats["rss_growth"] < (150 + 50 * extra_threads) * MB, stats
