"""A lost ignored delivery's MR recorded from GitLab's API by ``serve`` itself, against a
fake GitLab over real HTTP and a real PostgreSQL."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import datetime
from functools import partial
from typing import Any

import pytest
import structlog
from fastapi.testclient import TestClient
from prometheus_client import generate_latest
from pydantic import SecretStr
from sqlalchemy import Engine, text
from structlog.testing import capture_logs

from apihelpers import POLICY, log_count
from apistory import Story
from conftest import SECRET, post
from replicas import recorded_elsewhere, wait_for
from secledger import recheck, recovery, webhook
from secledger.config import Settings
from secledger.extract import MRKey
from secledger.metrics import Metrics
from secledger.recentignored import Lost, RecentlyIgnored
from secledger.store import db
from secledger.times import isoformat, utcnow
from secledger.web import create_app

pytest_plugins = ("gitlabfixtures",)


@pytest.fixture
def serving(api_settings: Settings, database_url: str, monkeypatch) -> Iterator[TestClient]:
    """A receiver with GitLab's API configured, that holds no ignored body (a limit of 0
    bytes): each ignored delivery is forgotten at once."""
    monkeypatch.setattr(recheck, "log", structlog.get_logger("secledger.recheck"))
    monkeypatch.setattr(recovery, "log", structlog.get_logger("secledger.recovery"))
    monkeypatch.setattr(webhook, "RecentlyIgnored", partial(RecentlyIgnored, max_bytes=0))
    settings = api_settings.model_copy(update={"webhook_secrets": [SecretStr(SECRET)]})
    app = create_app(settings, db.Database(database_url, embedded=False))
    with TestClient(app) as client:
        yield client


def unlabelled(body: dict[str, Any]) -> dict[str, Any]:
    """``body`` after its security label was removed."""
    body = json.loads(json.dumps(body))
    body["labels"] = []
    body["object_attributes"]["labels"] = []
    return body


def lose_the_merge(
    serving: TestClient, engine: Engine, instance: str, story: Story, awaited: str
) -> tuple[list[dict[str, Any]], datetime]:
    """This replica lets ``story``'s unlabelled merge go, then learns the MR from another
    replica's record of its opening (received then); the log lines until ``awaited``."""
    opened, _, merged = story.webhooks()
    received_elsewhere = utcnow()
    answer = post(serving, unlabelled(merged), **{"X-Gitlab-Instance": instance})
    assert answer.json()["status"] == "ignored"
    with capture_logs() as logs:
        recorded_elsewhere(engine, opened, received_elsewhere, **{"x-gitlab-instance": instance})
        assert wait_for(lambda: any(e["event"] == awaited for e in logs))
    return logs, received_elsewhere


def test_a_lost_delivery_is_recovered_from_the_api(serving, engine, fake) -> None:
    """MR 20's security label was removed and it was merged. This replica received the
    merge before it knew the MR, and had let it go when another replica's record of the
    MR's opening reached it. GitLab's API tells the merge: it is recorded from there."""
    story = Story(iid=20)
    story.publish(fake)
    logs, received_elsewhere = lose_the_merge(
        serving, engine, fake.url, story, "ignored_delivery_recovered"
    )
    told = sorted((e for e in logs if e["event"].startswith("ignored_")), key=lambda e: e["event"])
    assert [(e["event"], e["log_level"]) for e in told] == [
        ("ignored_delivery_recovered", "warning"),
        ("ignored_delivery_recovering", "warning"),
    ]
    # The label's addition (the webhook told its state, not who added it), the approval
    # and the merge; nothing told twice.
    assert told[0]["new_facts"] == 3
    assert told[0]["first_received_at"] == isoformat(received_elsewhere)
    with engine.connect() as conn:
        row = conn.execute(
            text(
                "SELECT decision, merged_by, approvers FROM security_review_ledger"
                " WHERE mr_iid = 20"
            )
        ).one()
    assert (row.decision, row.merged_by, row.approvers) == ("merged", "carol", ["bob"])
    metrics = serving.get("/metrics").text
    assert 'secledger_ignored_rechecked_total{outcome="recovered"} 1.0' in metrics
    assert 'secledger_ignored_rechecked_total{outcome="lost"} 0.0' in metrics


