"""Reconciliation and label-time enrichment against the fake GitLab API."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from click.testing import CliRunner
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

import fakegitlab
from apihelpers import POLICY, ledger_rows, log_count, replay
from apistory import Story
from builders import mr_event, user_id
from secledger import reconcile as reconcile_module
from secledger.backfill import Backfill, Period, find_merge_requests
from secledger.cli import main
from secledger.enrich import enrich, start_background
from secledger.errors import GitLabAPIError
from secledger.gitlab_api import Scope
from secledger.reconcile import reconcile

pytest_plugins = ("gitlabfixtures",)
PERIOD = Period(datetime(2025, 8, 1, tzinfo=UTC), datetime(2025, 9, 1, tzinfo=UTC))
SCOPE = [Scope("groups", "acme")]


def stored(engine):
    with engine.connect() as conn:
        query = text("SELECT * FROM reconciliations ORDER BY id")
        return [dict(r) for r in conn.execute(query).mappings()]


def test_reconcile_finds_a_missing_mr_and_fix_records_it(engine, api, fake) -> None:
    seen, lost = Story(iid=1), Story(iid=2, decision=("close", "dave", "2025-08-07 09:00:00 UTC"))
    open_one = Story(iid=3, decision=None)  # not decided: not in the population
    for story in (seen, lost, open_one):
        story.publish(fake)
    replay(engine, fake.url, seen.webhooks())

    report = reconcile(engine, api, POLICY, SCOPE, PERIOD)
    assert (report.gitlab_count, report.ledger_count) == (2, 1)
    assert [(d.kind, d.mr_iid) for d in report.differences] == [("missing", 2)]
    assert report.fixed == 0
    assert len(ledger_rows(engine)) == 1

    fixed = reconcile(engine, api, POLICY, SCOPE, PERIOD, apply_fix=True)
    assert (fixed.fixed, fixed.remaining) == (1, [])
    row = next(r for r in ledger_rows(engine) if r["mr_iid"] == 2)
    assert (row["decision"], row["closed_by"]) == ("closed", "dave")

    again = reconcile(engine, api, POLICY, SCOPE, PERIOD)
    assert (again.gitlab_count, again.ledger_count, again.differences) == (2, 2, [])
    evidence = stored(engine)
    assert [(e["missing_count"], e["fixed_count"]) for e in evidence] == [(1, 0), (1, 1), (0, 0)]
    assert evidence[0]["period_start"] == PERIOD.since
    assert evidence[0]["differences"]["found"][0]["kind"] == "missing"


def test_reconcile_reports_a_different_decider(engine, api, fake) -> None:
    story = Story(iid=1)
    story.publish(fake)
    bodies = story.webhooks()
    # The ledger was told someone else merged.
    bodies[-1]["user"] |= {"username": "mallory", "id": user_id("mallory")}
    replay(engine, fake.url, bodies)
    report = reconcile(engine, api, POLICY, SCOPE, PERIOD)
    [difference] = report.differences
    assert difference.kind == "different"
    assert difference.fields == {"merged_by": {"gitlab": "carol", "ledger": "mallory"}}


@pytest.mark.parametrize("decision", [("merge", "carol"), ("close", "dave")])
def test_a_decider_renamed_since_the_webhook_is_no_difference(engine, api, fake, decision) -> None:
    """The webhook told carol's merge (or dave's close); GitLab's API, asked later, names
    the same user (same id) by the name they took since. A different user is still one."""
    action, who = decision
    story = Story(iid=1, decision=(action, who, "2025-08-06 12:00:00 UTC"))
    story.publish(fake)
    replay(engine, fake.url, story.webhooks())
    mr = fake.projects[14].mrs[1]
    field = "merge_user" if action == "merge" else "closed_by"
    mr[field] = mr[field] | {"username": f"{who}-renamed"}
    report = reconcile(engine, api, POLICY, SCOPE, PERIOD)
    assert (report.gitlab_count, report.ledger_count, report.differences) == (1, 1, [])
    mr[field] = mr[field] | {"id": user_id("mallory")}
    [difference] = reconcile(engine, api, POLICY, SCOPE, PERIOD).differences
    column = "merged_by" if action == "merge" else "closed_by"
    assert difference.fields == {column: {"gitlab": f"{who}-renamed", "ledger": who}}


def test_an_mr_merged_at_the_edge_of_the_period_is_in_neither_as_a_difference(
    engine, api, fake
) -> None:
    """GitLab's time has milliseconds, the webhook's whole seconds: 23:59:59.994 and
    00:00:00 fall either side of midnight. September's run called the MR extra, and
    every run after it, since nothing can be fixed: they agree."""
    story = Story(iid=1, decision=("merge", "carol", "2025-09-01 00:00:00 UTC"))
    story.publish(fake)
    fake.projects[14].mrs[1]["merged_at"] = "2025-08-31T23:59:59.994Z"
    replay(engine, fake.url, story.webhooks())
    august = reconcile(engine, api, POLICY, SCOPE, PERIOD)
    assert (august.gitlab_count, august.ledger_count, august.differences) == (1, 0, [])
    september = Period(datetime(2025, 9, 1, tzinfo=UTC), datetime(2025, 10, 1, tzinfo=UTC))
    report = reconcile(engine, api, POLICY, SCOPE, september)
    assert (report.gitlab_count, report.ledger_count) == (0, 1)
    assert report.differences == []
    assert report.remaining == []


def test_reconciliation_results_are_append_only(engine, api, fake) -> None:
    reconcile(engine, api, POLICY, SCOPE, PERIOD)
    with pytest.raises(DBAPIError, match="results are evidence"), engine.begin() as conn:
        conn.execute(text("DELETE FROM reconciliations"))
    assert len(stored(engine)) == 1


def test_enrich_replaces_the_created_at_fallback_with_the_api_label_time(engine, api, fake) -> None:
    """The first webhook was an approval: the label time was never seen."""
    story = Story(iid=1, opened_with_label=False, author="alice")
    story.publish(fake)
    replay(engine, fake.url, story.webhooks())
    [before] = ledger_rows(engine)
    assert before["labeled_at_source"] == "created_at_fallback"

    result = enrich(engine, api, POLICY)
    assert result.outcomes == {"recorded": 1}
    [after] = ledger_rows(engine)
    assert (after["labeled_at_source"], after["labeled_by"]) == ("api", "alice")
    assert after["labeled_at"] == datetime(2025, 8, 5, 20, 0, 0, 120000, tzinfo=UTC)
    assert (
        after["time_to_decision_seconds"]
        == (after["decided_at"] - after["labeled_at"]).total_seconds()
    )
    with engine.connect() as conn:
        sources = conn.execute(text("SELECT source FROM delivery_log ORDER BY seq")).scalars().all()
    assert sources[-1] == "api"

    count = log_count(engine)
    assert enrich(engine, api, POLICY).total == 0  # nothing left on the fallback
    Backfill(engine, api, POLICY, SCOPE, PERIOD).run()
    assert log_count(engine) == count + 2  # approval and merge; the label event is known
    assert {k: v for k, v in ledger_rows(engine)[0].items() if k != "last_seq"} == {
        k: v for k, v in after.items() if k != "last_seq"
    }


def test_enrich_exits_1_when_the_lookups_fail(engine, database_url, fake) -> None:
    """A revoked token fails every lookup: a scheduled run must not report success."""
    story = Story(iid=1, opened_with_label=False, author="alice")
    story.publish(fake)
    replay(engine, fake.url, story.webhooks())
    env = {
        "SECLEDGER_DATABASE_URL": database_url,
        "SECLEDGER_GITLAB_URL": fake.url,
        "SECLEDGER_GITLAB_TOKEN": "glpat-revoked",
        "SECLEDGER_LOG_LEVEL": "warning",
    }
    failed = CliRunner().invoke(main, ["enrich"], env=env)
    assert failed.exit_code == 1, failed.output
    assert "label times: 1 merge requests looked up: api_error 1" in failed.stdout
    assert "lookups failed" in failed.stderr
    env["SECLEDGER_GITLAB_TOKEN"] = fakegitlab.TOKEN
    # A deleted MR is asked again on every pass: it must not fail every run.
    fake.missing.add("/merge_requests/1")
    gone = CliRunner().invoke(main, ["enrich"], env=env)
    assert gone.exit_code == 0, gone.output
    assert "label times: 1 merge requests looked up: gone 1" in gone.stdout
    assert "deleted or hidden from the token (404)" in gone.stderr
    fake.missing.clear()
    # An endpoint missing for an MR that exists (GitLab before 13.2, a proxy) is a
    # failed lookup, not a deleted MR: it was counted "gone" and the run exited 0.
    for endpoint in ("resource_label_events", "resource_state_events"):
        fake.missing.add(f"/merge_requests/1/{endpoint}")
        missing = CliRunner().invoke(main, ["enrich"], env=env)
        assert missing.exit_code == 1, (endpoint, missing.output)
        assert "label times: 1 merge requests looked up: api_error 1" in missing.stdout
        fake.missing.clear()
    done = CliRunner().invoke(main, ["enrich"], env=env)
    assert done.exit_code == 0, done.output
    assert "label times: 1 merge requests looked up: recorded 1" in done.stdout


def test_enrich_tells_an_mr_merged_before_its_label_from_one_merged_unreviewed(
    engine, api, fake
) -> None:
    """Merged at 20:30 while unlabelled (that webhook ignored), labelled at 21:00 (that
    webhook lost); an edit at 22:00 is all that was recorded. On the created_at fallback
    its clock runs (it may have been labelled while open). Enrichment records the label
    event and the merge's state event before it: it was merged when labelled."""
    story = Story(
        iid=1,
        opened_with_label=False,
        approvals=[],
        decision=("merge", "carol", "2025-08-05 20:30:00 UTC"),
    )
    story.publish(fake)
    fake.projects[14].label_events[1] = [
        story._label_event("add", story.label, "bob", "2025-08-05T21:00:00.000Z")
    ]
    edit = mr_event(
        "update",
        iid=1,
        project_id=14,
        created_at=story.created,
        updated_at="2025-08-05 22:00:00 UTC",
        labels=[story.label],
        state="merged",
        changes={"title": {"previous": "a", "current": "b"}},
    )
    replay(engine, fake.url, [edit])

    def ended() -> object:
        with engine.connect() as conn:
            return conn.execute(text("SELECT ended_before_label FROM review_sla")).scalar_one()

    assert ended() is None
    assert enrich(engine, api, POLICY).outcomes == {"recorded": 1}
    assert ended() == "merged"


