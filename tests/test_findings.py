"""Separation-of-duties findings, each rule with a positive and a negative case.

Every history is fed as GitLab payloads through the recording path, so the rules
run where they run in production: inside ``service.record``, after the projection.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from alembic import command
from sqlalchemy import Engine, text

from builders import USERS, dumps, label_change, mr_event
from replicas import wait_for
from secledger import findings, reports
from secledger.extract import EventFacts, MRKey, extract_facts
from secledger.findings import Finding, list_findings
from secledger.intake import Ignored, parse_delivery
from secledger.policy import LabelPolicy
from secledger.projection import SequencedEvent, fold
from secledger.rules import evaluate, sla_clock
from secledger.service import Recording, feed, record_locked
from secledger.store import db, ledger, migrate
from secledger.store.log import CHAIN_LOCK_KEY
from secledger.tierpolicy import CompliancePolicy, TierRule

T0 = datetime(2025, 8, 4, 9, 0, tzinfo=UTC)  # a Monday
KEY = MRKey("https://gitlab.example.com", 14, 1)


def at(hours: float) -> str:
    return (T0 + timedelta(hours=hours)).strftime("%Y-%m-%d %H:%M:%S UTC")


def event(action: str, hours: float, **kwargs: Any) -> dict[str, Any]:
    """An event on MR !1 (author alice), labelled sec::high unless told otherwise."""
    kwargs.setdefault("created_at", at(0))
    return mr_event(action, updated_at=at(hours), **kwargs)


def record(engine: Engine, *bodies: dict[str, Any], policy: CompliancePolicy | None = None):
    for body in bodies:
        outcome = feed(
            engine,
            LabelPolicy(),
            {"x-gitlab-event": "Merge Request Hook"},
            dumps(body),
            max_body_bytes=10_000_000,
            source="replay",
            recording=Recording(policy or CompliancePolicy()),
        )
        assert outcome.status == "recorded", outcome


def found(
    engine: Engine, *, resolved: bool = False, now: datetime = T0
) -> dict[tuple[str, str], Finding]:
    """Findings as of ``now``; at T0 no history here is past a deadline yet, so this is
    exactly what recording stored."""
    with engine.connect() as conn:
        rows = list_findings(conn, CompliancePolicy(), now, include_resolved=resolved)
    return {(f.rule, f.subject): f for f in rows}


def rules(engine: Engine) -> set[str]:
    return {rule for rule, _ in found(engine)}


def test_author_approved_positive(engine) -> None:
    record(engine, event("open", 0), event("approved", 1, actor="alice"))
    hit = found(engine)[("author-approved", "")]
    assert hit.severity == "high"
    assert hit.seqs == [2]
    assert hit.evidence["approver"] == "alice"
    assert hit.evidence["author_id"] == 101
    assert (hit.project_id, hit.mr_iid) == (14, 1)
    assert hit.url == "https://gitlab.example.com/acme/payments/-/merge_requests/1"


def test_author_approved_negative(engine) -> None:
    record(engine, event("open", 0), event("approved", 1, actor="bob"))
    assert "author-approved" not in rules(engine)


def test_merged_by_author_positive(engine) -> None:
    record(engine, event("open", 0), event("merge", 2, actor="alice"))
    hit = found(engine)[("merged-by-author", "")]
    assert hit.seqs == [2]
    assert hit.evidence == {
        "author_id": 101,
        "merged_by": "alice",
        "merged_at": "2025-08-04T11:00:00Z",
    }


def test_merged_by_author_negative_when_another_user_approved(engine) -> None:
    record(
        engine,
        event("open", 0),
        event("approved", 1, actor="bob"),
        event("merge", 2, actor="alice"),
    )
    assert rules(engine) == set()


def test_an_approval_delivered_after_a_merge_of_the_same_second_came_before_it(engine) -> None:
    """Webhook times are whole seconds and deliveries can arrive out of order: the
    approval's payload shows the MR still open, so it was given before the merge stamped
    with the same second. No finding, and the ledger lists the approver."""
    record(
        engine,
        event("open", 0),
        event("merge", 2, actor="carol"),
        event("approved", 2, actor="bob"),
    )
    assert rules(engine) == set()
    with engine.connect() as conn:
        row = conn.execute(
            text("SELECT state, decision, approvers FROM security_review_ledger")
        ).one()
    assert tuple(row) == ("merged", "merged", ["bob"])


def test_a_revocation_delivered_after_a_merge_of_the_same_second_came_before_it(engine) -> None:
    """The revocation's payload shows the MR still open: bob revoked before carol merged,
    so the merge had no standing approval."""
    record(
        engine,
        event("open", 0),
        event("approved", 1, actor="bob"),
        event("merge", 2, actor="carol"),
        event("unapproved", 2, actor="bob"),
    )
    hit = found(engine)[("approval-revoked-before-merge", "")]
    assert hit.seqs == [4, 3]  # the fold's order: the revocation, then the merge
    assert hit.evidence["revoked_by"] == ["bob"]
    assert "insufficient-approvals" in rules(engine)


def reset_on_push(
    hours: float, *, pusher: str, action: str = "unapproved", **kwargs: Any
) -> dict[str, Any]:
    """GitLab 18.6+'s webhook for approvals reset by a push (its user is the pusher)."""
    body = event(action, hours, actor=pusher, **kwargs)
    body["object_attributes"].update(system=True, system_action="approvals_reset_on_push")
    return body


def test_approvals_reset_by_a_push_do_not_stand_at_the_merge(engine) -> None:
    """bob and carol approved, alice's push reset both approvals, erin merged: no approval
    stood. Read as alice revoking her own (absent) approval, the ledger kept both
    approvers and the critical tier's requirement looked met."""
    crit = {"labels": ["sec::critical"]}
    record(
        engine,
        event("open", 0, **crit),
        event("approval", 1, actor="bob", **crit),
        event("approved", 1.5, actor="carol", **crit),
        reset_on_push(2, pusher="alice", **crit),
        event("merge", 3, actor="erin", **crit),
    )
    hit = found(engine)[("insufficient-approvals", "")]
    assert hit.evidence["standing_approvers"] == []
    assert "approval-revoked-before-merge" not in rules(engine)
    with engine.connect() as conn:
        approvers = conn.execute(text("SELECT approvers FROM security_review_ledger")).scalar()
    assert approvers == []


def test_an_approval_after_the_reset_stands(engine) -> None:
    record(
        engine,
        event("open", 0),
        event("approved", 1, actor="bob"),
        reset_on_push(2, pusher="alice", action="unapproval"),
        event("approved", 2.5, actor="carol"),
        event("merge", 3, actor="erin"),
    )
    assert rules(engine) == set()


def test_insufficient_approvals_positive_for_critical(engine) -> None:
    crit = {"labels": ["sec::critical"]}
    record(
        engine,
        event("open", 0, **crit),
        event("approved", 1, actor="bob", **crit),
        event("approved", 1.5, actor="alice", **crit),  # the author's own approval does not count
        event("merge", 2, actor="carol", **crit),
    )
    hit = found(engine)[("insufficient-approvals", "")]
    assert hit.evidence["required"] == 2
    assert hit.evidence["standing_approvers"] == ["bob"]
    assert hit.seqs == [2, 4]


def test_insufficient_approvals_negative_with_two_approvals(engine) -> None:
    crit = {"labels": ["sec::critical"]}
    record(
        engine,
        event("open", 0, **crit),
        event("approved", 1, actor="bob", **crit),
        event("approved", 1.5, actor="carol", **crit),
        event("merge", 2, actor="dave", **crit),
    )
    assert rules(engine) == set()


