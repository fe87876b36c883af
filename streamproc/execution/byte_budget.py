"""Bytes, as well as counts: the size estimate of records and tasks, and the run's byte budget.

Pure functions and values (no process, no thread), used in the main process:

* :func:`estimate_bytes` is a cheap, deterministic estimate of what a record holds: the lengths
  of its strings and buffers, ``nbytes`` of arrays and tensors, summed over its containers
  (a sample of the first :data:`SAMPLED_ITEMS` items of a big container, scaled). It never
  pickles and never calls ``sys.getsizeof`` (shallow, and wrong for containers); its result
  depends only on the record, so anything cut by it is the same in every run.
* :func:`fill_task` pulls one task's records from an iterator, stopping at ``task_size``
  records or at about :data:`TASK_TARGET_BYTES`, whichever comes first; the records are sized
  by sampling (one estimate per segment, each segment 15 times the records before it), so tiny records cost a handful
  of estimates per task and keep their ``task_size``.
* :class:`ByteBudget` bounds the bytes handed to workers and not finished, and the bytes of
  outputs held in the reorder buffer; :func:`default_byte_budget` is a fraction of the memory
  available, capped.

NOTE [ streamproc byte bounds ]
    Memory in flight is bounded by counts (tasks per worker, the reorder window) *and* by
    bytes. Task boundaries adapt to record size (:func:`fill_task`), as a pure function of
    the records, never of timing or of the worker count (design.md section 5, part layout),
    so resume and the part layout see the same tasks in every run. The dispatcher then
    bounds, with ``B = ByteBudget``::

        in_flight_bytes <= B.in_flight_bytes + W * (largest task)    (tasks sent, not finished)
        reorder_bytes   <= B.reorder_bytes + (outputs of the tasks in flight)

    with ``W`` workers: a task goes out only while ``in_flight_bytes < B.in_flight_bytes``,
    or to a worker with nothing in flight (never fewer than one task per worker; above the
    budget, each worker holds one task at most). The oldest unreleased task may always be
    handed out, so no bound can deadlock a run.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Optional

#: A task of an in-memory or lazy iterable stops growing at about this many bytes (estimated):
#: 1 MiB records make tasks of 1 record (but a batch: see ``min_records``), not of 1,024 (1 GB).
#: Measured with benchmarks/bench_memory.py (20k x 64 KiB records, 2 workers): 4 MiB tasks
#: peaked at 166 MB for the process tree, 1 MiB at 95 MB, 256 KiB at 75 MB (an idle tree of 3
#: processes is about 70 MB), none slower; smaller tasks pay a task's fixed cost more often.
TASK_TARGET_BYTES = 1024 * 1024
#: The byte budget of a run is this fraction of the memory available when it starts...
AVAILABLE_MEMORY_FRACTION = 0.125
#: ... capped here (a few hundred MB keep the pipes busy; more only buffers) ...
MAX_BUDGET_BYTES = 256 * 1024 * 1024
#: ... and never below this (a machine short of memory still needs a task per worker).
MIN_BUDGET_BYTES = 32 * 1024 * 1024
#: How many items of a container :func:`estimate_bytes` looks at; the rest are assumed alike.
SAMPLED_ITEMS = 16
#: How deep :func:`estimate_bytes` follows nested containers; below, an item counts as
#: :data:`OBJECT_BYTES`.
MAX_DEPTH = 4
#: What a small object (an int, a float, None, an opaque object) is counted as.
OBJECT_BYTES = 32
#: How much faster than the records pulled so far each sampled segment of :func:`fill_task` grows.
SEGMENT_GROWTH = 15


def estimate_bytes(obj: Any, depth: int = 0) -> int:
    """A deterministic estimate of the bytes ``obj`` holds (where it is called: main process).

    Strings and bytes count their length, arrays and tensors their ``nbytes`` (numpy,
    pyarrow, torch: read as an attribute, nothing is converted), containers the sum over
    their items (a big one: its first :data:`SAMPLED_ITEMS` items, scaled to its length),
    objects with a ``__dict__`` their attributes; anything else :data:`OBJECT_BYTES`.

    >>> estimate_bytes(b"x" * 1000)
    1032
    >>> estimate_bytes({"text": "abc", "id": 1}) == 32 + (4 + 32) + (3 + 32) + (2 + 32) + 32
    True

    An estimate, not an accounting: it ignores the interpreter's per-object overhead beyond
    a constant and assumes the unsampled items of a container look like the sampled ones.
    """
    if isinstance(obj, (bytes, bytearray, str)):
        return len(obj) + OBJECT_BYTES
    if obj is None or isinstance(obj, (int, float, bool, complex)):
        return OBJECT_BYTES
    if isinstance(obj, memoryview):
        return obj.nbytes + OBJECT_BYTES
    nbytes = getattr(type(obj), "nbytes", None)
    if nbytes is not None:  # numpy arrays, pyarrow arrays/tables, torch tensors (a property)
        try:
            size = obj.nbytes
        except Exception:  # a lazy or broken property: count it as an object
            size = None
        if isinstance(size, int):
            return size + OBJECT_BYTES
    if depth >= MAX_DEPTH:
        return OBJECT_BYTES
    if isinstance(obj, Mapping):
        items = obj.items()
        sample = list(itertools.islice(items, SAMPLED_ITEMS))
        total = sum(estimate_bytes(k, depth + 1) + estimate_bytes(v, depth + 1) for k, v in sample)
        return _scaled(total, len(sample), len(obj))
    if isinstance(obj, (list, tuple, set, frozenset)):
        sample = list(itertools.islice(obj, SAMPLED_ITEMS))
        total = sum(estimate_bytes(item, depth + 1) for item in sample)
        return _scaled(total, len(sample), len(obj))
    attributes = getattr(obj, "__dict__", None)
    if isinstance(attributes, dict):
        return estimate_bytes(attributes, depth + 1)
    return OBJECT_BYTES


def _scaled(sampled_total: int, sampled: int, length: int) -> int:
    if sampled == 0:
        return OBJECT_BYTES
    return OBJECT_BYTES + (sampled_total * length) // sampled


def fill_task(
    iterator: Iterator[Any], records: list[Any], task_size: int, target_bytes: int = TASK_TARGET_BYTES, min_records: int = 1
) -> int:
    """Pulls one task's records from ``iterator`` into ``records``; returns their estimated bytes.

    Stops at ``task_size`` records, when the estimate reaches ``target_bytes`` (but not before
    ``min_records``: the plan's largest batch, since batches never span tasks), or at the
    iterator's end. Records are pulled in segments (1 record, then each segment
    :data:`SEGMENT_GROWTH` times the records so far, and never more than the estimate says
    still fit); a segment is sized by :func:`estimate_bytes` of its first and last records
    (the larger, times its length). Runs in the main process (the source's reader).

    The cut is a pure function of the records: the same records give the same tasks in every
    run, whatever the timing or the number of workers. A task holds at least one record.
    ``records`` is filled in place, so that a caller still has the records pulled before
    the iterator raised.

    >>> it = iter([b"x" * 1000] * 10)
    >>> task = []
    >>> fill_task(it, task, task_size=8, target_bytes=3000), len(task)
    (3096, 3)
    >>> task = []
    >>> fill_task(it, task, task_size=8, target_bytes=3000, min_records=5), len(task)
    (5160, 5)
    >>> task = []
    >>> fill_task(iter(range(100)), task, task_size=64) == 64 * OBJECT_BYTES, len(task)
    (True, 64)
    """
    nbytes = 0
    step = max(1, min(min_records, task_size))
    while len(records) < task_size and (nbytes < target_bytes or len(records) < min_records):
        before = len(records)
        # extend() keeps each item as it comes: what was pulled before a raise stays in records.
        records.extend(itertools.islice(iterator, min(step, task_size - before)))
        pulled = len(records) - before
        if not pulled:
            break
        per_record = max(estimate_bytes(records[before]), estimate_bytes(records[-1]))
        nbytes += per_record * pulled
        fits = -(-(target_bytes - nbytes) // per_record)  # records that still fit, by this sample
        step = max(1, min_records - len(records), min(SEGMENT_GROWTH * len(records), fits))
    return nbytes


@dataclass(frozen=True)
class ByteBudget:
    """The bytes a run keeps in flight (main process; see NOTE [ streamproc byte bounds ]).

    ``in_flight_bytes`` bounds the tasks handed to workers and not finished (their payload
    estimate, :meth:`streamproc.io.base.Source.task_bytes`); ``reorder_bytes`` the outputs the
    reorder buffer holds behind an unfinished task (deterministic runs; measured as pickled
    message lengths by the multiprocessing backend, estimated by the threads backend).
    """

    in_flight_bytes: int
    reorder_bytes: int

    def __post_init__(self) -> None:
        for name in ("in_flight_bytes", "reorder_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ByteBudget.{name} must be a positive int, got {value!r}")


def default_byte_budget(available_bytes: Optional[int] = None) -> ByteBudget:
    """The budget of a run: :data:`AVAILABLE_MEMORY_FRACTION` of the memory available (psutil),
    clamped to ``[MIN_BUDGET_BYTES, MAX_BUDGET_BYTES]``, half for tasks in flight and half
    for the reorder buffer (main process, at run start).

    >>> default_byte_budget(available_bytes=8 * 1024**3)
    ByteBudget(in_flight_bytes=134217728, reorder_bytes=134217728)
    >>> default_byte_budget(available_bytes=0).in_flight_bytes == MIN_BUDGET_BYTES // 2
    True
    """
    if available_bytes is None:
        import psutil

        available_bytes = int(psutil.virtual_memory().available)
    total = min(MAX_BUDGET_BYTES, max(MIN_BUDGET_BYTES, int(available_bytes * AVAILABLE_MEMORY_FRACTION)))
    return ByteBudget(in_flight_bytes=total // 2, reorder_bytes=total // 2)
