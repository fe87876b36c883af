"""read_sql: every row once and in order on every backend (against simple), tasks of chunk_size
rows, rows fetched in batches (never all at once), locations, resume over an ORDER BY, and bad
input refused early with errors naming the query and the database. SQLite always; PostgreSQL
too in ``tox -e sql`` (the ``sql_url`` fixture)."""

from __future__ import annotations

import datetime
import decimal
import os
import sqlite3
import sys
import uuid
from collections.abc import Iterator
from typing import Any, Optional

import pytest

import streamproc as sp
import streamproc.io.sql_source as sql_source
from streamproc.errors import ResumeMismatchError, StreamprocError
from streamproc.io.sql_connection import SqlConnection, SqlQueryError, connect, sql_target
from streamproc.io.sql_source import SqlRows, has_order_by
from tests import sql_databases
from tests.hang_guard import run_guarded
from tests.parquet_dirs import FailsWhileFileExists, RaisesBelow, doubled, manifest_parts, snapshot
from tests.sql_databases import POSTGRES_CONFIGURED
from tests.utils import (
    BACKEND_CONFIGS,
    MAX_PREFETCHED_TASKS,
    assert_same_as_simple,
    batch_as_record,
    collect_until_error,
    config_id,
    fn_raises,
    is_simple,
)

#: The database fixture (SQLite, and PostgreSQL in tox -e sql), under its name in this module.
sql_url = sql_databases.sql_url
postgres_sql_url = sql_databases.postgres_sql_url

GUARD_S = 120.0
N = 57
QUERY = "SELECT id, text, score FROM docs ORDER BY id"


def guarded(fn: Any, what: str = "a read_sql run") -> Any:
    return run_guarded(fn, timeout_s=GUARD_S, what=what)


def rows(n: int = N) -> list[dict[str, Any]]:
    return [{"id": i, "text": f"doc {i}", "score": i / 4} for i in range(n)]


def make_docs(url: str, n: int = N, table: str = "docs") -> list[dict[str, Any]]:
    """Creates ``table`` (id, text, score) holding ``rows(n)``; returns them."""
    records = rows(n)
    with connect(sql_target(url)) as connection, connection.transaction():
        connection.execute(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, text TEXT, score DOUBLE PRECISION)")
        connection.executemany(f"INSERT INTO {table} (id, text, score) VALUES (:id, :text, :score)", records)
    return records


def count_rows(url: str, table: str = "docs") -> int:
    with connect(sql_target(url)) as connection:
        return int(connection.execute(f"SELECT COUNT(*) AS n FROM {table}")[0]["n"])


# -- what comes out ---------------------------------------------------------------------------


def test_every_row_once_in_order_on_every_backend(sql_url, backend_options):
    expected = make_docs(sql_url)
    stream = sp.read_sql(QUERY, sql_url, chunk_size=10)
    assert guarded(lambda: assert_same_as_simple(stream, **backend_options)) == expected
    mapped = sp.read_sql(QUERY, sql_url, chunk_size=7).map(doubled_score).filter(has_even_id)
    assert guarded(lambda: assert_same_as_simple(mapped, **backend_options)) == [
        {**r, "score": r["score"] * 2} for r in expected if r["id"] % 2 == 0
    ]


def doubled_score(record: dict[str, Any]) -> dict[str, Any]:
    return {**record, "score": record["score"] * 2}


def has_even_id(record: dict[str, Any]) -> bool:
    return bool(record["id"] % 2 == 0)


@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
def test_under_spawn_and_forkserver(sql_url, start_method):
    # The source travels to fresh interpreters: the query, its parameters and the URL, no connection.
    expected = make_docs(sql_url)
    stream = sp.read_sql("SELECT id, text, score FROM docs WHERE id < :n ORDER BY id", sql_url, chunk_size=8, params={"n": 30})
    options = {"backend": "multiprocessing", "num_cpu_workers": 2, "process_start_method": start_method}
    assert guarded(lambda: assert_same_as_simple(stream.map(doubled_score), **options)) == [
        doubled_score(r) for r in expected[:30]
    ]