def test_a_merge_whose_event_was_lost_is_judged_at_the_first_event_that_saw_it(engine) -> None:
    """Labelled while open, then an update found it merged, no merge event (GitLab does
    not retry a failed delivery): merged with one approval of the two required, and no
    finding said so."""
    crit = {"labels": ["sec::critical"]}
    record(
        engine,
        event("open", 0, **crit),
        event("approved", 1, actor="bob", **crit),
        event("update", 3, state="merged", **crit),
    )
    hit = found(engine)[("insufficient-approvals", "")]
    assert hit.seqs == [2, 3]
    assert hit.evidence == {
        "tier": "critical",
        "required": 2,
        "standing_approvers": ["bob"],
        "merge_recorded": False,
        "seen_merged_at": "2025-08-04T12:00:00Z",
    }
    # The merge event recovered (reconcile --fix, a resend): the same finding, now dated.
    record(engine, event("merge", 2, actor="carol", **crit))
    with engine.connect() as conn:
        listed = list_findings(conn, CompliancePolicy(), T0, include_resolved=True)
    every = [f for f in listed if f.rule == "insufficient-approvals"]
    assert [(f.seqs, f.evidence["merged_by"], f.resolved_at) for f in every] == [
        ([2, 4], "carol", None)
    ]


def test_an_mr_labelled_after_its_merge_was_not_merged_unreviewed(engine) -> None:
    """Its merge came before the label, when it was no security MR (policy.md): the
    clock's verdict says so (labeled_after_merge), and no finding."""
    labelled = label_change([], ["sec::high"], at(3))
    record(
        engine,
        event("update", 3, state="merged", changes=labelled),
        event("update", 4, state="merged"),
    )
    assert "insufficient-approvals" not in rules(engine)


def test_a_merge_known_only_from_a_later_event_is_judged_as_the_clock_judges_it(engine) -> None:
    """No open, no merge recorded, no label event: the label time comes from created_at,
    while open, so the clock runs (an audit trail errs on the side of a breach), and the
    merge is judged as unreviewed too, rather than one and not the other."""
    record(engine, event("update", 3, state="merged"))
    assert "insufficient-approvals" in rules(engine)


@pytest.mark.parametrize("lowered_in", ["a later event", "the event that found it merged"])
def test_a_relabel_after_a_lost_merge_does_not_lower_what_it_merged_under(
    engine, lowered_in: str
) -> None:
    """Anyone who may edit labels could have buried an unreviewed critical merge whose
    webhook was lost: the relabel resolved the finding, or none was raised."""
    crit, low = {"labels": ["sec::critical"]}, {"labels": ["sec::low"]}
    lowered = {"changes": label_change(["sec::critical"], ["sec::low"], at(4)), **low}
    merged = [
        event("update", 3, state="merged", **crit),
        event("update", 4, state="merged", **lowered),
    ]
    if lowered_in != "a later event":
        merged = [event("update", 4, state="merged", **lowered)]
    record(engine, event("open", 0, **crit), event("approved", 1, actor="bob", **crit), *merged)
    hit = found(engine)[("insufficient-approvals", "")]
    assert (hit.evidence["tier"], hit.evidence["required"]) == ("critical", 2)
    with engine.connect() as conn:
        tier = conn.execute(text("SELECT risk_tier FROM security_review_ledger")).scalar_one()
    assert tier == "critical"


def test_a_lost_merge_after_enough_approvals_is_no_finding(engine) -> None:
    record(
        engine,
        event("open", 0),
        event("approved", 1, actor="bob"),
        event("update", 3, state="merged"),
    )
    assert "insufficient-approvals" not in rules(engine)


def test_a_relabel_after_the_merge_does_not_change_the_tier_it_merged_under(engine) -> None:
    """A critical MR merged with one approval of the two required; relabelled sec::low an
    hour after the merge. The merge is still judged as critical, and the row says so."""
    crit = {"labels": ["sec::critical"]}
    record(
        engine,
        event("open", 0, **crit),
        event("approved", 1, actor="bob", **crit),
        event("merge", 2, actor="carol", **crit),
        event(
            "update",
            3,
            state="merged",
            labels=["sec::low"],
            changes=label_change(["sec::critical"], ["sec::low"], at(3)),
        ),
    )
    assert found(engine)[("insufficient-approvals", "")].evidence["required"] == 2
    with engine.connect() as conn:
        row = ledger.get(conn, KEY)
    assert row is not None
    assert (row["risk_tier"], row["security_labels"]) == ("critical", ["sec::low"])


def test_approval_revoked_before_merge_positive(engine) -> None:
    record(
        engine,
        event("open", 0),
        event("approved", 1, actor="bob"),
        event("approved", 1.2, actor="carol"),
        event("unapproved", 1.5, actor="bob"),
        event("merge", 2, actor="carol"),
    )
    hit = found(engine)[("approval-revoked-before-merge", "")]
    assert hit.severity == "medium"
    assert hit.seqs == [4, 5]
    assert hit.evidence["revoked_by"] == ["bob"]
    # carol's approval still stands, so the tier's one approval is met.
    assert "insufficient-approvals" not in rules(engine)


def as_renamed(body: dict[str, Any], was: str) -> dict[str, Any]:
    """``body`` told by the user ``was`` under the username its actor has now."""
    body["user"]["id"] = USERS[was]
    return body


def test_a_revocation_under_a_new_username_withdraws_the_approval(engine) -> None:
    """bob (id 102) approved, was renamed robert, and revoked: the webhook tells the
    revocation under the new name. Nothing stands at the merge, in the row or the rules."""
    record(
        engine,
        event("open", 0),
        event("approved", 1, actor="bob"),
        as_renamed(event("unapproved", 1.5, actor="robert"), was="bob"),
        event("merge", 2, actor="carol"),
    )
    assert "insufficient-approvals" in rules(engine)
    with engine.connect() as conn:
        row = ledger.get(conn, KEY)
    assert row is not None
    assert row["approvers"] == []


def test_two_users_who_held_one_username_are_two_approvers(engine) -> None:
    """bob (id 102) approved; renamed since, his old name went to erin (105), who approved
    as bob too. Two approvers for the critical tier's two, in the row and the rules."""
    crit = {"labels": ["sec::critical"]}
    record(
        engine,
        event("open", 0, **crit),
        event("approved", 1, actor="bob", **crit),
        as_renamed(event("approved", 1.5, actor="bob", **crit), was="erin"),
        event("merge", 2, actor="carol", **crit),
    )
    assert "insufficient-approvals" not in rules(engine)
    with engine.connect() as conn:
        row = ledger.get(conn, KEY)
    assert row is not None
    assert row["approvers"] == ["bob", "bob"]


def test_approval_revoked_before_merge_negative_after_a_new_approval(engine) -> None:
    record(
        engine,
        event("open", 0),
        event("approved", 1, actor="bob"),
        event("unapproved", 1.5, actor="bob"),
        event("approved", 1.7, actor="bob"),
        event("merge", 2, actor="carol"),
    )
    assert rules(engine) == set()


def test_approval_revoked_before_merge_is_not_answered_by_the_authors_approval(engine) -> None:
    record(
        engine,
        event("open", 0),
        event("approved", 1, actor="bob"),
        event("unapproved", 1.5, actor="bob"),
        event("approved", 1.7, actor="alice"),  # the author: no review
        event("merge", 2, actor="carol"),
    )
    assert found(engine)[("approval-revoked-before-merge", "")].seqs == [3, 5]


