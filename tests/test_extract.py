"""Extraction is pure: recorded payloads in, facts out, no database."""

from __future__ import annotations

from dataclasses import fields
from datetime import UTC, datetime

import pytest

from builders import label_change, mr_event, sample, system_hook_event
from secledger.extract import EventFacts, classify, event_stamps, event_time, extract_facts
from secledger.intake import Delivery, dedup_key, instance_of
from secledger.policy import LabelPolicy

POLICY = LabelPolicy()
RECEIVED = datetime(2026, 1, 1, tzinfo=UTC)


def facts_of(body: dict, headers: dict[str, str] | None = None) -> EventFacts:
    return extract_facts(delivery_for(body, headers), POLICY)


def delivery_for(body: dict, headers: dict[str, str] | None = None) -> Delivery:
    hdrs = headers or {}
    return Delivery(
        event="Merge Request Hook",
        instance=instance_of(hdrs, body),
        headers=hdrs,
        body=b"{}",
        payload=body,
        dedup_key=dedup_key(hdrs, b"{}"),
        received_at=RECEIVED,
    )


@pytest.mark.parametrize(
    ("action", "kind", "decision"),
    [
        ("approved", "approved", "approved"),
        ("approval", "approved", "approved"),
        ("unapproved", "unapproved", "unapproved"),
        ("unapproval", "unapproved", "unapproved"),
        ("merge", "merged", "merged"),
        ("close", "closed", "closed"),
        ("reopen", "reopened", "reopened"),
        ("open", "open", None),
        ("update", "update", None),
    ],
)
def test_each_action_maps_to_its_decision(action: str, kind: str, decision: str | None) -> None:
    facts = facts_of(mr_event(action, actor="bob"))
    assert (facts.kind, facts.decision) == (kind, decision)
    assert facts.actor == "bob"


@pytest.mark.parametrize(
    ("action", "system_action", "kind"),
    [
        ("unapproved", "approvals_reset_on_push", "approvals_reset"),
        ("unapproval", "approvals_reset_on_push", "approvals_reset"),
        ("unapproval", "code_owner_approvals_reset_on_push", "code_owner_approvals_reset"),
        ("unapproved", None, "approvals_reset"),  # system-started, reason not given
    ],
)
def test_an_approval_reset_by_gitlab_is_no_ones_revocation(
    action: str, system_action: str | None, kind: str
) -> None:
    """GitLab 18.6+ tells a reset after a push as ``unapproved``/``unapproval`` marked
    ``system``, its user the person who pushed: not a revocation by that person."""
    body = mr_event(action, actor="dave")
    body["object_attributes"]["system"] = True
    if system_action is not None:
        body["object_attributes"]["system_action"] = system_action
    facts = facts_of(body)
    assert (facts.kind, facts.decision, facts.actor) == (kind, None, "dave")


def test_a_users_own_revocation_is_not_marked_system() -> None:
    body = mr_event("unapproval", actor="bob")
    body["object_attributes"]["system"] = False
    assert classify(body) == ("unapproved", "unapproved")


def test_unknown_future_action_is_kept_as_a_non_decision() -> None:
    assert classify(mr_event("mark_as_draft")) == ("mark_as_draft", None)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"state": {"previous": "opened", "current": "closed"}}, ("closed", "closed")),
        ({"state": {"previous": "locked", "current": "merged"}}, ("merged", "merged")),
        ({"state_id": {"previous": 2, "current": 1}}, ("reopened", "reopened")),
        # Old GitLab had a state of its own for a reopened MR.
        ({"state": {"previous": "closed", "current": "reopened"}}, ("reopened", "reopened")),
        ({"state_id": {"previous": 1, "current": 3}}, ("merged", "merged")),
        ({"title": {"previous": "a", "current": "b"}}, ("update", None)),
    ],
)
def test_payload_without_action_is_read_from_state_changes(changes: dict, expected: tuple) -> None:
    body = mr_event(None, changes=changes)
    assert classify(body) == expected


