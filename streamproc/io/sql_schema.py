"""``write_sql``'s columns: record values as SQL parameters, column types, and the table's columns.

Values (:class:`SqlRowFinalizer`, run where each task runs: a CPU worker or the main process):

=====================================  ==================================  =====================
record value                           written as                          column created as
=====================================  ==================================  =====================
``int``                                itself                              BIGINT (SQLite INTEGER)
``float``                              itself                              DOUBLE PRECISION (REAL)
``str``                                itself                              TEXT
``bool``                               itself                              BOOLEAN (SQLite: 0/1)
``bytes``, ``bytearray``, memoryview   ``bytes``                           BYTEA (SQLite BLOB)
``datetime``, ``date``                 itself (SQLite: ISO 8601 text)      TIMESTAMP [WITH TIME ZONE], DATE (SQLite TEXT)
numpy scalar, 0-d array or tensor      its Python value (``.item()``)      as that value
list, tuple, dict, numpy array, tensor JSON text (``json.dumps``)          TEXT
``None``                               NULL                                TEXT if no record of the creating task has a value
=====================================  ==================================  =====================

Anything else (``Decimal``, a custom object) is refused with a :class:`~streamproc.SchemaError`
naming the column and its type: convert it in a ``map``. Arrays become JSON text rather than a
database array type so that one table reads the same on SQLite and PostgreSQL
(``json.loads`` gives the list back).

Types: the table is created from the rows of the first task that commits (see
:mod:`.sql_writer`), each column taking the kind of its values (ints and floats together:
floats); a column that is None in all of them becomes TEXT, with a logged warning. ``schema``
fixes the types instead: a dict ``{column: "SQL type"}`` (used as written) or a
``pyarrow.Schema`` (mapped as in the table above). Before inserting, every row is checked
against the table's declared types (:func:`check_rows`), so that a str bound for an INTEGER
column fails the same way on SQLite (which would store it) as on PostgreSQL.
"""

from __future__ import annotations

import datetime
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Optional

from ..errors import SchemaError
from .sql_connection import SqlConnection

logger = logging.getLogger("streamproc")

#: The kinds of value a column holds (what a converted value is), and each kind's SQL type.
_POSTGRES_TYPES = {
    "int": "BIGINT", "float": "DOUBLE PRECISION", "text": "TEXT", "bool": "BOOLEAN", "bytes": "BYTEA",
    "timestamp": "TIMESTAMP", "timestamptz": "TIMESTAMP WITH TIME ZONE", "date": "DATE", "null": "TEXT",
}
_SQLITE_TYPES = {**_POSTGRES_TYPES, "int": "INTEGER", "float": "REAL", "bytes": "BLOB", "null": "TEXT"}
_OTHER_TYPES = {**_POSTGRES_TYPES, "bytes": "BLOB"}

#: Which value kinds a declared SQL type takes, by a word in the type's name (first match wins).
_ACCEPTED_BY_TYPE_WORD: tuple[tuple[tuple[str, ...], frozenset[str]], ...] = (
    (("BOOL",), frozenset({"bool"})),
    (("INT",), frozenset({"int"})),
    (("REAL", "FLOA", "DOUB", "NUMERIC", "DECIMAL"), frozenset({"int", "float"})),
    (("CHAR", "TEXT", "CLOB", "STRING", "JSON"), frozenset({"text"})),
    (("BLOB", "BYTEA", "BINARY"), frozenset({"bytes"})),
    (("TIMESTAMP", "DATE", "TIME"), frozenset({"timestamp", "timestamptz", "date", "text"})),
)


#: Type names that contain one of the words above but are something else (PostgreSQL's INTERVAL, POINT).
_UNCHECKED_TYPE_WORDS = ("INTERVAL", "POINT", "ARRAY", "[]")


def sql_type_of_kind(kind: str, dialect: str) -> str:
    """The SQL type ``write_sql`` creates for values of ``kind`` on ``dialect``."""
    types = _SQLITE_TYPES if dialect == "sqlite" else _POSTGRES_TYPES if dialect == "postgresql" else _OTHER_TYPES
    return types[kind]


