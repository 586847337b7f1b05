"""The one recording path: every way in (HTTP, replay, backfill, spool) ends here.

``record`` runs inside a transaction the caller owns and holds the chain lock for
(:class:`~secledger.store.log.Chain`); it never commits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import Connection, Engine, RowMapping

from secledger import findings
from secledger.config import Settings
from secledger.extract import EventFacts, MRKey, extract_facts
from secledger.intake import Delivery, Ignored, parse_delivery
from secledger.policy import LabelPolicy
from secledger.projection import fold
from secledger.store import ledger, outbox
from secledger.store.log import Chain, seq_of
from secledger.tierpolicy import CompliancePolicy
from secledger.times import isoformat, utcnow

NOT_SECURITY = "merge request carries no security label"


@dataclass(frozen=True)
class Recording:
    """How this process records, from its settings: the findings policy and the sink outbox."""

    compliance: CompliancePolicy = field(default_factory=CompliancePolicy)
    emit: bool = False

    @classmethod
    def from_settings(cls, settings: Settings) -> Recording:
        """The configured compliance policy; emit when an HTTP sink is configured."""
        return cls(CompliancePolicy.from_settings(settings), settings.sink_enabled)


# For callers that pass no configuration (tests, tools): the documented default policy.
DEFAULT_RECORDING = Recording()


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


def record_batch(
    conn: Connection,
    chain: Chain,
    items: Sequence[tuple[Delivery, EventFacts]],
    *,
    recording: Recording = DEFAULT_RECORDING,
) -> list[Outcome]:
    """Record deliveries in order, with the outcomes ``record`` would give one at a time.

    The statements are per batch, not per delivery (about nine round trips whatever the
    batch size), which is what lets one writer keep up: the answer for each delivery is
    the fold of its merge request's events up to its own seq, exactly as if the
    deliveries had been recorded one after the other.

    In the same transaction, each merge request's findings are re-evaluated under
    ``recording.compliance`` and, with ``recording.emit`` (an HTTP sink is configured), each
    new row is queued in the outbox, so the sink gets every row that was committed.
    """
    outcomes: list[Outcome] = [IGNORED] * len(items)
    kept = _kept(conn, items)
    seqs = chain.append_many(conn, [items[i][0] for i in kept])
    logged = [(i, seq) for i, seq in zip(kept, seqs, strict=True) if seq is not None]
    ledger.add_events(conn, [(seq, items[i][1]) for i, seq in logged])
    events = ledger.events_by_mr(conn, {items[i][1].key for i, _ in logged}) if logged else {}
    latest: dict[MRKey, dict[str, Any]] = {}
    queued: list[tuple[int, str, str]] = []
    now = utcnow()
    for i, seq in zip(kept, seqs, strict=True):
        delivery, facts = items[i]
        if seq is None:
            outcomes[i] = _duplicate(conn, delivery, facts.key, latest.get(facts.key))
            continue
        row = fold(event for event in events[facts.key] if event.seq <= seq)
        row["updated_at"] = now
        latest[facts.key] = row
        rendered = ledger_json(row)
        outcomes[i] = Outcome("recorded", seq=seq, row=rendered)
        if recording.emit:
            # The log row's hash is unique to this ledger and this seq: the sink's dedup key.
            body = orjson.dumps({"seq": seq, "ledger": rendered}).decode()
            queued.append((seq, chain.appended[seq].hex(), body))
    ledger.upsert_rows(conn, list(latest.values()))
    for key, row in latest.items():
        findings.evaluate_mr(
            conn, row, recording.compliance, now, as_of=row["last_event_at"], events=events[key]
        )
    outbox.add_many(conn, queued)
    ledger.notify_many(conn, [_notice(items[i][1], seq) for i, seq in logged])
    return outcomes


def _kept(conn: Connection, items: Sequence[tuple[Delivery, EventFacts]]) -> list[int]:
    """Indexes of the items to log: security MRs, and MRs that were security MRs once."""
    doubtful = {facts.key for _, facts in items if not facts.is_security}
    known = ledger.known_among(conn, doubtful) if doubtful else set()
    kept: list[int] = []
    for i, (_, facts) in enumerate(items):
        if facts.is_security or facts.key in known:
            kept.append(i)
            known.add(facts.key)  # an earlier item in the batch gives the MR a ledger row
    return kept


def _duplicate(
    conn: Connection, delivery: Delivery, key: MRKey, latest: dict[str, Any] | None
) -> Outcome:
    """The answer to a delivery already logged: its seq and the MR's row as it stands."""
    existing = latest if latest is not None else ledger.get(conn, key)
    return Outcome(
        "duplicate",
        reason="this delivery was already recorded",
        seq=seq_of(conn, delivery.dedup_key),
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
