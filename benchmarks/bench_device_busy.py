"""A device kept busy, measured without a GPU (issue 10, item 7).

``forward`` stands in for a device: it sleeps ``--device-ms`` per batch (``time.sleep``
releases the GIL and costs no CPU, as a CUDA kernel does for the host) and returns, with the
batch, the ``perf_counter`` times at which it started and ended, taken inside the GPU
worker. The busy fraction is the stand-in device's forward time over the span from the first
forward's start to the last one's end (start-up, which no pipelining can hide, is outside the
span). ``prepare_batch`` costs ``--prepare-ms`` of pure-Python CPU per batch (0: only the
tensor), so with N CPU workers the CPU side prepares N / prepare-ms batches a second; the
target (>= 95%) applies where that exceeds the device's rate (N x device-ms > prepare-ms).

Each configuration (1, 2, 3 CPU workers + 1 GPU worker on device "cpu"; 10 ms and 2 ms per
batch) runs side by side, in rounds, in two engines (both are this streamproc, under fork,
its module settings changed in the main process before the run, so the workers inherit
them):

  now:    no drain between tasks (task_overlap), 4 batches in flight per GPU worker;
  before: each task's batches awaited before the next task starts, 2 in flight (what the
          engine did before issue 10, item 4).

Tasks are small (``--task-size`` records, 4 batches by default) so that task boundaries are
many: they are what a drain costs. Outputs are checked (every record once, doubled).

CUDA (when ``torch.cuda.is_available()``): a real forward (a stack of matmuls on
``--cuda-dim`` floats) on pre-collated CPU batches, in a GPU worker on ``cuda:0``, reported
as busy fraction (H2D copy + forward over wall, from the GPU worker's stats) and as
throughput against forward alone on the same batches already on the device (the upper
bound; target: >= 90% of it). Without a CUDA device that part says so and is skipped.

Run: ``python benchmarks/bench_device_busy.py [--rounds N] [--batches N]``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time
import warnings
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _machine import cpu_model_name

import streamproc as sp
from streamproc.backends.multiprocessing import gpu_client, task_overlap

BATCH_SIZE = 16


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    x = 0
    while time.perf_counter() < end:
        x += 1


def make_stream(n: int, device_s: float, prepare_s: float) -> sp.Stream:
    import torch

    def prepare(batch: list[int]) -> Any:
        if prepare_s:
            _spin(prepare_s)
        return torch.tensor(batch, dtype=torch.float64)

    def forward(x: Any) -> Any:
        # Its whole call is the device's time: the output is built first, the end stamped last
        # (a tensor write after the stamp would count the stand-in's own bookkeeping as idle).
        start = time.perf_counter()
        doubled = x * 2
        time.sleep(device_s)
        return {"doubled": doubled, "start": start, "end": time.perf_counter()}

    def postprocess(records: list[int], outputs: Any) -> list[tuple[float, float, float]]:
        start, end = outputs["start"], outputs["end"]
        return [(value, start, end) for value in outputs["doubled"].tolist()]

    return sp.from_iterable(range(n)).map_gpu(prepare, forward, postprocess, batch_size=BATCH_SIZE)


def busy_fraction(outputs: list[tuple[float, float, float]]) -> float:
    """Forward time over the span from the first forward's start to the last one's end."""
    batches = {(start, end) for _, start, end in outputs}
    span = max(end for _, end in batches) - min(start for start, _ in batches)
    return sum(end - start for start, end in batches) / span


def idle_profile(outputs: list[tuple[float, float, float]], task_size: int) -> tuple[float, float]:
    """Median idle ms between two forwards, at task boundaries and within tasks (the profile of a miss)."""
    first_record: dict[tuple[float, float], float] = {}
    for record, start, end in outputs:
        first_record.setdefault((start, end), record / 2)
    batches = sorted(first_record.items())
    boundary, within = [], []
    for (previous, prev_record), (current, record) in itertools.pairwise(batches):
        gap = (current[0] - previous[1]) * 1e3
        (boundary if int(record) // task_size != int(prev_record) // task_size else within).append(gap)
    return (statistics.median(boundary) if boundary else float("nan"), statistics.median(within) if within else float("nan"))


def run_once(engine: str, cpu: int, device_s: float, prepare_s: float, n: int, task_size: int) -> tuple[float, float, float]:
    overlap, in_flight = task_overlap.OVERLAP_TASKS, gpu_client.MAX_BATCHES_IN_FLIGHT_PER_GPU
    if engine == "before":
        task_overlap.OVERLAP_TASKS, gpu_client.MAX_BATCHES_IN_FLIGHT_PER_GPU = False, 2
    try:
        stream = make_stream(n, device_s, prepare_s).set_processing(
            backend="multiprocessing", num_cpu_workers=cpu, num_gpu_workers=1, gpu_worker_devices=["cpu"],
            task_size=task_size, process_start_method="fork",
        )
        outputs = stream.to_list()
    finally:
        task_overlap.OVERLAP_TASKS, gpu_client.MAX_BATCHES_IN_FLIGHT_PER_GPU = overlap, in_flight
    assert [round(v) for v, _, _ in outputs] == [2 * i for i in range(n)], "wrong outputs"
    return (busy_fraction(outputs), *idle_profile(outputs, task_size))


def cpu_side(args: argparse.Namespace) -> None:
    n = args.batches * BATCH_SIZE
    print("busy: median over rounds; idle ms: median gap between two forwards at task boundaries / within tasks")
    print(f"{'device ms':>9} {'prepare ms':>10} {'CPU workers':>11} {'before':>8} {'now':>8} {'now/before':>10}"
          f" {'idle before':>14} {'idle now':>14}")
    for device_ms in (10.0, 2.0):
        for cpu in (1, 2, 3):
            got: dict[str, list[tuple[float, float, float]]] = {"before": [], "now": []}
            for _ in range(args.rounds):
                for engine in ("before", "now"):
                    got[engine].append(run_once(engine, cpu, device_ms / 1e3, args.prepare_ms / 1e3, n, args.task_size))
            med = {engine: [statistics.median(col) for col in zip(*rows)] for engine, rows in got.items()}
            before, now = med["before"][0], med["now"][0]
            print(f"{device_ms:9.0f} {args.prepare_ms:10.1f} {cpu:11d} {before:8.1%} {now:8.1%} {now / before:10.3f}"
                  f" {med['before'][1]:6.2f} / {med['before'][2]:5.2f} {med['now'][1]:6.2f} / {med['now'][2]:5.2f}"
                  f"   (rounds now: {', '.join(f'{v[0]:.1%}' for v in got['now'])})")


def cuda_side(args: argparse.Namespace) -> None:
    import torch

    if not torch.cuda.is_available():
        print("CUDA: no device here, skipped (run this script on a GPU machine for the CUDA figures)")
        return
    dim, layers, batches = args.cuda_dim, 8, args.batches
    weights = [torch.randn(dim, dim) / dim**0.5 for _ in range(layers)]

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.ParameterList([torch.nn.Parameter(w.clone(), requires_grad=False) for w in weights])

        def forward(self, x: Any) -> Any:
            for w in self.w:
                x = torch.tanh(x @ w)
            return x.sum(dim=1)

    model = Model()
    rows = [torch.randn(dim) for _ in range(batches * args.cuda_batch)]

    def prepare(batch: list[Any]) -> Any:
        return torch.stack(batch)

    # Upper bound: forward alone, batches already collated and on the device.
    on_device = model.to("cuda")
    ready = [torch.stack(rows[i:i + args.cuda_batch]).cuda() for i in range(0, len(rows), args.cuda_batch)]
    with torch.inference_mode():
        on_device(ready[0])
        torch.cuda.synchronize()
        start = time.perf_counter()
        for batch in ready:
            on_device(batch)
        torch.cuda.synchronize()
        alone = time.perf_counter() - start
    del on_device, ready
    model = Model()
    for cpu in (1, 2, 3):
        stream = sp.from_iterable(rows).map_gpu(prepare, model, batch_size=args.cuda_batch).set_processing(
            backend="multiprocessing", num_cpu_workers=cpu, num_gpu_workers=1, gpu_worker_devices=["cuda:0"],
            task_size=args.task_size * args.cuda_batch // BATCH_SIZE,
        )
        with sp.collect_stats() as collected:
            stream.to_list()
        (gpu,) = collected.runs[0].workers("gpu")
        wall = gpu.wall_seconds - gpu.startup_seconds
        busy = (gpu.h2d_seconds + gpu.forward_seconds) / wall if wall > 0 else float("nan")
        print(f"CUDA, {cpu} CPU workers: busy (H2D + forward over wall) {busy:.1%}; "
              f"forward alone {alone:.3f} s, forward in the worker {gpu.forward_seconds:.3f} s, "
              f"throughput vs forward alone {alone / wall:.1%} (wall after start-up {wall:.3f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=200, help="batches of 16 records per run")
    parser.add_argument("--prepare-ms", type=float, default=0.0, help="pure-Python CPU per batch in prepare_batch")
    parser.add_argument("--task-size", type=int, default=4 * BATCH_SIZE, help="records per task")
    parser.add_argument("--cuda-dim", type=int, default=2048)
    parser.add_argument("--cuda-batch", type=int, default=256)
    parser.add_argument("--skip-cpu", action="store_true", help="only the CUDA part")
    args = parser.parse_args()
    import torch

    # The main process only builds small tensors: one thread keeps forking workers safe.
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="process_start_method='fork'", category=RuntimeWarning)
    print(f"machine: {cpu_model_name()}, {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}")
    if not args.skip_cpu:
        cpu_side(args)
    cuda_side(args)


if __name__ == "__main__":
    main()
