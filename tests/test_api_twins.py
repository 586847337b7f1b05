"""A decision told by a webhook and again by the GitLab API counts once, in SQL too.

The ledger fold keeps the webhook's copy and drops the API's (``projection.merge_sources``),
then counts an event repeated by another hook once (``projection.distinct_facts``). The
reviewers report and the ``bi_decisions``/``bi_reviewer_metrics`` views count the same
events (``copies.COUNTED``, which migration 0013 wrote into ``bi_decisions``, read as
groups by the report and, since migration 0018, by ``bi_reviewer_metrics``).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from alembic import command
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, event, text

from apihelpers import POLICY, ledger_rows, replay
from apistory import WEB, Story, api_user
from builders import mr_event, system_hook_event
from fakegitlab import FakeGitLab
from secledger import apifacts, copies, reports
from secledger.backfill import Backfill, Period, record_envelopes
from secledger.extract import MRKey
from secledger.gitlab_api import GitLabAPI, Scope
from secledger.projection import distinct_facts, merge_sources
from secledger.service import feed
from secledger.store import ledger, migrate

pytest_plugins = ("gitlabfixtures",)
SINCE = datetime(2025, 8, 1, tzinfo=UTC)
NOW = datetime(2025, 8, 7, tzinfo=UTC)
Counts = dict[str, tuple[int, int, int]]  # reviewer → (decisions, approvals, revocations)


def run_backfill(engine: Engine, api: GitLabAPI) -> int:
    """``secledger backfill --project acme/payments``: how many API facts were new."""
    scopes = [Scope("projects", "acme/payments")]
    return Backfill(engine, api, POLICY, scopes, Period(SINCE), workers=1).run().recorded_facts


def report_counts(engine: Engine) -> Counts:
    with engine.connect() as conn:
        rows = reports.reviewers(conn, reports.Filters(now=NOW))
    return {r.reviewer: (r.decisions, r.approvals, r.revocations) for r in rows}


def view_counts(engine: Engine) -> Counts:
    query = "SELECT reviewer, decisions, approvals, revocations FROM bi_reviewer_metrics"
    with engine.connect() as conn:
        return {r[0]: (r[1], r[2], r[3]) for r in conn.execute(text(query))}


def decisions(engine: Engine) -> list[tuple[int, str, str, str]]:
    """``bi_decisions`` as (iid, decision, actor, where the counted copy came from)."""
    query = text(
        "SELECT b.mr_iid, b.decision, b.actor, d.source FROM bi_decisions b"
        " JOIN delivery_log d USING (seq) ORDER BY b.mr_iid, b.event_at, b.seq"
    )
    with engine.connect() as conn:
        return [tuple(row) for row in conn.execute(query)]


def assert_counted(engine: Engine, expected: Counts) -> None:
    assert report_counts(engine) == expected
    assert view_counts(engine) == expected


def approvals_in_view(engine: Engine, iid: int) -> list[str]:
    return [
        actor for i, decision, actor, _ in decisions(engine) if i == iid and decision == "approved"
    ]


@pytest.mark.parametrize("api_first", [False, True], ids=["webhooks-first", "backfill-first"])
def test_a_webhook_approval_and_its_backfilled_copy_count_once(
    engine: Engine, api: GitLabAPI, fake: FakeGitLab, api_first: bool
) -> None:
    """bob's approval and carol's merge, each told by a webhook and by the API."""
    story = Story(iid=1)
    story.publish(fake)
    if api_first:
        assert run_backfill(engine, api) == 3
    assert set(replay(engine, fake.url, story.webhooks())) == {"recorded"}
    if not api_first:
        assert run_backfill(engine, api) == 3
    [row] = ledger_rows(engine)
    assert row["approvers"] == ["bob"]
    assert_counted(engine, {"bob": (1, 1, 0), "carol": (1, 0, 0)})
    # The copies the fold keeps: the webhooks', whichever was logged first.
    assert decisions(engine) == [(1, "approved", "bob", "replay"), (1, "merged", "carol", "replay")]
    assert approvals_in_view(engine, 1) == row["approvers"]


def test_an_api_copy_at_the_webhooks_very_second_counts_once(
    engine: Engine, api: GitLabAPI, fake: FakeGitLab
) -> None:
    """Logged first and at the same event time, the API copy still gives way to the webhook.

    The API copy is not a second hook's delivery that the webhook repeats: it is dropped
    for the webhook, so the webhook is what counts (not neither).
    """
    story = Story(iid=1)
    story.publish(fake)
    project = fake.projects[14]
    project.approvals[1][0]["approved_at"] = "2025-08-05T21:00:00.000Z"
    project.state_events[1][0]["created_at"] = "2025-08-05T21:48:25.000Z"
    assert run_backfill(engine, api) == 3
    replay(engine, fake.url, story.webhooks())
    [row] = ledger_rows(engine)
    assert (row["approvers"], row["event_count"]) == (["bob"], 3)
    assert_counted(engine, {"bob": (1, 1, 0), "carol": (1, 0, 0)})
    assert decisions(engine) == [(1, "approved", "bob", "replay"), (1, "merged", "carol", "replay")]


def test_an_api_fact_with_no_webhook_twin_counts(
    engine: Engine, api: GitLabAPI, fake: FakeGitLab
) -> None:
    """dave's approval reached only the API; MR 2 is known only through the API."""
    told = Story(iid=1)
    Story(
        iid=1, approvals=[("bob", told.approvals[0][1]), ("dave", "2025-08-05 21:10:00 UTC")]
    ).publish(fake)
    Story(iid=2, decision=("close", "erin", "2025-08-06 10:00:00 UTC")).publish(fake)
    replay(engine, fake.url, told.webhooks())
    run_backfill(engine, api)
    rows = ledger_rows(engine)
    assert [row["approvers"] for row in rows] == [["bob", "dave"], ["bob"]]
    assert_counted(
        engine, {"bob": (2, 2, 0), "carol": (1, 0, 0), "dave": (1, 1, 0), "erin": (1, 0, 0)}
    )
    assert decisions(engine) == [
        (1, "approved", "bob", "replay"),
        (1, "approved", "dave", "api"),
        (1, "merged", "carol", "replay"),
        (2, "approved", "bob", "api"),
        (2, "closed", "erin", "api"),
    ]
    assert approvals_in_view(engine, 1) == rows[0]["approvers"]


