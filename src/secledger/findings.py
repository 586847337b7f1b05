"""Findings and SLA clocks in the database: evaluated per MR when recorded, listed for reports.

Deduplication: a finding is one row per ``(MR, rule, subject)``. Re-evaluating updates
its evidence and proving seqs but keeps ``detected_at``. A finding that no longer holds
(a late event changed the history, or the policy changed) gets ``resolved_at`` and is
kept; if it holds again, ``resolved_at`` is cleared.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, RowMapping, text

from secledger.extract import MRKey
from secledger.filtermatch import approved_by, project_params, same_project
from secledger.progress import Silent, Tracker
from secledger.projection import SequencedEvent, ordered_facts
from secledger.quickinit import quick
from secledger.rules import Hit, MRHistory, SlaClock, evaluate, sla_clock
from secledger.store import ledger
from secledger.store.log import CHAIN_LOCK_KEY
from secledger.store.pipeline import Pg, pipeline, send_rows
from secledger.tierpolicy import CompliancePolicy
from secledger.times import isoformat

CLOCK_COLUMNS = (
    "risk_tier",
    "sla_hours",
    "business_hours",
    "required_approvals",
    "labeled_at",
    "label_seq",
    "deadline",
    "first_decision_at",
    "first_decision",
    "first_decision_by",
    "first_decision_seq",
    "ended_before_label",
)
SLA_RULE = "sla-breached"
_KEY = "instance = :instance AND project_id = :project_id AND mr_iid = :mr_iid"
_CLOCK_KEY = ("instance", "project_id", "mr_iid", *CLOCK_COLUMNS)
UPSERT_CLOCK = (
    f"INSERT INTO review_sla ({', '.join(_CLOCK_KEY)}, updated_at)"
    f" SELECT {', '.join(_CLOCK_KEY)}, updated_at"
    " FROM jsonb_populate_recordset(NULL::review_sla, %(rows)s::jsonb)"
    " ON CONFLICT (instance, project_id, mr_iid) DO UPDATE SET"
    f" {', '.join(f'{c} = excluded.{c}' for c in CLOCK_COLUMNS)}, updated_at = excluded.updated_at"
)
_FINDING = "instance, project_id, mr_iid, rule, subject, severity, seqs, evidence"
UPSERT_FINDING = (
    f"INSERT INTO findings ({_FINDING}, detected_at, updated_at)"
    f" SELECT {_FINDING}, updated_at, updated_at"
    " FROM jsonb_populate_recordset(NULL::findings, %(rows)s::jsonb)"
    " ON CONFLICT (instance, project_id, mr_iid, rule, subject) DO UPDATE SET"
    " severity = excluded.severity, seqs = excluded.seqs, evidence = excluded.evidence,"
    " resolved_at = NULL, updated_at = excluded.updated_at"
    # Re-evaluation that changes nothing writes nothing.
    " WHERE (findings.severity, findings.seqs, findings.evidence, findings.resolved_at)"
    " IS DISTINCT FROM (excluded.severity, excluded.seqs, excluded.evidence, NULL)"
)
# Per MR: resolve what no longer holds (every finding not in ``held``).
RESOLVE = (
    "UPDATE findings SET resolved_at = r.now, updated_at = r.now"
    " FROM jsonb_to_recordset(%(rows)s::jsonb) AS r(instance text, project_id bigint,"
    " mr_iid bigint, now timestamptz, held text[], keep_running_breach boolean)"
    " WHERE findings.instance = r.instance AND findings.project_id = r.project_id"
    " AND findings.mr_iid = r.mr_iid AND findings.resolved_at IS NULL"
    " AND NOT (findings.rule || ' ' || findings.subject = ANY(r.held))"
    " AND NOT (r.keep_running_breach AND findings.rule = 'sla-breached')"
)
# A kept breach brought up to date with the clock that runs now (a tier changed, the
# real label time learnt later, the deadline still past): only an open row is touched.
# Recording never inserts one at wall-clock time, or replaying an old history would
# flag, then resolve, a breach at every step.
REFRESH_KEPT = (
    "UPDATE findings SET severity = r.severity, seqs = r.seqs, evidence = r.evidence,"
    " updated_at = r.updated_at"
    " FROM jsonb_populate_recordset(NULL::findings, %(rows)s::jsonb) AS r"
    " WHERE findings.instance = r.instance AND findings.project_id = r.project_id"
    " AND findings.mr_iid = r.mr_iid AND findings.rule = r.rule"
    " AND findings.subject = r.subject AND findings.resolved_at IS NULL"
    " AND (findings.severity, findings.seqs, findings.evidence)"
    " IS DISTINCT FROM (r.severity, r.seqs, r.evidence)"
)


@quick
@dataclass(frozen=True)
class Assessment:
    """One MR's clock and findings as evaluated, ready to store (bind parameters)."""

    hits: list[Hit]
    clock: dict[str, Any]
    findings: list[dict[str, Any]]
    resolve: dict[str, Any]
    kept: list[dict[str, Any]]  # the wall-clock breach kept open, as it reads now


