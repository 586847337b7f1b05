"""Compliance reports, computed in SQL: reviewers, tiers, projects, periods, open MRs, findings.

Each report is a function ``(conn, Filters) -> list[<Row>]`` returning frozen
dataclasses, so the CLI, the dashboard and the evidence pack share one definition.
Durations are elapsed wall-clock hours; the SLA verdict (met, breached, overdue) uses
each MR's stored deadline, which honours business hours when its tier does. Reports
only read: what is overdue is judged at ``Filters.now`` in the query, so a
``secledger_readonly`` login gets the same answer as the app's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import Connection, text

from secledger import findings as store
from secledger.copies import counted_groups
from secledger.errors import TimestampError
from secledger.filtermatch import (
    NEWEST_PATH,
    among,
    approved_by,
    project_params,
    same_name,
    same_project,
)
from secledger.tierpolicy import CompliancePolicy
from secledger.times import isoformat, parse_time, utcnow

PERIODS = ("week", "month")
STOPPERS = "('approved', 'merged', 'closed')"
# Ledger ``l`` is of an MR still open (a state not known counts as open).
OPEN = "coalesce(l.state, 'opened') NOT IN ('merged', 'closed')"
# One MR's SLA verdict at :now, over clock ``s``, as ``SlaClock.status`` gives it
# (bi_sla_status, migration 0014, spells it with now()). An MR already merged or closed
# when labelled (``ended_before_label``, judged from its events) never had a running
# clock, so it is never overdue; one labelled while open is judged by its clock whatever
# its state now (its merge or close may never have been recorded).
SLA_STATUS = """CASE WHEN s.deadline IS NULL THEN 'no_clock'
            WHEN s.first_decision_at IS NOT NULL AND s.first_decision_at <= s.deadline THEN 'met'
            WHEN s.first_decision_at IS NOT NULL THEN 'breached'
            WHEN s.ended_before_label = 'merged' THEN 'labeled_after_merge'
            WHEN s.ended_before_label = 'closed' THEN 'labeled_after_close'
            WHEN :now > s.deadline THEN 'overdue'
            ELSE 'running' END"""


def parse_bound(value: str) -> datetime:
    """A ``--since``/``--until`` value: ``YYYY-MM-DD`` (midnight UTC) or any timestamp."""
    try:
        if len(value) == 10:
            return datetime.fromisoformat(value).replace(tzinfo=UTC)
        return parse_time(value)
    except (TimestampError, ValueError) as exc:
        raise ValueError(f"{value!r} is not a date (YYYY-MM-DD) or timestamp") from exc


@dataclass(frozen=True)
class Filters:
    """Report filters; ``now`` is the instant open clocks are measured against, and
    ``policy`` the tier policy that rates a breach serve has not recorded yet."""

    since: datetime | None = None
    until: datetime | None = None
    project: str | None = None
    tier: str | None = None
    reviewer: str | None = None
    period: str = "week"
    now: datetime = field(default_factory=utcnow)
    policy: CompliancePolicy = field(default_factory=CompliancePolicy)

    def __post_init__(self) -> None:
        # GitLab writes a user as @name; the username is what is stored.
        if self.reviewer is not None:
            object.__setattr__(self, "reviewer", self.reviewer.removeprefix("@"))


class Row:
    """Shared by every report row: a JSON-ready dict."""

    def as_dict(self) -> dict[str, Any]:
        """Times as ISO 8601 UTC, floats rounded to 0.01."""
        out: dict[str, Any] = {}
        for name, value in asdict(self).items():  # type: ignore[call-overload]
            out[name] = _json_value(value)
        return out

    @classmethod
    def columns(cls) -> tuple[str, ...]:
        """Column names in display order."""
        return tuple(f.name for f in fields(cls))  # type: ignore[arg-type]


def _json_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return isoformat(value)
    if isinstance(value, float):
        return round(value, 2)
    return value


@dataclass(frozen=True)
class ReviewerRow(Row):
    """One reviewer's decisions in the period."""

    reviewer: str
    decisions: int
    approvals: int
    revocations: int
    median_hours: float | None
    p90_hours: float | None
    sla_met: int
    sla_missed: int
    sla_adherence_pct: float | None