def group_policy() -> CompliancePolicy:
    rules_ = dict(CompliancePolicy().rules)
    rules_["high"] = TierRule("high", sla_hours=72, approvals=1, reviewers=frozenset({"bob"}))
    return CompliancePolicy(rules=rules_)


def test_approver_not_in_group_positive(engine) -> None:
    policy = group_policy()
    record(engine, event("open", 0), event("approved", 1, actor="carol"), policy=policy)
    hit = found(engine)[("approver-not-in-group", "carol")]
    assert hit.evidence == {"approver": "carol", "tier": "high", "allowed_reviewers": ["bob"]}
    assert hit.seqs == [2]


def test_approver_not_in_group_negative(engine) -> None:
    policy = group_policy()
    record(engine, event("open", 0), event("approved", 1, actor="bob"), policy=policy)
    assert "approver-not-in-group" not in rules(engine)


def test_label_removed_before_merge_positive(engine) -> None:
    removed = label_change(["sec::high"], [], at(1))
    record(
        engine,
        event("open", 0),
        event("update", 1, actor="alice", labels=[], changes=removed),
        event("merge", 2, actor="carol", labels=[]),
    )
    hit = found(engine)[("label-removed-before-merge", "")]
    assert hit.seqs == [2, 3]
    assert hit.evidence["removed_by"] == "alice"
    assert hit.evidence["tier_before"] == "high"
    assert hit.evidence["tier_after"] is None


@pytest.mark.parametrize("rule", ["approval-revoked-before-merge", "label-removed-before-merge"])
def test_the_merge_rules_judge_a_lost_merge_at_the_event_that_found_it(engine, rule) -> None:
    """As insufficient-approvals does: a merge whose webhook was lost hid them too."""
    if rule == "approval-revoked-before-merge":
        steps = [
            event("approved", 1, actor="bob"),
            event("approved", 1.2, actor="carol"),
            event("unapproved", 1.5, actor="bob"),
        ]
    else:
        removed = label_change(["sec::high"], [], at(1))
        steps = [event("update", 1, actor="alice", labels=[], changes=removed)]
    merged = {"labels": [] if rule == "label-removed-before-merge" else ["sec::high"]}
    record(engine, event("open", 0), *steps, event("update", 3, state="merged", **merged))
    hit = found(engine)[(rule, "")]
    assert hit.seqs[-1] == len(steps) + 2  # the event that found it merged
    assert hit.evidence["merge_recorded"] is False
    assert hit.evidence["seen_merged_at"] == "2025-08-04T12:00:00Z"
    assert "merged_at" not in hit.evidence


def test_label_removed_before_merge_when_the_removal_is_the_first_event_seen(engine) -> None:
    """The label was added before secledger saw the MR: the removal alone tells the tier."""
    removed = label_change(["sec::high"], [], at(1))
    record(
        engine,
        event("update", 1, actor="erin", labels=[], changes=removed),
        event("merge", 2, actor="carol", labels=[]),
    )
    hit = found(engine)[("label-removed-before-merge", "")]
    assert (hit.seqs, hit.evidence["tier_before"], hit.evidence["tier_after"]) == (
        [1, 2],
        "high",
        None,
    )
    with engine.connect() as conn:
        row = ledger.get(conn, KEY)
    assert row is not None
    assert row["risk_tier"] == "high"


def test_label_removed_before_merge_positive_for_a_scoped_downgrade(engine) -> None:
    lowered = label_change(["sec::high"], ["sec::low"], at(1))
    record(
        engine,
        event("open", 0),
        event("update", 1, labels=["sec::low"], changes=lowered),
        event("merge", 2, actor="carol", labels=["sec::low"]),
    )
    assert found(engine)[("label-removed-before-merge", "")].evidence["tier_after"] == "low"


def test_a_downgrade_the_changes_do_not_name_is_seen_from_the_labels(engine) -> None:
    """GitLab's ``changes.labels.previous`` is sometimes wrong (empty here, after a
    rebase): the open event showed sec::critical, the update shows sec::low. Read from
    the changes alone, no label was removed and the merge raised nothing."""
    crit = {"labels": ["sec::critical"]}
    record(
        engine,
        event("open", 0, **crit),
        event("approved", 1, actor="bob", **crit),
        event(
            "update",
            2,
            actor="erin",
            labels=["sec::low"],
            changes=label_change([], ["sec::low"], at(2)),
        ),
        event("merge", 3, actor="bob", labels=["sec::low"]),
    )
    hit = found(engine)[("label-removed-before-merge", "")]
    assert (hit.evidence["tier_before"], hit.evidence["tier_after"]) == ("critical", "low")
    assert hit.evidence["removed_by"] is None  # the changes do not say who removed it
    assert hit.seqs == [3, 4]


def test_a_downgrade_whose_changes_name_a_lower_previous_tier_is_still_seen(engine) -> None:
    """The changes said sec::low was replaced by sec::medium, but the last event showed
    sec::critical: the tier fell from critical to medium with no review after it, and the
    merge raised nothing (the stale previous tier was taken over the one last shown)."""
    crit = {"labels": ["sec::critical"]}
    record(
        engine,
        event("open", 0, **crit),
        event("approved", 1, actor="bob", **crit),
        event("approved", 1.5, actor="carol", **crit),
        event(
            "update",
            2,
            actor="erin",
            labels=["sec::medium"],
            changes=label_change(["sec::low"], ["sec::medium"], at(2)),
        ),
        event("merge", 3, actor="carol", labels=["sec::medium"]),
    )
    hit = found(engine)[("label-removed-before-merge", "")]
    assert (hit.evidence["tier_before"], hit.evidence["tier_after"]) == ("critical", "medium")
    assert hit.seqs == [4, 5]


def test_a_hook_built_before_the_label_and_delivered_after_it_is_no_downgrade(engine) -> None:
    """A bot labels the MR in the second it is opened; the open's hook, built before the
    label, arrives after the label's. It changed no label: nothing was removed."""
    crit = {"labels": ["sec::critical"]}
    record(
        engine,
        event("update", 0, actor="erin", changes=label_change([], crit["labels"], at(0)), **crit),
        event("open", 0, labels=[]),
        event("merge", 2, actor="dave", **crit),
    )
    assert "label-removed-before-merge" not in rules(engine)


def test_an_old_system_hook_without_labels_is_no_downgrade(engine) -> None:
    crit = {"labels": ["sec::critical"]}
    bare = event("update", 1.5, actor="erin", **crit)
    bare.pop("labels")
    bare["object_attributes"].pop("labels")
    record(
        engine,
        event("open", 0, **crit),
        event("approved", 1, actor="bob", **crit),
        bare,
        event("merge", 2, actor="dave", **crit),
    )
    assert "label-removed-before-merge" not in rules(engine)


def test_an_edit_keeping_the_tier_is_no_downgrade(engine) -> None:
    record(
        engine,
        event("open", 0),
        event("update", 1, labels=["sec::high", "docs"]),
        event("approved", 1.5, actor="bob", labels=["sec::high", "docs"]),
        event("merge", 2, actor="carol", labels=["sec::high", "docs"]),
    )
    assert rules(engine) == set()


def test_label_removed_before_merge_negative_when_reviewed_after_removal(engine) -> None:
    removed = label_change(["sec::high"], [], at(1))
    raised = label_change(["sec::low"], ["sec::high"], at(1))
    record(
        engine,
        event("open", 0),
        event("update", 1, labels=[], changes=removed),
        event("approved", 1.5, actor="bob", labels=[]),
        event("merge", 2, actor="carol", labels=[]),
    )
    assert "label-removed-before-merge" not in rules(engine)
    # Raising the tier is not a downgrade.
    record(
        engine,
        event("open", 0, iid=2, labels=["sec::low"]),
        event("update", 1, iid=2, labels=["sec::high"], changes=raised),
        event("approved", 1.2, iid=2, actor="bob"),
        event("merge", 2, iid=2, actor="carol"),
    )
    assert "label-removed-before-merge" not in rules(engine)


