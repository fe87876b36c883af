"""What ``write_sql`` raises when the database refuses a write, and how a driver's error becomes it.

A driver's exception (``sqlite3.Error``, SQLAlchemy's ``DBAPIError``) says little about where
it happened; :func:`database_error` turns it into an error that names the table, the column
when the message gives it, and the task, with the driver's exception as ``__cause__``:

* a value the column's type refuses (PostgreSQL's "invalid input syntax for type bigint",
  "column ... is of type ... but expression is of type ...") -> :class:`~streamproc.SchemaError`;
* SQLite's "database is locked" after :data:`~.sql_connection.SQLITE_LOCK_TIMEOUT_S` ->
  :class:`SqlWriteError` saying that another connection held the write lock that long;
* anything else -> :class:`SqlWriteError` with the driver's message.

Both are plain exceptions with one message argument, so they pickle from a CPU worker to the
main process as themselves. Runs where the write runs (main process or CPU worker).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Optional

from ..errors import SchemaError, StreamprocError
from . import sql_connection
from .sql_connection import SqlTarget

#: PostgreSQL messages of a value its column's type refuses (psycopg's DataError/ProgrammingError).
_TYPE_MISMATCH_RE = re.compile(
    r"invalid input syntax for type|is of type \w[\w ]* but expression is of type|out of range for type"
    r"|datatype mismatch|invalid input value for",
    re.IGNORECASE,
)
_COLUMN_RE = re.compile(r'column "([^"]+)"', re.IGNORECASE)
#: PostgreSQL's context of a bad parameter value: "unnamed portal parameter $2 = '...'".
_PARAMETER_RE = re.compile(r"parameter \$(\d+)")


class SqlWriteError(StreamprocError):
    """``write_sql`` could not write a task's rows (names the database, table and task); the
    driver's exception is the ``__cause__``."""


def _column_of(exc: BaseException, message: str, parameters: Sequence[str]) -> Optional[str]:
    """The column the database names: in its message, its diagnostics (psycopg's ``diag``), or as
    the ``$k`` parameter of the INSERT, whose columns are ``parameters`` in order."""
    match = _COLUMN_RE.search(message)
    if match:
        return match.group(1)
    diag = getattr(getattr(exc, "orig", exc), "diag", None)
    named = getattr(diag, "column_name", None)
    if named:
        return str(named)
    parameter = _PARAMETER_RE.search(str(getattr(diag, "context", None) or ""))
    if parameter and 0 < int(parameter.group(1)) <= len(parameters):
        return parameters[int(parameter.group(1)) - 1]
    return None


def database_error(
    exc: BaseException, target: SqlTarget, table: str, where: str, parameters: Sequence[str] = ()
) -> Exception:
    """The error to raise for ``exc``, a driver's error while writing ``where`` (``"task 3"``) into
    ``table``; ``parameters``: the columns of the INSERT that was running, in order, if any."""
    message = sql_connection.driver_text(exc) or type(exc).__name__
    column = _column_of(exc, message, parameters)
    if _TYPE_MISMATCH_RE.search(message):
        what = f"column {column!r} of table {table!r}" if column else f"a column of table {table!r}"
        return SchemaError(
            f"write_sql: {target} refused a value of {where} for {what}: {message}. Convert the value in a "
            f"map, or give the table the type it needs (schema=..., or if_exists='replace')"
        )
    if "database is locked" in message or "database table is locked" in message:
        return SqlWriteError(
            f"write_sql: the SQLite database {target} stayed locked for {sql_connection.SQLITE_LOCK_TIMEOUT_S:g} s while "
            f"writing {where} into table {table!r}: another connection (another program, or a transaction "
            f"left open) holds its write lock. Close it and rerun (resume=True skips the tasks committed)"
        )
    return SqlWriteError(f"write_sql: {target} refused {where} for table {table!r}: {type(exc).__name__}: {message}")


def is_database_error(exc: BaseException) -> bool:
    """Whether ``exc`` comes from the database driver (sqlite3, or anything SQLAlchemy raises)."""
    import sqlite3

    if isinstance(exc, sqlite3.Error):
        return True
    module = type(exc).__module__ or ""
    return module.startswith(("sqlalchemy", "psycopg"))
