"""The one recording path: every way in (HTTP, replay, backfill, spool) ends here.

``record`` runs inside a transaction the caller owns and holds the chain lock for
(:class:`~secledger.store.log.Chain`); it never commits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
import structlog
from psycopg import Cursor
from sqlalchemy import Connection, Engine, RowMapping
from sqlalchemy.exc import DBAPIError

from secledger import findings
from secledger.config import Settings
from secledger.extract import EventFacts, MRKey, extract_facts
from secledger.intake import Delivery, Ignored, parse_delivery
from secledger.policy import LabelPolicy
from secledger.projection import SequencedEvent, fold_read
from secledger.quickinit import quick
from secledger.store import batchread, ledger, log, outbox
from secledger.store.eventcache import EventCache
from secledger.store.log import Chain
from secledger.store.pipeline import Pg, pipeline
from secledger.tierpolicy import CompliancePolicy
from secledger.times import isoformat, utcnow

NOT_SECURITY = "merge request carries no security label"
logger = structlog.get_logger("secledger.service")


@dataclass(frozen=True)
class Recording:
    """How this process records, from its settings: the findings policy and the sink outbox."""

    compliance: CompliancePolicy = field(default_factory=CompliancePolicy)
    emit: bool = False
    # False: SLA clocks and findings are left to the caller, which records one MR's
    # facts one by one and evaluates it once at the end (backfill: a merge recorded
    # before its approvals must not leave an insufficient-approvals finding behind).
    assess: bool = True

    @classmethod
    def from_settings(cls, settings: Settings) -> Recording:
        """The configured compliance policy; emit when an HTTP sink is configured."""
        return cls(CompliancePolicy.from_settings(settings), settings.sink_enabled)


# For callers that pass no configuration (tests, tools): the documented default policy.
DEFAULT_RECORDING = Recording()


@quick
@dataclass(frozen=True)
class Outcome:
    """What happened to one delivery, as answered to its sender."""

    status: str
    reason: str | None = None
    seq: int | None = None
    row: dict[str, Any] | None = field(default=None)

    def to_json(self) -> dict[str, Any]:
        """The response body."""
        body: dict[str, Any] = {"status": self.status}
        if self.reason is not None:
            body["reason"] = self.reason
        if self.seq is not None:
            body["seq"] = self.seq
        if self.row is not None:
            body["ledger"] = self.row
        return body


IGNORED = Outcome("ignored", reason=NOT_SECURITY)


def ledger_json(row: Mapping[str, Any] | RowMapping) -> dict[str, Any]:
    """A ledger row as emitted downstream: times in ISO 8601 UTC, arrays as lists."""
    out: dict[str, Any] = {}
    for name, value in row.items():
        out[str(name)] = isoformat(value) if isinstance(value, datetime) else value
    return out


def record(
    conn: Connection,
    chain: Chain,
    delivery: Delivery,
    facts: EventFacts,
    *,
    recording: Recording = DEFAULT_RECORDING,
) -> Outcome:
    """Log one delivery and update its merge request's ledger row."""
    return record_batch(conn, chain, [(delivery, facts)], recording=recording)[0]


def record_locked(
    conn: Connection,
    items: Sequence[tuple[Delivery, EventFacts]],
    *,
    recording: Recording = DEFAULT_RECORDING,
    cache: EventCache | None = None,
    commit: bool = False,
    seen: batchread.Seen | None = None,
    begin: bool = False,
    rollback: bool = False,
    then: Callable[[Pg], None] | None = None,
) -> list[Outcome]:
    """Take the chain lock and record ``items``: ``Chain.open`` then ``record_batch``, with
    the lock, the head and the batch's reads sent in one round trip (the writer's path).

    With ``cache``, events of merge requests it holds (and the table still agrees with)
    are not read back; what this batch wrote is staged in it, for the caller to
    ``commit`` once the transaction has committed (or ``discard``).

    With ``commit``, the caller asks for its COMMIT to travel in the round trip of the
    writes rather than one of its own: when this returns, the transaction has committed
    (its own commit then has nothing left to do); when it raises, nothing was.

    The writer's pipelining, on a connection in autocommit mode: ``begin`` sends a BEGIN
    before the reads (after a ROLLBACK, with ``rollback``); ``seen`` is what
    ``batchread.send`` already read for ``items`` (lock taken, in an open transaction),
    so no read round trip is made; ``then`` is called with the write pipeline after its
    COMMIT, to queue the next batch's BEGIN and reads in the same round trip.
    """
    return _record(
        conn,
        None,
        items,
        recording,
        cache,
        commit=commit,
        seen=seen,
        begin=begin,
        rollback=rollback,
        then=then,
    )


