"""streamproc on Ray against Ray Data doing the same work, and against the multiprocessing backend (issue 13).

Four workloads, side by side in one run, 2 workers everywhere (a local cluster of
``ray.init(num_cpus=2, num_gpus=1)``, the GPU logical: nothing runs on one; the multiprocessing
backend with ``num_cpu_workers=2``):

1. identity overhead: ``map`` of an identity function over N dict records ``{"id": i}``;
2. CPU-bound ``map``: pure Python, calibrated to about ``--cpu-us`` microseconds per record;
3. parquet read -> map (adds a length field) -> write, of R rows (4 files of 5 row groups;
   streamproc with ``deterministic=False``, so the actors / workers write the parts);
4. the torch CPU/GPU split of ``bench_gpu.py`` (tokenize + pad in ``prepare_batch``, a small
   transformer classifier in ``forward``, batches of 64, ``--split-docs`` documents): Ray Data
   as its users write it (``map_batches`` over 2 classifier actors that tokenize, run the model
   and take the argmax of their batch: its batches are dicts of numpy arrays, so a padded
   tensor per batch cannot be passed on to a model stage), streamproc with 2 CPU workers and
   with 1 CPU + 1 GPU worker on device "cpu", on Ray and on multiprocessing. Labels are checked
   against the single-process loop's (untimed).

For each workload: Ray Data (``ray.data.range`` / ``read_parquet``, ``.map(fn)``, then
``.materialize().count()`` or ``.write_parquet``), streamproc ``backend="ray"`` (``count()`` or
``write_parquet``) and streamproc ``backend="multiprocessing"``. ``ray.init`` is timed once,
apart: the Ray rows are timed once the cluster is up, after a warm-up run (Ray Data keeps its
worker processes between runs; streamproc keeps the CPU worker actors of a completed run warm
for the next one, see docs/cluster.md). A cold streamproc-on-Ray run (its warm actors
released first, so it starts fresh actors) is timed apart for each workload, with its
start-up (until the first actor can take a task). The table gives the median and best of
``--repeats`` runs and the ratio of each median to the multiprocessing backend's.

Usage::

    python benchmarks/bench_ray.py                 # ~3 min on 2 cores
    python benchmarks/bench_ray.py --quick         # smaller sizes, 2 repeats

Times are reported, never asserted. See docs/benchmarks.md ("Ray backend") for recorded figures.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any, Optional

import pyarrow as pa
import pyarrow.parquet as pq

import streamproc as sp

NUM_WORKERS = 2
_spin_iterations = 1000


def identity_row(row: dict[str, Any]) -> dict[str, Any]:
    return row


def cpu_bound_row(row: dict[str, Any]) -> dict[str, Any]:
    total = 0
    for i in range(_spin_iterations):
        total += i * i
    return {"id": row["id"], "v": total & 0xFF}


def add_length(row: dict[str, Any]) -> dict[str, Any]:
    return {**row, "n": len(row["text"])}


def calibrate(target_us: float) -> int:
    """Iterations of ``cpu_bound_row``'s loop that take about ``target_us`` here."""
    global _spin_iterations
    _spin_iterations = 10_000
    start = time.perf_counter()
    for _ in range(20):
        cpu_bound_row({"id": 0})
    per_iteration = (time.perf_counter() - start) / (20 * 10_000)
    _spin_iterations = max(1, int(target_us * 1e-6 / per_iteration))
    return _spin_iterations