def test_a_recovery_the_api_refuses_is_reported_lost(serving, engine, fake) -> None:
    """GitLab answers 404 for the MR (deleted since, or out of the token's reach): the
    delivery stays lost, and the log says why."""
    story = Story(iid=21)  # not published: the API does not know MR 21
    logs, _ = lose_the_merge(serving, engine, fake.url, story, "ignored_delivery_lost")
    lost = next(e for e in logs if e["event"] == "ignored_delivery_lost")
    assert (lost["log_level"], lost["mr_iid"]) == ("error", 21)
    assert "404" in lost["error"]
    assert lost["hint"] == recovery.HIDDEN_HINT
    metrics = serving.get("/metrics").text
    assert 'secledger_ignored_rechecked_total{outcome="lost"} 1.0' in metrics


def test_an_endpoint_missing_for_an_existing_mr_is_not_called_hidden(serving, engine, fake) -> None:
    """The MR answers, its state events do not (GitLab before 13.2, a proxy): the hint
    said the API does not show the MR, which it had just shown."""
    story = Story(iid=22)
    story.publish(fake)
    fake.missing.add("/merge_requests/22/resource_state_events")
    logs, _ = lose_the_merge(serving, engine, fake.url, story, "ignored_delivery_lost")
    lost = next(e for e in logs if e["event"] == "ignored_delivery_lost")
    assert "the merge request itself exists" in lost["error"]
    assert lost["hint"] == recovery.RECOVER_HINT


def test_an_mr_of_another_instance_is_not_asked_of_this_api(serving, engine, fake) -> None:
    """The API knows one GitLab instance; an MR of another is reported lost at once."""
    story = Story(iid=22)
    story.publish(fake)
    opened, _, merged = story.webhooks()
    other = "https://gitlab.other.example"
    received_elsewhere = utcnow()
    answer = post(serving, unlabelled(merged), **{"X-Gitlab-Instance": other})
    assert answer.json()["status"] == "ignored"
    before = fake.count("/merge_requests/22")
    with capture_logs() as logs:
        recorded_elsewhere(engine, opened, received_elsewhere, **{"x-gitlab-instance": other})
        assert wait_for(lambda: any(e["event"] == "ignored_delivery_lost" for e in logs))
    assert fake.count("/merge_requests/22") == before
    told = [e for e in logs if e["event"].startswith("ignored_")]
    assert [e["event"] for e in told] == ["ignored_delivery_lost"]
    assert told[0]["error"] == f"the MR is on {other}; SECLEDGER_GITLAB_URL is {fake.url}"


def lost(iid: int, instance: str) -> Lost:
    now = utcnow()
    return Lost(MRKey(instance, 14, iid), now, now)


def test_what_waits_at_shutdown_or_finds_no_room_is_reported_lost(engine, api, monkeypatch) -> None:
    """Nothing is taken here (the thread is not started): one MR waits, the next finds
    the queue full, and shutdown reports the one that waited."""
    monkeypatch.setattr(recovery, "log", structlog.get_logger("secledger.recovery"))
    monkeypatch.setattr(recovery, "MAX_WAITING", 1)
    metrics = Metrics()
    recoverer = recovery.Recoverer(engine, api, POLICY, metrics.rechecked)
    assert recoverer.recover(lost(30, api.instance)) is None
    assert recoverer.recover(lost(31, api.instance)) == (
        "1 recoveries are already waiting for GitLab's API"
    )
    with capture_logs() as logs:
        recoverer.close()
    assert [(e["event"], e["mr_iid"], e["error"]) for e in logs] == [
        ("ignored_delivery_lost", 30, "the receiver shut down before GitLab's API was asked")
    ]
    assert recoverer.recover(lost(32, api.instance)) == "the receiver is shutting down"
    assert 'outcome="lost"} 1.0' in generate_latest(metrics.registry).decode()


