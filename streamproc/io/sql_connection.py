"""Where a SQL database is (:class:`SqlTarget`, a URL that travels) and one connection to it.

``read_sql`` and ``write_sql`` take ``con`` as a path or a URL, never a live connection: the
target is pickled into every worker's plan as a string, and each process that reads or writes
opens its own :class:`SqlConnection` (sqlite3 connections and SQLAlchemy engines cannot cross
a fork or a pickle). A path or ``sqlite:///`` URL uses the standard library's ``sqlite3``; any
other URL goes through SQLAlchemy (the optional extra ``streamproc[sql]``), imported only then.

One SQL dialect for the callers: parameters are named (``:name``), which both ``sqlite3`` and
SQLAlchemy's ``text()`` accept, and rows come back as dicts. Runs in whichever process opens
it: the main process (simple backend, iterable reads) or a CPU worker.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional
from urllib.parse import quote as url_quote

from ..errors import StreamprocError

#: Seconds a sqlite3 statement waits for a lock held by another connection before failing.
SQLITE_LOCK_TIMEOUT_S = 10.0

_SCHEME_RE = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.\-]*)://")
_PASSWORD_RE = re.compile(r"^([^:/]+://[^:@/]*:)[^@/]*@")
SQL_EXTRA_HINT = "pip install 'streamproc[sql]' (SQLAlchemy and psycopg)"
#: Characters of a query shown in error messages (the start is kept).
QUERY_TEXT_CHARS = 200


class SqlQueryError(StreamprocError, ValueError):
    """A statement failed in the database (unknown table or column, syntax, type mismatch...).

    The message names the statement (cut to ``QUERY_TEXT_CHARS``) and the database URL with
    its password hidden; the driver's own error is the ``__cause__``.
    """


class SqlConnectionError(StreamprocError, ConnectionError):
    """The database cannot be opened (server unreachable, authentication refused...); the
    message names the URL with its password hidden, the driver's error is the ``__cause__``."""


def short_query(sql: str) -> str:
    """``sql`` on one line, cut to ``QUERY_TEXT_CHARS`` characters, for messages."""
    text = " ".join(sql.split())
    return text if len(text) <= QUERY_TEXT_CHARS else text[: QUERY_TEXT_CHARS - 3] + "..."


def driver_message(exc: BaseException) -> str:
    """The database's own words for ``exc``: SQLAlchemy's wrapper minus its ``[SQL: ...]``
    and background-link lines (the message that wraps it names the statement already)."""
    orig = getattr(exc, "orig", None)
    return f"{type(orig if orig is not None else exc).__name__}: {driver_text(exc)}"


def driver_text(exc: BaseException) -> str:
    """The first line of the database's own message for ``exc`` (SQLAlchemy wraps the DB-API
    exception in ``exc.orig``); "" when it has none."""
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip()
    return text.splitlines()[0] if text else ""


@dataclass(frozen=True)
class SqlTarget:
    """A database named by a URL: ``sqlite:///<absolute path>``, or any SQLAlchemy URL."""

    url: str

    @property
    def dialect(self) -> str:
        """``"sqlite"``, ``"postgresql"``, ...: the URL's scheme without its driver."""
        match = _SCHEME_RE.match(self.url)
        assert match is not None, self.url
        return match.group(1).split("+")[0].lower()

    @property
    def sqlite_path(self) -> Optional[str]:
        """The file of a ``sqlite:///`` URL (``:memory:`` included); None for other dialects."""
        if not self.url.lower().startswith("sqlite:///"):
            return None
        return self.url[len("sqlite:///"):] or ":memory:"

    def __str__(self) -> str:
        """The URL with its password hidden (for error messages and logs)."""
        return _PASSWORD_RE.sub(r"\1***@", self.url)