@dataclass(frozen=True)
class MRMetrics(Row):
    """Figures over a group of security MRs labelled in the period."""

    mrs: int
    decided: int
    open: int
    median_hours: float | None
    p90_hours: float | None
    sla_met: int
    sla_breached: int
    sla_adherence_pct: float | None
    labeled_after_merge_or_close: int

    @classmethod
    def columns(cls) -> tuple[str, ...]:
        """The group's key columns first, then the figures."""
        names = [f.name for f in fields(cls)]
        metrics = [f.name for f in fields(MRMetrics)]
        return tuple([n for n in names if n not in metrics] + metrics)


@dataclass(frozen=True)
class TierRow(MRMetrics):
    """Per risk tier."""

    tier: str


@dataclass(frozen=True)
class ProjectRow(MRMetrics):
    """Per project."""

    instance: str
    project_id: int
    project_path: str | None


@dataclass(frozen=True)
class PeriodRow(MRMetrics):
    """Per week or month of the label time (UTC)."""

    period_start: str


@dataclass(frozen=True)
class DecisionTimesRow(Row):
    """Hours from label to first review decision in one tier: the distribution's quantiles."""

    tier: str
    decided: int
    min_hours: float
    q1_hours: float
    median_hours: float
    q3_hours: float
    p90_hours: float
    max_hours: float


@dataclass(frozen=True)
class OpenRow(Row):
    """One open security MR and its SLA clock."""

    instance: str
    project_id: int
    mr_iid: int
    project_path: str | None
    title: str | None
    url: str | None
    risk_tier: str
    labeled_at: datetime | None
    deadline: datetime | None
    sla_tier: str  # the deadline's tier: differs from risk_tier after a relabel (policy.md)
    first_decision: str | None
    sla_status: str
    hours_left: float | None


@dataclass(frozen=True)
class FindingsRow(Row):
    """Findings per rule and severity."""

    rule: str
    severity: str
    open: int
    resolved: int
    mrs: int


MR_REVIEWER = f"({among('l.approvers')} OR {same_name('s.first_decision_by')})"


def _mr_filters(
    filters: Filters, time_column: str, reviewer: str = MR_REVIEWER
) -> tuple[str, dict[str, Any]]:
    """WHERE clauses over ledger ``l`` (and clock ``s``); the time filter on ``time_column``."""
    clauses = ["TRUE"]
    params: dict[str, Any] = {"now": filters.now}
    checks = (
        ("since", filters.since, f"{time_column} >= :since"),
        ("until", filters.until, f"{time_column} < :until"),
        ("project", filters.project, same_project("l.")),
        ("tier", filters.tier, "l.risk_tier = :tier"),
        ("reviewer", filters.reviewer, reviewer),
    )
    for name, value, clause in checks:
        if value is not None:
            clauses.append(clause)
            params[name] = value
    if filters.project is not None:
        params.update(project_params(filters.project))
    return " AND ".join(clauses), params


# Label to first review decision: what the SLA clock measures.
HOURS = "(extract(epoch FROM s.first_decision_at - s.labeled_at) / 3600.0)::float8"
_METRICS = """
count(*) AS mrs,
count(s.first_decision_at) AS decided,
count(*) FILTER (WHERE {open}) AS open,
percentile_cont(0.5) WITHIN GROUP (ORDER BY {hours}) AS median_hours,
percentile_cont(0.9) WITHIN GROUP (ORDER BY {hours}) AS p90_hours,
count(*) FILTER (WHERE {met}) AS sla_met,
count(*) FILTER (WHERE NOT {met}) AS sla_breached,
round(100.0 * count(*) FILTER (WHERE {met}) / nullif(count({met}), 0), 1)::float
    AS sla_adherence_pct,
count(*) FILTER (WHERE ({status}) IN ('labeled_after_merge', 'labeled_after_close'))
    AS labeled_after_merge_or_close
""".format(
    hours=HOURS,
    open=OPEN,
    status=SLA_STATUS,
    # NULL while the clock runs, and for an MR merged or closed before its label: neither
    # met nor breached.
    met=f"(CASE ({SLA_STATUS}) WHEN 'met' THEN true WHEN 'breached' THEN false"
    " WHEN 'overdue' THEN false END)",
)
_MR_FROM = "FROM security_review_ledger l JOIN review_sla s USING (instance, project_id, mr_iid)"

