"""Which objects are live OS resources that pickling would silently copy or reopen in a worker.

Pure and cheap (``isinstance`` checks); used by :mod:`streamproc.execution.captures` in the
main process. Library types are looked up in ``sys.modules`` only, never imported: a module
that was never imported has no objects to recognize, and database drivers (psycopg, pymysql,
duckdb...) are recognized by the shape of a DB-API 2 connection or cursor.
"""

from __future__ import annotations

import _thread
import io
import sys
import threading
from typing import Any, Optional

_FIX_FILE = (
    "each worker process would reopen it by name (mode 'w' truncates it) and write through its own buffer: "
    "open it inside the function, or in a per-worker class (a callable object that opens it on first call), "
    "or write through a sink (write_jsonl/write_parquet)"
)
_FIX_SYNC = (
    "each worker process would get its own copy, which synchronizes nothing across processes: create it inside "
    "the function or in a per-worker class if a worker needs one, and return results through the stream (a sink) "
    "instead of shared state"
)
_FIX_CONNECTION = (
    "open or connect it inside the function, or in a per-worker class (a callable object that connects on first "
    "call), or write through a sink (write_jsonl/write_parquet)"
)

#: threading's primitives (``threading.Lock`` is a factory function before Python 3.13).
_THREADING_KINDS: tuple[tuple[tuple[type, ...], str], ...] = (
    ((_thread.LockType, type(threading.RLock())), "a lock"),
    ((threading.Condition,), "a condition variable"),
    ((threading.Semaphore,), "a semaphore"),
    ((threading.Event,), "an event"),
    ((threading.Barrier,), "a barrier"),
    ((threading.Thread,), "a thread"),
)

#: Other resources as (module, class, kind, fix); kind "" names the object's own class. Looked
#: up in ``sys.modules`` only: a module never imported has no objects to recognize.
_RESOURCE_CLASSES = (
    ("multiprocessing.synchronize", "SemLock", "a multiprocessing lock or semaphore", _FIX_SYNC),
    ("multiprocessing.synchronize", "Condition", "a multiprocessing condition variable", _FIX_SYNC),
    ("multiprocessing.synchronize", "Event", "a multiprocessing event", _FIX_SYNC),
    ("multiprocessing.queues", "Queue", "", _FIX_SYNC),
    ("multiprocessing.queues", "SimpleQueue", "", _FIX_SYNC),
    ("queue", "Queue", "", _FIX_SYNC),
    ("queue", "SimpleQueue", "", _FIX_SYNC),
    ("multiprocessing.connection", "Connection", "a pipe connection", _FIX_SYNC),
    ("multiprocessing.process", "BaseProcess", "a process", _FIX_SYNC),
    ("multiprocessing.pool", "Pool", "a process pool", _FIX_SYNC),
    ("concurrent.futures._base", "Executor", "an executor", _FIX_SYNC),
    ("subprocess", "Popen", "a subprocess", _FIX_CONNECTION),
    ("socket", "socket", "a socket", _FIX_CONNECTION),
    ("selectors", "BaseSelector", "a selector", _FIX_CONNECTION),
    ("mmap", "mmap", "a memory map", _FIX_CONNECTION),
    ("sqlite3", "Connection", "a database connection (sqlite3.Connection)", _FIX_CONNECTION),
    ("sqlite3", "Cursor", "a database cursor (sqlite3.Cursor)", _FIX_CONNECTION),
)

#: Database clients that are no DB-API connection, as (package, class name in the MRO).
_CLIENT_CLASSES = frozenset(
    {("sqlalchemy", "Engine"), ("sqlalchemy", "Connection"), ("sqlalchemy", "Session"), ("redis", "Redis"),
     ("pymongo", "MongoClient")}
)


def resource_kind(value: Any) -> Optional[tuple[str, str]]:
    """``(kind, fix)`` when ``value`` is a live OS resource that pickling would copy or reopen, else None.

    ``sys.stdout``/``stderr``/``stdin`` are fine (printing from a worker works), as are closed
    files and in-memory buffers (``BytesIO``/``StringIO`` pickle by value).
    """
    if isinstance(value, io.IOBase):
        if isinstance(value, (io.BytesIO, io.StringIO)) or _is_standard_stream(value):
            return None
        try:
            closed = value.closed
        except Exception:  # a detached wrapper
            return None
        return None if closed else ("an open file", _FIX_FILE)
    for kinds, kind in _THREADING_KINDS:
        if isinstance(value, kinds):
            return kind, _FIX_SYNC
    cls = type(value)
    for module_name, class_name, kind, fix in _RESOURCE_CLASSES:
        wanted = getattr(sys.modules.get(module_name), class_name, None)
        if isinstance(wanted, type) and isinstance(value, wanted):
            return kind or f"{_article(cls.__name__)} ({cls.__module__}.{cls.__name__})", fix
    return _database_kind(cls)


def _article(name: str) -> str:
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def _is_standard_stream(value: Any) -> bool:
    return any(value is stream for stream in (sys.stdin, sys.stdout, sys.stderr, sys.__stdin__, sys.__stdout__, sys.__stderr__))


def _database_kind(cls: type) -> Optional[tuple[str, str]]:
    """A DB-API 2 connection or cursor (psycopg, pymysql, duckdb...) by its name and shape, or a known client."""
    name = cls.__name__.lower()
    package = (cls.__module__ or "").split(".")[0]
    if any((package, base.__name__) in _CLIENT_CLASSES for base in cls.__mro__):
        return f"a database connection ({package} {cls.__name__})", _FIX_CONNECTION
    if "connection" in name and all(callable(getattr(cls, m, None)) for m in ("cursor", "commit", "rollback", "close")):
        return f"a database connection ({cls.__module__}.{cls.__name__})", _FIX_CONNECTION
    if "cursor" in name and all(callable(getattr(cls, m, None)) for m in ("execute", "fetchone", "fetchall", "close")):
        return f"a database cursor ({cls.__module__}.{cls.__name__})", _FIX_CONNECTION
    return None
