"""``secledger rebuild``: the derived tables are exactly what the log says."""

from __future__ import annotations

from typing import Any

import pytest
from alembic import command
from sqlalchemy import text

from builders import mr_event
from chainkit import cli, record_history, tamper
from conftest import post
from secledger import integrity
from secledger.policy import LabelPolicy
from secledger.rebuild import DECODERS
from secledger.store import derived, migrate
from secledger.tierpolicy import CompliancePolicy

LEDGER_ROW_1 = "security_review_ledger https://gitlab.example.com project 14 !1"


@pytest.fixture
def history(client) -> None:
    record_history(client)


def _ledger(engine, iid: int) -> dict:
    with engine.connect() as conn:
        return dict(
            conn.execute(
                text("SELECT * FROM security_review_ledger WHERE mr_iid = :iid"), {"iid": iid}
            )
            .mappings()
            .one()
        )


@pytest.mark.parametrize("check", [True, False])
def test_rebuild_migrates_an_older_schema_first(history, database_url, engine, check) -> None:
    """The upgrade notes say: upgrade, then rebuild. Run first on a schema from before
    0014, rebuild wrote into tables without this version's columns (a traceback), and
    --check compared against them."""
    config = migrate.alembic_config()
    with engine.connect() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, "0013")
        conn.commit()
    result = cli(database_url, "rebuild", *(["--check"] if check else []))
    assert result.exit_code == 0, result.output
    assert "the database was upgraded from revision 0013" in result.stderr
    with engine.connect() as conn:
        assert migrate.is_current(conn)


def test_live_ledger_equals_the_rebuild(history, database_url) -> None:
    result = cli(database_url, "rebuild", "--check")
    assert result.exit_code == 0, result.output
    assert "0 derived rows differ from the log" in result.output
    # What --check leaves out is said, not implied by a clean result.
    assert "SLA clocks and findings are not compared by --check" in result.output


def test_check_lists_an_edited_ledger_row_and_rebuild_fixes_it(history, database_url, engine):
    before = _ledger(engine, 1)
    assert before["decided_by"] == "carol"
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE security_review_ledger SET decided_by = 'mallory', approvers = '{}'"
                " WHERE mr_iid = 1"
            )
        )
    check = cli(database_url, "rebuild", "--check")
    assert check.exit_code == 1
    assert f"{LEDGER_ROW_1}: differs (" in check.output
    assert "decided_by: stored 'mallory', log says 'carol'" in check.output
    assert "approvers: stored [], log says ['bob']" in check.output
    assert "1 derived rows differ from the log" in check.output
    assert _ledger(engine, 1)["decided_by"] == "mallory"  # --check wrote nothing

    fixed = cli(database_url, "rebuild")
    assert fixed.exit_code == 0, fixed.output
    assert "1 derived rows were rewritten from the log" in fixed.output
    # No recording: no seq for watch or the sink to follow, so the operator is told.
    assert "downstream copies (watch, the HTTP sink) were not told" in fixed.output
    assert "not told" not in cli(database_url, "rebuild").output  # nothing rewritten
    after = _ledger(engine, 1)
    assert {k: v for k, v in after.items() if k != "updated_at"} == {
        k: v for k, v in before.items() if k != "updated_at"
    }
    assert cli(database_url, "rebuild", "--check").exit_code == 0


def test_check_compares_the_real_ledger_not_a_copy_in_the_logins_schema(
    history, database_url, engine
) -> None:
    """The database's owner edits a ledger row and leaves a pristine copy in a schema named
    after the login the check runs as, which its default search_path reads first."""
    with engine.begin() as conn:
        login = conn.execute(text("SELECT current_user")).scalar_one()
        conn.execute(text(f'CREATE SCHEMA "{login}"'))
        conn.execute(
            text(f'CREATE TABLE "{login}".security_review_ledger AS TABLE security_review_ledger')
        )
        conn.execute(
            text("UPDATE public.security_review_ledger SET decided_by = 'mallory' WHERE mr_iid = 1")
        )
    check = cli(database_url, "rebuild", "--check")
    assert check.exit_code == 1, check.output
    assert "decided_by: stored 'mallory', log says 'carol'" in check.output


