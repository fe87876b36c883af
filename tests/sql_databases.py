"""The databases the SQL tests run against: a fresh SQLite file always, PostgreSQL in ``tox -e sql``.

``tox -e sql`` (run by ``.ci/run``) starts a PostgreSQL server and sets
``STREAMPROC_TEST_POSTGRES_URL`` (an SQLAlchemy URL) and ``STREAMPROC_REQUIRE_POSTGRES=1``; the
``sql_url`` fixture then runs every test on both databases, and fails (not skips) when the
server is required but unreachable. In the default env the PostgreSQL cases are not generated.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from streamproc.io.sql_connection import SqlTarget

POSTGRES_URL_VARIABLE = "STREAMPROC_TEST_POSTGRES_URL"
REQUIRE_POSTGRES_VARIABLE = "STREAMPROC_REQUIRE_POSTGRES"


def database_kinds() -> list[str]:
    """``["sqlite"]``, plus ``"postgresql"`` when a test server is configured or required."""
    kinds = ["sqlite"]
    if os.environ.get(POSTGRES_URL_VARIABLE) or os.environ.get(REQUIRE_POSTGRES_VARIABLE) == "1":
        kinds.append("postgresql")
    return kinds


#: Whether this run has a PostgreSQL server (tests of what only PostgreSQL does exist only then).
POSTGRES_CONFIGURED = "postgresql" in database_kinds()


def postgres_url() -> str:
    url = os.environ.get(POSTGRES_URL_VARIABLE)
    if not url:
        pytest.fail(f"{REQUIRE_POSTGRES_VARIABLE}=1 but {POSTGRES_URL_VARIABLE} is not set (tox -e sql sets both)")
    return url


def _fresh_database(kind: str, tmp_path: Path) -> Iterator[str]:
    """A database URL with no user tables in it: a new SQLite file, or a fresh PostgreSQL schema.

    For PostgreSQL, each test gets its own schema (set as the connection's search_path through
    the URL's ``options``), dropped at the end, so tests never see each other's tables.
    """
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'test.db'}"
        return
    import sqlalchemy

    base = postgres_url()
    schema = f"t_{uuid.uuid4().hex[:12]}"
    engine = sqlalchemy.create_engine(base)
    try:
        with engine.begin() as connection:
            connection.execute(sqlalchemy.text(f'CREATE SCHEMA "{schema}"'))
    except sqlalchemy.exc.OperationalError as exc:
        engine.dispose()
        pytest.fail(f"the PostgreSQL test server at {SqlTarget(base)} is not reachable: {exc}")
    separator = "&" if "?" in base else "?"
    yield f"{base}{separator}options=-csearch_path%3D{schema}"
    with engine.begin() as connection:
        connection.execute(sqlalchemy.text(f'DROP SCHEMA "{schema}" CASCADE'))
    engine.dispose()


@pytest.fixture(params=database_kinds())
def sql_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Every configured database in turn (see :func:`_fresh_database`)."""
    yield from _fresh_database(request.param, tmp_path)


@pytest.fixture(params=[kind for kind in database_kinds() if kind == "postgresql"])
def postgres_sql_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh PostgreSQL schema, for what only PostgreSQL does (its types, type checks).

    Generated only where PostgreSQL is configured (``tox -e sql``): elsewhere the tests that
    use it do not exist, rather than being skipped.
    """
    yield from _fresh_database(request.param, tmp_path)
