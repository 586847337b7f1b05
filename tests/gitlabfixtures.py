"""Fixtures for the GitLab API tests: the fake API, settings for it, a second database."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from pydantic import SecretStr
from sqlalchemy import Engine
from sqlalchemy.engine import make_url

from fakegitlab import TOKEN, FakeGitLab
from secledger.config import Settings
from secledger.gitlab_api import GitLabAPI
from secledger.store import db


@pytest.fixture
def fake() -> Iterator[FakeGitLab]:
    """A fake GitLab API on 127.0.0.1 with small pages, so everything paginates."""
    with FakeGitLab(max_per_page=2) as server:
        server.add_project(14, "acme/payments", group="acme").labels.extend(
            ["frontend", "sec::low"]
        )
        yield server


@pytest.fixture
def api_settings(database_url: str, tmp_path: Path, fake: FakeGitLab) -> Settings:
    """Settings for the test database and the fake API."""
    return Settings(
        database_url=SecretStr(database_url),
        data_dir=tmp_path / "data",
        gitlab_url=fake.url,
        gitlab_token=SecretStr(TOKEN),
        gitlab_workers=2,
    )


@pytest.fixture
def api(api_settings: Settings) -> GitLabAPI:
    """The client under test, configured from settings."""
    return GitLabAPI.from_settings(api_settings)


@pytest.fixture
def other_engine(server_url: str, template_url: str) -> Iterator[Engine]:
    """A second fresh, migrated database, to record the same history in another order."""
    name = f"secledger_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{make_url(template_url).database}"')
    url = make_url(server_url).set(database=name).render_as_string(hide_password=False)
    engine = db.create(url, pool_size=2)
    try:
        yield engine
    finally:
        engine.dispose()
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
