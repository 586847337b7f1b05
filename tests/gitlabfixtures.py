"""Fixtures for the GitLab API tests: the fake API, settings for it, a second database."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pydantic import SecretStr
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url

from fakegitlab import TOKEN, FakeGitLab
from secledger.config import Settings
from secledger.gitlab_api import GitLabAPI
from secledger.policy import LabelPolicy
from secledger.service import feed
from secledger.store import db

POLICY = LabelPolicy()
VOLATILE = ("updated_at",)  # the wall-clock time of the last upsert


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


def replay(engine: Engine, instance: str, bodies: list[dict[str, Any]]) -> list[str]:
    """Feed webhook bodies through the replay path, as sent by ``instance``."""
    headers = {"x-gitlab-event": "Merge Request Hook", "x-gitlab-instance": instance}
    return [
        feed(
            engine, POLICY, headers, json.dumps(b).encode(), max_body_bytes=1 << 20, source="replay"
        ).status
        for b in bodies
    ]


def ledger_rows(engine: Engine) -> list[dict[str, Any]]:
    """Every ledger row, without the wall-clock column."""
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT * FROM security_review_ledger ORDER BY project_id, mr_iid")
        )
        return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows.mappings()]


def log_count(engine: Engine) -> int:
    """Rows in the delivery log."""
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM delivery_log")).scalar_one())
