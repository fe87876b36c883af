"""Peak memory of the whole process tree with big records (issue 10, item 2: memory bounded in bytes).

Two lazy sources (generators: nothing is held before it is pulled), each record
``{"id": i, "blob": <size> bytes}``, through a map whose output is as big as its input
(``{"id", "blob"}`` again, a new dict), the outputs consumed and dropped one by one:

* ``64k``: 20,000 records of 64 KiB (1.25 GiB in all);
* ``1m``: 2,000 records of 1 MiB (1.95 GiB in all).

Engines, each in a fresh child process (``python bench_memory.py --child ENGINE CASE``):

* ``loop``: the single-process loop, ``for r in records(): f(r)``;
* ``pool``: ``multiprocessing.Pool(2).imap(f, records())`` (chunksize 1, its default);
* ``streamproc``: ``sp.from_iterable(records()).map(f)`` with 2 CPU workers (multiprocessing
  backend, its defaults: ``deterministic=True``, no ``task_size`` given);
* ``hf``: Hugging Face ``datasets``: ``Dataset.from_generator(records).map(f, num_proc=2)``,
  when ``datasets`` imports (its cache in a temporary directory, removed after).

The parent samples, every ``SAMPLE_INTERVAL_S``, the sum of RSS (psutil) over the child and
all its descendants, and reports the largest sum; RSS counts pages shared between processes
(the interpreter and imports a forked worker shares with its parent) in each of them, as
psutil reports it, so a forked tree is charged its shared pages once per process. Wall seconds
include start-up. Targets (issue 10): ``64k``: streamproc at most Pool's peak; ``1m``:
streamproc at most 600 MB.

``--idle`` measures instead each process of an idle tree (``loop``, ``pool``, ``streamproc``,
2 workers): every worker holds one record in a map that waits for the parent's signal, and the
parent reads each process's RSS, USS and PSS (psutil ``memory_full_info``) meanwhile, so the
figures are what the engine itself costs before any data is in flight.

``--ints`` times instead the identity map over 1M ints (``sp.from_iterable(range(10**6))``,
2 workers) against ``Pool(2).imap(f, range(10**6), chunksize=1024)`` and the loop, best of
``--repeats``: tiny records must keep their speed (records/s printed).

Usage::

    python benchmarks/bench_memory.py                    # both cases, every engine
    python benchmarks/bench_memory.py --cases 1m --engines streamproc,pool
    python benchmarks/bench_memory.py --ints
    python benchmarks/bench_memory.py --idle

Figures are reported, never asserted. See docs/benchmarks.md ("Memory bounded in bytes").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any, Optional

import psutil
from _machine import cpu_model_name

CASES = {"64k": (20_000, 64 * 1024), "1m": (2_000, 1024 * 1024)}
ENGINES = ("loop", "pool", "streamproc", "hf")
SAMPLE_INTERVAL_S = 0.02
CHILD_TIMEOUT_S = 900
MB = 1_000_000


def records(n: int, size: int) -> Iterator[dict[str, Any]]:
    for i in range(n):
        yield {"id": i, "blob": bytes([i % 251]) * size}


def passthrough(record: dict[str, Any]) -> dict[str, Any]:
    return {"id": record["id"], "blob": record["blob"]}


def identity(x: Any) -> Any:
    return x


class WaitForRelease:
    """A map that, in whichever process runs it, says it started and waits for the parent (``--idle``)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def __call__(self, x: Any) -> Any:
        open(os.path.join(self.directory, f"started-{os.getpid()}"), "w").close()
        release = os.path.join(self.directory, "release")
        deadline = time.monotonic() + CHILD_TIMEOUT_S
        while not os.path.exists(release) and time.monotonic() < deadline:
            time.sleep(0.01)  # a benchmark's child, waiting for its parent's file
        return x


def run_idle_child(engine: str, directory: str) -> dict[str, Any]:
    """``--idle``: runs ``engine`` over 2 records, one held by each worker until released."""
    fn = WaitForRelease(directory)
    if engine == "loop":
        out = [fn(x) for x in range(2)]
    elif engine == "pool":
        import multiprocessing

        with multiprocessing.Pool(2) as pool:
            out = list(pool.imap(fn, range(2)))
    elif engine == "streamproc":
        import streamproc as sp

        stream = sp.from_iterable(range(2)).map(fn).set_processing(backend="multiprocessing", num_cpu_workers=2, task_size=1)
        out = stream.to_list()
    else:
        raise ValueError(f"unknown engine {engine!r} for --idle")
    return {"ok": out == [0, 1]}