def test_serve_starts_enrichment_only_with_a_token(engine, api_settings, settings) -> None:
    assert start_background(settings, engine) is None  # no GitLab configured
    enricher = start_background(api_settings, engine)
    assert enricher is not None
    enricher.close()
    assert not enricher._thread.is_alive()


def test_an_mr_whose_label_was_removed_is_looked_up_not_left_extra(engine, api, fake) -> None:
    """GitLab's labelled list no longer has an MR the ledger decided in the period: it is
    asked of GitLab by its iid. Decided as recorded: ``unlabelled``, nothing to fix, and
    the run succeeds; decided otherwise: ``different``, and --fix records its history;
    gone from GitLab: still ``extra``."""
    agrees, disagrees, gone, listed = Story(iid=1), Story(iid=2), Story(iid=3), Story(iid=4)
    for story in (agrees, disagrees, gone, listed):
        story.publish(fake)
    told = disagrees.webhooks()
    # The ledger was told someone else merged.
    told[-1]["user"] |= {"username": "mallory", "id": user_id("mallory")}
    replay(engine, fake.url, agrees.webhooks() + told + gone.webhooks() + listed.webhooks())
    project = fake.projects[14]
    for iid in (1, 2):
        project.mrs[iid]["labels"] = []  # the security label removed after the merge
    del project.mrs[3]

    report = reconcile(engine, api, POLICY, SCOPE, PERIOD)
    assert (report.gitlab_count, report.ledger_count) == (1, 4)
    assert [(d.kind, d.mr_iid) for d in report.differences] == [
        ("unlabelled", 1),
        ("different", 2),
        ("extra", 3),
    ]
    assert report.differences[1].fields == {"merged_by": {"gitlab": "carol", "ledger": "mallory"}}
    assert [d.mr_iid for d in report.remaining] == [2, 3]

    asked = fake.count("/merge_requests/1")
    fixed = reconcile(engine, api, POLICY, SCOPE, PERIOD, apply_fix=True)
    assert fixed.fixed == 1
    assert fake.count("/merge_requests/1") == asked + 1  # once, not again after the fix
    assert [(d.kind, d.mr_iid) for d in fixed.remaining] == [("extra", 3)]
    row = next(r for r in ledger_rows(engine) if r["mr_iid"] == 2)
    assert row["merged_by"] == "carol"