def test_missing_and_extra_rows_are_listed_and_repaired(history, database_url, engine) -> None:
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM review_events WHERE seq = 3"))
        conn.execute(text("DELETE FROM security_review_ledger WHERE mr_iid = 2"))
        conn.execute(
            text(
                "INSERT INTO security_review_ledger (instance, project_id, mr_iid, risk_tier,"
                " security_labels, approvers, assigned_reviewers, last_event_at, last_seq,"
                " event_count) VALUES ('https://gitlab.example.com', 14, 99, 'high', '{}', '{}',"
                " '{}', now(), 1, 1)"
            )
        )
    check = cli(database_url, "rebuild", "--check")
    assert check.exit_code == 1
    assert "review_events seq=3: missing" in check.output
    assert (
        "security_review_ledger https://gitlab.example.com project 14 !2: missing" in check.output
    )
    assert "security_review_ledger https://gitlab.example.com project 14 !99: extra" in check.output
    assert cli(database_url, "rebuild").exit_code == 0
    assert cli(database_url, "rebuild", "--check").exit_code == 0
    assert _ledger(engine, 2)["decided_by"] == "erin"


def test_rows_missing_or_extra_at_either_end_are_each_listed_once(
    history, database_url, engine
) -> None:
    """The stored events are read in order beside the rebuild's, not held whole: one
    before the first or after the last of the other side must show once, and the
    ledger's rows keep Python's order of instances (byte order puts "B" before "a")."""
    extra = (
        "INSERT INTO security_review_ledger (instance, project_id, mr_iid, risk_tier,"
        " security_labels, approvers, assigned_reviewers, last_event_at, last_seq,"
        " event_count) VALUES (:instance, 14, 1, 'high', '{}', '{}', '{}', now(), 1, 1)"
    )
    instances = ["https://a.example", "https://B.example", "https://zz.example"]
    with engine.begin() as conn:
        last = conn.execute(text("SELECT max(seq) FROM review_events")).scalar_one()
        conn.execute(text("DELETE FROM review_events WHERE seq IN (1, :last)"), {"last": last})
        for instance in instances:
            conn.execute(text(extra), {"instance": instance})
    check = cli(database_url, "rebuild", "--check")
    assert check.exit_code == 1
    listed = [line for line in check.output.splitlines() if line.endswith((": missing", ": extra"))]
    assert listed == [
        "review_events seq=1: missing",
        f"review_events seq={last}: missing",
        *(f"security_review_ledger {i} project 14 !1: extra" for i in sorted(instances)),
    ], check.output
    assert "5 derived rows differ from the log" in check.output


def test_check_names_the_json_keys_of_events_that_differ(history, database_url, engine):
    """A fact a newer version derives (or an edit of one) is named: not two copies of
    the whole ``facts`` object for the reader to compare."""
    with engine.begin() as conn:
        facts = conn.execute(text("SELECT facts FROM review_events WHERE seq = 3")).scalar_one()
        conn.execute(
            text(
                "UPDATE review_events SET facts = facts - 'actor_id'"
                " || '{\"planted\": 1}'::jsonb WHERE seq = 3"
            )
        )
    check = cli(database_url, "rebuild", "--check")
    assert check.exit_code == 1
    line = next(x for x in check.output.splitlines() if x.startswith("review_events seq=3"))
    assert line == (
        "review_events seq=3: differs (facts.actor_id: stored nothing, log says"
        f" {facts['actor_id']!r}; facts.planted: stored 1, log says nothing)"
    )


def test_a_log_source_without_a_decoder_is_named(history, database_url, engine) -> None:
    with engine.begin() as conn:
        conn.execute(text("SET LOCAL session_replication_role = replica"))
        conn.execute(text("UPDATE delivery_log SET source = 'carrier-pigeon' WHERE seq = 4"))
    result = cli(database_url, "rebuild", "--check")
    assert result.exit_code == 1
    assert "seq=4 has source 'carrier-pigeon', which has no decoder" in result.output
    assert "carrier-pigeon" not in DECODERS


def test_rebuild_counts_a_clock_that_differs_only_in_ended_before_label(
    history, database_url, engine
) -> None:
    with engine.connect() as conn:
        clocks = conn.execute(text("SELECT count(*) FROM review_sla")).scalar_one()
    assert clocks
    tamper(engine, "UPDATE review_sla SET ended_before_label = 'closed'")
    fixed = cli(database_url, "rebuild")
    assert fixed.exit_code == 0, fixed.output
    assert f"{clocks} SLA clocks and findings came out different" in fixed.output
    with engine.connect() as conn:
        left = conn.execute(text("SELECT count(ended_before_label) FROM review_sla")).scalar_one()
    assert left == 0


