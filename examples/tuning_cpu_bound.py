"""Tuning case 1, CPU-bound: a pure-Python stage takes the workers' time.

Run ``python examples/tuning_cpu_bound.py`` (CPU only, a few seconds). Two CPU workers clean
and count the words of synthetic documents; the report names the cleaning stage and says
"add CPU workers". See docs/tuning.md.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import re

import streamproc as sp

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "while", "streamproc", "counts", "words"]


def make_document(i: int) -> str:
    """A deterministic ~600-character document with some markup."""
    words = [WORDS[(i * 7 + k * 13) % len(WORDS)] for k in range(100)]
    return "<p>" + " ".join(words).upper() + "</p>"


def clean_and_count(text: str) -> dict[str, int]:
    """The costly pure-Python stage: strip tags, lower-case, count words and word pairs."""
    text = re.sub(r"<[^>]+>", " ", text).lower()
    words = text.split()
    counts = collections.Counter(words)
    counts.update(f"{a} {b}" for a, b in itertools.pairwise(words))
    return {"words": len(words), "distinct": len(counts)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    stream = (
        sp.from_iterable(range(args.records))
        .map(make_document)
        .map(clean_and_count)
        .set_processing(backend="multiprocessing", num_cpu_workers=args.workers)
    )
    with sp.collect_stats() as stats:
        stream.to_list()
    print(stats.report())


if __name__ == "__main__":
    main()