def test_the_old_reopened_state_is_stored_as_opened() -> None:
    body = mr_event("reopen")
    body["object_attributes"]["state"] = "reopened"
    del body["object_attributes"]["state_id"]
    assert facts_of(body).state == "opened"


def test_old_system_hook_without_action_is_an_update_or_an_open() -> None:
    body = sample("system_hook_mr_open.json")
    body["object_attributes"].pop("action", None)
    assert classify(body) == ("update", None)  # it carries a label change
    body.pop("changes")
    assert classify(body) == ("open", None)


def test_identity_from_the_published_example() -> None:
    body = sample("webhook_events_mr_open.json")
    facts = facts_of(body)
    assert (facts.instance, facts.project_id, facts.mr_iid, facts.mr_id) == (
        "http://example.com",
        14,
        1,
        99,
    )
    assert facts.project_path == "gitlabhq/gitlab-test"
    assert facts.author_id == 51
    assert facts.reviewers == ("user1",)
    assert facts.is_security is False


def test_instance_header_wins_over_the_project_url() -> None:
    facts = facts_of(mr_event("open"), {"x-gitlab-instance": "https://GitLab.Corp.Example/"})
    assert facts.instance == "https://gitlab.corp.example"


def test_reviewers_key_absent_means_none_assigned() -> None:
    assert facts_of(mr_event("open")).reviewers == ()


@pytest.mark.parametrize(
    ("labels", "tier"),
    [
        (["sec::high"], "high"),
        (["sec/low", "sec/critical"], "critical"),
        (["sec/medium", "sec::low"], "medium"),
        (["sec/needs-review"], "unclassified"),
        (["SEC::High"], "high"),
        (["security", "sec"], "unclassified"),
    ],
)
def test_highest_tier_wins(labels: list[str], tier: str) -> None:
    assert POLICY.tier(labels) == tier


def test_labels_that_do_not_match_are_not_security_labels() -> None:
    assert POLICY.security_labels(["security", "sec", "secret/x", "sec/x", "sec::y"]) == (
        "sec/x",
        "sec::y",
    )


def test_configured_patterns_and_tiers() -> None:
    policy = LabelPolicy(patterns=("appsec-*",), tiers=("p1", "p2"))
    assert policy.security_labels(["appsec-p2", "sec/high"]) == ("appsec-p2",)
    assert policy.tier(["appsec-p2"]) == "p2"


def test_a_tier_is_read_from_a_patterns_last_wildcard_after_another() -> None:
    """``*::sec-*`` made ``team::sec-critical`` a security label but gave it no tier."""
    policy = LabelPolicy(patterns=("*::sec-*", "security/*"))
    assert policy.tier(["team::sec-critical", "other"]) == "critical"
    assert policy.tier(["Team::Sec-Low"]) == "low"
    assert policy.tier(["security/HIGH "]) == "high"
    assert policy.tier(["team::sec-triage"]) == "unclassified"


def test_scoped_label_tier_change_arrives_as_one_update() -> None:
    body = mr_event(
        "update",
        labels=["sec::critical"],
        changes=label_change(["sec::high"], ["sec::critical"], "2025-08-05 22:00:00 UTC"),
    )
    facts = facts_of(body)
    assert facts.tier == "critical"
    assert facts.security_added == ("sec::critical",)
    assert facts.security_removed == ("sec::high",)
    assert facts.labeled_at == datetime(2025, 8, 5, 22, tzinfo=UTC)


def test_event_time_prefers_changes_updated_at() -> None:
    body = mr_event(
        "update",
        updated_at="2025-08-05 21:00:00 UTC",
        changes={"updated_at": {"previous": None, "current": "2026-07-28 15:09:25 -0700"}},
    )
    facts = facts_of(body)
    assert facts.event_at == datetime(2026, 7, 28, 22, 9, 25, tzinfo=UTC)
    assert facts.event_at_source == "changes.updated_at"