def test_params_fill_named_placeholders(sql_url):
    expected = make_docs(sql_url)
    stream = sp.read_sql("SELECT id, text, score FROM docs WHERE id >= :low AND text <> :skip ORDER BY id", sql_url,
                         params={"low": 50, "skip": "doc 52"})
    assert guarded(stream.to_list) == [r for r in expected if r["id"] >= 50 and r["id"] != 52]


def test_an_empty_result_has_no_records(sql_url, backend_options):
    make_docs(sql_url)
    stream = sp.read_sql("SELECT * FROM docs WHERE id < 0", sql_url)
    assert guarded(lambda: assert_same_as_simple(stream, **backend_options)) == []


@pytest.mark.parametrize("chunk_size, task_size, expected_sizes", [(10, None, [10] * 5 + [7]), (None, 16, [16] * 3 + [9]),
                                                                   (None, None, [N]), (1, None, [1] * N), (100, None, [N])])
def test_tasks_hold_chunk_size_rows(sql_url, chunk_size, task_size, expected_sizes):
    make_docs(sql_url)
    stream = sp.read_sql(QUERY, sql_url, chunk_size=chunk_size)
    if task_size is not None:
        stream = stream.set_processing(task_size=task_size)
    # Batches never span tasks: one batch of 1,000 records per task shows the task boundaries.
    batches = guarded(stream.map_batches(batch_as_record, batch_size=1000).set_processing(backend="multiprocessing",
                                                                                          num_cpu_workers=2).to_list)
    assert [len(batch) for batch in batches] == expected_sizes
    assert [r["id"] for batch in batches for r in batch] == list(range(N))
    payloads = list(stream.source.iter_tasks(chunk_size or task_size or 1024))
    assert [p.start for p in payloads] == [sum(expected_sizes[:k]) for k in range(len(expected_sizes))]


def test_a_later_task_size_wins_over_chunk_size(sql_url):
    make_docs(sql_url)
    stream = sp.read_sql(QUERY, sql_url, chunk_size=10).set_processing(task_size=25)
    batches = guarded(stream.map_batches(batch_as_record, batch_size=1000).to_list)
    assert [len(batch) for batch in batches] == [25, 25, 7]


def test_sqlite_values_come_as_the_driver_gives_them(tmp_path):
    path = tmp_path / "types.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE t (i INTEGER, f REAL, s TEXT, b BLOB, n INTEGER)")
        db.execute("INSERT INTO t VALUES (?, ?, ?, ?, ?)", (1, 2.5, "é", b"\x00\x01", None))
    db.close()
    assert guarded(sp.read_sql("SELECT * FROM t", path).to_list) == [{"i": 1, "f": 2.5, "s": "é", "b": b"\x00\x01", "n": None}]


if POSTGRES_CONFIGURED:  # PostgreSQL's own types (the SQLite case is the test above); absent, not skipped, elsewhere

    def test_postgresql_values_come_as_the_driver_gives_them(postgres_sql_url):
        sql_url = postgres_sql_url
        with connect(sql_target(sql_url)) as connection:
            connection.execute("CREATE TABLE t (d NUMERIC(10, 3), ts TIMESTAMP, u UUID, ok BOOLEAN, tags TEXT[], doc JSONB)")
            connection.execute("INSERT INTO t VALUES (1.250, '2024-02-29 12:00:00', "
                               "'12345678-1234-5678-1234-567812345678', true, ARRAY['a', 'b'], '{\"k\": [1]}')")
        assert guarded(sp.read_sql("SELECT * FROM t", sql_url).to_list) == [{
            "d": decimal.Decimal("1.250"), "ts": datetime.datetime(2024, 2, 29, 12), "ok": True, "tags": ["a", "b"],
            "u": uuid.UUID("12345678-1234-5678-1234-567812345678"), "doc": {"k": [1]},
        }]