def record_batch(
    conn: Connection,
    chain: Chain,
    items: Sequence[tuple[Delivery, EventFacts]],
    *,
    recording: Recording = DEFAULT_RECORDING,
) -> list[Outcome]:
    """Record deliveries in order, with the outcomes ``record`` would give one at a time.

    Two round trips whatever the batch size (one pipeline of reads, one of writes),
    which is what lets one writer keep up: the answer for each delivery is the fold of
    its merge request's events up to its own seq, exactly as if the deliveries had been
    recorded one after the other.

    In the same transaction, each merge request's findings are re-evaluated under
    ``recording.compliance`` and, with ``recording.emit`` (an HTTP sink is configured), each
    new row is queued in the outbox, so the sink gets every row that was committed.
    """
    return _record(conn, chain, items, recording, None)


def _record(
    conn: Connection,
    opened: Chain | None,
    items: Sequence[tuple[Delivery, EventFacts]],
    recording: Recording,
    cache: EventCache | None,
    *,
    commit: bool = False,
    seen: batchread.Seen | None = None,
    begin: bool = False,
    rollback: bool = False,
    then: Callable[[Pg], None] | None = None,
) -> list[Outcome]:
    if seen is None:
        lock = opened is None
        seen = batchread.read(conn, items, lock=lock, cache=cache, begin=begin, rollback=rollback)
    chain = opened or seen.opened()
    kept = _kept(items, seen.known)
    seqs, log_rows = chain.extend([items[i][0] for i in kept], seen.logged)
    batch = _Batch(items, list(zip(kept, seqs, strict=True)), chain, seen, recording)
    stored = _stored_rows(conn, batch)
    if not batch.logged:
        outcomes = batch.answer(stored)
        if commit:  # nothing to write, but the transaction (and its lock) must end
            with _committing(conn, commit, then):
                pass
        return outcomes
    with _committing(conn, commit, then) as pg:
        # Sent first: PostgreSQL stores the payloads while the folds and findings are
        # computed below, instead of the two waiting for each other.
        log.send_rows(pg, log_rows)
        ledger.send_events(pg, [(seq, items[i][1]) for i, seq in batch.logged])
        outcomes = batch.answer(stored)
        ledger.send_upserts(pg, list(batch.latest.values()))
        if recording.assess:
            findings.send(pg, batch.assess())
        outbox.send(pg, batch.queued)
        ledger.send_notices(pg, [_notice(items[i][1], seq) for i, seq in batch.logged])
    if cache is not None:
        added: dict[MRKey, list[int]] = {}
        for i, seq in batch.logged:
            added.setdefault(items[i][1].key, []).append(seq)
        seen.remember(cache, added)
    return outcomes


@contextmanager
def _committing(conn: Connection, commit: bool, then: Callable[[Pg], None] | None) -> Iterator[Pg]:
    """A pipeline for the batch's writes, ended (with ``commit``) by its COMMIT and what
    ``then`` queues behind it: the next batch's BEGIN and reads.

    An error raised at the sync by a statement after a COMMIT that went through belongs
    to the next transaction: this one has committed, and its answers stand. It is not
    raised here; the connection is left in that failed transaction, for ``then``'s owner
    to notice (its reads have no results) and roll back.
    """
    committed: Cursor[Any] | None = None
    try:
        with pipeline(conn) as pg:
            yield pg
            if commit:
                committed = pg.execute("COMMIT")
                if then is not None:
                    then(pg)
    except DBAPIError as exc:
        if committed is None or committed.statusmessage != "COMMIT":
            raise
        logger.warning("next_batch_reads_failed", error=type(exc.orig).__name__)


