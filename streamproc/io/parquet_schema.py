"""One schema for parquet files whose schemas differ: unified in the main process, applied in workers.

:func:`unify_file_schemas` runs in the main process when a run starts (the source lists the
files' footers then): it merges the files' schemas with ``pyarrow.unify_schemas`` and, where
they cannot merge, raises :class:`~streamproc.errors.SchemaError` naming the field, the two
types and the two files. :func:`conform_batch` runs where a task is read (a CPU worker with
the multiprocessing backend): it gives a batch of one file the unified schema, so every record
of the stream has the same fields in the same order.

What merges is what ``pyarrow.unify_schemas(..., promote_options="permissive")`` accepts: a
null-typed column and a typed one, integer widths (int32 and int64), integers and floats (to
float), string and large_string, structs with different fields (the union), lists of those. A
column missing from some files is null in their records. ``promote_options="default"`` would
only merge null-typed columns, refusing int32 vs int64; anything permissive refuses (int vs
string, bool vs int) is refused here too. A value that does not fit the unified type (a uint64
above 2**63 read as int64) raises ``SchemaError`` in the task that reads it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..errors import SchemaError

if TYPE_CHECKING:
    import pyarrow as pa


def _unify(schemas: list[pa.Schema]) -> pa.Schema:
    import pyarrow as pa

    return pa.unify_schemas(schemas, promote_options="permissive")


def unify_file_schemas(file_schemas: Sequence[tuple[str, pa.Schema]]) -> pa.Schema:
    """The schema of the records of all files (main process); every field nullable.

    Fields come in the order of the first file, then the fields that first appear in later
    files, in their order.

    >>> import pyarrow as pa
    >>> unify_file_schemas([("a", pa.schema([("x", pa.int32())])), ("b", pa.schema([("x", pa.int64()), ("y", pa.null())]))])
    x: int64
    y: null

    Args:
        file_schemas: ``(path, schema)`` of every file, in source order (at least one).

    Raises:
        SchemaError: two files give one field types that do not merge; names both files,
            the field and the two types.
    """
    import pyarrow as pa

    first_path, unified = file_schemas[0]
    # For each field, the file that gave it its current type (named when a later file disagrees).
    type_origin = {field.name: first_path for field in unified}
    for path, schema in file_schemas[1:]:
        try:
            merged = _unify([unified, schema])
        except (pa.ArrowTypeError, pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise _incompatibility(unified, type_origin, path, schema, exc) from exc
        for field in schema:
            if field.name not in type_origin or not merged.field(field.name).type.equals(unified.field(field.name).type):
                type_origin[field.name] = path
        unified = merged
    return pa.schema([field.with_nullable(True) for field in unified])


def _incompatibility(
    unified: pa.Schema, type_origin: dict[str, str], path: str, schema: pa.Schema, exc: Exception
) -> SchemaError:
    import pyarrow as pa

    for field in schema:
        if field.name not in type_origin:
            continue
        known = unified.field(field.name)
        try:
            _unify([pa.schema([known]), pa.schema([field])])
        except (pa.ArrowTypeError, pa.ArrowInvalid, pa.ArrowNotImplementedError):
            return SchemaError(
                f"read_parquet: field {field.name!r} is {known.type} in {type_origin[field.name]!r} but {field.type} "
                f"in {path!r}; these types do not unify (read the files separately, or cast one)"
            )
    return SchemaError(f"read_parquet: the schema of {path!r} does not unify with the files before it: {exc}")


def conform_batch(batch: pa.RecordBatch, schema: pa.Schema, where: str) -> pa.RecordBatch:
    """``batch`` with the fields of ``schema``, in its order; missing fields null (where the task runs).

    >>> import pyarrow as pa
    >>> batch = pa.record_batch({"y": pa.array([1], pa.int32())})
    >>> conform_batch(batch, pa.schema([("x", pa.string()), ("y", pa.int64())]), "f.parquet").to_pylist()
    [{'x': None, 'y': 1}]

    Raises:
        SchemaError: a column's values cannot be cast to the unified type (names ``where``,
            the field and both types).
    """
    import pyarrow as pa

    columns = []
    for field in schema:
        index = batch.schema.get_field_index(field.name)
        if index < 0:
            columns.append(pa.nulls(batch.num_rows, field.type))
            continue
        column = batch.column(index)
        if not column.type.equals(field.type):
            try:
                column = column.cast(field.type)
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
                raise SchemaError(
                    f"read_parquet: field {field.name!r} of {where} cannot be read as {field.type} (the files' unified "
                    f"type) from {column.type}: {exc}"
                ) from exc
        columns.append(column)
    return pa.RecordBatch.from_arrays(columns, schema=schema)
