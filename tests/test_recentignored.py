"""Ignored deliveries held for a moment, and recorded when their MR turns out known:
another replica's first write of an MR reaches this one's known set only with its
NOTIFY, and a delivery without a security label in between was answered ``ignored``."""

from __future__ import annotations

import asyncio
import socket
from datetime import UTC, datetime, timedelta
from functools import partial
from types import SimpleNamespace

import structlog
from prometheus_client import generate_latest
from sqlalchemy import text
from structlog.testing import capture_logs

from builders import mr_event
from conftest import post
from replicas import recorded_elsewhere, wait_for
from secledger import receiptorder, recheck, webhook
from secledger.extract import MRKey
from secledger.headers import RequestHeaders
from secledger.membership import KnownMRs
from secledger.metrics import Metrics
from secledger.recentignored import Held, RecentlyIgnored
from secledger.store import db
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
    taken = recent.take({held(0, 1).key})
    assert [(h.at, h.key.mr_iid) for h in taken] == [(0.0, 1), (2.0, 1)]
    assert recent.take({held(0, 1).key}) == []  # taken once
    assert len(recent) == 1
    recent.hold(held(6.5, 5))  # the one held at 1.0 is older than 5 s now
    assert recent.take({held(0, 2).key}) == []
    for n in range(12):
        recent.hold(held(10.0 + n / 100, 3))  # 120 bytes against a limit of 100
    assert len(recent) == 10
    recent.hold(held(10.5, 4, size=101))  # larger than the limit: not held, nothing pushed out
    assert len(recent) == 10
    assert [h.at for h in recent.take({held(0, 3).key})] == [10.0 + n / 100 for n in range(2, 12)]


def test_a_body_still_held_is_taken_whatever_its_age() -> None:
    """Bodies go when newer ones come: at low traffic one older than the age limit may
    still be here when its MR is learnt (a listener reconnecting); it is recorded then,
    not reported lost."""
    recent = RecentlyIgnored(seconds=5.0, max_bytes=100)
    recent.hold(held(0.0, 1))
    assert [h.key.mr_iid for h in recent.take({held(0, 1).key})] == [1]
    assert recent.take_forgotten({held(0, 1).key}) == {}


def logged_keys(engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.execute(text("SELECT dedup_key FROM delivery_log")).scalars())


def first_delivery(engine, iid: int, key: str, received_at: datetime) -> None:
    """The MR's first delivery, recorded by another replica, received at ``received_at``."""
    recorded_elsewhere(engine, mr_event("open", iid=iid), received_at, **{"idempotency-key": key})


def test_an_ignored_delivery_is_recorded_when_another_replica_records_its_mr(
    client, engine, monkeypatch
) -> None:
    """Another replica received MR 7's first delivery (with its security label) just
    before this one received an update without it, and committed just after: this
    replica did not know MR 7 yet and answered ``ignored``. The NOTIFY of that commit
    makes it record what it ignored."""
    # A logger not cached by an earlier test's configuration, so capture_logs sees it.
    monkeypatch.setattr(recheck, "log", structlog.get_logger("secledger.recheck"))
    received_elsewhere = utcnow()
    plain = mr_event("update", iid=7, labels=["backend"], updated_at="2025-08-05 22:00:00 UTC")
    assert post(client, plain, **{"Idempotency-Key": "late-7"}).json()["status"] == "ignored"
    # Sent again (GitLab's "Resend request"): held twice, logged once.
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
        assert wait_for(lambda: len([e for e in logs if e["event"].startswith("ignored_")]) == 4)
    assert logged_keys(engine) == {
        *("idem:first-7", "idem:late-7", "idem:first-8"),
        *("idem:first-9", "idem:skewed-9"),
    }
    told = sorted((e for e in logs if e["event"].startswith("ignored_")), key=lambda e: e["mr_iid"])
    assert [(e["event"], e["mr_iid"], e["log_level"]) for e in told] == [
        ("ignored_delivery_recorded", 7, "warning"),
        ("ignored_delivery_recorded", 7, "warning"),
        ("ignored_delivery_left", 8, "info"),
        ("ignored_delivery_recorded", 9, "warning"),
    ]
    assert [told[0]["outcome"], told[1]["outcome"]] == ["recorded", "duplicate"]
    metrics = client.get("/metrics").text
    assert 'secledger_ignored_rechecked_total{outcome="recorded"} 2.0' in metrics
    assert 'secledger_ignored_rechecked_total{outcome="duplicate"} 1.0' in metrics
    assert 'secledger_ignored_rechecked_total{outcome="left"} 1.0' in metrics
    with engine.connect() as conn:
        row = conn.execute(
            text("SELECT event_count, last_event_at FROM security_review_ledger WHERE mr_iid = 7")
        ).one()
    assert row.event_count == 2
    assert row.last_event_at == datetime(2025, 8, 5, 22, 0, tzinfo=UTC)


