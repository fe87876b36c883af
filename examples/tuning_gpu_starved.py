"""Tuning case 2, GPU-starved: the GPU worker waits for batches that the CPU side prepares.

Run ``python examples/tuning_gpu_starved.py`` (CPU only: the "GPU worker" runs on
``gpu_worker_devices=["cpu"]``; a few seconds plus torch's import). One CPU worker tokenizes
in pure Python, a small model runs in the GPU worker; the report shows the GPU worker idle
most of the time and says "add CPU workers or sort by length". See docs/tuning.md.
"""

from __future__ import annotations

import argparse
import zlib

import torch
from torch import nn

import streamproc as sp

VOCAB = 5000


def make_document(i: int) -> dict[str, str]:
    n_words = 20 + (i * 37) % 200  # lengths from 20 to 219 words: padding when unsorted
    return {"text": " ".join(f"word{(i * 31 + k * 17) % 997}" for k in range(n_words))}


def count_words(record: dict[str, str]) -> dict[str, object]:
    return {**record, "n_tokens": record["text"].count(" ") + 1}


def tokenize(batch: list[dict[str, object]]) -> torch.Tensor:
    """The CPU side (in a CPU worker): a deliberately slow pure-Python tokenizer, padded."""
    rows = [[zlib.crc32(word.encode()) % VOCAB for word in str(r["text"]).split() for _ in range(3)][::3] for r in batch]
    width = max(len(row) for row in rows)
    return torch.tensor([row + [0] * (width - len(row)) for row in rows])


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.EmbeddingBag(VOCAB, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids)).argmax(-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=4000)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    model = Classifier()
    stream = (
        sp.from_iterable(range(args.records))
        .map(make_document)
        .map(count_words)
        # sort_by: each task's documents are batched in length order (outputs in input order).
        .map_gpu(tokenize, model, batch_size="4096 padded_tokens", batch_by="n_tokens", sort_by="n_tokens")
        .set_processing(backend="multiprocessing", num_cpu_workers=args.workers, gpu_worker_devices=["cpu"])
    )
    with sp.collect_stats() as stats:
        stream.to_list()
    print(stats.report())


if __name__ == "__main__":
    main()