def test_event_time_falls_back_to_receipt_when_the_payload_has_none() -> None:
    body = mr_event("close")
    del body["object_attributes"]["updated_at"]
    facts = facts_of(body)
    assert (facts.event_at, facts.event_at_source) == (RECEIVED, "received_at")


@pytest.mark.parametrize("action", ["approved", "approval", "unapproved", "unapproval"])
def test_an_approval_is_timed_by_actioned_at_when_gitlab_sends_it(action: str) -> None:
    """GitLab saves no MR on an approval or its revocation: the payload's updated_at is
    the MR's last edit, often the labelling itself, and the decision looked instant (a
    30-hour approval of a 24-hour critical MR was 0 s and within its SLA). GitLab now
    sends actioned_at; without it, updated_at is still all the payload tells."""
    labelled = "2025-08-05 09:00:00 UTC"
    now = mr_event(action, updated_at=labelled, actioned_at="2025-08-06 15:00:00 UTC")
    facts = facts_of(now)
    assert facts.event_at == datetime(2025, 8, 6, 15, tzinfo=UTC)
    assert facts.event_at_source == "object_attributes.actioned_at"
    before = facts_of(mr_event(action, updated_at=labelled, old_gitlab=True))
    assert before.event_at == datetime(2025, 8, 5, 9, tzinfo=UTC)
    assert before.event_at_source == "object_attributes.updated_at"
    # Other actions save the MR: their updated_at is their own time, actioned_at or not.
    merged = mr_event("merge", updated_at="2025-08-06 16:00:00 UTC")
    merged["object_attributes"]["actioned_at"] = "2025-08-06 16:00:01 UTC"
    assert facts_of(merged).event_at_source == "object_attributes.updated_at"


def test_a_push_whose_previous_labels_are_empty_adds_no_label() -> None:
    """After a rebase GitLab sends ``changes.labels.previous`` empty whatever the labels
    were (gitlab-org/gitlab#22023): the MR's first delivery being such a push made the
    pusher its labeller and the push time its label time, and the SLA met."""
    labels = ["backend", "sec::critical"]
    changes = label_change([], labels, "2025-08-04 09:00:00 UTC")
    push = mr_event("update", labels=labels, changes=changes, actor="dave")
    push["object_attributes"]["oldrev"] = "a" * 40
    facts = facts_of(push)
    assert (facts.security_added, facts.labeled_at, facts.labeled_at_source) == ((), None, None)
    assert facts.is_security and facts.tier == "critical"
    # Without a push, an empty ``previous`` is a label edit like any other.
    edit = facts_of(mr_event("update", labels=labels, changes=changes, actor="dave"))
    assert edit.security_added == ("sec::critical",)
    assert edit.labeled_at_source == "label_added"
    # A push that tells the labels it had keeps its change.
    push["changes"] = label_change(["sec::high"], ["sec::critical"], "2025-08-04 09:00:00 UTC")
    assert facts_of(push).security_added == ("sec::critical",)


def test_opened_with_label_starts_the_clock_at_creation() -> None:
    facts = facts_of(mr_event("open", created_at="2025-08-05 20:00:00 UTC"))
    assert facts.labeled_at == datetime(2025, 8, 5, 20, tzinfo=UTC)
    assert facts.labeled_at_source == "opened_with_label"


def test_an_open_sent_long_after_creation_tells_no_label_time() -> None:
    """The hook's "Test" button sends an `open` for the project's newest MR as it stands:
    today's labels beside its old created_at. Read as labelled since creation, it moved
    the SLA clock back by days."""
    tested = facts_of(
        mr_event("open", created_at="2025-08-05 09:00:00 UTC", updated_at="2025-08-08T10:00:00Z")
    )
    assert (tested.kind, tested.labeled_at, tested.labeled_at_source) == ("open", None, None)
    genuine = facts_of(mr_event("open", updated_at="2025-08-05 20:00:01 UTC"))
    assert genuine.labeled_at_source == "opened_with_label"