def test_an_unlisted_mr_that_still_carries_its_label_is_not_unlabelled(
    engine, api, fake, monkeypatch
) -> None:
    """GitLab's labelled list can leave out an MR for another reason than a removed label.
    Asked by its iid, it still carries its security label: calling it ``unlabelled``
    because it was decided as recorded would pass the run as complete. It stays
    ``extra``, with the labels it carries, and the run does not pass, even with --fix."""
    listed, missed = Story(iid=1), Story(iid=2)
    for story in (listed, missed):
        story.publish(fake)
    replay(engine, fake.url, listed.webhooks() + missed.webhooks())
    matching = fakegitlab._labels_matching
    monkeypatch.setattr(
        "fakegitlab._labels_matching",
        lambda mrs, query: [mr for mr in matching(mrs, query) if mr["iid"] != 2],
    )

    report = reconcile(engine, api, POLICY, SCOPE, PERIOD, apply_fix=True)
    assert (report.gitlab_count, report.ledger_count) == (1, 2)
    assert [(d.kind, d.mr_iid, d.fields) for d in report.remaining] == [
        ("extra", 2, {"security_labels": ["sec::high"]})
    ]
    assert report.fixed == 0
    assert [d["kind"] for d in stored(engine)[-1]["differences"]["after_fix"]] == ["extra"]


