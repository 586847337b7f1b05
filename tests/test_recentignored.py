"""Ignored deliveries held for a moment, and recorded when their MR turns out known:
another replica's first write of an MR reaches this one's known set only with its
NOTIFY, and a delivery without a security label in between was answered ``ignored``."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from functools import partial

import structlog
from sqlalchemy import text
from structlog.testing import capture_logs

from builders import dumps, mr_event
from conftest import post
from secledger import webhook
from secledger.config import Settings
from secledger.extract import MRKey, extract_facts
from secledger.headers import RequestHeaders
from secledger.intake import Ignored, parse_delivery
from secledger.membership import KnownMRs
from secledger.policy import LabelPolicy
from secledger.recentignored import Held, RecentlyIgnored
from secledger.service import record_one
from secledger.times import utcnow

NOW = datetime(2025, 8, 5, tzinfo=UTC)
STAMPS = (None, "2025-08-05 00:00:00 UTC")


def held(at: float, iid: int, size: int = 10) -> Held:
    key = MRKey("https://gitlab.example.com", 14, iid)
    return Held(at, key, RequestHeaders([]), b"x" * size, NOW, None, STAMPS)


def test_held_deliveries_are_taken_by_key_and_forgotten_by_age_and_size() -> None:
    recent = RecentlyIgnored(seconds=5.0, max_bytes=100)
    for at, iid in ((0.0, 1), (1.0, 2), (2.0, 1)):
        recent.hold(held(at, iid))
    taken = recent.take({held(0, 1).key}, now=3.0)
    assert [(h.at, h.key.mr_iid) for h in taken] == [(0.0, 1), (2.0, 1)]
    assert recent.take({held(0, 1).key}, now=3.0) == []  # taken once
    assert len(recent) == 1
    assert recent.take({held(0, 2).key}, now=6.5) == []  # held at 1.0: older than 5 s
    for n in range(12):
        recent.hold(held(10.0 + n / 100, 3))  # 120 bytes against a limit of 100
    assert len(recent) == 10
    recent.hold(held(10.5, 4, size=101))  # larger than the limit: not held, nothing pushed out
    assert len(recent) == 10
    assert [h.at for h in recent.take({held(0, 3).key}, now=10.5)] == [
        10.0 + n / 100 for n in range(2, 12)
    ]


def wait_for(condition, seconds: float = 20.0) -> bool:
    pause = threading.Event()
    for _ in range(int(seconds * 10)):  # bounded: a loaded machine may take a while
        if condition():
            return True
        pause.wait(0.1)
    return condition()


def logged_keys(engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.execute(text("SELECT dedup_key FROM delivery_log")).scalars())


def first_delivery(engine, iid: int, key: str, received_at: datetime) -> None:
    """The MR's first delivery, recorded by another replica, received at ``received_at``."""
    headers = {"x-gitlab-event": "Merge Request Hook", "idempotency-key": key}
    delivery = parse_delivery(
        headers,
        dumps(mr_event("open", iid=iid)),
        secrets=(),
        max_body_bytes=1 << 20,
        received_at=received_at,
        require_token=False,
        source="webhook",
    )
    assert not isinstance(delivery, Ignored)
    policy = LabelPolicy.from_settings(Settings())
    outcome = record_one(engine, delivery, extract_facts(delivery, policy))
    assert outcome.status == "recorded"


def test_an_ignored_delivery_is_recorded_when_another_replica_records_its_mr(
    client, engine, monkeypatch
) -> None:
    """Another replica received MR 7's first delivery (with its security label) just
    before this one received an update without it, and committed just after: this
    replica did not know MR 7 yet and answered ``ignored``. The NOTIFY of that commit
    makes it record what it ignored."""
    # A logger not cached by an earlier test's configuration, so capture_logs sees it.
    monkeypatch.setattr(webhook, "log", structlog.get_logger("secledger.webhook"))
    received_elsewhere = utcnow()
    plain = mr_event("update", iid=7, labels=["backend"], updated_at="2025-08-05 22:00:00 UTC")
    assert post(client, plain, **{"Idempotency-Key": "late-7"}).json()["status"] == "ignored"
    # Ignored before MR 8 became a security MR anywhere: rightly ignored, and it stays so.
    early = mr_event("open", iid=8, labels=["backend"])
    assert post(client, early, **{"Idempotency-Key": "early-8"}).json()["status"] == "ignored"
    # MR 9's first delivery reads as received just after this one, by another replica's
    # clock (within the clocks' margin); GitLab's event times say this one came later.
    skewed = mr_event("update", iid=9, labels=["backend"], updated_at="2025-08-05 22:00:00 UTC")
    assert post(client, skewed, **{"Idempotency-Key": "skewed-9"}).json()["status"] == "ignored"
    received_after_by_its_clock = utcnow()
    assert logged_keys(engine) == set()

    with capture_logs() as logs:
        first_delivery(engine, 7, "first-7", received_elsewhere)
        first_delivery(engine, 8, "first-8", utcnow())
        first_delivery(engine, 9, "first-9", received_after_by_its_clock)
        assert wait_for(lambda: "idem:late-7" in logged_keys(engine))
        assert wait_for(lambda: len([e for e in logs if e["event"].startswith("ignored_")]) == 3)
    assert logged_keys(engine) == {
        *("idem:first-7", "idem:late-7", "idem:first-8"),
        *("idem:first-9", "idem:skewed-9"),
    }
    told = sorted((e for e in logs if e["event"].startswith("ignored_")), key=lambda e: e["mr_iid"])
    assert [(e["event"], e["mr_iid"], e["log_level"]) for e in told] == [
        ("ignored_delivery_recorded", 7, "warning"),
        ("ignored_delivery_left", 8, "info"),
        ("ignored_delivery_recorded", 9, "warning"),
    ]
    assert told[0]["outcome"] == "recorded"
    with engine.connect() as conn:
        row = conn.execute(
            text("SELECT event_count, last_event_at FROM security_review_ledger WHERE mr_iid = 7")
        ).one()
    assert row.event_count == 2
    assert row.last_event_at == datetime(2025, 8, 5, 22, 0, tzinfo=UTC)


