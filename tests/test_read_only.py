"""Reads never write: every report, listing and page answers as ``secledger_readonly``.

An open MR past its SLA deadline is a breach from that instant on; reports, the read
API and the dashboard compute it as of the request instead of recording it first.
serve's periodic check and `secledger findings --refresh-only` are the only writers.
The demo history holds such an MR: !16, relabelled critical on 2026-11-20 10:00 and
never reviewed, with no `sla-breached` recorded (its last event was before its deadline).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from click.testing import Result
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text
from sqlalchemy.exc import InternalError

from chainkit import cli, readonly_url
from dashboard_fixtures import bearer, log_in, reader_client, reader_settings
from secledger import reports
from secledger.store import db
from secledger.web import create_app

MR16 = f"{quote('https://gitlab.example.com', safe='')}/14/16"
READS = (
    *(f"/api/reports/{kind}" for kind in reports.REPORTS),
    "/api/reports/findings?since=2026-11-01",
    "/api/findings?all=true",
    "/api/findings?rule=sla-breached",
    "/api/reports/summary",
    "/api/reports/volume",
    "/api/ledger",
    f"/api/ledger/{MR16}",
)
COMMANDS = (
    *(("report", kind) for kind in reports.REPORTS),
    ("report", "findings", "--since", "2026-11-01"),
    ("findings", "--all"),
    ("findings", "--rule", "sla-breached"),
)
MINUTE = timedelta(minutes=1)
# What a GET must leave as it found it: every stored finding (a reopened breach changes
# no count, so whole rows), the SLA clocks, and the log.
SNAPSHOT = {
    "findings": "SELECT to_jsonb(f) FROM findings f ORDER BY id",
    "review_sla": "SELECT to_jsonb(s) FROM review_sla s ORDER BY instance, project_id, mr_iid",
    "delivery_log": "SELECT count(*) FROM delivery_log",
}


@pytest.fixture
def owner(database_url: str, tmp_path: Path) -> Iterator[TestClient]:
    """The receiver as deployed (a login that may write), holding the demo history."""
    yield from reader_client(database_url, tmp_path)


@pytest.fixture
def auditor(owner: TestClient, database_url: str, tmp_path: Path) -> Iterator[TestClient]:
    """A second receiver over the same database, logged in as ``secledger_readonly``."""
    url = readonly_url(database_url)
    # No periodic check: it writes, and could not here.
    settings = reader_settings(url, tmp_path / "auditor", sla_refresh_interval_seconds=0)
    with TestClient(create_app(settings, db.Database(url, embedded=False))) as client:
        yield client


def snapshot(engine: Engine) -> dict[str, list[Any]]:
    with engine.connect() as conn:
        return {name: list(conn.execute(text(sql)).scalars()) for name, sql in SNAPSHOT.items()}


def stored_breaches(engine: Engine) -> set[int]:
    with engine.connect() as conn:
        query = text("SELECT mr_iid FROM findings WHERE rule = 'sla-breached'")
        return set(conn.execute(query).scalars())


class Near:
    """Hours that equal others within 0.05 h (three minutes)."""

    __hash__ = None  # type: ignore[assignment]

    def __init__(self, hours: float) -> None:
        self.hours = hours

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Near) and abs(self.hours - other.hours) < 0.05

    def __repr__(self) -> str:
        return f"Near({self.hours})"


def comparable(answer: Any, asked_at: datetime) -> Any:
    """The answer without what depends on the call's own "now": hours left on a clock, and
    the detection time of a breach not recorded yet (the call's now, checked here)."""
    items = answer.get("findings", []) if isinstance(answer, dict) else answer
    for item in items if isinstance(items, list) else []:
        if item.get("hours_left") is not None:
            # Near, not rounded: two calls a second apart fell on either side of a half
            # hour now and then.
            item["hours_left"] = Near(item["hours_left"])
        if "id" in item and item["id"] is None:
            detected = datetime.fromisoformat(item.pop("detected_at"))
            assert abs(detected - asked_at) < MINUTE
    return answer


def get(client: TestClient, path: str) -> Any:
    answer = client.get(path, headers=bearer())
    assert answer.status_code == 200, (path, answer.text)
    return comparable(answer.json(), datetime.now(UTC))


def run(url: str, *args: str) -> Any:
    result: Result = cli(url, *args, "--format", "json")
    assert result.exit_code == 0, (args, result.output)
    return comparable(json.loads(result.stdout), datetime.now(UTC))


def test_every_read_answers_a_readonly_login_as_it_answers_the_app_and_writes_nothing(
    owner, auditor, engine, database_url
) -> None:
    """Read API and CLI, as secledger_readonly and as the writing login: same answers, with
    !16's breach counted before anything recorded it, and not one row changed."""
    before = snapshot(engine)
    assert 16 not in stored_breaches(engine)
    for path in READS:
        assert get(auditor, path) == get(owner, path), path
    auditor_url = readonly_url(database_url)
    for command in COMMANDS:
        expected = run(database_url, *command)
        assert run(auditor_url, *command) == expected, command
    breaches = get(auditor, "/api/findings?rule=sla-breached")
    assert {(f["mr_iid"], f["id"], f["severity"]) for f in breaches} >= {(16, None, "high")}
    counted = {(r["rule"], r["severity"]): r for r in get(auditor, "/api/reports/findings")}
    assert counted["sla-breached", "high"]["open"] >= 1
    assert snapshot(engine) == before
    assert 16 not in stored_breaches(engine)


def test_dashboard_pages_show_an_unrecorded_breach_and_write_nothing(owner, engine) -> None:
    before = snapshot(engine)
    log_in(owner)
    panel = owner.get("/").text.split('id="finding-list"')[1].split("</table>")[0]
    assert any("!16<" in row and "sla-breached" in row for row in panel.split("<tr"))
    assert "sla-breached" in owner.get(f"/mr/{MR16}").text
    assert snapshot(engine) == before


def test_recording_the_breach_later_changes_no_answer_but_the_id(
    owner, engine, database_url
) -> None:
    """What `secledger findings --refresh-only` (or serve's check) records is what the
    reads showed: the same rows and figures; the breach now has an id."""
    shown = get(owner, "/api/findings?all=true")
    assert [f.pop("id") for f in shown if f["mr_iid"] == 16] == [None]
    counts = get(owner, "/api/reports/findings")
    result = cli(database_url, "findings", "--refresh-only")
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert 16 in stored_breaches(engine)
    assert get(owner, "/api/reports/findings") == counts
    recorded = get(owner, "/api/findings?all=true")
    new = [f for f in recorded if f["mr_iid"] == 16 and f["rule"] == "sla-breached"]
    assert len(new) == 1 and isinstance(new[0].pop("id"), int)
    assert abs(datetime.fromisoformat(new[0].pop("detected_at")) - datetime.now(UTC)) < MINUTE
    assert recorded == shown


def test_reads_run_in_read_only_transactions(database_url) -> None:
    """PostgreSQL itself refuses a write on the connections reads use, whatever the login."""
    single = db.create(database_url, pool_size=1)
    write = text("UPDATE findings SET resolved_at = now()")
    try:
        with db.reading(single) as conn, pytest.raises(InternalError, match="read-only"):
            conn.execute(write)
        with single.begin() as conn:  # the same pooled connection, writable again
            conn.execute(write)
    finally:
        single.dispose()
