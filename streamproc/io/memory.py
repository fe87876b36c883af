"""In-memory sources: any iterable (consumed lazily) and pandas DataFrames."""

from __future__ import annotations

import reprlib
from collections.abc import Iterable, Iterator, Sized
from typing import Any, NamedTuple, Optional

from ..execution.byte_budget import TASK_TARGET_BYTES, fill_task
from .base import Source, row_ranges


def _short_repr(obj: Any, limit: int = 40) -> str:
    """``repr(obj)`` if short, else ``<type>``: bounded work (``reprlib``) whatever the size or
    depth of the iterable (a list of 10M records, records nested 5,000 deep)."""
    try:
        text = reprlib.repr(obj)
    except Exception:  # a broken __repr__, or one that recurses without end
        text = ""
    return text if text and len(text) <= limit and "..." not in text else f"<{type(obj).__name__}>"


class ItemsTask(NamedTuple):
    """The payload of one task of an iterable: ``items`` are the iterable's items ``start``,
    ``start + 1``, ... (counted from 0); ``nbytes`` their estimated size (see :func:`fill_task`)."""

    start: int
    items: list[Any]
    nbytes: int = 0


class IterableSource(Source):
    """Records from an iterable, pulled lazily ``task_size`` at a time in the main process.

    A task also ends at about ``TASK_TARGET_BYTES`` of records (estimated from a sample,
    :func:`~streamproc.execution.byte_budget.fill_task`), so 1 MiB records make tasks of a few
    records: the cut depends only on the records, so every run and backend sees the same tasks.

    A generator can be consumed only once: running the stream a second time yields what is
    left of it. The iterable stays in the main process; workers receive the records.
    """

    tasks_follow_task_size = True  # num_records(): a len() or None

    def __init__(self, iterable: Iterable[Any]) -> None:
        if not isinstance(iterable, Iterable):
            raise TypeError(f"from_iterable() needs an iterable, got {type(iterable).__name__}")
        self.iterable = iterable

    def iter_tasks(self, task_size: int) -> Iterator[ItemsTask]:
        return self.iter_tasks_of_plan(task_size, 1)

    def iter_tasks_of_plan(self, task_size: int, min_task_records: int) -> Iterator[ItemsTask]:
        iterator = iter(self.iterable)
        start = 0
        while True:
            records: list[Any] = []
            try:
                nbytes = fill_task(iterator, records, task_size, TASK_TARGET_BYTES, min_task_records)
            except Exception:
                # Emit what the source gave before failing, then fail: outputs of the first k
                # records come out before the source's error, as with a plain generator chain.
                if records:
                    yield ItemsTask(start, records)
                raise
            if not records:
                return
            yield ItemsTask(start, records, nbytes)
            start += len(records)

    def task_bytes(self, payload: ItemsTask) -> int:
        return payload.nbytes

    def read_task(self, payload: ItemsTask) -> Iterator[Any]:
        return iter(payload.items)

    def read_task_chunks(self, payload: ItemsTask, chunk_size: int) -> Iterator[list[Any]]:
        yield payload.items  # already a list of at most task_size records

    def locate(self, payload: ItemsTask, row: Optional[int] = None) -> str:
        """``"items <first> to <last>"``, or ``"item <i>"`` (its index in the iterable) for record ``row``."""
        if row is None:
            return f"items {payload.start} to {payload.start + len(payload.items) - 1}"
        return f"item {payload.start + row}"

    def num_records(self) -> Optional[int]:
        """``len()`` of a sized iterable (list, tuple, range...); None for a generator or iterator.

        A DataFrame is sized by rows but iterates over its column names: None (use from_pandas)."""
        if isinstance(self.iterable, Sized) and type(self.iterable).__name__ != "DataFrame":
            return len(self.iterable)
        return None

    def num_tasks(self, task_size: int) -> Optional[int]:
        """A lower bound: ``ceil(len / task_size)`` of a sized iterable (tasks of big records
        hold fewer records: counting them would size every record); None for a generator."""
        return super().num_tasks(task_size)

    def describe(self) -> str:
        return f"from_iterable({_short_repr(self.iterable)})"

    def __getstate__(self) -> dict[str, Any]:
        # Workers only call read_task: the iterable (often a generator) never travels.
        return {"iterable": ()}


class PandasSource(Source):
    """One dict per DataFrame row (column name -> value), native Python scalars.

    Tasks are row ranges; workers receive the DataFrame once, with the stream.
    """

    tasks_follow_task_size = True

    def __init__(self, df: Any) -> None:
        import pandas as pd

        if not isinstance(df, pd.DataFrame):
            raise TypeError(f"from_pandas() needs a pandas.DataFrame, got {type(df).__name__}")
        self.df = df

    def iter_tasks(self, task_size: int) -> Iterator[tuple[int, int]]:
        return row_ranges(len(self.df), task_size)

    def read_task(self, payload: tuple[int, int]) -> Iterator[dict[str, Any]]:
        start, stop = payload
        return iter(self.df.iloc[start:stop].to_dict(orient="records"))

    def locate(self, payload: tuple[int, int], row: Optional[int] = None) -> str:
        """``"rows <first> to <last>"``, or ``"row <i>"`` (the DataFrame position) for record ``row``,
        with its index label when the index is not the positions (``"row 3 (index 'b')"``)."""
        import pandas as pd

        start, stop = payload
        if row is None:
            return f"rows {start} to {stop - 1}"
        position = start + row
        where = f"row {position}"
        index = self.df.index
        is_positional = isinstance(index, pd.RangeIndex) and index.start == 0 and index.step == 1
        if not is_positional and 0 <= position < len(index):
            label = index[position]
            where += f" (index {label.item() if hasattr(label, 'item') else label!r})"
        return where

    def num_records(self) -> int:
        return len(self.df)

    def describe(self) -> str:
        return f"from_pandas(<DataFrame {len(self.df)} rows x {len(self.df.columns)} columns>)"
