"""``write_sql``: the sink that writes dict records into a database table, one transaction per task.

:class:`SqlSink` is the main-process half. :meth:`SqlSink.prepare` (before any worker starts)
does everything that must happen once: it checks ``if_exists`` against the table (``"fail"``
raises if it exists, ``"replace"`` drops it, ``"append"`` takes its columns), creates the
table from ``schema`` when given, and with ``resume=True`` reads the bookkeeping table
(:mod:`.sql_bookkeeping`), refuses a changed input or layout and returns the plan without the
committed tasks. Then each task's rows are written in one transaction
(:class:`~.sql_writer.TaskRowsWriter`) where the task ran: in the CPU workers on a backend
that can write there (multiprocessing; only counts come back), else here, in the main
process, as each task's last output arrives. Runs that retry or isolate tasks
(``max_task_retries``, ``task_timeout``) write here, so that a rerun task's rows are written
once, by the main process, from the run that completed.

Row order in the table is not meaningful (SQL tables have none): every backend writes the
same rows, in an order that depends on which task commits first. Give the records a key and
``ORDER BY`` it to read them in order.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Optional

from ..errors import SchemaError
from .sinks import Sink
from .sql_bookkeeping import (
    BOOKKEEPING_TABLE,
    check_resumable,
    committed_tasks,
    ensure_bookkeeping,
    forget_tasks,
    run_fingerprint,
)
from .sql_connection import SqlConnection, connect, sql_target
from .sql_schema import SqlRowFinalizer, create_table_sql, schema_columns, table_columns, table_exists
from .sql_writer import SqlTableSettings, TaskRowsWriter, WorkerSqlWriters

if TYPE_CHECKING:
    from ..execution.task import ChunkFinalizer, TaskOutput
    from ..plan import Plan

IF_EXISTS = ("fail", "append", "replace")
logger = logging.getLogger("streamproc")


class SqlSink(Sink):
    """``write_sql``'s sink (main process); see the module docstring. Call :meth:`prepare` first.

    Raises (from the constructor, before anything is touched):
        ValueError: an unknown ``if_exists``, ``resume=True`` with ``if_exists="replace"``, an
            empty ``table``, a ``:memory:`` SQLite database, or ``con`` a live connection.
        TypeError: ``table`` not a str, or ``resume`` not a bool.
    """

    def __init__(self, con: Any, table: str, if_exists: str = "fail", schema: Any = None, resume: bool = False) -> None:
        if not isinstance(table, str):
            raise TypeError(f"write_sql: table must be a str (a table name), got {type(table).__name__}: {table!r:.60}")
        if not table:
            raise ValueError("write_sql: table must be a non-empty table name")
        if table == BOOKKEEPING_TABLE:
            raise ValueError(f"write_sql: {BOOKKEEPING_TABLE!r} is the table where write_sql(resume=True) records its tasks")
        if if_exists not in IF_EXISTS:
            raise ValueError(f"write_sql: if_exists must be one of {', '.join(map(repr, IF_EXISTS))}, got {if_exists!r}")
        if not isinstance(resume, bool):
            raise TypeError(f"write_sql: resume must be True or False, got {resume!r}")
        if resume and if_exists == "replace":
            raise ValueError(
                "write_sql: resume=True and if_exists='replace' exclude each other (replace drops what resume would keep)"
            )
        self.target = sql_target(con, "write_sql: con")
        if self.target.sqlite_path == ":memory:":
            raise ValueError(
                "write_sql: an in-memory SQLite database lives in one connection, and every process that writes opens "
                "its own: write to a file ('out.db' or 'sqlite:///out.db')"
            )
        self.table = table
        self.if_exists = if_exists
        self.schema = schema
        self.resume = resume
        self.dead_letter_mode = "resume" if resume else "overwrite" if if_exists == "replace" else "new"
        self.settings: Optional[SqlTableSettings] = None
        self.rows = 0  # written into the table by this write (earlier runs' committed rows included)
        self._writer: Optional[TaskRowsWriter] = None
        self._pending: dict[int, list[Mapping[str, Any]]] = {}

    # -- before the run (main process) ----------------------------------------------------------
    def prepare(self, plan: Plan) -> Plan:
        """Applies ``if_exists``, creates the table from ``schema``, reads what a resume skips;
        returns the plan to run (main process, before any worker starts).

        Raises:
            ValueError: the table exists and ``if_exists="fail"`` (without a resumable earlier
                run of this write); a shard (``set_processing(shard=...)``) without ``"append"``.
            SchemaError: ``schema`` names a column the existing table lacks.
            streamproc.ResumeMismatchError: ``resume=True`` over tasks committed by a run with
                another input or task layout.
        """
        table, target = self.table, self.target
        selection = plan.task_selection
        if selection is not None and selection.world_size > 1 and self.if_exists != "append":
            raise ValueError(
                f"write_sql: a shard (rank {selection.rank} of {selection.world_size}) writes with the other ranks into one "
                f"table: use if_exists='append' (with {self.if_exists!r} the ranks would drop or refuse each other's rows)"
            )
        fingerprint = run_fingerprint(plan)
        with connect(target) as connection:
            if _reads_the_same_sqlite_file(plan, target.sqlite_path):
                _use_write_ahead_log(connection, str(target))
            columns = schema_columns(self.schema, connection.dialect)
            exists = table_exists(connection, table)
            # Checks first: a write refused here leaves the database as it was (an interrupted
            # resumable write's bookkeeping included).
            earlier = committed_tasks(connection, table) if exists else {}
            committed = earlier if self.resume else {}
            if self.resume:
                check_resumable(committed, fingerprint, target, table)
            if exists and not committed and self.if_exists == "fail":
                hint = f" (or resume=True: it holds {len(earlier)} tasks of an interrupted resumable write)" if earlier else ""
                raise ValueError(
                    f"write_sql: table {table!r} already exists in {target}: pass if_exists='append' to add the rows "
                    f"to it, or if_exists='replace' to drop it first{hint}"
                )
            keep = exists and (bool(committed) or self.if_exists == "append")
            if keep:
                columns = self._existing_columns(connection, columns)
            # Then the changes, once, before any worker starts.
            if self.resume:
                ensure_bookkeeping(connection)
            if not committed:  # a new write (or the table was dropped): earlier bookkeeping rows no longer hold
                forget_tasks(connection, table)
            if exists and not keep:  # if_exists="replace"
                connection.execute(f"DROP TABLE {connection.quote(table)}")
            if not keep and columns is not None:
                connection.execute(create_table_sql(connection, table, columns))
        self.rows = sum(rows for rows, _ in committed.values())
        self.settings = SqlTableSettings(
            target, table, tuple(columns.items()) if columns is not None else None, self.resume, fingerprint
        )
        return plan.with_task_selection(1, committed) if self.resume else plan

    def _existing_columns(self, connection: SqlConnection, schema: Optional[dict[str, str]]) -> dict[str, str]:
        """The columns of the existing table; a ``schema`` column it lacks is an error (main process)."""
        existing = table_columns(connection, self.table)
        missing = [name for name in schema or () if name not in existing]
        if missing:
            raise SchemaError(
                f"write_sql: schema names column {missing[0]!r}, which table {self.table!r} of {self.target} lacks "
                f"(it has {', '.join(map(repr, existing))})"
            )
        return existing

    # -- the Sink protocol ----------------------------------------------------------------------
    def finalizer(self) -> ChunkFinalizer:
        return SqlRowFinalizer(self.target.dialect)

    def wants_workers(self, plan: Plan) -> bool:
        options = plan.options
        # A task rerun on a fresh worker (or isolated record by record) comes back through the
        # main process, which then writes it: worker-side writers never see a retried task.
        return options.max_task_retries == 0 and options.task_timeout is None

    def worker_writers(self) -> WorkerSqlWriters:
        assert self.settings is not None, "prepare() first"
        return WorkerSqlWriters(self.settings)

    def start(self) -> None:
        assert self.settings is not None, "prepare() first"
        if not self.in_workers:
            self._writer = TaskRowsWriter(self.settings)

    def write(self, output: TaskOutput) -> None:
        """Counts the rows of a run whose workers write; otherwise commits each task at its last output."""
        self.rows += output.count
        if self._writer is None:
            return
        key = output.task_key if output.task_key is not None else output.task_index
        if output.chunk:
            self._pending.setdefault(key, []).extend(output.chunk)
        if output.last:
            self._writer.write_task(key, self._pending.pop(key, []), f"task {key}")

    def commit(self) -> int:
        """Returns the rows in the table written by this write (with ``resume``, earlier runs' too)."""
        self.abort()
        return self.rows

    def abort(self) -> None:
        """Closes the connection; every committed task stays, nothing else was written."""
        self._pending.clear()
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()


def _reads_the_same_sqlite_file(plan: Plan, path: Optional[str]) -> bool:
    """Whether ``plan`` reads (``read_sql``) the SQLite file ``path`` that it writes into."""
    from .sql_source import SqlSource

    source: Any = plan.source
    while not isinstance(source, SqlSource) and getattr(source, "inner", None) is not None:
        source = source.inner  # limit() wraps its source
    return path is not None and isinstance(source, SqlSource) and source.target.sqlite_path == path


def _use_write_ahead_log(connection: SqlConnection, where: str) -> None:
    """Switches the SQLite file to WAL journaling, which lets a reader's open cursor and the
    writers' commits proceed together (main process, before the run).

    In SQLite's default (rollback) journal, ``read_sql``'s cursor, open for the whole run,
    holds a shared lock that every commit must wait for: a job reading and writing one file
    would fail with "database is locked". WAL is a property of the file and stays after the run.
    """
    mode = connection.execute("PRAGMA journal_mode")[0]
    if str(next(iter(mode.values()))).lower() != "wal":
        connection.execute("PRAGMA journal_mode=WAL")
        logger.info("write_sql: %s is read and written by this job: switched it to WAL journaling (it stays so)", where)


def write_sql(plan: Plan, con: Any, table: str, if_exists: str, schema: Any, resume: bool) -> int:
    """``Stream.write_sql``: checks the arguments, prepares the table, runs ``plan`` into it (main process).

    SIGTERM stops the run the way it stops ``write_parquet`` (the tasks committed stay; exit
    status 143): see :mod:`.termination`.
    """
    from .sinks import run_into
    from .termination import run_until_sigterm

    sink = SqlSink(con, table, if_exists, schema, resume)
    prepared = sink.prepare(plan)
    rows: int = run_until_sigterm(lambda: run_into(prepared, sink), f"write_sql({table!r})")
    return rows
