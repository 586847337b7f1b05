"""One GitLab event delivered by several hooks is logged once and counted once.

A project hook and a group hook send one event's body byte for byte, each with its own
``Idempotency-Key`` and ``X-Gitlab-Webhook-UUID`` (they share ``X-Gitlab-Event-UUID``).
The second copy is answered ``duplicate`` with the first one's seq, whichever way it
comes in: the endpoint, one batch, a later batch, another replica, the spool, a replay.

A system hook sends the same event in other bytes: both are logged (the log keeps what
was received), and the ledger, findings and reports count the event once.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import Connection, Engine, text

from builders import dumps, mr_event, system_hook_event
from chainkit import app_url
from conftest import post
from secledger import findings, reports
from secledger.drain import Drainer
from secledger.extract import EventFacts, extract_facts
from secledger.intake import Delivery, parse_delivery
from secledger.policy import LabelPolicy
from secledger.service import Outcome, feed, record_batch, record_locked
from secledger.spool import Spool
from secledger.store import db, ledger
from secledger.store.log import Chain, Logged, send_rows
from secledger.store.pipeline import pipeline
from secledger.tierpolicy import CompliancePolicy
from secledger.times import utcnow

POLICY = LabelPolicy()
RECEIVED = datetime(2025, 8, 5, 21, 48, 30, tzinfo=UTC)
APPROVAL = dumps(mr_event("approved", actor="bob"))
MERGE = dumps(mr_event("merge", actor="carol", updated_at="2025-08-05 22:10:00 UTC"))


def delivery(body: bytes, key: str, **headers: str) -> tuple[Delivery, EventFacts]:
    """A delivery from one hook (its own Idempotency-Key) and its facts."""
    sent = {"x-gitlab-event": "Merge Request Hook", "idempotency-key": key} | headers
    parsed = parse_delivery(
        sent, body, secrets=(), max_body_bytes=1 << 20, received_at=RECEIVED, require_token=False
    )
    assert isinstance(parsed, Delivery)
    return parsed, extract_facts(parsed, POLICY)


def log_keys(engine: Engine) -> list[tuple[int, str]]:
    with engine.connect() as conn:
        query = text("SELECT seq, dedup_key FROM delivery_log ORDER BY seq")
        return [(int(seq), str(key)) for seq, key in conn.execute(query)]


def statuses(outcomes: list[Outcome]) -> list[tuple[str, int | None]]:
    return [(outcome.status, outcome.seq) for outcome in outcomes]


def test_group_hook_copy_is_answered_like_a_resend_and_not_logged(client: TestClient, engine):
    hook = {"X_Gitlab_Event_UUID": "event-1"}
    project = post(client, APPROVAL, Idempotency_Key="p-1", X_Gitlab_Webhook_UUID="w-1", **hook)
    group = post(client, APPROVAL, Idempotency_Key="g-1", X_Gitlab_Webhook_UUID="w-2", **hook)
    resend = post(client, APPROVAL, Idempotency_Key="p-1", X_Gitlab_Webhook_UUID="w-3", **hook)
    assert project.status_code == group.status_code == resend.status_code == 200
    first = project.json()
    assert first["status"] == "recorded"
    assert group.json()["status"] == "duplicate"
    assert group.json()["seq"] == first["seq"]
    # Exactly the answer GitLab's own resend of the project hook's delivery gets.
    assert group.json() == resend.json()
    assert log_keys(engine) == [(first["seq"], "idem:p-1")]

    later = post(client, MERGE, Idempotency_Key="p-2", X_Gitlab_Event_UUID="event-2")
    assert later.json()["status"] == "recorded"
    assert later.json()["seq"] == first["seq"] + 1
    assert later.json()["ledger"]["event_count"] == 2
    assert later.json()["ledger"]["approvers"] == ["bob"]


def test_identical_bodies_in_one_batch_and_across_batches(engine: Engine) -> None:
    with engine.begin() as conn:
        outcomes = record_batch(
            conn,
            Chain.open(conn),
            [delivery(APPROVAL, "p-1"), delivery(APPROVAL, "g-1"), delivery(MERGE, "p-2")],
        )
    assert statuses(outcomes) == [("recorded", 1), ("duplicate", 1), ("recorded", 2)]
    assert outcomes[1].row is not None
    assert outcomes[1].row["approvers"] == ["bob"]  # the row as it stood after seq 1
    with engine.begin() as conn:
        again = record_locked(conn, [delivery(MERGE, "g-2"), delivery(APPROVAL, "g-1")])
    assert statuses(again) == [("duplicate", 2), ("duplicate", 1)]
    assert log_keys(engine) == [(1, "idem:p-1"), (2, "idem:p-2")]


def test_a_row_logged_before_body_hashes_were_stored_is_still_matched(engine: Engine) -> None:
    """Rows from before migration 0010 have no body_sha256; the index hashes their payload."""
    old, facts = delivery(APPROVAL, "p-1")
    with engine.begin() as conn:
        chain = Chain.open(conn)
        _, rows = chain.extend([old], Logged())
        with pipeline(conn) as pg:
            send_rows(pg, [row | {"body_sha256": None} for row in rows])
            ledger.send_events(pg, [(1, facts)])
    with engine.connect() as conn:
        stored = conn.execute(text("SELECT body_sha256 FROM delivery_log")).scalar_one()
    assert stored is None
    with engine.begin() as conn:
        outcomes = record_locked(conn, [delivery(APPROVAL, "g-1")])
    assert statuses(outcomes) == [("duplicate", 1)]


def test_the_same_body_from_another_instance_is_its_own_event(engine: Engine) -> None:
    other = {"x-gitlab-instance": "https://gitlab.other.example"}
    with engine.begin() as conn:
        outcomes = record_locked(
            conn, [delivery(APPROVAL, "p-1"), delivery(APPROVAL, "x-1", **other)]
        )
    assert statuses(outcomes) == [("recorded", 1), ("recorded", 2)]


def _waiting_for_the_chain_lock(conn: Connection) -> bool:
    query = text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
    return bool(conn.execute(query).scalar_one())


def test_a_copy_sent_to_another_replica_waits_for_the_lock_and_is_a_duplicate(
    database_url: str, engine: Engine
) -> None:
    """Replica B's batch reads the log only once replica A has committed its copy."""
    replica_a = db.create(app_url(database_url), pool_size=1)
    replica_b = db.create(app_url(database_url), pool_size=1)
    answers: dict[str, list[Outcome]] = {}

    def record_on_b() -> None:
        with replica_b.begin() as conn:
            answers["b"] = record_locked(conn, [delivery(APPROVAL, "g-1")])

    try:
        with replica_a.begin() as conn:
            answers["a"] = record_locked(conn, [delivery(APPROVAL, "p-1")])
            other = threading.Thread(target=record_on_b)
            other.start()
            deadline = time.monotonic() + 30
            with engine.connect() as watcher:
                while not _waiting_for_the_chain_lock(watcher):
                    assert time.monotonic() < deadline, "replica B never waited for the lock"
                    time.sleep(0.02)
        other.join(timeout=30)
    finally:
        replica_a.dispose()
        replica_b.dispose()
    assert statuses(answers["a"]) == [("recorded", 1)]
    assert statuses(answers["b"]) == [("duplicate", 1)]
    assert log_keys(engine) == [(1, "idem:p-1")]


