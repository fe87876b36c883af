"""The main streamproc job: classify a parquet dataset of documents with a small transformer.

Run it with ``tox -e demo`` (or ``python examples/classify_documents.py``). It

1. generates a synthetic parquet dataset of news-like documents (deterministic for a seed:
   several files, a few row groups each, messy text with HTML and odd whitespace);
2. builds a small document classifier (token embedding + 2-layer ``TransformerEncoder``,
   ``d_model=64``) with seeded weights and fits it for a few seconds on documents generated
   apart from the dataset, so that its labels mean something (nothing is downloaded);
3. runs the pipeline::

       sp.read_parquet(data)                          # one task per row group
         .map(clean)                                  # normalise text (pure Python, CPU)
         .filter(has_tokens)                          # drop documents left empty
         .map_gpu(prepare_batch, model, postprocess,  # tokenize+pad / forward / argmax
                  batch_size="8192 padded_tokens", batch_by="n_tokens",
                  sort_by="n_tokens")                 # batch similar lengths: little padding
         .write_parquet(out, overwrite=True)          # atomic part files

4. prints records, seconds, records/s, the output path, a few rows, and how often the
   predicted label agrees with the topic the generator used (a check that every output row
   was attached to its own record).

Flags: ``--docs N``, ``--backend simple|multiprocessing``, ``--workers N``, ``--out DIR``,
``--data DIR``, ``--device cpu|cuda``, ``--seed``, ``--progress``, ``--stats``. Without ``--backend``,
streamproc picks: the simple backend for one worker, multiprocessing for more.
"""

from __future__ import annotations

import argparse
import html
import itertools
import json
import os
import re
import sys
import time
import unicodedata
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

import streamproc as sp

LABELS = ("sports", "science", "business", "health")

# -- synthetic data -------------------------------------------------------------------------

TOPIC_WORDS = {
    "sports": "match goal team coach season league striker keeper tournament referee stadium fans "
    "penalty championship transfer midfield victory defeat score playoff athlete medal race sprint",
    "science": "research study physics experiment telescope molecule genome quantum laboratory "
    "hypothesis particle climate fossil species theory data orbit neutron protein scientists",
    "business": "market shares profit revenue investors merger startup earnings quarter stock "
    "inflation bank economy growth acquisition ceo dividend retail supply prices trade",
    "health": "patients doctors hospital vaccine treatment disease clinical symptoms therapy "
    "nutrition diet sleep heart cancer virus nurses diagnosis infection mental medicine",
}
_FILLER_TEXT = (
    "the a of to and in on for with that this was were is are it by from at as be have has had "
    "new said year years people time more after over about two first last week report told local "
    "according officials group many most some could would may also other today while during under "
    "city country world state national team"
)
FILLER_WORDS = _FILLER_TEXT.split()
_TOPIC_VOCAB = {label: words.split() for label, words in TOPIC_WORDS.items()}
_SOURCES = ("wire", "blog", "forum", "press-release")


