"""The endpoint end to end: real HTTP handling, real PostgreSQL."""

from __future__ import annotations

import gzip
import json
import time

import pytest
import structlog
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy import Engine, text
from structlog.testing import capture_logs

from builders import dumps, label_change, mr_event, sample
from conftest import SECRET, post
from secledger import web, webhook
from secledger.config import Settings
from secledger.store import db
from secledger.throttle import Throttle
from secledger.web import create_app


def log_count(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM delivery_log")).scalar_one())


def test_security_delivery_is_recorded_and_answered_with_the_ledger_row(client, engine) -> None:
    response = post(client, mr_event("open", labels=["sec::high"], reviewers=["bob"]))
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "recorded"
    assert body["seq"] == 1
    row = body["ledger"]
    assert (row["instance"], row["project_id"], row["mr_iid"]) == (
        "https://gitlab.example.com",
        14,
        1,
    )
    assert row["risk_tier"] == "high"
    assert row["assigned_reviewers"] == ["bob"]
    assert row["labeled_at_source"] == "opened_with_label"
    assert log_count(engine) == 1


def test_non_security_merge_request_is_ignored_and_not_stored(client, engine) -> None:
    response = post(client, mr_event("open", labels=["frontend"]))
    assert response.status_code == 200
    assert response.json() == {
        "status": "ignored",
        "reason": "merge request carries no security label",
    }
    assert log_count(engine) == 0


def test_published_example_without_security_label_is_ignored(client, engine) -> None:
    response = post(client, sample("webhook_events_mr_open.json"))
    assert response.json()["status"] == "ignored"
    assert log_count(engine) == 0


def test_missing_token_is_401_and_nothing_is_stored(client, engine) -> None:
    response = post(client, mr_event("open"), token=None)
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_token"
    assert "missing" in response.json()["message"]
    assert log_count(engine) == 0


def test_a_hook_url_with_a_trailing_slash_is_the_same_endpoint(client, engine) -> None:
    sent = {"X-Gitlab-Event": "Merge Request Hook", "X-Gitlab-Token": SECRET}
    body = json.dumps(mr_event("open", labels=["sec::high"])).encode()
    response = client.post("/webhooks/gitlab/", content=body, headers=sent)
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "recorded"
    assert log_count(engine) == 1


def test_a_compressed_body_is_told_as_such(client, engine) -> None:
    """A gzip body (a proxy's doing: GitLab sends JSON as it is) read "body is not valid
    JSON: unexpected character" with bytes of the compressed stream."""
    sent = {
        "X-Gitlab-Event": "Merge Request Hook",
        "X-Gitlab-Token": SECRET,
        "Content-Encoding": "gzip",
    }
    body = gzip.compress(json.dumps(mr_event("open", labels=["sec::high"])).encode())
    response = client.post("/webhooks/gitlab", content=body, headers=sent)
    assert response.status_code == 415, response.text
    assert response.json()["error"] == "unsupported_encoding"
    assert "Content-Encoding 'gzip' is not supported" in response.json()["message"]
    assert log_count(engine) == 0


def test_serve_writes_a_summary_when_its_minute_ends(
    settings: Settings, database_url: str, monkeypatch
) -> None:
    """serve asks every summary whether its minute is over (web._tick_summaries): after
    a flood, the count was held until the next line of its kind."""
    monkeypatch.setattr(web, "SUMMARY_TICK_SECONDS", 0.05)
    flood = Throttle("test_lines_suppressed", interval=60.0, each=1)
    flood.note(flood.clock(), (("kind", "x"),))
    flood.note(flood.clock(), (("kind", "x"),))  # counted, not logged
    app = create_app(settings, db.Database(database_url, embedded=False))
    with TestClient(app), capture_logs() as logs:
        # Over only once the log is captured: a tick between the app's start and the
        # capture wrote the line where the test could not see it.
        flood.since = flood.clock() - 61  # its minute is over; no line of its kind follows
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any(
            e["event"] == "test_lines_suppressed" for e in logs
        ):
            time.sleep(0.05)
    assert [e["count"] for e in logs if e["event"] == "test_lines_suppressed"] == [1]


def test_wrong_token_is_401(client, engine) -> None:
    response = post(client, mr_event("open"), token="not-the-secret")
    assert response.status_code == 401
    assert response.json()["message"] == "X-Gitlab-Token does not match any configured secret"
    assert log_count(engine) == 0


def test_a_secret_with_characters_beyond_ascii_is_matched_as_gitlab_sends_it(
    settings: Settings, database_url: str, engine
) -> None:
    """GitLab sends the token's UTF-8 bytes; the configured secret is compared as UTF-8."""
    secret = "pässwört-ß-🔐"
    own = settings.model_copy(update={"webhook_secrets": [SecretStr(secret)]})
    with TestClient(create_app(own, db.Database(database_url, embedded=False))) as client:
        sent = {"X-Gitlab-Event": "Merge Request Hook", "X-Gitlab-Token": secret.encode()}
        right = client.post("/webhooks/gitlab", content=dumps(mr_event("open")), headers=sent)
        sent["X-Gitlab-Token"] = "pässwört-ß-🔒".encode()
        wrong = client.post("/webhooks/gitlab", content=dumps(mr_event("open")), headers=sent)
    assert right.status_code == 200, right.text
    assert right.json()["status"] == "recorded"
    assert wrong.status_code == 401
    assert log_count(engine) == 1


def test_malformed_json_is_400_with_a_precise_message(client, engine) -> None:
    response = post(client, b'{"object_kind": "merge_request",')
    assert response.status_code == 400
    assert response.json()["error"] == "malformed_json"
    assert "not valid JSON" in response.json()["message"]
    assert log_count(engine) == 0


def test_json_that_is_not_an_object_is_400(client) -> None:
    response = post(client, b"[1, 2, 3]")
    assert response.status_code == 400
    assert response.json()["message"] == "body must be a JSON object, got list"


def test_oversized_body_is_413(settings, database_url) -> None:
    small = settings.model_copy(update={"max_body_bytes": 1024})
    with TestClient(create_app(small, db.Database(database_url, embedded=False))) as client:
        response = post(client, mr_event("open", title="x" * 4000))
    assert response.status_code == 413
    assert response.json()["error"] == "body_too_large"


def test_merge_request_without_iid_is_400(client, engine) -> None:
    body = mr_event("open")
    del body["object_attributes"]["iid"]
    response = post(client, body)
    assert response.status_code == 400
    assert response.json() == {
        "status": "rejected",
        "error": "missing_field",
        "message": "object_attributes.iid must be an integer, got None",
    }
    assert log_count(engine) == 0


def test_other_events_are_ignored_with_200(client, engine) -> None:
    response = post(client, {"object_kind": "push"}, event="Push Hook")
    assert response.status_code == 200
    assert response.json() == {
        "status": "ignored",
        "reason": "event 'Push Hook' is not a merge request event",
    }
    system_push = post(client, {"object_kind": "push", "event_name": "push"}, event="System Hook")
    assert system_push.json()["reason"] == "object_kind 'push' is not merge_request"
    assert log_count(engine) == 0


def test_duplicate_delivery_is_answered_duplicate_and_changes_nothing(client, engine) -> None:
    body = dumps(mr_event("approved", actor="bob"))
    first = post(client, body)
    second = post(client, body)
    assert first.json()["status"] == "recorded"
    assert second.status_code == 200
    assert second.json()["status"] == "duplicate"
    assert second.json()["seq"] == first.json()["seq"]
    assert second.json()["ledger"]["approvers"] == ["bob"]
    assert log_count(engine) == 1


def test_idempotency_key_identifies_a_resend(client, engine) -> None:
    first = post(client, mr_event("approved", actor="bob"), Idempotency_Key="abc-123")
    changed = mr_event("approved", actor="bob", title="retitled meanwhile")
    second = post(client, changed, Idempotency_Key="abc-123")
    assert first.json()["status"] == "recorded"
    assert second.json()["status"] == "duplicate"
    assert log_count(engine) == 1


def test_update_adding_a_label_makes_the_mr_a_security_mr_from_then_on(client, engine) -> None:
    assert post(client, mr_event("open", labels=["backend"])).json()["status"] == "ignored"
    added = mr_event(
        "update",
        labels=["backend", "sec/medium"],
        actor="erin",
        updated_at="2025-08-05 22:00:00 UTC",
        changes=label_change(["backend"], ["backend", "sec/medium"], "2025-08-05 22:00:00 UTC"),
    )
    row = post(client, added).json()["ledger"]
    assert row["labeled_at"] == "2025-08-05T22:00:00Z"
    assert row["labeled_at_source"] == "label_added"
    assert row["labeled_by"] == "erin"
    removed = mr_event(
        "update",
        labels=["backend"],
        updated_at="2025-08-05 23:00:00 UTC",
        changes=label_change(["backend", "sec/medium"], ["backend"], "2025-08-05 23:00:00 UTC"),
    )
    assert post(client, removed).json()["status"] == "recorded"
    merged = post(
        client, mr_event("merge", labels=["backend"], updated_at="2025-08-06 00:00:00 UTC")
    )
    assert merged.json()["status"] == "recorded"
    assert merged.json()["ledger"]["security_labels"] == []
    assert merged.json()["ledger"]["risk_tier"] == "medium"
    assert log_count(engine) == 3


def test_older_delivery_arriving_late_does_not_roll_back_the_row(client) -> None:
    approve = mr_event("approved", actor="bob", updated_at="2025-08-05 22:00:00 UTC")
    merge = mr_event("merge", actor="alice", updated_at="2025-08-05 23:00:00 UTC")
    post(client, merge)
    row = post(client, approve).json()["ledger"]
    assert row["state"] == "merged"
    assert row["decision"] == "merged"
    assert row["decided_by"] == "alice"
    assert row["approvers"] == ["bob"]
    assert row["last_event_at"] == "2025-08-05T23:00:00Z"


def test_system_hook_without_action_is_accepted(client) -> None:
    body = sample("system_hook_mr_open.json")
    body["labels"] = [{"title": "sec/high"}]
    body["object_attributes"].pop("action", None)
    response = post(client, body, event="System Hook")
    assert response.status_code == 200
    row = response.json()["ledger"]
    assert row["state"] == "opened"
    assert row["risk_tier"] == "high"
    assert row["labeled_at"] == "2013-12-03T17:23:34Z"


def test_healthz_and_readyz(client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["ready"] is True


def test_get_on_the_webhook_is_405(client) -> None:
    response = client.get("/webhooks/gitlab")
    assert response.status_code == 405
    assert json.loads(response.content)["error"] == "method_not_allowed"


def test_shutdown_logs_the_ignored_deliveries_of_the_last_partial_minute(
    settings: Settings, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(webhook, "log", structlog.get_logger("secledger.webhook"))
    app = create_app(settings, db.Database(database_url, embedded=False))
    with capture_logs() as logged:
        with TestClient(app) as client:
            for iid in (1, 2):
                assert (
                    post(client, mr_event("open", iid=iid, labels=["frontend"])).status_code == 200
                )
            assert not [line for line in logged if line["event"] == "deliveries_ignored"]
        summaries = [line for line in logged if line["event"] == "deliveries_ignored"]
    assert len(summaries) == 1
    assert summaries[0]["count"] == 2


def test_a_flood_of_bad_tokens_logs_twenty_lines_and_then_a_count(
    settings: Settings, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(webhook, "log", structlog.get_logger("secledger.webhook"))
    app = create_app(settings, db.Database(database_url, embedded=False))
    with capture_logs() as logged, TestClient(app) as client:
        for _ in range(25):
            assert post(client, mr_event("open"), token="wrong").status_code == 401
    rejected = [line for line in logged if line["event"] == "delivery_rejected"]
    assert len(rejected) == 20
    [summary] = [line for line in logged if line["event"] == "deliveries_rejected_suppressed"]
    # Written at shutdown: the minute was not over.
    assert (summary["status"], summary["error"], summary["count"]) == (401, "invalid_token", 5)
