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
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

#: Seconds a sqlite3 statement waits for a lock held by another connection before failing.
SQLITE_LOCK_TIMEOUT_S = 10.0

_SCHEME_RE = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.\-]*)://")
_PASSWORD_RE = re.compile(r"^([^:/]+://[^:@/]*:)[^@/]*@")
SQL_EXTRA_HINT = "pip install 'streamproc[sql]' (SQLAlchemy and psycopg)"


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
    """The :class:`SqlTarget` of ``con``: a path (str or ``os.PathLike``) or a URL string.

    A relative path is made absolute here, in the main process, so that workers open the same
    file whatever their working directory.

    Raises:
        ValueError: ``con`` is a live connection, an engine, or anything else that is not a
            path or URL (a live connection cannot travel to worker processes).
    """
    if isinstance(con, os.PathLike):
        con = os.fspath(con)
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
    """

    def __init__(self, target: SqlTarget) -> None:
        self.target = target
        self.dialect = target.dialect
        self._sqlite: Any = None
        self._sqlalchemy: Any = None
        self._engine: Any = None
        self._in_transaction = False
        path = target.sqlite_path
        if path is not None:
            import sqlite3

            # isolation_level=None: no implicit BEGIN; transaction() issues its own.
            self._sqlite = sqlite3.connect(path, timeout=SQLITE_LOCK_TIMEOUT_S, isolation_level=None)
        else:
            try:
                import sqlalchemy
            except ImportError as exc:
                raise ImportError(f"{target}: a {self.dialect} database needs SQLAlchemy: {SQL_EXTRA_HINT}") from exc
            self._engine = sqlalchemy.create_engine(target.url)
            self._sqlalchemy = self._engine.connect()

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
    ) -> Iterator[list[dict[str, Any]]]:
        """The rows of a query, ``batch_rows`` at a time, without holding them all (server-side
        cursors where the driver has them)."""
        if self._sqlite is not None:
            cursor = self._sqlite.execute(sql, dict(params or {}))
            names = [column[0] for column in cursor.description or ()]
            while True:
                rows = cursor.fetchmany(batch_rows)
                if not rows:
                    return
                yield [dict(zip(names, row)) for row in rows]
        import sqlalchemy

        result = self._sqlalchemy.execution_options(stream_results=True, max_row_buffer=batch_rows).execute(
            sqlalchemy.text(sql), dict(params or {})
        )
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

    def table_exists(self, table: str) -> bool:
        if self._sqlite is not None:
            return bool(self.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = :name", {"name": table}))
        import sqlalchemy

        return bool(sqlalchemy.inspect(self._sqlalchemy).has_table(table))

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

    def _run_sqlalchemy(self, sql: str, params: Any) -> Any:
        import sqlalchemy

        if self._in_transaction:
            return self._sqlalchemy.execute(sqlalchemy.text(sql), params)
        with self._sqlalchemy.begin():  # autocommit outside transaction()
            return self._sqlalchemy.execute(sqlalchemy.text(sql), params)


def connect(target: SqlTarget) -> SqlConnection:
    """Opens a :class:`SqlConnection` (in the calling process)."""
    return SqlConnection(target)
