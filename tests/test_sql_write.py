"""Stream.write_sql over a real database (``sql_url``: a SQLite file; PostgreSQL too in ``tox -e sql``).

Row order in a table is not meaningful (see ``streamproc/io/sql_sink.py``): tables are compared
ordered by the records' own key ``x``. Every backend's table is compared with the simple
backend's table in the same database, so that both went through the same driver's types.
Resume is checked for exactly-once after an error, after a killed CPU worker, and after a
SIGKILL of a job's whole process tree (``tests/resume_job.py``'s stream, in its own session).
"""

from __future__ import annotations

import datetime
import decimal
import doctest
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import streamproc as sp
import streamproc.io.sql_bookkeeping as sql_bookkeeping
import streamproc.io.sql_connection as sql_connection
import streamproc.io.sql_schema as sql_schema
import streamproc.io.sql_sink as sql_sink
import streamproc.io.sql_writer as sql_writer
from streamproc.io.sql_bookkeeping import BOOKKEEPING_TABLE
from streamproc.io.sql_connection import connect, sql_target
from streamproc.io.sql_errors import SqlWriteError
from streamproc.io.sql_schema import table_columns
from tests import sql_databases
from tests.hang_guard import run_guarded
from tests.resume_job import N as JOB_RECORDS
from tests.sql_databases import POSTGRES_CONFIGURED
from tests.utils import config_id, wait_for_condition

#: The ``sql_url`` fixture (a fresh database per test; see tests/sql_databases.py).
sql_url = sql_databases.sql_url
postgres_sql_url = sql_databases.postgres_sql_url

GUARD_S = 120
N = 60
TASK_SIZE = 7  # 9 tasks, the last one short
EXTRA_CONFIGS = [
    {"backend": "multiprocessing", "num_cpu_workers": 3, "deterministic": False},
    # Retries: the workers do not write; their outputs come to the main process, which does.
    {"backend": "multiprocessing", "num_cpu_workers": 2, "max_task_retries": 1},
]
REPO = Path(__file__).resolve().parent.parent
JOB_TIMEOUT_S = 120


def record(i: int) -> dict[str, Any]:
    return {"x": i, "half": i / 2, "text": "t" * (i % 4), "even": i % 2 == 0, "vector": np.arange(3) * i}


def records(n: int = N) -> list[dict[str, Any]]:
    return [record(i) for i in range(n)]


def keep_not_multiple_of_5(r: dict[str, Any]) -> bool:
    return r["x"] % 5 != 0


def with_missing(r: dict[str, Any]) -> dict[str, Any]:
    return {**r, "maybe": None if r["x"] % 3 else r["x"] * 10}


class RaisesAt:
    """A map that raises ``ValueError`` at record ``x == at`` (or kills its worker process)."""

    def __init__(self, at: int, kill: bool = False) -> None:
        self.at = at
        self.kill = kill

    def __call__(self, r: dict[str, Any]) -> dict[str, Any]:
        if r["x"] == self.at:
            if self.kill:
                os.kill(os.getpid(), signal.SIGKILL)
            raise ValueError(f"record {self.at}")
        return r


def stream_of(items: list[Any], **options: Any) -> sp.Stream:
    return sp.from_iterable(items).set_processing(task_size=TASK_SIZE, **options)


def write(stream: sp.Stream, url: str, table: str = "t", **kwargs: Any) -> int:
    rows: int = run_guarded(lambda: stream.write_sql(url, table, **kwargs), GUARD_S, "write_sql")
    return rows


def rows_of(url: str, table: str = "t", order_by: str = "x") -> list[dict[str, Any]]:
    """The rows of ``table`` ordered by ``order_by`` ([] when there is no such table)."""
    with connect(sql_target(url)) as connection:
        if not table_columns(connection, table):
            return []
        return connection.execute(f"SELECT * FROM {connection.quote(table)} ORDER BY {connection.quote(order_by)}")


def columns_of(url: str, table: str = "t") -> dict[str, str]:
    with connect(sql_target(url)) as connection:
        return {name: sql_type.upper() for name, sql_type in table_columns(connection, table).items()}