@pytest.mark.parametrize("dated", [True, False], ids=["approved_at", "undated"])
def test_one_users_approvals_far_apart_count_twice(
    engine: Engine, api: GitLabAPI, fake: FakeGitLab, dated: bool
) -> None:
    """bob approves, revokes, and approves again half an hour later; the API (which shows
    only standing approvals) tells the second approval again."""
    story = Story(
        iid=1,
        approvals=[("bob", "2025-08-05 21:30:00 UTC")],
        approved_at_in_api=dated,
    )
    story.publish(fake)
    bodies = story.webhooks()
    first = [
        mr_event("approved", actor="bob", updated_at="2025-08-05 21:00:00 UTC"),
        mr_event("unapproved", actor="bob", updated_at="2025-08-05 21:10:00 UTC"),
    ]
    replay(engine, fake.url, [*bodies[:1], *first, *bodies[1:]])
    run_backfill(engine, api)
    [row] = ledger_rows(engine)
    assert row["approvers"] == ["bob"]
    assert_counted(engine, {"bob": (2, 2, 1), "carol": (1, 0, 0)})
    assert [source for *_, source in decisions(engine)] == ["replay"] * 4


def test_an_approval_an_upgraded_gitlab_dates_is_the_one_it_gave_undated(
    engine: Engine, api: GitLabAPI, fake: FakeGitLab
) -> None:
    """GitLab versions before approved_at gave bob's approval no time; after an upgrade
    it has one, and the dedup key with it. Backfilled again, it was logged a second
    time: bob had two decisions and two approvals."""
    story = Story(iid=1, approved_at_in_api=False)
    story.publish(fake)
    assert run_backfill(engine, api) > 0
    before = ledger_rows(engine)
    story.approved_at_in_api = True  # the upgrade
    story.publish(fake)
    run_backfill(engine, api)
    after = ledger_rows(engine)
    assert [r["event_count"] for r in after] == [r["event_count"] for r in before]
    assert after[0]["approvers"] == ["bob"]
    assert_counted(engine, {"bob": (1, 1, 0), "carol": (1, 0, 0)})