def test_rebuild_also_restores_sla_clocks_and_findings(
    history, client, database_url, engine
) -> None:
    """They are derived from the ledger rows: an edited SLA clock or a removed finding
    comes back from the log, like the rows themselves."""
    for body in (
        mr_event("open", iid=3, updated_at="2025-08-06 08:00:00 UTC"),
        mr_event("approved", iid=3, actor="alice", updated_at="2025-08-06 09:00:00 UTC"),
    ):
        assert post(client, body).json()["status"] == "recorded"
    with engine.connect() as conn:
        clocks = conn.execute(text("SELECT * FROM review_sla ORDER BY mr_iid")).mappings().all()
        found = set(conn.execute(text("SELECT mr_iid, rule FROM findings")).all())
    assert clocks
    assert found
    tamper(
        engine,
        "DELETE FROM findings",
        "UPDATE review_sla SET first_decision_at = NULL, first_decision_by = NULL",
    )
    fixed = cli(database_url, "rebuild")
    assert fixed.exit_code == 0, fixed.output
    with engine.connect() as conn:
        again = conn.execute(text("SELECT * FROM review_sla ORDER BY mr_iid")).mappings().all()
        restored = set(conn.execute(text("SELECT mr_iid, rule FROM findings")).all())
    # Each edited clock, and each finding (all were deleted), came back different.
    edited = sum(1 for clock in clocks if clock["first_decision_at"] is not None)
    assert edited
    rederived = f"{edited + len(restored)} SLA clocks and findings came out different"
    assert rederived in fixed.output
    # Named, MR by MR: findings that open or resolve change past reports and packs.
    touched = {
        iid
        for clock in clocks
        if clock["first_decision_at"] is not None
        for iid in (clock["mr_iid"],)
    } | {iid for iid, _ in restored}
    named = {
        int(line.rsplit("!", 1)[1])
        for line in fixed.output.splitlines()
        if line.startswith("SLA clock or findings changed: ")
    }
    assert named == touched
    # Re-run as of now, an open MR's clock has also run out since it was recorded.
    assert found < restored
    assert {rule for _, rule in restored - found} == {"sla-breached"}
    columns = ("mr_iid", "deadline", "first_decision_at", "first_decision_by")
    assert [tuple(r[c] for c in columns) for r in again] == [
        tuple(r[c] for c in columns) for r in clocks
    ]


def test_check_under_live_traffic_compares_one_snapshot(
    history, client, database_url, engine, monkeypatch
) -> None:
    """A delivery recorded after the log was read and before the tables were compared is
    in neither side of the comparison, not an unexplained row."""
    real = derived.differences

    def meanwhile(conn: Any, rebuilt: Any) -> Any:
        body = mr_event("open", iid=9, updated_at="2025-08-06 08:00:00 UTC")
        assert post(client, body).json()["status"] == "recorded"
        return real(conn, rebuilt)

    monkeypatch.setattr(derived, "differences", meanwhile)
    found = integrity.rebuild_ledger(
        engine, LabelPolicy(), write=False, compliance=CompliancePolicy()
    )
    assert [d.describe() for d in found.differences] == []


class _Counted:
    """A tracker that keeps each task's total and how far it was advanced."""

    def __init__(self) -> None:
        self.tasks: dict[str, list[int | None]] = {}

    def task(self, description: str, total: int | None):
        self.tasks[description] = [total, 0]

        def advance(count: int) -> None:
            self.tasks[description][1] += count  # type: ignore[operator]

        return advance


def test_rebuild_shows_its_progress(history, engine) -> None:
    """50,000 rows took 42 s with nothing on the screen."""
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT count(*) FROM delivery_log")).scalar_one()
        mrs = conn.execute(text("SELECT count(*) FROM security_review_ledger")).scalar_one()
    counted = _Counted()
    integrity.rebuild_ledger(
        engine, LabelPolicy(), write=True, compliance=CompliancePolicy(), tracker=counted
    )
    assert counted.tasks == {
        "reading the log": [rows, rows],
        "re-run SLA and findings": [mrs, mrs],
    }
