"""The writer thread: batches, the next batch's reads sent with this batch's commit, failures."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import structlog
from sqlalchemy import Engine, text
from structlog.testing import capture_logs

from builders import delivery_of, mr_event
from commitcut import CommitCutter
from secledger import findings
from secledger import recorder as recorder_module
from secledger.errors import StoreUnavailable
from secledger.extract import EventFacts, extract_facts
from secledger.intake import Delivery
from secledger.policy import LabelPolicy
from secledger.recorder import Recorder
from secledger.service import Outcome
from secledger.store import batchread, db
from secledger.store.log import CHAIN_LOCK_KEY

POLICY = LabelPolicy()
TERMINATE = "SELECT pg_terminate_backend(pg_backend_pid())"
RECEIVED = datetime(2025, 8, 6, 9, 0, tzinfo=UTC)


def item(iid: int, key: str, action: str = "open") -> tuple[Delivery, EventFacts]:
    parsed = delivery_of(mr_event(action, iid=iid, labels=["sec::high"]), key, RECEIVED)
    return parsed, extract_facts(parsed, POLICY)


def record_queued(
    engine: Engine,
    items: list[tuple[Delivery, EventFacts]],
    max_batch: int,
    make: Callable[..., Recorder] = Recorder,
) -> tuple[list[Outcome | BaseException], bool]:
    """Queue every item before the writer starts, so batches (and carries) are deterministic.

    The answers, and whether the chain lock was free once the writer was idle again.
    """

    async def scenario() -> tuple[list[Outcome | BaseException], bool]:
        recorder = make(engine, max_batch=max_batch)
        tasks = [asyncio.create_task(recorder.submit(d)) for d, _ in items]
        await asyncio.sleep(0)  # every task has queued its job
        recorder.start()
        try:
            # A job the writer lost would never be answered: fail rather than hang.
            outcomes = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
            return outcomes, lock_is_free(engine)  # the writer still holds its connection
        finally:
            recorder.close()

    return asyncio.run(scenario())


def lock_is_free(engine: Engine) -> bool:
    with engine.connect() as conn:
        free = conn.execute(
            text("SELECT pg_try_advisory_xact_lock(:key)"), {"key": CHAIN_LOCK_KEY}
        ).scalar()
        conn.rollback()
    return bool(free)


@pytest.fixture
def read_round_trips(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the reads made in a round trip of their own (not carried)."""
    calls: list[int] = []
    real = batchread.read

    def counted(*args: Any, **kwargs: Any) -> batchread.Seen:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(batchread, "read", counted)
    return calls


def test_batches_whose_reads_travel_with_the_previous_commit_record_everything_in_order(
    engine: Engine, read_round_trips: list[int]
) -> None:
    # Five queued, two a batch: the second and third batches are read in the round trip
    # that commits the batch before them.
    items = [item(iid, f"k{iid}") for iid in range(1, 6)]
    outcomes, idle_lock_free = record_queued(engine, items, max_batch=2)
    assert len(read_round_trips) == 1  # the first batch's; the others were carried
    assert [o.status for o in outcomes if isinstance(o, Outcome)] == ["recorded"] * 5
    assert [o.seq for o in outcomes if isinstance(o, Outcome)] == [1, 2, 3, 4, 5]
    with engine.connect() as conn:
        keys = conn.execute(text("SELECT dedup_key FROM delivery_log ORDER BY seq")).scalars()
        assert list(keys) == [f"idem:k{iid}" for iid in range(1, 6)]
        rows = conn.execute(text("SELECT count(*) FROM security_review_ledger")).scalar()
        assert rows == 5
    assert idle_lock_free  # idle: no transaction left open with the chain lock