def test_a_user_renamed_before_the_backfill_is_still_one_user(
    engine: Engine, api: GitLabAPI, fake: FakeGitLab
) -> None:
    """bob (id 102) became robert and carol (103) caroline after the webhooks; the API,
    read later, names them as they are now. Counted as other people, bob's approval
    became two approvers and resolved the critical MR's insufficient-approvals."""
    story = Story(iid=1, label="sec::critical")
    story.publish(fake)
    replay(engine, fake.url, story.webhooks())
    assert open_rules(engine) == {"insufficient-approvals"}
    project = fake.projects[14]
    renamed = {"bob": "robert", "carol": "caroline"}
    for item in project.approvals[1]:
        item["user"] = item["user"] | {"username": renamed[item["user"]["username"]]}
    for state in project.state_events[1]:
        state["user"] = state["user"] | {"username": renamed[state["user"]["username"]]}
    project.mrs[1]["merge_user"] = project.mrs[1]["merged_by"] = api_user("caroline") | {"id": 103}
    before = ledger_rows(engine)
    run_backfill(engine, api)
    [row] = ledger_rows(engine)
    assert row["approvers"] == ["bob"]
    assert (row["merged_by"], row["event_count"]) == ("carol", before[0]["event_count"])
    assert open_rules(engine) == {"insufficient-approvals"}
    assert_counted(engine, {"bob": (1, 1, 0), "carol": (1, 0, 0)})


def test_migration_0020_downgrades_to_the_name_matching_views_and_back(
    engine: Engine, api: GitLabAPI, fake: FakeGitLab
) -> None:
    """Down, the views match users by name again (bob and robert count apart); up, by id."""
    story = Story(iid=1)
    story.publish(fake)
    replay(engine, fake.url, story.webhooks())
    for item in fake.projects[14].approvals[1]:
        item["user"] = item["user"] | {"username": "robert"}
    run_backfill(engine, api)
    expected = {"bob": (1, 1, 0), "carol": (1, 0, 0)}
    assert view_counts(engine) == expected
    config = migrate.alembic_config()
    with engine.connect() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, "0019")
        conn.commit()
    assert view_counts(engine) == expected | {"robert": (1, 1, 0)}
    down_and_up(engine, "0019")
    assert view_counts(engine) == expected


