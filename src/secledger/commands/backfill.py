"""``secledger backfill``, ``reconcile`` and ``enrich``: the ledger from GitLab's REST API."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

from secledger import earlyapprovals
from secledger import enrich as enrichment
from secledger import reconcile as reconciliation
from secledger.backfill import Backfill, Period
from secledger.commands.compliance import check_period
from secledger.errors import SecledgerError
from secledger.gitlab_api import GitLabAPI, Scope, scopes
from secledger.output import render
from secledger.policy import LabelPolicy
from secledger.times import parse_time

if TYPE_CHECKING:
    from secledger.cli import Context
from secledger.service import Recording


class DateParam(click.ParamType):  # type: ignore[type-arg]
    """``YYYY-MM-DD`` (midnight UTC) or any timestamp spelling secledger parses."""

    name = "date"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, datetime):
            return value
        try:
            if len(str(value)) == 10:
                return datetime.fromisoformat(str(value)).replace(tzinfo=UTC)
            return parse_time(str(value))
        except ValueError:
            self.fail(f"{value!r} is not a date (YYYY-MM-DD) or a timestamp", param, ctx)


DATE = DateParam()


def scope_options(function: Any) -> Any:
    """``--project`` and ``--group``, each repeatable, ID or full path."""
    function = click.option(
        "--group", "groups", multiple=True, metavar="ID|PATH", help="A group (repeatable)."
    )(function)
    return click.option(
        "--project", "projects", multiple=True, metavar="ID|PATH", help="A project (repeatable)."
    )(function)


def label_history_option(function: Any) -> Any:
    """``--label-history``: also the MRs whose security label was removed."""
    return click.option(
        "--label-history",
        is_flag=True,
        help=(
            "Also find MRs that carried a security label once and carry none now: lists"
            " every MR active in the period and reads each one's label events (one more"
            " API request per MR)."
        ),
    )(function)


def period_options(function: Any) -> Any:
    """``--since`` (required) and ``--until``."""
    function = click.option("--until", type=DATE, help="End of the period (exclusive).")(function)
    return click.option("--since", type=DATE, required=True, help="Start of the period.")(function)


def _scopes(projects: tuple[str, ...], groups: tuple[str, ...]) -> list[Scope]:
    chosen = scopes(projects, groups)
    if not chosen:
        raise click.UsageError("name at least one --project or --group")
    return chosen


@contextmanager
def edge() -> Iterator[None]:
    """Library errors become a clean CLI error (never a traceback, never a token)."""
    try:
        yield
    except SecledgerError as exc:
        raise click.ClickException(str(exc)) from exc


def _api(context: Context) -> GitLabAPI:
    try:
        return GitLabAPI.from_settings(context.settings)
    except SecledgerError as exc:
        raise click.ClickException(str(exc)) from exc


class _Bar:
    """The rich progress bar a backfill reports to."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.task = progress.add_task("merge requests", total=None)

    def start(self, total: int, what: str = "merge requests") -> None:
        self.progress.reset(self.task, total=total, description=what)

    def advance(self) -> None:
        self.progress.advance(self.task)


