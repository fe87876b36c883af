"""Exceptions raised by streamproc, and how user exceptions travel between processes.

An exception raised by user code keeps its own type all the way to the sink: a worker wraps
it in :class:`ExceptionWithTraceback`, whose ``__reduce__`` rebuilds the *user's* exception
in the main process with the worker's formatted traceback attached as ``__cause__``
(the pattern of CPython's ``concurrent.futures.process`` and loky). The carrier itself always
pickles, even when the exception does not (see :class:`ExceptionWithTraceback`).
"""

from __future__ import annotations

import importlib
import pickle
import traceback
from typing import Any, Optional

#: How every note that names where an exception was raised starts (stage, task, worker).
RAISED_IN_NOTE_PREFIX = "streamproc: raised in "


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


class CorruptInputError(StreamprocError, ValueError):
    """An input file cannot be decoded: a truncated or 0-byte parquet file, a corrupt data page,
    a truncated ``.gz``, invalid UTF-8. The message names the file and the row group or line;
    the reader's own error (pyarrow's, gzip's, the codec's) is the ``__cause__``."""


class TaskTimeoutError(StreamprocError):
    """A task ran longer than ``task_timeout`` without finishing a record or batch (names the
    worker, its pid, the stage, and carries the worker's Python stack)."""


class TooManyErrorsError(StreamprocError):
    """More records failed than ``max_errors`` allows (summarises the errors by stage and type)."""


class RecordsSkippedWarning(RuntimeWarning):
    """A run with ``on_error="skip"`` or ``"dead_letter"`` dropped records (issued once, at its end:
    how many, by stage and exception type, and where the dead letters are)."""


class ResumeMismatchError(StreamprocError):
    """``resume=True`` over output written by a different input or task layout (says what changed)."""


class AuthenticationError(StreamprocError):
    """A service connection presented a wrong or missing token (raised in the client; the server
    refuses the peer before it unpickles anything)."""


class ServiceUnavailableError(StreamprocError):
    """The streamproc service cannot be reached, stopped, or was lost mid-run (names the address)."""


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


class RemoteError(StreamprocError):
    """Stands in for an exception from a worker that cannot be rebuilt here as its own type.

    ``type_name`` is the original type's qualified name (``"module.QualName"``) and ``message``
    its ``str()``; ``str()`` of this error is ``"<type_name>: <message>"``. Like a rebuilt user
    exception, it has the worker's traceback as ``__cause__`` (a :class:`RemoteTraceback`), the
    notes naming the stage, task and worker, and the original's attributes that could be pickled.
    """

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(type_name, message)
        self.type_name = type_name
        self.message = message

    def __str__(self) -> str:
        return f"{self.type_name}: {self.message}"


class ExceptionWithTraceback:
    """Picklable carrier of an exception raised in a worker; pickling it never fails.

    Made in the worker (``where`` names the worker, and the stage or task); unpickled in the
    process that receives it, it returns an exception whose ``__cause__`` is a
    :class:`RemoteTraceback` (the worker's formatted traceback, tracebacks cannot be pickled)
    and whose notes say where it was raised. Which exception, in order of preference:

    1. the exception itself, when it survives a pickle round trip in the worker (the standard
       pickle, else dill, as ``dumps_message`` does) and unpickles in the receiving process;
    2. else the user's own type, rebuilt without calling its ``__init__``: ``cls.__new__(cls)``,
       then ``args`` and the attributes that pickle (one that holds a generator, a lock...
       is dropped). This is what CPython and loky cannot do: an exception whose ``__init__``
       takes other arguments than ``args``, or that holds something unpicklable, still comes
       out as the user's type, so ``except UserError`` works. Used when the class is
       importable in the receiving process and the rebuilt exception's ``str()`` is the
       original's (a ``__str__`` that needs a dropped attribute would raise or lie);
    3. else a :class:`RemoteError` naming the original type and message.

    A ``MemoryError`` without a message (as the interpreter raises it) gets one naming where
    it was raised, so that the sink does not report an empty error.
    """

    def __init__(self, exc: BaseException, where: str) -> None:
        formatted = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        self.tb = f'\n"""\nTraceback in {where}:\n{formatted}"""'
        add_context_note(exc, f"{RAISED_IN_NOTE_PREFIX}{where}")
        _name_empty_memory_error(exc)
        # The traceback holds frames (locals included) that cannot be pickled.
        exc.__traceback__ = None
        exc.__context__ = None
        exc.__cause__ = None
        self.exc = exc
        # Plain data: strings, and values checked to survive pickling one by one.
        self.state = _ExceptionState.of(exc)
        # The standard pickle's bytes are loaded in the receiving process under a try (case 1,
        # else case 2); an exception only dill can pickle (a class of a script's ``__main__``)
        # travels as itself, since the message is then loaded with ``dill_loads``, which maps
        # such classes back to the receiving process's own.
        self.payload: Any = _std_pickled(exc)
        if self.payload is None and _dill_round_trips(exc):
            self.payload = exc

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuild_exception, (self.payload, self.state, self.tb)