def kind_of(value: Any) -> str:
    """The kind of a converted value: ``"int"``, ``"float"``, ``"text"``, ``"bool"``, ``"bytes"``,
    ``"timestamp"``, ``"timestamptz"``, ``"date"`` or ``"null"``.

    >>> [kind_of(v) for v in (None, True, 3, 2.5, "a", b"x")]
    ['null', 'bool', 'int', 'float', 'text', 'bytes']
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "text"
    if isinstance(value, bytes):
        return "bytes"
    if isinstance(value, datetime.datetime):
        return "timestamp" if value.tzinfo is None else "timestamptz"
    if isinstance(value, datetime.date):
        return "date"
    raise AssertionError(f"not a converted value: {type(value).__name__}")


def _json_default(value: Any) -> Any:
    tolist = getattr(value, "tolist", None)  # numpy scalars and arrays, tensors
    if callable(tolist):
        return tolist()
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).hex()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def to_sql_value(value: Any, dialect: str, column: str) -> Any:
    """``value`` as a parameter the driver takes (see the module docstring's table).

    >>> to_sql_value([1, 2], "sqlite", "c"), to_sql_value(b"ab", "sqlite", "c")
    ('[1, 2]', b'ab')

    Raises:
        SchemaError: a type with no SQL equivalent, naming ``column``.
    """
    if value is None or type(value) in (bool, int, float, str):
        return value
    for base in (bool, int, float, str):  # numpy.float64, IntEnum, numpy.str_...: the plain value
        if isinstance(value, base):
            return base(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, (datetime.date, datetime.datetime)):
        return value.isoformat() if dialect == "sqlite" else value
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, default=_json_default)
    shape = getattr(value, "shape", None)
    if shape is not None and callable(getattr(value, "tolist", None)):  # numpy array or scalar, tensor
        if tuple(shape) == ():
            return to_sql_value(value.item(), dialect, column)
        return json.dumps(value.tolist(), default=_json_default)
    item = getattr(value, "item", None)
    if type(value).__module__ == "numpy" and callable(item):  # numpy scalars without shape
        return to_sql_value(item(), dialect, column)
    raise SchemaError(
        f"write_sql: column {column!r} holds a {type(value).__module__}.{type(value).__qualname__} ({value!r:.60}), "
        "which has no SQL type here: convert it in a map (to str, int, float, bytes or a list)"
    )


class SqlRowFinalizer:
    """Picklable ``records -> rows`` run where each task runs: dict records with SQL parameter values.

    >>> SqlRowFinalizer("sqlite")([{"a": 1, "b": (1, 2)}])
    [{'a': 1, 'b': '[1, 2]'}]
    """

    def __init__(self, dialect: str) -> None:
        self.dialect = dialect

    def __call__(self, records: list[Any]) -> list[dict[str, Any]]:
        rows = []
        for record in records:
            if not isinstance(record, Mapping):
                raise SchemaError(
                    f"write_sql writes dict records (one column per key), got a {type(record).__name__}: {record!r:.80}"
                )
            rows.append({str(k): to_sql_value(v, self.dialect, str(k)) for k, v in record.items()})
        return rows


def infer_columns(rows: Sequence[Mapping[str, Any]], dialect: str, table: str, where: str) -> dict[str, str]:
    """``{column: SQL type}`` for a new table from ``rows`` (converted values), columns in order of appearance.

    >>> infer_columns([{"a": 1, "b": None}, {"a": 2.5, "c": "x"}], "sqlite", "t", "task 0")
    {'a': 'REAL', 'b': 'TEXT', 'c': 'TEXT'}

    Raises:
        SchemaError: a column whose values are of incompatible kinds (a str and an int).
    """
    kinds: dict[str, set[str]] = {}
    for row in rows:
        for column, value in row.items():
            kinds.setdefault(column, set()).add(kind_of(value))
    columns: dict[str, str] = {}
    for column, seen in kinds.items():
        seen.discard("null")
        if seen == {"int", "float"}:
            seen = {"float"}
        elif seen == {"timestamp", "date"}:
            seen = {"timestamp"}
        if len(seen) > 1:
            raise SchemaError(
                f"write_sql: column {column!r} of table {table!r} holds values of several types in {where} "
                f"({', '.join(sorted(seen))}): give it one type, or pass schema={{{column!r}: 'TEXT'}}"
            )
        if not seen:
            logger.warning(
                "streamproc: write_sql creates column %r of table %r as TEXT: it is None in every record of %s; "
                "pass schema= to give it another type", column, table, where,
            )
        columns[column] = sql_type_of_kind(seen.pop() if seen else "null", dialect)
    return columns


def _arrow_kind(field: Any) -> str:
    import pyarrow as pa

    t = field.type
    checks = (
        (pa.types.is_boolean, "bool"), (pa.types.is_integer, "int"), (pa.types.is_floating, "float"),
        (lambda x: pa.types.is_string(x) or pa.types.is_large_string(x), "text"),
        (lambda x: pa.types.is_binary(x) or pa.types.is_large_binary(x) or pa.types.is_fixed_size_binary(x), "bytes"),
        (pa.types.is_date, "date"), (pa.types.is_null, "null"),
        (lambda x: pa.types.is_list(x) or pa.types.is_large_list(x) or pa.types.is_fixed_size_list(x)
         or pa.types.is_struct(x) or pa.types.is_map(x), "text"),
    )
    if pa.types.is_timestamp(t):
        return "timestamp" if t.tz is None else "timestamptz"
    for check, kind in checks:
        if check(t):
            return kind
    raise SchemaError(f"write_sql: schema field {field.name!r} has type {t}, which has no SQL type here: give schema as a dict")


def schema_columns(schema: Any, dialect: str) -> Optional[dict[str, str]]:
    """``{column: SQL type}`` from ``write_sql``'s ``schema`` (main process); None when not given.

    Raises:
        TypeError: ``schema`` is neither a dict of type strings nor a ``pyarrow.Schema``.
        ValueError: an empty schema, or a column or type that is not a non-empty string.
    """
    if schema is None:
        return None
    if isinstance(schema, Mapping):
        columns = dict(schema)
        for column, sql_type in columns.items():
            if not isinstance(column, str) or not column or not isinstance(sql_type, str) or not sql_type.strip():
                raise ValueError(f"write_sql: schema maps column names to SQL type strings, got {column!r}: {sql_type!r}")
    else:
        import pyarrow as pa

        if not isinstance(schema, pa.Schema):
            raise TypeError(
                f"write_sql: schema must be a dict {{column: 'SQL type'}} or a pyarrow.Schema, got {type(schema).__name__}"
            )
        columns = {field.name: sql_type_of_kind(_arrow_kind(field), dialect) for field in schema}
    if not columns:
        raise ValueError("write_sql: schema has no column")
    return columns


def accepted_kinds(declared: str) -> Optional[frozenset[str]]:
    """The value kinds a column declared ``declared`` takes; None: not checked (the database decides).

    >>> sorted(accepted_kinds("DOUBLE PRECISION")), accepted_kinds("geometry") is None
    (['float', 'int'], True)
    """
    upper = declared.upper()
    if any(word in upper for word in _UNCHECKED_TYPE_WORDS):
        return None
    for words, kinds in _ACCEPTED_BY_TYPE_WORD:
        if any(word in upper for word in words):
            return kinds
    return None


def check_rows(rows: Sequence[Mapping[str, Any]], columns: Mapping[str, str], table: str, where: str) -> None:
    """Raises a clear :class:`~streamproc.SchemaError` for a row that ``table`` (``columns``) cannot take.

    Raises:
        SchemaError: a column the table lacks, or a value of a kind its column's type refuses.
    """
    accepted = {column: accepted_kinds(declared) for column, declared in columns.items()}
    for row in rows:
        for column, value in row.items():
            if column not in accepted:
                raise SchemaError(
                    f"write_sql: the records of {where} have a column {column!r} that table {table!r} lacks "
                    f"(it has {', '.join(map(repr, columns))}): drop it in a map, or write with if_exists='replace'"
                )
            kinds = accepted[column]
            if value is None or kinds is None:
                continue
            kind = kind_of(value)
            if kind not in kinds:
                raise SchemaError(
                    f"write_sql: column {column!r} of table {table!r} is {columns[column]}, but {where} has a "
                    f"{kind} value for it ({value!r:.60}): convert it in a map, or pass schema= / if_exists='replace'"
                )


def table_columns(connection: SqlConnection, table: str) -> dict[str, str]:
    """``{column: declared type}`` of ``table`` in table order; ``{}`` when there is no such table.

    PostgreSQL (and other SQLAlchemy databases): the table of that name in the connection's
    ``current_schema()`` (the first schema of its ``search_path``), as ``table_exists`` sees it.
    """
    if connection.dialect == "sqlite":
        rows = connection.execute("SELECT name, type FROM pragma_table_info(:table)", {"table": table})
        return {str(row["name"]): str(row["type"] or "") for row in rows}
    rows = connection.execute(
        "SELECT column_name, data_type FROM information_schema.columns "
        "WHERE table_name = :table AND table_schema = current_schema() ORDER BY ordinal_position",
        {"table": table},
    )
    return {str(row["column_name"]): str(row["data_type"]) for row in rows}


def table_exists(connection: SqlConnection, table: str) -> bool:
    """Whether ``table`` exists, as :func:`table_columns` sees it (usable inside a transaction or not).

    Not ``SqlConnection.table_exists``: on SQLAlchemy its inspector query auto-begins a
    transaction that it leaves open, and the connection's next statement then fails.
    """
    return bool(table_columns(connection, table))


def create_table_sql(connection: SqlConnection, table: str, columns: Mapping[str, str]) -> str:
    """``CREATE TABLE IF NOT EXISTS`` of ``table`` with ``columns`` (identifiers quoted)."""
    body = ", ".join(f"{connection.quote(name)} {sql_type}" for name, sql_type in columns.items())
    return f"CREATE TABLE IF NOT EXISTS {connection.quote(table)} ({body})"
