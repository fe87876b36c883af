"""streamproc: fast, reproducible NLP / ML batch inference over large data, on every core and GPU.

>>> import streamproc as sp
>>> sp.from_iterable(range(4)).map(lambda x: x + 1).to_list()
[1, 2, 3, 4]
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Optional

from .bottleneck import Bottleneck
from .collect import collect_stats
from .errors import (
    PipelineShutdownError,
    RemoteError,
    RemoteTraceback,
    ResumeMismatchError,
    SchemaError,
    SerializationError,
    StreamprocError,
    TaskTimeoutError,
    TooManyErrorsError,
    WorkerCrashedError,
)
from .execution.captures import ModelShippedWarning
from .execution.schedule import get_dispatch_schedule
from .io.paths import PathLike
from .stats import RunStats
from .stream import Stream

__version__ = "0.1.0"


def from_iterable(iterable: Iterable[Any]) -> Stream:
    """A stream over any iterable or generator, consumed lazily (main process).

    >>> from_iterable(x * x for x in range(3)).to_list()
    [0, 1, 4]
    """
    from .io.memory import IterableSource

    return Stream(IterableSource(iterable))


def from_pandas(df: Any) -> Stream:
    """A stream of one dict per DataFrame row (column -> native Python value).

    >>> import pandas as pd
    >>> from_pandas(pd.DataFrame({"a": [1, 2]})).to_list()
    [{'a': 1}, {'a': 2}]
    """
    from .io.memory import PandasSource

    return Stream(PandasSource(df))


def read_parquet(path: PathLike, columns: Optional[list[str]] = None, filesystem: Any = None) -> Stream:
    """A stream of dict records from parquet files, streamed by row group (never loaded whole).

    ``path`` is a file, a directory (read recursively, hidden and ``_`` files skipped), a glob
    or a list of those. A missing path or an unknown column raises now, not at run time.
    With the multiprocessing backend, row groups are decoded in the CPU workers.
    """
    from .io.parquet import ParquetSource

    return Stream(ParquetSource(path, columns, filesystem))


def read_jsonl(path: PathLike, filesystem: Any = None) -> Stream:
    """A stream of records from JSON Lines files (one JSON value per non-empty line; ``.gz`` ok).

    A malformed line raises ``ValueError`` naming the file and the line number.
    """
    from .io.jsonl import JsonlSource

    return Stream(JsonlSource(path, filesystem))


__all__ = [
    "Bottleneck",
    "ModelShippedWarning",
    "PipelineShutdownError",
    "RemoteError",
    "RemoteTraceback",
    "ResumeMismatchError",
    "RunStats",
    "SchemaError",
    "SerializationError",
    "Stream",
    "StreamprocError",
    "TaskTimeoutError",
    "TooManyErrorsError",
    "WorkerCrashedError",
    "collect_stats",
    "from_iterable",
    "from_pandas",
    "get_dispatch_schedule",
    "read_jsonl",
    "read_parquet",
]