def _progress(*, visible: bool = True) -> Progress:
    """A transient bar on stderr (stdout is the summary's): what it counts, done of
    total, time left."""
    columns = (BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    console = Console(stderr=True)
    return Progress(
        *Progress.get_default_columns()[:1],
        *columns,
        console=console,
        transient=True,
        disable=not visible or not console.is_terminal,
    )


@click.command()
@scope_options
@period_options
@label_history_option
@click.option(
    "--workers",
    type=click.IntRange(1, 32),
    default=None,
    help="Parallel API readers (default: SECLEDGER_GITLAB_WORKERS, 4).",
)
@click.pass_obj
def backfill(
    context: Context,
    *,
    projects: tuple[str, ...],
    groups: tuple[str, ...],
    since: datetime,
    until: datetime | None,
    label_history: bool,
    workers: int | None,
) -> None:
    """Record the history of security MRs from the GitLab API (label, state, approval events).

    Lists the security labels of each project or group first (the MR filter has no
    wildcard), then every MR carrying one that was updated since --since (and created
    before --until), and records all its facts. Facts go
    through the same recording path as webhooks and are keyed by their GitLab id, so
    running it twice, or after the webhooks, changes nothing. Interrupted, it resumes
    where it stopped. GitLab's filter matches the labels an MR carries now: an MR whose
    security label was removed is found only with --label-history. Needs
    SECLEDGER_GITLAB_URL and SECLEDGER_GITLAB_TOKEN (or SECLEDGER_GITLAB_TOKEN_FILE).

    \b
    Example:
      secledger backfill --group acme --since 2025-01-01
      secledger backfill --project acme/payments --project 42 --since 2025-01-01 --until 2025-07-01
      secledger backfill --group acme --since 2025-01-01 --label-history
    """
    check_period(since, until)
    chosen, api = _scopes(projects, groups), _api(context)
    policy = LabelPolicy.from_settings(context.settings)
    with context.engine() as engine, edge():
        job = Backfill(
            engine,
            api,
            policy,
            chosen,
            Period(since, until),
            workers=workers or context.settings.gitlab_workers,
            recording=Recording.from_settings(context.settings),
            label_history=label_history,
        )
        with _progress() as bar:
            result = job.run(_Bar(bar))
    gone = f", {result.gone} deleted while the run went on" if result.gone else ""
    click.echo(
        f"{result.found} security merge requests found, {result.skipped} already done by an "
        f"interrupted run, {result.recorded_mrs} read, {result.recorded_facts} new facts"
        f" recorded{gone}"
    )


@click.command()
@scope_options
@period_options
@label_history_option
@click.option("--fix", "apply_fix", is_flag=True, help="Record what is missing via backfill.")
@click.pass_obj
def reconcile(
    context: Context,
    *,
    projects: tuple[str, ...],
    groups: tuple[str, ...],
    since: datetime,
    until: datetime | None,
    label_history: bool,
    apply_fix: bool,
) -> None:
    """Check the ledger against GitLab: every security MR merged or closed in the period.

    Prints what is missing or different, and what the ledger decided in the scope's
    projects that GitLab no longer lists with a security label, and stores the result
    (period, counts, differences, time) in the reconciliations table. Exits 1 while
    differences other than `unlabelled` remain.

    \b
    Example:
      secledger reconcile --group acme --since 2025-07-01 --until 2025-10-01
      secledger reconcile --project acme/payments --since 2025-07-01 --fix
      secledger reconcile --group acme --since 2025-07-01 --label-history
    """
    check_period(since, until)
    chosen, api = _scopes(projects, groups), _api(context)
    policy = LabelPolicy.from_settings(context.settings)
    # The bar follows the reading of label histories, the long part with --label-history.
    with context.engine() as engine, edge(), _progress(visible=label_history) as bar:
        report = reconciliation.reconcile(
            engine,
            api,
            policy,
            chosen,
            Period(since, until),
            apply_fix=apply_fix,
            recording=Recording.from_settings(context.settings),
            label_history=label_history,
            workers=context.settings.gitlab_workers,
            progress=_Bar(bar),
        )
    rows = [d.to_json() for d in report.differences]
    if rows:
        render(rows, "table", ("kind", "project_id", "mr_iid", "url", "fields"))
    click.echo(
        f"reconciliation {report.id}: GitLab {report.gitlab_count} decided security MRs, "
        f"ledger {report.ledger_count}; missing {report.count('missing')}, different "
        f"{report.count('different')}, extra {report.count('extra')}, unlabelled "
        f"{report.count('unlabelled')}; fixed {report.fixed}; remaining {len(report.remaining)}"
    )
    if report.remaining:
        raise SystemExit(1)


@click.command()
@click.option(
    "--limit",
    type=click.IntRange(1),
    default=500,
    show_default=True,
    help="Look up at most this many MRs for each of the two lookups in this run (label"
    " times, then approvals before the label).",
)
@click.option("--recheck", is_flag=True, help="Ask again about MRs already looked up.")
@click.pass_obj
def enrich(context: Context, limit: int, recheck: bool) -> None:
    """Find when the security label was really added, for rows that only know created_at,
    and record approvals given before an MR's security label.

    An approval given while the MR had no security label was not recorded (its webhook
    was ignored), yet GitLab counts it at the merge: each MR labelled after its creation
    has its approvals read once, and those dated before the label are recorded.

    `serve` does this in the background every SECLEDGER_ENRICH_INTERVAL_SECONDS when a
    GitLab token is configured; this command does one pass now. Exits 1 when any
    lookup failed (the token was refused, GitLab failed or could not be reached); an MR
    deleted or hidden from the token (the MR itself answers 404) is counted as `gone`
    instead; a 403 (a missing scope, a blocked user) is a failure.

    \b
    Example:
      SECLEDGER_GITLAB_URL=https://gitlab.example.com SECLEDGER_GITLAB_TOKEN_FILE=/run/token \\
        secledger enrich
    """
    api = _api(context)
    policy = LabelPolicy.from_settings(context.settings)
    recording = Recording.from_settings(context.settings)
    with context.engine() as engine, edge():
        labels = enrichment.enrich(
            engine, api, policy, limit=limit, recheck=recheck, recording=recording
        ).outcomes
        early = earlyapprovals.check(
            engine, api, policy, limit=limit, recheck=recheck, recording=recording
        )
    click.echo(f"label times: {_looked_up(labels)}")
    click.echo(f"approvals before the label: {_looked_up(early)}")
    failed = sum(
        outcomes.get(name, 0)
        for outcomes in (labels, early)
        for name in {enrichment.API_ERROR, enrichment.FAILED, earlyapprovals.FAILED}
    )
    gone = labels.get(enrichment.GONE, 0) + early.get(earlyapprovals.GONE, 0)
    if gone:
        click.echo(
            f"{gone} merge requests are deleted or hidden from the token (404);"
            " they are asked again on later passes",
            err=True,
        )
    if failed:
        # A cron job must see that the lookups failed (a revoked token fails them all);
        # a deleted MR, asked again on every pass, must not fail every run.
        click.echo(
            f"{failed} lookups failed (see the enrich_failed and early_approvals_failed lines);"
            " api_error ones are asked again on the next pass",
            err=True,
        )
        raise SystemExit(1)


def _looked_up(outcomes: dict[str, int]) -> str:
    detail = ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())) or "nothing to do"
    return f"{sum(outcomes.values())} merge requests looked up: {detail}"
