"""The progress bar of a run (main process): records out, and their rate."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .execution.task import TaskOutput


def with_progress(outputs: Iterable[TaskOutput], enabled: bool, desc: str = "streamproc") -> Iterator[TaskOutput]:
    """Passes outputs through, advancing a tqdm bar by each one's ``count`` when enabled."""
    if not enabled:
        yield from outputs
        return
    from tqdm.auto import tqdm

    with tqdm(desc=desc, unit=" records", unit_scale=True, dynamic_ncols=True) as bar:
        for output in outputs:
            bar.update(output.count)
            yield output