class _ExceptionState:
    """What is kept of an exception that may not pickle: its type's name, message, args, attributes."""

    def __init__(self, module: str, qualname: str, message: str, args: tuple[Any, ...], attrs: dict[str, Any]) -> None:
        self.module = module
        self.qualname = qualname
        self.message = message
        self.args = args
        self.attrs = attrs

    @classmethod
    def of(cls, exc: BaseException) -> _ExceptionState:
        message = _safe_str(exc)
        args = exc.args if _round_trips(exc.args) else (message,)
        attrs = {name: value for name, value in getattr(exc, "__dict__", {}).items() if _round_trips(value)}
        return cls(type(exc).__module__, type(exc).__qualname__, message, args, attrs)

    def rebuild(self) -> BaseException:
        """The user's type rebuilt from this state, else a :class:`RemoteError`."""
        exc = self._rebuild_own_type()
        if exc is None:
            exc = RemoteError(f"{self.module}.{self.qualname}", self.message)
            for name, value in self.attrs.items():
                if name not in vars(exc):
                    setattr(exc, name, value)
        return exc

    def _rebuild_own_type(self) -> Optional[BaseException]:
        try:
            found: Any = importlib.import_module(self.module)
            for part in self.qualname.split("."):
                found = getattr(found, part)
        except Exception:  # not importable here (a class defined in a function: "f.<locals>.E")
            return None
        if not (isinstance(found, type) and issubclass(found, BaseException)):
            return None
        try:
            exc = found.__new__(found)
            exc.args = self.args
            for name, value in self.attrs.items():
                setattr(exc, name, value)
            if str(exc) != self.message:
                return None
        except Exception:  # a __new__ that needs arguments, a __str__ that needs a dropped attribute
            return None
        return exc


def _rebuild_exception(payload: Any, state: _ExceptionState, tb: str) -> BaseException:
    """Unpickling side of :class:`ExceptionWithTraceback` (runs in the receiving process)."""
    exc: Optional[BaseException] = None
    if isinstance(payload, BaseException):
        exc = payload
    elif payload is not None:
        try:
            exc = pickle.loads(payload)
        except Exception:  # the class cannot be imported or built here: fall back on the state
            exc = None
    if exc is None:
        exc = state.rebuild()
    exc.__cause__ = RemoteTraceback(tb)
    return exc


def _name_empty_memory_error(exc: BaseException) -> None:
    # The interpreter raises MemoryError without a message: the sink would print an empty error.
    if isinstance(exc, MemoryError) and not _safe_str(exc):
        places = [note[len(RAISED_IN_NOTE_PREFIX) :] for note in _notes(exc) if note.startswith(RAISED_IN_NOTE_PREFIX)]
        exc.args = (f"out of memory (a MemoryError without a message) in {', in '.join(places) or 'a worker'}",)


def _notes(exc: BaseException) -> list[str]:
    return [note for note in getattr(exc, "__notes__", None) or [] if isinstance(note, str)]


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:
        return f"<unprintable {type(exc).__name__} object>"


def _std_pickled(value: Any) -> Optional[bytes]:
    """``value`` pickled with the standard pickle, if it also unpickles here; else None."""
    try:
        data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        pickle.loads(data)
    except Exception:  # unpicklable state, an __init__ that does not take args, too deep...
        return None
    return data


def _dill_round_trips(value: Any) -> bool:
    import dill

    try:
        dill.loads(dill.dumps(value, protocol=pickle.HIGHEST_PROTOCOL, recurse=True))
    except Exception:
        return False
    return True


def _round_trips(value: Any) -> bool:
    return _std_pickled(value) is not None or _dill_round_trips(value)