def committed(url: str, table: str = "t") -> dict[int, int]:
    """``{task key: rows}`` of the bookkeeping table ({} before it exists)."""
    with connect(sql_target(url)) as connection:
        if not table_columns(connection, BOOKKEEPING_TABLE):
            return {}
        rows = connection.execute(
            f"SELECT task_key, row_count FROM {BOOKKEEPING_TABLE} WHERE target_table = :t", {"t": table}
        )
    return {int(r["task_key"]): int(r["row_count"]) for r in rows}


# -- pure functions --------------------------------------------------------------------------------


@pytest.mark.parametrize("module", [sql_schema, sql_writer, sql_sink, sql_bookkeeping], ids=lambda m: m.__name__)
def test_module_doctests(module):
    result = doctest.testmod(module)
    assert result.failed == 0


def test_declared_types_and_the_values_they_take():
    declared_types = ("BIGINT", "integer", "BOOLEAN", "REAL", "numeric(10,2)", "character varying", "BYTEA",
                      "timestamp with time zone", "interval", "uuid", "")
    accepted = {declared: sql_schema.accepted_kinds(declared) for declared in declared_types}
    assert accepted["BIGINT"] == accepted["integer"] == {"int"}
    assert accepted["BOOLEAN"] == {"bool"} and accepted["REAL"] == accepted["numeric(10,2)"] == {"int", "float"}
    assert accepted["character varying"] == {"text"} and accepted["BYTEA"] == {"bytes"}
    assert "timestamptz" in accepted["timestamp with time zone"]
    assert accepted["interval"] is accepted["uuid"] is accepted[""] is None  # the database decides


def test_created_types_widen_ints_to_floats_and_refuse_mixed_kinds():
    rows = [{"a": 1, "b": True}, {"a": 2.5, "b": None}]
    assert sql_schema.infer_columns(rows, "postgresql", "t", "task 0") == {"a": "DOUBLE PRECISION", "b": "BOOLEAN"}
    with pytest.raises(sp.SchemaError, match="column 'a' of table 't' holds values of several types in task 4"):
        sql_schema.infer_columns([{"a": 1}, {"a": b"x"}], "sqlite", "t", "task 4")


# -- every backend writes the simple backend's table -------------------------------------------------


def _check_same_as_simple(url: str, config: dict[str, Any]) -> None:
    stream = sp.from_iterable(records()).filter(keep_not_multiple_of_5).map(with_missing)
    expected_rows = write(stream.set_processing(task_size=TASK_SIZE, backend="simple"), url, "reference")
    rows = write(stream.set_processing(task_size=TASK_SIZE, **config), url, "t")
    assert rows == expected_rows == N - N // 5
    assert rows_of(url, "t") == rows_of(url, "reference")
    assert columns_of(url, "t") == columns_of(url, "reference")


def test_every_backend_writes_the_simple_backends_table(sql_url, backend_options):
    _check_same_as_simple(sql_url, backend_options)


@pytest.mark.parametrize("config", EXTRA_CONFIGS, ids=config_id)
def test_workers_out_of_order_and_retrying_runs_write_the_same_table(sql_url, config):
    _check_same_as_simple(sql_url, config)


def fails_on_multiples_of_9(r: dict[str, Any]) -> dict[str, Any]:
    if r["x"] % 9 == 0:
        raise ValueError(f"record {r['x']}")
    return r


def prepare_halves(batch: list[dict[str, Any]]) -> Any:
    import torch

    return torch.tensor([[r["half"], r["x"]] for r in batch], dtype=torch.float64)


def scale(batch: Any) -> Any:
    return batch * 3


def embedding_rows(batch: list[dict[str, Any]], outputs: Any) -> list[dict[str, Any]]:
    return [{"x": r["x"], "embedding": row, "norm": row.sum()} for r, row in zip(batch, outputs)]