R = TypeVar("R", bound=Row)


def _grouped(
    conn: Connection, filters: Filters, keys: str, group_by: str, make: Callable[..., R]
) -> list[R]:
    where, params = _mr_filters(filters, "s.labeled_at")
    query = f"SELECT {keys}, {_METRICS} {_MR_FROM} WHERE {where} GROUP BY {group_by} ORDER BY 1, 2"
    return [make(**row) for row in conn.execute(text(query), params).mappings()]


def tiers(conn: Connection, filters: Filters) -> list[TierRow]:
    """Per risk tier, MRs labelled in the period."""
    return _grouped(conn, filters, "l.risk_tier AS tier", "l.risk_tier", TierRow)


def projects(conn: Connection, filters: Filters) -> list[ProjectRow]:
    """Per project, MRs labelled in the period."""
    # After a rename, MRs last seen before it keep the old path: the newest one's is
    # shown, among all of the project's MRs (the path --project takes), not only those
    # the filters keep, which may all be older than the rename.
    newest = (
        f"(SELECT {NEWEST_PATH.format(p='n.')} FROM security_review_ledger n"
        " WHERE n.instance = l.instance AND n.project_id = l.project_id)"
    )
    keys = f"l.instance, l.project_id, {newest} AS project_path"
    return _grouped(conn, filters, keys, "l.instance, l.project_id", ProjectRow)


def periods(conn: Connection, filters: Filters) -> list[PeriodRow]:
    """Per week (ISO, Monday) or month of the label time, in UTC."""
    if filters.period not in PERIODS:
        raise ValueError(f"period must be one of {', '.join(PERIODS)}")
    start = f"date_trunc('{filters.period}', s.labeled_at AT TIME ZONE 'UTC')"
    keys = f"to_char({start}, 'YYYY-MM-DD') AS period_start"
    rows = _grouped(conn, filters, keys, start, PeriodRow)
    return [row for row in rows if row.period_start is not None]


def decision_times(conn: Connection, filters: Filters) -> list[DecisionTimesRow]:
    """Per tier, quantiles of hours from label to first review decision (MRs labelled then)."""
    where, params = _mr_filters(filters, "s.labeled_at")
    query = f"""
SELECT l.risk_tier AS tier, count(*) AS decided, min({HOURS}) AS min_hours,
       percentile_cont(ARRAY[0.25, 0.5, 0.75, 0.9]) WITHIN GROUP (ORDER BY {HOURS}) AS q,
       max({HOURS}) AS max_hours
{_MR_FROM}
WHERE s.first_decision_at IS NOT NULL AND s.labeled_at IS NOT NULL AND {where}
GROUP BY l.risk_tier ORDER BY l.risk_tier"""
    rows = []
    for row in conn.execute(text(query), params).mappings():
        q1, median, q3, p90 = row["q"]
        values = {k: v for k, v in row.items() if k != "q"}
        quantiles = {"q1_hours": q1, "median_hours": median, "q3_hours": q3, "p90_hours": p90}
        rows.append(DecisionTimesRow(**values, **quantiles))
    return rows


