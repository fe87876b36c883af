"""Writing one task's rows into a ``write_sql`` table: one transaction per task, wherever it runs.

:class:`TaskRowsWriter` holds one connection (opened lazily, in the process that writes) and
writes each task in one transaction: the table when it does not exist yet, the task's rows,
and, with ``resume=True``, the task's bookkeeping row (:mod:`.sql_bookkeeping`). It runs in the
main process (simple and threads backends, and runs that retry tasks) or in each CPU worker
(:class:`WorkerSqlWriters`, multiprocessing), where the task's outputs were produced: then
only counts travel back to the main process.

NOTE [ write_sql table creation ]
When neither ``schema`` nor an existing table gives the columns, the table is created from
the rows of the first task that commits, in that task's transaction, by whichever process
writes it. Writers are serialised there: on SQLite ``BEGIN IMMEDIATE`` takes the database's
write lock before anything is read, so a second writer waits, then sees the table; on
PostgreSQL (where two concurrent ``CREATE TABLE IF NOT EXISTS`` can fail on a catalog unique
index) the transaction takes ``pg_advisory_xact_lock`` on the table's name and looks again
before creating it. A writer that finds the table checks its rows against its columns. DDL is
transactional on both, so a task whose insert fails leaves no table behind. The "first task"
is the first to commit, which with several workers depends on timing: the table's types are
the same whatever the timing as long as every column has one type across the stream; a
column that is None in every record of the creating task becomes TEXT (logged). Pass
``schema`` for types that never depend on the data.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from ..errors import SchemaError
from ..execution.task import Task, TaskOutput, run_task
from .base import Source
from .sql_bookkeeping import record_task
from .sql_connection import SqlConnection, SqlTarget, connect
from .sql_errors import database_error, is_database_error
from .sql_schema import SqlRowFinalizer, check_rows, create_table_sql, infer_columns, table_columns

if TYPE_CHECKING:
    from ..execution.context import ExecutionContext
    from ..execution.timing import StageTimer
    from ..plan import Plan


@dataclass(frozen=True)
class SqlTableSettings:
    """What every writer of one ``write_sql`` run needs; made in the main process, travels to workers.

    ``columns`` (``(name, SQL type)`` pairs) are known before the run when ``schema`` was given
    or the table existed; None: the first task to commit creates the table (see NOTE
    [ write_sql table creation ]). ``fingerprint`` is the run's (see :mod:`.sql_bookkeeping`).
    """

    target: SqlTarget
    table: str
    columns: Optional[tuple[tuple[str, str], ...]]
    resume: bool
    fingerprint: str


class TaskRowsWriter:
    """Writes whole tasks into the table through one connection (the process that calls it)."""

    def __init__(self, settings: SqlTableSettings) -> None:
        self.settings = settings
        self.columns: Optional[dict[str, str]] = dict(settings.columns) if settings.columns is not None else None
        self.rows_written = 0
        self._connection: Optional[SqlConnection] = None
        self._inserting: list[str] = []  # the columns of the INSERT running (names the column of a bad value)

    def write_task(self, task_key: int, rows: Sequence[Mapping[str, Any]], where: str) -> None:
        """Commits ``rows`` (converted by :class:`~.sql_schema.SqlRowFinalizer`) of task ``task_key`` in one transaction.

        Raises:
            SchemaError: a column the table lacks, a value its column's type refuses (checked
                here, or refused by the database), a column of mixed types in a new table.
            SqlWriteError: any other database error (a locked SQLite database, ...), naming
                the table and ``where``; the driver's error is the ``__cause__``.
        """
        settings = self.settings
        self._inserting = []
        try:
            connection = self._connect()
            with connection.transaction():
                columns = self.columns if self.columns is not None else self._columns_creating_table(connection, rows, where)
                if rows:
                    check_rows(rows, columns, settings.table, where)
                    self._insert(connection, rows)
                if settings.resume:
                    record_task(connection, settings.table, task_key, len(rows), settings.fingerprint)
        except SchemaError:
            raise
        except Exception as exc:
            if is_database_error(exc):
                raise database_error(exc, settings.target, settings.table, where, self._inserting) from exc
            raise
        if columns:
            self.columns = columns  # committed: the table exists from now on
        self.rows_written += len(rows)

    def _columns_creating_table(self, connection: SqlConnection, rows: Sequence[Mapping[str, Any]], where: str) -> dict[str, str]:
        """The table's columns, creating it from ``rows`` if needed; see NOTE [ write_sql table creation ]."""
        table = self.settings.table
        columns = table_columns(connection, table)
        if columns or not rows:
            return columns  # no rows: nothing to create a table from (a later task will)
        if connection.dialect == "postgresql":
            connection.execute(
                "SELECT pg_advisory_xact_lock(hashtext('streamproc.write_sql:' || current_schema() || '.' || :table))",
                {"table": table},
            )
            columns = table_columns(connection, table)
            if columns:
                return columns
        columns = infer_columns(rows, connection.dialect, table, where)
        connection.execute(create_table_sql(connection, table, columns))
        return columns

    def _insert(self, connection: SqlConnection, rows: Sequence[Mapping[str, Any]]) -> None:
        seen: dict[str, None] = {}
        for row in rows:
            seen.update(dict.fromkeys(row))
        names = self._inserting = list(seen)
        table = connection.quote(self.settings.table)
        if not names:  # records without a single key: one row of defaults each
            for _ in rows:
                connection.execute(f"INSERT INTO {table} DEFAULT VALUES")
            return
        quoted = ", ".join(connection.quote(name) for name in names)
        values = ", ".join(f":p{i}" for i in range(len(names)))
        # Positional parameter names: a column name need not be a valid parameter name.
        connection.executemany(
            f"INSERT INTO {table} ({quoted}) VALUES ({values})",
            [{f"p{i}": row.get(name) for i, name in enumerate(names)} for row in rows],
        )

    def _connect(self) -> SqlConnection:
        if self._connection is None:
            self._connection = connect(self.settings.target)
        return self._connection

    def close(self) -> None:
        """Closes the connection (idempotent); nothing is pending between tasks."""
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()


