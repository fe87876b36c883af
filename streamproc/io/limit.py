"""``limit(n)`` as a source, and the ``count()`` sink.

NOTE [ streamproc limit ]
    ``stream.map(f).limit(n).map(g)`` is two runs chained in the main process. The ops
    before the limit (with their source) form the *inner* stream; :class:`LimitSource` is
    the *outer* stream's source: its ``iter_tasks`` (main process, the thread that produces
    the outer run's tasks) runs the inner stream, takes its first ``n`` output records, then
    closes the inner run (which stops and reaps its workers) *before* handing the last of
    them on, and yields them as in-memory tasks of the outer run, where ``g`` runs.

    * Order: the inner run's output order is the simple backend's when deterministic, so the
      outer ops see exactly its first ``n`` records; with ``deterministic=False``, some ``n``.
    * Laziness: nothing runs until a sink asks; the inner run streams (records reach the
      outer run as they come), and the source is read only as far as the inner backend reads
      ahead of record ``n`` (the simple backend: to the end of the task holding it).
    * Options: ``set_processing`` called before ``limit`` applies to the inner stream;
      called after, it applies to both (``Stream.set_processing`` passes it on through
      :meth:`LimitSource.with_processing`). The inner run never shows a progress bar (the
      outer one counts the same records) and is never sharded (``shard=`` splits the
      outer, limited records, so the ranks' union is the first ``n`` records). An inner
      stream without ops runs on the simple backend: reading a source needs no workers.
    * Task numbers, error notes and stage numbers of the outer run count from the limit.
      So do its dead letters: with ``on_error="dead_letter"``, the inner run's go to the
      ``before-limit`` subdirectory of ``dead_letter_path`` (both runs number tasks from 0).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Optional

from .base import Source
from .sinks import Sink

if TYPE_CHECKING:
    from ..execution.task import ChunkFinalizer, TaskOutput
    from ..stream import Stream


#: Where the inner run of a limit writes its dead letters, under ``dead_letter_path``.
INNER_DEAD_LETTERS = "before-limit"


def check_count(value: Any, method: str) -> int:
    """``value`` as a record count for ``limit``/``take``; raises naming ``method`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{method}(): n must be an int, got {type(value).__name__}: {value!r:.60}")
    if value < 0:
        raise ValueError(f"{method}(): n must be >= 0, got {value}")
    return value


class LimitSource(Source):
    """The first ``n`` output records of ``inner`` (see NOTE [ streamproc limit ]).

    Runs in the main process; workers of the outer run receive the records themselves.
    """

    def __init__(self, inner: Stream, n: int) -> None:
        self.inner = inner
        self.n = n

    def with_processing(self, **options: Any) -> LimitSource:
        """This limit over the inner stream with ``options`` applied too (main process)."""
        return LimitSource(self.inner.set_processing(**options), self.n)

    def inner_stream(self) -> Stream:
        """The inner stream as it runs: no progress bar, no shard; simple when it has no ops."""
        changes: dict[str, Any] = {"show_progress": False, "shard": None}
        if not self.inner.ops:
            changes["backend"] = "simple"
        options = self.inner.options
        if options.on_error == "dead_letter" and options.dead_letter_path is not None:
            # Both runs number their tasks from 0: their dead-letter files must not meet.
            changes["dead_letter_path"] = os.path.join(options.dead_letter_path, INNER_DEAD_LETTERS)
        return self.inner.set_processing(**changes)

    def iter_tasks(self, task_size: int) -> Iterator[list[Any]]:
        if self.n == 0:
            return  # nothing to run: the inner stream does not even start
        records = iter(self.inner_stream())
        task: list[Any] = []
        taken = 0
        try:
            for record in records:
                task.append(record)
                taken += 1
                if taken == self.n:
                    break  # never ask for record n + 1: it may not exist, or cost a whole task
                if len(task) >= task_size:
                    yield task
                    task = []
        finally:
            # Stops the inner run's workers as soon as the n-th record is out (or the outer
            # run stops early), before the outer run has processed the last task.
            close = getattr(records, "close", None)
            if close is not None:
                close()
        if task:
            yield task

    def read_task(self, payload: list[Any]) -> Iterator[Any]:
        return iter(payload)

    def read_task_chunks(self, payload: list[Any], chunk_size: int) -> Iterator[list[Any]]:
        yield payload  # already a list of at most task_size records

    def locate(self, payload: Any, row: int | None = None) -> str:
        where = f"limit({self.n})" if self.inner is None else f"limit({self.n}) of {self.inner.source.describe()}"
        return where if row is None else f"{where}, record {row} of its task"

    def num_records(self) -> Optional[int]:
        """``min(n, the inner source's size)`` when the inner ops keep one record per record
        (``map`` only); else ``n``, an upper bound (main process)."""
        from ..ops import Map

        one_to_one = all(isinstance(op, Map) for op in self.inner.ops)
        size = self.inner.source.num_records() if one_to_one else None
        return self.n if size is None else min(self.n, size)

    def describe(self) -> str:
        if self.inner is None:  # a worker's copy (see __getstate__)
            return f"limit({self.n})"
        ops = "".join(f".{op.describe()}" for op in self.inner.ops)
        return f"{self.inner.source.describe()}{ops}.limit({self.n})"

    def __getstate__(self) -> dict[str, Any]:
        # Workers only call read_task: the inner stream (its source, its callables) stays here.
        return {"inner": None, "n": self.n}


class CountSink(Sink):
    """``count()``: each chunk becomes its length where it is produced; only ints travel."""

    def __init__(self) -> None:
        self.total = 0

    def finalizer(self) -> ChunkFinalizer:
        return len

    def write(self, output: TaskOutput) -> None:
        self.total += output.count

    def commit(self) -> int:
        return self.total