def reviewers(conn: Connection, filters: Filters) -> list[ReviewerRow]:
    """Per reviewer: their decision events in the period (by event time), each decision
    once however many hooks, and the GitLab API, told it (the copy the ledger fold keeps)."""
    # Time and reviewer filter the events; project and tier, their MRs (once each). The
    # ledger is joined only for those: every MR with events has its ledger row (both are
    # written in one transaction, and neither is ever deleted), and joining it anyway
    # made PostgreSQL misjudge the rows and probe the clocks one decision at a time.
    by_event = Filters(since=filters.since, until=filters.until, reviewer=filters.reviewer)
    by_mr = Filters(project=filters.project, tier=filters.tier)
    events, params = _mr_filters(by_event, "e.event_at", reviewer=same_name("e.actor"))
    mrs, mr_params = _mr_filters(by_mr, "")
    ledger = ""
    if filters.project is not None or filters.tier is not None:
        ledger = "JOIN security_review_ledger l USING (instance, project_id, mr_iid)"
    stop = f"c.decision IN {STOPPERS} AND c.event_at >= s.labeled_at"
    hours = "extract(epoch FROM c.event_at - s.labeled_at) / 3600.0"
    query = f"""
SELECT c.actor AS reviewer,
       count(*) FILTER (WHERE c.decision IN {STOPPERS}) AS decisions,
       count(*) FILTER (WHERE c.decision = 'approved') AS approvals,
       count(*) FILTER (WHERE c.decision = 'unapproved') AS revocations,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY {hours}) FILTER (WHERE {stop}) AS median_hours,
       percentile_cont(0.9) WITHIN GROUP (ORDER BY {hours}) FILTER (WHERE {stop}) AS p90_hours,
       count(*) FILTER (WHERE {stop} AND c.event_at <= s.deadline) AS sla_met,
       count(*) FILTER (WHERE {stop} AND c.event_at > s.deadline) AS sla_missed,
       round(100.0 * count(*) FILTER (WHERE {stop} AND c.event_at <= s.deadline)
             / nullif(count(*) FILTER (WHERE {stop}), 0), 1)::float AS sla_adherence_pct
FROM ({counted_groups(events)}) c
JOIN review_sla s USING (instance, project_id, mr_iid)
{ledger}
WHERE {mrs}
GROUP BY c.actor ORDER BY c.actor"""
    rows = conn.execute(text(query), params | mr_params).mappings()
    return [ReviewerRow(**row) for row in rows]


def open_mrs(conn: Connection, filters: Filters, limit: int | None = None) -> list[OpenRow]:
    """Open security MRs with their SLA clock, most urgent first (the first ``limit``)."""
    where, params = _mr_filters(filters, "s.labeled_at")
    query = f"""
SELECT l.instance, l.project_id, l.mr_iid, l.project_path, l.title, l.url, l.risk_tier,
       s.labeled_at, s.deadline, s.risk_tier AS sla_tier, s.first_decision,
       {SLA_STATUS} AS sla_status,
       CASE WHEN s.first_decision_at IS NULL
            THEN (extract(epoch FROM s.deadline - :now) / 3600.0)::float8 END AS hours_left
{_MR_FROM}
WHERE {OPEN} AND {where}
ORDER BY s.first_decision_at IS NOT NULL, s.deadline NULLS LAST, l.project_id, l.mr_iid
LIMIT :limit"""
    params["limit"] = limit
    return [OpenRow(**row) for row in conn.execute(text(query), params).mappings()]


def findings(conn: Connection, filters: Filters) -> list[FindingsRow]:
    """Findings per rule and severity, detected in the period; open MRs past their deadline
    count as breached whether or not serve has recorded it yet."""
    where, params = _mr_filters(filters, "f.detected_at", reviewer=approved_by("l", "l.approvers"))
    params |= store.as_of(filters.policy, filters.now)
    query = f"""
SELECT f.rule, f.severity,
       count(*) FILTER (WHERE f.resolved_at IS NULL) AS open,
       count(*) FILTER (WHERE f.resolved_at IS NOT NULL) AS resolved,
       count(DISTINCT (f.instance, f.project_id, f.mr_iid)) AS mrs
FROM {store.FINDINGS_AS_OF} f JOIN security_review_ledger l USING (instance, project_id, mr_iid)
WHERE {where}
GROUP BY f.rule, f.severity ORDER BY f.rule, f.severity"""
    return [FindingsRow(**row) for row in conn.execute(text(query), params).mappings()]


REPORTS: dict[str, tuple[Callable[[Connection, Filters], Sequence[Row]], type[Row]]] = {
    "reviewers": (reviewers, ReviewerRow),
    "tiers": (tiers, TierRow),
    "projects": (projects, ProjectRow),
    "periods": (periods, PeriodRow),
    "open": (open_mrs, OpenRow),
    "findings": (findings, FindingsRow),
    "decision-times": (decision_times, DecisionTimesRow),
}


def run(conn: Connection, kind: str, filters: Filters) -> list[Row]:
    """One report as `secledger report` and ``/api/reports/...`` both produce it. Reads only."""
    query, _row_type = REPORTS[kind]
    return list(query(conn, filters))