@pytest.mark.parametrize(
    "config",
    [{"backend": "multiprocessing", "num_cpu_workers": 2, "num_gpu_workers": 1, "gpu_worker_devices": ["cpu"]},
     {"backend": "threads", "num_cpu_workers": 2, "num_gpu_workers": 1, "gpu_worker_devices": ["cpu"]}],
    ids=["multiprocessing", "threads"],
)
def test_a_map_gpu_stage_writes_the_simple_backends_table(sql_url, config):
    stream = sp.from_iterable(records()).map_gpu(prepare_halves, scale, embedding_rows, batch_size=4)
    write(stream.set_processing(task_size=TASK_SIZE, backend="simple"), sql_url, "reference", resume=True)
    assert write(stream.set_processing(task_size=TASK_SIZE, **config), sql_url, "t", resume=True) == N
    rows = rows_of(sql_url, "t")
    assert rows == rows_of(sql_url, "reference")
    assert json.loads(rows[4]["embedding"]) == [6.0, 12.0] and rows[4]["norm"] == 18.0


@pytest.mark.filterwarnings("ignore::streamproc.RecordsSkippedWarning")
def test_records_skipped_by_on_error_are_not_written(sql_url):
    stream = sp.from_iterable(records()).map(fails_on_multiples_of_9)
    for table, config in [("reference", {"backend": "simple"}), ("t", {"backend": "multiprocessing", "num_cpu_workers": 2})]:
        written = write(stream.set_processing(task_size=TASK_SIZE, on_error="skip", **config), sql_url, table, resume=True)
        assert written == N - len(range(0, N, 9))
    assert rows_of(sql_url, "t") == rows_of(sql_url, "reference")
    assert [r["x"] for r in rows_of(sql_url)] == [x for x in range(N) if x % 9]


def test_values_and_created_types(sql_url, caplog):
    dialect = sql_target(sql_url).dialect
    items = [
        {"x": i, "f": np.float32(0.5), "n": np.int64(i), "b": np.bool_(i % 2), "raw": b"\x00\x01", "nested": {"k": [i]},
         "empty": None, "when": datetime.date(2024, 1, 2)}
        for i in range(3)
    ]
    with caplog.at_level(logging.WARNING, logger="streamproc"):
        assert write(stream_of(items), sql_url) == 3
    assert "column 'empty' of table 't' as TEXT" in caplog.text
    rows = rows_of(sql_url)
    assert [r["n"] for r in rows] == [0, 1, 2]
    assert [bool(r["b"]) for r in rows] == [False, True, False]
    assert rows[1]["f"] == 0.5 and bytes(rows[1]["raw"]) == b"\x00\x01" and rows[1]["empty"] is None
    assert json.loads(rows[2]["nested"]) == {"k": [2]}
    assert str(rows[0]["when"]) == "2024-01-02"
    types = columns_of(sql_url)
    if dialect == "sqlite":
        assert types == {"x": "INTEGER", "f": "REAL", "n": "INTEGER", "b": "BOOLEAN", "raw": "BLOB", "nested": "TEXT",
                         "empty": "TEXT", "when": "TEXT"}
    else:
        assert types == {"x": "BIGINT", "f": "DOUBLE PRECISION", "n": "BIGINT", "b": "BOOLEAN", "raw": "BYTEA",
                         "nested": "TEXT", "empty": "TEXT", "when": "DATE"}


def test_arrays_round_trip_as_json_text(sql_url):
    write(stream_of(records(5)), sql_url)
    assert [json.loads(r["vector"]) for r in rows_of(sql_url)] == [[0, i, 2 * i] for i in range(5)]


# -- if_exists and schema ---------------------------------------------------------------------------------


def test_if_exists_fail_append_replace(sql_url):
    assert write(stream_of(records(10)), sql_url) == 10
    with pytest.raises(ValueError, match=r"table 't' already exists.*if_exists='append'"):
        write(stream_of(records(10)), sql_url)
    assert write(stream_of(records(10)), sql_url, if_exists="append") == 10
    assert [r["x"] for r in rows_of(sql_url)] == sorted(list(range(10)) * 2)
    with pytest.raises(sp.SchemaError, match="column 'extra' that table 't' lacks"):
        write(stream_of([{"x": 1, "extra": 2}]), sql_url, if_exists="append")
    assert len(rows_of(sql_url)) == 20  # the failed task wrote nothing
    assert write(stream_of([{"x": 1, "extra": "e"}]), sql_url, if_exists="replace") == 1
    assert rows_of(sql_url) == [{"x": 1, "extra": "e"}]