def test_the_writer_extracts_and_answers_an_extraction_failure_alone(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Facts are extracted on the writer thread: one delivery that cannot be extracted
    # gets its own error, in the first batch and in a carried one, and the rest record.
    def extract(delivery: Delivery, policy: LabelPolicy) -> EventFacts:
        if delivery.dedup_key.startswith("idem:bad"):
            raise ValueError("cannot extract")
        return extract_facts(delivery, policy)

    monkeypatch.setattr(recorder_module, "extract_facts", extract)
    items = [item(1, "k1"), item(2, "bad2"), item(3, "k3"), item(4, "bad4"), item(5, "k5")]
    outcomes, idle_lock_free = record_queued(engine, items, max_batch=2)
    assert [type(o).__name__ for o in outcomes] == [
        "Outcome",
        "ValueError",
        "Outcome",
        "ValueError",
        "Outcome",
    ]
    assert [o.seq for o in outcomes if isinstance(o, Outcome)] == [1, 2, 3]
    with engine.connect() as conn:
        keys = conn.execute(text("SELECT dedup_key FROM delivery_log ORDER BY seq")).scalars()
        assert list(keys) == ["idem:k1", "idem:k3", "idem:k5"]
    assert idle_lock_free


def test_the_writer_logs_one_delivery_line_per_answer_it_gives(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Not cached by an earlier test, so capture_logs sees it.
    monkeypatch.setattr(recorder_module, "log", structlog.get_logger("secledger.recorder"))
    items = [item(1, "k1"), item(2, "k2"), item(1, "k1")]
    with capture_logs() as logged:
        outcomes, _ = record_queued(engine, items, max_batch=8)
    assert [o.status for o in outcomes if isinstance(o, Outcome)] == [
        "recorded",
        "recorded",
        "duplicate",
    ]
    lines = [line for line in logged if line["event"] == "delivery"]
    assert [(line["outcome"], line["seq"], line["mr_iid"]) for line in lines] == [
        ("recorded", 1, 1),
        ("recorded", 2, 2),
        ("duplicate", 1, 1),
    ]
    assert all(line["ms"] >= 0 and line["log_level"] == "info" for line in lines)


def test_a_carried_batch_sees_what_the_batch_before_it_committed(engine: Engine) -> None:
    # The same MR in consecutive batches, and a resend of a delivery from the batch
    # before: the carried reads run after that batch's COMMIT, so they see its rows.
    items = [item(7, "a"), item(8, "b"), item(7, "c", "approved"), item(7, "a")]
    outcomes, idle_lock_free = record_queued(engine, items, max_batch=2)
    statuses = [o.status for o in outcomes if isinstance(o, Outcome)]
    assert statuses == ["recorded", "recorded", "recorded", "duplicate"]
    third, fourth = outcomes[2], outcomes[3]
    assert isinstance(third, Outcome) and isinstance(fourth, Outcome)
    assert third.row is not None and third.row["approvers"]
    assert third.row["event_count"] == 2  # the open from the batch before is in its fold
    assert fourth.seq == 1
    assert idle_lock_free


def test_a_carried_batch_of_resends_only_still_ends_its_transaction(engine: Engine) -> None:
    items = [item(1, "a"), item(2, "b"), item(1, "a"), item(2, "b")]
    outcomes, idle_lock_free = record_queued(engine, items, max_batch=2)
    statuses = [o.status for o in outcomes if isinstance(o, Outcome)]
    assert statuses == ["recorded", "recorded", "duplicate", "duplicate"]
    assert idle_lock_free  # nothing to write, yet its BEGIN and lock were ended


def test_a_failed_batch_loses_none_of_the_jobs_taken_with_its_commit(engine: Engine) -> None:
    """The second delivery is refused: its batch is retried one by one, and the batches
    whose reads were queued behind the failed COMMIT are recorded afterwards, in order."""
    with engine.begin() as conn:
        conn.execute(
            text(
                "CREATE FUNCTION refuse_two() RETURNS trigger AS $$ BEGIN"
                " IF NEW.mr_iid = 2 THEN RAISE EXCEPTION 'refused'; END IF;"
                " RETURN NEW; END $$ LANGUAGE plpgsql"
            )
        )
        conn.execute(
            text(
                "CREATE TRIGGER refuse_two BEFORE INSERT ON review_events"
                " FOR EACH ROW EXECUTE FUNCTION refuse_two()"
            )
        )
    items = [item(iid, f"f{iid}") for iid in range(1, 6)]
    outcomes, idle_lock_free = record_queued(engine, items, max_batch=2)
    assert isinstance(outcomes[1], StoreUnavailable)  # no spool here: refused is 503
    recorded = [o for o in outcomes if isinstance(o, Outcome)]
    assert [o.status for o in recorded] == ["recorded"] * 4
    with engine.connect() as conn:
        keys = conn.execute(text("SELECT dedup_key FROM delivery_log ORDER BY seq")).scalars()
        assert list(keys) == ["idem:f1", "idem:f3", "idem:f4", "idem:f5"]
    assert idle_lock_free


def test_the_next_batch_yields_the_chain_lock_to_a_writer_already_waiting(
    engine: Engine, database_url: str
) -> None:
    """Another writer (a replica) waiting for the chain lock gets it when a batch commits;
    the next batch's lock, sent behind that COMMIT, is only tried, so the commit's answers
    are not held back: the writer rolls back and waits its turn like any other."""
    items = [item(iid, f"w{iid}") for iid in range(1, 5)]
    others = db.create(database_url)  # the writer keeps the test engine's pool to itself
    holder = others.connect()
    holder.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": CHAIN_LOCK_KEY})
    rival_done = threading.Event()
    first_answered_while_rival_held: list[bool] = []

    def rival() -> None:  # queues for the lock behind the writer, then holds it a moment
        with others.connect() as conn:
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": CHAIN_LOCK_KEY})
            time.sleep(2.0)
            conn.commit()
        rival_done.set()

    def waiting() -> int:
        with others.connect() as conn:
            found = conn.execute(
                text(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                    " AND objid = CAST(:key AS oid) AND database ="
                    " (SELECT oid FROM pg_database WHERE datname = current_database())"
                ),
                {"key": CHAIN_LOCK_KEY},
            ).scalar()
        return int(found or 0)

    async def scenario() -> list[Outcome | BaseException]:
        recorder = Recorder(engine, max_batch=2)
        tasks = [asyncio.create_task(recorder.submit(d)) for d, _ in items]
        tasks[0].add_done_callback(
            lambda _: first_answered_while_rival_held.append(not rival_done.is_set())
        )
        await asyncio.sleep(0)
        recorder.start()
        try:
            await wait_until(lambda: waiting() == 1)  # the writer's first batch waits
            threading.Thread(target=rival, daemon=True).start()
            await wait_until(lambda: waiting() == 2)  # and the rival behind it
            holder.commit()
            return await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
        finally:
            recorder.close()

    try:
        outcomes = asyncio.run(scenario())
    finally:
        holder.close()
        others.dispose()
    assert rival_done.wait(5)
    assert [o.seq for o in outcomes if isinstance(o, Outcome)] == [1, 2, 3, 4]
    assert first_answered_while_rival_held == [True]


def test_jobs_arriving_during_a_one_by_one_retry_wait_for_their_own_reads(
    engine: Engine,
) -> None:
    """After a refused batch each job is retried alone; a job queued meanwhile must not
    lend its reads to the next retry (a non-security update for an MR with a ledger row
    was answered ``ignored`` that way, never logged)."""
    refuse_mr(engine, 3)
    record_queued(engine, [item(1, "first")], max_batch=8)  # MR 1 has a ledger row
    late = item(4, "late")
    unlabelled = label_update(1, "update-1")
    injected: list[bool] = []

    class LateArrival(Recorder):
        def _dispatch(self, jobs: list[Any]) -> None:
            if len(jobs) == 1 and not injected:  # the first retry: one more delivery arrives
                injected.append(True)
                self._queue.put(recorder_module._Submitted(late[0], *self._late_future))
            super()._dispatch(jobs)

    async def scenario() -> list[Outcome | BaseException]:
        writer = LateArrival(engine, max_batch=8)
        loop = asyncio.get_running_loop()
        late_future: asyncio.Future[Outcome] = loop.create_future()
        writer._late_future = (loop, late_future)  # type: ignore[attr-defined]
        batch = [item(2, "a"), unlabelled, item(3, "refused")]
        tasks = [asyncio.create_task(writer.submit(d)) for d, _ in batch]
        await asyncio.sleep(0)
        writer.start()
        try:
            answers = await asyncio.wait_for(
                asyncio.gather(*tasks, late_future, return_exceptions=True), 30
            )
        finally:
            writer.close()
        return answers

    a, update, refused, late_answer = asyncio.run(scenario())
    assert injected == [True]
    assert isinstance(refused, StoreUnavailable)
    assert [o.status for o in (a, update, late_answer) if isinstance(o, Outcome)] == [
        "recorded",
        "recorded",
        "recorded",
    ]
    with engine.connect() as conn:
        keys = conn.execute(text("SELECT dedup_key FROM delivery_log ORDER BY seq")).scalars()
        assert list(keys) == ["idem:first", "idem:a", "idem:update-1", "idem:late"]


@pytest.mark.parametrize("failure", ["SELECT 1/0", TERMINATE])
def test_a_batch_whose_commit_went_through_is_recorded_though_the_carried_reads_fail(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, read_round_trips: list[int], failure: str
) -> None:
    """An error in the next batch's reads, behind this batch's COMMIT in the same round
    trip, is raised at the sync; this batch has committed all the same and is answered
    ``recorded``, and the carried batch is read again on a fresh connection."""
    real = batchread.send
    failed: list[bool] = []

    def failing(pg: Any, *args: Any, **kwargs: Any) -> batchread.Pending:
        pending = real(pg, *args, **kwargs)
        if not kwargs.get("wait", True) and not failed:
            failed.append(True)
            pg.execute(failure)  # the carried reads fail once (an error, or the session dies)
        return pending

    monkeypatch.setattr(batchread, "send", failing)
    # A resend in the first batch: its answer needs a read on the writer's connection.
    items = [item(1, "c1"), item(2, "c2"), item(1, "c1"), item(3, "c3"), item(4, "c4")]
    outcomes, idle_lock_free = record_queued(engine, items, max_batch=3)
    assert failed == [True]
    assert [(o.status, o.seq) for o in outcomes if isinstance(o, Outcome)] == [
        ("recorded", 1),
        ("recorded", 2),
        ("duplicate", 1),
        ("recorded", 3),
        ("recorded", 4),
    ]
    # The first batch's read, and the carried batch's read again on a fresh connection
    # (not retried one delivery at a time after a failure it did not have).
    assert len(read_round_trips) == 2
    assert idle_lock_free


def test_a_session_that_dies_after_a_commit_is_replaced_before_the_next_batch(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing carried, and the connection is found broken after the COMMIT went through:
    the batch is answered, and the next one runs on a fresh connection (not a silently
    reconnected one out of autocommit, nor a refused write)."""
    real = Recorder._prefetch
    killed: list[bool] = []

    def prefetch(self: Recorder, pg: Any) -> None:
        if not killed:
            killed.append(True)
            pg.execute(TERMINATE)
        real(self, pg)

    monkeypatch.setattr(Recorder, "_prefetch", prefetch)
    record_queued(engine, [item(1, "d1")], max_batch=8)
    killed.clear()

    async def scenario() -> tuple[list[Outcome | BaseException], ...]:
        writer = Recorder(engine, max_batch=8)
        try:
            # A resend: its answer reads the stored row on the writer's connection.
            both = [
                asyncio.ensure_future(writer.submit(item(1, "d1")[0])),
                asyncio.ensure_future(writer.submit(item(2, "d2")[0])),
            ]
            # Both queued before the writer takes any, so they are one batch: taken
            # apart on a loaded machine, the first one's reads for the second were
            # what the kill broke, and the test was about another moment.
            await asyncio.sleep(0)
            writer.start()
            first = await asyncio.gather(*both, return_exceptions=True)
            second = await asyncio.gather(writer.submit(item(3, "d3")[0]), return_exceptions=True)
        finally:
            writer.close()
        return first, second

    first, second = asyncio.run(scenario())
    assert killed == [True]
    assert [(o.status, o.seq) for o in first + second if isinstance(o, Outcome)] == [
        ("duplicate", 1),
        ("recorded", 2),
        ("recorded", 3),
    ]


def test_jobs_queued_behind_the_stop_are_answered_not_forgotten(engine: Engine) -> None:
    async def scenario() -> list[Outcome | BaseException]:
        writer = Recorder(engine, max_batch=2)
        tasks = [asyncio.create_task(writer.submit(item(iid, f"s{iid}")[0])) for iid in (1, 2, 3)]
        await asyncio.sleep(0)
        writer._queue.put(recorder_module._STOP)  # close() would also wait for the thread
        late = asyncio.create_task(writer.submit(item(4, "s4")[0]))
        await asyncio.sleep(0)
        writer.start()
        try:
            return await asyncio.wait_for(asyncio.gather(*tasks, late, return_exceptions=True), 30)
        finally:
            writer.close()

    *recorded, late = asyncio.run(scenario())
    assert [(o.status, o.seq) for o in recorded if isinstance(o, Outcome)] == [
        ("recorded", 1),
        ("recorded", 2),
        ("recorded", 3),
    ]
    assert isinstance(late, StoreUnavailable)
    assert lock_is_free(engine)


def refuse_mr(engine: Engine, iid: int) -> None:
    """A trigger that refuses review events of one merge request (a non-transient error)."""
    with engine.begin() as conn:
        conn.execute(
            text(
                "CREATE FUNCTION refuse_mr() RETURNS trigger AS $$ BEGIN"
                f" IF NEW.mr_iid = {iid} THEN RAISE EXCEPTION 'refused'; END IF;"
                " RETURN NEW; END $$ LANGUAGE plpgsql"
            )
        )
        conn.execute(
            text(
                "CREATE TRIGGER refuse_mr BEFORE INSERT ON review_events"
                " FOR EACH ROW EXECUTE FUNCTION refuse_mr()"
            )
        )


def label_update(iid: int, key: str) -> tuple[Delivery, EventFacts]:
    """An update without a security label: only a known MR (a ledger row) makes it recorded."""
    parsed = delivery_of(mr_event("update", iid=iid, labels=["backend"]), key, RECEIVED)
    facts = extract_facts(parsed, POLICY)
    assert not facts.is_security
    return parsed, facts


async def wait_until(check: Callable[[], bool]) -> None:
    for _ in range(500):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out")


def test_a_batch_whose_commit_answer_is_lost_is_answered_recorded_once(
    database_url: str, engine: Engine
) -> None:
    """The connection breaks after PostgreSQL committed a batch and before its answer
    reached the writer. The retry on a new connection finds the rows written: each
    delivery is logged once and answered ``recorded`` with its seq, and a resend of one
    of them in the same batch stays a duplicate."""
    cutter = CommitCutter(db.conninfo(database_url))
    through = db.create(cutter.url, pool_size=2)

    async def scenario() -> list[Outcome | BaseException]:
        writer = Recorder(through, max_batch=8)
        writer.start()
        try:
            # The writer first holds a connection: only then is a broken one retried.
            await writer.submit(item(1, "k1")[0])
            cutter.armed.set()
            resend = delivery_of(mr_event("approved", iid=3, labels=["sec::high"]), "k3", RECEIVED)
            late = replace(resend, received_at=RECEIVED + timedelta(seconds=1))
            return await asyncio.gather(
                writer.submit(item(2, "k2")[0]),
                writer.submit(resend),
                writer.submit(late),
                return_exceptions=True,
            )
        finally:
            writer.close()

    try:
        with capture_logs() as logs:
            outcomes = asyncio.run(scenario())
    finally:
        through.dispose()
        cutter.close()
    assert cutter.cut.is_set()  # the answer to a COMMIT really was lost
    assert [(o.status, o.seq) for o in outcomes if isinstance(o, Outcome)] == [
        ("recorded", 2),
        ("recorded", 3),
        ("duplicate", 3),
    ]
    assert len([line for line in logs if line["event"] == "commit_answer_lost"]) == 1
    with engine.connect() as conn:
        keys = conn.execute(text("SELECT dedup_key FROM delivery_log ORDER BY seq")).scalars()
        assert list(keys) == ["idem:k1", "idem:k2", "idem:k3"]
    assert lock_is_free(engine)


def test_a_retry_that_fails_does_not_keep_its_transaction_and_the_chain_lock(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The held connection went stale, and the retry on a new one failed after taking the
    chain lock. Its session must not be kept: left in its aborted transaction, it held the
    lock (a drain or another replica waited for it forever) and refused the next batch."""
    failing: list[bool] = []
    real_send = findings.send

    def send(pg: Any, assessed: Any) -> None:
        if failing:
            failing.clear()
            pg.execute("SELECT 1 / 0")  # refused by PostgreSQL, inside the batch's transaction
        real_send(pg, assessed)

    monkeypatch.setattr(findings, "send", send)

    async def scenario() -> tuple[list[Outcome | BaseException], bool, Outcome]:
        writer = Recorder(engine, max_batch=8)
        writer.start()
        try:
            await writer.submit(item(1, "k1")[0])  # the writer now holds a connection
            with engine.connect() as conn:  # ...which goes stale while idle
                conn.execute(text(TERMINATE_OTHERS))
                conn.commit()
            failing.append(True)
            failed = await asyncio.gather(writer.submit(item(2, "k2")[0]), return_exceptions=True)
            free = lock_is_free(engine)
            after = await writer.submit(item(3, "k3")[0])
            return failed, free, after
        finally:
            writer.close()

    failed, free, after = asyncio.run(scenario())
    assert isinstance(failed[0], StoreUnavailable)  # refused: nothing was kept
    assert free  # no session left holding the chain lock
    assert (after.status, after.seq) == ("recorded", 2)


TERMINATE_OTHERS = (
    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
    " AND backend_type = 'client backend'"
)
