"""``secledger findings`` and ``secledger report``: thin commands over findings and reports."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any

import click
import orjson
from sqlalchemy import Connection, Engine, text

from secledger import findings as store
from secledger import reports
from secledger.errors import SecledgerError
from secledger.filtermatch import check_project
from secledger.output import FORMATS, render
from secledger.progress import RichTracker, stderr_progress
from secledger.rules import RULES
from secledger.store.db import reading
from secledger.tierpolicy import CompliancePolicy, spelled
from secledger.times import utcnow

if TYPE_CHECKING:
    from secledger.cli import Context
    from secledger.config import Settings

FINDING_COLUMNS = (
    "rule",
    "severity",
    "project_path",
    "mr_iid",
    "subject",
    "seqs",
    "detected_at",
    "resolved_at",
)
JSON_FINDING_COLUMNS = (
    "id",
    "rule",
    "severity",
    "instance",
    "project_id",
    "mr_iid",
    "project_path",
    "url",
    "risk_tier",
    "subject",
    "seqs",
    "detected_at",
    "resolved_at",
    "evidence",
)
PROJECT_HELP = (
    "Project id, path (group/project; the case is ignored) or URL (with several GitLab"
    " instances). A project the ledger holds no merge request of is refused."
)
READ_ONLY = (
    "this login may not write findings (a secledger_readonly login?): --refresh-only and"
    " --reevaluate record findings; listing them needs no write"
)


def _when(ctx: click.Context, param: click.Parameter, value: str | None) -> datetime | None:
    """A date (``2025-08-01``, midnight UTC) or any timestamp spelling secledger parses."""
    if value is None:
        return None
    try:
        return reports.parse_bound(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


def known_tier(settings: Settings, tier: str | None) -> str | None:
    """``--tier`` as the settings spell it (tier labels match whatever their case); a
    name no tier has is kept, since rows may carry a tier configured before, but told."""
    if tier is None:
        return None
    known = [*settings.risk_tiers, settings.unclassified_tier]
    name = spelled(known, tier)
    if name is not None:
        return name
    click.echo(f"note: no configured tier is named {tier!r} ({', '.join(known)})", err=True)
    return tier


def check_period(since: datetime | None, until: datetime | None) -> None:
    """Refuse a period that ends before it starts: it would list nothing, silently."""
    if since is not None and until is not None and since >= until:
        raise click.BadParameter("--since must be before --until", param_hint="--since")


@contextmanager
def _refused() -> Iterator[None]:
    try:
        yield
    except SecledgerError as exc:
        raise click.ClickException(str(exc)) from exc


def _emit(rows: list[dict[str, Any]], fmt: str, columns: tuple[str, ...], title: str) -> None:
    text = render(rows, fmt, columns, title=title)
    if text is not None:
        click.echo(text, nl=fmt != "csv")


@click.command(name="findings")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True)
@click.option("--all", "include_resolved", is_flag=True, help="Include resolved findings.")
@click.option(
    "--since", callback=_when, metavar="DATE", help="Detected at or after this date (UTC)."
)
@click.option("--until", callback=_when, metavar="DATE", help="Detected before this date (UTC).")
@click.option("--project", help=PROJECT_HELP)
@click.option("--tier", help="Risk tier of the merge request.")
@click.option("--rule", type=click.Choice(sorted(RULES)), help="Only this rule.")
@click.option(
    "--refresh-only",
    is_flag=True,
    help="Record SLA breaches of MRs whose review is now overdue (a write); print their count.",
)
@click.option(
    "--reevaluate",
    is_flag=True,
    help="Re-run every rule on every MR and record the result (after a policy change).",
)
@click.pass_obj
def findings_command(  # noqa: PLR0917 - click passes one argument per option
    context: Context,
    fmt: str,
    include_resolved: bool,
    since: datetime | None,
    until: datetime | None,
    project: str | None,
    tier: str | None,
    rule: str | None,
    refresh_only: bool,
    reevaluate: bool,
) -> None:
    """List findings, separation of duties and SLA breaches (open ones unless --all).

    Reads only: an open merge request past its SLA deadline is listed as
    `sla-breached` as of now, whether or not it is recorded yet (then its id is
    null). A running `secledger serve` records those breaches every
    SECLEDGER_SLA_REFRESH_INTERVAL_SECONDS; --refresh-only records them once and
    prints only their count (on stderr), for deployments without serve.

    \b
    Example:
      secledger findings
      secledger findings --format json --rule merged-by-author | jq '.[].url'
      secledger findings --all --since 2025-07-01 --format csv > findings.csv
      secledger findings --refresh-only
    """
    check_period(since, until)
    tier = known_tier(context.settings, tier)
    policy = CompliancePolicy.from_settings(context.settings)
    now = utcnow()
    with context.engine() as engine:
        if project is not None:  # before --reevaluate writes, which may take a while
            with reading(engine) as conn, _refused():
                check_project(conn, project)
        if refresh_only or reevaluate:
            _record(engine, policy, now, reevaluate=reevaluate)
        if refresh_only:
            return
        with reading(engine) as conn, _refused():
            rows = store.list_findings(
                conn,
                policy,
                now,
                include_resolved=include_resolved,
                since=since,
                until=until,
                project=project,
                tier=tier,
                rule=rule,
            )
            if not rows:
                _say_why_empty(conn, "finding" if include_resolved else "open finding")
    items = [row.to_json() for row in rows]
    if fmt == "csv":
        for item in items:
            item["evidence"] = orjson.dumps(item["evidence"]).decode()
    columns = FINDING_COLUMNS if fmt == "table" else JSON_FINDING_COLUMNS
    _emit(items, fmt, columns, f"findings ({len(items)})")


_LEDGER_SIZE = text("SELECT count(*) FROM security_review_ledger")


def _say_why_empty(conn: Connection, what: str) -> None:
    """An empty answer reads as "no security change": say (on stderr) whether the ledger
    holds any MR at all, as a wrong database or hooks that never arrive leave it empty."""
    held = conn.execute(_LEDGER_SIZE).scalar_one()
    if held == 0:
        click.echo(
            "note: the ledger holds no security merge request at all: check that"
            " SECLEDGER_DATABASE_URL names the receiver's database and that GitLab's"
            " deliveries reach `secledger serve`",
            err=True,
        )
    else:
        plural = "" if held == 1 else "s"
        click.echo(
            f"note: no {what} in this selection (the ledger holds {held} security merge"
            f" request{plural} in all)",
            err=True,
        )


def _record(engine: Engine, policy: CompliancePolicy, now: datetime, *, reevaluate: bool) -> None:
    """The explicit writes of `secledger findings`: re-evaluation, then overdue breaches."""
    with engine.begin() as conn:
        if not store.may_record_findings(conn):
            raise click.ClickException(READ_ONLY)
        if reevaluate:
            with stderr_progress() as bar:
                count = store.reevaluate_all(conn, policy, now, RichTracker(bar))
            click.echo(f"re-evaluated {count} merge requests", err=True)
        changed = store.refresh_overdue(conn, policy, now)
        click.echo(f"sla-breached findings recorded or reopened: {changed}", err=True)


@click.command(name="report")
@click.argument("kind", type=click.Choice(tuple(reports.REPORTS)))
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True)
@click.option("--since", callback=_when, metavar="DATE", help="From this date (UTC), inclusive.")
@click.option("--until", callback=_when, metavar="DATE", help="To this date (UTC), exclusive.")
@click.option("--project", help=PROJECT_HELP)
@click.option("--tier", help="Risk tier.")
@click.option("--reviewer", help="GitLab username (a leading @ and the case are ignored).")
@click.option(
    "--period",
    type=click.Choice(reports.PERIODS),
    default="week",
    show_default=True,
    help="Bucket size of the periods report.",
)
@click.pass_obj
def report_command(  # noqa: PLR0917 - click passes one argument per option
    context: Context,
    kind: str,
    fmt: str,
    since: datetime | None,
    until: datetime | None,
    project: str | None,
    tier: str | None,
    reviewer: str | None,
    period: str,
) -> None:
    """Compliance reports: reviewers, tiers, projects, periods, open, findings, decision-times.

    reviewers: decisions (approve, merge, close), approvals, revocations, median and
    p90 hours from label to decision, SLA adherence, by decision time. tiers, projects,
    periods: security MRs by label time, with SLA met/breached (and those labelled
    only after their merge or close, which have no SLA clock). open: open security
    MRs with their SLA clock (hours left; negative when overdue). findings: counts
    per rule and severity, by detection time (after a replay or backfill, when it
    ran). decision-times: per tier, quantiles of hours from label to first review
    decision. See docs/policy.md for the exact definitions.

    \b
    Example:
      secledger report reviewers --since 2025-07-01 --until 2025-10-01
      secledger report periods --period month --tier critical --format csv
      secledger report open --project acme/payments --format json
    """
    check_period(since, until)
    filters = reports.Filters(
        since=since,
        until=until,
        project=project,
        tier=known_tier(context.settings, tier),
        reviewer=reviewer,
        period=period,
        policy=CompliancePolicy.from_settings(context.settings),
    )
    with context.engine() as engine, reading(engine) as conn, _refused():
        if project is not None:
            check_project(conn, project)
        # The same function serves /api/reports/KIND.
        rows = [row.as_dict() for row in reports.run(conn, kind, filters)]
        if not rows:
            _say_why_empty(conn, "row")
    _emit(rows, fmt, reports.REPORTS[kind][1].columns(), f"{kind} ({len(rows)})")