def test_label_removed_before_merge_is_not_answered_by_the_authors_approval(engine) -> None:
    removed = label_change(["sec::high"], [], at(1))
    record(
        engine,
        event("open", 0),
        event("update", 1, actor="erin", labels=[], changes=removed),
        event("approved", 1.5, actor="alice", labels=[]),  # the author: no review
        event("merge", 2, actor="carol", labels=[]),
    )
    assert found(engine)[("label-removed-before-merge", "")].seqs == [2, 4]


def test_sla_breached_positive_when_decided_late(engine) -> None:
    record(engine, event("open", 0), event("approved", 80, actor="bob"))  # high: 72 h
    hit = found(engine)[("sla-breached", "")]
    assert hit.severity == "medium"
    assert hit.seqs == [1, 2]
    assert hit.evidence["deadline"] == "2025-08-07T09:00:00Z"
    assert hit.evidence["status"] == "decided late"


def test_a_review_given_before_a_later_label_addition_stops_the_clock(engine) -> None:
    """The label was on the MR at 3 h (its addition never delivered) when bob approved at
    4 h; adding sec/critical at 10 h must not restart the clock past that review."""
    review = {"labels": ["sec/review"]}
    both = ["sec/review", "sec/critical"]
    record(
        engine,
        event("update", 3, **review),
        event("approved", 4, actor="bob", **review),
        event("update", 10, labels=both, changes=label_change(["sec/review"], both, at(10))),
    )
    with engine.connect() as conn:
        clock = conn.execute(text("SELECT labeled_at, first_decision_by FROM review_sla")).one()
    assert tuple(clock) == (T0, "bob")
    assert ("sla-breached", "") not in found(engine, now=T0 + timedelta(days=30))


@pytest.mark.parametrize(
    "before", [["sec::high"], ["sec/review"]], ids=["tier-change", "second-label"]
)
def test_a_first_event_that_changes_one_security_label_to_another_is_no_first_label(
    engine, before
) -> None:
    """The first delivery seen changes the security labels (sec::high to sec::critical, or
    sec::critical beside sec/review): its own previous labels held one, so the first label
    came earlier and was never delivered. The clock starts at the MR's creation, not at
    this change: the approvals at 110 h and 111 h are past the critical 24 h."""
    after = [label for label in before if label != "sec::high"] + ["sec::critical"]
    crit = {"labels": ["sec::critical"]}
    record(
        engine,
        event(
            "update", 100, actor="dave", labels=after, changes=label_change(before, after, at(100))
        ),
        event("approved", 110, actor="bob", **crit),
        event("approved", 111, actor="carol", **crit),
    )
    with engine.connect() as conn:
        row = ledger.get(conn, KEY)
    assert row is not None
    assert (row["labeled_at"], row["labeled_at_source"], row["labeled_by"]) == (
        T0,
        "created_at_fallback",
        None,
    )
    assert ("sla-breached", "") in found(engine)


def test_a_close_undone_by_a_reopen_does_not_stop_the_clock(engine) -> None:
    """alice closed her MR and reopened it a minute later: it was open for review again,
    and nobody reviewed it by the deadline. Stopped by that close, the clock said `met`."""
    record(
        engine,
        event("open", 0),
        event("close", 0.01, actor="alice"),
        event("reopen", 0.02, actor="alice"),
    )
    with engine.connect() as conn:
        clock = conn.execute(text("SELECT first_decision, first_decision_at FROM review_sla")).one()
    assert tuple(clock) == (None, None)
    late = found(engine, now=T0 + timedelta(hours=400))[("sla-breached", "")]
    assert late.evidence["status"] == "open past deadline"


def test_a_review_after_an_undone_close_is_what_stops_the_clock(engine) -> None:
    record(
        engine,
        event("open", 0),
        event("close", 0.01, actor="bob"),
        event("reopen", 0.02, actor="alice"),
        event("approved", 80, actor="bob"),  # high: due at 72 h
    )
    hit = found(engine)[("sla-breached", "")]
    assert hit.evidence["status"] == "decided late"
    assert hit.seqs == [1, 4]


def test_a_close_that_stands_stops_the_clock(engine) -> None:
    record(engine, event("open", 0), event("close", 1, actor="alice"))
    assert "sla-breached" not in {r for r, _ in found(engine, now=T0 + timedelta(hours=400))}


def stored_clock(engine: Engine) -> tuple[Any, ...]:
    with engine.connect() as conn:
        query = text("SELECT risk_tier, sla_hours, deadline, first_decision_at FROM review_sla")
        return tuple(conn.execute(query).one())


def relabel(hours: float, before: str, after: str, **kwargs: Any) -> dict[str, Any]:
    change = label_change([before], [after], at(hours))
    return event("update", hours, labels=[after], changes=change, **kwargs)


def test_a_downgrade_after_the_deadline_passed_does_not_undo_the_breach(engine) -> None:
    """Critical (24 h) from T0; at 30 h, past its deadline, the author relabels it low
    (336 h); bob approves at 31 h. The review was late while the MR was critical."""
    crit = {"labels": ["sec::critical"]}
    low = {"labels": ["sec::low"]}
    record(
        engine,
        event("open", 0, **crit),
        relabel(30, "sec::critical", "sec::low", actor="alice"),
        event("approved", 31, actor="bob", **low),
        event("merge", 32, actor="carol", **low),
    )
    hit = found(engine)[("sla-breached", "")]
    assert (hit.severity, hit.evidence["tier"], hit.evidence["deadline"]) == (
        "high",
        "critical",
        "2025-08-05T09:00:00Z",
    )
    hours = timedelta(hours=1)
    assert stored_clock(engine) == ("critical", 24, T0 + 24 * hours, T0 + 31 * hours)


def test_a_downgrade_before_the_deadline_gives_the_lower_tiers_time(engine) -> None:
    """Critical from T0, corrected to low an hour later: the review at 100 h is in low's
    336 h, and critical's 24 h never passed while the MR carried it."""
    record(
        engine,
        event("open", 0, labels=["sec::critical"]),
        relabel(1, "sec::critical", "sec::low"),
        event("approved", 100, actor="bob", labels=["sec::low"]),
    )
    assert ("sla-breached", "") not in found(engine, now=T0 + timedelta(days=30))
    hours = timedelta(hours=1)
    assert stored_clock(engine) == ("low", 336, T0 + 336 * hours, T0 + 100 * hours)


def test_a_relabel_after_the_review_does_not_make_it_late(engine) -> None:
    """Low from T0, reviewed at 100 h (in low's 336 h), raised to critical at 110 h: the
    review was on time for the tier it had; critical's approvals rule still applies."""
    record(
        engine,
        event("open", 0, labels=["sec::low"]),
        event("approved", 100, actor="bob", labels=["sec::low"]),
        relabel(110, "sec::low", "sec::critical"),
    )
    assert ("sla-breached", "") not in found(engine, now=T0 + timedelta(days=30))
    assert stored_clock(engine)[:2] == ("low", 336)
    with engine.connect() as conn:
        row = ledger.get(conn, KEY)
    assert row is not None
    assert row["risk_tier"] == "critical"
    status = text(
        "SELECT risk_tier, sla_tier, sla_hours, required_approvals, sla_status FROM bi_sla_status"
    )
    with engine.connect() as conn:
        # The SLA's tier and hours, the MR's tier and the approvals the rules ask of it.
        assert tuple(conn.execute(status).one()) == ("critical", "low", 336, 2, "met")
        config = migrate.alembic_config()
        config.attributes["connection"] = conn
        command.downgrade(config, "0020")
        conn.execute(text("SET ROLE secledger_readonly"))
        assert conn.execute(text("SELECT sla_status FROM bi_sla_status")).scalar_one() == "met"
        conn.execute(text("RESET ROLE"))
        command.upgrade(config, "head")
        assert migrate.is_current(conn)
        assert conn.execute(status).one()[1] == "low"