def open_rules(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        query = text("SELECT rule FROM findings WHERE resolved_at IS NULL")
        return {row[0] for row in conn.execute(query)}


def api_approval(iid: int, actor: str, approved_at: str | None, *, decided: bool) -> dict[str, Any]:
    """The envelope backfill builds for one approval (undated when ``approved_at`` is None)."""
    story = Story(
        iid=iid, decision=("merge", "carol", "2025-08-05 21:48:25 UTC") if decided else None
    )
    item: dict[str, Any] = {"user": api_user(actor)}
    if approved_at is not None:
        item["approved_at"] = approved_at
    [envelope] = apifacts.approval_envelopes(story.mr(), {"approved_by": [item]})
    return envelope


# (API approver, its approved_at or None for undated, whether the MR is merged): each
# against bob's webhook approval at 21:00:00 in an MR of its own. The API fact is logged
# after the webhook in odd-numbered MRs, before it in even-numbered ones.
CASES = [
    ("bob", "2025-08-05T21:00:00.000Z", False),
    ("bob", "2025-08-05T21:00:00.000Z", False),
    ("bob", "2025-08-05T21:00:00.450Z", False),
    ("bob", "2025-08-05T21:00:05.000Z", False),  # the tolerance is inclusive
    ("bob", "2025-08-05T21:00:05.000001Z", False),
    ("bob", "2025-08-05T20:59:55.000Z", False),
    ("bob", "2025-08-05T20:59:54.999999Z", False),
    ("bob", "2025-08-05T21:30:00.000Z", False),
    ("dave", "2025-08-05T21:00:00.450Z", False),
    ("bob", None, True),  # undated: just before the merge, after the webhook's approval
    ("bob", None, False),  # undated: at updated_at, before the webhook's approval
]


def folded_decisions(engine: Engine, iid: int) -> list[tuple[int, str, str, str]]:
    """The decisions the fold counts in MR ``iid``, as ``decisions`` lists them."""
    with engine.connect() as conn:
        events = ledger.events_of(conn, MRKey(WEB, 14, iid))
    counted = sorted(distinct_facts(merge_sources(events)), key=lambda e: (e.facts.event_at, e.seq))
    return [
        (iid, e.facts.decision, e.facts.actor or "", e.facts.source)
        for e in counted
        if e.facts.decision is not None
    ]


def test_sql_counts_exactly_the_decisions_the_fold_counts(engine: Engine) -> None:
    """Around every edge of the matching rule, ``bi_decisions`` and the reviewers report
    keep the events the fold keeps."""
    for iid, (actor, approved_at, decided) in enumerate(CASES, start=1):
        story = Story(iid=iid, approvals=[("bob", "2025-08-05 21:00:00 UTC")], decision=None)
        if iid % 2:
            replay(engine, WEB, story.webhooks())
        with engine.begin() as conn:
            envelope = api_approval(iid, actor, approved_at, decided=decided)
            assert record_envelopes(conn, WEB, [envelope], POLICY) == 1
        if not iid % 2:
            replay(engine, WEB, story.webhooks())
    kept = [row for iid in range(1, len(CASES) + 1) for row in folded_decisions(engine, iid)]
    assert decisions(engine) == kept
    # Twins in cases 1-4, 6 and 10; the other API approvals count as well as bob's.
    approvals = sum(1 for _, decision, *_ in kept if decision == "approved")
    assert approvals == 2 * len(CASES) - 6
    assert report_counts(engine) == {"bob": (approvals - 1, approvals - 1, 0), "dave": (1, 1, 0)}


SAVE = "2025-08-05 21:00:00 UTC"
LATER_SAVE = "2025-08-05 22:00:00 UTC"
# Before the merge that bounds an undated API approval (21:48:25, ``api_approval``).
MID_SAVE = "2025-08-05 21:30:00 UTC"


def _reset(at: str) -> dict[str, Any]:
    """GitLab's system unapproval after a push reset approvals (no one's decision)."""
    body = mr_event("unapproved", actor="erin", updated_at=at, old_gitlab=True)
    body["object_attributes"] |= {"system": True, "system_action": "approvals_reset_on_push"}
    return body


# (what came by webhook, from a GitLab that sends no actioned_at: bob's decisions dated
# by the MR's last save at 21:00:00, and what followed; the API approval's user and
# approved_at). Each in an MR of its own.
DATED_BY_SAVE: list[tuple[list[tuple[str, str]], str, str | None]] = [
    ([("approved", SAVE)], "bob", "2025-08-05T23:30:00.000Z"),  # the same approval, later
    ([("approved", SAVE), ("unapproved", SAVE)], "bob", "2025-08-05T23:30:00.000Z"),
    ([("approved", SAVE)], "dave", "2025-08-05T23:30:00.000Z"),  # another user's
    ([("approved", SAVE)], "bob", "2025-08-05T20:30:00.000Z"),  # before the save
    # Approved, revoked, approved again, all dated by one save (the last body differs in
    # what it says of reviewers, else it were answered a duplicate): the last is dropped
    # as a repeat of the first, so the API's (the standing one) is no copy of a counted one.
    (
        [("approved", SAVE), ("unapproved", SAVE), ("again", SAVE)],
        "bob",
        "2025-08-05T23:30:00.000Z",
    ),
    # A save after the approval: one given after it would carry that save's time.
    ([("approved", SAVE), ("update", LATER_SAVE)], "bob", "2025-08-05T23:30:00.000Z"),
    # A push reset the approvals after it: the API's is a new approval.
    ([("approved", SAVE), ("reset", LATER_SAVE)], "bob", "2025-08-05T23:30:00.000Z"),
    # ... in the same second (a push's save, and bob's approval before any other save
    # would be dated by it too): the reset alone says the two are not one.
    ([("approved", SAVE), ("reset", SAVE)], "bob", "2025-08-05T23:30:00.000Z"),
    # An undated API approval (a GitLab without approved_at either): its bound is no
    # time of the approval, so a save between says nothing; it matches the standing one.
    ([("approved", SAVE), ("update", MID_SAVE)], "bob", None),
    # ... and not a repeat, which the fold does not count: the standing approval is the
    # API's own (approved, revoked and approved again, all dated by one save).
    ([("approved", SAVE), ("unapproved", SAVE), ("again", SAVE)], "bob", None),
]


def test_an_approval_dated_by_the_mrs_last_save_is_one_with_the_apis(engine: Engine) -> None:
    """Without actioned_at, a webhook dates an approval by the MR's last save, which an
    approval does not move; the API's approved_at, hours later, was matched only within
    5 seconds, and one approval counted twice in the ledger, bi_decisions and reports.
    Not when the webhook's is no longer the approval the API lists."""
    for iid, (told, actor, approved_at) in enumerate(DATED_BY_SAVE, start=1):
        for n, (action, at) in enumerate(told):
            if action == "reset":
                body = _reset(at)
            elif action == "again":
                body = mr_event(
                    "approved",
                    iid=iid,
                    actor="bob",
                    updated_at=at,
                    old_gitlab=True,
                    reviewers=["bob"],
                )
            else:
                body = mr_event(action, iid=iid, actor="bob", updated_at=at, old_gitlab=True)
            body["object_attributes"]["iid"] = iid
            body["object_attributes"]["id"] = 1000 + iid
            # With Idempotency-Key (GitLab 17.4 on, before actioned_at): an approval given
            # again has the first one's bytes, and is logged all the same.
            headers = {
                "x-gitlab-event": "Merge Request Hook",
                "x-gitlab-instance": WEB,
                "idempotency-key": f"early-{iid}-{n}",
            }
            outcome = feed(
                engine,
                POLICY,
                headers,
                json.dumps(body).encode(),
                max_body_bytes=1 << 20,
                source="replay",
            )
            assert outcome.status == "recorded"
        with engine.begin() as conn:
            envelope = api_approval(iid, actor, approved_at, decided=approved_at is None)
            assert record_envelopes(conn, WEB, [envelope], POLICY) == 1
    kept = [
        row for iid in range(1, len(DATED_BY_SAVE) + 1) for row in folded_decisions(engine, iid)
    ]
    assert decisions(engine) == kept
    approvals = [
        (iid, actor, source) for iid, decision, actor, source in kept if decision == "approved"
    ]
    assert approvals == [
        (1, "bob", "replay"),
        (2, "bob", "replay"),
        (2, "bob", "api"),
        (3, "bob", "replay"),
        (3, "dave", "api"),
        (4, "bob", "api"),
        (4, "bob", "replay"),
        (5, "bob", "replay"),
        (5, "bob", "api"),
        (6, "bob", "replay"),
        (6, "bob", "api"),
        (7, "bob", "replay"),
        (7, "bob", "api"),
        (8, "bob", "replay"),
        (8, "bob", "api"),
        (9, "bob", "replay"),
        (10, "bob", "replay"),
        (10, "bob", "api"),
    ]
    rows = {row["mr_iid"]: row for row in ledger_rows(engine)}
    assert rows[1]["event_count"] == 1 and rows[1]["approvers"] == ["bob"]
    for iid in (2, 5, 7, 8, 10):  # approved again after the revocation (or the reset)
        assert (rows[iid]["approvers"], rows[iid]["event_count"] > 1) == (["bob"], True), iid
    assert rows[9]["event_count"] == 2  # the approval and the save: the API's is no third
    # The report reads the same groups in SQL.
    approved = sum(1 for _, decision, *_ in kept if decision == "approved")
    revoked = sum(1 for _, decision, *_ in kept if decision == "unapproved")
    assert report_counts(engine) == {
        "bob": (approved - 1, approved - 1, revoked),
        "dave": (1, 1, 0),
    }


def test_migration_0027_downgrades_to_0026s_views_and_back(engine: Engine) -> None:
    down_and_up(engine, "0026")


def test_bi_decisions_leaves_out_what_reports_leave_out() -> None:
    """Migration 0027 (after 0013 and 0020) wrote ``copies.COUNTED`` into bi_decisions:
    the two must agree, or a change to one needs a migration for the other."""
    revision = ScriptDirectory.from_config(migrate.alembic_config()).get_revision("0027")
    assert revision is not None
    written = " ".join(revision.module.COUNTED.split())
    assert written == " ".join(copies.COUNTED.split())


def test_migration_0011_downgrades_to_0010s_view_and_back(engine: Engine) -> None:
    """The downgrade restores the view 0010 wrote, and the upgrade applies again."""
    scripts = ScriptDirectory.from_config(migrate.alembic_config())
    restored = scripts.get_revision("0011")
    written = scripts.get_revision("0010")
    assert restored is not None
    assert written is not None
    assert " ".join(restored.module.DOWNGRADE.split()) == " ".join(
        written.module._DECISIONS.format(repeat=written.module._REPEAT).split()
    )
    down_and_up(engine, "0010")


def test_migration_0013_downgrades_to_0011s_view_and_back(engine: Engine) -> None:
    """The downgrade restores the view 0011 wrote, and the upgrade applies again."""
    scripts = ScriptDirectory.from_config(migrate.alembic_config())
    restored, written = scripts.get_revision("0013"), scripts.get_revision("0011")
    assert restored is not None
    assert written is not None
    assert restored.module.DOWNGRADE == written.module.UPGRADE
    down_and_up(engine, "0011")


def undated_approval(iid: int, actor: str, updated_at: str) -> dict[str, Any]:
    """The envelope of an approval the API gives no time, for an open MR last updated at
    ``updated_at`` (its upper bound)."""
    mr = Story(iid=iid, decision=None).mr() | {"updated_at": updated_at}
    [envelope] = apifacts.approval_envelopes(mr, {"approved_by": [{"user": api_user(actor)}]})
    return envelope


# After bob's webhook approval at 21:00: (what the webhooks told next, the MR's updated_at
# when the API was asked, the approvers, whether the API's undated approval by bob counts).
STANDING = {
    "revoked-before-the-api-was-asked": (
        [("unapproved", "bob", "21:10:00")],
        "2025-08-05T21:20:00.394Z",
        ["bob"],
        True,
    ),
    "revoked-after-the-api-was-asked": (
        [("unapproved", "bob", "21:10:00")],
        "2025-08-05T21:05:00.394Z",
        [],
        False,
    ),
    "revoked-then-approved-again": (
        [("unapproved", "bob", "21:10:00"), ("approved", "bob", "21:15:00")],
        "2025-08-05T21:20:00.394Z",
        ["bob"],
        False,
    ),
    "another-users-revocation": (
        [("approved", "dave", "21:05:00"), ("unapproved", "dave", "21:10:00")],
        "2025-08-05T21:20:00.394Z",
        ["bob"],
        False,
    ),
}


@pytest.mark.parametrize("api_first", [False, True], ids=["webhooks-first", "api-first"])
@pytest.mark.parametrize("case", list(STANDING))
def test_an_undated_api_approval_copies_only_an_approval_still_standing(
    engine: Engine, case: str, api_first: bool
) -> None:
    """An approval the API gives no time is the copy of the same user's latest approval
    before its bound only while that approval stands then: bob approves, revokes, and
    approves again with no webhook telling it, and the API's approval is that new one."""
    then, updated_at, approvers, api_counts = STANDING[case]
    story = Story(iid=1, decision=None)
    bodies = story.webhooks()
    for action, who, at in then:
        bodies.append(mr_event(action, actor=who, updated_at=f"2025-08-05 {at} UTC"))
    if not api_first:
        replay(engine, WEB, bodies)
    with engine.begin() as conn:
        assert record_envelopes(conn, WEB, [undated_approval(1, "bob", updated_at)], POLICY) == 1
    if api_first:
        replay(engine, WEB, bodies)
    [row] = ledger_rows(engine)
    assert row["approvers"] == approvers
    kept = folded_decisions(engine, 1)
    assert ((1, "approved", "bob", "api") in kept) is api_counts
    assert decisions(engine) == kept


def down_and_up(engine: Engine, revision: str) -> None:
    """Downgrade to ``revision``, then upgrade to head again, on data."""
    config = migrate.alembic_config()
    with engine.connect() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, revision)
        assert migrate.current_revision(conn) == revision
        command.upgrade(config, "head")
        conn.commit()
    with engine.connect() as conn:
        assert migrate.is_current(conn)


