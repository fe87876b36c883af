"""The error ledger: what the main process does with the records the error policy dropped.

Every sink path (``run_into`` and iteration, see :mod:`streamproc.io.sinks`) passes the run's
outputs through one :class:`ErrorLedger` when ``on_error`` is not ``"raise"``. Runs in the
main process. For each output it:

* counts ``output.errors`` by stage and exception type;
* with ``on_error="dead_letter"``, keeps a task's errors until its last output arrives, then
  writes them as one file (:class:`~streamproc.io.dead_letters.DeadLetterWriter`);
* enforces ``max_errors``: an int is a count, checked at every output (more errors than that
  stop the run); a float is a fraction of the records seen (the errors of the completed tasks
  over the records their sources produced, ``TaskStats.extra["records_in"]``, which tasks
  report only then), checked once 1,000 records were seen and at the end. Past it, it raises
  :class:`~streamproc.errors.TooManyErrorsError`, which leaves the sink like any error: the
  sink aborts and the backend shuts down.

At the end of a run that dropped records it issues one
:class:`~streamproc.errors.RecordsSkippedWarning`: how many, by stage and type, and where the
dead letters are.
"""

from __future__ import annotations

import collections
import os
import warnings
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Optional, Union

from .._warnings import stacklevel_outside_streamproc
from ..errors import RecordsSkippedWarning, TooManyErrorsError
from ..execution.error_policy import RECORDS_IN_KEY
from .dead_letters import DeadLetterWriter

if TYPE_CHECKING:
    from ..execution.error_policy import RecordError
    from ..execution.task import TaskOutput
    from ..options import ProcessingOptions
    from ..plan import Plan
    from .sinks import Sink

#: A fractional ``max_errors`` is first checked once this many records were seen (design.md).
MIN_RECORDS_FOR_FRACTION = 1_000


class ErrorLedger:
    """Counts, dead-letters and bounds the errors of one run (main process); see the module docstring."""

    def __init__(self, options: ProcessingOptions, dead_letters: Optional[DeadLetterWriter]) -> None:
        self.on_error = options.on_error
        self.max_errors: Optional[Union[int, float]] = options.max_errors
        self.dead_letters = dead_letters
        #: (stage, error type) -> records dropped.
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()
        self.total = 0
        self.records_seen = 0  # by the completed tasks' sources
        self._errors_of_completed = 0
        self._first: Optional[RecordError] = None
        self._units: dict[int, _Unit] = {}  # task index -> what its outputs brought so far

    def watch(self, outputs: Iterable[TaskOutput]) -> Iterator[TaskOutput]:
        """Passes ``outputs`` through, accounting for each; checks and warns at their end."""
        for output in outputs:
            self.add(output)
            yield output
        self.finish()

    def add(self, output: TaskOutput) -> None:
        """Accounts for one output chunk (its errors; the dispatch unit's end when ``last``).

        Outputs are grouped by ``task_index``, the unit a backend dispatched: one task, or
        the tasks of one part group when the workers write the parts (their outputs have
        each task's own ``task_key``, and only the group's final one is ``last``). Dead
        letters are written per task key when the unit completes.
        """
        key = output.task_index if output.task_key is None else output.task_key
        unit = self._units.get(output.task_index)
        if unit is None and output.last and not output.errors:  # the common case: a task in one chunk
            if output.stats is not None:
                self.records_seen += int(output.stats.extra.get(RECORDS_IN_KEY, 0))
            if self.dead_letters is not None:
                self.dead_letters.write_task(key, ())
        else:
            if unit is None:
                unit = self._units[output.task_index] = _Unit()
            unit.add(key, output, keep=self.dead_letters is not None)
            if output.errors:
                self._count(output.errors)
            if output.last:
                del self._units[output.task_index]
                self._errors_of_completed += unit.errors
                self.records_seen += unit.records_in
                if self.dead_letters is not None:
                    for task_key, errors in unit.by_key.items():
                        self.dead_letters.write_task(task_key, errors)
        if output.last and self.records_seen >= MIN_RECORDS_FOR_FRACTION:
            self._check_fraction()

    def _count(self, errors: tuple[RecordError, ...]) -> None:
        if self._first is None:
            self._first = errors[0]
        for error in errors:
            self.counts[(error.stage, error.error_type)] += 1
        self.total += len(errors)
        if isinstance(self.max_errors, int) and self.total > self.max_errors:
            raise self._too_many()

    def finish(self) -> None:
        """At the end of a complete run: the last ``max_errors`` check, then the warning."""
        self._check_fraction()
        if self.total:
            warnings.warn(self.summary(), RecordsSkippedWarning, stacklevel=stacklevel_outside_streamproc())

    def _check_fraction(self) -> None:
        if (
            isinstance(self.max_errors, float)
            and self.records_seen
            and self._errors_of_completed / self.records_seen > self.max_errors
        ):
            raise self._too_many()

    def by_stage_and_type(self) -> str:
        """``"2 ValueError in stage 1 (map(parse)), 1 KeyError in stage 3 (...)"``, most first."""
        return ", ".join(f"{n} {error_type} in {stage}" for (stage, error_type), n in self.counts.most_common())

    def summary(self) -> str:
        """The text of the end-of-run warning."""
        where = (
            f"dead letters in {self.dead_letters.path} (dead-<task>.parquet)"
            if self.dead_letters is not None
            else "not kept (on_error='dead_letter' with dead_letter_path= keeps them)"
        )
        seen = f" of {self.records_seen}" if self.records_seen else ""
        were = "record was" if self.total == 1 and not seen else "records were"
        return (
            f"streamproc: {self.total}{seen} {were} dropped because processing them raised "
            f"(on_error={self.on_error!r}): {self.by_stage_and_type()}; {where}"
        )

    def _too_many(self) -> TooManyErrorsError:
        if isinstance(self.max_errors, int):
            limit = f"max_errors={self.max_errors} allows"
        else:
            limit = f"max_errors={self.max_errors} allows ({self._errors_of_completed} of the {self.records_seen} records seen)"
        first = self._first
        example = f"; first: {first.error_type}: {first.message} at {first.source}" if first is not None else ""
        records = "record" if self.total == 1 else "records"
        return TooManyErrorsError(
            f"{self.total} {records} failed, more than {limit} (on_error={self.on_error!r}): {self.by_stage_and_type()}{example}"
        )


