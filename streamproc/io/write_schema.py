"""The schema of ``write_parquet`` output: records -> Arrow tables, and one schema across tasks.

Runs where tables are made (``records_to_table``: where the task runs, a CPU worker with the
multiprocessing backend) and where parts are written (the other helpers: the main process, or
a CPU worker writing its own parts).

Schemas evolve as tasks come (the rule is a pure function of the schemas seen, in task order):

* a field that is null-typed so far (every value None) takes the first real type seen later;
* a field that first appears in a later task is added at the end (earlier rows hold null);
* a field whose values change type *within one kind* (int then float, list<int> then
  list<float>) keeps the first type and later values are cast when the cast is lossless;
* a change of kind (string then int, bool then int, struct then string) is a
  :class:`~streamproc.SchemaError` naming the field, both types and the task.
"""

from __future__ import annotations

import base64
import itertools
import operator
import reprlib
from typing import Any, Optional

from ..errors import SchemaError


def records_to_table(records: list[Any], schema: Any = None) -> Any:
    """Converts dict records to an Arrow table, naming the field whose values do not fit.

    Runs where the chunk is finalized (a CPU worker with the multiprocessing backend).

    Raises:
        SchemaError: a field holds values of incompatible types, or a record is not a dict.
    """
    import pyarrow as pa

    # Checked before anything else touches a record: ``len(None)`` in the column check
    # below, or ``None.get`` in the slow path, would raise a bare TypeError.
    for position, record in enumerate(records):
        if not isinstance(record, dict):
            raise SchemaError(
                f"write_parquet needs dict records, got {type(record).__name__} {reprlib.repr(record)} "
                f"(record {position} of a chunk of {len(records)}): map records to dicts before writing them"
            )
    # Every field of every record, in order of first appearance: ``Table.from_pylist`` would
    # take the names from the first record only and silently drop a field that a later record
    # of the chunk adds. Usually every record has the first one's fields (same count, none
    # missing), and the columns are built with itemgetter; otherwise with ``get`` over the union.
    columns = None
    if schema is None and records:
        names = list(records[0])
        if sum(map(len, records)) == len(names) * len(records):
            try:
                columns = {name: list(map(operator.itemgetter(name), records)) for name in names}
            except KeyError:
                columns = None
    if columns is None:
        names = schema.names if schema is not None else list(dict.fromkeys(itertools.chain.from_iterable(records)))
        columns = {name: [r.get(name) for r in records] for name in names}
    try:
        return pa.Table.from_pydict(columns, schema=schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError) as exc:
        for name in names:
            values = [r.get(name) for r in records]
            try:
                pa.array(values, type=schema.field(name).type if schema is not None else None)
            except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError) as field_exc:
                raise SchemaError(f"write_parquet: field {name!r} holds values of inconsistent types: {field_exc}") from exc
        raise SchemaError(f"write_parquet: records cannot be converted to Arrow: {exc}") from exc


def type_kind(arrow_type: Any) -> str:
    """Coarse kind of an Arrow type: casts between types of one kind only (int32 -> int64...)."""
    import pyarrow.types as pat

    if pat.is_null(arrow_type):
        return "null"
    if pat.is_boolean(arrow_type):
        return "bool"
    if pat.is_integer(arrow_type) or pat.is_floating(arrow_type) or pat.is_decimal(arrow_type):
        return "number"
    if pat.is_string(arrow_type) or pat.is_large_string(arrow_type):
        return "string"
    if pat.is_binary(arrow_type) or pat.is_large_binary(arrow_type) or pat.is_fixed_size_binary(arrow_type):
        return "binary"
    if pat.is_temporal(arrow_type):
        return "temporal"
    return "nested"  # lists, structs, maps: Arrow's cast checks their children


def _merged_type(name: str, first: Any, later: Any, where: str) -> Any:
    """The type of field ``name`` once ``later`` values come after ``first`` ones."""
    import pyarrow as pa

    if first == later or type_kind(later) == "null":
        return first
    if type_kind(first) == "null":
        return later
    if type_kind(first) != type_kind(later):
        raise SchemaError(
            f"write_parquet: field {name!r} was {first} in earlier records and is {later} in {where}; "
            f"pass schema= to write_parquet to fix it"
        )
    if type_kind(first) == "nested":
        # Nested nulls promote too (list<null> then list<int64>, a struct gaining a field).
        try:
            return pa.unify_schemas([pa.schema([pa.field(name, first)]), pa.schema([pa.field(name, later)])]).field(name).type
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            return first  # the cast in conform_table decides, naming the field
    return first


def unify_schemas(first: Any, later: Any, where: str) -> Any:
    """The schema of rows of ``first`` followed by rows of ``later`` (see the module docstring).

    >>> import pyarrow as pa
    >>> unify_schemas(pa.schema([("a", pa.null())]), pa.schema([("a", pa.int64()), ("b", pa.string())]), "task 1")
    a: int64
    b: string

    Raises:
        SchemaError: a field changes kind (names it, both types and ``where``).
    """
    import pyarrow as pa

    if first is None:
        return later
    if first.equals(later):
        return first
    later_types = {field.name: field.type for field in later}
    fields = [
        pa.field(field.name, _merged_type(field.name, field.type, later_types[field.name], where))
        if field.name in later_types
        else field
        for field in first
    ]
    known = set(first.names)
    fields += [field for field in later if field.name not in known]
    return pa.schema(fields)


def conform_table(table: Any, schema: Any, where: str) -> Any:
    """``table`` with exactly ``schema``'s columns (missing ones null, types cast when lossless).

    Raises:
        SchemaError: a field of ``table`` is not in ``schema`` (a ``schema=`` the user gave) or
            cannot be cast losslessly to its type.
    """
    import pyarrow as pa

    if table.schema.equals(schema):
        return table
    extra = [name for name in table.schema.names if name not in schema.names]
    if extra:
        raise SchemaError(f"write_parquet: field(s) {extra} in {where} are not in the schema {schema.names}")
    columns = []
    for field in schema:
        if field.name not in table.schema.names:
            columns.append(pa.nulls(table.num_rows, field.type))
            continue
        column = table.column(field.name)
        if column.type == field.type:
            columns.append(column)
            continue
        try:
            if type_kind(column.type) not in ("null", type_kind(field.type)):
                # Arrow would cast "5" to 5, 7 to "7" or 2 to True: a change of kind is an
                # error, as it is within one chunk, not a silent conversion.
                raise pa.ArrowTypeError(f"no implicit cast from {column.type} to {field.type}")
            columns.append(column.cast(field.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
            raise SchemaError(
                f"write_parquet: field {field.name!r} was {field.type} in earlier records and is "
                f"{column.type} in {where} ({exc}); pass schema= to write_parquet to fix it"
            ) from exc
    return pa.Table.from_arrays(columns, schema=schema)


def schema_to_text(schema: Any) -> str:
    """An Arrow schema as base64 text (for the manifest)."""
    return base64.b64encode(schema.serialize().to_pybytes()).decode("ascii")


def schema_from_text(text: Optional[str]) -> Any:
    """The inverse of :func:`schema_to_text` (None stays None)."""
    import pyarrow as pa

    if text is None:
        return None
    return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(text)))


class ArrowTableFinalizer:
    """Picklable ``records -> pyarrow.Table`` conversion, run where the chunk is produced."""

    def __init__(self, schema: Any = None) -> None:
        self.schema = schema

    def __call__(self, records: list[Any]) -> Any:
        return records_to_table(records, self.schema)