def test_forgotten_deliveries_leave_their_mr_and_newest_times() -> None:
    recent = RecentlyIgnored(seconds=5.0, max_bytes=100, forgotten_keys=4)
    assert not recent.watching
    early = datetime(2025, 8, 4, 10, tzinfo=UTC)
    key = [held(0, n).key for n in range(13)]
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
    # Newest by receipt, not by when it was let go: a body too large to hold goes at
    # once, before an older one held for the same MR.
    recent.hold(held(23.0, 11, size=20)._replace(received_at=early))
    recent.hold(held(23.1, 11, size=101))  # received at NOW
    recent.hold(held(29.0, 12, size=20))  # MR 11's held one is older than 5 s now
    assert recent.take_forgotten({key[11]}) == {key[11]: (NOW, STAMPS)}


def test_an_ignored_delivery_no_longer_held_is_reported_lost_when_its_mr_becomes_known(
    client, engine, monkeypatch
) -> None:
    """Nothing is held here (a limit of 0 bytes): each ignored delivery is forgotten at
    once. When its MR becomes known, one that came after the MR's first logged delivery
    is reported lost, with a metric to alert on; one that came before it is not. All
    are within the clocks' margin here (a minute, for a slow machine): GitLab's event
    times decide, from the kept stamps, whichever replica's clock says later."""
    monkeypatch.setattr(recheck, "log", structlog.get_logger("secledger.recheck"))
    monkeypatch.setattr(receiptorder, "CLOCK_MARGIN", timedelta(minutes=1))
    monkeypatch.setattr(webhook, "RecentlyIgnored", partial(RecentlyIgnored, max_bytes=0))
    late = mr_event("update", iid=20, labels=["backend"], updated_at="2025-08-05 22:00:00 UTC")
    assert post(client, late, **{"Idempotency-Key": "late-20"}).json()["status"] == "ignored"
    early = mr_event("open", iid=21, labels=["backend"])
    assert post(client, early, **{"Idempotency-Key": "early-21"}).json()["status"] == "ignored"
    # MR 22's first delivery reads as received before this one, by another replica's
    # clock, but GitLab's times say this one's event came first: not lost.
    received_elsewhere = utcnow()
    opened = mr_event("open", iid=22, labels=["backend"], updated_at="2025-08-05 20:00:00 UTC")
    assert post(client, opened, **{"Idempotency-Key": "opened-22"}).json()["status"] == "ignored"
    with capture_logs() as logs:
        # Received after MRs 20 and 21's by another replica's clock; about an earlier
        # event than MR 20's update, and the same event as MR 21's open.
        first_delivery(engine, 20, "first-20", utcnow())
        first_delivery(engine, 21, "first-21", utcnow())
        first_delivery(engine, 22, "first-22", received_elsewhere)
        assert wait_for(lambda: len([e for e in logs if e["event"].startswith("ignored_")]) == 3)
    told = sorted((e for e in logs if e["event"].startswith("ignored_")), key=lambda e: e["mr_iid"])
    assert [(e["event"], e["mr_iid"], e["log_level"]) for e in told] == [
        ("ignored_delivery_lost", 20, "error"),
        ("ignored_delivery_left", 21, "info"),
        ("ignored_delivery_left", 22, "info"),
    ]
    assert "backfill --label-history" in told[0]["hint"]
    assert logged_keys(engine) == {"idem:first-20", "idem:first-21", "idem:first-22"}
    metrics = client.get("/metrics").text
    assert 'secledger_ignored_rechecked_total{outcome="lost"} 1.0' in metrics
    assert 'secledger_ignored_rechecked_total{outcome="left"} 2.0' in metrics
    assert 'secledger_ignored_rechecked_total{outcome="recorded"} 0.0' in metrics