def history_of(
    events: Sequence[SequencedEvent],
    row: RowMapping | dict[str, Any],
    ordered: Sequence[SequencedEvent] | None = None,
) -> MRHistory:
    """The rules' view of one MR from its events and its ledger row; an event delivered
    twice (system hook and project hook) is seen once, as the fold sees it. ``ordered``:
    what the fold of these very events read (``projection.fold_read``), when at hand."""
    key = MRKey(row["instance"], row["project_id"], row["mr_iid"])
    if ordered is None:
        ordered = ordered_facts(list(events))
    return MRHistory(
        key=key,
        events=tuple(ordered),
        author_id=row["author_id"],
        tier=row["risk_tier"],
        labeled_at=row["labeled_at"],
    )


def clock_row(key: MRKey, clock: SlaClock) -> dict[str, Any]:
    """Bind parameters (and COPY values) of one ``review_sla`` row."""
    values = {name: getattr(clock, name) for name in CLOCK_COLUMNS if name != "risk_tier"}
    return {**ledger.key_params(key), "risk_tier": clock.tier, **values}


def finding_row(key: MRKey, hit: Hit) -> dict[str, Any]:
    """Bind parameters of one ``findings`` row."""
    return {
        **ledger.key_params(key),
        "rule": hit.rule,
        "subject": hit.subject,
        "severity": hit.severity,
        "seqs": list(hit.seqs),
        "evidence": hit.evidence,
    }


def assess(
    row: RowMapping | dict[str, Any],
    events: Sequence[SequencedEvent],
    policy: CompliancePolicy,
    now: datetime,
    *,
    as_of: datetime | None = None,
    ordered: Sequence[SequencedEvent] | None = None,
) -> Assessment:
    """Evaluate one MR from its ledger row and every one of its events. Pure: no I/O.

    ``as_of`` is the instant open SLA clocks are judged at; recording passes the MR's
    latest event time, so replaying an old history does not flag (then resolve) a
    breach at every step. An open-past-deadline finding already recorded by the
    wall-clock check is kept while the clock still runs past its deadline at ``now``,
    with the evidence of that clock: not once the MR turns out to have been merged or
    closed before its label (its clock never ran), nor once a later deadline (a lower
    tier, a later label time) is still ahead.
    """
    key = MRKey(row["instance"], row["project_id"], row["mr_iid"])
    history = history_of(events, row, ordered)
    clock = sla_clock(history, policy)
    hits = evaluate(history, policy, as_of or now, clock)
    keep = as_of is not None and clock.status(now) == "overdue"
    kept: list[dict[str, Any]] = []
    if keep:
        late = evaluate(history, policy, now, clock)
        kept = [{**finding_row(key, h), "updated_at": now} for h in late if h.rule == SLA_RULE]
    resolve = {**ledger.key_params(key), "now": now, "keep_running_breach": keep}
    resolve["held"] = [f"{h.rule} {h.subject}" for h in hits]
    return Assessment(
        hits=hits,
        clock={**clock_row(key, clock), "updated_at": now},
        findings=_unique([{**finding_row(key, h), "updated_at": now} for h in hits]),
        resolve=resolve,
        kept=kept,
    )


def send(pg: Pg, assessments: Sequence[Assessment]) -> None:
    """Queue the writes of ``assessments`` on a pipeline: clocks, findings that hold, the rest
    resolved."""
    send_rows(pg, UPSERT_CLOCK, [a.clock for a in assessments])
    send_rows(pg, UPSERT_FINDING, [f for a in assessments for f in a.findings])
    send_rows(pg, RESOLVE, [a.resolve for a in assessments])
    send_rows(pg, REFRESH_KEPT, [row for a in assessments for row in a.kept])


