"""Backfill from a fake GitLab API over real HTTP, into real PostgreSQL."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from types import SimpleNamespace

import pytest
from alembic import command
from pydantic import SecretStr
from sqlalchemy import text

from apihelpers import POLICY, ledger_rows, log_count, replay
from apistory import Story
from fakegitlab import Seen
from secledger.backfill import Backfill, Period, fetch_history
from secledger.errors import GitLabAPIError
from secledger.gitlab_api import GitLabAPI, Scope
from secledger.store import migrate

pytest_plugins = ("gitlabfixtures",)
SINCE = datetime(2025, 8, 1, tzinfo=UTC)


def without_seq(rows):
    return [{k: v for k, v in row.items() if k != "last_seq"} for row in rows]


def run_backfill(engine, api_client: GitLabAPI, scope: Scope | None = None):
    scopes = [scope or Scope("projects", "acme/payments")]
    return Backfill(engine, api_client, POLICY, scopes, Period(SINCE), workers=2).run()


def test_backfill_records_an_mr_history_from_the_api(engine, api, fake) -> None:
    """Label, approval and merge come from the API and fold into one ledger row."""
    Story(iid=1).publish(fake)
    result = run_backfill(engine, api)
    assert (result.found, result.recorded_mrs, result.recorded_facts) == (1, 1, 3)
    [row] = ledger_rows(engine)
    assert row["instance"] == fake.url
    assert (row["project_path"], row["mr_iid"], row["risk_tier"]) == ("acme/payments", 1, "high")
    assert (row["decision"], row["decided_by"], row["state"]) == ("merged", "carol", "merged")
    assert row["approvers"] == ["bob"]
    assert row["merged_at"] == datetime(2025, 8, 5, 21, 48, 25, 394000, tzinfo=UTC)
    assert (row["labeled_at_source"], row["labeled_by"]) == ("api", "alice")
    assert row["labeled_at"] == datetime(2025, 8, 5, 20, 0, 0, 120000, tzinfo=UTC)
    assert row["security_labels"] == ["sec::high"]
    with engine.connect() as conn:
        sources = conn.execute(text("SELECT DISTINCT source FROM delivery_log")).scalars().all()
    assert sources == ["api"]


def test_backfill_leaves_no_finding_that_never_held(engine, other_engine, api, fake) -> None:
    """The API's facts come grouped by kind: judged after each, the merge (before its
    approval) raised insufficient-approvals, resolved an instant later, and every
    API-only merged MR added one to the findings report's resolved column."""
    story = Story(iid=1)
    story.publish(fake)
    run_backfill(engine, api)
    replay(other_engine, fake.url, story.webhooks())
    listed = "SELECT rule, severity, resolved_at IS NULL FROM findings ORDER BY rule"
    with engine.connect() as conn, other_engine.connect() as other:
        assert conn.execute(text(listed)).all() == other.execute(text(listed)).all() == []
        # The API tells times to the millisecond, webhooks to the second.
        clocks = "SELECT date_trunc('second', first_decision_at) FROM review_sla"
        assert conn.execute(text(clocks)).all() == other.execute(text(clocks)).all()


def test_backfill_twice_changes_nothing(engine, api, fake) -> None:
    Story(iid=1).publish(fake)
    Story(iid=2, decision=("close", "dave", "2025-08-06 10:00:00 UTC")).publish(fake)
    run_backfill(engine, api)
    rows, count = ledger_rows(engine), log_count(engine)
    with engine.connect() as conn:
        stamps = conn.execute(text("SELECT updated_at FROM security_review_ledger")).all()
    second = run_backfill(engine, api)
    assert second.recorded_facts == 0
    assert log_count(engine) == count
    assert ledger_rows(engine) == rows
    with engine.connect() as conn:
        assert conn.execute(text("SELECT updated_at FROM security_review_ledger")).all() == stamps


