"""The record-level error policy (``set_processing(on_error=...)``) and the rows it produces.

A :class:`RecordError` is one record the policy dropped, as it travels from where the task ran
to the main process (with the task's outputs, ``TaskOutput.errors``) and lands as one row of
the dead-letter parquet output. Plain strings only: it always pickles.

An :class:`ErrorPolicy` is the recorder of one task: :func:`~streamproc.execution.task.run_task`
makes one per task when ``on_error`` is not ``"raise"`` and puts it on the
:class:`~streamproc.execution.context.ExecutionContext` (``ctx.error_policy``); the ops read it
there (see :mod:`streamproc.execution.isolation`). With ``on_error="raise"`` there is none, and
every op runs exactly the code path it always ran. Both run where the task runs (the main
process, a worker thread, or a CPU worker).
"""

from __future__ import annotations

import json
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from ..errors import PipelineShutdownError, TaskTimeoutError, TooManyErrorsError, WorkerCrashedError

if TYPE_CHECKING:
    from ..io.base import Source
    from ..options import ProcessingOptions

#: The ``on_error`` values, in order of leniency.
ON_ERROR_CHOICES = ("raise", "skip", "dead_letter")

#: A record that ``json.dumps`` cannot write is stored as its ``repr``, cut to this many
#: characters (a JSON text is kept whole: it is what a user replays).
MAX_RECORD_REPR_CHARS = 10_000

#: Where ``TaskStats.extra`` holds the number of records the source produced for the task:
#: the denominator of a fractional ``max_errors``, so counted and sent only with one (the
#: stats object costs ~10 us per task to pickle, ~3% of the overhead benchmark).
RECORDS_IN_KEY = "records_in"

#: streamproc's own failures: never a record's fault, so never dropped (they stop the run).
_ENGINE_ERRORS = (WorkerCrashedError, PipelineShutdownError, TaskTimeoutError, TooManyErrorsError)


@dataclass(frozen=True)
class RecordError:
    """One dropped record: a dead-letter row (columns of design.md section 5).

    ``source`` is the record's location in the input (file and row group and row, file and
    line, or item index), ``task`` the task key, ``stage`` the stage name, ``record`` the
    record as JSON text when it can be, else its ``repr``.
    """

    source: str
    task: int
    stage: str
    error_type: str
    message: str
    traceback: str
    record: str


def is_record_failure(exc: BaseException) -> bool:
    """Whether the policy may drop the record(s) that raised ``exc``.

    Any ``Exception`` raised by user code (a CUDA out-of-memory error included); not a
    ``BaseException`` such as ``KeyboardInterrupt`` or ``SystemExit``, and not streamproc's own
    failures (a crashed GPU worker, a shutdown), which stop the run under every policy.
    """
    return isinstance(exc, Exception) and not isinstance(exc, _ENGINE_ERRORS)


def record_text(record: Any) -> str:
    """``record`` as JSON text when ``json.dumps`` can write it, else its ``repr`` (at most
    ``MAX_RECORD_REPR_CHARS`` characters, the cut marked).

    >>> record_text({"id": 1, "text": "é"})
    '{"id": 1, "text": "é"}'
    >>> record_text({1, 2})
    '{1, 2}'
    """
    try:
        return json.dumps(record, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):  # not JSON: a set, an array, a tensor, a cycle
        pass
    try:
        text = repr(record)
    except Exception as exc:  # a broken __repr__ must not lose the error it goes with
        text = f"<{type(record).__name__} object; repr failed: {type(exc).__name__}>"
    if len(text) > MAX_RECORD_REPR_CHARS:
        text = f"{text[:MAX_RECORD_REPR_CHARS]}... [repr cut at {MAX_RECORD_REPR_CHARS} of {len(text)} characters]"
    return text


def _error_type(exc: BaseException) -> str:
    # A rebuilt stand-in for an exception that could not travel names the original type.
    type_name = getattr(exc, "type_name", None)
    return type_name if isinstance(type_name, str) else type(exc).__qualname__


def _message(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:
        return f"<unprintable {type(exc).__name__} object>"


class ErrorPolicy:
    """Records the records one task dropped (where the task runs).

    Args:
        on_error: ``"skip"`` or ``"dead_letter"`` (both record the same rows; the main process
            decides whether to write them).
        source: the plan's source, to locate a record (``Source.locate(payload, row)``).
        payload: the task's payload.
        task_key: the task's key in the whole stream (the ``task`` column).
        counts_records: the task reports the records its source produced (``run_task`` puts
            them in ``stats.extra[RECORDS_IN_KEY]``; only a fractional ``max_errors`` reads them).

    ``row`` (see :meth:`record`) is the record's position among the *stage's* input records
    in this task, counted from 0: the source row for a stage with only maps before it; after a
    filter, a flatten or a batch op it counts that stage's inputs (the ``stage`` column says
    which stage).
    """

    def __init__(self, on_error: str, source: Source, payload: Any, task_key: int, counts_records: bool = False) -> None:
        self.on_error = on_error
        self.counts_records = counts_records
        self.source = source
        self.payload = payload
        self.task_key = task_key
        self._errors: list[RecordError] = []

    def record(self, stage: str, exc: BaseException, record: Any, row: int, formatted: Optional[str] = None) -> None:
        """Records that ``record`` (input ``row`` of ``stage`` in this task) raised ``exc``
        (``formatted``: its traceback text, if ``exc`` no longer holds it)."""
        try:
            where = self.source.locate(self.payload, row)
        except Exception as locate_exc:  # a source's locate must not turn a dropped record into a failed run
            where = f"record {row} of task {self.task_key} (locate failed: {type(locate_exc).__name__})"
        if formatted is None:
            formatted = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        self._errors.append(
            RecordError(where, self.task_key, stage, _error_type(exc), _message(exc), formatted, record_text(record))
        )

    def drain(self) -> tuple[RecordError, ...]:
        """The errors recorded since the last call (they travel with the next output chunk)."""
        if not self._errors:
            return ()
        errors, self._errors = tuple(self._errors), []
        return errors



def make_policy(options: ProcessingOptions, source: Source, payload: Any, task_key: int) -> Optional[ErrorPolicy]:
    """The recorder of one task, or None for ``on_error="raise"`` (today's code path).

    It counts the source's records only for a fractional ``max_errors`` (see ``RECORDS_IN_KEY``).
    """
    if options.on_error == "raise":
        return None
    counts_records = isinstance(options.max_errors, float)
    return ErrorPolicy(options.on_error, source, payload, task_key, counts_records)