def write_inputs(directory: str, rows: int) -> None:
    per_file = rows // 4
    for f in range(4):
        ids = list(range(f * per_file, (f + 1) * per_file))
        table = pa.table({"id": ids, "text": [f"record {i} " + "x" * (90 + i % 20) for i in ids]})
        pq.write_table(table, os.path.join(directory, f"part-{f}.parquet"), row_group_size=max(1, per_file // 5))


class RayDataClassifier:
    """A Ray Data actor (``map_batches``): tokenize, forward and argmax one batch (Ray worker process)."""

    def __init__(self) -> None:
        import bench_gpu
        import torch

        torch.set_num_threads(1)  # two actors on two cores
        self.model = bench_gpu.Classifier().eval()  # seeded: the loop's weights

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import bench_gpu
        import numpy as np
        import torch

        records = [{"id": int(i), "text": str(t)} for i, t in zip(batch["id"], batch["text"])]
        with torch.inference_mode():
            labels = self.model(bench_gpu.prepare_batch(records)).argmax(dim=-1).numpy()
        return {"id": np.asarray(batch["id"]), "label": labels}


def split_workload(ray: Any, n_docs: int) -> tuple[str, dict[str, Callable[[], Any]], Callable[[Any], Optional[str]]]:
    """Workload 4: its name, its systems, and a check of a system's result against the loop."""
    import bench_gpu

    docs = bench_gpu.make_documents(n_docs, bench_gpu.CPU_WORDS_PER_DOC)
    model = bench_gpu.Classifier().eval()
    b = bench_gpu.CPU_BATCH_SIZE
    reference = bench_gpu.loop(docs, model, b)

    def ray_data() -> list[dict[str, Any]]:
        dataset = ray.data.from_items(docs).map_batches(RayDataClassifier, batch_size=b, concurrency=NUM_WORKERS)
        return sorted(({"id": int(r["id"]), "label": int(r["label"])} for r in dataset.take_all()), key=lambda r: r["id"])

    def streamproc(backend: str, cpu: int, gpu: int) -> Callable[[], Any]:
        options: dict[str, Any] = {"backend": backend, "num_cpu_workers": cpu, "num_gpu_workers": gpu}
        if gpu:
            options["gpu_worker_devices"] = ["cpu"] * gpu
        return lambda: bench_gpu.streamproc_stream(docs, model, b, **options).to_list()

    systems = {
        "Ray Data": ray_data,
        "streamproc ray": streamproc("ray", 2, 0),
        "streamproc ray, 1 CPU + 1 GPU worker": streamproc("ray", 1, 1),
        "streamproc multiprocessing": streamproc("multiprocessing", 2, 0),
        "streamproc multiprocessing, 1 CPU + 1 GPU worker": streamproc("multiprocessing", 1, 1),
    }
    name = f"torch split, {n_docs:,} docs of ~{bench_gpu.CPU_WORDS_PER_DOC} words, batches of {b}"
    return name, systems, lambda result: bench_gpu.check_labels(result, reference)


def timed(fn: Callable[[], Any], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--records", type=int, default=200_000, help="workload 1 records")
    parser.add_argument("--cpu-records", type=int, default=20_000, help="workload 2 records")
    parser.add_argument("--cpu-us", type=float, default=80.0, help="workload 2 cost per record (us)")
    parser.add_argument("--parquet-rows", type=int, default=400_000, help="workload 3 rows")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--split-docs", type=int, default=2048, help="workload 4 documents")
    parser.add_argument("--workloads", default="identity,cpu,parquet,split", help="comma-separated subset")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.records, args.cpu_records, args.parquet_rows, args.split_docs, args.repeats = 50_000, 5_000, 100_000, 512, 2
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    iterations = calibrate(args.cpu_us)
    print(f"calibration: {iterations} loop iterations ~ {args.cpu_us:g} us per record")
    start = time.perf_counter()
    ray.init(address="local", num_cpus=NUM_WORKERS, num_gpus=1, include_dashboard=False, logging_level="warning")
    print(f"ray.init (local cluster, {NUM_WORKERS} CPUs, 1 logical GPU): {time.perf_counter() - start:.2f} s")
    ray.data.DataContext.get_current().enable_progress_bars = False
    workdir = tempfile.mkdtemp(prefix="bench-ray-")
    inputs = os.path.join(workdir, "in")
    os.makedirs(inputs)
    write_inputs(inputs, args.parquet_rows)

    def streamproc_rows(n: int) -> sp.Stream:
        return sp.from_iterable({"id": i} for i in range(n))

    def out_dir(name: str) -> str:
        path = os.path.join(workdir, name)
        shutil.rmtree(path, ignore_errors=True)
        return path

    ray_options = {"backend": "ray", "num_cpu_workers": NUM_WORKERS}
    mp_options = {"backend": "multiprocessing", "num_cpu_workers": NUM_WORKERS}
    n, m = args.records, args.cpu_records
    chosen = args.workloads.split(",")
    checks: dict[str, Callable[[Any], Optional[str]]] = {}
    workloads: dict[str, dict[str, Callable[[], Any]]] = {
        f"identity map, {n:,} records": {
            # materialize(): count() alone would skip the map (Ray Data counts from metadata).
            "Ray Data": lambda: ray.data.range(n).map(identity_row).materialize().count(),
            "streamproc ray": lambda: streamproc_rows(n).map(identity_row).set_processing(**ray_options).count(),
            "streamproc multiprocessing": lambda: streamproc_rows(n).map(identity_row).set_processing(**mp_options).count(),
        },
        f"cpu-bound map ({args.cpu_us:g} us), {m:,} records": {
            "Ray Data": lambda: ray.data.range(m).map(cpu_bound_row).materialize().count(),
            "streamproc ray": lambda: streamproc_rows(m).map(cpu_bound_row).set_processing(**ray_options).count(),
            "streamproc multiprocessing": lambda: streamproc_rows(m).map(cpu_bound_row).set_processing(**mp_options).count(),
        },
        f"parquet read -> map -> write, {args.parquet_rows:,} rows": {
            "Ray Data": lambda: ray.data.read_parquet(inputs).map(add_length).write_parquet(out_dir("raydata")),
            "streamproc ray": lambda: sp.read_parquet(inputs).map(add_length)
            .set_processing(**ray_options, deterministic=False).write_parquet(out_dir("spray")),
            "streamproc multiprocessing": lambda: sp.read_parquet(inputs).map(add_length)
            .set_processing(**mp_options, deterministic=False).write_parquet(out_dir("spmp")),
        },
    }
    keys = ("identity", "cpu", "parquet")
    workloads = {name: systems for key, (name, systems) in zip(keys, workloads.items()) if key in chosen}
    if "split" in chosen:
        name, systems, checks[name] = split_workload(ray, args.split_docs)
        workloads[name] = systems
    rows = []
    for workload, systems in workloads.items():
        medians = {}
        for system, fn in systems.items():
            result = fn()  # warm-up: imports, Ray Data's worker processes
            problem = checks[workload](result) if workload in checks else None
            if problem:
                print(f"  {workload} | {system}: WRONG RESULT: {problem}", flush=True)
            times = timed(fn, args.repeats)
            medians[system] = statistics.median(times)
            rows.append((workload, system, statistics.median(times), min(times)))
            startup = ""
            if system == "streamproc ray":  # a cold run: fresh actors (the warm ones released first)
                from streamproc.backends.ray import release_warm_actors

                release_warm_actors()
                with sp.collect_stats() as stats:
                    cold = timed(fn, 1)[0]
                startup = f" (cold run on fresh actors: {cold:.2f} s, start-up {stats.runs[-1].main.startup_seconds:.2f} s)"
            print(f"  {workload} | {system}: median {medians[system]:.2f} s{startup}", flush=True)
        base = medians["streamproc multiprocessing"]
        count = len(systems)
        rows[-count:] = [(w, s, med, best, med / base) for w, s, med, best in rows[-count:]]  # type: ignore[misc]
    print("\n| workload | system | median s | best s | median / multiprocessing |")
    print("| --- | --- | --- | --- | --- |")
    for workload, system, med, best, ratio in rows:  # type: ignore[misc]
        print(f"| {workload} | {system} | {med:.2f} | {best:.2f} | {ratio:.2f} |")
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