def test_backfill_then_webhooks_equals_webhooks_then_backfill(
    engine, other_engine, api, fake
) -> None:
    """Either order gives the same full ledger rows, and the webhooks-only decision."""
    stories = [
        Story(iid=1),
        Story(iid=2, decision=("close", "dave", "2025-08-06 10:00:00 UTC"), approvals=[]),
        Story(iid=3, relabel=("sec::critical", "erin", "2025-08-05 20:30:00 UTC")),
    ]
    for story in stories:
        story.publish(fake)
    bodies = [body for story in stories for body in story.webhooks()]

    run_backfill(engine, api)
    assert set(replay(engine, fake.url, bodies)) == {"recorded"}

    assert set(replay(other_engine, fake.url, bodies)) == {"recorded"}
    webhooks_only = ledger_rows(other_engine)
    run_backfill(other_engine, api)

    # last_seq is a log position: with several MRs interleaved it depends on arrival
    # order by design. Every other column is identical.
    assert without_seq(ledger_rows(engine)) == without_seq(ledger_rows(other_engine))
    assert log_count(engine) == log_count(other_engine)
    # The API told nothing the webhooks had not: only the log position moved.
    for merged, alone in zip(ledger_rows(engine), webhooks_only, strict=True):
        assert {k: v for k, v in merged.items() if k != "last_seq"} == {
            k: v for k, v in alone.items() if k != "last_seq"
        }
    critical = ledger_rows(engine)[2]
    assert (critical["risk_tier"], critical["security_labels"]) == ("critical", ["sec::critical"])


def test_one_mr_either_order_gives_identical_full_rows(engine, other_engine, api, fake) -> None:
    story = Story(iid=1)
    story.publish(fake)
    run_backfill(engine, api)
    replay(engine, fake.url, story.webhooks())
    replay(other_engine, fake.url, story.webhooks())
    run_backfill(other_engine, api)
    assert ledger_rows(engine) == ledger_rows(other_engine)
    assert ledger_rows(engine)[0]["event_count"] == 3  # open, approved, merge: each once


def test_api_only_row_agrees_with_webhook_only_row(engine, other_engine, api, fake) -> None:
    """The decision columns agree, to the second the webhook can tell."""
    story = Story(iid=4, relabel=("sec::critical", "erin", "2025-08-05 20:30:00 UTC"))
    story.publish(fake)
    run_backfill(engine, api)
    replay(other_engine, fake.url, story.webhooks())
    [from_api], [from_hooks] = ledger_rows(engine), ledger_rows(other_engine)
    same = (
        "decision",
        "decided_by",
        "state",
        "approvers",
        "merged_by",
        "risk_tier",
        "security_labels",
    )
    assert {k: from_api[k] for k in same} == {k: from_hooks[k] for k in same}
    for column in ("decided_at", "merged_at", "labeled_at"):
        assert from_api[column].replace(microsecond=0) == from_hooks[column]
    # Webhooks: open, relabel, approved, merge. API: add, remove + add (the relabel),
    # approval, merged; there is no "open" in the API.
    assert (from_hooks["event_count"], from_api["event_count"]) == (4, 5)


def test_group_backfill_lists_labels_first_and_paginates(engine, api, fake) -> None:
    for iid in range(1, 6):
        Story(iid=iid).publish(fake)
    result = run_backfill(engine, api, Scope("groups", "acme"))
    assert result.recorded_mrs == 5
    assert len(ledger_rows(engine)) == 5
    listings = [s for s in fake.seen if s.path.endswith("/groups/acme/merge_requests")]
    # One query per security label (no wildcard), never for "frontend"; pages of two.
    assert {s.query["labels"] for s in listings} == {"sec::high", "sec::low"}
    assert {s.query.get("page") for s in listings if s.query["labels"] == "sec::high"} == {
        None,
        "2",
        "3",
    }
    # Any state updated in the period, and the open ones whenever updated (approvals do
    # not move updated_at).
    assert all(s.query["state"] == "all" for s in listings if "updated_after" in s.query)
    assert {s.query["state"] for s in listings if "updated_after" not in s.query} == {"opened"}
    first_label_listing = min(i for i, s in enumerate(fake.seen) if s.path.endswith("/labels"))
    first_mr_listing = min(i for i, s in enumerate(fake.seen) if s.path.endswith("/merge_requests"))
    assert first_label_listing < first_mr_listing


