"""Tensors between two processes: pickled through a pipe vs shared memory (issue 10, item 6).

What a CPU worker and a GPU worker do with a batch, for tensor sizes from 4 KiB to 64 MiB:
the sender puts a float32 tensor in a ``ForwardRequest``-like message and sends it; the
receiver gets it back as a tensor, reads every byte (``sum``: what an upload or a forward
does), and answers with a small acknowledgement. Two ways, side by side in rounds:

  pipe: the message pickled whole (``dumps_message``) through a ``multiprocessing`` pipe;
  shm:  ``tensor_transport.pack`` (a new ``/dev/shm`` segment, one copy in), the handle
        pickled through the same pipe, ``unpack`` on the other side (map, unlink, no copy).

It prints the median round trip per transfer for each way, their ratio shm/pipe, and the
crossover: the smallest size from which shm is faster at every larger size. streamproc uses
shared memory from ``tensor_transport.SHM_MIN_BYTES`` up (the crossover measured here,
rounded to a power of two). Run: ``python benchmarks/bench_transport.py [--repeats N]``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _machine import cpu_model_name

from streamproc.backends.multiprocessing import tensor_transport
from streamproc.execution.serialization import dumps_message, loads_message

SIZES = [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20]
#: Transfers per size and way in one round (fewer for large sizes: the time stays bounded).
TRANSFER_BYTES_PER_ROUND = 256 << 20


def _receiver(conn: Any) -> None:
    """Child process: receive, read every byte, acknowledge; ``None`` ends it."""
    import torch

    torch.set_num_threads(1)  # as in streamproc's workers (and no OpenMP barrier in the figures)

    while True:
        message = loads_message(conn.recv_bytes())
        if message is None:
            return
        tensor = tensor_transport.unpack(message)
        conn.send_bytes(dumps_message(float(tensor[:1].sum()) + float(tensor.sum()) * 0))


def _one_way(conn: Any, tensor: Any, use_shm: bool, count: int) -> float:
    """Median seconds of one transfer (send, receive, read, acknowledge)."""
    times = []
    pid = os.getpid()
    for _ in range(count):
        start = time.perf_counter()
        if use_shm:
            packed, _ = tensor_transport.pack(tensor, pid, min_bytes=0)
            conn.send_bytes(dumps_message(packed))
        else:
            conn.send_bytes(dumps_message(tensor))
        conn.recv_bytes()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="rounds; the best median of each is kept")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    if not tensor_transport.shm_available():
        print("no /dev/shm here: every tensor goes through the pipe; nothing to compare")
        return
    context = multiprocessing.get_context("fork")
    parent, child = context.Pipe()
    process = context.Process(target=_receiver, args=(child,), daemon=True)
    process.start()
    child.close()
    print(f"machine: {cpu_model_name()}, {os.cpu_count()} CPUs; torch {torch.__version__}")
    print(f"{'size':>9} {'pipe ms':>9} {'shm ms':>9} {'shm/pipe':>9}")
    results = []
    for size in SIZES:
        tensor = torch.rand(size // 4)
        count = max(5, min(200, TRANSFER_BYTES_PER_ROUND // size))
        best = {True: float("inf"), False: float("inf")}
        for _ in range(args.repeats):
            for use_shm in (False, True):
                best[use_shm] = min(best[use_shm], _one_way(parent, tensor, use_shm, count))
        results.append((size, best[False], best[True]))
        label = f"{size >> 10} KiB" if size < 1 << 20 else f"{size >> 20} MiB"
        print(f"{label:>9} {best[False] * 1e3:9.3f} {best[True] * 1e3:9.3f} {best[True] / best[False]:9.2f}")
    parent.send_bytes(dumps_message(None))
    process.join(10)
    crossover = None
    for i, (size, _, _) in enumerate(results):
        if all(shm < pipe for _, pipe, shm in results[i:]):
            crossover = size
            break
    print(f"crossover: {crossover if crossover is None else f'{crossover >> 10} KiB'}"
          f" (shm faster from there on); streamproc's SHM_MIN_BYTES: {tensor_transport.SHM_MIN_BYTES >> 10} KiB")
    leftover = tensor_transport.sweep_segments()
    assert not leftover, leftover


if __name__ == "__main__":
    main()
