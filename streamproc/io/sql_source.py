"""``read_sql``: the rows of a query as dict records, streamed in tasks of ``task_size`` rows.

``read_sql(query, con, chunk_size=n)`` is ``SqlSource`` with the stream's ``task_size`` set to
``n``, so that the part layout of ``write_parquet`` (groups of ``rows_per_file / task_size``
tasks) and the batches of later stages see the same task size as the source.

Where rows are read: in the main process, by the source's :meth:`SqlSource.iter_tasks` (the
feeder thread of a backend with workers), through one cursor over the whole query, fetched
``min(task_size, READ_BATCH_ROWS)`` rows at a time (``fetchmany`` on SQLite, a server-side
cursor through SQLAlchemy's ``stream_results`` elsewhere); the task payloads carry the rows
to the workers, as ``from_iterable`` does. Why not read in the workers with ``LIMIT/OFFSET``
or keyset pagination: that is valid only with an ``ORDER BY`` on a unique key, ``OFFSET`` makes
the database skip every earlier row again (quadratic work), and the database, not the decoding
of its rows, is what limits a SQL read. So each row is read once, any query works, and memory
stays bounded:

    rows held by the source = the task being filled (<= task_size) + one fetch batch,

the tasks already yielded being bounded by the backend's window, as for any source.

Records are dicts (column name -> value) holding what the driver returns, unconverted:
SQLite gives ``int``, ``float``, ``str``, ``bytes`` and ``None``; PostgreSQL through psycopg
also gives ``decimal.Decimal`` (numeric), ``datetime``/``date``/``time``/``timedelta``,
``uuid.UUID``, ``bool``, lists (arrays) and dicts (json). Cast in the query (``id::text``)
for a type a later sink does not take.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple, Optional

from .base import READ_BATCH_ROWS, Source
from .sql_connection import (
    SqlConnection,
    SqlQueryError,
    SqlTarget,
    connect,
    driver_message,
    short_query,
    sql_target,
)

#: Dialects whose ``EXPLAIN <query>`` compiles (SQLite) or plans (PostgreSQL) the query
#: without running it: ``read_sql`` checks the query with it before the run starts.
EXPLAIN_DIALECTS = ("sqlite", "postgresql")

_ORDER_BY_RE = re.compile(r"\border\s+by\b", re.IGNORECASE)


def top_level_text(sql: str) -> str:
    """``sql`` with its comments, string literals, quoted identifiers and everything inside
    parentheses blanked out: the clauses of the outermost statement.

    >>> top_level_text("SELECT f(a) AS \\"order by\\" FROM t -- order by x").split()
    ['SELECT', 'f', 'AS', 'FROM', 't']
    """
    out: list[str] = []
    depth = 0
    i, n = 0, len(sql)
    while i < n:
        char = sql[i]
        if sql.startswith("--", i):
            end = sql.find("\n", i)
            end = n if end < 0 else end
        elif sql.startswith("/*", i):
            end = sql.find("*/", i + 2)
            end = n if end < 0 else end + 2
        elif char in "'\"`":
            end = i + 1
            while end < n:
                if sql[end] == char:
                    if end + 1 < n and sql[end + 1] == char:  # a doubled quote escapes itself
                        end += 2
                        continue
                    break
                end += 1
            end = min(end + 1, n)
        elif char == "(":
            depth += 1
            end = i + 1
        elif char == ")":
            depth = max(depth - 1, 0)
            end = i + 1
        else:
            out.append(char if depth == 0 else " ")
            i += 1
            continue
        out.append(" " * (end - i))
        i = end
    return "".join(out)


def check_chunk_size(chunk_size: Optional[int]) -> None:
    """Raises ``ValueError`` unless ``chunk_size`` is None or a positive integer (main process)."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"read_sql: chunk_size must be a positive integer (rows per task) or None, got {chunk_size!r}")


def has_order_by(sql: str) -> bool:
    """Whether the outermost statement of ``sql`` ends with an ``ORDER BY`` clause.

    Detection is textual: ``ORDER BY`` (any case and spacing) outside comments, string
    literals, quoted identifiers and parentheses, so the ``ORDER BY`` of a subquery or of a
    window (``OVER (ORDER BY ...)``) does not count: it does not order the result.

    >>> has_order_by("SELECT * FROM t ORDER BY id")
    True
    >>> has_order_by("SELECT *, row_number() OVER (ORDER BY id) FROM t")
    False
    """
    return bool(_ORDER_BY_RE.search(top_level_text(sql)))


class SqlRows(NamedTuple):
    """The payload of one task: ``rows`` are the query's rows ``start``, ``start + 1``, ...
    (counted from 0), already read (in the main process)."""

    start: int
    rows: list[dict[str, Any]]