def test_a_group_backfill_finds_labels_of_its_subgroups_and_projects(engine, api, fake) -> None:
    """GitLab lists a group's labels without its subgroups' or any project's unless asked
    (only_group_labels and include_descendant_groups default to the narrow side): a
    security label defined there was never queried, and its MRs were never found."""
    fake.add_project(15, "acme/platform/api", group="acme/platform")
    api_project = {"project_id": 15, "path": "acme/platform/api"}
    for story in (
        Story(iid=1, label="sec::medium"),  # to become a label of acme itself
        Story(iid=2),  # sec::high, a project label of acme/payments
        Story(iid=3, label="sec::critical", **api_project),  # to become acme/platform's
        Story(iid=4, label="sec/pci", **api_project),  # a project label in a subgroup
    ):
        story.publish(fake)  # publishing defines each label in the MR's project
    for group, label, project in (
        ("acme", "sec::medium", 14),
        ("acme/platform", "sec::critical", 15),
    ):
        fake.add_group(group, (label,))
        fake.projects[project].labels.remove(label)

    result = run_backfill(engine, api, Scope("groups", "acme"))
    assert result.recorded_mrs == 4
    assert {(row["project_id"], row["mr_iid"]) for row in ledger_rows(engine)} == {
        (14, 1),
        (14, 2),
        (15, 3),
        (15, 4),
    }
    listings = [s for s in fake.seen if s.path.endswith("/groups/acme/merge_requests")]
    assert {s.query["labels"] for s in listings} == {
        "sec::critical",
        "sec::high",
        "sec::low",
        "sec::medium",
        "sec/pci",
    }


def test_until_keeps_an_mr_updated_again_after_the_period(engine, api, fake) -> None:
    """An MR merged in the period and touched again after it (a comment) has an
    ``updated_at`` past ``--until``: listed with ``updated_before`` it was never found,
    and its facts in the period were lost. An MR created after the period is not read."""
    Story(iid=1).publish(fake)  # merged 2025-08-05
    fake.projects[14].mrs[1]["updated_at"] = "2025-09-15T10:00:00.000Z"
    Story(iid=2, created="2025-09-10 08:00:00 UTC", approvals=[], decision=None).publish(fake)
    until = datetime(2025, 9, 1, tzinfo=UTC)

    job = Backfill(engine, api, POLICY, [Scope("groups", "acme")], Period(SINCE, until))
    result = job.run()
    assert (result.found, result.recorded_facts) == (1, 3)
    [row] = ledger_rows(engine)
    assert (row["mr_iid"], row["decision"], row["merged_by"]) == (1, "merged", "carol")
    listings = [s for s in fake.seen if s.path.endswith("/merge_requests")]
    assert {s.query.get("created_before") for s in listings} == {"2025-09-01T00:00:00Z"}
    assert all("updated_before" not in s.query for s in listings)


def test_an_open_mr_only_approved_in_the_period_is_found(engine, api, fake) -> None:
    """An approval does not move an MR's updated_at: listed by ``updated_after`` alone, an
    open MR labelled before the period and approved in it was never read, and a lost
    approval webhook never recovered, though the docs promise every MR active in the
    period. Open MRs are listed whenever they were last updated."""
    Story(
        iid=3,
        created="2025-07-20 08:00:00 UTC",
        approvals=[("bob", "2025-08-03 09:00:00 UTC")],
        decision=None,
    ).publish(fake)
    assert fake.projects[14].mrs[3]["updated_at"] < "2025-08-01"
    result = run_backfill(engine, api)
    assert result.found == 1
    [row] = ledger_rows(engine)
    assert (row["mr_iid"], row["approvers"]) == (3, ["bob"])