def idle_tree(engine: str) -> list[dict[str, Any]]:
    """Starts ``engine``'s idle tree in a child; the memory of each of its processes while they wait."""
    directory = tempfile.mkdtemp(prefix="bench-memory-idle-")
    try:
        command = [sys.executable, os.path.abspath(__file__), "--idle-child", engine, directory]
        child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        waiting = 1 if engine == "loop" else 2
        deadline = time.monotonic() + CHILD_TIMEOUT_S
        while sum(name.startswith("started-") for name in os.listdir(directory)) < waiting:
            if child.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{engine}: the idle tree did not start (exit code {child.returncode})")
            time.sleep(0.01)
        root = psutil.Process(child.pid)
        rows = []
        for proc in [root, *root.children(recursive=True)]:
            info = proc.memory_full_info()
            started = os.path.exists(os.path.join(directory, f"started-{proc.pid}"))
            role = "main" if proc.pid == child.pid else ("worker" if started else "helper")
            rows.append({"engine": engine, "role": role, "rss": info.rss, "uss": info.uss, "pss": info.pss})
        open(os.path.join(directory, "release"), "w").close()
        out, _ = child.communicate(timeout=CHILD_TIMEOUT_S)
        if child.returncode != 0 or not json.loads(out.strip().splitlines()[-1])["ok"]:
            raise RuntimeError(f"{engine}: the idle child failed (exit code {child.returncode})")
        return rows
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def idle_mode(engines: list[str]) -> None:
    print("| engine | process | RSS (MB) | USS (MB) | PSS (MB) |")
    print("| --- | --- | ---: | ---: | ---: |")
    for engine in engines:
        rows = idle_tree(engine)
        for row in rows:
            print(f"| {engine} | {row['role']} | {row['rss'] / MB:.1f} | {row['uss'] / MB:.1f} | {row['pss'] / MB:.1f} |")
        total = {key: sum(r[key] for r in rows) / MB for key in ("rss", "uss", "pss")}
        tree = f"**tree ({len(rows)} processes)**"
        print(f"| {engine} | {tree} | **{total['rss']:.1f}** | {total['uss']:.1f} | {total['pss']:.1f} |", flush=True)


def run_child(engine: str, case: str) -> dict[str, Any]:
    """Runs one engine over one case in this process (the child); returns what it checked."""
    n, size = CASES[case]
    count = checksum = 0
    if engine == "loop":
        for record in records(n, size):
            out = passthrough(record)
            count, checksum = count + 1, checksum + out["blob"][0]
    elif engine == "pool":
        import multiprocessing

        with multiprocessing.Pool(2) as pool:
            for out in pool.imap(passthrough, records(n, size)):
                count, checksum = count + 1, checksum + out["blob"][0]
    elif engine == "streamproc":
        import streamproc as sp

        stream = sp.from_iterable(records(n, size)).map(passthrough).set_processing(backend="multiprocessing", num_cpu_workers=2)
        for out in stream:
            count, checksum = count + 1, checksum + out["blob"][0]
    elif engine == "hf":
        import datasets

        cache = tempfile.mkdtemp(prefix="bench-memory-hf-")
        try:
            ds = datasets.Dataset.from_generator(records, gen_kwargs={"n": n, "size": size}, cache_dir=cache)
            mapped = ds.map(passthrough, num_proc=2, cache_file_name=os.path.join(cache, "mapped.arrow"))
            for out in mapped:
                count, checksum = count + 1, checksum + out["blob"][0]
            del ds, mapped
        finally:
            shutil.rmtree(cache, ignore_errors=True)
    else:
        raise ValueError(f"unknown engine {engine!r}")
    expected = sum(i % 251 for i in range(n))
    return {"count": count, "ok": count == n and checksum == expected}


def tree_rss(proc: psutil.Process, peaks: Optional[dict[int, int]] = None) -> int:
    """The sum of RSS over ``proc`` and its descendants; ``peaks`` keeps each process's largest."""
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            rss = p.memory_info().rss
        except psutil.Error:  # exited between listing and reading
            continue
        total += rss
        if peaks is not None:
            peaks[p.pid] = max(peaks.get(p.pid, 0), rss)
    return total