def sql_target(con: Any, parameter: str = "con") -> SqlTarget:
    """The :class:`SqlTarget` of ``con``: a path (str or ``os.PathLike``), a URL string or a
    ``sqlalchemy.engine.URL``.

    A relative path is made absolute here, in the main process, so that workers open the same
    file whatever their working directory.

    Raises:
        ValueError: ``con`` is a live connection, an engine, or anything else that is not a
            path or URL (a live connection cannot travel to worker processes).
    """
    if isinstance(con, os.PathLike):
        con = os.fspath(con)
    elif type(con).__name__ == "URL" and hasattr(con, "render_as_string"):  # a sqlalchemy.engine.URL
        con = con.render_as_string(hide_password=False)
    if not isinstance(con, str) or not con:
        raise ValueError(
            f"{parameter} must be a database path or URL (e.g. 'out.db', 'sqlite:///out.db', "
            f"'postgresql+psycopg://user@host/db'), got {type(con).__name__} {con!r}: a live connection "
            "or engine cannot travel to worker processes, each of which opens its own"
        )
    if _SCHEME_RE.match(con):
        if con.lower().startswith("sqlite:///"):
            path = con[len("sqlite:///"):]
            if path and path != ":memory:":
                return SqlTarget("sqlite:///" + os.path.abspath(path))
        return SqlTarget(con)
    return SqlTarget("sqlite:///" + os.path.abspath(con))