def test_a_first_seen_relabel_tells_the_tier_it_replaced(engine) -> None:
    """The first delivery seen relabels critical to low at 100 h (the open, labelled
    critical, was lost): the MR was critical from its creation, whose 24 h had passed."""
    record(
        engine,
        relabel(100, "sec::critical", "sec::low"),
        event("approved", 110, actor="bob", labels=["sec::low"]),
    )
    hours = timedelta(hours=1)
    assert stored_clock(engine) == ("critical", 24, T0 + 24 * hours, T0 + 110 * hours)
    assert ("sla-breached", "") in found(engine)


def test_a_lost_raise_is_told_by_the_relabel_after_it(engine) -> None:
    """Low from T0 (the open delivered), raised to critical with that webhook lost,
    relabelled low at 30 h (delivered: it removed critical), reviewed at 31 h. The MR was
    critical after 0 h at the earliest: critical's 24 h passed while it carried it."""
    record(
        engine,
        event("open", 0, labels=["sec::low"]),
        relabel(30, "sec::critical", "sec::low"),
        event("approved", 31, actor="bob", labels=["sec::low"]),
    )
    hours = timedelta(hours=1)
    assert stored_clock(engine) == ("critical", 24, T0 + 24 * hours, T0 + 31 * hours)


def test_a_stale_previous_label_does_not_bring_back_a_tier_already_left(engine) -> None:
    """Critical from T0, corrected to low at 1 h; at 50 h a hook whose previous labels
    are stale (GitLab gets them wrong after a rebase) still names critical. Critical
    was told before and left: the review at 100 h is in low's 336 h."""
    record(
        engine,
        event("open", 0, labels=["sec::critical"]),
        relabel(1, "sec::critical", "sec::low"),
        relabel(50, "sec::critical", "sec::low"),
        event("approved", 100, actor="bob", labels=["sec::low"]),
    )
    assert stored_clock(engine)[:2] == ("low", 336)
    assert ("sla-breached", "") not in found(engine, now=T0 + timedelta(days=30))


def test_a_raise_past_the_new_tiers_deadline_is_overdue_from_the_raise(engine) -> None:
    """Low from T0, raised to critical at 30 h with no review yet: critical's 24 h had
    passed, so the review is overdue from the raise on, not from before it."""
    record(
        engine,
        event("open", 0, labels=["sec::low"]),
        relabel(30, "sec::low", "sec::critical"),
    )
    assert stored_clock(engine) == ("critical", 24, T0 + timedelta(hours=30), None)
    hit = found(engine, now=T0 + timedelta(hours=31))[("sla-breached", "")]
    assert hit.evidence["status"] == "open past deadline"
    assert ("sla-breached", "") not in found(engine, now=T0 + timedelta(hours=29))


def test_sla_breached_negative_when_decided_in_time(engine) -> None:
    record(engine, event("open", 0), event("approved", 71, actor="bob"))
    assert "sla-breached" not in rules(engine)


def test_sla_breached_with_business_hours_honours_the_calendar(engine) -> None:
    # Labelled Friday 2025-08-08 16:00; 2 business hours end Monday 10:00.
    rules_ = dict(CompliancePolicy().rules)
    rules_["high"] = TierRule("high", sla_hours=2, approvals=1, business_hours=True)
    policy = CompliancePolicy(rules=rules_)
    friday = 4 * 24 + 7
    record(engine, event("open", friday, created_at=at(friday)), policy=policy)
    record(
        engine, event("approved", friday + 65, actor="bob", created_at=at(friday)), policy=policy
    )
    assert "sla-breached" not in rules(engine)  # Monday 09:00: within business time
    late = {"iid": 2, "created_at": at(friday)}
    record(engine, event("open", friday, **late), policy=policy)
    record(engine, event("approved", friday + 66.5, actor="bob", **late), policy=policy)
    assert found(engine)[("sla-breached", "")].mr_iid == 2  # Monday 10:30: late


def test_open_mr_past_its_deadline_is_recorded_by_the_overdue_check(engine) -> None:
    now = datetime.now(UTC)
    opened = (now - timedelta(hours=1)).strftime("%Y-%m-%d %H:%M:%S UTC")
    record(engine, mr_event("open", labels=["sec::critical"], created_at=opened, updated_at=opened))
    assert "sla-breached" not in rules(engine)
    policy = CompliancePolicy()
    later = now + timedelta(days=2)
    with engine.begin() as conn:
        assert findings.refresh_overdue(conn, policy, later) == 1
        assert findings.refresh_overdue(conn, policy, later) == 0  # deduplicated
    hit = found(engine)[("sla-breached", "")]
    assert hit.severity == "high"
    assert hit.evidence["status"] == "open past deadline"
    # Record-time evaluation builds the same evidence: re-evaluating changes nothing.
    with engine.begin() as conn:
        row = ledger.get(conn, KEY)
        assert row is not None
        findings.evaluate_mr(conn, row, policy, later + timedelta(hours=1))
    again = found(engine)[("sla-breached", "")]
    assert again.evidence == hit.evidence


def test_a_kept_breach_follows_the_clock_a_late_relabel_gives(engine) -> None:
    """The check recorded !1 critical and overdue; a delayed relabel then said it was low
    from the start, 306 h still to go: the breach stayed open with the critical evidence
    while `report open` said running. It is resolved now; one whose new deadline is past
    too stays open, with the new clock's evidence."""
    now = datetime.now(UTC)

    def stamp(hours: float) -> str:
        return (now - timedelta(hours=hours)).strftime("%Y-%m-%d %H:%M:%S UTC")

    def relabel(iid: int, hours: float, tier: str, opened: float) -> dict[str, Any]:
        change = label_change(["sec::critical"], [tier], stamp(hours))
        return mr_event(
            "update",
            iid=iid,
            labels=[tier],
            changes=change,
            created_at=stamp(opened),
            updated_at=stamp(hours),
        )

    for iid, opened in ((1, 30), (2, 100)):
        record(
            engine,
            mr_event(
                "open",
                iid=iid,
                labels=["sec::critical"],
                created_at=stamp(opened),
                updated_at=stamp(opened),
            ),
        )
    with engine.begin() as conn:
        assert findings.refresh_overdue(conn, CompliancePolicy(), now) == 2
    record(engine, relabel(1, 29, "sec::low", 30), relabel(2, 99, "sec::high", 100))
    with engine.connect() as conn:
        stored = list_findings(conn, CompliancePolicy(), now, include_resolved=True)
    breaches = {f.mr_iid: f for f in stored if f.rule == "sla-breached"}
    assert breaches[1].resolved_at is not None
    assert breaches[2].resolved_at is None
    assert (breaches[2].severity, breaches[2].evidence["tier"]) == ("medium", "high")
    assert breaches[2].evidence["sla_hours"] == 72