def test_a_dict_schema_creates_the_table_before_the_run(sql_url):
    schema = {"x": "BIGINT", "label": "VARCHAR(20)", "score": "DOUBLE PRECISION"}
    assert write(stream_of([]), sql_url, schema=schema) == 0
    assert list(columns_of(sql_url)) == ["x", "label", "score"]
    assert write(stream_of([{"x": 1, "score": 2}]), sql_url, schema=schema, if_exists="append") == 1
    assert rows_of(sql_url) == [{"x": 1, "label": None, "score": 2.0}]
    with pytest.raises(sp.SchemaError, match="schema names column 'other', which table 't'"):
        write(stream_of([]), sql_url, schema={"other": "TEXT"}, if_exists="append")


def test_a_pyarrow_schema_maps_to_sql_types(sql_url):
    schema = pa.schema([("x", pa.int32()), ("v", pa.float64()), ("s", pa.string()), ("ok", pa.bool_()),
                        ("tags", pa.list_(pa.string()))])
    write(stream_of([{"x": 1, "v": 1.5, "s": "a", "ok": True, "tags": ["p", "q"]}]), sql_url, schema=schema)
    types = columns_of(sql_url)
    assert types["s"] == "TEXT" and types["tags"] == "TEXT" and types["ok"] == "BOOLEAN"
    assert json.loads(rows_of(sql_url)[0]["tags"]) == ["p", "q"]


def test_an_empty_stream_without_schema_creates_no_table(sql_url):
    assert write(stream_of([]), sql_url) == 0
    assert columns_of(sql_url) == {}


# -- bad input ---------------------------------------------------------------------------------------------


def test_bad_arguments_fail_before_anything_runs(sql_url, tmp_path):
    with pytest.raises(ValueError, match="if_exists must be one of 'fail', 'append', 'replace', got 'merge'"):
        stream_of(records(3)).write_sql(sql_url, "t", if_exists="merge")
    live = sqlite3.connect(tmp_path / "live.db")
    try:
        with pytest.raises(ValueError, match="a live connection"):
            stream_of(records(3)).write_sql(live, "t")
    finally:
        live.close()
    with pytest.raises(ValueError, match="resume=True and if_exists='replace' exclude each other"):
        stream_of(records(3)).write_sql(sql_url, "t", if_exists="replace", resume=True)
    with pytest.raises(ValueError, match="in-memory SQLite database"):
        stream_of(records(3)).write_sql("sqlite:///:memory:", "t")
    with pytest.raises(ValueError, match="where write_sql"):
        stream_of(records(3)).write_sql(sql_url, BOOKKEEPING_TABLE)
    with pytest.raises(TypeError, match="table must be a str"):
        stream_of(records(3)).write_sql(sql_url, 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="if_exists='append'"):
        stream_of(records(3), shard=(0, 2)).write_sql(sql_url, "t")
    with pytest.raises(TypeError, match=r"or a pyarrow\.Schema, got list"):
        stream_of(records(3)).write_sql(sql_url, "t", schema=["x"])
    assert columns_of(sql_url) == {}


@pytest.mark.parametrize("config", [{"backend": "simple"}, {"backend": "multiprocessing", "num_cpu_workers": 2}], ids=config_id)
def test_a_str_into_an_integer_column_names_table_column_and_task(sql_url, config):
    write(stream_of([{"x": 1}]), sql_url)
    items = [{"x": i} for i in range(10)] + [{"x": "eleven"}]
    expected = r"column 'x' of table 't' is (INTEGER|bigint), but task 1( \(items 7 to 10\))? has a text value"
    with pytest.raises(sp.SchemaError, match=expected):
        write(stream_of(items, **config), sql_url, if_exists="append")