def test_a_relative_path_and_a_sqlite_url_read_the_same_file(tmp_path, monkeypatch):
    expected = make_docs(f"sqlite:///{tmp_path / 'rel.db'}")
    monkeypatch.chdir(tmp_path)
    for con in ("rel.db", "sqlite:///rel.db", tmp_path / "rel.db"):
        stream = sp.read_sql(QUERY, con)
        monkeypatch.chdir("/")  # the path was made absolute when read_sql was called
        assert guarded(stream.set_processing(backend="multiprocessing", num_cpu_workers=1).to_list) == expected
        monkeypatch.chdir(tmp_path)


def test_a_wal_sqlite_file_takes_commits_while_it_is_read(tmp_path):
    # What a job that reads and writes one SQLite file needs (docs: WAL mode); the read-only
    # reader opens a WAL file too.
    url = f"sqlite:///{tmp_path / 'wal.db'}"
    make_docs(url, 3_000)
    with sqlite3.connect(tmp_path / "wal.db") as db:
        assert db.execute("PRAGMA journal_mode=WAL").fetchone() == ("wal",)
        db.execute("CREATE TABLE out (id INTEGER)")
    db.close()

    def read_while_writing() -> int:
        iterator = iter(sp.read_sql(QUERY, url, chunk_size=100))
        first = next(iterator)  # the reader's cursor is open
        writer = sqlite3.connect(tmp_path / "wal.db", timeout=5, isolation_level=None)
        writer.execute("INSERT INTO out VALUES (?)", (first["id"],))
        writer.close()
        return 1 + sum(1 for _ in iterator)

    assert guarded(read_while_writing) == 3_000
    assert count_rows(url, "out") == 1


# -- memory: rows are fetched in batches ------------------------------------------------------


class CountingConnection:
    """A :class:`SqlConnection` that records the rows its ``iterate`` has fetched, batch by batch,
    and refuses ``execute`` of anything but the ``EXPLAIN`` check (no fetch of a whole result)."""

    def __init__(self, connection: SqlConnection, log: dict[str, Any]) -> None:
        self.connection = connection
        self.log = log
        self.dialect = connection.dialect
        self.errors = connection.errors

    def execute(self, sql: str, params: Optional[dict[str, Any]] = None) -> list[dict[str, Any]]:
        assert sql.startswith("EXPLAIN "), f"read_sql ran {sql!r} with execute (fetches every row)"
        return self.connection.execute(sql, params)

    def iterate(self, sql: str, params: Any = None, batch_rows: int = 1024) -> Iterator[list[dict[str, Any]]]:
        self.log["batch_rows"] = batch_rows
        for batch in self.connection.iterate(sql, params, batch_rows):
            self.log["batches"].append(len(batch))
            yield batch

    def __enter__(self) -> CountingConnection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.connection.close()
        self.log["closed"] += 1