class SqlSource(Source):
    """The rows of ``query`` on the database ``con``; see the module docstring.

    Built in the main process, which checks the arguments and the query (unknown table or
    column) before any worker starts; :meth:`iter_tasks` reads the rows there too. Workers
    receive the rows in the payloads, never the connection (nor the query's results).
    """

    def __init__(self, query: str, con: Any, params: Optional[Mapping[str, Any]] = None) -> None:
        if not isinstance(query, str) or not query.strip():
            raise ValueError(f"read_sql: query must be a non-empty SQL string, got {type(query).__name__} {query!r:.80}")
        if params is not None and not isinstance(params, Mapping):
            raise TypeError(
                f"read_sql: params must be a mapping of the query's :name parameters, got {type(params).__name__}"
            )
        self.query = query.strip().rstrip(";").rstrip()
        self.params: dict[str, Any] = dict(params or {})
        self.target: SqlTarget = sql_target(con)
        self.ordered = has_order_by(self.query)
        self._check_sqlite_file()
        with self._open() as connection:
            self._check_query(connection)

    # -- main process ---------------------------------------------------------------------------
    def iter_tasks(self, task_size: int) -> Iterator[SqlRows]:
        """Runs the query once and yields its rows ``task_size`` at a time.

        Raises:
            SqlQueryError: the database failed the query, or the query returns no rows (it is
                not a SELECT), naming the query, the database and the rows read before.
        """
        size = task_size
        start = 0
        rows: list[dict[str, Any]] = []
        with self._open() as connection, contextlib.closing(
            connection.iterate(self.query, self.params, batch_rows=min(size, READ_BATCH_ROWS))
        ) as batches:
            while True:
                try:
                    batch = next(batches, None)
                except connection.errors as exc:
                    read = start + len(rows)
                    raise self._error(f"failed after {read} rows" if read else "failed (read_sql takes a query)", exc) from exc
                if batch is None:
                    break
                taken = 0
                while taken < len(batch):
                    more = batch[taken : taken + size - len(rows)]
                    rows.extend(more)
                    taken += len(more)
                    if len(rows) == size:
                        yield SqlRows(start, rows)
                        start, rows = start + size, []
            if rows:
                yield SqlRows(start, rows)

    def fingerprint(self) -> dict[str, Any]:
        """The query, its parameters (as ``repr``) and the database URL (password hidden): a
        resume over another query or database is refused (a changed ``chunk_size`` is a changed
        ``task_size``, which the layout check refuses). Rows that changed in the database are
        not detected (reading them all again would be the only way)."""
        return {
            "read_sql": self.query,
            "params": {name: repr(value) for name, value in sorted(self.params.items())},
            "database": str(self.target),
        }

    def num_records(self) -> None:
        """None: a ``COUNT(*)`` over the query would run it a second time (a scan, or a sort
        for an ``ORDER BY``); progress shows a count without a total."""
        return None

    def check_stable_order(self, what: str) -> None:
        """Refuses ``what`` (a resume, which skips tasks by number) over a query without an
        ``ORDER BY``: the database may return its rows in another order on the rerun.

        Raises:
            ValueError: the query has no top-level ``ORDER BY`` (see :func:`has_order_by`).
        """
        if not self.ordered:
            raise ValueError(
                f"{what} over read_sql needs a query with an ORDER BY (on a unique key): without one the database "
                f"may return the rows in another order on the rerun, and the rows skipped as done would not be "
                f"the ones written. Query: {short_query(self.query)}"
            )

    def describe(self) -> str:
        return f"read_sql({short_query(self.query)!r} on {self.target})"

    # -- where the task runs --------------------------------------------------------------------
    def read_task(self, payload: SqlRows) -> Iterator[dict[str, Any]]:
        return iter(payload.rows)

    def read_task_chunks(self, payload: SqlRows, chunk_size: int) -> Iterator[list[dict[str, Any]]]:
        yield payload.rows  # already a list of at most task_size rows

    def locate(self, payload: SqlRows, row: Optional[int] = None) -> str:
        """``"read_sql(...), rows <first> to <last> of the query"``, or ``"..., row <i> of the query"``
        (counted from 0 in the query's result) for record ``row`` of the task."""
        if row is None:
            return f"{self.describe()}, rows {payload.start} to {payload.start + len(payload.rows) - 1} of the query"
        return f"{self.describe()}, row {payload.start + row} of the query"

    # -- helpers (main process) -----------------------------------------------------------------
    def _open(self) -> SqlConnection:
        return connect(self.target, read_only=True)

    def _check_sqlite_file(self) -> None:
        path = self.target.sqlite_path
        if path is None or path == ":memory:":
            return
        if os.path.isdir(path):
            raise IsADirectoryError(f"read_sql: {path!r} is a directory, not a SQLite database file")
        if not os.path.exists(path):
            raise FileNotFoundError(f"read_sql: no SQLite database at {path!r} (reading never creates one)")

    def _check_query(self, connection: SqlConnection) -> None:
        """Compiles or plans the query without running it (``EXPLAIN``), where the dialect
        allows: an unknown table or column, or a syntax error, is raised now."""
        if connection.dialect not in EXPLAIN_DIALECTS:
            return  # checked when the run starts, by running it
        try:
            connection.execute(f"EXPLAIN {self.query}", self.params)
        except connection.errors as exc:
            raise self._error("is not valid", exc) from exc

    def _error(self, what: str, exc: BaseException) -> SqlQueryError:
        return SqlQueryError(f"read_sql: the query {short_query(self.query)!r} {what} on {self.target}: {driver_message(exc)}")