if POSTGRES_CONFIGURED:  # SQLite stores any value in a column of a type it does not know; absent, not skipped, elsewhere

    _SIMPLE_AND_TWO_WORKERS = [{"backend": "simple"}, {"backend": "multiprocessing", "num_cpu_workers": 2}]

    @pytest.mark.parametrize("config", _SIMPLE_AND_TWO_WORKERS, ids=config_id)
    def test_a_value_the_database_refuses_is_reraised_naming_table_column_and_task(postgres_sql_url, config):
        # PostgreSQL only: SQLite stores any value in a column of a type it does not know.
        sql_url = postgres_sql_url
        write(stream_of([]), sql_url, schema={"x": "BIGINT", "id": "UUID"})
        expected = r"refused a value of task 0( \(.*\))? for column 'id' of table 't'.*uuid"
        with pytest.raises(sp.SchemaError, match=expected) as info:
            write(stream_of([{"x": 1, "id": "not-a-uuid"}], **config), sql_url, if_exists="append")
        assert info.value.__cause__ is not None


def test_non_dict_records_and_values_without_sql_type_are_refused(sql_url):
    with pytest.raises(sp.SchemaError, match=r"dict records.*got a int"):
        write(stream_of([1, 2]), sql_url)
    with pytest.raises(sp.SchemaError, match=r"column 'd' holds a decimal\.Decimal"):
        write(stream_of([{"d": decimal.Decimal("1.5")}]), sql_url)
    with pytest.raises(sp.SchemaError, match="column 'v' of table 't' holds values of several types in task 0"):
        write(stream_of([{"v": 1}, {"v": "one"}]), sql_url)


def test_a_locked_sqlite_database_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(sql_connection, "SQLITE_LOCK_TIMEOUT_S", 0.2)
    path = tmp_path / "locked.db"
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")  # another program's write transaction, left open
        with pytest.raises(SqlWriteError, match=r"stayed locked for 0\.2 s while writing task 0 into table 't'"):
            write(stream_of(records(3)), str(path))
    finally:
        holder.close()


# -- resume: exactly once ------------------------------------------------------------------------------------


def _check_every_record_once(url: str, n: int = N) -> None:
    assert [r["x"] for r in rows_of(url)] == list(range(n))
    marks = committed(url)
    assert sorted(marks) == list(range(-(-n // TASK_SIZE))) and sum(marks.values()) == n


@pytest.mark.parametrize(
    "config, kill",
    [({"backend": "simple"}, False), ({"backend": "threads", "num_cpu_workers": 2}, False),
     ({"backend": "multiprocessing", "num_cpu_workers": 2}, False),
     ({"backend": "multiprocessing", "num_cpu_workers": 2}, True)],
    ids=["simple", "threads", "multiprocessing", "multiprocessing-killed-worker"],
)
def test_resume_after_a_failed_run_writes_every_record_once(sql_url, config, kill):
    failing = sp.from_iterable(records()).map(RaisesAt(40, kill)).set_processing(task_size=TASK_SIZE, **config)
    with pytest.raises(sp.WorkerCrashedError if kill else ValueError):
        write(failing, sql_url, resume=True)
    marks = committed(sql_url)
    assert 40 // TASK_SIZE not in marks
    assert len(rows_of(sql_url)) == sum(marks.values())  # what is in the table is exactly what was recorded
    written = write(stream_of(records(), **config), sql_url, resume=True, if_exists="append")
    assert written == N
    _check_every_record_once(sql_url)
    assert write(stream_of(records(), **config), sql_url, resume=True) == N  # complete: nothing more
    _check_every_record_once(sql_url)


def test_resume_refuses_a_changed_layout_or_input(sql_url, tmp_path):
    write(stream_of(records()), sql_url, resume=True)
    with pytest.raises(sp.ResumeMismatchError, match="task_size was 7, it is 8"):
        write(sp.from_iterable(records()).set_processing(task_size=8), sql_url, resume=True)
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"x": list(range(20))}), path, row_group_size=5)
    write(sp.read_parquet(path), sql_url, "p", resume=True)
    pq.write_table(pa.table({"x": list(range(30))}), path, row_group_size=5)
    with pytest.raises(sp.ResumeMismatchError, match="the input changed since table 'p'"):
        write(sp.read_parquet(path), sql_url, "p", resume=True)
    assert len(rows_of(sql_url, "p")) == 20