def test_a_project_with_no_labelled_mr_left_is_still_checked(engine, api, fake) -> None:
    """GitLab lists no security MR of a project any more (every label removed since):
    its MRs the ledger decided are still looked up, because the projects checked are the
    scope's, not only those GitLab's labelled list names."""
    listed = Story(iid=1)
    relabelled = Story(iid=7, project_id=15, path="acme/billing")
    fake.add_project(15, "acme/billing", group="acme")
    for story in (listed, relabelled):
        story.publish(fake)
    replay(engine, fake.url, listed.webhooks() + relabelled.webhooks())
    fake.projects[15].mrs[7]["labels"] = []  # the security label removed after the merge

    report = reconcile(engine, api, POLICY, SCOPE, PERIOD)
    assert (report.gitlab_count, report.ledger_count) == (1, 2)
    assert [(d.kind, d.project_id, d.mr_iid) for d in report.differences] == [("unlabelled", 15, 7)]
    assert report.remaining == []

    [projects] = [seen for seen in fake.seen if seen.path == "/api/v4/groups/acme/projects"]
    assert {k: projects.query.get(k) for k in ("include_subgroups", "with_shared")} == {
        "include_subgroups": "true",
        "with_shared": "false",
    }
    listings = [seen for seen in fake.seen if seen.path == "/api/v4/groups/acme/merge_requests"]
    # Archived projects' MRs too (GitLab leaves them out of a group's list by default),
    # in creation order, which an update during the listing does not change.
    assert {(q.query.get("non_archived"), q.query.get("order_by")) for q in listings} == {
        ("false", "created_at")
    }

    alone = reconcile(engine, api, POLICY, [Scope("projects", "acme/billing")], PERIOD)
    assert (alone.gitlab_count, alone.ledger_count) == (0, 1)
    assert [(d.kind, d.mr_iid) for d in alone.differences] == [("unlabelled", 7)]