def test_reevaluation_does_not_duplicate_and_a_finding_that_stops_holding_is_resolved(engine):
    record(engine, event("open", 0), event("merge", 2, actor="alice"))
    first = found(engine)[("merged-by-author", "")]
    with engine.begin() as conn:
        row = ledger.get(conn, KEY)
        assert row is not None
        findings.evaluate_mr(conn, row, CompliancePolicy(), datetime.now(UTC))
    with engine.connect() as conn:
        count = conn.execute(text("SELECT count(*) FROM findings WHERE rule = 'merged-by-author'"))
        assert count.scalar_one() == 1
    assert found(engine)[("merged-by-author", "")].detected_at == first.detected_at
    # An approval that happened before the merge arrives late: the finding no longer holds.
    record(engine, event("approved", 1, actor="bob"))
    assert "merged-by-author" not in rules(engine)
    resolved = found(engine, resolved=True)[("merged-by-author", "")]
    assert resolved.resolved_at is not None
    assert resolved.id == first.id


def test_replaying_an_old_history_decided_in_time_leaves_no_breach_behind(engine) -> None:
    record(engine, event("open", 0), event("update", 30), event("approved", 71, actor="bob"))
    assert "sla-breached" not in {rule for rule, _ in found(engine, resolved=True)}


def test_open_mr_is_found_breached_at_record_time_once_an_event_is_past_the_deadline(engine):
    record(engine, event("open", 0), event("update", 73))  # high: due at 72 h, still undecided
    assert found(engine)[("sla-breached", "")].evidence["status"] == "open past deadline"


def test_a_late_older_event_does_not_resolve_a_wall_clock_breach(engine) -> None:
    """Due 6 h ago; an event of 29 h ago, before the deadline, arrives late: judged at
    its own time the MR was not overdue yet, but the breach stands."""
    now = datetime.now(UTC)
    opened = (now - timedelta(hours=30)).strftime("%Y-%m-%d %H:%M:%S UTC")
    body = mr_event("open", labels=["sec::critical"], created_at=opened, updated_at=opened)
    record(engine, body)
    with engine.begin() as conn:
        assert findings.refresh_overdue(conn, CompliancePolicy(), now) == 1
    earlier = (now - timedelta(hours=29)).strftime("%Y-%m-%d %H:%M:%S UTC")
    changes = {"title": {"previous": "a", "current": "b"}}
    record(
        engine,
        mr_event(
            "update",
            labels=["sec::critical"],
            created_at=opened,
            updated_at=earlier,
            changes=changes,
        ),
    )
    assert ("sla-breached", "") in found(engine)


TITLE_EDIT = {"title": {"previous": "a", "current": "b"}}


def labelled_after(action: str, iid: int = 1) -> list[dict[str, Any]]:
    """!iid merged or closed (``action``) by bob at 2 h, labelled sec::high at 10 h (due at
    82 h). The merge or close, ignored then (no security label), arrives again after the
    label made the MR known (a retry), so it is recorded, before the label in event time."""
    state = {"merge": "merged", "close": "closed"}[action]
    labelled = event(
        "update", 10, iid=iid, state=state, changes=label_change([], ["sec::high"], at(10))
    )
    return [labelled, event(action, 2, iid=iid, actor="bob", labels=[])]


def test_an_mr_merged_before_its_label_is_never_overdue(engine) -> None:
    """Nothing was left to review when the label came: no breach at record time (an edit
    at 90 h is past the deadline), from the overdue check or in a read, ever. The merge
    without approval is what `insufficient-approvals` reports."""
    record(
        engine, *labelled_after("merge"), event("update", 90, state="merged", changes=TITLE_EDIT)
    )
    later = T0 + timedelta(days=30)
    with engine.begin() as conn:
        assert findings.refresh_overdue(conn, CompliancePolicy(), later) == 0
    listed = found(engine, resolved=True, now=later)
    assert ("sla-breached", "") not in listed
    assert listed[("insufficient-approvals", "")].evidence["merged_by"] == "bob"
    with engine.connect() as conn:
        clock = conn.execute(text("SELECT labeled_at, first_decision_at FROM review_sla")).one()
    assert tuple(clock) == (T0 + timedelta(hours=10), None)


def test_a_stored_breach_of_an_mr_merged_before_its_label_is_resolved_at_record_time(
    engine,
) -> None:
    """Recording used to store `open past deadline` for such an MR (the row inserted here
    stands for one). A wall-clock breach is kept only while the clock runs, and this one
    never ran: the MR's next event resolves it."""
    record(engine, *labelled_after("merge"))
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO findings (instance, project_id, mr_iid, rule, severity, seqs,"
                " evidence, detected_at, updated_at) VALUES (:instance, :project_id, :mr_iid,"
                " 'sla-breached', 'medium', '{1}', '{\"status\": \"open past deadline\"}',"
                " now(), now())"
            ),
            ledger.key_params(KEY),
        )
    record(engine, event("update", 90, state="merged", changes=TITLE_EDIT))
    [breach] = [f for f in found(engine, resolved=True).values() if f.rule == "sla-breached"]
    assert breach.resolved_at is not None


def test_an_mr_reopened_after_its_label_runs_its_clock_from_the_label(engine) -> None:
    """Closed at 2 h, labelled at 10 h, reopened at 50 h: open again, due at 82 h (label
    + 72 h, not reopen + 72 h), as the overdue check and a read both judge it."""
    record(engine, *labelled_after("close"), event("reopen", 50))
    policy = CompliancePolicy()
    assert listed_as_of(engine, policy, T0 + timedelta(hours=82)) == []
    [read] = listed_as_of(engine, policy, T0 + timedelta(hours=83))
    assert (read.rule, read.evidence["status"]) == ("sla-breached", "open past deadline")
    assert read.evidence["deadline"] == "2025-08-07T19:00:00Z"
    changed, recorded = listed_once_recorded(engine, policy, T0 + timedelta(hours=83))
    assert changed == 1
    assert [replace(f, id=None) for f in recorded] == [read]


def python_verdicts(
    engine: Engine, policy: CompliancePolicy, now: datetime
) -> tuple[dict[int, str], set[int]]:
    """Per MR: ``SlaClock.status`` at ``now``, and which MRs `sla-breached` finds open past
    their deadline then (the rules as recording runs them, judged at ``now``)."""
    statuses: dict[int, str] = {}
    overdue: set[int] = set()
    with engine.connect() as conn:
        for row in list(ledger.rows(conn)):
            key = MRKey(row["instance"], row["project_id"], row["mr_iid"])
            history = findings.history_of(ledger.events_of(conn, key), row)
            clock = sla_clock(history, policy)
            statuses[key.mr_iid] = clock.status(now)
            for hit in evaluate(history, policy, now, clock):
                if hit.rule == "sla-breached" and hit.evidence["status"] == "open past deadline":
                    overdue.add(key.mr_iid)
    return statuses, overdue


def sql_overdue(
    engine: Engine, policy: CompliancePolicy, now: datetime
) -> tuple[set[int], set[int]]:
    """The MRs the SQL overdue check records at ``now`` (rolled back), and those a read
    counts as open past their deadline then."""
    recorded = text("SELECT mr_iid FROM findings WHERE rule = 'sla-breached' AND updated_at = :now")
    with engine.connect() as conn, conn.begin() as transaction:
        findings.refresh_overdue(conn, policy, now)
        overdue = set(conn.execute(recorded, {"now": now}).scalars())
        transaction.rollback()
    listed = listed_as_of(engine, policy, now)
    read = {f.mr_iid for f in listed if f.evidence.get("status") == "open past deadline"}
    return overdue, read