def test_a_write_without_resume_forgets_an_earlier_resumable_run(sql_url):
    write(stream_of(records(10)), sql_url, resume=True)
    assert committed(sql_url)
    with pytest.raises(ValueError, match=r"already exists.*or resume=True: it holds 2 tasks"):
        write(stream_of(records(10)), sql_url)
    assert len(committed(sql_url)) == 2  # a refused write changes nothing
    write(stream_of(records(10)), sql_url, if_exists="replace")
    assert committed(sql_url) == {}
    assert write(stream_of(records(10)), sql_url, resume=True, if_exists="append") == 10
    assert len(rows_of(sql_url)) == 20  # appended once, tracked from now on


# -- resume after a SIGKILL of the job's process tree ----------------------------------------------------

_JOB = (
    "import json, sys\n"
    "from tests.resume_job import build_stream\n"
    "config, gate, flag, url = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]\n"
    "print(build_stream(config, gate, flag).write_sql(url, 't', if_exists='append', resume=True))\n"
)


def _start_job(url: str, config: dict[str, Any], gate: int, flag: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _JOB, json.dumps(config), str(gate), str(flag), url],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )


def _finish(job: subprocess.Popen[str]) -> tuple[int, str]:
    try:
        _, err = job.communicate(timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        _, err = job.communicate()
        pytest.fail(f"deadlock: the job did not end within {JOB_TIMEOUT_S} s: {err[-3000:]}")
    return job.returncode, err


@pytest.mark.parametrize(
    "config, gate, commits",
    [({"backend": "simple"}, 87, 5), ({"backend": "multiprocessing", "num_cpu_workers": 3}, 151, 8),
     ({"backend": "multiprocessing", "num_cpu_workers": 2, "deterministic": False}, 33, 2)],
    ids=["simple", "multiprocessing", "multiprocessing-unordered"],
)
def test_sigkill_of_the_job_then_resume_writes_every_record_once(sql_url, tmp_path, config, gate, commits):
    flag = tmp_path / "gate"
    job = _start_job(sql_url, config, gate, flag)
    try:
        def at_kill_point() -> bool:
            if job.poll() is not None:
                raise AssertionError(f"the job ended before its kill point: {job.communicate()[1][-3000:]}")
            return flag.exists() and len(committed(sql_url)) >= commits

        wait_for_condition(at_kill_point, timeout_s=60, message=f"record {gate} reached, {commits} tasks committed")
    finally:
        try:
            os.killpg(job.pid, signal.SIGKILL)  # the main process and its workers at once, as a power loss
        except ProcessLookupError:
            pass
        _finish(job)
    marks = committed(sql_url)
    assert gate // 10 not in marks and len(marks) >= commits
    xs = [r["x"] for r in rows_of(sql_url)]
    assert len(xs) == len(set(xs)) == sum(marks.values())
    code, err = _finish(_start_job(sql_url, config, -1, flag))
    assert code == 0, err[-3000:]
    rows = rows_of(sql_url)
    assert [r["x"] for r in rows] == list(range(JOB_RECORDS))
    assert rows[13] == {"x": 13, "text": "t" * (13 % 7), "half": 6.5}
    assert sorted(committed(sql_url)) == list(range(JOB_RECORDS // 10))


@pytest.mark.parametrize(
    "config", [{"backend": "simple"}, {"backend": "multiprocessing", "num_cpu_workers": 2}], ids=config_id
)
def test_sigterm_exits_143_keeping_the_committed_tasks_then_resume(sql_url, tmp_path, config):
    flag = tmp_path / "gate"
    job = _start_job(sql_url, config, 95, flag)
    try:
        wait_for_condition(lambda: job.poll() is not None or (flag.exists() and len(committed(sql_url)) >= 3), timeout_s=60)
        os.kill(job.pid, signal.SIGTERM)  # the main process only, as a scheduler's first signal
        code, err = _finish(job)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            _finish(job)
    assert code == 128 + signal.SIGTERM, err[-3000:]
    assert "SIGTERM stopped write_sql('t')" in err and "Traceback" not in err
    marks = committed(sql_url)
    assert 9 not in marks and len(rows_of(sql_url)) == sum(marks.values())
    code, err = _finish(_start_job(sql_url, config, -1, flag))
    assert code == 0, err[-3000:]
    assert [r["x"] for r in rows_of(sql_url)] == list(range(JOB_RECORDS))
