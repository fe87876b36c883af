"""The record-level error policy (``set_processing(on_error=...)``) and the rows it produces.

A :class:`RecordError` is one record the policy dropped, as it travels from where the task ran
to the main process (with the task's outputs, ``TaskOutput.errors``) and lands as one row of
the dead-letter parquet output. Plain strings only: it always pickles.
"""

from __future__ import annotations

from dataclasses import dataclass

#: The ``on_error`` values, in order of leniency.
ON_ERROR_CHOICES = ("raise", "skip", "dead_letter")


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