@pytest.fixture
def fetch_log(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Counts what read_sql fetches: the source reads in the main process, so the patch holds
    under every backend."""
    log: dict[str, Any] = {"batches": [], "closed": 0}
    real_connect = sql_source.connect

    def counting_connect(target: Any, read_only: bool = False) -> CountingConnection:
        return CountingConnection(real_connect(target, read_only), log)

    monkeypatch.setattr(sql_source, "connect", counting_connect)
    return log


@pytest.mark.parametrize("config", [BACKEND_CONFIGS[0], BACKEND_CONFIGS[2], BACKEND_CONFIGS[4]], ids=config_id)
def test_a_large_table_is_fetched_in_batches_as_the_consumer_pulls(sql_url, fetch_log, config):
    n, chunk = 20_000, 100
    make_docs(sql_url, n)
    stream = sp.read_sql(QUERY, sql_url, chunk_size=chunk).set_processing(**config)

    def first_record_then_rest() -> tuple[dict[str, Any], int, list[dict[str, Any]]]:
        iterator = iter(stream)
        first = next(iterator)
        fetched_at_first = sum(fetch_log["batches"])
        return first, fetched_at_first, list(iterator)

    first, fetched_at_first, rest = guarded(first_record_then_rest)
    assert [first, *rest] == rows(n)
    # One task and one fetch batch ahead in the main process; a backend with workers reads at
    # most its window of tasks ahead. Either way, far from the 20,000 rows.
    ahead = 1 if is_simple(config) else MAX_PREFETCHED_TASKS
    assert fetched_at_first <= (ahead + 1) * chunk + fetch_log["batch_rows"] < n
    assert fetch_log["batch_rows"] == chunk
    assert max(fetch_log["batches"]) <= chunk and sum(fetch_log["batches"]) == n
    assert fetch_log["closed"] == 2  # the EXPLAIN check's connection, then the read's


def test_stopping_early_closes_the_cursor(sql_url, fetch_log):
    make_docs(sql_url, 5_000)
    stream = sp.read_sql(QUERY, sql_url, chunk_size=50).set_processing(backend="multiprocessing", num_cpu_workers=2)

    def first_three() -> list[Any]:
        iterator = iter(stream)
        taken = [next(iterator) for _ in range(3)]
        iterator.close()  # type: ignore[attr-defined]
        return taken

    assert guarded(first_three) == rows(3)
    assert sum(fetch_log["batches"]) < 5_000
    assert fetch_log["closed"] == 2


class _CountingCursor:
    """A sqlite3 cursor that records its ``fetchmany`` sizes and refuses ``fetchall``."""

    def __init__(self, cursor: sqlite3.Cursor, log: list[int]) -> None:
        self.cursor, self.log = cursor, log
        self.description = cursor.description

    def fetchmany(self, size: int) -> list[Any]:
        fetched = self.cursor.fetchmany(size)
        self.log.append(len(fetched))
        return fetched

    def fetchall(self) -> list[Any]:
        raise AssertionError("fetchall")


class _CountingSqlite:
    def __init__(self, connection: sqlite3.Connection, log: list[int]) -> None:
        self.connection, self.log = connection, log

    def execute(self, sql: str, params: Any = ()) -> _CountingCursor:
        return _CountingCursor(self.connection.execute(sql, params), self.log)

    def close(self) -> None:
        self.connection.close()


def test_the_driver_fetches_in_batches(sql_url, monkeypatch):
    """Under the counting wrapper: sqlite3's cursor is read with fetchmany; SQLAlchemy's with
    a server-side cursor (psycopg's ``ServerCursor``: the server keeps the rows not fetched)."""
    make_docs(sql_url, 3_000)
    connection = connect(sql_target(sql_url), read_only=True)
    fetches: list[int] = []
    cursors: list[str] = []
    if connection.dialect == "sqlite":
        connection._sqlite = _CountingSqlite(connection._sqlite, fetches)
    else:
        import sqlalchemy

        def record_cursor(conn: Any, cursor: Any, *args: Any) -> None:
            cursors.append(type(cursor).__name__)

        sqlalchemy.event.listen(connection._engine, "before_cursor_execute", record_cursor)
    with connection:
        batches = [len(batch) for batch in connection.iterate(QUERY, batch_rows=256)]
    assert batches == [256] * 11 + [184]
    if fetches:
        assert fetches == [256] * 11 + [184, 0]
    else:
        assert cursors == ["ServerCursor"]


# -- where a record is ------------------------------------------------------------------------


def test_locate_names_the_rows_of_the_query(sql_url):
    make_docs(sql_url)
    source = sp.read_sql(QUERY, sql_url).source
    tasks = list(source.iter_tasks(20))
    assert [(t.start, len(t.rows)) for t in tasks] == [(0, 20), (20, 20), (40, 17)]
    where = source.describe()
    assert where == f"read_sql({QUERY!r} on {sql_target(sql_url)})"
    assert source.locate(tasks[1]) == f"{where}, rows 20 to 39 of the query"
    assert source.locate(tasks[2], 3) == f"{where}, row 43 of the query"


def test_an_error_names_the_task_and_the_dead_letter_the_row(sql_url, tmp_path):
    make_docs(sql_url)
    raising = sp.read_sql(QUERY, sql_url, chunk_size=10).map(fn_raises(at=43))
    outputs, exc = guarded(lambda: collect_until_error(raising))
    assert exc is not None and [r["id"] for r in outputs] == list(range(40))
    assert f"streamproc: task 4 reads {raising.source.describe()}, rows 40 to 49 of the query" in exc.__notes__
    import pyarrow.parquet as pq

    dead = tmp_path / "dead"
    skipping = raising.set_processing(on_error="dead_letter", dead_letter_path=str(dead))
    with pytest.warns(sp.RecordsSkippedWarning):
        assert len(guarded(skipping.to_list)) == N - 1
    letters = pq.read_table(dead).to_pylist()
    assert [letter["source"] for letter in letters] == [f"{raising.source.describe()}, row 43 of the query"]


# -- resume -----------------------------------------------------------------------------------

LAYOUT = {"rows_per_file": 20, "row_group_size": 8}
RESUME_QUERY = "SELECT id AS x, text AS s FROM docs ORDER BY id"


def write(stream: sp.Stream, out: Any, **kwargs: Any) -> list[str]:
    paths: list[str] = guarded(lambda: stream.write_parquet(out, **{**LAYOUT, **kwargs}), "write_parquet")
    return paths


@pytest.mark.parametrize("config", [BACKEND_CONFIGS[0], BACKEND_CONFIGS[2]], ids=config_id)
def test_resume_over_an_ordered_query_completes_the_interrupted_write(sql_url, tmp_path, config):
    make_docs(sql_url, 120)
    write(sp.read_sql(RESUME_QUERY, sql_url, chunk_size=10).map(doubled), tmp_path / "reference")
    flag = tmp_path / "failing"
    flag.write_text("")
    failing = sp.read_sql(RESUME_QUERY, sql_url, chunk_size=10).map(FailsWhileFileExists(str(flag), at=77))
    with pytest.raises(RuntimeError, match="failing at 77"):
        write(failing.set_processing(**config), tmp_path / "out")
    committed = {p["group"] for p in manifest_parts(tmp_path / "out")}
    assert 3 not in committed  # group 3 holds rows 60..79
    flag.unlink()
    # Rows of the committed groups are read again from the database (the cursor runs from the
    # start) but never processed: RaisesBelow fails on any row of the committed prefix.
    prefix = 0
    while prefix in committed:
        prefix += 1
    done_below = 20 * prefix
    resumed = sp.read_sql(RESUME_QUERY, sql_url, chunk_size=10).map(RaisesBelow(done_below)).set_processing(**config)
    write(resumed, tmp_path / "out", resume=True)
    assert snapshot(tmp_path / "out") == snapshot(tmp_path / "reference")


@pytest.mark.parametrize("query", [
    "SELECT id AS x FROM docs",
    "SELECT * FROM (SELECT id AS x FROM docs ORDER BY id) AS sub",
    "SELECT id AS x, row_number() OVER (ORDER BY id) AS k FROM docs",
    "SELECT id AS x, 'ORDER BY' AS s FROM docs -- ORDER BY id",
])
def test_resume_without_order_by_is_refused_before_anything_runs(sql_url, tmp_path, query):
    make_docs(sql_url)
    stream = sp.read_sql(query, sql_url).map(RaisesBelow(10**9))  # any record processed raises
    with pytest.raises(ValueError, match=r"write_parquet\(resume=True\) over read_sql needs a query with an ORDER BY"):
        write(stream, tmp_path / "out", resume=True)
    assert not os.path.exists(tmp_path / "out")
    # Without resume, the same stream writes (a single run reads the rows once, in one order).
    assert write(sp.read_sql(query, sql_url), tmp_path / "plain")


def test_resume_over_another_query_is_refused(sql_url, tmp_path):
    make_docs(sql_url, 40)
    write(sp.read_sql(RESUME_QUERY, sql_url, chunk_size=10), tmp_path / "out")
    other = sp.read_sql("SELECT id AS x, text AS s FROM docs WHERE id > 3 ORDER BY id", sql_url, chunk_size=10)
    with pytest.raises(ResumeMismatchError, match="the input changed"):
        write(other, tmp_path / "out", resume=True)
    with pytest.raises(ResumeMismatchError, match="task_size was 10, it is 20"):
        write(sp.read_sql(RESUME_QUERY, sql_url, chunk_size=20), tmp_path / "out", resume=True)


@pytest.mark.parametrize("query, ordered", [
    ("SELECT * FROM t ORDER BY id", True),
    ("select * from t order\n  by id desc, k", True),
    ("SELECT * FROM t ORDER BY id LIMIT 10 OFFSET 5", True),
    ("SELECT a FROM t UNION ALL SELECT b FROM u ORDER BY 1", True),
    ('SELECT "ORDER BY" FROM t', False),
    ("SELECT 'order by' FROM t", False),
    ("SELECT a FROM t /* ORDER BY a */", False),
    ("SELECT a FROM t -- ORDER BY a", False),
    ("SELECT a FROM (SELECT a FROM t ORDER BY a) s", False),
    ("SELECT a, rank() OVER (PARTITION BY b ORDER BY a) FROM t", False),
    ("SELECT a FROM t WHERE s = 'it''s (' ORDER BY a", True),
    ("SELECT reorder_by FROM t", False),
])
def test_order_by_is_found_at_the_top_level_only(query, ordered):
    assert has_order_by(query) is ordered


# -- bad input, refused early -----------------------------------------------------------------


@pytest.mark.parametrize("query, words", [
    ("SELECT id, nope FROM docs", ["nope"]),
    ("SELECT * FROM missing_table", ["missing_table"]),
    ("SELEC id FROM docs", ["SELEC"]),
])
def test_an_unknown_table_or_column_is_refused_when_read_sql_is_called(sql_url, query, words):
    make_docs(sql_url)
    with pytest.raises(SqlQueryError) as info:
        sp.read_sql(query, sql_url)
    message = str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, StreamprocError)
    assert f"read_sql: the query {query!r} is not valid on {sql_target(sql_url)}" in message
    assert all(word in message for word in words)
    password = _password(sql_url)
    assert password is None or (password not in message and ":***@" in message)


def _password(url: str) -> Optional[str]:
    import urllib.parse

    return urllib.parse.urlsplit(url).password


def test_a_statement_that_is_not_a_query_fails_and_writes_nothing(sql_url):
    make_docs(sql_url)
    stream = sp.read_sql("DELETE FROM docs", sql_url)
    with pytest.raises(SqlQueryError, match=r"the query 'DELETE FROM docs' failed .*on "):
        guarded(stream.to_list)
    assert count_rows(sql_url) == N  # read-only: SQLite mode=ro, PostgreSQL READ ONLY transactions
    if sql_url.startswith("postgresql"):
        setting = sp.read_sql("SELECT current_setting('transaction_read_only') AS read_only", sql_url)
        assert guarded(setting.to_list) == [{"read_only": "on"}]


def test_a_missing_sqlite_file_is_refused_and_not_created(tmp_path):
    for con in (tmp_path / "missing.db", f"sqlite:///{tmp_path / 'missing.db'}", str(tmp_path / "missing.db")):
        with pytest.raises(FileNotFoundError, match=r"read_sql: no SQLite database at .*missing\.db"):
            sp.read_sql("SELECT 1", con)
        assert not os.path.exists(tmp_path / "missing.db")
    with pytest.raises(IsADirectoryError, match="is a directory"):
        sp.read_sql("SELECT 1", tmp_path)


def test_a_live_connection_or_engine_is_refused(tmp_path):
    make_docs(f"sqlite:///{tmp_path / 'a.db'}")
    live = sqlite3.connect(tmp_path / "a.db")
    with pytest.raises(ValueError, match=r"con must be a database path or URL.*live connection"):
        sp.read_sql(QUERY, live)
    live.close()
    sqlalchemy = pytest.importorskip("sqlalchemy")
    engine = sqlalchemy.create_engine(f"sqlite:///{tmp_path / 'a.db'}")
    with pytest.raises(ValueError, match="con must be a database path or URL"):
        sp.read_sql(QUERY, engine)
    # An SQLAlchemy URL object is a URL, not a connection.
    assert guarded(sp.read_sql(QUERY, engine.url).to_list) == rows()
    engine.dispose()


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"chunk_size": 0}, ValueError, "chunk_size must be a positive integer"),
    ({"chunk_size": -3}, ValueError, "chunk_size must be a positive integer"),
    ({"chunk_size": True}, ValueError, "chunk_size must be a positive integer"),
    ({"chunk_size": 2.5}, ValueError, "chunk_size must be a positive integer"),
    ({"query": "  "}, ValueError, "query must be a non-empty SQL string"),
    ({"query": None}, ValueError, "query must be a non-empty SQL string"),
    ({"params": [1, 2]}, TypeError, "params must be a mapping"),
])
def test_bad_arguments_are_refused_naming_them(tmp_path, kwargs, exc, match):
    make_docs(f"sqlite:///{tmp_path / 'a.db'}")
    arguments = {"query": QUERY, "con": tmp_path / "a.db", **kwargs}
    with pytest.raises(exc, match=match):
        sp.read_sql(**arguments)