def test_spool_drain_logs_one_of_two_hooks_copies(tmp_path: Path, engine: Engine) -> None:
    spool = Spool.open(tmp_path / "spool")
    spool.write([delivery(APPROVAL, "p-1")[0], delivery(APPROVAL, "g-1")[0]])
    result = Drainer(engine, spool, POLICY).all()
    assert (result.recorded, result.duplicates, result.remaining) == (1, 1, 0)
    assert log_keys(engine) == [(1, "idem:p-1")]


def test_replaying_a_delivered_body_is_a_duplicate(engine: Engine) -> None:
    with engine.begin() as conn:
        record_locked(conn, [delivery(APPROVAL, "p-1")])
    replayed: dict[str, Any] = {"x-gitlab-event": "Merge Request Hook"}
    outcome = feed(engine, POLICY, replayed, APPROVAL, max_body_bytes=1 << 20, source="replay")
    assert (outcome.status, outcome.seq) == ("duplicate", 1)
    assert log_keys(engine) == [(1, "idem:p-1")]


def test_system_hook_copy_is_logged_but_the_approval_counts_once(client: TestClient, engine):
    opened = mr_event("open", updated_at="2025-08-05 21:00:00 UTC")
    assert post(client, opened, Idempotency_Key="p-0").json()["status"] == "recorded"
    project = post(client, APPROVAL, Idempotency_Key="p-1", X_Gitlab_Event_UUID="event-1")
    system = post(
        client,
        system_hook_event("approved", actor="bob"),
        event="System Hook",
        Idempotency_Key="s-1",
        X_Gitlab_Event_UUID="event-1",
    )
    assert [project.json()["status"], system.json()["status"]] == ["recorded", "recorded"]
    row = system.json()["ledger"]
    assert row["approvers"] == ["bob"]
    assert row["event_count"] == 2  # the open and one approval
    assert row["decided_at"] == "2025-08-05T21:48:25Z"
    assert row["time_to_decision_seconds"] == 6505  # from creation, 20:00:00, opened labelled
    later = post(client, MERGE, Idempotency_Key="p-2").json()
    assert (later["status"], later["ledger"]["event_count"]) == ("recorded", 3)
    assert len(log_keys(engine)) == 4

    now = datetime(2025, 8, 6, tzinfo=UTC)
    with engine.connect() as conn:
        rows = {r.reviewer: r for r in reports.reviewers(conn, reports.Filters(now=now))}
        metrics = conn.execute(
            text("SELECT reviewer, decisions, approvals FROM bi_reviewer_metrics ORDER BY 1")
        ).all()
        decisions = conn.execute(text("SELECT count(*) FROM bi_decisions")).scalar_one()
    assert (rows["bob"].decisions, rows["bob"].approvals) == (1, 1)
    assert (rows["carol"].decisions, rows["carol"].approvals) == (1, 0)
    assert [tuple(m) for m in metrics] == [("bob", 1, 1), ("carol", 1, 0)]
    assert decisions == 2


def test_an_author_approving_through_two_hooks_is_one_approval_in_the_finding(
    client: TestClient, engine: Engine
) -> None:
    own = post(client, mr_event("approved", actor="alice"), Idempotency_Key="p-1").json()
    post(client, system_hook_event("approved", actor="alice"), event="System Hook")
    with engine.connect() as conn:
        listed = findings.list_findings(conn, CompliancePolicy(), utcnow(), rule="author-approved")
        [finding] = listed
    assert finding.seqs == [own["seq"]]
    assert finding.evidence["approved_at"] == ["2025-08-05T21:48:25Z"]
