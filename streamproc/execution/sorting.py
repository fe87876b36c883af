"""``sort_by`` of ``map_batches`` and ``map_gpu``: batch a task's records in key order, answer in input order.

Where it runs: where the stage runs (the main process with the simple backend, a worker
thread, a CPU worker). With GPU workers only the sorted batches travel to them: sorting,
batching and restoring the order all happen on the CPU side, so a GPU worker never knows.

One stage of one task, with ``sort_by`` set::

    records r[0..n)  --keys-->  order = stable argsort(keys)   (None keys first)
    sorted s[j] = r[order[j]]  --batch_size/batch_by-->  batches  --op-->  outputs o[j]
    output in input order: out[i] = o[j] for order[j] = i      (dropped records left out)

Invariants: ``len(o) == len(s) - dropped`` (the op returns one record per input: else
``ValueError`` naming the stage), and the output is a function of the task's records alone,
so it is identical on every backend and for any worker count. The stage holds all its input
records of the task (at most ``task_size`` after the ops before it) until its last batch ran,
so nothing of the task leaves the stage before its last batch (a ``limit`` after it still
reads whole tasks).

Error policy (``on_error`` other than ``"raise"``): rows the op's isolation records (see
:mod:`.isolation`) count the *sorted* records; :class:`_InputRowPolicy` turns them back into
the stage's input rows (what ``Source.locate`` expects) and remembers which records were
dropped, so the survivors' outputs go back to their own places. A record whose key raises
(or lacks the field) is dropped before sorting, as the stage ``"<stage>, sort_by"``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Optional, Union

from ..batching import iter_batches
from ..errors import add_context_note
from .error_policy import is_record_failure

if TYPE_CHECKING:
    from ..ops import BatchedOp
    from ..plan import Stage
    from .context import ExecutionContext
    from .error_policy import ErrorPolicy

#: A ``sort_by`` value: a field name (the field's value is the key), a function
#: ``record -> key``, or None (no sorting).
SortBy = Union[str, Callable[[Any], Any], None]


class SortFieldError(KeyError):
    """A record lacks the field ``sort_by`` names (a ``KeyError`` whose message reads as a sentence)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def validate_sort_by(sort_by: SortBy, method: str) -> SortBy:
    """Checks that ``sort_by`` is None, a non-empty field name or a callable (main process).

    Raises:
        ValueError: naming ``method`` and the accepted forms.
    """
    if sort_by is None or callable(sort_by) or (isinstance(sort_by, str) and sort_by):
        return sort_by
    raise ValueError(f"{method}(): sort_by must be None, a field name or a callable record -> key, got {sort_by!r}")


def describe_sort_by(sort_by: SortBy) -> str:
    """``sort_by`` as the op's description shows it: ``'n_tokens'`` or the function's name."""
    if isinstance(sort_by, str):
        return repr(sort_by)
    return getattr(sort_by, "__qualname__", None) or type(sort_by).__name__


def _key_of(sort_by: SortBy, record: Any, stage: str) -> Any:
    if not isinstance(sort_by, str):
        assert sort_by is not None
        return sort_by(record)
    try:
        return record[sort_by]
    except (KeyError, IndexError, TypeError):
        fields = f" (its fields: {', '.join(map(str, record))})" if isinstance(record, dict) else ""
        raise SortFieldError(
            f"{stage}: sort_by={sort_by!r} is not a field of the record{fields}: pass the name of a field "
            f"every record has, or a function record -> key"
        ) from None


def _sort_key(key: Any) -> tuple[int, Any]:
    """None sorts before every other key (a record without a length is not an error)."""
    return (0, 0) if key is None else (1, key)


