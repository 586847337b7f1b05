"""Real PostgreSQL for every test: the embedded server, or SECLEDGER_TEST_DATABASE_URL.

Each test gets its own database, copied from a migrated template, so tests are
isolated even when they commit (the HTTP path always commits) and the append-only
triggers stay in force.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
import structlog
from fastapi.testclient import TestClient
from httpx import Response
from pydantic import SecretStr
from sqlalchemy import Engine
from sqlalchemy.engine import make_url

from secledger import embedded
from secledger.config import Settings
from secledger.store import db, migrate
from secledger.web import create_app

TEMPLATE = "secledger_test_template"
SECRET = "test-secret-token"


def _with_database(url: str, name: str) -> str:
    return make_url(url).set(database=name).render_as_string(hide_password=False)


@pytest.fixture(autouse=True)
def _fresh_logging() -> Iterator[None]:
    """Each test logs to its own captured streams, whatever an earlier test configured."""
    yield
    structlog.reset_defaults()


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    """An admin libpq URL for the server under test."""
    given = os.environ.get("SECLEDGER_TEST_DATABASE_URL")
    if given:
        yield make_url(given).set(drivername="postgresql").render_as_string(hide_password=False)
        return
    # Not under pytest's basetemp: a second pytest session run by the same user resets
    # that tree to mode 0700, which locks out the server's dedicated system user.
    parent = Path(tempfile.mkdtemp(prefix="secledger-test-pg-"))
    parent.chmod(0o755)
    try:
        yield embedded.start(parent / "pg", database="postgres")
    finally:
        embedded.stop(parent / "pg")
        shutil.rmtree(parent, ignore_errors=True)


@pytest.fixture(scope="session")
def template_url(server_url: str) -> str:
    """A migrated database that each test's database is copied from."""
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{TEMPLATE}"')
    url = _with_database(server_url, TEMPLATE)
    engine = db.create(url, pool_size=1)
    migrate.upgrade(engine)
    engine.dispose()
    return url


@contextmanager
def _fresh_database(server_url: str) -> Iterator[str]:
    """A database copied from the migrated template, dropped on exit."""
    name = f"secledger_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{TEMPLATE}"')
    try:
        yield _with_database(server_url, name)
    finally:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def database_url(server_url: str, template_url: str) -> Iterator[str]:
    """A fresh, migrated database for one test."""
    with _fresh_database(server_url) as url:
        yield url


@pytest.fixture
def other_database_url(server_url: str, template_url: str) -> Iterator[str]:
    """A second fresh, migrated database, for a test that needs two."""
    with _fresh_database(server_url) as url:
        yield url


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    """An engine on the test's database."""
    created = db.create(database_url, pool_size=2)
    yield created
    created.dispose()


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    """Settings for a receiver on the test's database with one webhook secret."""
    return Settings(
        database_url=SecretStr(database_url),
        data_dir=tmp_path / "data",
        webhook_secrets=[SecretStr(SECRET)],
    )


@pytest.fixture
def client(settings: Settings, database_url: str) -> Iterator[TestClient]:
    """A receiver app with its lifespan running, on the test's database."""
    app = create_app(settings, db.Database(database_url, embedded=False))
    with TestClient(app) as test_client:
        yield test_client


def post(
    client: TestClient,
    body: bytes | dict[str, Any],
    *,
    event: str = "Merge Request Hook",
    token: str | None = SECRET,
    **headers: str,
) -> Response:
    """POST a delivery the way GitLab does."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    sent = {"X-Gitlab-Event": event, "Content-Type": "application/json"}
    if token is not None:
        sent["X-Gitlab-Token"] = token
    sent |= {k.replace("_", "-"): v for k, v in headers.items()}
    return client.post("/webhooks/gitlab", content=data, headers=sent)
