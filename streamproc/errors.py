"""Exceptions raised by streamproc, and how user exceptions travel between processes.

An exception raised by user code keeps its own type all the way to the sink: a worker wraps
it in :class:`ExceptionWithTraceback`, whose ``__reduce__`` rebuilds the *user's* exception
in the main process with the worker's formatted traceback attached as ``__cause__``
(the pattern of CPython's ``concurrent.futures.process`` and loky).
"""

from __future__ import annotations

import traceback
from typing import Any


class StreamprocError(Exception):
    """Base class of every error that streamproc itself raises."""


class WorkerCrashedError(StreamprocError):
    """A worker process died without reporting an error (SIGKILL, segfault, ``os._exit``)."""


class PipelineShutdownError(StreamprocError):
    """The pipeline was stopped (or broke) while an operation still needed it."""


class SerializationError(StreamprocError, TypeError):
    """A callable, a record or a result could not be pickled to cross a process boundary."""


class SchemaError(StreamprocError, ValueError):
    """Records cannot be written with one consistent schema (names the offending field)."""


class RemoteTraceback(Exception):
    """Holds the formatted traceback of an exception raised in another process.

    It is attached as ``__cause__`` of the re-raised user exception so that the default
    traceback printout shows the worker's frames first.
    """

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


def add_context_note(exc: BaseException, note: str) -> None:
    """Attaches ``note`` to ``exc`` (shown under its message), once.

    Uses :pep:`678` notes where available (Python >= 3.11); on 3.10 the note is kept in
    ``exc.__notes__`` all the same, which tools and our tests read.
    """
    notes = getattr(exc, "__notes__", None)
    if notes is not None and note in notes:
        return
    add_note = getattr(exc, "add_note", None)
    if add_note is not None:
        add_note(note)
    else:  # Python 3.10
        try:
            exc.__notes__ = [*(notes or []), note]  # type: ignore[attr-defined]
        except AttributeError:  # exceptions with __slots__ and no __dict__
            pass


def _rebuild_exception(exc: BaseException, tb: str) -> BaseException:
    exc.__cause__ = RemoteTraceback(tb)
    return exc


class ExceptionWithTraceback:
    """Picklable carrier of an exception raised in a worker.

    Pickling it sends the exception itself plus its traceback as text (tracebacks cannot be
    pickled); unpickling in the main process returns the user's own exception object with
    ``__cause__`` set to a :class:`RemoteTraceback`. ``where`` names the worker, stage and task.
    """

    def __init__(self, exc: BaseException, where: str) -> None:
        formatted = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        self.tb = f'\n"""\nTraceback in {where}:\n{formatted}"""'
        add_context_note(exc, f"streamproc: raised in {where}")
        # The traceback holds frames (locals included) that cannot be pickled.
        exc.__traceback__ = None
        exc.__context__ = None
        exc.__cause__ = None
        self.exc = exc

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuild_exception, (self.exc, self.tb)