def _unique(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (rule, subject), the last one winning, as upserting them in turn would:
    one INSERT may not touch the same row twice."""
    return list({(row["rule"], row["subject"]): row for row in rows}.values())


def evaluate_mr(
    conn: Connection,
    row: RowMapping | dict[str, Any],
    policy: CompliancePolicy,
    now: datetime,
    *,
    as_of: datetime | None = None,
    events: Sequence[SequencedEvent] | None = None,
) -> list[Hit]:
    """Re-evaluate one MR after its ledger row was projected (same transaction).

    See :func:`assess`; ``events``, when the caller already read them, saves reading
    them again.
    """
    if events is None:
        events = ledger.events_of(conn, MRKey(row["instance"], row["project_id"], row["mr_iid"]))
    assessment = assess(row, events, policy, now, as_of=as_of)
    with pipeline(conn) as pg:
        send(pg, [assessment])
    return assessment.hits


def _sql_stamp(column: str) -> str:
    """SQL spelling of ``rules.stamp``: whole seconds, UTC, Z."""
    return f"to_char({column} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')"


# An MR is overdue at :now while its clock runs (no decision yet) past its deadline. One
# already merged or closed when labelled never had a running clock
# (``rules.SlaClock.running``, stored as ``ended_before_label``); one labelled while open
# and merged or closed since without that event recorded is still undecided, and overdue.
_OVERDUE_MRS = (
    " FROM review_sla s JOIN security_review_ledger l USING (instance, project_id, mr_iid)"
    " WHERE s.first_decision_at IS NULL AND s.deadline < :now AND s.label_seq IS NOT NULL"
    " AND s.ended_before_label IS NULL"
)
# Its `sla-breached` finding, with the evidence ``rules.breach_evidence`` builds, so
# record-time re-evaluation changes nothing. The columns of ``findings`` from instance
# to evidence, in table order.
_BREACHES = (
    "SELECT s.instance, s.project_id, s.mr_iid, 'sla-breached'::text AS rule, ''::text AS subject,"
    " CASE WHEN s.risk_tier = :top_tier THEN 'high' ELSE 'medium' END AS severity,"
    " ARRAY[s.label_seq] AS seqs,"
    " jsonb_build_object('tier', s.risk_tier, 'sla_hours', s.sla_hours,"
    f" 'business_hours', s.business_hours, 'labeled_at', {_sql_stamp('s.labeled_at')},"
    f" 'deadline', {_sql_stamp('s.deadline')}, 'decided_at', NULL, 'decision', NULL,"
    " 'status', 'open past deadline') AS evidence" + _OVERDUE_MRS
)
# serve's periodic check (overdue.py) and `secledger findings --refresh-only` write
# them; nothing else does (reads compute them: FINDINGS_AS_OF).
_RECORD_OVERDUE = text(
    "INSERT INTO findings (instance, project_id, mr_iid, rule, subject, severity, seqs,"
    f" evidence, detected_at, updated_at) SELECT b.*, :now, :now FROM ({_BREACHES}) b"
    # Reopened with the clock that ran out now (a policy change may have moved the
    # deadline since it was resolved); detected_at stays the first detection's.
    " ON CONFLICT (instance, project_id, mr_iid, rule, subject) DO UPDATE SET"
    " severity = excluded.severity, seqs = excluded.seqs, evidence = excluded.evidence,"
    " resolved_at = NULL, updated_at = excluded.updated_at"
    " WHERE findings.resolved_at IS NOT NULL"
)
_STORED_BREACH = (
    "f.instance = b.instance AND f.project_id = b.project_id AND f.mr_iid = b.mr_iid"
    " AND f.rule = 'sla-breached' AND f.subject = ''"
)


# The findings table as _RECORD_OVERDUE would leave it at :now, computed and not
# written, so a report or a listing never writes and a read-only login sees the same
# answer. Stored rows as they are, except a resolved breach of an MR overdue again,
# which reads as reopened; plus the breaches not recorded yet, with id NULL, detected
# at :now (what recording them now would store). The overdue set comes from the index
# of running clocks: a read costs about what the check's SELECT costs, without writes.
def findings_as_of(keys_table: str | None = None) -> str:
    """``FINDINGS_AS_OF``, of the MRs listed in table ``keys_table`` only (a trusted name
    with the columns ``instance, project_id, mr_iid``): each branch joins it before it
    reads, so a few MRs cost a few index probes, not a pass over every finding."""
    scope = "" if keys_table is None else f" JOIN {keys_table} USING (instance, project_id, mr_iid)"
    return (
        "(SELECT f.id, f.instance, f.project_id, f.mr_iid, f.rule, f.subject, f.severity,"
        f" f.seqs, f.evidence, f.detected_at, f.resolved_at FROM findings f{scope}"
        " WHERE NOT (f.resolved_at IS NOT NULL AND f.rule = 'sla-breached' AND f.subject = ''"
        f" AND EXISTS (SELECT FROM ({_BREACHES}) b WHERE {_STORED_BREACH}))"
        " UNION ALL"
        " SELECT f.id, b.instance, b.project_id, b.mr_iid, b.rule, b.subject,"
        " b.severity, b.seqs, b.evidence, coalesce(f.detected_at, CAST(:now AS timestamptz)),"
        f" NULL::timestamptz FROM ({_BREACHES}) b{scope} LEFT JOIN findings f ON {_STORED_BREACH}"
        " WHERE f.id IS NULL OR f.resolved_at IS NOT NULL)"
    )


FINDINGS_AS_OF = findings_as_of()


def as_of(policy: CompliancePolicy, now: datetime) -> dict[str, Any]:
    """Bind parameters of ``FINDINGS_AS_OF``: the instant, and the tier a breach is high in."""
    return {"now": now, "top_tier": policy.tiers[0] if policy.tiers else ""}


# serve's periodic check and `secledger findings --refresh-only` may run at the same
# moment: ON CONFLICT locks rows in scan order, so two refreshes could deadlock; they queue.
REFRESH_LOCK_KEY = 0x5EC1EDB5
_REFRESH_LOCK = text("SELECT pg_advisory_xact_lock(:key)").bindparams(key=REFRESH_LOCK_KEY)
_CHAIN_LOCK = text("SELECT pg_advisory_xact_lock(:key)").bindparams(key=CHAIN_LOCK_KEY)


def refresh_overdue(conn: Connection, policy: CompliancePolicy, now: datetime) -> int:
    """Record ``sla-breached`` for running clocks now past their deadline; how many rows changed.

    The only writer of those findings besides record-time evaluation: serve's periodic
    check and `secledger findings --refresh-only` call it; reports and listings read
    ``FINDINGS_AS_OF`` instead.
    """
    # Behind the writers: its SELECT reads clocks from a snapshot, and a writer that moved
    # a deadline and resolved the breach in between (a longer SLA, the label removed)
    # would have its resolution undone by the ON CONFLICT, which reads the row's newest
    # version. Under the chain lock, the statement's snapshot follows their commit. The
    # chain lock first, always: `findings --reevaluate` holds it when it gets here, and
    # a check holding the refresh lock while it waited for the chain lock deadlocked it.
    conn.execute(_CHAIN_LOCK)
    conn.execute(_REFRESH_LOCK)
    return conn.execute(_RECORD_OVERDUE, as_of(policy, now)).rowcount or 0


def may_record_findings(conn: Connection) -> bool:
    """True when this login may write findings; a ``secledger_readonly`` login may not."""
    granted = conn.execute(
        text(
            "SELECT has_table_privilege('findings', 'INSERT')"
            " AND has_table_privilege('findings', 'UPDATE')"
        )
    ).scalar_one()
    return bool(granted)


def reevaluate_all(
    conn: Connection, policy: CompliancePolicy, now: datetime, tracker: Tracker | None = None
) -> int:
    """Re-run clocks and rules for every MR (after a policy change); the number of MRs.

    Under the chain lock, as ``rebuild`` does: a writer recording an MR's event meanwhile
    would otherwise have its clock and findings overwritten by ones judged from before
    that event. Deliveries wait (or are spooled) until the caller's transaction ends.
    """
    conn.execute(_CHAIN_LOCK)
    rows = list(ledger.rows(conn, order=("instance", "project_id", "mr_iid")))
    done = (tracker or Silent()).task("re-run SLA and findings", len(rows))
    for row in rows:
        evaluate_mr(conn, row, policy, now)
        done(1)
    return len(rows)


@quick
@dataclass(frozen=True)
class Finding:
    """One finding, as `secledger findings` and the reports return it.

    ``id`` is ``None`` for an overdue MR's breach that serve's periodic check has not
    recorded yet (listings compute it as of the request).
    """

    id: int | None
    rule: str
    severity: str
    instance: str
    project_id: int
    mr_iid: int
    project_path: str | None
    url: str | None
    risk_tier: str | None
    subject: str
    seqs: list[int]
    detected_at: str | None
    resolved_at: str | None
    evidence: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


_COLUMNS = (
    "id, rule, severity, instance, project_id, mr_iid, project_path, url, risk_tier,"
    " subject, seqs, detected_at, resolved_at, evidence"
)


def _list_as_of(keys_table: str | None = None) -> str:
    # What holds at :now (FINDINGS_AS_OF), for listings: nothing is written to read it.
    return (
        f"SELECT {_COLUMNS} FROM (SELECT f.*, l.project_path, l.url, l.risk_tier, l.approvers"
        f" FROM {findings_as_of(keys_table)} f"
        " LEFT JOIN security_review_ledger l USING (instance, project_id, mr_iid)) AS found"
    )


_LIST_AS_OF = _list_as_of()
# Newest first. A breach not recorded yet has no id: it sorts first among its equals, as
# the row recording it would (a new id is the highest), then by MR, so the order is stable.
_ORDER = "detected_at DESC, id DESC NULLS FIRST, instance, project_id, mr_iid"


# The reviewer filter of `secledger report findings`: MRs the reviewer approved.
_APPROVED_BY = approved_by("found", "found.approvers")


def list_findings(
    conn: Connection,
    policy: CompliancePolicy,
    now: datetime,
    *,
    include_resolved: bool = False,
    since: datetime | None = None,
    until: datetime | None = None,
    project: str | None = None,
    tier: str | None = None,
    rule: str | None = None,
    reviewer: str | None = None,
    mr: MRKey | None = None,
    limit: int | None = None,
) -> list[Finding]:
    """Findings as they stand at ``now`` (running clocks past their deadline are breaches, recorded
    or not), newest first, filtered on detection time, project (id or path), tier, rule,
    approver (as ``report findings`` filters) or one merge request; the first ``limit``.

    Reads only: a ``secledger_readonly`` login gets the same answer.
    """
    where = ["TRUE"]
    params: dict[str, Any] = {"limit": limit, **as_of(policy, now)}
    if reviewer is not None:
        reviewer = reviewer.removeprefix("@")  # as GitLab writes a user
    if not include_resolved:
        where.append("resolved_at IS NULL")
    for name, value, clause in (
        ("since", since, "detected_at >= :since"),
        ("until", until, "detected_at < :until"),
        ("project", project, same_project()),
        ("tier", tier, "risk_tier = :tier"),
        ("rule", rule, "rule = :rule"),
        ("reviewer", reviewer, _APPROVED_BY),
    ):
        if value is not None:
            where.append(clause)
            params[name] = value
    if project is not None:
        params.update(project_params(project))
    if mr is not None:
        where.append(_KEY)
        params.update(ledger.key_params(mr))
    query = text(f"{_LIST_AS_OF} WHERE {' AND '.join(where)} ORDER BY {_ORDER} LIMIT :limit")
    return [_finding(row) for row in conn.execute(query, params).mappings()]


def of_mrs(
    conn: Connection, keys_table: str, policy: CompliancePolicy, now: datetime
) -> Iterator[Finding]:
    """Every finding, open and resolved, of the MRs listed in table ``keys_table``, as
    they stand at ``now`` (``list_findings``): a breach not recorded yet has no id.

    ``keys_table`` (a trusted name, e.g. a temporary table the caller filled) has the
    columns ``instance, project_id, mr_iid``. Ordered by MR, then id (none last).
    """
    query = text(f'{_list_as_of(keys_table)} ORDER BY instance COLLATE "C", project_id, mr_iid, id')
    for row in conn.execute(query, as_of(policy, now)).mappings():
        yield _finding(row)


def _finding(row: RowMapping) -> Finding:
    values = dict(row)
    values["detected_at"] = isoformat(values["detected_at"])
    values["resolved_at"] = isoformat(values["resolved_at"])
    values["seqs"] = list(values["seqs"])
    return Finding(**values)
