"""Times are UTC wherever they are shown, whatever the server's own time zone."""

from __future__ import annotations

import re
from collections.abc import Iterator

import psycopg
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import make_url

from dashboard_fixtures import bearer, log_in, reader_client
from secledger.errors import ConfigError
from secledger.store import db, migrate

MR_PATH = "/https%3A%2F%2Fgitlab.example.com/14/12"


@pytest.fixture
def new_york(database_url: str) -> str:
    """The test database with the time zone a server in New York gets from initdb."""
    name = make_url(database_url).database
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f"ALTER DATABASE \"{name}\" SET timezone = 'America/New_York'")
    return database_url


@pytest.fixture
def reader(new_york: str, tmp_path) -> Iterator[TestClient]:
    yield from reader_client(new_york, tmp_path)


def test_every_session_runs_in_utc(new_york: str) -> None:
    with psycopg.connect(new_york) as raw:
        assert raw.execute("SHOW TimeZone").fetchone() == ("America/New_York",)
    engine = db.create(new_york, pool_size=1)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SHOW TimeZone").scalar() == "UTC"
            # The setting is the session's, not a transaction's that the pool rolls back.
            conn.rollback()
            assert conn.exec_driver_sql("SHOW TimeZone").scalar() == "UTC"
    finally:
        engine.dispose()


def test_the_mr_page_and_the_api_show_the_same_utc_times(reader) -> None:
    api = reader.get("/api/ledger" + MR_PATH, headers=bearer()).json()
    stamps = [event["event_at"] for event in api["timeline"]]
    assert stamps and all(s.endswith(("Z", "+00:00")) for s in stamps), stamps
    log_in(reader)
    page = reader.get("/mr" + MR_PATH).text
    for stamp in stamps:
        shown = re.sub(r"T(\d\d:\d\d).*", r" \1", stamp)  # 2025-08-05T21:48:25Z -> 21:48
        assert shown in page, (shown, stamp)


def test_tables_in_another_schema_are_refused_not_forked(server_url: str) -> None:
    """Every session reads public, whatever path the URL, the login or the database
    sets (the database's owner may set one to a schema of copies). A ledger kept in
    another schema is refused when migrating, not replaced by a new, empty one."""
    name = "secledger_test_own_schema"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_url(server_url).set(database=name)
    with psycopg.connect(url.render_as_string(hide_password=False), autocommit=True) as conn:
        conn.execute("CREATE SCHEMA ledger")
        for table in ("delivery_log", "security_review_ledger", "alembic_version"):
            conn.execute(f"CREATE TABLE ledger.{table} (id bigint)")
        # Another application's table of a common name is none of secledger's business.
        conn.execute("CREATE SCHEMA billing")
        conn.execute("CREATE TABLE billing.delivery_log (id int)")
        conn.execute(f'ALTER DATABASE "{name}" SET search_path = ledger, public')
    chosen = url.update_query_dict({"options": "-csearch_path=ledger"})
    try:
        engine = db.create(chosen.render_as_string(hide_password=False), pool_size=1)
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SHOW search_path").scalar() == "public, pg_temp"
        with pytest.raises(ConfigError, match="tables in schema ledger"):
            migrate.ensure_current(engine, None)
        with engine.connect() as conn:  # nothing was started in public
            assert (
                conn.exec_driver_sql("SELECT to_regclass('public.delivery_log')").scalar() is None
            )
        engine.dispose()
    finally:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
