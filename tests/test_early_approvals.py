"""Approvals given before an MR's security label, read from the fake GitLab API."""

from __future__ import annotations

from typing import Any

from alembic import command
from click.testing import CliRunner
from pydantic import SecretStr
from sqlalchemy import Engine, text
from structlog.testing import capture_logs

from apihelpers import POLICY, ledger_rows, log_count, replay
from apistory import Story
from builders import label_change, mr_event
from fakegitlab import TOKEN
from secledger import earlyapprovals
from secledger.cli import main
from secledger.findings import list_findings
from secledger.gitlab_api import GitLabAPI
from secledger.store import migrate
from secledger.tierpolicy import CompliancePolicy
from secledger.times import utcnow

pytest_plugins = ("gitlabfixtures",)
CREATED = "2025-08-05 20:00:00 UTC"
LABELLED = "2025-08-05 21:30:00 UTC"
MERGED = "2025-08-05 21:48:25 UTC"


def history(approved: str, *, labels_when_approved: list[str]) -> list[dict[str, Any]]:
    """Opened unlabelled, approved by bob at ``approved``, labelled sec::high, merged."""
    common: dict[str, Any] = {"iid": 1, "project_id": 14, "created_at": CREATED}
    approval = mr_event(
        "approved", actor="bob", updated_at=approved, labels=labels_when_approved, **common
    )
    return [
        mr_event("open", actor="alice", updated_at=CREATED, labels=[], **common),
        *([approval] if approved < LABELLED else []),
        mr_event(
            "update",
            actor="erin",
            updated_at=LABELLED,
            labels=["sec::high"],
            changes=label_change([], ["sec::high"], LABELLED),
            **common,
        ),
        *([approval] if approved > LABELLED else []),
        mr_event("merge", actor="carol", updated_at=MERGED, labels=["sec::high"], **common),
    ]