def test_recovery_runs_only_with_a_token_and_not_turned_off(api_settings, engine) -> None:
    """Each way recovery is off says so in the lost line's ``error``."""
    tally = Metrics().rechecked
    off = api_settings.model_copy(update={"recover_lost_deliveries": False})
    assert recovery.start(off, engine, tally) is None
    no_token = api_settings.model_copy(update={"gitlab_token": None})
    assert recovery.start(no_token, engine, tally) is None
    anything = lost(40, api_settings.gitlab_url or "")
    assert recovery.off(off)(anything) == "SECLEDGER_RECOVER_LOST_DELIVERIES is false"
    assert recovery.off(no_token)(anything) == "no GitLab API token is configured"
    no_url = api_settings.model_copy(update={"gitlab_url": None})
    assert recovery.off(no_url)(anything) == "SECLEDGER_GITLAB_URL is not set"
    running = recovery.start(api_settings, engine, tally)
    assert running is not None
    running.close()
    assert not running._thread.is_alive()


def test_an_mr_shutdown_stops_waiting_for_ends_once(engine, api, fake, monkeypatch) -> None:
    """GitLab answers slowly (a second a request); shutdown waits a tenth of a second,
    reports the MR in hand lost, and the thread, when its answer comes, writes nothing
    and reports nothing more."""
    monkeypatch.setattr(recovery, "log", structlog.get_logger("secledger.recovery"))
    monkeypatch.setattr(recovery, "CLOSE_SECONDS", 0.1)
    Story(iid=41).publish(fake)
    fake.latency = (1.0, 1.0)
    metrics = Metrics()
    recoverer = recovery.Recoverer(engine, api, POLICY, metrics.rechecked)
    recoverer.start()
    before = log_count(engine)
    with capture_logs() as logs:
        assert recoverer.recover(lost(41, api.instance)) is None
        assert wait_for(lambda: recoverer._in_hand is not None)
        recoverer.close()
        recoverer._thread.join(timeout=30)
    assert not recoverer._thread.is_alive()
    assert [(e["event"], e["error"]) for e in logs] == [
        ("ignored_delivery_lost", "the receiver shut down while GitLab's API was being asked")
    ]
    assert log_count(engine) == before
    exposed = generate_latest(metrics.registry).decode()
    assert 'outcome="lost"} 1.0' in exposed
    assert 'outcome="recovered"} 0.0' in exposed


def test_a_failed_start_stops_what_had_started(api_settings, database_url, tmp_path) -> None:
    """The checkpoint key cannot be read: serve does not start, and the recovery and
    enrichment threads started before it are stopped."""
    missing = tmp_path / "no-such-key.pem"
    settings = api_settings.model_copy(update={"checkpoint_key_file": missing})
    app = create_app(settings, db.Database(database_url, embedded=False))
    named = ("secledger-recover", "secledger-enrich")
    before = sum(t.name in named for t in threading.enumerate())
    with pytest.raises(Exception, match=r"no-such-key"), TestClient(app):
        pass
    assert sum(t.name in named and t.is_alive() for t in threading.enumerate()) == before


def test_an_mr_whose_write_outlasts_shutdown_is_reported_once(
    engine, api, fake, monkeypatch
) -> None:
    """The events are being written (the chain lock is held elsewhere, say) when shutdown
    stops waiting: the MR is reported lost then, since the process is about to end, and
    the write, if it commits after all, reports nothing more."""
    monkeypatch.setattr(recovery, "log", structlog.get_logger("secledger.recovery"))
    monkeypatch.setattr(recovery, "CLOSE_SECONDS", 0.1)
    writing, release = threading.Event(), threading.Event()
    real = recovery.record_envelopes

    def slow(*args: Any, **kwargs: Any) -> int:
        writing.set()
        release.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(recovery, "record_envelopes", slow)
    Story(iid=42).publish(fake)
    metrics = Metrics()
    recoverer = recovery.Recoverer(engine, api, POLICY, metrics.rechecked)
    recoverer.start()
    with capture_logs() as logs:
        assert recoverer.recover(lost(42, api.instance)) is None
        assert writing.wait(30)
        recoverer.close()
        release.set()
        recoverer._thread.join(timeout=30)
    assert not recoverer._thread.is_alive()
    assert [(e["event"], e["error"]) for e in logs] == [
        ("ignored_delivery_lost", "the receiver shut down while the MR's events were written")
    ]
    exposed = generate_latest(metrics.registry).decode()
    assert 'outcome="lost"} 1.0' in exposed
    assert 'outcome="recovered"} 0.0' in exposed