def _make_text(rng: np.random.Generator, label: str) -> str:
    """One messy document about ``label``: mostly filler words, some topic words, some noise."""
    n_words = int(np.clip(rng.lognormal(mean=3.7, sigma=0.6), 5, 300))
    topic = _TOPIC_VOCAB[label]
    is_topic = rng.random(n_words) < 0.18
    topic_picks, filler_picks = rng.integers(0, len(topic), n_words), rng.integers(0, len(FILLER_WORDS), n_words)
    words = [topic[i] if t else FILLER_WORDS[j] for t, i, j in zip(is_topic, topic_picks, filler_picks)]
    # Noise that clean() has to undo: capitals, HTML, entities, odd whitespace, full-width chars.
    for k in rng.integers(0, n_words, max(1, n_words // 25)):
        words[k] = words[k].upper()
    if rng.random() < 0.3:
        words.insert(int(rng.integers(0, len(words))), "<br/>")
    if rng.random() < 0.2:
        words.insert(int(rng.integers(0, len(words))), "&amp;")
    if rng.random() < 0.1:
        words.insert(0, "\uff2e\uff25\uff37\uff33:")  # "NEWS:" in full-width letters (NFKC folds it)
    text = " ".join(words)
    return f"<p>{text}</p>  \n\t" if rng.random() < 0.5 else text + "   "


def generate_dataset(path: Path, n_docs: int, seed: int, n_files: int = 4, row_groups_per_file: int = 3) -> list[Path]:
    """Writes ``n_docs`` synthetic documents to ``path/docs-0000.parquet``...; deterministic for ``seed``.

    Columns: ``id`` (int64, 0..n-1), ``source`` (str), ``topic`` (str, what the generator wrote
    about, used to check the labels afterwards), ``text`` (str, messy). About 1% of the
    documents are boilerplate that cleaning leaves empty. Earlier ``docs-*.parquet`` files in
    ``path`` are replaced; nothing else there is touched.
    """
    path.mkdir(parents=True, exist_ok=True)
    for old in path.glob("docs-*.parquet"):
        old.unlink()
    rng = np.random.default_rng(seed)
    n_files = max(1, min(n_files, n_docs))
    bounds = np.linspace(0, n_docs, n_files + 1).astype(int)
    files = []
    for index, (start, stop) in enumerate(itertools.pairwise(bounds.tolist())):
        labels = [LABELS[i] for i in rng.integers(0, len(LABELS), stop - start)]
        texts = [_make_text(rng, label) if rng.random() >= 0.01 else "<br/> &nbsp; <p></p>" for label in labels]
        table = pa.table(
            {
                "id": pa.array(range(start, stop), pa.int64()),
                "source": [_SOURCES[i] for i in rng.integers(0, len(_SOURCES), stop - start)],
                "topic": labels,
                "text": texts,
            }
        )
        file = path / f"docs-{index:04d}.parquet"
        pq.write_table(table, file, row_group_size=max(1, -(-(stop - start) // row_groups_per_file)))
        files.append(file)
    return files


# -- the pipeline's functions (module level, so that workers can unpickle them) ------------

MAX_TOKENS = 128
VOCAB_SIZE = 8192
PAD_ID, UNK_ID = 0, 1
_TAG_RE = re.compile(r"<[^>]{0,200}>")
_SPACE_RE = re.compile(r"\s+")
_WORD_RE = re.compile(r"\w+")


def clean(record: dict[str, Any]) -> dict[str, Any]:
    """Normalises a document's text (runs on a CPU worker, or the main process with simple).

    NFKC unicode folding, HTML tags and entities removed, whitespace collapsed, lower case.
    Adds ``n_tokens``, the number of tokens the model will see, which sizes the batches.
    """
    text = unicodedata.normalize("NFKC", record["text"] or "")
    text = html.unescape(_TAG_RE.sub(" ", text))
    text = _SPACE_RE.sub(" ", text).strip().lower()
    return {**record, "text": text, "n_tokens": min(len(_WORD_RE.findall(text)), MAX_TOKENS)}


def has_tokens(record: dict[str, Any]) -> bool:
    return record["n_tokens"] > 0


def token_id(word: str) -> int:
    # crc32, not hash(): str hashes are salted per process, and the ids must be the same in every
    # worker process (and every run) for the output to be deterministic.
    return 2 + zlib.crc32(word.encode("utf-8")) % (VOCAB_SIZE - 2)


def tokenize(text: str) -> list[int]:
    """A hash-based word tokenizer: ``\\w+`` words, each hashed into ``VOCAB_SIZE`` ids."""
    return [token_id(word) for word in _WORD_RE.findall(text)[:MAX_TOKENS]] or [UNK_ID]


def prepare_batch(records: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Tokenizes and pads a batch into CPU tensors (runs on a CPU worker)."""
    ids = [tokenize(r["text"]) for r in records]
    width = max(map(len, ids))
    input_ids = torch.full((len(ids), width), PAD_ID, dtype=torch.long)
    for row, seq in enumerate(ids):
        input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": input_ids != PAD_ID}


class DocClassifier(nn.Module):
    """Token + position embeddings, a 2-layer transformer encoder, masked mean pooling, a linear head.

    ``forward`` takes the batch dict of :func:`prepare_batch` and returns logits
    ``[batch, len(LABELS)]``, so the module itself is the ``forward`` of ``map_gpu`` (streamproc
    moves it to the device once, and it runs under ``torch.inference_mode()`` on a GPU worker).
    """

    def __init__(self, d_model: int = 64, n_heads: int = 4, n_layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB_SIZE, d_model, padding_idx=PAD_ID)
        self.position = nn.Embedding(MAX_TOKENS, d_model)
        layer = nn.TransformerEncoderLayer(d_model, n_heads, dim_feedforward=2 * d_model, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, len(LABELS))

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        input_ids, mask = batch["input_ids"], batch["attention_mask"]
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.embed(input_ids) + self.position(positions)
        x = self.encoder(x, src_key_padding_mask=~mask)
        weights = mask.unsqueeze(-1).to(x.dtype)
        pooled = (x * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return self.head(pooled)


def postprocess(records: list[dict[str, Any]], logits: torch.Tensor) -> list[dict[str, Any]]:
    """Attaches ``label`` and ``score`` (softmax probability) to each record (runs on a CPU worker)."""
    scores, indices = torch.softmax(logits.float(), dim=-1).max(dim=-1)
    return [
        {**record, "label": LABELS[index], "score": round(score, 4)}
        for record, index, score in zip(records, indices.tolist(), scores.tolist())
    ]


def build_model(seed: int, train_steps: int = 100) -> DocClassifier:
    """A :class:`DocClassifier` with seeded weights, fitted briefly on freshly generated documents.

    The training documents come from another seed than the dataset's, so the dataset is unseen.
    """
    torch.manual_seed(seed)
    model = DocClassifier()
    if train_steps <= 0:
        return model.eval()
    rng = np.random.default_rng(seed + 1_000_003)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(train_steps):
        labels = rng.integers(0, len(LABELS), 32)
        records = [clean({"text": _make_text(rng, LABELS[i])}) for i in labels]
        # Short sequences are enough to learn the topic words and keep this to a few seconds.
        batch = prepare_batch([{**r, "text": " ".join(r["text"].split()[:32])} for r in records])
        loss = nn.functional.cross_entropy(model(batch), torch.as_tensor(labels))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


# -- the job ---------------------------------------------------------------------------------


def build_stream(data: Path, model: DocClassifier, batch_size: str) -> sp.Stream:
    return (
        sp.read_parquet(data, columns=["id", "source", "topic", "text"])
        .map(clean)
        .filter(has_tokens)
        # Sorting each task's documents by length before batching keeps padding low; the
        # outputs come back in input order (docs/tuning.md, "Sorting by length").
        .map_gpu(prepare_batch, model, postprocess, batch_size=batch_size, batch_by="n_tokens", sort_by="n_tokens")
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=20_000, help="documents to generate (default: 20000)")
    parser.add_argument(
        "--data", type=Path, default=Path("data/documents"), help="input folder, (re)generated (default: data/documents/)"
    )
    parser.add_argument("--out", type=Path, default=Path("out/classified"), help="output directory (default: out/classified/)")
    parser.add_argument("--backend", choices=("simple", "multiprocessing"), default=None, help="default: streamproc picks")
    parser.add_argument("--workers", type=int, default=None, help="CPU workers (num_cpu_workers)")
    parser.add_argument("--device", default=None, help="where forward runs, e.g. cpu or cuda:0 (default: cuda if available)")
    parser.add_argument("--batch-size", default="8192 padded_tokens", help="map_gpu batch size (default: '8192 padded_tokens')")
    parser.add_argument("--seed", type=int, default=0, help="seed of the dataset and of the model (default: 0)")
    parser.add_argument("--train-steps", type=int, default=100, help="warm-up training steps of the model (default: 100)")
    parser.add_argument("--progress", action="store_true", help="show a progress bar")
    parser.add_argument("--stats", action="store_true", help="print the run's stats report at its end (show_stats)")
    args = parser.parse_args(argv)
    if args.docs < 1:
        parser.error("--docs must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    started = time.perf_counter()
    files = generate_dataset(args.data, args.docs, args.seed)
    row_groups = sum(pq.ParquetFile(f).num_row_groups for f in files)
    elapsed = time.perf_counter() - started
    print(f"dataset: {args.docs} documents in {len(files)} files, {row_groups} row groups, under {args.data}/ ({elapsed:.1f} s)")

    started = time.perf_counter()
    model = build_model(args.seed, args.train_steps)
    elapsed = time.perf_counter() - started
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model:   {n_params:,} parameters, {args.train_steps} warm-up steps ({elapsed:.1f} s)")

    stream = build_stream(args.data, model, args.batch_size).set_processing(
        backend=args.backend,
        num_cpu_workers=args.workers,
        gpu_worker_devices=[args.device] if args.device else None,
        show_progress=args.progress,
        show_stats=args.stats,
    )
    print(f"backend: {stream.options.effective_backend}\n{stream!r}")

    started = time.perf_counter()
    parts = stream.write_parquet(args.out, overwrite=True)
    seconds = time.perf_counter() - started

    result = pq.read_table(parts, columns=["id", "topic", "label", "score", "text"]) if parts else None
    n_records = result.num_rows if result is not None else 0
    print(f"\nrecords:   {n_records}")
    print(f"seconds:   {seconds:.2f}")
    print(f"records/s: {n_records / seconds:,.0f}")
    print(f"output:    {args.out}/ ({len(parts)} part file(s): {', '.join(os.path.basename(p) for p in parts)})")
    if result is None or n_records == 0:
        print("no records were written", file=sys.stderr)
        return 1
    rows = result.to_pylist()
    agreement = sum(r["label"] == r["topic"] for r in rows) / n_records
    counts = {label: sum(r["label"] == label for r in rows) for label in LABELS}
    print(f"labels:    {json.dumps(counts)}; agree with the generator's topic: {agreement:.1%}")
    print("sample rows:")
    for row in rows[:: max(1, n_records // 5)][:5]:
        print(
            f"  id={row['id']:<6} label={row['label']:<9} score={row['score']:.3f} topic={row['topic']:<9} {row['text'][:48]!r}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