def test_forgotten_deliveries_leave_their_mr_and_newest_times() -> None:
    recent = RecentlyIgnored(seconds=5.0, max_bytes=100, forgotten_keys=4)
    assert not recent.watching
    early = datetime(2025, 8, 5, 10, tzinfo=UTC)
    key = [held(0, n).key for n in range(10)]
    for at, iid, received_at in ((0.0, 1, early), (1.0, 1, NOW), (2.0, 2, NOW)):
        recent.hold(held(at, iid)._replace(received_at=received_at))
    assert recent.take_forgotten({key[1]}) == {}  # all still held
    recent.hold(held(6.5, 3))  # MR 1's two deliveries are older than 5 s now
    assert recent.take_forgotten({key[1], key[2]}) == {key[1]: (NOW, STAMPS)}
    assert recent.take_forgotten({key[1]}) == {}  # taken once
    recent.hold(held(7.0, 4, size=101))  # never held, forgotten at once
    assert recent.watching and len(recent) == 2
    for iid in (5, 6, 7):
        recent.hold(held(20.0, iid, size=101))
    # Two generations of two keys each here: MRs 4 and 5 went with the older one.
    assert set(recent.take_forgotten(key)) == {key[6], key[7]}
    # The newest delivery's times are kept, in whichever generation it is.
    recent.hold(held(21.0, 8, size=101)._replace(received_at=early))
    recent.hold(held(21.0, 9, size=101))  # the generation of MR 8's first one is full
    recent.hold(held(22.0, 8, size=101))
    assert recent.take_forgotten({key[8]}) == {key[8]: (NOW, STAMPS)}
    assert recent.take_forgotten({key[8]}) == {}


def test_an_ignored_delivery_no_longer_held_is_reported_lost_when_its_mr_becomes_known(
    client, engine, monkeypatch
) -> None:
    """Nothing is held here (a limit of 0 bytes): each ignored delivery is forgotten at
    once. When its MR becomes known, one received after the MR's first logged delivery
    is reported lost, with a metric to alert on. One received just before it (within the
    clocks' margin), about an earlier event in GitLab, is not."""
    monkeypatch.setattr(webhook, "log", structlog.get_logger("secledger.webhook"))
    monkeypatch.setattr(webhook, "RecentlyIgnored", partial(RecentlyIgnored, max_bytes=0))
    received_elsewhere = utcnow()
    late = mr_event("update", iid=20, labels=["backend"])
    assert post(client, late, **{"Idempotency-Key": "late-20"}).json()["status"] == "ignored"
    early = mr_event("open", iid=21, labels=["backend"])
    assert post(client, early, **{"Idempotency-Key": "early-21"}).json()["status"] == "ignored"
    with capture_logs() as logs:
        first_delivery(engine, 20, "first-20", received_elsewhere)
        first_delivery(engine, 21, "first-21", utcnow())
        assert wait_for(lambda: len([e for e in logs if e["event"].startswith("ignored_")]) == 2)
    told = sorted((e for e in logs if e["event"].startswith("ignored_")), key=lambda e: e["mr_iid"])
    assert [(e["event"], e["mr_iid"], e["log_level"]) for e in told] == [
        ("ignored_delivery_lost", 20, "error"),
        ("ignored_delivery_left", 21, "info"),
    ]
    assert "reconcile" in told[0]["hint"]
    assert logged_keys(engine) == {"idem:first-20", "idem:first-21"}  # nothing to record it from
    metrics = client.get("/metrics").text
    assert 'secledger_ignored_rechecked_total{outcome="lost"} 1.0' in metrics
    assert 'secledger_ignored_rechecked_total{outcome="left"} 1.0' in metrics
    assert 'secledger_ignored_rechecked_total{outcome="recorded"} 0.0' in metrics


class LearntMeanwhile(KnownMRs):
    """A known set that learns ``key`` (as the writer or the listener would, on another
    thread) just after the handler found it missing, before the handler holds the
    delivery: when it is told, nothing is held yet."""

    def __init__(self, key: MRKey) -> None:
        super().__init__()
        self.key = key

    def __contains__(self, key: object) -> bool:
        found = super().__contains__(key)
        if key == self.key and not found:
            self.add(self.key)
        return found


def test_a_key_learnt_between_the_test_and_the_hold_is_looked_at_again(
    client, engine, monkeypatch
) -> None:
    monkeypatch.setattr(webhook, "log", structlog.get_logger("secledger.webhook"))
    # The handler is made on the first webhook request; this one is not held.
    assert post(client, {"object_kind": "push"}, event="Push Hook").json()["status"] == "ignored"
    runtime = client.app.api.state.runtime
    key = MRKey("https://gitlab.example.com", 14, 30)
    first_delivery(engine, 30, "first-30", utcnow())  # recorded elsewhere, received first
    meanwhile = LearntMeanwhile(key)
    meanwhile.on_new = runtime.known.on_new
    monkeypatch.setattr(runtime, "known", meanwhile)
    plain = mr_event("update", iid=30, labels=["backend"])
    with capture_logs() as logs:
        assert post(client, plain, **{"Idempotency-Key": "late-30"}).json()["status"] == "ignored"
        assert wait_for(lambda: "idem:late-30" in logged_keys(engine))
    assert [e["event"] for e in logs if e["event"].startswith("ignored_")] == [
        "ignored_delivery_recorded"
    ]