def reviewers_plan(engine: Engine) -> str:
    """PostgreSQL's plan for the reviewers report's query, with table scans discouraged
    (on a few rows a scan is cheaper than any index)."""
    seen: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        seen.append((statement, parameters))

    with engine.connect() as conn:
        event.listen(conn, "before_cursor_execute", capture)
        reports.reviewers(conn, reports.Filters(now=NOW))
        event.remove(conn, "before_cursor_execute", capture)
        [(statement, parameters)] = seen
        conn.exec_driver_sql("SET enable_seqscan = off")
        plan = conn.exec_driver_sql(f"EXPLAIN {statement}", parameters).scalars().all()
        conn.rollback()
    return "\n".join(plan)


def test_the_reviewers_report_reads_migration_0017s_indexes(engine: Engine) -> None:
    """The report's query implies both partial indexes' predicates, so PostgreSQL can read
    counted decisions from them (on a large, vacuumed table, the webhook ones without
    touching it); a predicate spelled differently from ``copies`` would leave the report
    probing every event."""
    replay(engine, WEB, Story(iid=1).webhooks())
    plan = reviewers_plan(engine)
    # "Bitmap Index Scan on" the index, or "Index Only Scan using" it once analyzed.
    assert "review_events_webhook_decisions" in plan
    assert "review_events_api_decisions" in plan