def sql_statuses(engine: Engine, now: datetime) -> dict[int, str]:
    """Per MR, the verdict the reports, the evidence pack and bi_sla_status read at ``now``."""
    status = text(
        f"SELECT l.mr_iid, {reports.SLA_STATUS} FROM security_review_ledger l"
        " JOIN review_sla s USING (instance, project_id, mr_iid)"
    )
    with db.reading(engine) as conn:
        return dict(conn.execute(status, {"now": now}).all())


def test_the_rules_and_the_sql_overdue_check_agree_on_mrs_labelled_after_merge_or_close(
    engine,
) -> None:
    """!1 merged and !2 closed before the label; !3 closed before it and reopened after; !4
    open; !5 approved in time; !6 low, open; !7 labelled while open and merged unreviewed,
    its merge never delivered (an edit shows it merged). Every event precedes every
    deadline, so nothing was recorded at record time: at each instant the rules, the SQL
    overdue check and a read find the same MRs overdue, and the rules and SQL give each MR
    the same verdict."""
    record(engine, *labelled_after("merge", iid=1), *labelled_after("close", iid=2))
    record(engine, *labelled_after("close", iid=3), event("reopen", 20, iid=3))
    record(engine, event("open", 10, iid=4, created_at=at(10)))
    record(
        engine,
        event("open", 10, iid=7, created_at=at(10)),
        event("update", 60, iid=7, created_at=at(10), state="merged", changes=TITLE_EDIT),
    )
    record(
        engine,
        event("open", 10, iid=5, created_at=at(10)),
        event("approved", 60, iid=5, actor="bob"),
    )
    record(engine, event("open", 10, iid=6, created_at=at(10), labels=["sec::low"]))
    policy = CompliancePolicy()
    for hours in (70, 83, 400):
        now = T0 + timedelta(hours=hours)
        statuses, overdue = python_verdicts(engine, policy, now)
        assert sql_overdue(engine, policy, now) == (overdue, overdue), hours
        assert sql_statuses(engine, now) == statuses, hours
    statuses, overdue = python_verdicts(engine, policy, T0 + timedelta(hours=83))
    assert statuses == {
        1: "labeled_after_merge",
        2: "labeled_after_close",
        3: "overdue",
        4: "overdue",
        5: "met",
        6: "running",
        7: "overdue",
    }
    assert overdue == {3, 4, 7}


def test_with_no_recorded_label_event_a_merged_mr_is_judged_overdue(engine) -> None:
    """Opened with sec::high at 0 h (hook lost), merged unreviewed at 100 h (hook lost);
    an edit at 200 h is all that was recorded. The clock starts at created_at (no label
    event), when the MR was open: nothing shows it merged by then, so it ran, and the
    MR is overdue, not "labelled after merge" (that would be before its own creation)."""
    record(engine, event("update", 200, state="merged", changes=TITLE_EDIT))
    with engine.connect() as conn:
        start, ended = conn.execute(
            text("SELECT labeled_at, ended_before_label FROM review_sla")
        ).one()
    assert (start, ended) == (T0, None)
    assert sql_statuses(engine, T0 + timedelta(hours=300)) == {1: "overdue"}
    assert ("sla-breached", "") in found(engine, now=T0 + timedelta(hours=300))


def api_facts(kind: str, hours: float, **values: Any) -> EventFacts:
    """An API fact about !1 (no state unless given, as a label event carries none)."""
    return EventFacts(
        instance="https://gitlab.example.com",
        project_id=1,
        mr_iid=1,
        mr_id=None,
        kind=kind,
        decision=values.pop("decision", None),
        event_at=at_time(hours),
        event_at_source="api",
        is_security=True,
        tier="high",
        source="api",
        **values,
    )


def at_time(hours: float) -> datetime:
    return T0 + timedelta(hours=hours)


def clock_of(*facts: EventFacts) -> Any:
    events = [SequencedEvent(seq, f) for seq, f in enumerate(facts, start=1)]
    history = findings.history_of(events, fold(events))
    return sla_clock(history, CompliancePolicy())


def test_state_at_the_label_comes_from_earlier_events_when_the_label_event_has_none() -> None:
    """Backfilled from the API: a state event (merged at 2 h), then a label event with no
    state of its own (added at 10 h). The MR was merged when labelled."""
    merged = api_facts("merged", 2, decision="merged", state="merged")
    labelled = api_facts(
        "label_added",
        10,
        labeled_at=at_time(10),
        security_added=("sec::high",),
        security_labels=("sec::high",),
        labels=("sec::high",),
    )
    assert clock_of(merged, labelled).ended_before_label == "merged"
    # An edit after the label showing the MR open again: it was reopened, the clock runs.
    reopened = api_facts("update", 20, state="opened")
    clock = clock_of(merged, labelled, reopened)
    assert clock.ended_before_label is None
    assert clock.status(at_time(200)) == "overdue"


def test_an_mr_labelled_open_whose_merge_was_never_delivered_is_overdue(engine) -> None:
    """Labelled while open (due at 72 h), nobody reviews, the merge webhook is lost, and an
    edit at 200 h shows the MR merged. The ledger's state cannot tell this from an MR
    merged before its label; the events can: the label found it open. Still an
    unreviewed change past due: recorded as a breach, overdue in every read."""
    record(engine, event("open", 0), event("update", 200, state="merged", changes=TITLE_EDIT))
    listed = found(engine, now=T0 + timedelta(hours=300))
    assert listed[("sla-breached", "")].evidence["status"] == "open past deadline"
    assert sql_statuses(engine, T0 + timedelta(hours=300)) == {1: "overdue"}
    with engine.connect() as conn:
        ended = conn.execute(text("SELECT ended_before_label FROM review_sla")).scalar_one()
    assert ended is None


def listed_as_of(engine: Engine, policy: CompliancePolicy, now: datetime) -> list[Finding]:
    """Every finding as a read sees it at ``now``, in a READ ONLY transaction."""
    with db.reading(engine) as conn:
        return list_findings(conn, policy, now, include_resolved=True)


def listed_once_recorded(engine: Engine, policy: CompliancePolicy, now: datetime):
    """The same, right after serve's check recorded at ``now`` (rolled back afterwards)."""
    with engine.connect() as conn, conn.begin() as transaction:
        changed = findings.refresh_overdue(conn, policy, now)
        listed = list_findings(conn, policy, now, include_resolved=True)
        transaction.rollback()
    return changed, listed


def stored(engine: Engine) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        return list(conn.execute(text("SELECT * FROM findings ORDER BY id")).all())


def test_a_read_counts_an_unrecorded_breach_as_recording_it_would(engine) -> None:
    """!1 is open past its deadline with nothing recorded; !2 was merged in time, !3 (low)
    is not due yet, !4 has its breach recorded at record time. Only !1 changes."""
    record(engine, event("open", 0, labels=["sec::critical"]))
    record(engine, event("open", 0, iid=2), event("merge", 1, iid=2, actor="bob"))
    record(engine, event("open", 0, iid=3, labels=["sec::low"]))
    record(engine, event("open", 0, iid=4), event("update", 80, iid=4))  # high: due at 72 h
    policy, now = CompliancePolicy(), T0 + timedelta(hours=30)
    before = stored(engine)
    read = listed_as_of(engine, policy, now)
    assert stored(engine) == before
    changed, recorded = listed_once_recorded(engine, policy, now)
    assert changed == 1
    [new] = [f for f in read if f.id is None]
    assert (new.mr_iid, new.rule, new.severity, new.resolved_at) == (
        1,
        "sla-breached",
        "high",
        None,
    )
    assert new.detected_at == "2025-08-05T15:00:00Z"  # now: when recording it would detect it
    assert new.evidence["status"] == "open past deadline" and new.seqs == [1]
    assert [replace(f, id=None) if f.mr_iid == 1 else f for f in recorded] == read
    assert {f.mr_iid for f in read if f.rule == "sla-breached"} == {1, 4}


