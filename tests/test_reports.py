"""Report figures against values computed by hand on a small fixed history.

Default policy: critical 24 h / 2 approvals, high 72 h, medium 168 h, low 336 h.
T0 is Monday 2025-08-04 09:00 UTC; "now" for the reports is T0 + 200 h.

MR  project        tier      labelled  first decision               then
1   acme/payments  high      0 h       bob approves 10 h (met)      carol merges 12 h
2   acme/payments  critical  0 h       bob approves 30 h (late)     dave approves 31, merged 32
3   acme/payments  medium    24 h      carol approves 48 h (met)    carol merges 50 h
4   acme/web       high      168 h     bob approves 268 h (late)    dave closes 270 h
5   acme/web       low       170 h     open, due 506 h (running)
6   acme/web       critical  172 h     open, due 196 h (overdue)
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.script import ScriptDirectory
from click.testing import CliRunner
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text
from sqlalchemy.exc import ProgrammingError

from builders import dumps, label_change, mr_event
from dashboard_fixtures import PASSWORD, USER, post_login, reader_settings
from secledger import findings, reports
from secledger.cli import main
from secledger.dashboard.queries import filter_options
from secledger.policy import LabelPolicy
from secledger.service import feed
from secledger.store import db, migrate
from secledger.tierpolicy import CompliancePolicy
from secledger.web import create_app

T0 = datetime(2025, 8, 4, 9, 0, tzinfo=UTC)
NOW = T0 + timedelta(hours=200)


def at(hours: float) -> str:
    return (T0 + timedelta(hours=hours)).strftime("%Y-%m-%d %H:%M:%S UTC")


def mr(iid: int, tier: str, labelled: float, steps: list[tuple[str, str, float]]) -> list[dict]:
    project = 14 if iid <= 3 else 15
    common: dict[str, Any] = {
        "iid": iid,
        "project_id": project,
        "labels": [f"sec::{tier}"],
        "created_at": at(labelled),
    }
    bodies = [mr_event("open", updated_at=at(labelled), **common)]
    bodies += [mr_event(a, actor=who, updated_at=at(h), **common) for a, who, h in steps]
    if project == 15:
        for body in bodies:
            body["project"]["path_with_namespace"] = "acme/web"
    return bodies


HISTORY = [
    *mr(1, "high", 0, [("approved", "bob", 10), ("merge", "carol", 12)]),
    *mr(
        2,
        "critical",
        0,
        [("approved", "bob", 30), ("approved", "dave", 31), ("merge", "carol", 32)],
    ),
    *mr(3, "medium", 24, [("approved", "carol", 48), ("merge", "carol", 50)]),
    *mr(4, "high", 168, [("approved", "bob", 268), ("close", "dave", 270)]),
    *mr(5, "low", 170, []),
    *mr(6, "critical", 172, []),
]


def record(engine: Engine, bodies: list[dict[str, Any]]) -> Engine:
    """Feed webhook ``bodies`` as a replay; each must be recorded."""
    for body in bodies:
        outcome = feed(
            engine,
            LabelPolicy(),
            {"x-gitlab-event": "Merge Request Hook"},
            dumps(body),
            max_body_bytes=10_000_000,
            source="replay",
        )
        assert outcome.status == "recorded"
    return engine


@pytest.fixture
def history(engine: Engine) -> Engine:
    return record(engine, HISTORY)


def run(engine: Engine, report, **filters: Any) -> list[dict[str, Any]]:
    """The report at NOW, read only; and proof that recording the breaches due at NOW first
    (what serve's periodic check does) would not change one figure."""
    chosen = reports.Filters(now=NOW, **filters)
    with db.reading(engine) as conn:
        answer = [row.as_dict() for row in report(conn, chosen)]
    with engine.connect() as conn, conn.begin() as transaction:
        assert findings.refresh_overdue(conn, CompliancePolicy(), NOW) > 0  # MR 6: not yet
        assert [row.as_dict() for row in report(conn, chosen)] == answer
        transaction.rollback()
    return answer


def by(rows: list[dict[str, Any]], key: str) -> dict[Any, dict[str, Any]]:
    return {row.pop(key): row for row in rows}


def test_reviewers_report(history) -> None:
    rows = by(run(history, reports.reviewers), "reviewer")
    common = {"revocations": 0}
    assert rows == {
        # bob: 10 (met), 30 (late, critical 24 h), 100 (late, high 72 h)
        "bob": common
        | {
            "decisions": 3,
            "approvals": 3,
            "median_hours": 30.0,
            "p90_hours": 86.0,
            "sla_met": 1,
            "sla_missed": 2,
            "sla_adherence_pct": 33.3,
        },
        # carol: merge 12 (met), merge 32 (late), approve 24 and merge 26 on MR 3 (met)
        "carol": common
        | {
            "decisions": 4,
            "approvals": 1,
            "median_hours": 25.0,
            "p90_hours": 30.2,
            "sla_met": 3,
            "sla_missed": 1,
            "sla_adherence_pct": 75.0,
        },
        # dave: approve 31 (late), close 102 h after the label (late)
        "dave": common
        | {
            "decisions": 2,
            "approvals": 1,
            "median_hours": 66.5,
            "p90_hours": 94.9,
            "sla_met": 0,
            "sla_missed": 2,
            "sla_adherence_pct": 0.0,
        },
    }


def test_reviewers_report_filters_on_reviewer_and_decision_time(history) -> None:
    rows = run(history, reports.reviewers, reviewer="bob", since=T0 + timedelta(hours=100))
    assert rows == [
        {
            "reviewer": "bob",
            "decisions": 1,
            "approvals": 1,
            "revocations": 0,
            "median_hours": 100.0,
            "p90_hours": 100.0,
            "sla_met": 0,
            "sla_missed": 1,
            "sla_adherence_pct": 0.0,
        }
    ]
    # As GitLab writes a user, and whatever the case (GitLab ignores it): the same rows.
    for spelled in ("@bob", "BOB", "@Bob"):
        assert (
            run(history, reports.reviewers, reviewer=spelled, since=T0 + timedelta(hours=100))
            == rows
        )


@pytest.mark.parametrize("report", [reports.tiers, reports.projects, reports.findings])
def test_the_reviewer_filter_of_every_report_ignores_the_case(history, report) -> None:
    named = run(history, report, reviewer="bob")
    assert named
    assert run(history, report, reviewer="Bob") == named


def test_reviewers_report_filters_on_the_mrs_tier_and_project(history) -> None:
    """Tier and project filter the decisions' MRs, joined only for these filters."""

    def row(decisions: int, approvals: int, hours: float) -> dict[str, Any]:
        return {
            "decisions": decisions,
            "approvals": approvals,
            "revocations": 0,
            "median_hours": hours,
            "p90_hours": hours,
            "sla_met": 0,
            "sla_missed": 1,
            "sla_adherence_pct": 0.0,
        }

    # MR 2 (critical, 24 h): bob approves at 30 h, dave at 31, carol merges at 32.
    critical = by(run(history, reports.reviewers, tier="critical"), "reviewer")
    assert critical == {"bob": row(1, 1, 30.0), "carol": row(1, 0, 32.0), "dave": row(1, 1, 31.0)}
    # acme/web holds MR 4 (high, 72 h): bob approves 100 h after the label, dave closes at 102.
    web = by(run(history, reports.reviewers, project="acme/web"), "reviewer")
    assert web == {"bob": row(1, 1, 100.0), "dave": row(1, 0, 102.0)}
    # GitLab finds a project by its path whatever the case: so does the filter.
    assert by(run(history, reports.reviewers, project="ACME/Web"), "reviewer") == web


def test_tiers_report(history) -> None:
    rows = by(run(history, reports.tiers), "tier")
    assert rows["critical"] == {
        "mrs": 2,
        "decided": 1,
        "open": 1,
        "median_hours": 30.0,
        "p90_hours": 30.0,
        "sla_met": 0,
        "sla_breached": 2,
        "sla_adherence_pct": 0.0,
        "labeled_after_merge_or_close": 0,
    }
    assert rows["high"] == {
        "mrs": 2,
        "decided": 2,
        "open": 0,
        "median_hours": 55.0,
        "p90_hours": 91.0,
        "sla_met": 1,
        "sla_breached": 1,
        "sla_adherence_pct": 50.0,
        "labeled_after_merge_or_close": 0,
    }
    assert rows["medium"] == {
        "mrs": 1,
        "decided": 1,
        "open": 0,
        "median_hours": 24.0,
        "p90_hours": 24.0,
        "sla_met": 1,
        "sla_breached": 0,
        "sla_adherence_pct": 100.0,
        "labeled_after_merge_or_close": 0,
    }
    # The low MR's clock still runs: neither met nor breached.
    assert rows["low"] == {
        "mrs": 1,
        "decided": 0,
        "open": 1,
        "median_hours": None,
        "p90_hours": None,
        "sla_met": 0,
        "sla_breached": 0,
        "sla_adherence_pct": None,
        "labeled_after_merge_or_close": 0,
    }


def test_projects_report_and_project_filter(history) -> None:
    rows = by(run(history, reports.projects), "project_path")
    assert rows["acme/payments"] | {"instance": None} == {
        "instance": None,
        "project_id": 14,
        "mrs": 3,
        "decided": 3,
        "open": 0,
        "median_hours": 24.0,
        "p90_hours": 28.8,
        "sla_met": 2,
        "sla_breached": 1,
        "sla_adherence_pct": 66.7,
        "labeled_after_merge_or_close": 0,
    }
    assert rows["acme/web"]["mrs"] == 3
    assert rows["acme/web"]["sla_breached"] == 2
    assert rows["acme/web"]["sla_adherence_pct"] == 0.0
    only = run(history, reports.tiers, project="15", tier="critical")
    assert [(r["tier"], r["mrs"], r["open"]) for r in only] == [("critical", 1, 1)]


def test_a_renamed_project_is_shown_under_its_newest_path(history) -> None:
    """MR 4, the last of project 15 to be seen (closed at 270 h), was seen after the
    project became acme/aa-new: the path its other MRs keep is the old one."""
    with history.begin() as conn:
        conn.execute(
            text(
                "UPDATE security_review_ledger SET project_path = 'acme/aa-new'"
                " WHERE project_id = 15 AND mr_iid = 4"
            )
        )
    rows = by(run(history, reports.projects), "project_path")
    assert rows["acme/aa-new"]["mrs"] == 3
    assert "acme/web" not in rows
    # Filtered to MRs that were last seen before the rename, the project is still named
    # by its newest path, the one --project takes (the old one is refused).
    rows = by(run(history, reports.projects, tier="critical"), "project_path")
    assert rows["acme/aa-new"]["mrs"] == 1
    assert "acme/web" not in rows
    # A filter by path takes the project by its path now: all three of its MRs, and
    # none by the old path, which a new project may take (MRs that only kept it).
    [tiers] = run(history, reports.tiers, project="ACME/aa-new", tier="critical")
    assert (tiers["mrs"], tiers["open"]) == (1, 1)
    assert sum(row["mrs"] for row in run(history, reports.tiers, project="acme/aa-new")) == 3
    assert run(history, reports.tiers, project="acme/web") == []
    assert run(history, reports.tiers, project="15") == run(
        history, reports.tiers, project="acme/aa-new"
    )
    # The dashboard offers the paths its filter takes: not the old one.
    with db.reading(history) as conn:
        offered = filter_options(conn).projects
    assert "acme/aa-new" in offered
    assert "acme/web" not in offered


def test_periods_report_by_week_and_month(history) -> None:
    weeks = by(run(history, reports.periods, period="week"), "period_start")
    assert sorted(weeks) == ["2025-08-04", "2025-08-11"]
    assert (weeks["2025-08-04"]["mrs"], weeks["2025-08-04"]["p90_hours"]) == (3, 28.8)
    assert (weeks["2025-08-11"]["mrs"], weeks["2025-08-11"]["sla_breached"]) == (3, 2)
    months = run(history, reports.periods, period="month")
    assert [(m["period_start"], m["mrs"], m["decided"]) for m in months] == [("2025-08-01", 6, 4)]
    since = run(history, reports.periods, since=T0 + timedelta(hours=168))
    assert [m["period_start"] for m in since] == ["2025-08-11"]


def test_open_report_shows_the_sla_clock(history) -> None:
    rows = run(history, reports.open_mrs)
    assert [(r["mr_iid"], r["sla_status"], r["hours_left"]) for r in rows] == [
        (6, "overdue", -4.0),
        (5, "running", 306.0),
    ]
    assert rows[0]["deadline"] == "2025-08-12T13:00:00Z"  # 172 h + 24 h
    assert [(r["risk_tier"], r["sla_tier"]) for r in rows] == [("critical",) * 2, ("low",) * 2]


def test_open_report_names_the_tier_of_the_deadline_after_a_relabel(
    engine, database_url, tmp_path
) -> None:
    """Relabelled low after its critical deadline passed, MR 7 keeps that deadline: shown
    beside the ledger's tier, the deadline no longer looks wrong for a low MR."""
    relabel = mr_event(
        "update",
        iid=7,
        project_id=15,  # as mr() files MR 7
        labels=["sec::low"],
        created_at=at(100),
        updated_at=at(130),
        changes=label_change(["sec::critical"], ["sec::low"], at(130)),
    )
    record(engine, [*mr(7, "critical", 100, []), relabel])
    [row] = run_open(engine)
    assert (row["risk_tier"], row["sla_tier"], row["sla_status"]) == ("low", "critical", "overdue")
    assert row["deadline"] == "2025-08-09T13:00:00Z"  # 100 h + 24 h
    settings = reader_settings(database_url, tmp_path / "data")
    with TestClient(create_app(settings, db.Database(database_url, embedded=False))) as app:
        assert post_login(app, USER, PASSWORD).status_code == 303
        panel = app.get("/").text.split('id="open-mrs"')[1].split("</table>")[0]
    assert "<td>low (deadline as critical)</td>" in panel


def run_open(engine: Engine) -> list[dict[str, Any]]:
    with db.reading(engine) as conn:
        return [r.as_dict() for r in reports.open_mrs(conn, reports.Filters(now=NOW))]


def test_findings_report_counts_per_rule_and_severity(history) -> None:
    rows = run(history, reports.findings)
    assert [(r["rule"], r["severity"], r["open"], r["mrs"]) for r in rows] == [
        ("sla-breached", "high", 2, 2),  # MR 2 decided late, MR 6 open past due
        ("sla-breached", "medium", 1, 1),  # MR 4
    ]


def test_bi_views_are_readable_by_the_read_only_role_which_cannot_write(history) -> None:
    with history.connect() as conn:
        conn.execute(text("SET ROLE secledger_readonly"))
        status = dict(
            conn.execute(
                text("SELECT mr_iid, sla_status FROM bi_sla_status WHERE project_id = 14")
            ).all()
        )
        assert status == {1: "met", 2: "breached", 3: "met"}
        metrics = conn.execute(
            text(
                "SELECT decisions, approvals, median_hours, sla_adherence_pct"
                " FROM bi_reviewer_metrics WHERE reviewer = 'bob'"
            )
        ).one()
        assert tuple(metrics) == (3, 3, 30.0, 33.3)
        assert conn.execute(text("SELECT count(*) FROM bi_decisions")).scalar_one() == 9
        assert conn.execute(text("SELECT count(*) FROM bi_findings")).scalar_one() == 2
        # Auditors may read everything (the log included, to verify it); nothing else.
        with pytest.raises(ProgrammingError, match="permission denied"):
            conn.execute(text("UPDATE findings SET resolved_at = now()"))


def ended_then_labelled(iid: int, action: str, reopened: float | None = None) -> list[dict]:
    """!iid on acme/web, merged or closed (``action``) at 100 h without a security label,
    labelled sec::high at 110 h (due at 182 h) and, when told, reopened then. GitLab ignored
    the merge or close (no security label yet); a retry delivered it after the label."""
    state = {"merge": "merged", "close": "closed"}[action]
    common: dict[str, Any] = {"iid": iid, "project_id": 15, "created_at": at(90)}
    change = label_change([], ["sec::high"], at(110))
    bodies = [
        mr_event("update", state=state, updated_at=at(110), changes=change, **common),
        mr_event(action, actor="dave", labels=[], updated_at=at(100), **common),
    ]
    if reopened is not None:
        bodies.append(mr_event("reopen", updated_at=at(reopened), **common))
    for body in bodies:
        body["project"]["path_with_namespace"] = "acme/web"
    return bodies


@pytest.fixture
def labelled_late(history: Engine) -> Engine:
    """The history, and !7 merged and !8 closed before their label; !9 closed before it
    and reopened after it, at 120 h: open, overdue at NOW."""
    bodies = [
        *ended_then_labelled(7, "merge"),
        *ended_then_labelled(8, "close"),
        *ended_then_labelled(9, "close", reopened=120),
    ]
    return record(history, bodies)


def test_mrs_merged_or_closed_before_their_label_are_counted_apart(labelled_late) -> None:
    """!7 and !8 are neither met nor breached: the tier counts them in `mrs` and in
    `labeled_after_merge_or_close`. !9, reopened, is open and overdue."""
    rows = by(run(labelled_late, reports.tiers), "tier")
    assert rows["high"] == {
        "mrs": 5,
        "decided": 2,
        "open": 1,
        "median_hours": 55.0,
        "p90_hours": 91.0,
        "sla_met": 1,
        "sla_breached": 2,
        "sla_adherence_pct": 33.3,
        "labeled_after_merge_or_close": 2,
    }
    rows = run(labelled_late, reports.open_mrs)
    assert [(r["mr_iid"], r["sla_status"], r["hours_left"]) for r in rows] == [
        (9, "overdue", -18.0),
        (6, "overdue", -4.0),
        (5, "running", 306.0),
    ]
    rows = run(labelled_late, reports.findings)
    assert [(r["rule"], r["severity"], r["open"], r["mrs"]) for r in rows] == [
        ("insufficient-approvals", "high", 1, 1),  # MR 7, merged unapproved, says it
        ("sla-breached", "high", 2, 2),
        ("sla-breached", "medium", 2, 2),  # MR 4 decided late, MR 9 open past due
    ]


def test_bi_sla_status_says_labelled_after_merge_or_close(labelled_late) -> None:
    with labelled_late.connect() as conn:
        conn.execute(text("SET ROLE secledger_readonly"))
        rows = conn.execute(
            text(
                "SELECT mr_iid, sla_status, hours_left FROM bi_sla_status"
                " WHERE mr_iid IN (7, 8, 9) ORDER BY mr_iid"
            )
        ).all()
    assert [tuple(row[:2]) for row in rows] == [
        (7, "labeled_after_merge"),
        (8, "labeled_after_close"),
        (9, "overdue"),  # now() is long past its deadline
    ]
    assert [row[2] is None for row in rows] == [True, True, False]


def test_bi_sla_status_judges_as_the_reports_do() -> None:
    """Migration 0014 wrote ``reports.SLA_STATUS`` into bi_sla_status, with now() for :now:
    the two must agree, or a change to one needs a migration for the other."""
    revision = ScriptDirectory.from_config(migrate.alembic_config()).get_revision("0014")
    assert revision is not None
    written = " ".join(revision.module.SLA_STATUS.split())
    assert written == " ".join(reports.SLA_STATUS.replace(":now", "now()").split())


def test_migration_0014_downgrades_to_0004s_view_and_back(labelled_late) -> None:
    config = migrate.alembic_config()
    query = text("SELECT sla_status FROM bi_sla_status WHERE mr_iid = 7")
    with labelled_late.connect() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, "0013")
        assert conn.execute(query).scalar_one() == "overdue"
        command.upgrade(config, "head")
        # A clock stored before 0014 gets what the periodic check assumed (merged or
        # closed now: never ran), so the upgrade records no new breach; re-evaluation
        # (`findings --reevaluate`) then judges it from its events, here the same.
        assert conn.execute(query).scalar_one() == "labeled_after_merge"
        findings.refresh_overdue(conn, CompliancePolicy(), NOW)
        breached = text(
            "SELECT mr_iid FROM findings WHERE rule = 'sla-breached' AND mr_iid IN (7, 8)"
        )
        assert conn.execute(breached).all() == []
        findings.reevaluate_all(conn, CompliancePolicy(), NOW)
        conn.commit()
    with labelled_late.connect() as conn:
        assert migrate.is_current(conn)
        assert conn.execute(query).scalar_one() == "labeled_after_merge"


