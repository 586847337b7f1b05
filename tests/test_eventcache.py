"""The writer's event cache changes nothing it records, and yields to anyone else's writes."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Engine, text

from builders import mr_event
from secledger.extract import EventFacts, extract_facts
from secledger.intake import Delivery
from secledger.service import Outcome, record_locked, record_one
from secledger.store.eventcache import EventCache, Fingerprint
from test_record_batch import POLICY, answers, delivery

Item = tuple[Delivery, EventFacts]


def item(action: str, key: str, *, iid: int = 1, at: str, **extra: Any) -> Item:
    parsed = delivery(mr_event(action, iid=iid, updated_at=at, **extra), key)
    return parsed, extract_facts(parsed, POLICY)


BATCHES = [
    [
        item("open", "o1", at="2025-08-05 21:00:00 UTC"),
        item("open", "o2", iid=2, at="2025-08-05 21:00:00 UTC"),
    ],
    [
        item("approved", "a1", at="2025-08-05 22:00:00 UTC", actor="bob"),
        item("open", "o1", at="2025-08-05 21:00:00 UTC"),  # a duplicate
        item("approved", "a2", iid=2, at="2025-08-05 22:00:00 UTC", actor="alice"),
    ],
    [
        item("merge", "m1", at="2025-08-05 21:30:00 UTC", actor="carol"),  # a late event
        item("merge", "m2", iid=2, at="2025-08-05 23:00:00 UTC", actor="alice"),
    ],
]


def derived(conn: Connection) -> list[Any]:
    """Ledger, SLA clocks and findings, without the wall-clock columns."""
    found = []
    for table, order in (
        ("security_review_ledger", "mr_iid"),
        ("review_sla", "mr_iid"),
        ("findings", "mr_iid, rule, subject"),
    ):
        rows = conn.execute(text(f"SELECT * FROM {table} ORDER BY {order}")).mappings()
        skip = {"updated_at", "detected_at", "resolved_at", "id"}
        found.append([{k: v for k, v in row.items() if k not in skip} for row in rows])
    return found


def record(engine: Engine, batch: list[Item], cache: EventCache | None) -> list[Outcome]:
    with engine.begin() as conn:
        outcomes = record_locked(conn, batch, cache=cache)
    if cache is not None:
        cache.commit()
    return outcomes


def run(engine: Engine, cache: EventCache | None) -> tuple[list[Any], list[Any]]:
    said = [answers(record(engine, batch, cache)) for batch in BATCHES]
    with engine.connect() as conn:
        state = derived(conn)
        conn.execute(text("TRUNCATE review_events, security_review_ledger, review_sla, findings"))
        conn.commit()
    return said, state


def test_cached_batches_answer_and_store_what_uncached_batches_do(engine: Engine) -> None:
    cache = EventCache()
    uncached = run(engine, None)
    with engine.begin() as conn:  # a fresh log: the same dedup keys again
        conn.execute(text("ALTER TABLE delivery_log DISABLE TRIGGER USER"))
        conn.execute(text("DELETE FROM delivery_log"))
        conn.execute(text("ALTER TABLE delivery_log ENABLE TRIGGER USER"))
    cached = run(engine, cache)
    assert cached == uncached
    assert len(cache) == 2


def test_an_event_written_by_another_writer_is_read_not_taken_from_the_cache(
    engine: Engine,
) -> None:
    cache = EventCache()
    record(engine, BATCHES[0], cache)
    # Another replica (no cache of its own here) records an approval of MR 1.
    other, facts = item("approved", "elsewhere", at="2025-08-05 21:10:00 UTC", actor="dave")
    record_one(engine, other, facts)
    (outcome,) = record(engine, [item("update", "u1", at="2025-08-05 21:20:00 UTC")], cache)
    assert outcome.row is not None
    assert outcome.row["approvers"] == ["dave"]
    assert outcome.row["event_count"] == 3


def test_an_event_rewritten_in_place_is_read_again(engine: Engine) -> None:
    cache = EventCache()
    record(engine, BATCHES[0], cache)
    with engine.begin() as conn:  # what a repair does: same seq, same count, new content
        conn.execute(
            text(
                "UPDATE review_events SET facts = jsonb_set(facts, '{labeled_at}',"
                " '\"2025-08-01T00:00:00Z\"') WHERE mr_iid = 1"
            )
        )
    (outcome,) = record(
        engine, [item("merge", "m", at="2025-08-05 21:20:00 UTC", actor="carol")], cache
    )
    with engine.connect() as conn:
        uncached = derived(conn)[0][0]
    assert outcome.row is not None
    assert outcome.row["event_count"] == uncached["event_count"] == 2
    assert outcome.row["labeled_at"] == "2025-08-01T00:00:00Z"
    assert uncached["labeled_at"].isoformat() == "2025-08-01T00:00:00+00:00"


def test_what_a_failed_transaction_staged_is_not_kept() -> None:
    cache = EventCache()
    (parsed, facts) = BATCHES[0][0]
    from secledger.projection import SequencedEvent  # noqa: PLC0415

    cache.stage(facts.key, [SequencedEvent(1, facts)], Fingerprint(1, 1, 5))
    cache.discard()
    cache.commit()
    assert facts.key not in cache
    assert parsed.dedup_key == "idem:o1"