def test_removing_the_last_security_label_keeps_the_event_security_relevant() -> None:
    body = mr_event(
        "update",
        labels=["backend"],
        changes=label_change(["backend", "sec/high"], ["backend"], "2025-08-05 22:00:00 UTC"),
    )
    facts = facts_of(body)
    assert facts.is_security is True
    assert facts.security_labels == ()
    assert facts.security_removed == ("sec/high",)
    assert facts.tier_before == "high"  # what the removal lowered, whatever came before


def test_a_removal_tells_the_tier_of_the_labels_it_changed() -> None:
    scoped = label_change(["sec::high"], ["sec::critical"], "2025-08-05 22:00:00 UTC")
    assert facts_of(mr_event("update", labels=["sec::critical"], changes=scoped)).tier_before == (
        "high"
    )
    partial = label_change(["sec/low", "sec/critical"], ["sec/low"], "2025-08-05 22:00:00 UTC")
    facts = facts_of(mr_event("update", labels=["sec/low"], changes=partial))
    assert (facts.tier_before, facts.tier) == ("critical", "low")
    added = label_change(["sec/low"], ["sec/low", "sec/high"], "2025-08-05 22:00:00 UTC")
    assert (
        facts_of(mr_event("update", labels=["sec/low", "sec/high"], changes=added)).tier_before
        is None
    )


def test_facts_survive_a_json_round_trip() -> None:
    facts = facts_of(mr_event("approved", reviewers=["bob"]))
    assert EventFacts.from_json(facts.to_json()) == facts
    # Fields, in order; tier_before and untiered only when they tell something, so facts
    # stored before they existed still equal what rebuild extracts from their log rows.
    later = {"tier_before", "untiered"}
    assert list(facts.to_json()) == [f.name for f in fields(EventFacts) if f.name not in later]
    removed = label_change(["sec/high"], [], "2025-08-05 22:00:00 UTC")
    removal = facts_of(mr_event("update", labels=[], changes=removed))
    assert removal.to_json()["tier_before"] == "high"
    assert EventFacts.from_json(removal.to_json()) == removal
    untiered = facts_of(mr_event("open", labels=["sec/crypto"]))
    assert untiered.to_json()["untiered"] is True
    assert EventFacts.from_json(untiered.to_json()) == untiered


def test_event_stamps_keep_only_short_strings() -> None:
    """Kept for seconds or longer per ignored delivery: a sender's huge or odd value is
    not; the event time then comes from the next source, as it would anyway."""
    long = "2025-08-05 21:48:25 UTC" + " " * 60
    payload = mr_event("update", updated_at="2025-08-05 21:00:00 UTC")
    payload["changes"] = {"updated_at": {"current": long}}
    assert event_stamps(payload) == (("2025-08-05 21:00:00 UTC", "object_attributes.updated_at"),)
    payload["changes"] = {"updated_at": {"current": ["2025-08-05 22:00:00 UTC"]}}
    payload["object_attributes"]["updated_at"] = 1754430000
    assert event_stamps(payload) == ()
    received = datetime(2025, 8, 6, tzinfo=UTC)
    assert event_time(payload, received) == (received, "received_at")
    payload["changes"] = {"updated_at": {"current": "2025-08-05 22:00:00 UTC"}}
    assert event_time(payload, received) == (
        datetime(2025, 8, 5, 22, tzinfo=UTC),
        "changes.updated_at",
    )


def test_reviewers_are_unknown_in_a_payload_that_does_not_speak_of_them() -> None:
    """GitLab omits ``reviewers`` when nobody is assigned, but a system hook names no
    reviewers at all (no ``object_attributes.reviewer_ids`` either): read as "none", its
    copy of an event blanked the reviewers the project hook's copy had named."""
    assert facts_of(mr_event("update", reviewers=["bob"])).reviewers == ("bob",)
    assert facts_of(mr_event("update")).reviewers == ()  # reviewer_ids: [] and no key
    assert facts_of(system_hook_event("update")).reviewers is None
    assert facts_of(sample("system_hook_mr_open.json")).reviewers is None
