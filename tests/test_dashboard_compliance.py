"""The compliance modules wired into serve: report routes, findings, SLA gauge and refresh."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import quote

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from builders import mr_event
from conftest import post
from dashboard_fixtures import bearer, log_in, post_login, reader_client, reader_settings
from secledger import overdue, reports
from secledger.cli import main
from secledger.dashboard.auth import read_users_file, verify_password
from secledger.findings import list_findings
from secledger.store import db
from secledger.tierpolicy import CompliancePolicy
from secledger.web import create_app

INSTANCE = "https://gitlab.example.com"
MR14 = f"{quote(INSTANCE, safe='')}/14/14"


@pytest.fixture
def reader(database_url, tmp_path) -> Iterator[TestClient]:
    """A dashboard-enabled receiver holding the demo history."""
    yield from reader_client(database_url, tmp_path)


def cli_json(database_url: str, tmp_path: Path, *args: str) -> list[dict]:
    env = {"SECLEDGER_DATABASE_URL": database_url, "SECLEDGER_DATA_DIR": str(tmp_path / "cli")}
    result = CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)  # a note on stderr may say why it is empty


QUERIES = (
    "",
    "since=2026-11-05&until=2026-11-09",
    "tier=critical",
    "reviewer=bob",
    "project=14",
    "project=https://gitlab.example.com/acme/payments",
)


def test_report_routes_answer_what_the_cli_prints(reader, database_url, tmp_path) -> None:
    """One implementation: /api/reports/KIND equals `secledger report KIND --format json`.

    !16 is open past its deadline with no breach recorded (its last event came before the
    deadline), and stays so: neither side records it, both count it.
    """
    for kind in reports.REPORTS:
        for query in QUERIES:
            args = [part for pair in query.split("&") if pair for part in pair.split("=")]
            options = [f"--{word}" if i % 2 == 0 else word for i, word in enumerate(args)]
            expected = cli_json(
                database_url, tmp_path, "report", kind, "--format", "json", *options
            )
            answer = reader.get(f"/api/reports/{kind}?{query}", headers=bearer())
            assert answer.status_code == 200, answer.text
            got = answer.json()
            # hours_left is measured against each call's own "now", up to a second apart:
            # rounded, the two could fall on either side of a half hour.
            left = [[row.pop("hours_left", None) for row in rows] for rows in (expected, got)]
            assert got == expected, (kind, query)
            assert left[1] == pytest.approx(left[0], abs=0.05), (kind, query)
    assert expected  # the loop compared real rows, not only empty lists
    counts = cli_json(database_url, tmp_path, "report", "findings", "--format", "json")
    assert {"rule": "sla-breached", "severity": "high", "open": 1, "resolved": 0, "mrs": 1} in (
        counts
    )
    assert recorded_breaches(database_url) == []


def recorded_breaches(database_url: str) -> list[int]:
    engine = db.create(database_url, pool_size=1)
    try:
        with engine.connect() as conn:
            query = text("SELECT mr_iid FROM findings WHERE rule = 'sla-breached'")
            return list(conn.execute(query).scalars())
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    "query", ["all=true", "rule=sla-breached", "tier=critical&since=2026-11-01"]
)
def test_findings_route_answers_what_the_cli_prints(reader, database_url, tmp_path, query) -> None:
    """/api/findings equals `secledger findings --format json`, an unrecorded breach (!16,
    id null, detected at each call's own "now") included."""
    args = [part for pair in query.split("&") for part in pair.split("=")]
    options = [f"--{w}" if i % 2 == 0 else w for i, w in enumerate(args) if w != "true"]
    expected = cli_json(database_url, tmp_path, "findings", "--format", "json", *options)
    answer = reader.get(f"/api/findings?{query}", headers=bearer())
    assert answer.status_code == 200, answer.text
    got = answer.json()
    unrecorded = [f for f in (*expected, *got) if f["id"] is None]
    assert [(f["mr_iid"], f["rule"]) for f in unrecorded] == [(16, "sla-breached")] * 2
    for item in unrecorded:
        detected = datetime.fromisoformat(item.pop("detected_at"))
        assert abs(detected - datetime.now(UTC)) < timedelta(minutes=1)
    assert got == expected


def test_report_routes_refuse_a_bad_date_like_the_cli(reader) -> None:
    answer = reader.get("/api/reports/tiers?since=yesterday", headers=bearer())
    assert answer.status_code == 422
    assert "is not a date" in answer.text


def test_demo_history_findings_are_listed_with_evidence_and_log_rows(reader) -> None:
    """!14 was approved and merged by its author: both findings, proved by log rows."""
    found = reader.get("/api/findings?project=acme/payments", headers=bearer()).json()
    # An empty rule filters nothing (it matched no finding at all).
    unruled = reader.get("/api/findings?project=acme/payments&rule=", headers=bearer()).json()
    assert [(f["rule"], f["mr_iid"]) for f in unruled] == [(f["rule"], f["mr_iid"]) for f in found]
    cased = reader.get("/api/findings?project=Acme/Payments", headers=bearer()).json()
    # (detected_at of a breach not recorded yet is each request's own "now")
    assert [(f["rule"], f["mr_iid"]) for f in cased] == [(f["rule"], f["mr_iid"]) for f in found]
    assert found
    of14 = {f["rule"]: f for f in found if f["mr_iid"] == 14}
    assert {"author-approved", "merged-by-author"} <= set(of14)
    assert (
        of14["author-approved"]["evidence"]["approver"]
        == of14["merged-by-author"]["evidence"]["merged_by"]
    )
    trail = reader.get(f"/api/ledger/{MR14}", headers=bearer()).json()
    seqs = {e["seq"] for e in trail["timeline"]}
    rules = {f["rule"]: f for f in trail["findings"]}
    assert {"author-approved", "merged-by-author"} <= set(rules)
    assert set(rules["merged-by-author"]["seqs"]) <= seqs
    assert rules["merged-by-author"]["seqs"] == [trail["timeline"][-1]["seq"]]


def test_dashboard_shows_sla_adherence_open_clock_and_findings(reader) -> None:
    log_in(reader)
    page = reader.get("/").text
    assert "needs the compliance reports" not in page
    assert 'id="sla-policy"' in page and "critical 24 h" in page
    # Every reviewer who decided has an SLA adherence percentage in the table.
    table = page.split('id="reviewers"')[1].split("</table>")[0]
    assert 'class="adherence"' in table and "%</td>" in table
    open_panel = page.split('id="open-mrs"')[1].split("</table>")[0]
    assert "!16" in open_panel and "overdue" in open_panel  # 24 h SLA, labelled in Nov 2026
    panel = page.split('id="findings"')[1]
    assert "author-approved" in panel and "merged-by-author" in panel
    charts = json.loads(page.split('id="chart-data">')[1].split("</script>")[0])
    sla = [t for t in charts["ttd-chart"]["data"] if t.get("name") == "SLA"]
    assert sla and dict(zip(sla[0]["x"], sla[0]["y"], strict=True))["critical"] == 24
    mr_page = reader.get(f"/mr/{MR14}").text
    assert "author-approved" in mr_page and "merged-by-author" in mr_page
    assert 'href="#seq-' in mr_page


def test_open_mrs_come_most_urgent_first(reader) -> None:
    """Least SLA time left first: !16 (critical, 24 h) before a low-tier MR (336 h)."""
    # Labelled on the same day as !16, so only the tiers' SLAs order them.
    body = mr_event("open", iid=40, labels=["sec::low"], created_at="2026-11-20 09:00 UTC")
    post(reader, body)
    rows = reader.get("/api/reports/open", headers=bearer()).json()
    assert [r["mr_iid"] for r in rows] == [16, 40]
    assert rows[0]["deadline"] < rows[1]["deadline"]
    assert rows[0]["hours_left"] < rows[1]["hours_left"]


def gauge(client: TestClient, name: str) -> dict[str, float]:
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name:
                found[sample.labels["tier"]] = sample.value
    return found


def test_sla_breach_gauge_is_read_from_the_database(client, engine) -> None:
    """Open MRs with an sla-breached finding, per tier; 0 for every configured tier."""
    labelled = datetime(2025, 8, 5, 20, 0, tzinfo=UTC)
    post(
        client, mr_event("open", iid=7, labels=["sec::critical"], updated_at="2025-08-05 20:00 UTC")
    )
    assert gauge(client, "secledger_sla_breaches") == dict.fromkeys(
        ["critical", "high", "medium", "low", "unclassified"], 0.0
    )
    overdue.refresh_step(engine, CompliancePolicy(), labelled + timedelta(hours=25))
    assert gauge(client, "secledger_sla_breaches")["critical"] == 1
    post(client, mr_event("merge", iid=7, labels=["sec::critical"], actor="bob"))
    assert gauge(client, "secledger_sla_breaches")["critical"] == 0


def test_periodic_check_records_a_breach_without_any_event(engine, client) -> None:
    """The step of serve's periodic task, with an injected now: before, at, after the deadline."""
    post(client, mr_event("open", iid=8, labels=["sec::high"], updated_at="2025-08-05 20:00 UTC"))
    deadline = datetime(2025, 8, 5, 20, 0, tzinfo=UTC) + timedelta(hours=72)
    policy = CompliancePolicy()
    assert overdue.refresh_step(engine, policy, deadline - timedelta(minutes=1)) == 0
    assert overdue.refresh_step(engine, policy, deadline + timedelta(minutes=1)) == 1
    assert overdue.refresh_step(engine, policy, deadline + timedelta(hours=1)) == 0  # kept once
    with engine.connect() as conn:
        # As of the deadline itself: only what the periodic check recorded can be listed.
        found = list_findings(conn, policy, deadline, rule="sla-breached")
    assert [(f.mr_iid, f.evidence["status"]) for f in found] == [(8, "open past deadline")]


def test_periodic_check_is_off_at_zero(database_url, tmp_path, engine) -> None:
    settings = reader_settings(database_url, tmp_path / "data", sla_refresh_interval_seconds=0)
    assert overdue.schedule(settings, engine) is None
    with TestClient(create_app(settings, db.Database(database_url, embedded=False))) as app:
        assert app.get("/healthz").status_code == 200


def test_demo_creates_one_dashboard_user_with_a_private_password_file(
    database_url, tmp_path
) -> None:
    data = tmp_path / "data"
    env = {"SECLEDGER_DATABASE_URL": database_url, "SECLEDGER_DATA_DIR": str(data)}
    first = CliRunner().invoke(main, ["demo", "--no-serve"], env=env, catch_exceptions=False)
    assert first.exit_code == 0, first.output
    password_file = data / "demo-password"
    password = password_file.read_text().strip()
    assert os.stat(password_file).st_mode & 0o777 == 0o600
    assert f"password in {password_file}" in first.output
    assert "Not serving (--no-serve)" in first.output
    # The serve it suggests has the secret the demo made (serve reads none by itself).
    secret_file = data / "webhook-secret"
    assert f"`SECLEDGER_WEBHOOK_SECRETS_FILE={secret_file} secledger serve`" in first.output
    assert os.stat(secret_file).st_mode & 0o777 == 0o600
    assert "http://127.0.0.1:8080/" not in first.output  # nothing listens there
    assert password not in first.output
    users = read_users_file(data / "users")
    assert verify_password(password, users["demo"])
    before = (data / "users").read_text()
    again = CliRunner().invoke(main, ["demo", "--no-serve"], env=env, catch_exceptions=False)
    assert again.exit_code == 0
    assert password_file.read_text().strip() == password
    assert (data / "users").read_text() == before  # idempotent: nothing rewritten
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    port = taken.getsockname()[1]
    busy = CliRunner().invoke(main, ["demo", "--port", str(port)], env=env)
    taken.close()
    assert busy.exit_code == 1
    assert f"port {port} on 127.0.0.1 is taken; try --port " in busy.output
    assert "Dashboard:" not in busy.output  # no address printed where nothing will listen
    settings = reader_settings(database_url, data)  # its users file now holds demo
    with TestClient(create_app(settings, db.Database(database_url, embedded=False))) as app:
        assert post_login(app, "demo", password).status_code == 303
        assert "security MRs" in app.get("/").text


def test_every_report_route_and_the_sla_setting_are_documented() -> None:
    docs = Path(__file__).resolve().parents[1] / "docs"
    dashboard, policy = (docs / "dashboard.md").read_text(), (docs / "policy.md").read_text()
    read_api = dashboard.split("## Read API")[1].split("## Metrics")[0]
    for kind in reports.REPORTS:
        assert kind in read_api, kind
        assert f"| `{kind}` |" in policy, kind
    assert "SECLEDGER_SLA_REFRESH_INTERVAL_SECONDS" in policy
    assert (
        "cron"
        not in policy.split("**SLA breaches of MRs still awaiting review.**")[1].split(
            "## Reports"
        )[0]
    )