def test_cli_findings_json_and_report_csv(history, database_url, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("SECLEDGER_DATABASE_URL", database_url)
    monkeypatch.setenv("SECLEDGER_DATA_DIR", str(tmp_path))
    runner = CliRunner()
    result = runner.invoke(main, ["findings", "--format", "json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    items = json.loads(result.output)
    required = {
        "rule",
        "severity",
        "instance",
        "project_id",
        "mr_iid",
        "url",
        "detected_at",
        "evidence",
    }
    assert items and all(required <= set(item) for item in items)
    # Run today, MR 5 (due 2025-08-25) is overdue too.
    assert {item["mr_iid"] for item in items} == {2, 4, 5, 6}
    result = runner.invoke(main, ["report", "tiers", "--format", "csv", "--tier", "high"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("tier,mrs,decided,open,median_hours")
    assert lines[1].startswith("high,2,2,0,55.0,91.0,1,1,50.0")
    bad = runner.invoke(main, ["report", "tiers", "--since", "last tuesday"])
    assert bad.exit_code == 2
    assert "is not a date" in bad.output


def test_cli_tier_matches_whatever_its_case_and_an_unknown_one_is_told(
    history, database_url, monkeypatch, tmp_path
) -> None:
    """Tier labels match whatever their case; so does --tier. A name no tier has still
    runs (rows may carry a tier configured before) but says so, rather than an empty
    table and nothing else."""
    monkeypatch.setenv("SECLEDGER_DATABASE_URL", database_url)
    monkeypatch.setenv("SECLEDGER_DATA_DIR", str(tmp_path))
    runner = CliRunner()
    upper = runner.invoke(main, ["report", "tiers", "--format", "csv", "--tier", "High"])
    assert upper.exit_code == 0, upper.output
    assert upper.stdout.splitlines()[1].startswith("high,2,2,0")
    assert upper.stderr == ""
    found = runner.invoke(main, ["findings", "--format", "json", "--tier", "HIGH"])
    assert {item["risk_tier"] for item in json.loads(found.stdout)} == {"high"}
    typo = runner.invoke(main, ["report", "tiers", "--format", "csv", "--tier", "hihg"])
    assert typo.exit_code == 0
    assert typo.stdout.splitlines()[1:] == []
    assert "no configured tier is named 'hihg' (critical, high, medium, low, unclassified)" in (
        typo.stderr
    )


@pytest.mark.parametrize("command", ["findings", "report"])
def test_a_period_that_ends_before_it_starts_is_refused(command) -> None:
    args = [command] if command == "findings" else [command, "tiers"]
    result = CliRunner().invoke(main, [*args, "--since", "2026-12-01", "--until", "2026-11-01"])
    assert result.exit_code == 2
    assert "--since must be before --until" in result.output


@pytest.mark.parametrize("command", ["findings", "report"])
def test_commands_have_help_with_an_example_and_are_documented(command) -> None:
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0
    assert "Example:" in result.output
    docs = (Path(__file__).parent.parent / "docs" / "policy.md").read_text()
    assert f"secledger {command}" in docs


def test_the_reviewer_filter_of_findings_keeps_an_approval_revoked_before_the_merge(
    history: Engine,
) -> None:
    """bob approves and revokes, carol merges: the findings are about bob's approval, though
    he no longer stands among the approvers."""
    engine = record(
        history,
        mr(7, "high", 0, [("approved", "bob", 1), ("unapproved", "bob", 2), ("merge", "carol", 3)]),
    )
    revoked = "approval-revoked-before-merge"
    assert revoked in {row["rule"] for row in run(engine, reports.findings)}
    assert revoked in {row["rule"] for row in run(engine, reports.findings, reviewer="BOB")}
    assert revoked not in {row["rule"] for row in run(engine, reports.findings, reviewer="carol")}
    with db.reading(engine) as conn:
        listed = findings.list_findings(conn, CompliancePolicy(), NOW, reviewer="@bob")
        assert (revoked, 7) in {(f.rule, f.mr_iid) for f in listed}
        listed = findings.list_findings(conn, CompliancePolicy(), NOW, reviewer="carol")
        assert 7 not in {f.mr_iid for f in listed}


def test_reports_read_the_ledger_in_public_not_a_copy_in_the_logins_schema(
    history, database_url, monkeypatch, tmp_path
) -> None:
    """The default search_path reads a schema named after the login first: whoever may
    create one (the database's owner) could leave a ledger there for reports to show."""
    with history.begin() as conn:
        login = conn.execute(text("SELECT current_user")).scalar_one()
        conn.execute(text(f'CREATE SCHEMA "{login}"'))
        conn.execute(
            text(
                f'CREATE TABLE "{login}".security_review_ledger'
                " AS TABLE public.security_review_ledger WITH NO DATA"
            )
        )
    monkeypatch.setenv("SECLEDGER_DATABASE_URL", database_url)
    monkeypatch.setenv("SECLEDGER_DATA_DIR", str(tmp_path))
    shown = CliRunner().invoke(main, ["ledger", "--format", "json"], catch_exceptions=False)
    assert shown.exit_code == 0, shown.output
    assert sorted(row["mr_iid"] for row in json.loads(shown.output)) == [1, 2, 3, 4, 5, 6]


def on_instance(bodies: list[dict[str, Any]], host: str) -> list[dict[str, Any]]:
    """The same bodies as another GitLab instance (``host``) would send them."""
    text_ = json.dumps(bodies).replace("https://gitlab.example.com", f"https://{host}")
    return json.loads(text_)


@pytest.fixture
def two_instances(history: Engine) -> Engine:
    """Project 14 (acme/payments) on a second instance too, with one MR of its own."""
    return record(history, on_instance(mr(1, "low", 0, [("approved", "erin", 2)]), "git.b.test"))


def test_a_project_on_two_instances_is_refused_by_id_or_path_and_taken_by_url(
    two_instances, database_url, tmp_path
) -> None:
    """Project 42 of one GitLab and project 42 of another are two projects: `--project 42`
    counted both, and an evidence pack for it held the other instance's MRs."""
    env = {"SECLEDGER_DATABASE_URL": database_url, "SECLEDGER_DATA_DIR": str(tmp_path / "d")}
    runner = CliRunner()
    for typed in ("14", "ACME/payments"):
        refused = runner.invoke(main, ["report", "tiers", "--project", typed], env=env)
        assert refused.exit_code == 1, refused.output
        assert f"project {typed!r} is on 2 GitLab instances" in refused.output
        assert "https://git.b.test, https://gitlab.example.com" in refused.output
        listed = runner.invoke(main, ["findings", "--project", typed], env=env)
        assert listed.exit_code == 1
        assert "give its URL instead" in listed.output
    pack = tmp_path / "pack"
    evidence = runner.invoke(
        main,
        [
            "evidence",
            "--since",
            "2025-01-01",
            "--until",
            "2027-01-01",
            "--out",
            str(pack),
            "--project",
            "14",
        ],
        env=env,
    )
    assert evidence.exit_code == 1
    assert "is on 2 GitLab instances" in evidence.output
    assert not any(pack.rglob("*.json"))

    def mrs(project: str) -> int:
        return sum(row["mrs"] for row in run(two_instances, reports.tiers, project=project))

    assert mrs("https://git.b.test/acme/payments") == 1
    assert mrs("https://GIT.B.TEST:443/acme/payments/-/merge_requests/1") == 1
    assert mrs("https://gitlab.example.com/acme/payments/") == 3
    assert mrs("https://gitlab.example.com/14") == 3
    assert mrs("https://gitlab.example.com/acme/web") == 3
    assert mrs("https://git.b.test/acme/web") == 0
    only_b = runner.invoke(
        main,
        ["report", "projects", "--project", "https://git.b.test/acme/payments", "--format", "json"],
        env=env,
    )
    assert only_b.exit_code == 0, only_b.output
    assert [(r["instance"], r["mrs"]) for r in json.loads(only_b.output)] == [
        ("https://git.b.test", 1)
    ]
    # One instance only: the id alone is enough, as before.
    alone = runner.invoke(main, ["report", "tiers", "--project", "15"], env=env)
    assert alone.exit_code == 0, alone.output
    # A clone URL, and blanks around it, name the project too.
    assert mrs(" https://git.b.test/acme/payments.git ") == 1
    # An SSH clone URL names the path, on any instance (its host is not the web one).
    assert mrs("git@gitlab.example.com:acme/web.git") == 3
    assert mrs("ssh://git@ssh.git.b.test:2222/acme/web.git") == 3
    assert mrs("https://git.b.test/acme/payments/-") == 1
    # An instance the ledger holds nothing of (http for https here) matched nothing.
    for typed in ("http://git.b.test/acme/payments", "https://git.c.test/acme/payments"):
        unknown = runner.invoke(main, ["findings", "--project", typed], env=env)
        assert unknown.exit_code == 1, unknown.output
        assert "the ledger holds no merge request of" in unknown.output
        assert "https://git.b.test, https://gitlab.example.com" in unknown.output
    # --reevaluate writes: the filter is refused before it.
    reevaluated = runner.invoke(main, ["findings", "--reevaluate", "--project", "14"], env=env)
    assert reevaluated.exit_code == 1
    assert "re-evaluated" not in reevaluated.output


def test_a_project_url_that_names_no_project_is_refused(history, database_url, tmp_path):
    env = {"SECLEDGER_DATABASE_URL": database_url, "SECLEDGER_DATA_DIR": str(tmp_path / "d")}
    result = CliRunner().invoke(
        main, ["report", "tiers", "--project", "https://gitlab.example.com/"], env=env
    )
    assert result.exit_code == 1
    assert "is not a project's URL" in result.output


@pytest.mark.parametrize("command", [["report", "tiers"], ["findings"], ["report", "open"]])
def test_a_project_the_ledger_holds_nothing_of_is_refused(history, database_url, tmp_path, command):
    """An empty report for a mistyped path read as "no security change there"."""
    env = {"SECLEDGER_DATABASE_URL": database_url, "SECLEDGER_DATA_DIR": str(tmp_path / "d")}
    result = CliRunner().invoke(main, [*command, "--project", "acme/paymnets"], env=env)
    assert result.exit_code == 1, result.output
    assert "holds no merge request of project 'acme/paymnets'" in result.output
    taken = CliRunner().invoke(main, [*command, "--project", "acme/payments"], env=env)
    assert taken.exit_code == 0, taken.output


def test_an_empty_answer_says_whether_the_ledger_holds_anything(
    history, database_url, other_database_url, tmp_path
):
    """An empty table reads as "no security change": a wrong database URL, or hooks that
    never arrive, must not pass for that."""
    runner = CliRunner()
    data = str(tmp_path / "d")
    quiet = {"SECLEDGER_DATABASE_URL": database_url, "SECLEDGER_DATA_DIR": data}
    window = ["--since", "2001-01-01", "--until", "2001-02-01", "--format", "json"]
    for args in (["report", "tiers", *window], ["findings", *window]):
        result = runner.invoke(main, args, env=quiet)
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout) == []
        assert "in this selection (the ledger holds 6 security merge requests in all)" in (
            result.stderr
        )
    empty = {"SECLEDGER_DATABASE_URL": other_database_url, "SECLEDGER_DATA_DIR": data}
    for args in (["report", "reviewers"], ["findings"]):
        result = runner.invoke(main, args, env=empty)
        assert result.exit_code == 0, result.output
        assert "the ledger holds no security merge request at all" in result.stderr
    # Rows to show: no note.
    full = runner.invoke(main, ["report", "tiers", "--format", "json"], env=quiet)
    assert json.loads(full.stdout) and not full.stderr


def test_bi_reviewer_metrics_times_only_decisions_after_the_label(labelled_late) -> None:
    """!7 was merged and !8 closed before their label: the reviewers report counts those
    decisions in neither met nor missed, while the view counted them as on time, with a
    negative time (migration 0026). Over all time the two now give the same figures."""
    timed = ("reviewer", "decisions", "median_hours", "p90_hours", "sla_adherence_pct")
    with labelled_late.connect() as conn:
        report = [
            tuple(row.as_dict()[name] for name in timed)
            for row in reports.reviewers(conn, reports.Filters(now=NOW))
        ]
        view = conn.execute(text(f"SELECT {', '.join(timed)} FROM bi_reviewer_metrics")).all()
    assert sorted(map(_rounded, view)) == sorted(map(_rounded, report))


def _rounded(row: Any) -> tuple[Any, ...]:
    # The report reads the hours as numeric, the view as double precision.
    return tuple(round(value, 6) if isinstance(value, float) else value for value in row)