def test_a_server_url_without_sqlalchemy_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sqlalchemy", None)  # import sqlalchemy now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'streamproc\[sql\]'") as info:
        sp.read_sql("SELECT 1", "postgresql+psycopg://user:secret@127.0.0.1:1/db")
    assert "secret" not in str(info.value) and "user:***@127.0.0.1" in str(info.value)


def test_an_unreachable_server_is_a_connection_error_without_the_password():
    pytest.importorskip("sqlalchemy")
    pytest.importorskip("psycopg")
    from streamproc.io.sql_connection import SqlConnectionError

    expected = r"cannot connect to postgresql\+psycopg://user:\*\*\*@127\.0\.0\.1:1/db"
    with pytest.raises(SqlConnectionError, match=expected) as info:
        sp.read_sql("SELECT 1", "postgresql+psycopg://user:secret@127.0.0.1:1/db?connect_timeout=5")
    assert "secret" not in str(info.value)


def test_sqlite_needs_no_sqlalchemy_nor_torch(tmp_path):
    import subprocess
    import textwrap

    make_docs(f"sqlite:///{tmp_path / 'a.db'}", 3)
    code = f"""
        import sys
        import streamproc as sp
        records = sp.read_sql("SELECT id FROM docs ORDER BY id", {str(tmp_path / 'a.db')!r}).to_list()
        assert records == [{{"id": i}} for i in range(3)], records
        print(sorted(name for name in ("sqlalchemy", "psycopg", "torch") if name in sys.modules))
    """
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(sp.__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo_root, os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60,
                            env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_payloads_carry_rows_not_the_connection(sql_url):
    import pickle

    make_docs(sql_url, 5)
    source = sp.read_sql(QUERY, sql_url).source
    payloads = list(source.iter_tasks(2))
    assert payloads == [SqlRows(0, rows(5)[:2]), SqlRows(2, rows(5)[2:4]), SqlRows(4, rows(5)[4:])]
    clone = pickle.loads(pickle.dumps(source))  # what a worker gets: the query and the URL
    assert list(clone.read_task(payloads[1])) == rows(5)[2:4]