def measure(engine: str, case: str) -> dict[str, Any]:
    """Runs ``engine`` on ``case`` in a child process; its peak tree RSS (sampled) and wall time."""
    started = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--child", engine, case], stdout=subprocess.PIPE, text=True
    )
    proc = psutil.Process(child.pid)
    peak = 0
    peaks: dict[int, int] = {}
    while child.poll() is None:
        try:
            peak = max(peak, tree_rss(proc, peaks))
        except psutil.Error:
            break
        time.sleep(SAMPLE_INTERVAL_S)
        if time.perf_counter() - started > CHILD_TIMEOUT_S:
            child.kill()
            raise TimeoutError(f"{engine} {case} ran over {CHILD_TIMEOUT_S} s")
    out, _ = child.communicate()
    wall = time.perf_counter() - started
    lines = out.strip().splitlines()
    result = json.loads(lines[-1]) if child.returncode == 0 and lines else {"ok": False}
    others = sorted((rss for pid, rss in peaks.items() if pid != child.pid), reverse=True)
    return {
        "engine": engine, "case": case, "peak_mb": peak / MB, "wall_s": wall, "ok": result.get("ok", False),
        "main_peak_mb": peaks.get(child.pid, 0) / MB, "other_peaks_mb": [rss / MB for rss in others],
    }


def hf_available() -> bool:
    try:
        import datasets  # noqa: F401
    except Exception:
        return False
    return True


def memory_mode(cases: list[str], engines: list[str]) -> None:
    if "hf" in engines and not hf_available():
        engines = [e for e in engines if e != "hf"]
        print("datasets does not import: hf skipped")
    rows = []
    for case in cases:
        for engine in engines:
            row = measure(engine, case)
            rows.append(row)
            peak, wall = row["peak_mb"], row["wall_s"]
            each = ", ".join(f"{mb:.0f}" for mb in row["other_peaks_mb"])
            print(
                f"  {case:>4} {engine:<10} peak {peak:8.0f} MB  wall {wall:6.1f} s  ok={row['ok']}"
                f"  (each process's own peak: main {row['main_peak_mb']:.0f} MB, others {each or '-'})",
                flush=True,
            )
    print(f"\nMachine: {os.cpu_count()} CPUs, {cpu_model_name()}; Python {sys.version.split()[0]}")
    print("| case | engine | peak RSS, process tree (MB) | wall (s) | output checked |")
    print("| --- | --- | ---: | ---: | --- |")
    for row in rows:
        print(f"| {row['case']} | {row['engine']} | {row['peak_mb']:.0f} | {row['wall_s']:.1f} | {row['ok']} |")
    by = {(r["case"], r["engine"]): r["peak_mb"] for r in rows}
    if ("64k", "streamproc") in by and ("64k", "pool") in by:
        verdict = "met" if by["64k", "streamproc"] <= by["64k", "pool"] else "MISSED"
        print(f"64k: streamproc {by['64k', 'streamproc']:.0f} MB vs Pool {by['64k', 'pool']:.0f} MB (target <= Pool: {verdict})")
    if ("1m", "streamproc") in by:
        verdict = "met" if by["1m", "streamproc"] <= 600 else "MISSED"
        print(f"1m: streamproc {by['1m', 'streamproc']:.0f} MB (target <= 600 MB: {verdict})")


def ints_mode(repeats: int) -> None:
    import multiprocessing

    import streamproc as sp

    n = 1_000_000

    def best(fn: Any) -> float:
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - started)
            assert out == n, out
        return min(times)

    def loop() -> int:
        return sum(1 for _ in map(identity, range(n)))

    def pool() -> int:
        with multiprocessing.Pool(2) as p:
            return sum(1 for _ in p.imap(identity, range(n), chunksize=1024))

    def streamproc() -> int:
        stream = sp.from_iterable(range(n)).map(identity).set_processing(backend="multiprocessing", num_cpu_workers=2)
        return sum(1 for _ in stream)

    for name, fn in (("loop", loop), ("Pool(2).imap chunksize=1024", pool), ("streamproc 2 workers", streamproc)):
        seconds = best(fn)
        print(f"  {name:<30} {seconds:6.3f} s  {n / seconds / 1e6:5.2f} M records/s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="64k,1m", help="comma-separated: 64k, 1m")
    parser.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated among {', '.join(ENGINES)}")
    parser.add_argument("--ints", action="store_true", help="time the identity map over 1M ints instead")
    parser.add_argument("--repeats", type=int, default=3, help="--ints: rounds, the best reported")
    parser.add_argument("--idle", action="store_true", help="each process's RSS/USS/PSS of an idle tree instead")
    parser.add_argument("--child", nargs=2, metavar=("ENGINE", "CASE"), help=argparse.SUPPRESS)
    parser.add_argument("--idle-child", nargs=2, metavar=("ENGINE", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(*args.child)))
    elif args.idle_child:
        print(json.dumps(run_idle_child(*args.idle_child)))
    elif args.idle:
        idle_mode([e for e in args.engines.split(",") if e != "hf"])
    elif args.ints:
        ints_mode(args.repeats)
    else:
        memory_mode(args.cases.split(","), args.engines.split(","))


if __name__ == "__main__":
    main()
