"""The dashboard's own figures, read from the core ledger in SQL: summary, volume, filters.

Every panel is one function taking a connection and :class:`Filters`. The compliance
figures (time to first decision against the SLA, reviewers, open MRs and their SLA
clock, findings) are not computed here: the dashboard shows ``secledger.reports`` and
``secledger.findings`` as the CLI does, through :meth:`Filters.for_reports`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, Literal

from sqlalchemy import Connection, RowMapping, text

from secledger import filtermatch, reports
from secledger.tierpolicy import CompliancePolicy

Bucket = Literal["day", "week", "month"]
BUCKETS: tuple[Bucket, ...] = ("day", "week", "month")

# When a review started: the first security label (else the MR's creation, as the fold
# sets labeled_at); for a row with neither, its latest event. The expression is the one
# migration 0005 indexed (security_review_ledger_started), which the date filters use.
STARTED = "coalesce(l.labeled_at, l.last_event_at)"


@dataclass(frozen=True)
class Filters:
    """The dashboard's filters; ``None`` means no restriction."""

    since: datetime | None = None
    until: datetime | None = None
    project: str | None = None
    tier: str | None = None
    reviewer: str | None = None

    def __post_init__(self) -> None:
        # GitLab writes a user as @name; the username is what is stored.
        if self.reviewer is not None:
            object.__setattr__(self, "reviewer", self.reviewer.removeprefix("@"))

    def where(self) -> tuple[str, dict[str, Any]]:
        """A WHERE clause over ``security_review_ledger l`` and its bound values."""
        clauses = ["TRUE"]
        params: dict[str, Any] = {}
        if self.since is not None:
            clauses.append(f"{STARTED} >= :since")
            params["since"] = self.since
        if self.until is not None:
            clauses.append(f"{STARTED} < :until")
            params["until"] = self.until
        if self.project:
            # By id or by path whatever its case, as the report panels beside it take it.
            clauses.append(filtermatch.same_project("l."))
            params.update(filtermatch.project_params(self.project))
        if self.tier:
            clauses.append("l.risk_tier = :tier")
            params["tier"] = self.tier
        if self.reviewer:
            # Whatever the case, as the reports match it (migration 0022 says why no
            # index serves this).
            clauses.append(
                f"({filtermatch.among('l.approvers')} OR {filtermatch.same_name('l.reviewer')}"
                f" OR {filtermatch.among('l.assigned_reviewers')})"
            )
            params["reviewer"] = self.reviewer
        return " AND ".join(clauses), params

    def for_reports(self, now: datetime, policy: CompliancePolicy) -> reports.Filters:
        """The same choices as ``secledger report`` filters (``until`` is already exclusive).

        Each report applies them its own way (decision time, label time, detection
        time; see docs/policy.md), exactly as the CLI and ``/api/reports/...`` do.
        """
        return reports.Filters(
            since=self.since,
            until=self.until,
            project=self.project,
            tier=self.tier,
            reviewer=self.reviewer,
            now=now,
            policy=policy,
        )


@dataclass(frozen=True)
class VolumePoint:
    """Security MRs whose review started in one bucket, for one tier."""

    bucket: date
    tier: str
    count: int


@dataclass(frozen=True)
class Summary:
    """Headline numbers for the filters."""

    total: int
    open: int
    merged: int
    closed: int
    median_seconds: float | None


def summary(conn: Connection, filters: Filters) -> Summary:
    """Counts by state and the median time to the final decision, over merged and closed
    MRs: an open one has no final decision yet (its latest may be an approval or a
    reopen)."""
    where, params = filters.where()
    row = conn.execute(
        text(
            "SELECT count(*) AS total,"
            # Open as the reports and the open-MR panel count it: a locked MR, or one
            # whose state is not known, is in the total and must be in one of the three.
            f" count(*) FILTER (WHERE {reports.OPEN}) AS open,"
            " count(*) FILTER (WHERE l.state = 'merged') AS merged,"
            " count(*) FILTER (WHERE l.state = 'closed') AS closed,"
            " percentile_cont(0.5) WITHIN GROUP (ORDER BY l.time_to_decision_seconds)"
            # Labelled after its merge or close, an MR had no time to decide (the
            # reports leave it out of their timings too).
            "   FILTER (WHERE l.state IN ('merged', 'closed')"
            "   AND l.time_to_decision_seconds >= 0) AS median_seconds"
            f" FROM security_review_ledger l WHERE {where}"
        ),
        params,
    ).one()
    return Summary(**row._asdict())


def volume(conn: Connection, filters: Filters, bucket: Bucket = "week") -> list[VolumePoint]:
    """Security MRs per bucket of review start, by tier."""
    if bucket not in BUCKETS:
        raise ValueError(f"bucket must be one of {', '.join(BUCKETS)}")
    where, params = filters.where()
    rows = conn.execute(
        text(
            f"SELECT date_trunc('{bucket}', {STARTED} AT TIME ZONE 'UTC')::date AS bucket,"
            " l.risk_tier AS tier, count(*) AS count"
            f" FROM security_review_ledger l WHERE {where}"
            " GROUP BY 1, 2 ORDER BY 1, 2"
        ),
        params,
    )
    return [VolumePoint(**row._asdict()) for row in rows]


@dataclass(frozen=True)
class FilterOptions:
    """Values the filter drop-downs offer."""

    projects: list[str]
    tiers: list[str]
    reviewers: list[str]


def filter_options(conn: Connection) -> FilterOptions:
    """Distinct projects, tiers and reviewers present in the ledger."""
    # Each project under its path now (the filter matches a project by it), not every
    # path its MRs were last seen under: after a rename the old one matches nothing.
    newest = filtermatch.NEWEST_PATH.format(p="")
    projects = conn.execute(
        text(
            f"SELECT DISTINCT path FROM (SELECT {newest} AS path FROM security_review_ledger"
            " GROUP BY instance, project_id) AS p WHERE path IS NOT NULL ORDER BY 1"
        )
    ).scalars()
    tiers = conn.execute(text("SELECT DISTINCT risk_tier FROM security_review_ledger ORDER BY 1"))
    people = conn.execute(
        text(
            "SELECT DISTINCT name FROM security_review_ledger,"
            " unnest(approvers || assigned_reviewers) AS r(name) ORDER BY 1"
        )
    ).scalars()
    return FilterOptions(list(projects), list(tiers.scalars()), list(people))


@dataclass(frozen=True)
class LedgerPage:
    """One page of ledger rows and the total matching the filters."""

    total: int
    rows: list[RowMapping]


def ledger_page(
    conn: Connection,
    filters: Filters,
    *,
    limit: int,
    offset: int,
    state: str | None = None,
) -> LedgerPage:
    """Ledger rows, newest event first, ``limit`` from ``offset``."""
    where, params = filters.where()
    if state == "opened":
        # Open as the summary and the reports count it: a locked MR, or one whose state
        # is not known, is still to be decided.
        where += f" AND {reports.OPEN}"
    elif state:
        where += " AND l.state = :state"
        params["state"] = state
    total = conn.execute(
        text(f"SELECT count(*) FROM security_review_ledger l WHERE {where}"), params
    ).scalar_one()
    rows = conn.execute(
        text(
            f"SELECT l.* FROM security_review_ledger l WHERE {where}"
            " ORDER BY l.last_event_at DESC, l.instance, l.project_id, l.mr_iid"
            " LIMIT :limit OFFSET :offset"
        ),
        {**params, "limit": limit, "offset": offset},
    ).mappings()
    return LedgerPage(total=total, rows=list(rows))
