"""Replicas under different policies find each other through pg_stat_activity."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import structlog
from fastapi.testclient import TestClient
from pydantic import SecretStr
from structlog.testing import capture_logs

from secledger import replicapolicy
from secledger.config import Settings
from secledger.store import db
from secledger.web import create_app

SECRET = "replica-policy-test-token"


def settings_of(database_url: str, data: Path, **more: object) -> Settings:
    return Settings(
        database_url=SecretStr(database_url),
        data_dir=data,
        webhook_secrets=[SecretStr(SECRET)],
        **more,  # type: ignore[arg-type]
    )


def test_the_digest_follows_what_judges_a_delivery_and_not_the_secrets(tmp_path) -> None:
    url = "postgresql://x@127.0.0.1/none"
    base = replicapolicy.digest(settings_of(url, tmp_path))
    assert len(base) == 12
    assert replicapolicy.digest(settings_of(url, tmp_path)) == base
    other_secret = Settings(
        database_url=SecretStr(url), data_dir=tmp_path, webhook_secrets=[SecretStr("x" * 24)]
    )
    assert replicapolicy.digest(other_secret) == base
    changed = [
        {"tier_policy": {"critical": {"sla_hours": 8}}},
        {"security_label_patterns": ["security/*"]},
        {"risk_tiers": ["critical", "high", "low"]},
        {"unclassified_tier": "untiered"},
        {"business_hours": {"start": "08:00"}},
        {"webhook_sources": [{"instance": "https://gitlab.example.com", "tokens": [SECRET]}]},
        {"webhook_auth": "signature"},
    ]
    digests = {replicapolicy.digest(settings_of(url, tmp_path, **c)) for c in changed}
    assert base not in digests
    assert len(digests) == len(changed)


@pytest.fixture
def watch_log(monkeypatch):
    # A logger of its own: one cached by an earlier test would bypass capture_logs.
    monkeypatch.setattr(replicapolicy, "log", structlog.get_logger("secledger.replicapolicy"))
    with capture_logs() as logged:
        yield logged


def test_a_replica_under_another_policy_is_named_until_it_leaves(database_url, watch_log) -> None:
    mine = db.create(database_url, application_name=replicapolicy.application_name("aaaaaaaaaaaa"))
    theirs = db.create(
        database_url, application_name=replicapolicy.application_name("bbbbbbbbbbbb")
    )
    plain = db.create(database_url)  # a command's sessions, not a replica's
    watch = replicapolicy.Watch("aaaaaaaaaaaa", repeat=100.0)
    try:
        with theirs.connect(), theirs.connect(), plain.connect():
            assert watch.check(mine, now=0.0) == {"bbbbbbbbbbbb": 2}
            assert watch.check(mine, now=50.0) == {"bbbbbbbbbbbb": 2}  # said once
            watch.check(mine, now=150.0)  # and again after `repeat`
        theirs.dispose()
        # A backend leaves pg_stat_activity a moment after its client hangs up.
        deadline = time.monotonic() + 10
        while "bbbbbbbbbbbb" in replicapolicy.sessions(mine) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert watch.check(mine, now=160.0) == {}
        assert watch.check(mine, now=170.0) == {}
    finally:
        for engine in (mine, theirs, plain):
            engine.dispose()
    events = [(line["event"], line["log_level"]) for line in watch_log]
    assert events == [
        ("replica_policy_differs", "error"),
        ("replica_policy_differs", "error"),
        ("replica_policy_agrees", "info"),
    ]
    assert watch_log[0]["others"] == {"bbbbbbbbbbbb": 2}
    assert watch_log[0]["policy"] == "aaaaaaaaaaaa"


def test_serve_with_the_same_policy_is_quiet_and_another_is_named(
    database_url, tmp_path, watch_log
) -> None:
    same = settings_of(database_url, tmp_path / "a")
    also_same = settings_of(database_url, tmp_path / "b")
    other = settings_of(database_url, tmp_path / "c", tier_policy={"high": {"sla_hours": 12}})
    database = db.Database(database_url, embedded=False)
    with TestClient(create_app(same, database)), TestClient(create_app(also_same, database)):
        assert wait_for(watch_log, 2) == []
    # Quiet because both looked and found the same policy, not because a look failed.
    assert not [line for line in watch_log if line["event"] == "replica_policy_check_failed"]
    with TestClient(create_app(same, database)), TestClient(create_app(other, database)):
        found = wait_for(watch_log, 2)
    assert found, "neither replica named the other's policy"
    mine, theirs = replicapolicy.digest(same), replicapolicy.digest(other)
    assert {(line["policy"], *line["others"]) for line in found} <= {(mine, theirs), (theirs, mine)}


def wait_for(logged: list[dict], seconds: float) -> list[dict]:
    """The `replica_policy_differs` lines logged within ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        found = [line for line in logged if line["event"] == "replica_policy_differs"]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)