class _Batch:
    """The answers and derived rows of one batch, computed from what was read. No I/O."""

    def __init__(
        self,
        items: Sequence[tuple[Delivery, EventFacts]],
        placed: list[tuple[int, int | None]],
        chain: Chain,
        seen: batchread.Seen,
        recording: Recording,
    ) -> None:
        # ``placed``: (index in items, new seq or None for a duplicate) of each kept item.
        self.items, self.chain, self.seen, self.recording = items, chain, seen, recording
        self.placed = placed
        self.logged = [(i, seq) for i, seq in self.placed if seq is not None]
        self.events = seen.events
        for i, seq in self.logged:
            self.events.setdefault(items[i][1].key, []).append(SequencedEvent(seq, items[i][1]))
        self.latest: dict[MRKey, dict[str, Any]] = {}
        # What each latest row's fold read: every event of the MR, for its findings.
        self.read: dict[MRKey, list[SequencedEvent]] = {}
        self.queued: list[tuple[int, str, str]] = []
        self.now = utcnow()

    def duplicates_without_row(self) -> set[MRKey]:
        """MRs of duplicates with no delivery recorded before them in this batch."""
        recorded: set[MRKey] = set()
        wanted: set[MRKey] = set()
        for i, seq in self.placed:
            key = self.items[i][1].key
            if seq is not None:
                recorded.add(key)
            elif key not in recorded:
                wanted.add(key)
        return wanted

    def answer(self, stored: dict[MRKey, dict[str, Any] | None]) -> list[Outcome]:
        """Each delivery's outcome, as recording them one at a time would answer."""
        outcomes: list[Outcome] = [IGNORED] * len(self.items)
        for i, seq in self.placed:
            delivery, facts = self.items[i]
            if seq is None:
                logged_as = self.seen.logged.first(delivery)
                current = self.latest.get(facts.key) or stored.get(facts.key)
                outcomes[i] = _duplicate(logged_as, current)
            else:
                outcomes[i] = self._recorded(seq, facts)
        return outcomes

    def _recorded(self, seq: int, facts: EventFacts) -> Outcome:
        row, read = fold_read([event for event in self.events[facts.key] if event.seq <= seq])
        row["updated_at"] = self.now
        self.latest[facts.key] = row
        self.read[facts.key] = read
        rendered = ledger_json(row)
        if self.recording.emit:
            # The log row's hash is unique to this ledger and this seq: the sink's dedup key.
            body = orjson.dumps({"seq": seq, "ledger": rendered}).decode()
            self.queued.append((seq, self.chain.appended[seq].hex(), body))
        return Outcome("recorded", seq=seq, row=rendered)

    def assess(self) -> list[findings.Assessment]:
        """Each touched MR's findings, from all of its events (after ``answer``)."""
        policy = self.recording.compliance
        return [
            findings.assess(
                row,
                self.events[key],
                policy,
                self.now,
                as_of=row["last_event_at"],
                ordered=self._read_all(key, row),
            )
            for key, row in self.latest.items()
        ]

    def _read_all(self, key: MRKey, row: dict[str, Any]) -> list[SequencedEvent] | None:
        """What the fold of ``row`` read, when that fold read every event of the MR (its
        seq is the newest: always so under the chain lock); None to sort them again."""
        newest = max(event.seq for event in self.events[key])
        return self.read[key] if row["last_seq"] == newest else None


def _stored_rows(conn: Connection, batch: _Batch) -> dict[MRKey, dict[str, Any] | None]:
    """Ledger rows as they stood before this batch, for the answers to duplicates (rare)."""
    return ledger.get_many(conn, batch.duplicates_without_row())


def _kept(items: Sequence[tuple[Delivery, EventFacts]], known: set[MRKey]) -> list[int]:
    """Indexes of the items to log: security MRs, and MRs that were security MRs once."""
    kept: list[int] = []
    for i, (_, facts) in enumerate(items):
        if facts.is_security or facts.key in known:
            kept.append(i)
            known.add(facts.key)  # an earlier item in the batch gives the MR a ledger row
    return kept


def _duplicate(seq: int | None, existing: Mapping[str, Any] | RowMapping | None) -> Outcome:
    """The answer to a delivery already logged: its seq and the MR's row as it stands."""
    return Outcome(
        "duplicate",
        reason="this delivery was already recorded",
        seq=seq,
        row=ledger_json(existing) if existing else None,
    )


def _notice(facts: EventFacts, seq: int) -> str:
    message = {"instance": facts.instance, "project_id": facts.project_id}
    message |= {"mr_iid": facts.mr_iid, "seq": seq}
    return orjson.dumps(message).decode()


def record_one(
    engine: Engine,
    delivery: Delivery,
    facts: EventFacts,
    *,
    recording: Recording = DEFAULT_RECORDING,
) -> Outcome:
    """Record one delivery in its own transaction, committed on return."""
    with engine.begin() as conn:
        chain = Chain.open(conn)
        return record(conn, chain, delivery, facts, recording=recording)


def feed(
    engine: Engine,
    policy: LabelPolicy,
    headers: Mapping[str, str],
    body: bytes,
    *,
    max_body_bytes: int,
    source: str,
    recording: Recording = DEFAULT_RECORDING,
) -> Outcome:
    """Intake, extract and record one recorded request, as the endpoint would (no token)."""
    delivery = parse_delivery(
        headers,
        body,
        secrets=(),
        max_body_bytes=max_body_bytes,
        received_at=utcnow(),
        require_token=False,
        source=source,
    )
    if isinstance(delivery, Ignored):
        return Outcome("ignored", reason=delivery.reason)
    return record_one(engine, delivery, extract_facts(delivery, policy), recording=recording)
