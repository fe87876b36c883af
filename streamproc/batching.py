"""Batch sizes: parsing ``"8192 tokens"``-style specs and cutting record streams into batches.

Everything here is pure and runs wherever the stage that batches runs (main process for the
simple backend, CPU workers otherwise).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Union

BATCH_UNITS = ("records", "tokens", "padded_tokens")

BatchSizeLike = Union[int, str, "BatchSize"]
BatchBy = Union[str, Callable[[Any], int], None]

_SPEC_RE = re.compile(r"^\s*(\d+)\s*([a-z_]*)\s*$")


@dataclass(frozen=True)
class BatchSize:
    """A parsed batch size: at most ``value`` units per batch.

    ``unit`` is ``"records"`` (count), ``"tokens"`` (sum of record sizes) or
    ``"padded_tokens"`` (largest record size times the number of records).

    >>> BatchSize.parse("8192 tokens")
    BatchSize(value=8192, unit='tokens')
    """

    value: int
    unit: str = "records"

    @classmethod
    def parse(cls, spec: BatchSizeLike, param: str = "batch_size") -> BatchSize:
        """Parses an int, ``"64"``, ``"64 records"``, ``"8192 tokens"`` or ``"8192 padded_tokens"``.

        Raises:
            ValueError: naming ``param`` and the accepted forms.
        """
        if isinstance(spec, BatchSize):
            return spec
        if isinstance(spec, bool):
            raise ValueError(f"{param} must be a positive int or a string like '8192 tokens', got {spec!r}")
        if isinstance(spec, int):
            value, unit = spec, "records"
        elif isinstance(spec, str):
            match = _SPEC_RE.match(spec.lower())
            if match is None:
                raise ValueError(
                    f"{param}={spec!r} is not a batch size: use an int or 'N <unit>' with unit one of "
                    f"{', '.join(BATCH_UNITS)} (for example '64 records' or '8192 tokens')"
                )
            value, unit = int(match.group(1)), match.group(2) or "records"
            if unit + "s" in BATCH_UNITS:  # "1 record", "1 token", "1 padded_token"
                unit += "s"
            if unit not in BATCH_UNITS:
                raise ValueError(f"{param}={spec!r}: unknown unit {unit!r}, expected one of {', '.join(BATCH_UNITS)}")
        else:
            raise ValueError(f"{param} must be an int or a string like '8192 tokens', got {type(spec).__name__}")
        if value <= 0:
            raise ValueError(f"{param} must be positive, got {spec!r}")
        return cls(value, unit)

    def __str__(self) -> str:
        return f"{self.value} {self.unit}"


def validate_batch_by(batch_by: BatchBy, param: str = "batch_by") -> BatchBy:
    """Checks that ``batch_by`` is None, a field name or a callable ``record -> int``."""
    if batch_by is None or isinstance(batch_by, str) or callable(batch_by):
        return batch_by
    raise ValueError(f"{param} must be None, a field name or a callable record -> size, got {batch_by!r}")


def _default_size(record: Any) -> int:
    if isinstance(record, dict):
        raise TypeError(
            "cannot tell the size of a dict record for a token batch size: pass batch_by "
            "(a field name, whose len() or value is the size, or a callable record -> int)"
        )
    return len(record)


def make_size_fn(batch_by: BatchBy) -> Callable[[Any], int]:
    """Returns the function giving a record's size for token batch sizes.

    ``batch_by`` may be a callable, or a field name: the size is then ``len(record[field])``,
    or the field's value itself when it is an int. ``None`` means ``len(record)``.
    """
    if batch_by is None:
        return _default_size
    if callable(batch_by):
        return batch_by
    field = batch_by

    def size_of_field(record: Any) -> int:
        value = record[field]
        return value if isinstance(value, int) else len(value)

    return size_of_field


def iter_batches(records: Iterable[Any], batch_size: BatchSize, batch_by: BatchBy = None) -> Iterator[list[Any]]:
    """Cuts ``records`` into consecutive lists no larger than ``batch_size``.

    A record larger than a token budget on its own forms a batch of one. Batches are never
    empty; the last one may be smaller.

    >>> list(iter_batches(range(5), BatchSize(2)))
    [[0, 1], [2, 3], [4]]
    >>> list(iter_batches(["ab", "c", "def"], BatchSize(4, "tokens")))
    [['ab', 'c'], ['def']]
    """
    limit = batch_size.value
    if batch_size.unit == "records":
        batch: list[Any] = []
        append = batch.append
        for record in records:
            append(record)
            if len(batch) >= limit:
                yield batch
                batch = []
                append = batch.append
        if batch:
            yield batch
        return

    size_of = make_size_fn(batch_by)
    padded = batch_size.unit == "padded_tokens"
    batch, total, longest = [], 0, 0
    for record in records:
        size = size_of(record)
        if padded:
            new_longest = max(longest, size)
            fits = new_longest * (len(batch) + 1) <= limit
        else:
            fits = total + size <= limit
        if batch and not fits:
            yield batch
            batch, total, longest = [], 0, 0
        batch.append(record)
        total += size
        longest = max(longest, size)
    if batch:
        yield batch
