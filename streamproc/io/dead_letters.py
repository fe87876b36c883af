"""The dead-letter output of ``on_error="dead_letter"``: one parquet file per task with errors.

Runs in the main process. Layout of ``dead_letter_path`` (a directory):

* ``dead-<task_key:08d>.parquet``: the records task ``task_key`` dropped, in the order the
  errors occurred, with the columns of design.md section 5 (:data:`DEAD_LETTER_COLUMNS`:
  every column a string except ``task``, an int64). Written when the task's last output
  reaches the main process, under a hidden ``.dead-<task_key:08d>.parquet.inprogress`` name,
  then renamed (``os.replace``): a file is complete or absent, never half-written.
* nothing else: a task without errors has no file.

One file per task, named by its key in the whole stream, is what lets resume and sharding
work without coordination: a rerun task rewrites its own file, ranks never share a name.

A run starting over a directory that holds dead letters of an earlier run
(:class:`DeadLetterWriter` ``mode``): ``"new"`` refuses it (``FileExistsError``), ``"overwrite"``
deletes the ``dead-*.parquet`` files (nothing else), ``"resume"`` keeps them (the tasks that
run again replace theirs, and a rerun task that now has no error removes its old file).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..execution.error_policy import RecordError

#: Column names, in order; ``task`` is int64, every other column a string.
DEAD_LETTER_COLUMNS = ("source", "task", "stage", "error_type", "message", "traceback", "record")
DEAD_LETTER_PREFIX = "dead-"
DEAD_LETTER_SUFFIX = ".parquet"
DEAD_LETTER_MODES = ("new", "overwrite", "resume")
#: The hidden name's suffix while a file is written: that of the parquet part files, so that
#: every check for leftovers (``*.inprogress``) sees both.
IN_PROGRESS_SUFFIX = ".inprogress"


def dead_letter_name(task_key: int) -> str:
    """The file name of task ``task_key``'s dead letters.

    >>> dead_letter_name(3)
    'dead-00000003.parquet'
    """
    return f"{DEAD_LETTER_PREFIX}{task_key:08d}{DEAD_LETTER_SUFFIX}"


def _is_dead_letter_file(name: str) -> bool:
    return name.startswith(DEAD_LETTER_PREFIX) and name.endswith(DEAD_LETTER_SUFFIX)


def _is_in_progress(name: str) -> bool:
    return name.startswith("." + DEAD_LETTER_PREFIX) and name.endswith(DEAD_LETTER_SUFFIX + IN_PROGRESS_SUFFIX)


def dead_letter_schema():  # type: ignore[no-untyped-def]
    """The Arrow schema of a dead-letter file."""
    import pyarrow as pa

    return pa.schema([(name, pa.int64() if name == "task" else pa.string()) for name in DEAD_LETTER_COLUMNS])


class DeadLetterWriter:
    """Writes the dead letters of a run into ``path`` (main process); see the module docstring.

    Args:
        path: the ``dead_letter_path`` directory (created if missing).
        mode: ``"new"`` (``to_list``, iteration, a sink without ``overwrite``), ``"overwrite"``
            or ``"resume"``: what to do with the dead letters of an earlier run.

    Raises:
        ValueError: an unknown ``mode``.
        FileExistsError: ``path`` is a file, or ``mode="new"`` and ``path`` holds
            ``dead-*.parquet`` files (the message names the path and says what to do).
    """

    def __init__(self, path: str | os.PathLike[str], mode: str = "new") -> None:
        if mode not in DEAD_LETTER_MODES:
            raise ValueError(
                f"DeadLetterWriter mode={mode!r} is invalid: expected one of {', '.join(map(repr, DEAD_LETTER_MODES))}"
            )
        self.path = os.path.abspath(os.fspath(path))
        self.mode = mode
        #: The files this run wrote, in the order it wrote them.
        self.written: list[str] = []
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise FileExistsError(f"dead_letter_path {self.path!r} is a file; give a directory path")
        os.makedirs(self.path, exist_ok=True)
        names = os.listdir(self.path)
        for name in names:  # left by a run that died while writing: never a complete file
            if _is_in_progress(name):
                os.unlink(os.path.join(self.path, name))
        existing = sorted(name for name in names if _is_dead_letter_file(name))
        if existing and mode == "new":
            shown = ", ".join(existing[:3]) + (", ..." if len(existing) > 3 else "")
            raise FileExistsError(
                f"dead_letter_path {self.path!r} already holds {len(existing)} dead-letter file(s) of an earlier run "
                f"({shown}): move or delete them, or pass overwrite=True (or resume=True) to the sink"
            )
        if mode == "overwrite":
            for name in existing:
                os.unlink(os.path.join(self.path, name))

    def write_task(self, task_key: int, errors: Sequence[RecordError]) -> None:
        """Writes task ``task_key``'s dead letters atomically (nothing when it has none)."""
        final_path = os.path.join(self.path, dead_letter_name(task_key))
        if not errors:
            if self.mode == "resume" and os.path.exists(final_path):
                os.unlink(final_path)  # written by an earlier run of this task, which failed differently
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns = {name: [getattr(error, name) for error in errors] for name in DEAD_LETTER_COLUMNS}
        table = pa.table(columns, schema=dead_letter_schema())
        tmp_path = os.path.join(self.path, f".{dead_letter_name(task_key)}{IN_PROGRESS_SUFFIX}")
        try:
            pq.write_table(table, tmp_path)
            os.replace(tmp_path, final_path)
        except BaseException:
            if os.path.exists(tmp_path):
                os.unlink(tmp_path)
            raise
        self.written.append(final_path)
