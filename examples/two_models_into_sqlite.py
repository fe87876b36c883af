"""Two models on one GPU worker under a memory budget that fits one of them, parquet into SQLite.

A small NER-like token classifier tags every token of a paragraph; an embedding model then
embeds the paragraph; the records (id, the count of tokens tagged as entities, the embedding)
go into a SQLite table, one transaction per task. ``gpu_memory_budget`` is set to the larger
model's size, so the GPU worker can hold only one of the two on its device at a time: it swaps
them, serving the batches of the model already loaded first, and the run statistics count the
swaps. The paragraphs are real English text: the Markdown documentation of this repository.

    python examples/two_models_into_sqlite.py [--out DIR] [--device cpu|cuda:0]

Runs on the CPU when there is no GPU (the GPU worker then runs on device "cpu").
"""

from __future__ import annotations

import argparse
import pathlib
import sqlite3
import tempfile
import time
import zlib
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

import streamproc as sp

VOCAB = 8192
MAX_TOKENS = 64
ENTITY_TAGS = 9  # tag 0 is "not an entity", as in CoNLL-style NER
REPO = pathlib.Path(__file__).resolve().parent.parent


class TokenTagger(torch.nn.Module):
    """A token classifier: embeddings, one transformer-style mixing layer, a tag per token."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, 256)
        self.mix = torch.nn.Linear(256, 256)
        self.tags = torch.nn.Linear(256, ENTITY_TAGS)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = torch.relu(self.mix(self.embed(batch["ids"])))
        return self.tags(hidden).argmax(-1) * batch["mask"]  # padding is never an entity


class ParagraphEmbedder(torch.nn.Module):
    """Mean-pooled token embeddings, projected and normalised (a sentence-embedding model's shape)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, 384)
        self.project = torch.nn.Linear(384, 384)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = batch["mask"].unsqueeze(-1).float()
        pooled = (self.embed(batch["ids"]) * mask).sum(1) / mask.sum(1).clamp(min=1)
        return torch.nn.functional.normalize(self.project(pooled), dim=-1)


def token_ids(text: str) -> list[int]:
    """Words hashed into the vocabulary (a stand-in for a tokenizer), at most MAX_TOKENS."""
    return [zlib.crc32(word.lower().encode()) % VOCAB for word in text.split()[:MAX_TOKENS]] or [0]


def n_words(record: dict[str, Any]) -> int:
    """The sort key of both stages: batches of paragraphs of similar lengths pad little."""
    return min(MAX_TOKENS, len(record["text"].split()))


def collate(records: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """CPU worker: pads the records' token ids into one batch."""
    ids = [token_ids(r["text"]) for r in records]
    width = max(len(i) for i in ids)
    return {
        "ids": torch.tensor([i + [0] * (width - len(i)) for i in ids]),
        "mask": torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids]),
    }


def count_entities(records: list[dict[str, Any]], tags: torch.Tensor) -> list[dict[str, Any]]:
    return [{**r, "entities": int((row > 0).sum())} for r, row in zip(records, tags)]


def attach_embedding(records: list[dict[str, Any]], embeddings: torch.Tensor) -> list[dict[str, Any]]:
    return [{"id": r["id"], "entities": r["entities"], "embedding": row.tolist()} for r, row in zip(records, embeddings)]


def model_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def write_corpus(directory: pathlib.Path, copies: int) -> int:
    """Paragraphs of the repository's Markdown files, ``copies`` times, into parquet row groups."""
    paragraphs = [
        p.strip()
        for path in [*sorted((REPO / "docs").glob("*.md")), REPO / "README.md"]
        for p in path.read_text(encoding="utf-8").split("\n\n")
        if len(p.split()) >= 5
    ] * copies
    directory.mkdir(parents=True, exist_ok=True)
    table = pa.table({"id": list(range(len(paragraphs))), "text": paragraphs})
    pq.write_table(table, directory / "paragraphs.parquet", row_group_size=256)
    return len(paragraphs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=None, help="a directory for the corpus and the database")
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--copies", type=int, default=4, help="how many times the corpus is repeated")
    args = parser.parse_args()
    out = args.out or pathlib.Path(tempfile.mkdtemp(prefix="streamproc-two-models-"))
    records = write_corpus(out / "corpus", args.copies)
    database = out / "paragraphs.db"

    tagger, embedder = TokenTagger(), ParagraphEmbedder()
    budget = max(model_bytes(tagger), model_bytes(embedder))  # one model at a time on the device
    stream = (
        sp.read_parquet(out / "corpus")
        .map_gpu(collate, tagger, count_entities, batch_size=64, sort_by=n_words)
        .map_gpu(collate, embedder, attach_embedding, batch_size=64, sort_by=n_words)
        .set_processing(num_cpu_workers=1, gpu_worker_devices=[args.device], gpu_memory_budget=budget)
    )
    started = time.perf_counter()
    with sp.collect_stats() as stats:
        rows = stream.write_sql(database, "paragraphs", if_exists="replace")
    seconds = time.perf_counter() - started
    run = stats.runs[-1]
    swaps = sum(process.swaps for process in run.processes.values())
    swap_seconds = sum(process.swap_seconds for process in run.processes.values())
    with sqlite3.connect(database) as db:
        stored, entities = db.execute("SELECT COUNT(*), SUM(entities) FROM paragraphs").fetchone()
    db.close()
    print(f"models: tagger {model_bytes(tagger) / 1e6:.1f} MB, embedder {model_bytes(embedder) / 1e6:.1f} MB; "
          f"budget {budget / 1e6:.1f} MB on {args.device}")
    print(f"{rows} of {records} paragraphs written ({stored} rows in {database}, {entities} entity tokens)")
    print(f"{rows / seconds:,.0f} paragraphs/s over {seconds:.1f} s; {swaps} model swaps taking {swap_seconds:.2f} s")


if __name__ == "__main__":
    main()