class _Unit:
    """What the outputs of one dispatched unit brought before its last: errors per task key."""

    def __init__(self) -> None:
        self.errors = 0
        self.records_in = 0
        self.by_key: dict[int, list[RecordError]] = {}  # in the order the tasks came (dead letters)

    def add(self, key: int, output: TaskOutput, keep: bool) -> None:
        self.errors += len(output.errors)
        if output.stats is not None:
            self.records_in += int(output.stats.extra.get(RECORDS_IN_KEY, 0))
        if keep:
            self.by_key.setdefault(key, []).extend(output.errors)


def dead_letter_mode_of(sink: Sink) -> str:
    """How ``sink``'s run treats earlier dead letters: ``sink.dead_letter_mode`` when the sink
    sets it, else ``"overwrite"`` for a sink built with ``overwrite=True``, else ``"new"``."""
    mode = str(getattr(sink, "dead_letter_mode", "new"))
    if mode == "new" and getattr(sink, "overwrite", False) is True:
        return "overwrite"
    return mode


def output_dir_of(sink: Sink) -> Optional[str]:
    """The local path ``sink`` writes to, if any: its ``path``, or that of its output directory
    (``write_parquet``'s ``output.directory``); None for sinks without one."""
    path = getattr(sink, "path", None)
    if path is None:
        directory = getattr(getattr(sink, "output", None), "directory", None)
        if directory is not None and getattr(directory, "is_local", True):
            path = getattr(directory, "path", None)
    return path if isinstance(path, str) else None


def open_error_ledger(plan: Plan, dead_letter_mode: str = "new", output_path: Optional[str] = None) -> Optional[ErrorLedger]:
    """The ledger of a run of ``plan`` (main process, before it starts), or None with
    ``on_error="raise"``.

    Args:
        dead_letter_mode: see :class:`~streamproc.io.dead_letters.DeadLetterWriter`: ``"new"``
            for iteration and ``to_list``, ``"overwrite"`` for a sink with ``overwrite=True``,
            ``"resume"`` for a sink that resumes.
        output_path: the sink's output directory, if any: the dead letters may not go inside
            it (a reader of the output would read them as output).

    Raises:
        ValueError: ``dead_letter_path`` is inside ``output_path``.
        FileExistsError: see :class:`~streamproc.io.dead_letters.DeadLetterWriter`.
    """
    options = plan.options
    if options.on_error == "raise":
        return None
    dead_letters = None
    if options.on_error == "dead_letter" and options.dead_letter_path is not None:
        path = os.path.abspath(options.dead_letter_path)
        if output_path is not None:
            out = os.path.abspath(output_path)
            if path == out or path.startswith(out + os.sep):
                raise ValueError(
                    f"dead_letter_path {path!r} is inside the output directory {out!r}: "
                    "put the dead letters elsewhere (they would be read as output)"
                )
        dead_letters = DeadLetterWriter(path, dead_letter_mode)
    return ErrorLedger(options, dead_letters)


def watch_errors(outputs: Iterable[TaskOutput], ledger: Optional[ErrorLedger]) -> Iterable[TaskOutput]:
    """``outputs`` through ``ledger`` (see :meth:`ErrorLedger.watch`), or as they are without one."""
    return outputs if ledger is None else ledger.watch(outputs)
