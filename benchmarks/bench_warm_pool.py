"""Warm pool and service against fresh runs: 20 successive small requests with the demo's model (issue 11).

Each request is a stream of ``--records`` (default 200) documents (the demo's synthetic
documents, in memory) through the demo's job: ``map(clean)``, ``filter(has_tokens)``,
``map_gpu(prepare_batch, model, postprocess)`` with the demo's ``DocClassifier``
(``examples/classify_documents.py``). ``--requests`` (default 20) requests run one after
another, for each worker count of ``--workers`` (default 1 and 2), on the CPU (forward runs in
the CPU workers, as it does on a machine without CUDA; ``--device cuda:0`` puts one GPU worker
there instead):

* ``fresh``: every request is a run on its own processes
  (``set_processing(num_cpu_workers=w)``), started and stopped by the run;
* ``warm``: one ``sp.WorkerPool(num_cpu_workers=w)`` started once (its start-up is counted
  in the total), every request a run on it (``set_processing(pool=pool)``);
* ``service``: one ``python -m streamproc serve --cpu-workers w`` started once (its start-up,
  until the command returns, is counted in the total), every request a run on it from this
  process (``set_processing(pool=sp.connect(...))``: the documents travel to the server, the
  outputs back); the server is stopped at the end (not counted).

Every mode must give the fresh runs' records (checked). The table shows the total seconds for
all requests, the median seconds of one request, and the ratio fresh total / this mode's total
(target: at least 5). The model's weights are those of ``build_model(0, --train-steps)`` (default 0
steps: its size, not its accuracy, matters here).

Usage::

    python benchmarks/bench_warm_pool.py                       # workers 1 and 2, 20 x 200 records
    python benchmarks/bench_warm_pool.py --workers 2 --requests 5
    python benchmarks/bench_warm_pool.py --start-method spawn  # what every fresh run pays without fork/forkserver
    python benchmarks/bench_warm_pool.py --modes warm service  # the warm paths only

Times are reported, never asserted. See docs/benchmarks.md ("Warm pools and the service") for recorded figures.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

from classify_documents import build_model, clean, generate_dataset, has_tokens, postprocess, prepare_batch

import streamproc as sp
from streamproc.service.client import ServicePool


def request_stream(docs: list[dict[str, Any]], model: Any, batch_size: str) -> sp.Stream:
    return (
        sp.from_iterable(docs)
        .map(clean)
        .filter(has_tokens)
        .map_gpu(prepare_batch, model, postprocess, batch_size=batch_size, batch_by="n_tokens")
    )


def run_requests(requests: list[sp.Stream], **options: Any) -> tuple[float, list[float], list[list[Any]]]:
    """Total seconds, seconds per request, and outputs of the requests run one after another."""
    seconds, outputs = [], []
    for stream in requests:
        started = time.perf_counter()
        outputs.append(stream.set_processing(**options).to_list())
        seconds.append(time.perf_counter() - started)
    return sum(seconds), seconds, outputs


@contextmanager
def service(workers: int, devices: list[str] | None, method: str | None, tmp: Path) -> Iterator[ServicePool]:
    """A service started with the CLI (returns once it listens), connected; stopped at the end."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    root = Path(__file__).resolve().parent.parent
    # The server unpickles the requests' plans: it imports the demo's module, like a spawned worker.
    path = os.pathsep.join([str(root / "examples"), str(root), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    options = ["--port", str(port), "--token-file", str(tmp / "token"), "--cpu-workers", str(workers)]
    if devices:
        options += ["--gpu-devices", ",".join(devices)]
    if method:
        options += ["--start-method", method]
    subprocess.run([sys.executable, "-m", "streamproc", "serve", *options], env=env, check=True, stdout=subprocess.DEVNULL)
    try:
        yield sp.connect(f"127.0.0.1:{port}", token=(tmp / "token").read_text())
    finally:
        stop = ["--port", str(port), "--token-file", str(tmp / "token")]
        subprocess.run([sys.executable, "-m", "streamproc", "stop", *stop], env=env, check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="CPU worker counts (default: 1 2)")
    parser.add_argument("--requests", type=int, default=20, help="successive requests (default: 20)")
    parser.add_argument("--records", type=int, default=200, help="documents per request (default: 200)")
    parser.add_argument("--train-steps", type=int, default=0, help="warm-up training steps of the model (default: 0)")
    parser.add_argument("--batch-size", default="8192 padded_tokens", help="map_gpu batch size (the demo's default)")
    parser.add_argument("--device", default=None, help="a GPU worker's device (default: none, forward in the CPU workers)")
    parser.add_argument("--start-method", choices=("fork", "spawn", "forkserver"), default=None, help="default: the backend's")
    parser.add_argument("--modes", nargs="+", choices=("fresh", "warm", "service"),
                        default=["fresh", "warm", "service"])
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        files = generate_dataset(Path(tmp), args.requests * args.records, seed=0)
        docs = pq.read_table(files, columns=["id", "source", "topic", "text"]).to_pylist()
    model = build_model(0, args.train_steps)
    requests = [
        request_stream(docs[i * args.records : (i + 1) * args.records], model, args.batch_size) for i in range(args.requests)
    ]
    devices = [args.device] if args.device else None
    gpu = len(devices) if devices else 0
    method = args.start_method
    print(f"{args.requests} requests x {args.records} records, model {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"device {args.device or 'cpu (in the CPU workers)'}, start method {method or 'default'}")
    print(f"{'workers':>7}  {'mode':<7}  {'total s':>8}  {'median s/request':>16}  {'first s':>7}  {'fresh/mode':>10}")
    for workers in args.workers:
        totals: dict[str, float] = {}
        outputs: dict[str, list[list[Any]]] = {}
        for mode in args.modes:
            if mode == "fresh":
                total, each, outputs[mode] = run_requests(
                    requests, backend="multiprocessing", num_cpu_workers=workers, num_gpu_workers=gpu,
                    gpu_worker_devices=devices, process_start_method=method,
                )
            elif mode == "warm":
                started = time.perf_counter()
                pool_options = {"num_gpu_workers": gpu, "gpu_worker_devices": devices, "process_start_method": method}
                with sp.WorkerPool(num_cpu_workers=workers, **pool_options) as pool:
                    start_s = time.perf_counter() - started
                    total, each, outputs[mode] = run_requests(requests, pool=pool)
                total += start_s  # the pool's start-up counts
                each[0] += start_s
            else:
                started = time.perf_counter()
                with tempfile.TemporaryDirectory() as tmp, service(workers, devices, method, Path(tmp)) as remote:
                    start_s = time.perf_counter() - started
                    total, each, outputs[mode] = run_requests(requests, pool=remote)
                total += start_s  # the server's start-up counts (its stop does not)
                each[0] += start_s
            totals[mode] = total
            ratio = f"{totals['fresh'] / total:.1f}x" if "fresh" in totals and mode != "fresh" else ""
            median = statistics.median(each)
            print(f"{workers:>7}  {mode:<7}  {total:>8.2f}  {median:>16.3f}  {each[0]:>7.2f}  {ratio:>10}", flush=True)
        reference = next(iter(outputs.values()))
        for mode, got in outputs.items():
            if got != reference:
                print(f"MISMATCH: {mode} outputs differ from {next(iter(outputs))} outputs with {workers} worker(s)")
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