def test_migration_0017_downgrades_and_back(engine: Engine) -> None:
    """Without 0017's indexes the report gives the same answer (only slower), and with."""
    story = Story(iid=1)
    replay(engine, WEB, story.webhooks())
    dave = apifacts.approval_envelopes(story.mr(), {"approved_by": [{"user": api_user("dave")}]})
    with engine.begin() as conn:
        assert record_envelopes(conn, WEB, dave, POLICY) == 1
    before = report_counts(engine)
    assert before["dave"] == (1, 1, 0)
    config = migrate.alembic_config()
    with engine.connect() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, "0016")
        conn.commit()
    assert report_counts(engine) == before
    down_and_up(engine, "0016")
    assert report_counts(engine) == before


def test_bi_reviewer_metrics_reads_the_groups_the_report_reads() -> None:
    """Migration 0027 (after 0018, 0020 and 0026) wrote ``copies.counted_groups`` into
    bi_reviewer_metrics: the two must agree, or a change to one needs a migration."""
    revision = ScriptDirectory.from_config(migrate.alembic_config()).get_revision("0027")
    assert revision is not None
    written = " ".join(revision.module.GROUPS.split())
    assert written == " ".join(copies.counted_groups("TRUE").split())


def test_migration_0018_downgrades_to_0004s_view_and_back(engine: Engine) -> None:
    """The downgrade restores the view 0004 wrote; both give the same figures."""
    scripts = ScriptDirectory.from_config(migrate.alembic_config())
    restored, written = scripts.get_revision("0018"), scripts.get_revision("0004")
    assert restored is not None
    assert written is not None
    view = " ".join(restored.module.DOWNGRADE.replace("OR REPLACE ", "").split())
    assert view in " ".join(written.module.VIEWS.split())
    story = Story(iid=1)
    replay(engine, WEB, story.webhooks())
    dave = apifacts.approval_envelopes(story.mr(), {"approved_by": [{"user": api_user("dave")}]})
    with engine.begin() as conn:
        assert record_envelopes(conn, WEB, dave, POLICY) == 1
    query = text("SELECT * FROM bi_reviewer_metrics ORDER BY reviewer")
    with engine.connect() as conn:
        before = conn.execute(query).all()
    assert [row.reviewer for row in before] == ["bob", "carol", "dave"]
    config = migrate.alembic_config()
    with engine.connect() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, "0017")
        assert conn.execute(query).all() == before
        command.upgrade(config, "head")
        assert conn.execute(query).all() == before
        conn.commit()


