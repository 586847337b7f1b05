"""A batch records exactly what the same deliveries recorded one at a time would."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine, text

from builders import delivery_of, label_change, mr_event
from secledger.extract import extract_facts
from secledger.intake import Delivery
from secledger.policy import LabelPolicy
from secledger.service import Outcome, record_batch, record_locked
from secledger.store.eventcache import EventCache
from secledger.store.log import Chain

RECEIVED = datetime(2025, 8, 6, 9, 0, tzinfo=UTC)
POLICY = LabelPolicy(patterns=("sec/*", "sec::*"), tiers=("critical", "high", "medium", "low"))


def delivery(body: dict[str, Any], key: str) -> Delivery:
    return delivery_of(body, key, RECEIVED)


def history() -> list[Delivery]:
    """Two MRs, a label removal, an unknown MR, duplicates in and before the batch."""
    at = "2025-08-05 22:00:00 UTC"
    unlabelled = mr_event(
        "update",
        iid=1,
        labels=["backend"],
        updated_at=at,
        changes=label_change(["sec::high"], ["backend"], at),
    )
    return [
        delivery(mr_event("open", iid=1, updated_at="2025-08-05 21:00:00 UTC"), "a"),
        delivery(mr_event("approved", iid=2, actor="bob"), "earlier"),  # logged before
        delivery(unlabelled, "b"),  # no security label, but MR 1 is known from "a"
        delivery(mr_event("approved", iid=1, actor="bob", updated_at=at), "c"),
        delivery(mr_event("open", iid=1, updated_at="2025-08-05 21:00:00 UTC"), "a"),
        delivery(mr_event("open", iid=3, labels=["frontend"]), "d"),  # never security
        delivery(
            mr_event("merge", iid=1, actor="carol", updated_at="2025-08-05 20:30:00 UTC"), "e"
        ),
    ]


def state(conn: Connection) -> tuple[list[Any], list[Any]]:
    log = conn.execute(text("SELECT seq, dedup_key, hash FROM delivery_log ORDER BY seq")).all()
    rows = conn.execute(text("SELECT * FROM security_review_ledger ORDER BY mr_iid")).mappings()
    return log, [{k: v for k, v in row.items() if k != "updated_at"} for row in rows]


def answers(outcomes: list[Outcome]) -> list[dict[str, Any]]:
    out = []
    for outcome in outcomes:
        body = outcome.to_json()
        body.get("ledger", {}).pop("updated_at", None)
        out.append(body)
    return out


def run(engine: Engine, batched: bool) -> tuple[list[dict[str, Any]], Any]:
    items = [(d, extract_facts(d, POLICY)) for d in history()]
    # Everything happens in one transaction that is rolled back, so both runs start empty.
    with engine.connect() as conn:
        transaction = conn.begin()
        record_batch(conn, Chain.open(conn), [items[1]])
        chain = Chain.open(conn)
        if batched:
            outcomes = record_batch(conn, chain, items)
        else:
            outcomes = [record_batch(conn, chain, [item])[0] for item in items]
        result = answers(outcomes), state(conn)
        transaction.rollback()
    return result


def test_batch_gives_the_answers_and_rows_of_one_at_a_time(engine) -> None:
    one_by_one = run(engine, batched=False)
    batched = run(engine, batched=True)
    assert batched == one_by_one
    statuses = [answer["status"] for answer in batched[0]]
    assert statuses == [
        "recorded",
        "duplicate",
        "recorded",
        "recorded",
        "duplicate",
        "ignored",
        "recorded",
    ]
    assert batched[0][4]["ledger"]["approvers"] == ["bob"]  # the row as it stood then
    assert batched[0][4]["seq"] == batched[0][0]["seq"]
    log, rows = batched[1]
    assert [key for _, key, _ in log] == ["idem:earlier", "idem:a", "idem:b", "idem:c", "idem:e"]
    assert [row["mr_iid"] for row in rows] == [1, 2]


def test_a_commit_sent_with_the_writes_is_the_transactions_commit(engine) -> None:
    """The writer's COMMIT travels with its writes: done when record_locked returns."""
    first = delivery(mr_event("open", labels=["sec::high"]), "c-1")
    with engine.connect() as conn, conn.begin():
        [outcome] = record_locked(conn, [(first, extract_facts(first, POLICY))], commit=True)
        assert outcome.status == "recorded"
        # Already visible to another session before the caller's own commit, a no-op.
        with engine.connect() as other:
            seqs = other.execute(text("SELECT seq FROM delivery_log")).scalars().all()
        assert seqs == [outcome.seq]


def test_a_batch_that_fails_with_its_commit_queued_commits_nothing(engine) -> None:
    """A write refused by the database aborts the queued COMMIT: nothing is kept."""
    good = delivery(mr_event("open", labels=["sec::high"]), "c-2")
    with engine.begin() as conn:  # events are written after the log row, in the same pipeline
        conn.execute(
            text(
                "CREATE FUNCTION refuse() RETURNS trigger AS $$ BEGIN"
                " RAISE EXCEPTION 'refused'; END $$ LANGUAGE plpgsql"
            )
        )
        conn.execute(
            text(
                "CREATE TRIGGER refuse BEFORE INSERT ON review_events"
                " FOR EACH ROW EXECUTE FUNCTION refuse()"
            )
        )
    with engine.connect() as conn:
        try:
            with conn.begin():
                record_locked(conn, [(good, extract_facts(good, POLICY))], commit=True)
        except Exception as exc:  # noqa: BLE001 - any refusal will do
            assert "refused" in str(exc)
        else:
            raise AssertionError("the refused write should have failed the batch")
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM delivery_log")).scalar_one() == 0


def test_the_writers_reads_are_planned_afresh_however_often_they_run(engine: Engine) -> None:
    """Lookups whose plan depends on the table's size are never prepared on the connection.

    psycopg prepares a statement after five runs, and PostgreSQL may keep a generic plan
    made while the log was empty; the writer holds its connection for days.
    """
    cache = EventCache()
    with engine.connect() as conn:
        for n in range(8):
            first = delivery(mr_event("open", iid=100 + n, labels=["sec::high"]), f"p-{n}")
            dup = delivery(mr_event("open", iid=100 + n, labels=["sec::high"]), f"p-{n}")
            plain = delivery(mr_event("open", iid=200 + n, labels=["frontend"]), f"q-{n}")
            items = [(d, extract_facts(d, POLICY)) for d in (first, dup, plain)]
            with conn.begin():
                record_locked(conn, items, cache=cache if n % 2 else None, commit=True)
            cache.commit()
        prepared = conn.execute(text("SELECT statement FROM pg_prepared_statements")).scalars()
        statements = " ".join(prepared.all())
    assert "INSERT INTO delivery_log" in statements  # the writes are prepared, as before
    for table_read in ("FROM delivery_log WHERE dedup_key", "FROM review_events WHERE"):
        assert table_read not in statements
