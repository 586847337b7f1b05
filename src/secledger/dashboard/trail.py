"""One merge request's trail: its ledger row, its events, and the chain status of its log rows."""

from __future__ import annotations

import hmac
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, RowMapping, text

from secledger.extract import APPROVALS_RESET, CODE_OWNER_RESET, NUL_REPLACEMENT, MRKey
from secledger.store import ledger
from secledger.store.chain import GENESIS, LogRow, link

# A proxy that merges slashes turns "https://host" into "https:/host"; undo that.
_COLLAPSED_SCHEME = re.compile(r"^(https?):/(?!/)")

_TIMELINE = text(
    "SELECT e.seq, e.event_at, e.kind, e.decision, e.actor, e.facts, d.received_at"
    " FROM review_events e JOIN delivery_log d USING (seq)"
    " WHERE e.instance = :instance AND e.project_id = :project_id AND e.mr_iid = :mr_iid"
    " ORDER BY e.event_at, e.seq"
)
_LOG_ROWS = text(
    "SELECT d.seq, d.received_at, d.source, d.event, d.instance, d.dedup_key, d.headers,"
    " d.payload, d.prev_hash, d.hash, p.hash AS previous_row_hash"
    " FROM delivery_log d LEFT JOIN delivery_log p ON p.seq = d.seq - 1"
    " WHERE d.seq = ANY(:seqs) ORDER BY d.seq"
)


def instance_from_path(value: str) -> str:
    """The instance URL from a path segment (percent-decoded by the server already)."""
    # PostgreSQL text cannot hold NUL; stored instances never contain one.
    return _COLLAPSED_SCHEME.sub(r"\1://", value.replace("\x00", NUL_REPLACEMENT))


@dataclass(frozen=True)
class TimelineEvent:
    """One event of a merge request, as people read it."""

    seq: int
    event_at: datetime
    received_at: datetime
    kind: str
    decision: str | None
    actor: str | None
    what: str
    labels_added: list[str]
    labels_removed: list[str]


@dataclass(frozen=True)
class ChainCheck:
    """Whether one log row still hashes to its stored hash and links to its predecessor."""

    seq: int
    ok: bool
    detail: str


_VERBS = {
    "approved": "approved",
    "unapproved": "revoked approval",
    "merged": "merged",
    "closed": "closed",
    "reopened": "reopened",
}

_RESETS = {
    APPROVALS_RESET: "pushed; GitLab reset the approvals",
    CODE_OWNER_RESET: "pushed; GitLab reset Code Owners' approvals",
}


def describe(kind: str, decision: str | None, facts: dict[str, Any]) -> str:
    """A short sentence for an event: what the actor did."""
    if decision in _VERBS:
        return _VERBS[decision]
    if kind in _RESETS:
        return _RESETS[kind]
    added = facts.get("security_added") or []
    removed = facts.get("security_removed") or []
    parts = []
    if kind == "open":
        labels = facts.get("security_labels") or []
        parts.append("opened with " + ", ".join(labels) if labels and not added else "opened")
    if added:
        parts.append("labelled " + ", ".join(added))
    if removed:
        parts.append("removed " + ", ".join(removed))
    return "; ".join(parts) or ("updated" if kind == "update" else kind)


def timeline(conn: Connection, key: MRKey) -> list[TimelineEvent]:
    """Every event of the merge request, in event-time order."""
    rows = conn.execute(_TIMELINE, ledger.key_params(key))
    return [
        TimelineEvent(
            seq=r.seq,
            event_at=r.event_at,
            received_at=r.received_at,
            kind=r.kind,
            decision=r.decision,
            actor=r.actor,
            what=describe(r.kind, r.decision, r.facts),
            labels_added=list(r.facts.get("security_added") or []),
            labels_removed=list(r.facts.get("security_removed") or []),
        )
        for r in rows
    ]


def row(conn: Connection, key: MRKey) -> RowMapping | None:
    """The ledger row, or None when the merge request is not in the ledger."""
    return ledger.get(conn, key)


def chain_status(conn: Connection, seqs: list[int]) -> list[ChainCheck]:
    """Recompute each log row's hash and check it links to the row before it."""
    return [_check(r) for r in conn.execute(_LOG_ROWS, {"seqs": seqs}).mappings()]


def _check(r: RowMapping) -> ChainCheck:
    stored = bytes(r["hash"])
    prev = bytes(r["prev_hash"])
    if not hmac.compare_digest(link(prev, LogRow.from_row(r)), stored):
        return ChainCheck(r["seq"], False, "row content does not match its stored hash")
    expected_prev = GENESIS if r["seq"] == 1 else r["previous_row_hash"]
    if expected_prev is None:
        return ChainCheck(r["seq"], False, f"row {r['seq'] - 1} is missing from the log")
    if bytes(expected_prev) != prev:
        return ChainCheck(r["seq"], False, f"does not link to row {r['seq'] - 1}")
    return ChainCheck(r["seq"], True, "hash recomputed; linked to the previous row")