def test_backfill_waits_out_a_429_and_retries(engine, api, fake) -> None:
    """GitLab's rate limit answers 429 with Retry-After; the client waits and goes on."""
    Story(iid=1).publish(fake)
    fake.throttle["resource_state_events"] = 1
    result = run_backfill(engine, api)
    assert result.recorded_facts == 3
    calls = [s for s in fake.seen if s.path.endswith("resource_state_events")]
    assert [c.status for c in calls] == [429, 200]
    assert calls[1].at - calls[0].at >= 0.9  # it waited Retry-After (1 s), not less


@pytest.mark.parametrize(
    ("retry_after", "least_wait"),
    [
        (lambda: format_datetime(datetime.now(UTC) + timedelta(seconds=2), usegmt=True), 0.9),
        (lambda: "in a while", 0.0),  # neither form: python-gitlab's own back-off
    ],
    ids=["http-date", "unreadable"],
)
def test_a_retry_after_date_is_waited_out_too(engine, api, fake, retry_after, least_wait) -> None:
    """Retry-After may be an HTTP-date (RFC 9110; proxies in front of GitLab send it):
    python-gitlab reads only seconds and raised ValueError, a traceback out of the run.
    The date is waited out; a value that is neither is retried after a back-off."""
    Story(iid=1).publish(fake)
    # The date is made when the 429 is sent: made before the run, it came too close to
    # be waited for once planning took a second.
    fake.throttle["resource_state_events"] = retry_after
    result = run_backfill(engine, api)
    assert result.recorded_facts == 3
    calls = [s for s in fake.seen if s.path.endswith("resource_state_events")]
    assert [c.status for c in calls] == [429, 200]
    assert calls[1].at - calls[0].at >= least_wait


def interrupt_after_first(engine, api) -> dict:
    """Plan a run over project 14, record its first MR, and stop there (a crash)."""
    job = Backfill(engine, api, POLICY, [Scope("projects", "14")], Period(SINCE), workers=1)
    todo, _ = job.plan()
    job.record_one(todo[0], fetch_history(api, todo[0], POLICY))
    return todo[0]


def test_interrupted_backfill_resumes_without_reading_done_mrs_again(engine, api, fake) -> None:
    for iid in (1, 2, 3):
        Story(iid=iid).publish(fake)
    done = interrupt_after_first(engine, api)
    # The process dies here; a new run with the same scope and period resumes.
    fake.seen.clear()
    result = Backfill(
        engine, api, POLICY, [Scope("projects", "14")], Period(SINCE), workers=1
    ).run()
    assert (result.found, result.skipped, result.recorded_mrs) == (3, 1, 2)
    assert fake.count(f"/merge_requests/{done['iid']}/") == 0
    assert len(ledger_rows(engine)) == 3


def test_an_mr_deleted_after_the_listing_is_passed_over_not_fatal(engine, api, fake) -> None:
    for iid in (1, 2, 3):
        Story(iid=iid).publish(fake)

    def delete_after_listing(seen: Seen) -> None:
        if seen.path.endswith("/merge_requests") and 2 in fake.projects[14].mrs:
            del fake.projects[14].mrs[2]  # gone before its history is read

    fake.after = delete_after_listing
    job = Backfill(engine, api, POLICY, [Scope("projects", "14")], Period(SINCE), workers=1)
    result = job.run()
    assert (result.found, result.recorded_mrs, result.gone) == (3, 2, 1)
    assert sorted(row["mr_iid"] for row in ledger_rows(engine)) == [1, 3]


def test_a_404_from_a_history_endpoint_of_an_existing_mr_ends_the_run(engine, api, fake) -> None:
    """A 404 from a sub-resource does not prove the MR deleted: GitLab before 13.2 has
    no resource_state_events, a proxy may answer 404. Taken as deleted, every MR was
    passed over and the run marked finished with nothing recorded. The MR itself still
    answers, so the error ends the run, unfinished."""
    for iid in (1, 2):
        Story(iid=iid).publish(fake)
    fake.missing.add("/resource_state_events")
    job = Backfill(engine, api, POLICY, [Scope("projects", "14")], Period(SINCE), workers=1)
    with pytest.raises(GitLabAPIError) as caught:
        job.run()
    assert caught.value.status == 404
    assert fake.count("/merge_requests/1") > fake.count("/merge_requests/1/")  # asked about it
    assert ledger_rows(engine) == []
    with engine.connect() as conn:
        finished = conn.execute(text("SELECT finished_at FROM backfill_runs")).scalars().all()
    assert finished == [None]


