"""``write_sql(resume=True)``'s bookkeeping table: which tasks are in the table, committed with their rows.

One table per database, ``_streamproc_tasks``, one row per committed task of a resumable write::

    target_table TEXT, task_key BIGINT, row_count BIGINT, run_fingerprint TEXT,
    PRIMARY KEY (target_table, task_key)

A task's row is inserted in the same transaction as the task's rows (:mod:`.sql_writer`), so
the two commit together or not at all: that is the exactly-once claim. The primary key makes a
second commit of one task fail instead of duplicating its rows. ``run_fingerprint`` is JSON
text of the input's fingerprint (:meth:`~streamproc.io.base.Source.fingerprint`) and the task
layout (``task_size``, ``world_size``); a resumed run with another one is refused
(:func:`check_resumable`). Rows of a target are deleted when its table is dropped or written
again without ``resume`` (they would describe rows that are gone). Main process, except
:func:`record_task`, which runs where the task's rows are written.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from ..errors import ResumeMismatchError
from .sql_connection import SqlConnection, SqlTarget
from .sql_schema import table_exists

if TYPE_CHECKING:
    from ..plan import Plan

BOOKKEEPING_TABLE = "_streamproc_tasks"


def run_fingerprint(plan: Plan) -> str:
    """What a resumed run must share with the run that committed the tasks, as JSON text (main process)."""
    selection = plan.task_selection
    layout = {"task_size": plan.task_size, "world_size": selection.world_size if selection is not None else 1}
    return json.dumps({"input": plan.source.fingerprint(), "layout": layout}, sort_keys=True, default=str)


def ensure_bookkeeping(connection: SqlConnection) -> None:
    q = connection.quote
    connection.execute(
        f"CREATE TABLE IF NOT EXISTS {q(BOOKKEEPING_TABLE)} (target_table TEXT NOT NULL, task_key BIGINT NOT NULL, "
        f"row_count BIGINT NOT NULL, run_fingerprint TEXT NOT NULL, PRIMARY KEY (target_table, task_key))"
    )


def committed_tasks(connection: SqlConnection, table: str) -> dict[int, tuple[int, str]]:
    """``{task key: (rows, run fingerprint)}`` of the tasks committed into ``table`` ({} without bookkeeping)."""
    if not table_exists(connection, BOOKKEEPING_TABLE):
        return {}
    rows = connection.execute(
        f"SELECT task_key, row_count, run_fingerprint FROM {connection.quote(BOOKKEEPING_TABLE)} "
        "WHERE target_table = :table",
        {"table": table},
    )
    return {int(row["task_key"]): (int(row["row_count"]), str(row["run_fingerprint"])) for row in rows}


def forget_tasks(connection: SqlConnection, table: str) -> None:
    """Deletes the bookkeeping rows of ``table``, if the bookkeeping table exists."""
    if table_exists(connection, BOOKKEEPING_TABLE):
        connection.execute(f"DELETE FROM {connection.quote(BOOKKEEPING_TABLE)} WHERE target_table = :table", {"table": table})


def record_task(connection: SqlConnection, table: str, task_key: int, rows: int, fingerprint: str) -> None:
    """Records task ``task_key`` as committed (inside the transaction of its rows)."""
    connection.execute(
        f"INSERT INTO {connection.quote(BOOKKEEPING_TABLE)} (target_table, task_key, row_count, run_fingerprint) "
        "VALUES (:table, :key, :rows, :fingerprint)",
        {"table": table, "key": task_key, "rows": rows, "fingerprint": fingerprint},
    )


def check_resumable(committed: dict[int, tuple[int, str]], fingerprint: str, target: SqlTarget, table: str) -> None:
    """Raises ``ResumeMismatchError`` saying what changed when a committed task was written by another run.

    The layout is always compared; the input only when both runs' sources could describe it
    (an in-memory source has no fingerprint: taken to be the same stream, as in ``write_parquet``).
    """
    now = json.loads(fingerprint)
    for before_text in sorted({text for _, text in committed.values()}):
        before: dict[str, Any] = json.loads(before_text)
        changes = [
            f"{key} was {before.get('layout', {}).get(key)!r}, it is {value!r}"
            for key, value in now["layout"].items()
            if before.get("layout", {}).get(key) != value
        ]
        where = f"table {table!r} of {target}"
        if changes:
            raise ResumeMismatchError(
                f"write_sql(resume=True): the task layout of {where} differs: {'; '.join(changes)}. Resume with the "
                "same settings, or write again with if_exists='replace'"
            )
        if before.get("input") is not None and now["input"] is not None and before["input"] != now["input"]:
            raise ResumeMismatchError(
                f"write_sql(resume=True): the input changed since {where} was written: it was "
                f"{json.dumps(before['input'])[:300]}, it is {json.dumps(now['input'])[:300]}. Resume over the same "
                "input, or write again with if_exists='replace'"
            )
