"""streamproc: fast, reproducible NLP / ML batch inference over large data, on every core and GPU.

>>> import streamproc as sp
>>> sp.from_iterable(range(4)).map(lambda x: x + 1).to_list()
[1, 2, 3, 4]
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Optional, Union

from .errors import (
    AuthenticationError,
    CorruptInputError,
    PipelineShutdownError,
    RecordsSkippedWarning,
    RemoteError,
    RemoteTraceback,
    ResumeMismatchError,
    SchemaError,
    SerializationError,
    ServiceUnavailableError,
    StreamprocError,
    TaskTimeoutError,
    TooManyErrorsError,
    WorkerCrashedError,
)
from .io.paths import PathLike
from .stream import Stream

if TYPE_CHECKING:
    from .bottleneck import Bottleneck
    from .collect import collect_stats
    from .execution.captures import ModelShippedWarning
    from .execution.schedule import get_dispatch_schedule
    from .execution.worker_info import WorkerInfo, get_worker_info
    from .service.client import connect
    from .service.pool import WorkerPool
    from .stats import RunStats

__version__ = "0.1.0"

#: Public names imported on first use (PEP 562), not by ``import streamproc``: a run forks its
#: workers from the main process as it is then, and every module imported before the fork is
#: counted again in each worker's RSS. ``connect`` alone (``secrets`` -> ``hmac`` ->
#: OpenSSL) added 3.7 MB to each process of the tree (bench_memory.py ``--idle``; issue 10).
_LAZY_NAMES = {
    "Bottleneck": ".bottleneck",
    "collect_stats": ".collect",
    "ModelShippedWarning": ".execution.captures",
    "get_dispatch_schedule": ".execution.schedule",
    "WorkerInfo": ".execution.worker_info",
    "get_worker_info": ".execution.worker_info",
    "connect": ".service.client",
    "WorkerPool": ".service.pool",
    "RunStats": ".stats",
}


def __getattr__(name: str) -> Any:
    """Imports a public name of :data:`_LAZY_NAMES` on first use (wherever it is used)."""
    module = _LAZY_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'streamproc' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY_NAMES})


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
    With the multiprocessing backend, row groups are decoded in the CPU workers. When the run
    starts, every footer is read: files whose schemas differ are unified (or refused with
    ``SchemaError`` naming both files), and a corrupt file raises ``CorruptInputError``.
    """
    from .io.parquet import ParquetSource

    return Stream(ParquetSource(path, columns, filesystem))


def read_jsonl(path: PathLike, filesystem: Any = None) -> Stream:
    """A stream of records from JSON Lines files (one JSON value per non-empty line; ``.gz`` ok).

    A malformed line raises ``ValueError`` naming the file and the line number; invalid UTF-8
    or a truncated ``.gz`` raises ``CorruptInputError`` naming them too.
    """
    from .io.jsonl import JsonlSource

    return Stream(JsonlSource(path, filesystem))


def from_arrow(data: Any, columns: Optional[list[str]] = None) -> Stream:
    """A stream of dict records from a ``pyarrow.Table``, a ``RecordBatch`` or a ``pyarrow.dataset``.

    Tables are cut into tasks of ``task_size`` rows, sliced without a copy where each task
    runs; a dataset has one task per fragment (per row group of a parquet file), read where
    the task runs. ``columns`` selects columns (unknown names raise ``SchemaError`` now).

    >>> import pyarrow as pa
    >>> from_arrow(pa.table({"a": [1, 2]})).to_list()
    [{'a': 1}, {'a': 2}]
    """
    from .io.arrow import make_arrow_source

    return Stream(make_arrow_source(data, columns))


def read_csv(
    path: PathLike,
    columns: Optional[list[str]] = None,
    *,
    delimiter: Optional[str] = None,
    quote_char: Union[str, bool, None] = None,
    column_names: Optional[list[str]] = None,
    column_types: Optional[dict[str, Any]] = None,
    newlines_in_values: bool = True,
    read_options: Any = None,
    parse_options: Any = None,
    convert_options: Any = None,
    filesystem: Any = None,
    block_size: int = 16 * 1024 * 1024,
) -> Stream:
    """A stream of dict records from CSV files, parsed block by block by pyarrow where tasks run.

    ``path`` is a file, a directory (``.csv``/``.tsv``, optionally ``.gz``/``.bz2``; read
    recursively), a glob or a list, as for ``read_parquet``. Each file is one task, since a
    quoted value may hold a newline; with ``newlines_in_values=False`` (you promise none
    does), uncompressed files are split into tasks of ``block_size`` bytes at line boundaries.
    Column types are inferred by pyarrow from each task's first block unless
    ``column_types`` (``{"name": pyarrow type}``) fixes them.

    ``delimiter``, ``quote_char`` (False: no quoting), ``column_names`` (given: the files have
    no header row) and ``column_types`` set the matching fields of pyarrow's
    ``csv.ReadOptions``/``ParseOptions``/``ConvertOptions``, which may also be passed whole
    (copied; the named arguments win).

    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "a.csv")
    >>> _ = open(path, "w").write("id,text\\n1,hello\\n2,world\\n")
    >>> read_csv(path).to_list()
    [{'id': 1, 'text': 'hello'}, {'id': 2, 'text': 'world'}]

    Raises:
        FileNotFoundError: a path that matches no file (now).
        streamproc.SchemaError: an unknown name in ``columns`` (now, from the first file).
        ValueError: a malformed row, naming the file (when the run reaches it).
    """
    from .io.csv import make_csv_source

    return Stream(
        make_csv_source(
            path,
            columns,
            delimiter=delimiter,
            quote_char=quote_char,
            column_names=column_names,
            column_types=column_types,
            newlines_in_values=newlines_in_values,
            read_options=read_options,
            parse_options=parse_options,
            convert_options=convert_options,
            filesystem=filesystem,
            block_size=block_size,
        )
    )