class SqlConnection:
    """One open connection to a :class:`SqlTarget`; see the module docstring.

    Autocommit outside :meth:`transaction`: each statement is its own transaction unless run
    inside ``with connection.transaction():``, which commits at its end or rolls back on an
    exception.

    ``read_only=True`` (what ``read_sql`` opens): a SQLite file is opened with ``mode=ro``, so a
    missing file is an error instead of a new empty database, and a statement that writes
    fails; a PostgreSQL connection runs its transactions ``READ ONLY``.

    Raises:
        ImportError: a URL other than SQLite without SQLAlchemy installed (names the pip command).
        SqlConnectionError: the database cannot be opened.
    """

    def __init__(self, target: SqlTarget, read_only: bool = False) -> None:
        self.target = target
        self.dialect = target.dialect
        self._sqlite: Any = None
        self._sqlalchemy: Any = None
        self._engine: Any = None
        self._in_transaction = False
        path = target.sqlite_path
        if path is not None:
            import sqlite3

            database, uri = path, False
            if read_only and path != ":memory:":
                database, uri = f"file:{url_quote(path)}?mode=ro", True
            # isolation_level=None: no implicit BEGIN; transaction() issues its own.
            # check_same_thread=False: a source's generator may be closed (and so its connection)
            # by another thread than the feeder thread that advanced it; one thread uses it at a time.
            try:
                self._sqlite = sqlite3.connect(
                    database, timeout=SQLITE_LOCK_TIMEOUT_S, isolation_level=None, uri=uri, check_same_thread=False
                )
            except sqlite3.Error as exc:
                raise SqlConnectionError(f"cannot open the SQLite database {target}: {driver_message(exc)}") from exc
        else:
            try:
                import sqlalchemy
            except ImportError as exc:
                raise ImportError(f"{target}: a {self.dialect} database needs SQLAlchemy: {SQL_EXTRA_HINT}") from exc
            try:
                self._engine = sqlalchemy.create_engine(target.url)
                connection = self._engine.connect()
            except ImportError as exc:  # the dialect's driver (psycopg...) is missing
                raise ImportError(f"{target}: the database driver is missing ({exc}): {SQL_EXTRA_HINT}") from exc
            except sqlalchemy.exc.SQLAlchemyError as exc:
                if self._engine is not None:
                    self._engine.dispose()
                raise SqlConnectionError(f"cannot connect to {target}: {driver_message(exc)}") from exc
            if read_only and self.dialect == "postgresql":
                connection = connection.execution_options(postgresql_readonly=True)
            self._sqlalchemy = connection

    def execute(self, sql: str, params: Optional[Mapping[str, Any]] = None) -> list[dict[str, Any]]:
        """Runs one statement with named parameters; the rows it returns, as dicts ([] if none)."""
        if self._sqlite is not None:
            cursor = self._sqlite.execute(sql, dict(params or {}))
            if cursor.description is None:
                return []
            names = [column[0] for column in cursor.description]
            return [dict(zip(names, row)) for row in cursor.fetchall()]
        result = self._run_sqlalchemy(sql, dict(params or {}))
        if not result.returns_rows:
            return []
        return [dict(row) for row in result.mappings()]

    def executemany(self, sql: str, rows: Sequence[Mapping[str, Any]]) -> None:
        """Runs one statement once per parameter dict (an INSERT of many rows)."""
        if not rows:
            return
        if self._sqlite is not None:
            self._sqlite.executemany(sql, [dict(row) for row in rows])
        else:
            self._run_sqlalchemy(sql, [dict(row) for row in rows])

    def iterate(
        self, sql: str, params: Optional[Mapping[str, Any]] = None, batch_rows: int = 1024
    ) -> Generator[list[dict[str, Any]], None, None]:
        """The rows of a query, ``batch_rows`` at a time, without holding them all (server-side
        cursors where the driver has them).

        Raises:
            SqlQueryError: the statement returns no rows (it is not a query).
        """
        if self._sqlite is not None:
            cursor = self._sqlite.execute(sql, dict(params or {}))
            if cursor.description is None:
                raise self._not_a_query(sql)
            names = [column[0] for column in cursor.description]
            while True:
                rows = cursor.fetchmany(batch_rows)
                if not rows:
                    return
                yield [dict(zip(names, row)) for row in rows]
        import sqlalchemy

        result = self._sqlalchemy.execution_options(stream_results=True, max_row_buffer=batch_rows).execute(
            sqlalchemy.text(sql), dict(params or {})
        )
        if not result.returns_rows:
            raise self._not_a_query(sql)
        for partition in result.mappings().partitions(batch_rows):
            yield [dict(row) for row in partition]

    @contextlib.contextmanager
    def transaction(self) -> Iterator[SqlConnection]:
        """``with connection.transaction():`` commits at the end, rolls back on an exception."""
        assert not self._in_transaction, "transactions do not nest"
        self._in_transaction = True
        try:
            if self._sqlite is not None:
                self._sqlite.execute("BEGIN IMMEDIATE")  # take the write lock now, not mid-way
                try:
                    yield self
                except BaseException:
                    self._sqlite.execute("ROLLBACK")
                    raise
                self._sqlite.execute("COMMIT")
            else:
                with self._sqlalchemy.begin():
                    yield self
        finally:
            self._in_transaction = False

    @property
    def errors(self) -> tuple[type[BaseException], ...]:
        """The exception types the driver raises for a failed statement (to re-raise them as
        :class:`SqlQueryError`): ``sqlite3.Error``, or SQLAlchemy's ``SQLAlchemyError``."""
        if self._sqlite is not None:
            import sqlite3

            return (sqlite3.Error,)
        import sqlalchemy

        return (sqlalchemy.exc.SQLAlchemyError,)

    def quote(self, identifier: str) -> str:
        """``identifier`` quoted for this dialect (a table or column name from the user)."""
        if self._sqlalchemy is not None:
            return str(self._engine.dialect.identifier_preparer.quote_identifier(identifier))
        return '"' + identifier.replace('"', '""') + '"'

    def close(self) -> None:
        if self._sqlite is not None:
            self._sqlite.close()
            self._sqlite = None
        if self._sqlalchemy is not None:
            self._sqlalchemy.close()
            self._engine.dispose()
            self._sqlalchemy = None

    def __enter__(self) -> SqlConnection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _not_a_query(self, sql: str) -> SqlQueryError:
        return SqlQueryError(f"the statement {short_query(sql)!r} on {self.target} returns no rows: it is not a query")

    def _run_sqlalchemy(self, sql: str, params: Any) -> Any:
        import sqlalchemy

        if self._in_transaction:
            return self._sqlalchemy.execute(sqlalchemy.text(sql), params)
        with self._sqlalchemy.begin():  # autocommit outside transaction()
            return self._sqlalchemy.execute(sqlalchemy.text(sql), params)


def connect(target: SqlTarget, read_only: bool = False) -> SqlConnection:
    """Opens a :class:`SqlConnection` (in the calling process); see its ``read_only``."""
    return SqlConnection(target, read_only=read_only)