def test_lost_needs_a_later_receipt_beyond_the_clocks_margin_or_a_later_event() -> None:
    first_received = datetime(2025, 8, 5, 12, tzinfo=UTC)
    first_event = datetime(2025, 8, 5, 11, 59, tzinfo=UTC)
    before, after = first_event - timedelta(minutes=1), first_event + timedelta(minutes=1)
    just = timedelta(milliseconds=500)
    cases = [  # receipt, event: came_after (recording leans towards it), surely_after
        (first_received + just, before, True, False),  # this replica's clock may be ahead
        (first_received + just, after, True, True),
        (first_received - just, after, True, True),
        (first_received - just, before, False, False),
        (first_received + 2 * receiptorder.CLOCK_MARGIN, before, True, True),
        (first_received - 2 * receiptorder.CLOCK_MARGIN, after, False, False),
    ]
    for received_at, event_at, leaning, surely in cases:
        assert (
            receiptorder.came_after(received_at, event_at, first_received, first_event) is leaning
        )
        assert (
            receiptorder.surely_after(received_at, event_at, first_received, first_event) is surely
        )


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
    monkeypatch.setattr(recheck, "log", structlog.get_logger("secledger.recheck"))
    # The handler is made on the first webhook request; this one is not held.
    assert post(client, {"object_kind": "push"}, event="Push Hook").json()["status"] == "ignored"
    runtime = client.app.api.state.runtime
    key = MRKey("https://gitlab.example.com", 14, 30)
    first_delivery(engine, 30, "first-30", utcnow())  # recorded elsewhere, received first
    # Told while nothing was held: that notification looks at nothing.
    assert wait_for(lambda: key in runtime.known)
    known, meanwhile = runtime.known, LearntMeanwhile(key)
    meanwhile.on_new = known.on_new
    runtime.known = meanwhile
    try:
        plain = mr_event("update", iid=30, labels=["backend"])
        with capture_logs() as logs:
            answer = post(client, plain, **{"Idempotency-Key": "late-30"})
            assert answer.json()["status"] == "ignored"
            assert wait_for(lambda: "idem:late-30" in logged_keys(engine))
            # Logged once the recording's answer is back on the event loop: after the row.
            assert wait_for(lambda: any(e["event"].startswith("ignored_") for e in logs))
    finally:
        runtime.known = known  # before the app shuts down, which clears its callback
    assert [e["event"] for e in logs if e["event"].startswith("ignored_")] == [
        "ignored_delivery_recorded"
    ]


def test_deliveries_are_counted_unchecked_when_the_database_cannot_say(monkeypatch) -> None:
    """Nothing listens on port 1: the MR's first delivery cannot be read, so neither the
    held deliveries nor the forgotten one can be decided; each is counted."""
    monkeypatch.setattr(recheck, "log", structlog.get_logger("secledger.recheck"))
    metrics = Metrics()
    engine = db.create("postgresql://postgres@127.0.0.1:1/none", pool_size=1)
    runtime = SimpleNamespace(metrics=metrics, engine=engine, recorder=None)
    recent = RecentlyIgnored(max_bytes=25)

    async def look_again() -> None:
        again = recheck.Recheck(runtime, recent)  # type: ignore[arg-type]
        for one in (held(0.0, 1), held(0.1, 1), held(0.2, 2, size=30)):  # MR 2's: too large
            recent.hold(one)
        again.reconsider([held(0, 1).key, held(0, 2).key])
        while again._tasks:
            await asyncio.sleep(0.01)

    with capture_logs() as logs:
        asyncio.run(asyncio.wait_for(look_again(), 60))
    engine.dispose()
    assert sorted((e["event"], e["mr_iid"], e["count"]) for e in logs) == [
        ("ignored_delivery_unchecked", 1, 2),
        ("ignored_delivery_unchecked", 2, 1),
    ]
    assert 'outcome="unchecked"} 3.0' in generate_latest(metrics.registry).decode()


def test_a_check_cut_off_by_shutdown_is_counted_unchecked(monkeypatch) -> None:
    """The database does not answer (a socket that never speaks) when the receiver
    stops: the check is cancelled, and says so before it ends."""
    monkeypatch.setattr(recheck, "log", structlog.get_logger("secledger.recheck"))
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        url = f"postgresql://postgres@127.0.0.1:{port}/none?connect_timeout=3"
        engine = db.create(url, pool_size=1)
        metrics = Metrics()
        runtime = SimpleNamespace(metrics=metrics, engine=engine, recorder=None)
        recent = RecentlyIgnored(max_bytes=25)

        async def stop_midway() -> None:
            again = recheck.Recheck(runtime, recent)  # type: ignore[arg-type]
            recent.hold(held(0.0, 2, size=30))  # too large: forgotten at once
            again.reconsider([held(0, 2).key])
            await asyncio.sleep(0.3)  # the read of the MR's first delivery waits
            tasks = list(again._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with capture_logs() as logs:
            asyncio.run(stop_midway())
        engine.dispose()
    assert [(e["event"], e["error"], e["count"]) for e in logs] == [
        ("ignored_delivery_unchecked", recheck.SHUT_DOWN, 1)
    ]
    assert 'outcome="unchecked"} 1.0' in generate_latest(metrics.registry).decode()