def describe_task(plan: Plan, task_key: int, payload: Any) -> str:
    """``"task 3"``, and where it is in the input when the source can say (file, row group...)."""
    if type(plan.source).locate is Source.locate:  # the default names only the worker's copy of the source
        return f"task {task_key}"
    return f"task {task_key} ({plan.source.locate(payload)})"


class WorkerSqlWriters:
    """Picklable factory of the CPU workers' writers (multiprocessing); travels with the plan.

    A dispatch unit is one task: each task is its own transaction, so any worker may write any.
    """

    def __init__(self, settings: SqlTableSettings) -> None:
        self.settings = settings

    def dispatch_units(self, payloads: Iterator[tuple[int, Any]]) -> Iterator[tuple[int, Any]]:
        """The tasks as they are (main process)."""
        return payloads

    def open_in_worker(self, worker_index: int) -> WorkerSqlWriter:
        """The writer of CPU worker ``worker_index`` (runs in that worker)."""
        return WorkerSqlWriter(self.settings)


class WorkerSqlWriter:
    """The worker's half of :class:`WorkerSqlWriters` (runs in a CPU worker)."""

    def __init__(self, settings: SqlTableSettings) -> None:
        self.writer = TaskRowsWriter(settings)
        self.finalize = SqlRowFinalizer(settings.target.dialect)

    def write(self, records: list[Any]) -> list[dict[str, Any]]:
        """The chunk finalizer of tasks run outside :meth:`run_group`: records -> rows."""
        return self.finalize(records)

    def run_group(
        self, plan: Plan, task: Task, ctx: ExecutionContext, timer: Optional[StageTimer] = None
    ) -> Iterator[TaskOutput]:
        """Runs ``task`` and commits its rows in one transaction before its last output goes back.

        Yields the task's outputs without their rows (``chunk=None``; counts, errors and stats
        travel). The rows of a task are held here until it ends, so that the database's write
        lock is held only while they are inserted, never while the task computes.
        """
        rows: list[dict[str, Any]] = []
        last: Optional[TaskOutput] = None
        for output in run_task(plan, task, ctx, self.finalize, timer):
            if output.chunk:
                rows.extend(output.chunk)
            stripped = dataclasses.replace(output, chunk=None)
            if output.last:
                last = stripped
            else:
                yield stripped
        self.writer.write_task(task.task_key, rows, describe_task(plan, task.task_key, task.payload))
        assert last is not None
        yield last

    def close(self) -> tuple[list[str], int]:
        """No paths, and the rows this worker committed (at the end of a run)."""
        self.writer.close()
        return [], self.writer.rows_written

    def abort(self) -> None:
        self.writer.close()