def sort_order(records: list[Any], sort_by: SortBy, stage: str, policy: Optional[ErrorPolicy]) -> list[int]:
    """The input rows of ``records`` in ascending key order (stable; None keys first).

    Under an error ``policy`` a record whose key raises is recorded (stage
    ``"<stage>, sort_by"``) and left out of the order; otherwise the error propagates with a
    note naming the record's row among the stage's input records of the task.

    >>> sort_order(["ccc", "a", None, "bb", "d"], lambda r: None if r is None else len(r), "stage 1", None)
    [2, 1, 4, 3, 0]

    Raises:
        SortFieldError: a record lacks the field ``sort_by`` names.
        TypeError: two keys do not compare (e.g. an int and a str), naming the stage and both types.
        Exception: whatever the key function raises, with the note.
    """
    keyed: list[tuple[tuple[int, Any], int]] = []
    for row, record in enumerate(records):
        try:
            key = _key_of(sort_by, record, stage)
        except Exception as exc:
            if policy is not None and is_record_failure(exc):
                policy.record(f"{stage}, sort_by", exc, record, row)
                continue
            add_context_note(exc, f"streamproc: raised by sort_by of {stage} on record {row} of the stage's input in this task")
            raise
        keyed.append((_sort_key(key), row))
    try:
        # The row breaks ties: the same order as a stable sort on the keys alone.
        keyed.sort()
    except TypeError as exc:
        types = sorted({type(key[1]).__name__ for key, _ in keyed if key[0]})
        raise TypeError(
            f"{stage}: sort_by keys do not compare ({exc}; key types {', '.join(types)}): return keys of one "
            f"comparable type (None is allowed and sorts first)"
        ) from None
    return [row for _, row in keyed]


class _InputRowPolicy:
    """The task's :class:`ErrorPolicy` seen by the op over sorted records: rows mapped back to input rows.

    ``dropped`` holds the sorted positions of the records the op dropped.
    """

    def __init__(self, inner: ErrorPolicy, input_rows: list[int]) -> None:
        self._inner = inner
        self._input_rows = input_rows
        self.dropped: set[int] = set()

    def record(self, stage: str, exc: BaseException, record: Any, row: int, formatted: Optional[str] = None) -> None:
        self.dropped.add(row)
        self._inner.record(stage, exc, record, self._input_rows[row], formatted)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _PolicyContext:
    """The stage's execution context with ``error_policy`` replaced (everything else is the context's)."""

    def __init__(self, ctx: ExecutionContext, policy: _InputRowPolicy) -> None:
        self._ctx = ctx
        self.error_policy = policy

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ctx, name)


def apply_sorted(op: BatchedOp, chunks: Iterator[list[Any]], ctx: ExecutionContext, stage: Stage) -> Iterator[list[Any]]:
    """Runs ``op`` (with ``op.sort_by`` set) over one task's ``chunks``: see the module docstring.

    Yields as many chunks as the unsorted op over the sorted records yields (one per batch),
    cut from the outputs in input order, so the stage's batch count in the stats is the number
    of batches it ran.

    Raises:
        ValueError: the op did not return one record per input record (naming the stage).
    """
    records = [record for chunk in chunks for record in chunk]
    policy = ctx.error_policy
    input_rows = sort_order(records, op.sort_by, stage.name, policy)
    if not input_rows:
        return
    ordered = [records[row] for row in input_rows]
    del records
    unsorted = dataclasses.replace(op, sort_by=None)
    row_policy = _InputRowPolicy(policy, input_rows) if policy is not None else None
    run_ctx: Any = _PolicyContext(ctx, row_policy) if row_policy is not None else ctx
    outputs: list[Any] = []
    lengths: list[int] = []
    for out in unsorted.apply(iter([ordered]), run_ctx, stage):
        outputs.extend(out)
        lengths.append(len(out))
    if row_policy is None:
        assert op.batch_size is not None, "resolve batch sizes before running"
        _check_per_batch(lengths, [len(b) for b in iter_batches(ordered, op.batch_size, op.batch_by)], stage.name)
        survivors = input_rows
    else:
        survivors = [row for j, row in enumerate(input_rows) if j not in row_policy.dropped]
        if len(outputs) != len(survivors):
            raise ValueError(_count_message(stage.name, len(outputs), len(survivors), "the records that did not fail"))
    placed = sorted(range(len(survivors)), key=survivors.__getitem__)
    start = 0
    for length in lengths:
        yield [outputs[j] for j in placed[start : start + length]]
        start += length


def _check_per_batch(got: list[int], expected: list[int], stage: str) -> None:
    if got == expected:
        return
    for number, (n_out, n_in) in enumerate(zip(got, expected)):
        if n_out != n_in:
            raise ValueError(_count_message(stage, n_out, n_in, f"batch {number} (in key order)"))
    raise ValueError(_count_message(stage, sum(got), sum(expected), f"{len(expected)} batches"))


def _count_message(stage: str, n_out: int, n_in: int, what: str) -> str:
    return (
        f"{stage}: with sort_by, the stage must return one record per input record (outputs are put back "
        f"in input order), but it returned {n_out} records for {n_in} in {what}: drop sort_by, or return "
        f"one output per record"
    )
