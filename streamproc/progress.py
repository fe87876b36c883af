"""The progress bar of a run (main process): records out, and their rate."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


def with_progress(chunks: Iterator[tuple[Any, int]], enabled: bool, desc: str = "streamproc") -> Iterator[tuple[Any, int]]:
    """Passes ``(chunk, count)`` pairs through, advancing a tqdm bar by ``count`` when enabled."""
    if not enabled:
        yield from chunks
        return
    from tqdm.auto import tqdm

    with tqdm(desc=desc, unit=" records", unit_scale=True, dynamic_ncols=True) as bar:
        for chunk, count in chunks:
            bar.update(count)
            yield chunk, count
