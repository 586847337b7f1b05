"""Helpers for the integrity tests: a short recorded history, superuser tampering, the CLI."""

from __future__ import annotations

from typing import Any

import psycopg
from click.testing import CliRunner, Result
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url

from builders import label_change, mr_event
from conftest import post
from secledger.cli import main
from secledger.store.chain import LogRow, link

APP_LOGIN = "secledger_test_app"
READONLY_LOGIN = "secledger_test_auditor"
APP_PASSWORD = "test-app-password"  # ignored by the embedded server's trust auth
HISTORY_ROWS = 6


def record_history(client: Any) -> None:
    """Record six log rows over two security MRs through the endpoint (one delivery ignored)."""
    label_added = label_change(
        ["frontend"], ["frontend", "sec::critical"], "2025-08-05 21:20:00 UTC"
    )
    bodies = [
        mr_event("open", iid=1, updated_at="2025-08-05 20:00:00 UTC"),
        mr_event("approved", iid=1, actor="bob", updated_at="2025-08-05 21:00:00 UTC"),
        mr_event("open", iid=2, labels=["frontend"], updated_at="2025-08-05 21:10:00 UTC"),
        mr_event("update", iid=2, labels=["frontend", "sec::critical"], changes=label_added),
        mr_event("merge", iid=1, actor="carol", updated_at="2025-08-05 22:00:00 UTC"),
        mr_event("approved", iid=2, actor="dave", updated_at="2025-08-05 22:30:00 UTC"),
        mr_event("close", iid=2, actor="erin", updated_at="2025-08-05 23:00:00 UTC"),
    ]
    statuses = [post(client, body).json()["status"] for body in bodies]
    assert statuses.count("recorded") == HISTORY_ROWS, statuses


def tamper(engine: Engine, *statements: str, **params: Any) -> None:
    """Run SQL as the superuser with every trigger and foreign key switched off.

    ``session_replication_role = replica`` is what a superuser would use: it silences the
    append-only triggers and the review_events foreign key alike.
    """
    with engine.begin() as conn:
        conn.execute(text("SET LOCAL session_replication_role = replica"))
        for statement in statements:
            conn.execute(text(statement), params)


def log_row(engine: Engine, seq: int) -> tuple[LogRow, bytes]:
    """One stored log row as hashed, and its stored prev_hash."""
    with engine.connect() as conn:
        values = conn.execute(
            text(
                "SELECT seq, received_at, source, event, instance, dedup_key, headers, payload,"
                " prev_hash FROM delivery_log WHERE seq = :seq"
            ),
            {"seq": seq},
        ).one()
    return LogRow(*values[:7], payload=bytes(values[7])), bytes(values[8])


def rehash_from(engine: Engine, seq: int, last: int | None = None) -> None:
    """What an attacker who knows the format does: recompute the hashes of ``seq..last``."""
    with engine.connect() as conn:
        if last is None:
            last = int(conn.execute(text("SELECT max(seq) FROM delivery_log")).scalar_one())
        before = conn.execute(
            text("SELECT hash FROM delivery_log WHERE seq = :seq"), {"seq": seq - 1}
        ).scalar()
    prev_hash = bytes(before) if before is not None else bytes(32)
    for current in range(seq, last + 1):
        row, _ = log_row(engine, current)
        digest = link(prev_hash, row)
        tamper(  # and the body hash deduplication reads, which verify also checks
            engine,
            "UPDATE delivery_log SET prev_hash = :prev, hash = :hash,"
            " body_sha256 = CASE WHEN body_sha256 IS NOT NULL THEN sha256(payload) END"
            " WHERE seq = :seq",
            prev=prev_hash,
            hash=digest,
            seq=current,
        )
        prev_hash = digest


def cli(database_url: str, *args: str, **env: str) -> Result:
    """Run a secledger command against the test database."""
    environment = {"SECLEDGER_DATABASE_URL": database_url, "SECLEDGER_LOG_LEVEL": "warning"}
    environment |= {f"SECLEDGER_{k.upper()}": v for k, v in env.items()}
    return CliRunner().invoke(main, list(args), env=environment, catch_exceptions=False)


def app_url(database_url: str) -> str:
    """A login in secledger_app (created once per server) on the test's database."""
    return login_url(database_url, APP_LOGIN, "secledger_app")


def readonly_url(database_url: str) -> str:
    """A login in secledger_readonly (created once per server) on the test's database."""
    return login_url(database_url, READONLY_LOGIN, "secledger_readonly")


def login_url(database_url: str, login: str, role: str) -> str:
    """A login that is a member of ``role``, created once per server."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "DO $$ BEGIN"
            f" IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{login}') THEN"
            f" CREATE ROLE {login} LOGIN PASSWORD '{APP_PASSWORD}' IN ROLE {role};"
            " END IF; END $$"
        )
    url = make_url(database_url).set(username=login, password=APP_PASSWORD)
    return url.render_as_string(hide_password=False)