def open_rules(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        return {f.rule for f in list_findings(conn, CompliancePolicy(), utcnow())}


def test_an_approval_given_before_the_label_is_recorded_from_the_api(engine, api, fake) -> None:
    """bob approved while the MR had no security label: that webhook was ignored, and the
    merge looked unapproved. GitLab counts bob's approval at the merge; so does the
    ledger once the API was asked."""
    Story(iid=1, opened_with_label=False, approvals=[("bob", "2025-08-05 21:00:00 UTC")]).publish(
        fake
    )
    statuses = replay(engine, fake.url, history("2025-08-05 21:00:00 UTC", labels_when_approved=[]))
    assert statuses == ["ignored", "ignored", "recorded", "recorded"]
    [before] = ledger_rows(engine)
    assert (before["labeled_at_source"], before["approvers"]) == ("label_added", [])
    assert "insufficient-approvals" in open_rules(engine)

    assert earlyapprovals.check(engine, api, POLICY) == {"recorded": 1}
    [after] = ledger_rows(engine)
    assert after["approvers"] == ["bob"]
    assert after["labeled_at"] == before["labeled_at"]  # the label still starts the clock
    assert open_rules(engine) == set()
    with engine.connect() as conn:
        outcome = conn.execute(text("SELECT outcome FROM approval_checks")).scalar_one()
    assert outcome == "recorded"
    count = log_count(engine)
    assert earlyapprovals.check(engine, api, POLICY) == {}  # asked once
    assert earlyapprovals.check(engine, api, POLICY, recheck=True) == {"known": 1}
    assert log_count(engine) == count


def test_a_missing_approvals_endpoint_is_a_failed_lookup_not_a_deleted_mr(
    engine, api, fake
) -> None:
    """The MR answers, its approvals do not (a proxy, an edition without them): counted
    "gone", it read as deleted or hidden and no run failed."""
    Story(iid=1, opened_with_label=False, approvals=[("bob", "2025-08-05 21:00:00 UTC")]).publish(
        fake
    )
    replay(engine, fake.url, history("2025-08-05 21:00:00 UTC", labels_when_approved=[]))
    fake.missing.add("/merge_requests/1/approvals")
    assert earlyapprovals.check(engine, api, POLICY) == {"api_error": 1}
    fake.missing.clear()
    fake.missing.add("/merge_requests/1")
    assert earlyapprovals.check(engine, api, POLICY, recheck=True) == {"gone": 1}


def test_an_approval_after_the_label_came_by_webhook_and_is_not_recorded_again(
    engine, api, fake
) -> None:
    Story(iid=1, opened_with_label=False, approvals=[("bob", "2025-08-05 21:40:00 UTC")]).publish(
        fake
    )
    replay(engine, fake.url, history("2025-08-05 21:40:00 UTC", labels_when_approved=["sec::high"]))
    count = log_count(engine)
    assert earlyapprovals.check(engine, api, POLICY) == {"none_before_label": 1}
    assert log_count(engine) == count
    assert ledger_rows(engine)[0]["approvers"] == ["bob"]


def test_an_mr_opened_with_its_label_is_not_asked(engine, api, fake) -> None:
    story = Story(iid=1)
    story.publish(fake)
    replay(engine, fake.url, story.webhooks())
    assert earlyapprovals.check(engine, api, POLICY) == {}


def test_an_undated_approval_is_not_taken_for_one_before_the_label(engine, api, fake) -> None:
    """Before GitLab had ``approved_at``, the API cannot say when bob approved."""
    story = Story(iid=1, opened_with_label=False, approvals=[("bob", "2025-08-05 21:00:00 UTC")])
    story.approved_at_in_api = False
    story.publish(fake)
    replay(engine, fake.url, history("2025-08-05 21:00:00 UTC", labels_when_approved=[]))
    assert earlyapprovals.check(engine, api, POLICY) == {"none_before_label": 1}
    assert ledger_rows(engine)[0]["approvers"] == []


def test_enrich_command_records_them_and_says_so(database_url, engine, fake) -> None:
    Story(iid=1, opened_with_label=False, approvals=[("bob", "2025-08-05 21:00:00 UTC")]).publish(
        fake
    )
    replay(engine, fake.url, history("2025-08-05 21:00:00 UTC", labels_when_approved=[]))
    environment = {
        "SECLEDGER_DATABASE_URL": database_url,
        "SECLEDGER_GITLAB_URL": fake.url,
        "SECLEDGER_GITLAB_TOKEN": TOKEN,
        "SECLEDGER_LOG_LEVEL": "warning",
    }
    result = CliRunner().invoke(main, ["enrich"], env=environment, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "label times: 0 merge requests looked up: nothing to do" in result.output
    assert "approvals before the label: 1 merge requests looked up: recorded 1" in result.output
    assert ledger_rows(engine)[0]["approvers"] == ["bob"]


def test_migration_0019_downgrades_and_back(engine) -> None:
    config = migrate.alembic_config()
    with engine.connect() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, "0018")
        assert conn.execute(text("SELECT to_regclass('approval_checks')")).scalar() is None
        command.upgrade(config, "head")
        conn.commit()
    with engine.connect() as conn:
        assert migrate.is_current(conn)
        assert conn.execute(text("SELECT count(*) FROM approval_checks")).scalar() == 0


def test_an_approval_in_the_second_the_label_was_added_may_have_come_first(
    engine, api, fake
) -> None:
    """The label webhook says 21:30:00; GitLab dates bob's approval 21:30:00.450. Its
    webhook, sent before the label, was ignored: only the API can tell it."""
    Story(iid=1, opened_with_label=False, approvals=[("bob", LABELLED)]).publish(fake)
    bodies = history("2025-08-05 21:00:00 UTC", labels_when_approved=[])
    bodies[1]["object_attributes"]["updated_at"] = LABELLED  # approved in the label's second
    assert replay(engine, fake.url, bodies) == ["ignored", "ignored", "recorded", "recorded"]
    assert earlyapprovals.check(engine, api, POLICY) == {"recorded": 1}
    assert ledger_rows(engine)[0]["approvers"] == ["bob"]


def test_an_mr_that_fails_otherwise_is_noted_and_does_not_stop_the_rest(
    engine, api, fake, monkeypatch
) -> None:
    for iid in (1, 2):
        story = Story(iid=iid, opened_with_label=False, approvals=[("bob", CREATED)])
        story.publish(fake)
        replay(engine, fake.url, history_of(iid))
    real = earlyapprovals.apifacts.approval_envelopes

    def broken(mr: dict[str, Any], approvals: dict[str, Any]) -> list[dict[str, Any]]:
        if mr["iid"] == 1:
            raise KeyError("user")
        return real(mr, approvals)

    monkeypatch.setattr(earlyapprovals.apifacts, "approval_envelopes", broken)
    assert earlyapprovals.check(engine, api, POLICY) == {"failed": 1, "recorded": 1}
    assert earlyapprovals.check(engine, api, POLICY) == {}  # not asked again on its own
    assert [r["approvers"] for r in ledger_rows(engine)] == [[], ["bob"]]


def history_of(iid: int) -> list[dict[str, Any]]:
    bodies = history("2025-08-05 21:00:00 UTC", labels_when_approved=[])
    for body in bodies:
        body["object_attributes"]["iid"] = iid
        body["object_attributes"]["id"] = 1000 + iid
    return bodies


def test_a_refused_token_ends_the_pass_at_the_first_mr(engine, api_settings, fake) -> None:
    """Every other MR would meet the same 401, each after the client's retries."""
    for iid in (1, 2, 3):
        Story(iid=iid, opened_with_label=False).publish(fake)
        replay(engine, fake.url, history_of(iid))
    refused = GitLabAPI.from_settings(
        api_settings.model_copy(update={"gitlab_token": SecretStr("glpat-wrong")})
    )
    asked = len(fake.seen)
    with capture_logs() as logs:
        assert earlyapprovals.check(engine, refused, POLICY) == {"api_error": 1}
    assert len(fake.seen) - asked == 1
    assert "early_approvals_stopped" in [line["event"] for line in logs]
