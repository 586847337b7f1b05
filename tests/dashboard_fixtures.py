"""Shared pieces for the dashboard tests: a reader app on the test database, and a history."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from httpx import Response
from pydantic import SecretStr

from conftest import SECRET, post
from secledger.config import Settings
from secledger.dashboard.auth import hash_password
from secledger.store import db
from secledger.web import create_app

READ_TOKEN = "test-read-token"
USER, PASSWORD = "auditor", "correct horse battery staple"
# A cheap hash for tests (the default cost is for production).
USER_HASH = hash_password(PASSWORD, n=2**10)


def demo_bodies() -> list[dict[str, Any]]:
    """The bundled sample history, in delivery order."""
    folder = resources.files("secledger") / "demo"
    paths = sorted(Path(str(p)) for p in folder.iterdir() if p.name.endswith(".json"))
    return [json.loads(p.read_text()) for p in paths]


def reader_settings(database_url: str, data_dir: Path, **extra: Any) -> Settings:
    """Settings with one dashboard user and a read token."""
    return Settings(
        database_url=SecretStr(database_url),
        data_dir=data_dir,
        webhook_secrets=[SecretStr(SECRET)],
        users={USER: USER_HASH},
        read_token=SecretStr(READ_TOKEN),
        **extra,
    )


def reader_client(database_url: str, tmp_path: Path) -> Iterator[TestClient]:
    """A receiver with the dashboard configured, with the demo history recorded."""
    settings = reader_settings(database_url, tmp_path / "data")
    app = create_app(settings, db.Database(database_url, embedded=False))
    with TestClient(app) as client:
        for body in demo_bodies():
            assert post(client, body).status_code == 200
        yield client


def bearer() -> dict[str, str]:
    """The read-token header."""
    return {"Authorization": f"Bearer {READ_TOKEN}"}


def form_token(client: TestClient, path: str = "/login") -> str:
    """The CSRF field of the form on ``path`` (fetching it sets the nonce cookie)."""
    page = client.get(path)
    found = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert found, f"no CSRF field on {path}"
    return found.group(1)


def post_login(client: TestClient, username: str, password: str, next_path: str = "/") -> Response:
    """Submit the login form as a browser does: with the token of the page it came from."""
    fields = {"username": username, "password": password, "next": next_path}
    return client.post(
        "/login", data={**fields, "csrf_token": form_token(client)}, follow_redirects=False
    )


def log_in(client: TestClient) -> None:
    """Log the test client in with the configured user."""
    response = post_login(client, USER, PASSWORD)
    assert response.status_code == 303, response.text
