"""Worker ``logging`` records, re-emitted by the main process's handlers, tagged with the worker.

Data flow::

    worker process (CPU or GPU)                                  main process
    logger.info(...) -> root logger -> _ForwardingHandler        collector (run.py _handle)
        record made pickle-safe (message formatted, traceback  -> reemit(): getLogger(name).handle(record)
        as text), tagged ``record.worker = "cpu worker 1"``        -> the user's handlers (caplog, files...)
        and prefixed "[cpu worker 1] "
        -> LogRecordMessage on the worker's result pipe (CPU) or status pipe (GPU)

Levels: a worker sends only what its own loggers let through, so the main process's levels
are copied to the workers (:func:`capture_log_levels` in the main process when a run starts,
:func:`apply_log_levels` in the worker): the root level and every level set explicitly on a
named logger. A forked worker inherits them anyway; a spawned one would otherwise be at
WARNING.

Handlers: a forked worker inherits the main process's root handlers; they are removed there
(:func:`forward_worker_logs`), since the record is handled once, in the main process. Handlers
a library put on its own logger with ``propagate=False`` stay in the worker and write from
there. Records logged after the main process stopped reading (during shutdown) are dropped.

The threads backend needs no transport (its workers are threads of the main process): its
records are tagged by :func:`tag_thread_logs`.
"""

from __future__ import annotations

import logging
import pickle
import threading
from collections.abc import Callable
from typing import Any, Optional

from ...execution.serialization import dumps_message
from .messages import LogLevels, LogRecordMessage, WorkerId

#: The attribute naming the worker on a forwarded or tagged record.
WORKER_ATTRIBUTE = "worker"
_PLAIN_TYPES = (str, int, float, bool, type(None))
_FORMATTER = logging.Formatter()


# -- main process ----------------------------------------------------------------------------------


def capture_log_levels() -> LogLevels:
    """The root logger's level and every explicitly set logger level (main process).

    >>> logging.getLogger("streamproc.doctest").setLevel(logging.DEBUG)
    >>> ("streamproc.doctest", logging.DEBUG) in capture_log_levels()
    True
    """
    levels = [("", logging.getLogger().level)]
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger) and logger.level != logging.NOTSET:
            levels.append((name, logger.level))
    return tuple(levels)


def reemit(message: LogRecordMessage) -> None:
    """Hands a worker's record to the main process's handlers (main process, the collector).

    ``Logger.handle`` runs the logger's filters and its handlers and their parents', not the
    level check: the worker made that already, with the levels of the main process.
    """
    record = logging.makeLogRecord(message.record)
    logging.getLogger(record.name).handle(record)


# -- worker processes ----------------------------------------------------------------------------


def apply_log_levels(levels: LogLevels) -> None:
    """Sets this worker's logger levels to the main process's (worker process)."""
    for name, level in levels:
        logging.getLogger(name or None).setLevel(level)


class LockedConnection:
    """A worker's result pipe, shared by its main thread (results) and any thread that logs.

    ``send_bytes`` from two threads at once could interleave two messages' bytes: every send
    goes through one lock. Everything else is the wrapped connection's.
    """

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self._lock = threading.Lock()

    def send_bytes(self, data: bytes) -> None:
        with self._lock:
            self._conn.send_bytes(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


def portable_record(record: logging.LogRecord, worker: str) -> dict[str, Any]:
    """``record``'s attributes, safe to pickle and tagged with ``worker`` (where it was logged).

    The message is formatted here (``args`` may not pickle) and prefixed ``[worker] ``; a
    traceback becomes text (``exc_text``, which formatters print); an ``extra`` value that
    cannot be pickled becomes its ``repr``.

    >>> r = logging.LogRecord("app", logging.INFO, "f.py", 1, "%d done", (3,), None)
    >>> d = portable_record(r, "cpu worker 0")
    >>> d["msg"], d["args"], d["worker"]
    ('[cpu worker 0] 3 done', None, 'cpu worker 0')
    """
    attributes = dict(record.__dict__)
    attributes["msg"] = f"[{worker}] {record.getMessage()}"
    attributes["args"] = None
    if record.exc_info and record.exc_info[0] is not None:
        attributes["exc_text"] = record.exc_text or _FORMATTER.formatException(record.exc_info)
    attributes["exc_info"] = None
    attributes.pop("message", None)  # set by a formatter; rebuilt from msg in the main process
    attributes[WORKER_ATTRIBUTE] = worker
    for key, value in attributes.items():
        if not isinstance(value, _PLAIN_TYPES):
            try:
                pickle.dumps(value)
            except Exception:
                attributes[key] = repr(value)
    return attributes


class _ForwardingHandler(logging.Handler):
    """Sends every record it is handed to the main process as a :class:`LogRecordMessage`."""

    def __init__(self, worker: WorkerId, conn: LockedConnection) -> None:
        super().__init__(logging.NOTSET)
        self.worker = worker
        self.conn = conn
        self._sending = threading.local()

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(self._sending, "active", False):
            return  # logged while this thread sends a record (from a __reduce__): dropped, no recursion
        self._sending.active = True
        try:
            data = dumps_message(LogRecordMessage(self.worker, portable_record(record, str(self.worker))))
            self.conn.send_bytes(data)
        except OSError:
            pass  # the main process closed the pipe (shutdown): nobody reads records any more
        except Exception:
            self.handleError(record)
        finally:
            self._sending.active = False


def forward_worker_logs(worker: WorkerId, conn: Any) -> LockedConnection:
    """Sends this worker's log records over ``conn`` from now on (worker process, at start).

    Returns ``conn`` wrapped in a :class:`LockedConnection`: the worker must send everything
    else through it too.
    """
    locked = conn if isinstance(conn, LockedConnection) else LockedConnection(conn)
    root = logging.getLogger()
    for handler in list(root.handlers):  # a forked worker's copies of the main process's handlers
        root.removeHandler(handler)
    root.addHandler(_ForwardingHandler(worker, locked))
    return locked


# -- threads backend -------------------------------------------------------------------------------

_thread_worker = threading.local()
_factory_lock = threading.Lock()
_factory_installed = False


def tag_thread_logs(worker: Optional[str]) -> None:
    """Tags the records this thread logs from now on with ``worker`` (None: stop tagging).

    Runs in a worker thread of the threads backend. The first call wraps the logging record
    factory once for the interpreter; the wrapper tags only records of threads that called
    this, and passes every other record through unchanged.
    """
    global _factory_installed
    with _factory_lock:
        if not _factory_installed:
            logging.setLogRecordFactory(_tagging_factory(logging.getLogRecordFactory()))
            _factory_installed = True
    _thread_worker.name = worker


def _tagging_factory(previous: Callable[..., logging.LogRecord]) -> Callable[..., logging.LogRecord]:
    def make_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        worker = getattr(_thread_worker, "name", None)
        if worker is not None:
            setattr(record, WORKER_ATTRIBUTE, worker)
            record.msg = f"[{worker}] {record.msg}"
        return record

    return make_record
