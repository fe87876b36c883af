"""Which stage an error or a thread is in: the generator layer every stage's output runs inside.

The executor runs every stage's output inside :func:`tagged` (or :func:`tagged_timed`, which
also times it: see :func:`streamproc.execution.task.iter_task_records`), and an exception is
tagged by the first stage it crosses (:func:`tag_stage`). An exception from upstream has
already been tagged by its own stage when it passes through a downstream one, so each error
names the stage (and, for ``map_gpu``, the callable) that raised it. The same layers tell a
watchdog which stage a thread is stuck in (:func:`stage_running_in`). They run wherever the
task runs: the main process (simple and threads backends) or a CPU worker.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

from .errors import add_context_note

#: Attribute set on an exception by the first stage that sees it (so that downstream stages,
#: through which it propagates, do not claim it).
STAGE_ATTR = "_streamproc_stage"



def tag_stage(exc: BaseException, stage: str) -> None:
    """Records on ``exc`` the stage it came from, unless an upstream stage already did."""
    if getattr(exc, STAGE_ATTR, None) is None:
        try:
            setattr(exc, STAGE_ATTR, stage)
        except AttributeError:
            pass
        add_context_note(exc, f"streamproc: raised in {stage}")



def tagged(it: Iterable[Any], stage: str) -> Iterator[Any]:
    """Yields from ``it``, tagging an exception with ``stage`` on its way out."""
    try:
        yield from it
    except Exception as exc:
        tag_stage(exc, stage)
        raise


class ChunkTotals(Protocol):
    """Where :func:`tagged_timed` adds up a stage's output (see :mod:`streamproc.execution.timing`)."""

    seconds: float
    chunks: int
    records: int


def tagged_timed(it: Iterable[list[Any]], stage: str, into: ChunkTotals) -> Iterator[list[Any]]:
    """:func:`tagged`, also adding to ``into`` the time spent producing each chunk, and its length.

    One generator layer does both, so a timed stage costs no extra layer: two ``perf_counter``
    calls per chunk, never per record. (A ``for`` loop, not ``next()`` in a ``try``: the end
    of ``it`` then raises no ``StopIteration`` to catch.) Runs where the task runs.
    """
    clock = time.perf_counter
    start = clock()
    try:
        for item in it:
            into.seconds += clock() - start
            into.chunks += 1
            into.records += len(item)
            yield item
            start = clock()
    except Exception as exc:  # from ``it`` (the consumer throws nothing in but GeneratorExit)
        into.seconds += clock() - start
        tag_stage(exc, stage)
        raise
    into.seconds += clock() - start


#: The code of the generators that every stage's output runs inside (see :func:`stage_running_in`).
_STAGE_CODES = (tagged.__code__, tagged_timed.__code__)


def stage_running_in(thread: threading.Thread) -> str:
    """The stage ``thread`` is running now (each stage runs inside ``tagged`` or ``tagged_timed``;
    the innermost wins)."""
    frame = sys._current_frames().get(thread.ident or -1)
    while frame is not None and frame.f_code not in _STAGE_CODES:
        frame = frame.f_back
    return str(frame.f_locals["stage"]) if frame is not None else "streamproc's own code"