def test_label_history_puts_an_mr_whose_label_was_removed_in_the_population(
    engine, api, fake
) -> None:
    """Removed before secledger saw it: outside GitLab's labelled list, and outside the
    ledger, so a plain run cannot see it. With label history it is ``missing``, and
    ``--fix`` records it."""
    removed = Story(iid=5, relabel=("frontend", "bob", "2025-08-05 20:30:00 UTC"))
    removed.publish(fake)
    Story(iid=6, label="frontend").publish(fake)  # never a security MR

    plain = reconcile(engine, api, POLICY, SCOPE, PERIOD)
    assert (plain.gitlab_count, plain.ledger_count, plain.differences) == (0, 0, [])

    deep = reconcile(engine, api, POLICY, SCOPE, PERIOD, label_history=True)
    assert (deep.gitlab_count, deep.ledger_count) == (1, 0)
    assert [(d.kind, d.mr_iid) for d in deep.differences] == [("missing", 5)]

    # Only MRs decided in the period are in the population: an open one's label history
    # is not read.
    Story(iid=8, label="frontend", decision=None).publish(fake)
    before = len(fake.seen)
    reconcile(engine, api, POLICY, SCOPE, PERIOD, label_history=True)
    read = {s.path for s in fake.seen[before:] if s.path.endswith("/resource_label_events")}
    assert read == {
        f"/api/v4/projects/14/merge_requests/{iid}/resource_label_events" for iid in (5, 6)
    }

    before = len(fake.seen)
    fixed = reconcile(engine, api, POLICY, SCOPE, PERIOD, label_history=True, apply_fix=True)
    assert (fixed.fixed, fixed.remaining) == (1, [])
    # MR 5 is recorded from the label events read to find it, not read a second time.
    fix_read = [
        s.path
        for s in fake.seen[before:]
        if s.path.endswith("/resource_label_events") and s.query.get("page", "1") == "1"
    ]
    assert sorted(fix_read) == [
        f"/api/v4/projects/14/merge_requests/{iid}/resource_label_events" for iid in (5, 6)
    ]
    assert [row["mr_iid"] for row in ledger_rows(engine)] == [5]
    assert stored(engine)[-1]["scope"] == "group acme (with label history)"


def test_a_project_answered_without_an_id_is_a_clear_error(api, fake, monkeypatch) -> None:
    monkeypatch.setattr("fakegitlab._project_json", lambda project: {"path": project.path})
    with pytest.raises(GitLabAPIError, match="group acme answered a project without a numeric id"):
        api.project_ids(Scope("groups", "acme"))


def test_an_mr_deleted_before_its_label_history_is_read_is_skipped(api, fake, monkeypatch) -> None:
    removed = Story(iid=5, relabel=("frontend", "bob", "2025-08-05 20:30:00 UTC"))
    for story in (removed, Story(iid=6, relabel=("frontend", "bob", "2025-08-05 20:30:00 UTC"))):
        story.publish(fake)
    read = api.label_events

    def deleted_meanwhile(project_id: int, iid: int) -> list[dict]:
        if iid == 6:  # listed, then deleted: its label events and the MR itself are 404
            fake.projects[project_id].mrs.pop(iid, None)
        return read(project_id, iid)

    monkeypatch.setattr(api, "label_events", deleted_meanwhile)
    found = find_merge_requests(api, SCOPE, POLICY, PERIOD, label_history=True)
    assert sorted(found) == [(14, 5)]

    def broken(project_id: int, iid: int) -> list[dict]:
        raise GitLabAPIError("GitLab API: 500: Internal Server Error", 500)

    monkeypatch.setattr(api, "label_events", broken)  # any other error stops the run
    with pytest.raises(GitLabAPIError, match="500"):
        find_merge_requests(api, SCOPE, POLICY, PERIOD, label_history=True)


def test_fixed_counts_only_what_the_fix_repaired_and_a_deleted_mr_is_passed_over(
    engine, api, fake, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`fixed` counted every MR re-read, repaired or not ("fixed 1; remaining 1" in the
    evidence); and an MR deleted between the listing and the fix ended the command
    before its result was stored."""
    Story(iid=2, decision=("close", "dave", "2025-08-06 10:00:00 UTC")).publish(fake)
    monkeypatch.setattr(reconcile_module, "record_envelopes", lambda *args, **kwargs: 0)
    report = reconcile(engine, api, POLICY, SCOPE, PERIOD, apply_fix=True)
    assert [(d.kind, d.mr_iid) for d in report.remaining] == [("missing", 2)]
    assert report.fixed == 0
    assert stored(engine)[-1]["fixed_count"] == 0
    monkeypatch.undo()
    gone = dict(fake.projects[14].mrs[2], iid=99)  # listed, then deleted in GitLab
    assert reconcile_module.fix(engine, api, POLICY, [gone]) == 0