def breached_then_given_longer(engine) -> CompliancePolicy:
    """!1, critical, opened at T0 with its breach recorded at 30 h; a policy giving
    critical MRs 100 h instead of 24."""
    record(engine, event("open", 0, labels=["sec::critical"]))
    with engine.begin() as conn:
        assert findings.refresh_overdue(conn, CompliancePolicy(), T0 + timedelta(hours=30)) == 1
    rules_ = dict(CompliancePolicy().rules)
    rules_["critical"] = TierRule("critical", sla_hours=100, approvals=2)
    return CompliancePolicy(rules=rules_)


def test_a_read_reopens_a_resolved_breach_of_an_mr_overdue_again(engine) -> None:
    """The check recorded !1's breach, a longer SLA resolved it, and that SLA passed too:
    recording would reopen the same row (same id, detected_at kept), so reads do, with
    the deadline and budget of the clock that ran out now, not the first one's."""
    longer = breached_then_given_longer(engine)
    with engine.begin() as conn:
        findings.reevaluate_all(conn, longer, T0 + timedelta(hours=31))
    [resolved] = listed_as_of(engine, longer, T0 + timedelta(hours=99))
    assert resolved.resolved_at == "2025-08-05T16:00:00Z"
    now = T0 + timedelta(hours=101)
    [read] = listed_as_of(engine, longer, now)
    assert resolved.evidence["deadline"] == "2025-08-05T09:00:00Z"  # 24 h
    evidence = resolved.evidence | {"sla_hours": 100, "deadline": "2025-08-08T13:00:00Z"}
    assert read == replace(resolved, resolved_at=None, evidence=evidence)
    changed, recorded = listed_once_recorded(engine, longer, now)
    assert changed == 1
    assert recorded == [read]
    # Nothing was written: before its new deadline it still reads as resolved.
    assert listed_as_of(engine, longer, T0 + timedelta(hours=99)) == [resolved]


def test_the_overdue_check_does_not_reopen_a_breach_a_writer_is_resolving(engine) -> None:
    """The check read !1 as overdue from a snapshot taken while a writer (holding the
    chain lock) was moving its deadline and resolving its breach; its ON CONFLICT then
    found the row resolved and reopened it, with the old evidence, for good on a merged
    MR. It now queues behind writers, and reads what they committed."""
    longer = breached_then_given_longer(engine)
    changed: list[int] = []
    with engine.connect() as writer, writer.begin():
        writer.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": CHAIN_LOCK_KEY})
        row = ledger.get(writer, KEY)
        assert row is not None
        findings.evaluate_mr(writer, row, longer, T0 + timedelta(hours=31))

        def check() -> None:
            with engine.begin() as conn:
                changed.append(findings.refresh_overdue(conn, longer, T0 + timedelta(hours=32)))

        checker = threading.Thread(target=check)
        checker.start()
        assert wait_for(lambda: waiting_for_a_lock(engine))
    checker.join(timeout=30)
    assert changed == [0]
    assert ("sla-breached", "") not in found(engine, now=T0 + timedelta(hours=32))


def test_reevaluation_does_not_overwrite_what_a_writer_records_meanwhile(engine) -> None:
    """`findings --reevaluate` read !1 before a writer's approval committed, then wrote
    its clock over the writer's: the approval's decision time was gone from review_sla
    until the MR's next delivery. It now waits for the chain lock, as rebuild does."""
    record(engine, event("open", 0))
    approval = parse_delivery(
        {"x-gitlab-event": "Merge Request Hook"},
        dumps(event("approved", 1, actor="bob")),
        secrets=(),
        max_body_bytes=10**6,
        received_at=T0 + timedelta(hours=1),
        require_token=False,
        source="replay",
    )
    assert not isinstance(approval, Ignored)
    done: list[int] = []
    with engine.connect() as writer, writer.begin():
        items = [(approval, extract_facts(approval, LabelPolicy()))]
        [outcome] = record_locked(writer, items, recording=Recording(CompliancePolicy()))
        assert outcome.status == "recorded"

        def reevaluate() -> None:
            with engine.begin() as conn:
                now = T0 + timedelta(hours=2)
                done.append(findings.reevaluate_all(conn, CompliancePolicy(), now))

        other = threading.Thread(target=reevaluate)
        other.start()
        assert wait_for(lambda: waiting_for_a_lock(engine))
    other.join(timeout=30)
    assert done == [1]
    assert stored_clock(engine)[3] == T0 + timedelta(hours=1)


def test_reevaluation_then_the_check_does_not_deadlock_with_serves_check(engine) -> None:
    """`findings --reevaluate` holds the chain lock, then runs the overdue check, which
    took the refresh lock: serve's check, holding that lock while it waited for the
    chain lock, made a cycle, and PostgreSQL killed the re-evaluation."""
    record(engine, event("open", 0, labels=["sec::critical"]))
    now = T0 + timedelta(hours=30)
    serves: list[int] = []
    with engine.connect() as cli, cli.begin():
        assert findings.reevaluate_all(cli, CompliancePolicy(), now) == 1

        def check() -> None:
            with engine.begin() as conn:
                serves.append(findings.refresh_overdue(conn, CompliancePolicy(), now))

        other = threading.Thread(target=check)
        other.start()
        assert wait_for(lambda: waiting_for_a_lock(engine))
        # Re-evaluated at now, the breach is recorded already: neither check adds it.
        assert findings.refresh_overdue(cli, CompliancePolicy(), now) == 0
    other.join(timeout=30)
    assert serves == [0]
    assert ("sla-breached", "") in found(engine, now=now)


def waiting_for_a_lock(engine: Engine) -> bool:
    with engine.connect() as conn:
        return bool(conn.execute(text("SELECT count(*) FROM pg_locks WHERE NOT granted")).scalar())


def test_a_decision_told_by_a_webhook_and_by_the_api_is_one_event_for_the_rules() -> None:
    """The rules see what the fold sees: the API's copy of a webhook approval is dropped."""
    parsed = parse_delivery(
        {"x-gitlab-event": "Merge Request Hook"},
        dumps(mr_event("approved", actor="bob")),
        secrets=(),
        max_body_bytes=10**6,
        received_at=datetime(2025, 8, 6, tzinfo=UTC),
        require_token=False,
    )
    assert not isinstance(parsed, Ignored)
    webhook = extract_facts(parsed, LabelPolicy())
    # The API's time is its own, a few seconds off: only the source merge matches them.
    api = replace(webhook, source="api", event_at=webhook.event_at + timedelta(seconds=2))
    row = {**fold([SequencedEvent(1, webhook)]), "instance": webhook.instance}
    history = findings.history_of([SequencedEvent(1, webhook), SequencedEvent(2, api)], row)
    assert [event.seq for event in history.events] == [1]


def test_findings_of_an_approver_as_gitlab_writes_the_user(engine) -> None:
    crit = {"labels": ["sec::critical"]}
    record(
        engine,
        event("open", 0, **crit),
        event("approved", 1, actor="bob", **crit),
        event("merge", 2, actor="carol", **crit),
    )
    with engine.connect() as conn:
        named = list_findings(conn, CompliancePolicy(), T0, reviewer="bob")
        written = list_findings(conn, CompliancePolicy(), T0, reviewer="@bob")
        other = list_findings(conn, CompliancePolicy(), T0, reviewer="@carol")
    assert [f.rule for f in named] == ["insufficient-approvals"]
    assert written == named
    assert other == []