def from_ray_dataset(dataset: Any) -> Stream:
    """A stream of the dict records of a Ray ``ray.data.Dataset``, in its row order.

    The rows are read in the main process (``ds.iter_rows()``), so any backend can run the
    stream. Needs ``pip install 'streamproc[ray]'`` (an ImportError names it).
    """
    from .io.ray_dataset import make_ray_dataset_source

    return Stream(make_ray_dataset_source(dataset))


def from_huggingface(dataset: Any) -> Stream:
    """A stream of the records of a Hugging Face ``datasets.Dataset`` or ``IterableDataset``.

    A ``Dataset`` is read through its Arrow table in tasks of ``task_size`` rows, sliced
    without a copy where each task runs; the records are ``ds[0], ds[1], ...``. An
    ``IterableDataset`` is iterated lazily in the main process. Needs the optional
    ``datasets`` library (``pip install streamproc[datasets]``).

    Raises:
        ImportError: ``datasets`` is not installed, naming the pip command.
        TypeError: not a Dataset or IterableDataset (a ``DatasetDict``: pick a split).
    """
    from .io.huggingface import make_huggingface_source

    return Stream(make_huggingface_source(dataset))


def read_sql(
    query: str,
    con: Union[str, os.PathLike[str]],
    chunk_size: Optional[int] = None,
    *,
    params: Optional[Mapping[str, Any]] = None,
) -> Stream:
    """A stream of the rows of a SQL query, one dict (column -> value) per row, in tasks of ``chunk_size`` rows.

    ``con`` is a SQLite file path or ``sqlite:///`` URL (the standard library's ``sqlite3``) or
    any SQLAlchemy URL (``postgresql+psycopg://user:password@host/db``; needs
    ``pip install 'streamproc[sql]'``); never a live connection, since each process opens its
    own. ``params`` fills the query's ``:name`` placeholders. ``chunk_size`` is the number of
    rows per task: it sets the stream's ``task_size`` (None: the default, 1,024, or what
    ``set_processing(task_size=...)`` says; a later ``set_processing(task_size=...)`` wins).

    Runs in the main process: ``read_sql`` checks the query there, and the run reads the rows
    there once, through one cursor fetched in batches (never all at once); the tasks carry
    them to the workers. Records hold the driver's values
    (SQLite: int, float, str, bytes, None; PostgreSQL also Decimal, datetime, UUID...).
    ``write_parquet(resume=True)`` over ``read_sql`` needs an ``ORDER BY`` on a unique key at
    the end of the query (found in its text outside parentheses, strings and comments).

    >>> import sqlite3, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "docs.db")
    >>> with sqlite3.connect(path) as db:
    ...     _ = db.execute("CREATE TABLE docs (id INTEGER, text TEXT)")
    ...     _ = db.executemany("INSERT INTO docs VALUES (?, ?)", [(1, "hello"), (2, "world")])
    >>> db.close()
    >>> read_sql("SELECT id, text FROM docs ORDER BY id", path).to_list()
    [{'id': 1, 'text': 'hello'}, {'id': 2, 'text': 'world'}]

    Raises:
        ValueError: ``con`` is a live connection or engine, ``chunk_size`` is not a positive
            integer, or the query is empty (now).
        FileNotFoundError: no SQLite file at the path (now; reading never creates one).
        streamproc.io.sql_connection.SqlQueryError: an unknown table or column, or a syntax
            error (a ``ValueError``; now on SQLite and PostgreSQL, which ``EXPLAIN`` the query;
            when the run starts elsewhere), naming the query and the URL, password hidden.
        streamproc.io.sql_connection.SqlConnectionError: the database server cannot be reached
            or refuses the login (now).
        ImportError: a non-SQLite URL without SQLAlchemy, naming ``pip install 'streamproc[sql]'``.
    """
    from .io.sql_source import SqlSource, check_chunk_size

    check_chunk_size(chunk_size)
    stream = Stream(SqlSource(query, con, params))
    return stream if chunk_size is None else stream.set_processing(task_size=chunk_size)


__all__ = [
    "Bottleneck",
    "AuthenticationError",
    "CorruptInputError",
    "ModelShippedWarning",
    "PipelineShutdownError",
    "RecordsSkippedWarning",
    "RemoteError",
    "RemoteTraceback",
    "ResumeMismatchError",
    "RunStats",
    "SchemaError",
    "SerializationError",
    "ServiceUnavailableError",
    "Stream",
    "StreamprocError",
    "TaskTimeoutError",
    "TooManyErrorsError",
    "WorkerCrashedError",
    "WorkerInfo",
    "WorkerPool",
    "collect_stats",
    "connect",
    "from_arrow",
    "from_huggingface",
    "from_iterable",
    "from_pandas",
    "from_ray_dataset",
    "get_dispatch_schedule",
    "get_worker_info",
    "read_csv",
    "read_jsonl",
    "read_parquet",
    "read_sql",
]
