"""Time to first output with a ~90 MB model, by start method and topology (issue 10, item 3).

The model is a stack of ``--layers`` (default 22) ``Linear(1024, 1024)`` layers: 92.4 MB of
float32 parameters, loaded from a ``torch.save``d state dict as a user's script would. The
stream is ``map(score)`` (2 CPU workers: forward runs in the CPU workers) or
``map_gpu(prepare, forward)`` (1 CPU worker + 1 GPU worker on device "cpu") over
``--records`` records; the model reaches the workers through the callables' closure, as a
user's does. For each start method (fork, spawn, forkserver) and topology, every pass runs
in a fresh interpreter (so spawn's imports and the fork server's start are counted) and
reports:

* ``load s``: the model's own load time in that interpreter (build the module, load the
  state dict from the file; warm page cache);
* ``first s``: from asking the stream for its first record to getting it (plan pickling,
  worker start-up, the plan's load in the workers, the first record's work);
* ``total s``: the whole run.

``--baseline PATH`` runs the same passes against another checkout's ``streamproc`` (e.g. the
main branch's worktree), alternating with this one, and prints the ratio baseline/this of
the medians. The import cost that spawn pays in each worker (``import torch, streamproc`` in
a fresh interpreter) is printed too. ``forkserver-up`` starts the fork server (with a tiny
stream) before the timed run, as in a long-lived process: what is left is the plan's trip.
Target (fork): ``first s`` at most ``load s`` + 1 s.

Usage::

    python benchmarks/bench_model_shipping.py                        # this checkout, 3 passes
    python benchmarks/bench_model_shipping.py --baseline ../main --passes 3

Times are reported, never asserted. See docs/benchmarks.md ("Models shipped once").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TOPOLOGIES = {"2 CPU workers": (2, 0), "1 CPU + 1 GPU worker": (1, 1)}
#: Short names for ``--one`` (a whole process per pass, to time from outside).
TOPOLOGY_ALIASES = {"2cpu": "2 CPU workers", "1cpu1gpu": "1 CPU + 1 GPU worker"}
METHODS = ("fork", "spawn", "forkserver", "forkserver-up")
WIDTH = 1024


def build_model(layers: int) -> Any:
    import torch

    return torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH) for _ in range(layers)]).eval()


def score(model: Any, x: int) -> float:
    """map fn (CPU worker): the model on one record."""
    import torch

    with torch.no_grad():
        return float(model(torch.full((1, WIDTH), x / 100.0)).sum())


def prepare(records: list[int]) -> Any:
    import torch

    return torch.tensor(records, dtype=torch.float32)[:, None].repeat(1, WIDTH) / 100.0


def forward(model: Any, batch: Any) -> Any:
    import torch

    with torch.no_grad():
        return model(batch).sum(dim=1)


def one_pass(method: str, topology: str, weights: str, layers: int, records: int) -> dict[str, float]:
    """One run in this (fresh) interpreter: load time, time to first output, total."""
    import functools

    import torch

    import streamproc as sp

    started = time.perf_counter()
    model = build_model(layers)
    model.load_state_dict(torch.load(weights, weights_only=True))
    load_s = time.perf_counter() - started
    cpu, gpu = TOPOLOGIES[TOPOLOGY_ALIASES.get(topology, topology)]
    if method == "forkserver-up":  # a long-lived process: the fork server is up before the run
        method = "forkserver"
        sp.from_iterable(range(2)).map(abs).set_processing(backend="multiprocessing", process_start_method=method).to_list()
    options: dict[str, Any] = {"backend": "multiprocessing", "num_cpu_workers": cpu, "process_start_method": method}
    if gpu:
        stream = sp.from_iterable(range(records)).map_gpu(prepare, functools.partial(forward, model), batch_size=4)
        options.update(num_gpu_workers=gpu, gpu_worker_devices=["cpu"])
    else:
        stream = sp.from_iterable(range(records)).map(functools.partial(score, model))
    started = time.perf_counter()
    iterator = iter(stream.set_processing(**options))
    next(iterator)
    first_s = time.perf_counter() - started
    for _ in iterator:
        pass
    return {"load": load_s, "first": first_s, "total": time.perf_counter() - started}


def run_pass(tree: Path, method: str, topology: str, weights: str, args: argparse.Namespace) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, str(Path(__file__).resolve()), "--one", method, topology, weights,
               "--layers", str(args.layers), "--records", str(args.records)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=str(tree))
    if done.returncode != 0:
        raise RuntimeError(f"pass failed ({tree}, {method}, {topology}):\n{done.stderr[-3000:]}")
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def import_seconds(tree: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, streamproc"], env=env, check=True, timeout=300)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", nargs=3, metavar=("METHOD", "TOPOLOGY", "WEIGHTS"), help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--records", type=int, default=16)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--baseline", type=Path, default=None, help="another checkout's root, run side by side")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_pass(*args.one, layers=args.layers, records=args.records)))
        return
    import torch

    trees = {"this": HERE.parent, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "model.pt")
        torch.manual_seed(0)
        model = build_model(args.layers)
        torch.save(model.state_dict(), weights)
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        print(f"model: {args.layers} x Linear({WIDTH}, {WIDTH}), {size / 1e6:.1f} MB; {args.records} records; "
              f"{args.passes} passes, medians")
        for name, tree in trees.items():
            print(f"import torch, streamproc in a fresh interpreter ({name}): {import_seconds(tree):.2f} s")
        print("| start method | topology | tree | load s | first s | total s | first <= load + 1 s | baseline/this first |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for method in args.methods:
            for topology in TOPOLOGIES:
                runs: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
                for _ in range(args.passes):
                    for name, tree in trees.items():  # alternated: drift hits both alike
                        runs[name].append(run_pass(tree, method, topology, weights, args))
                medians = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
                for name in trees:
                    m = medians[name]
                    ratio = f"{medians['baseline']['first'] / m['first']:.2f}x" if name == "this" and args.baseline else ""
                    print(f"| {method} | {topology} | {name} | {m['load']:.2f} | {m['first']:.2f} | {m['total']:.2f} | "
                          f"{'yes' if m['first'] <= m['load'] + 1 else 'no'} | {ratio} |")


if __name__ == "__main__":
    main()