def bob(action: str, at: str) -> dict[str, Any]:
    return mr_event(action, actor="bob", updated_at=f"2025-08-05 {at} UTC")


def system_hook_revocation(at: str) -> list[dict[str, Any]]:
    """The system hook's copy of bob's revocation (the fold counts it once)."""
    return [system_hook_event("unapproved", actor="bob", updated_at=f"2025-08-05T{at}Z")]


def deliver(engine: Engine, body: dict[str, Any]) -> None:
    """A replayed webhook body, a system hook's when it looks like one."""
    event = "System Hook" if "event_name" in body else "Merge Request Hook"
    headers = {"x-gitlab-event": event, "x-gitlab-instance": WEB}
    data = json.dumps(body).encode()
    outcome = feed(engine, POLICY, headers, data, max_body_bytes=1 << 20, source="replay")
    assert outcome.status == "recorded"


def assert_bobs_decisions(engine: Engine, approved: list[str], revoked: list[str]) -> None:
    """bob's approvals (where each counted copy came from) alternate with his
    revocations in the fold, and the SQL counts the same."""
    expected = [("approved", approved[0])]
    for revocation, approval in zip(revoked, approved[1:], strict=True):
        expected += [("unapproved", revocation), ("approved", approval)]
    kept = folded_decisions(engine, 1)
    assert [(d, source) for _, d, who, source in kept if who == "bob"] == expected
    assert decisions(engine) == kept
    counts = (len(approved), len(approved), len(revoked))
    assert report_counts(engine)["bob"] == counts
    assert view_counts(engine)["bob"] == counts