def test_label_history_stops_when_label_events_are_missing_not_finding_nothing(
    engine, api, fake
) -> None:
    """With resource_label_events answering 404 for MRs that exist (a proxy, an old
    GitLab), --label-history took every MR for deleted and silently found none. The
    error names the endpoint."""
    Story(iid=5, relabel=("frontend", "bob", "2025-08-05 20:30:00 UTC")).publish(fake)
    fake.missing.add("/resource_label_events")
    job = Backfill(
        engine, api, POLICY, [Scope("groups", "acme")], Period(SINCE), label_history=True
    )
    with pytest.raises(GitLabAPIError, match="resource_label_events: 404") as caught:
        job.run()
    assert caught.value.status == 404


def test_a_resumed_backfill_reads_again_an_mr_updated_since_it_was_done(engine, api, fake) -> None:
    """The cursor kept which MRs were done, not as of when: an MR approved and merged
    after the interrupted run recorded it was skipped on resume, and its approval and
    merge were never imported by that run. It is read again; one not updated is not."""
    first = {"iid": 1, "created": "2025-08-05 19:00:00 UTC"}  # listed first, oldest
    Story(**first, approvals=[], decision=None).publish(fake)  # open, nothing decided yet
    Story(iid=2).publish(fake)
    assert interrupt_after_first(engine, api)["iid"] == 1
    Story(**first).publish(fake)  # approved and merged since: updated_at moved on

    result = Backfill(
        engine, api, POLICY, [Scope("projects", "14")], Period(SINCE), workers=1
    ).run()
    assert (result.found, result.skipped, result.recorded_mrs) == (2, 0, 2)
    rows = {row["mr_iid"]: row for row in ledger_rows(engine)}
    assert (rows[1]["decision"], rows[1]["merged_by"], rows[1]["approvers"]) == (
        "merged",
        "carol",
        ["bob"],
    )

    # Interrupted again after both: the new updated_at is what the cursor keeps now.
    with engine.begin() as conn:
        conn.execute(text("UPDATE backfill_runs SET finished_at = NULL"))
    fake.seen.clear()
    again = Backfill(engine, api, POLICY, [Scope("projects", "14")], Period(SINCE)).run()
    assert (again.found, again.skipped, again.recorded_mrs) == (2, 2, 0)
    assert fake.count("/merge_requests/1/") == 0


def test_a_resumed_backfill_reads_again_an_open_mr_approved_since(engine, api, fake) -> None:
    """An approval does not move updated_at: an open MR the interrupted run recorded, and
    approved since, was listed unchanged and skipped on resume, its approval unread."""
    first = {"iid": 1, "created": "2025-08-05 19:00:00 UTC", "decision": None}
    Story(**first, approvals=[]).publish(fake)  # open, nothing decided yet
    Story(iid=2).publish(fake)
    assert interrupt_after_first(engine, api)["iid"] == 1
    Story(**first).publish(fake)  # approved since: updated_at as it was
    result = Backfill(
        engine, api, POLICY, [Scope("projects", "14")], Period(SINCE), workers=1
    ).run()
    assert (result.found, result.skipped) == (2, 0)
    rows = {row["mr_iid"]: row for row in ledger_rows(engine)}
    assert rows[1]["approvers"] == ["bob"]


