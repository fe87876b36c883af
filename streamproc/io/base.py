"""The source contract: how a backend cuts a source into tasks and reads a task's records.

A source has two halves that may run in different processes:

* :meth:`Source.iter_tasks` runs in the main process (a feeder thread) and yields task
  payloads in order. For an in-memory iterable the payload holds the records themselves; for
  a splittable source (parquet row groups, jsonl lines) it holds only what a worker needs to
  read them, so the heavy decoding happens in the workers.
* :meth:`Source.read_task` runs where the task runs (main process or CPU worker) and yields
  the task's records.

Example subclass (a source of the squares of ``n`` numbers, read in the workers)::

    class Squares(Source):
        def __init__(self, n):
            self.n = n

        def iter_tasks(self, task_size):
            for start in range(0, self.n, task_size):
                yield (start, min(start + task_size, self.n))

        def read_task(self, payload):
            start, stop = payload
            return (i * i for i in range(start, stop))

        def describe(self):
            return f"squares({self.n})"

Ordering guarantee: concatenating ``read_task(p)`` over ``iter_tasks()`` in order gives the
source's records in order; payload boundaries depend only on the source and ``task_size``
(and, for an iterable, on its records' sizes: see NOTE [ streamproc byte bounds ] in
:mod:`streamproc.execution.byte_budget`), never on timing or on the number of workers.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any, Optional


def row_ranges(rows: int, task_size: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of consecutive runs of ``task_size`` rows out of ``rows``: the payloads of
    a source cut by row position (pandas, Arrow tables, Hugging Face datasets).

    >>> list(row_ranges(5, 2))
    [(0, 2), (2, 4), (4, 5)]
    """
    for start in range(0, rows, task_size):
        yield start, min(start + task_size, rows)


class Source(ABC):
    """Where records come from. Instances are pickled (with dill) to each worker once."""

    #: Whether tasks are runs of ``task_size`` records and :meth:`num_records` is cheap (an
    #: in-memory list, DataFrame or table): the plan may then cut a small input finer
    #: (:func:`streamproc.execution.granularity.finer_task_size`) when ``task_size`` is not set.
    tasks_follow_task_size: bool = False

    @abstractmethod
    def iter_tasks(self, task_size: int) -> Iterator[Any]:
        """Yields task payloads in source order (main process)."""

    @abstractmethod
    def read_task(self, payload: Any) -> Iterator[Any]:
        """Yields the records of one task (where the task runs)."""

    def iter_tasks_of_plan(self, task_size: int, min_task_records: int) -> Iterator[Any]:
        """The payloads a run uses (main process): :meth:`iter_tasks`, except that a source
        cutting tasks by bytes as well (an iterable) keeps at least ``min_task_records`` records
        in each task but the last (the plan's largest batch: batches never span tasks)."""
        return self.iter_tasks(task_size)

    def read_task_chunks(self, payload: Any, chunk_size: int) -> Iterator[list[Any]]:
        """The records of one task as lists of at most ``chunk_size`` (override when cheaper)."""
        records = iter(self.read_task(payload))
        while True:
            chunk = list(itertools.islice(records, chunk_size))
            if not chunk:
                return
            yield chunk

    def task_bytes(self, payload: Any) -> int:
        """An estimate of the bytes task ``payload`` brings into flight (main process, cheap:
        called once per task by the dispatcher, which bounds their sum; see NOTE [ streamproc
        byte bounds ]). The default, 0, means "small": the payload names where the records are
        and their count bounds it. Sources whose tasks carry records, or whose metadata says
        how big a task is, override it."""
        return 0

    def locate(self, payload: Any, row: int | None = None) -> str:
        """Where task ``payload`` (and its record number ``row``, counted from 0) is in the input,
        for error notes and dead-letter rows (where the task runs). Override to name the file,
        row group or line; the default names the source and the row only."""
        where = self.describe()
        return where if row is None else f"{where}, record {row} of its task"

    def fingerprint(self) -> Any:
        """What identifies the input, JSON-able, for ``write_parquet(resume=True)`` to refuse a
        changed one (main process). None (the default: in-memory sources) means "not checked";
        a source over files returns their paths, sizes and layout."""
        return None

    def check_stable_order(self, what: str) -> None:
        """Raises ``ValueError`` if a rerun may see the records in another order, which ``what``
        (``"write_parquet(resume=True)"``: it skips tasks by number) cannot allow (main process).
        The default accepts: files and in-memory data keep their order; ``read_sql`` refuses a
        query without an ``ORDER BY``."""
        return None

    def num_records(self) -> Optional[int]:
        """How many records the source holds, if it knows without reading them (main process);
        None: unknown. Progress uses it as its total; override where it is cheap (a length, file
        metadata)."""
        return None

    def num_tasks(self, task_size: int) -> Optional[int]:
        """How many tasks of ``task_size`` records it gives, if known without reading (main
        process); None: unknown. Sources whose tasks are not ``task_size`` records (parquet row
        groups) override it."""
        records = self.num_records()
        return None if records is None else -(-records // task_size)

    def rows_per_task(self, task_size: int) -> int:
        """The most records one task gives (main process): ``task_size``, unless the source
        cuts its tasks otherwise (parquet: one row group each). ``write_parquet`` derives its
        part size ``G`` from it, so it must be a function of the input only."""
        return task_size

    @abstractmethod
    def describe(self) -> str:
        """A short text for ``repr(stream)``."""


#: The most rows a columnar source decodes to dicts at once (parquet, Arrow, Hugging Face).
READ_BATCH_ROWS = 8192


class ChunkedSource(Source):
    """A source that decodes a task in slices (:meth:`read_task_chunks`, which it must define);
    :meth:`read_task` is their records one by one (where the task runs)."""

    def read_task(self, payload: Any) -> Iterator[Any]:
        for records in self.read_task_chunks(payload, READ_BATCH_ROWS):
            yield from records

    @abstractmethod
    def read_task_chunks(self, payload: Any, chunk_size: int) -> Iterator[list[Any]]:
        """The records of one task as lists of decoded rows (``chunk_size`` is the size asked for)."""