# After bob's webhook approval at 21:00, in the order they reach secledger: webhooks,
# or ("look", the MR's updated_at) for an API look showing bob's undated approval, and
# whether the look logs it. In each, bob approves, revokes at 21:10 and approves again
# with no webhook telling it: two approvals, one revocation.
REAPPROVED = {
    "revoked-then-looked-twice": [
        ("look", "21:05:00.394", True),
        [bob("unapproved", "21:10:00")],
        ("look", "21:20:00.394", True),
        ("look", "21:30:00.394", False),
    ],
    # The API's approval logged first comes after the revocation in event time: it is
    # the approval that followed it.
    "revocation-webhook-late": [
        ("look", "21:20:00.394", True),
        [bob("unapproved", "21:10:00")],
        ("look", "21:30:00.394", False),
    ],
    # A look after the merge logs the approval first; a look whose MR was read before
    # the merge (a smaller bound), recorded after the late revocation, is the same one.
    "stale-look-after-a-later-one": [
        [mr_event("merge", actor="carol", updated_at="2025-08-05 21:48:25 UTC")],
        ("merged", "2025-08-05 21:48:25 UTC", True),
        [bob("unapproved", "21:10:00")],
        ("look", "21:20:00.394", False),
    ],
    "copy-of-the-revocation-between-looks": [
        [bob("unapproved", "21:10:00")],
        ("look", "21:20:00.394", True),
        system_hook_revocation("21:10:00"),
        ("look", "21:30:00.394", False),
    ],
}


@pytest.mark.parametrize("case", list(REAPPROVED))
def test_an_undated_approval_after_a_revocation_is_logged_once(engine: Engine, case: str) -> None:
    """An approval the API gives no time that follows bob's latest revocation (in event
    order, up to its bound) is a new approval, logged once however often the API shows
    it; one already logged after that revocation is the same approval."""
    replay(engine, WEB, Story(iid=1, decision=None).webhooks())
    for step in REAPPROVED[case]:
        if isinstance(step, list):
            for body in step:
                deliver(engine, body)
            continue
        kind, when, logged = step
        if kind == "merged":
            mr = Story(iid=1, decision=("merge", "carol", when)).mr()
            approvers = {"approved_by": [{"user": api_user("bob")}]}
            [envelope] = apifacts.approval_envelopes(mr, approvers)
        else:
            envelope = undated_approval(1, "bob", f"2025-08-05T{when}Z")
        with engine.begin() as conn:
            assert record_envelopes(conn, WEB, [envelope], POLICY) == int(logged)
    [row] = ledger_rows(engine)
    assert row["approvers"] == ["bob"]
    assert_bobs_decisions(engine, ["replay", "api"], revoked=["replay"])


def test_a_renamed_users_approval_after_their_revocation_is_a_new_one(engine: Engine) -> None:
    """bob approves (a look logs it undated), revokes, approves again with no webhook
    telling it, and is renamed robert. The next look's approval follows his revocation,
    found by his user id: matched by name, none was found, and the approval was taken
    for the one already logged."""
    replay(engine, WEB, Story(iid=1, decision=None).webhooks())
    with engine.begin() as conn:
        envelope = undated_approval(1, "bob", "2025-08-05T21:05:00.394Z")
        assert record_envelopes(conn, WEB, [envelope], POLICY) == 1
    deliver(engine, bob("unapproved", "21:10:00"))
    mr = Story(iid=1, decision=None).mr() | {"updated_at": "2025-08-05T21:20:00.394Z"}
    robert = api_user("bob") | {"username": "robert", "name": "Robert"}
    [renamed] = apifacts.approval_envelopes(mr, {"approved_by": [{"user": robert}]})
    with engine.begin() as conn:
        assert record_envelopes(conn, WEB, [renamed], POLICY) == 1
    [row] = ledger_rows(engine)
    assert row["approvers"] == ["robert"]


def test_a_stale_look_between_two_revocations_is_the_approval_between_them(
    engine: Engine,
) -> None:
    """bob approves, revokes at 21:10 and 21:20, approving again after each with no
    webhook telling it. A look at 21:30 logs the last approval; a look read at 21:15 but
    recorded after it shows the approval between the revocations, another one."""
    replay(engine, WEB, Story(iid=1, decision=None).webhooks())
    replay(engine, WEB, [bob("unapproved", "21:10:00"), bob("unapproved", "21:20:00")])
    for updated_at in ("21:30:00.394", "21:15:00.394"):
        with engine.begin() as conn:
            envelope = undated_approval(1, "bob", f"2025-08-05T{updated_at}Z")
            assert record_envelopes(conn, WEB, [envelope], POLICY) == 1
    assert_bobs_decisions(engine, ["replay", "api", "api"], revoked=["replay", "replay"])