def test_a_cursor_row_from_before_0015_is_read_again_on_resume(engine, api, fake) -> None:
    """A run interrupted before migration 0015 kept no updated_at: whether its MRs
    changed since cannot be told, so a resumed run reads them again (recording only
    what is new) rather than trusting them done."""
    for iid in (1, 2):
        Story(iid=iid).publish(fake)
    done = interrupt_after_first(engine, api)
    config = migrate.alembic_config()
    with engine.connect() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, "0014")
        command.upgrade(config, "head")
        conn.commit()
    with engine.connect() as conn:
        kept = conn.execute(text("SELECT mr_iid, mr_updated_at FROM backfill_cursor")).all()
    assert [tuple(row) for row in kept] == [(done["iid"], None)]

    result = Backfill(engine, api, POLICY, [Scope("projects", "14")], Period(SINCE)).run()
    assert (result.found, result.skipped, result.recorded_mrs, result.recorded_facts) == (
        2,
        0,
        2,
        3,  # the other MR's; the first one's three were recorded before
    )


def test_bad_token_is_a_clear_error_without_the_token(engine, api_settings, fake) -> None:
    bad = api_settings.model_copy(update={"gitlab_token": SecretStr("nope-123")})
    with pytest.raises(GitLabAPIError) as caught:
        run_backfill(engine, GitLabAPI.from_settings(bad))
    assert "401" in str(caught.value)
    assert "nope-123" not in str(caught.value)


def test_label_history_finds_an_mr_whose_security_label_was_removed(engine, api, fake) -> None:
    """GitLab's label filter matches the labels an MR carries now: an MR whose security
    label was removed before secledger recorded anything is found only by reading its
    label events, and an MR that never carried one is not taken."""
    removed = Story(iid=5, relabel=("frontend", "bob", "2025-08-05 20:30:00 UTC"))
    never = Story(iid=6, label="frontend")
    for story in (Story(iid=1), removed, never):
        story.publish(fake)
    scopes = [Scope("groups", "acme")]

    plain = Backfill(engine, api, POLICY, scopes, Period(SINCE)).run()
    assert plain.found == 1
    assert [row["mr_iid"] for row in ledger_rows(engine)] == [1]

    before = len(fake.seen)
    calls: list[str] = []
    bar = SimpleNamespace(
        start=lambda n, what="merge requests": calls.append(f"{what} {n}"),
        advance=lambda: calls.append("+"),
    )
    deep = Backfill(engine, api, POLICY, scopes, Period(SINCE), label_history=True).run(bar)
    assert deep.found == 2
    # Two phases on one bar: the label histories of MRs 5 and 6, then MRs 1 and 5 recorded.
    assert calls == ["label histories 2", "+", "+", "merge requests 2", "+", "+"]
    # MRs 5 and 6 are not in the labelled list: their label events are read to decide,
    # once each (MR 5's are recorded from what was read then; a read may take two pages).
    asked = Counter(
        s.path
        for s in fake.seen[before:]
        if s.path.endswith("/resource_label_events") and s.query.get("page", "1") == "1"
    )
    assert asked == {
        f"/api/v4/projects/14/merge_requests/{iid}/resource_label_events": 1 for iid in (1, 5, 6)
    }
    rows = {row["mr_iid"]: row for row in ledger_rows(engine)}
    assert sorted(rows) == [1, 5]
    assert (rows[5]["decision"], rows[5]["merged_by"]) == ("merged", "carol")
    assert (rows[5]["labeled_by"], rows[5]["security_labels"]) == ("alice", [])


def test_every_listing_asks_for_pages_of_100(engine, api, fake) -> None:
    """GitLab answers 20 items a page unless asked: every listing asks for its maximum,
    100, so a long listing takes a fifth of the requests against the rate limit."""
    for iid in (1, 2, 3):
        Story(iid=iid).publish(fake)
    run_backfill(engine, api, Scope("groups", "acme"))
    listings = ("/labels", "/merge_requests", "/resource_label_events", "/resource_state_events")
    first_pages = [s for s in fake.seen if s.path.endswith(listings) and "page" not in s.query]
    assert {s.path.rsplit("/", 1)[-1] for s in first_pages} == {
        name.lstrip("/") for name in listings
    }
    assert {s.query.get("per_page") for s in first_pages} == {"100"}
