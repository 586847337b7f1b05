"""The fold from events to a ledger row, without a database."""

from __future__ import annotations

import fnmatch
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from builders import delivery_of, label_change, mr_event
from secledger.extract import EventFacts, extract_facts
from secledger.policy import LabelPolicy
from secledger.projection import (
    UNDATED_APPROVAL,
    SequencedEvent,
    distinct_facts,
    fact_identity,
    fold,
    ordered_facts,
)

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
AT = "2025-08-05 21:00:00 UTC"


def facts_of(body: dict, policy: LabelPolicy | None = None) -> EventFacts:
    """What extraction makes of a webhook ``body``."""
    return extract_facts(delivery_of(body, "k", T0), policy or LabelPolicy())


def event(seq: int, kind: str, actor: str, minutes: int, **extra: object) -> SequencedEvent:
    decision = kind if kind in {"approved", "unapproved", "merged", "closed", "reopened"} else None
    base = EventFacts(
        instance="https://gitlab.example.com",
        project_id=7,
        mr_iid=3,
        mr_id=70,
        kind=kind,
        decision=decision,
        event_at=T0 + timedelta(minutes=minutes),
        event_at_source="object_attributes.updated_at",
        is_security=True,
        tier="high",
        actor=actor,
        security_labels=("sec::high",),
        labels=("sec::high",),
        created_at=T0,
        state={"merged": "merged", "closed": "closed"}.get(kind, "opened"),
    )
    return SequencedEvent(seq, replace(base, **extra))  # type: ignore[arg-type]


def test_approvers_stand_in_approval_order_until_revoked() -> None:
    row = fold(
        [
            event(1, "open", "alice", 0, labeled_at=T0, labeled_at_source="opened_with_label"),
            event(2, "approved", "bob", 10),
            event(3, "approved", "carol", 20),
            event(4, "unapproved", "bob", 30),
            event(5, "approved", "dave", 40),
        ]
    )
    assert row["approvers"] == ["carol", "dave"]
    assert row["reviewer"] == "dave"
    assert (row["decision"], row["decided_by"]) == ("approved", "dave")
    assert row["time_to_decision_seconds"] == 40 * 60


def test_an_approval_reset_after_a_push_clears_every_approver_but_decides_nothing() -> None:
    row = fold(
        [
            event(1, "open", "alice", 0),
            event(2, "approved", "bob", 10),
            event(3, "approved", "carol", 20),
            event(4, "approvals_reset", "alice", 30),
            event(5, "approved", "erin", 40),
        ]
    )
    assert row["approvers"] == ["erin"]
    assert (row["decision"], row["decided_by"]) == ("approved", "erin")
    reset = fold(
        [
            event(1, "open", "alice", 0),
            event(2, "approved", "bob", 10),
            event(3, "approvals_reset", "alice", 30),
        ]
    )
    assert reset["approvers"] == []
    assert (reset["decision"], reset["decided_by"]) == ("approved", "bob")
    assert reset["reviewer"] == "bob"


def test_a_reset_delivered_by_two_hooks_counts_once_and_the_first_copy_stands() -> None:
    """A system hook repeats a project hook's reset without the reviewers key."""
    project_hook = event(3, "approvals_reset", "alice", 30, reviewers=("carol",))
    system_hook = event(4, "approvals_reset", "alice", 30, reviewers=())
    history = [event(1, "open", "alice", 0, reviewers=("carol",)), event(2, "approved", "bob", 10)]
    row = fold([*history, project_hook, system_hook])
    assert row == fold([*history, project_hook]) | {"last_seq": 4}
    assert (row["approvers"], row["assigned_reviewers"], row["event_count"]) == ([], ["carol"], 3)


def test_a_code_owner_reset_keeps_the_approvers_it_does_not_name() -> None:
    """GitLab does not say whose approvals a Code Owners reset removed."""
    row = fold(
        [
            event(1, "open", "alice", 0),
            event(2, "approved", "bob", 10),
            event(3, "code_owner_approvals_reset", "alice", 30),
        ]
    )
    assert row["approvers"] == ["bob"]


def test_reviewer_is_the_decider_when_no_approval_stands() -> None:
    row = fold(
        [
            event(1, "open", "alice", 0),
            event(2, "closed", "bob", 5),
        ]
    )
    assert row["approvers"] == []
    assert row["reviewer"] == "bob"
    assert (row["closed_by"], row["closed_at"]) == ("bob", T0 + timedelta(minutes=5))
    assert row["labeled_at_source"] == "created_at_fallback"


def test_arrival_order_does_not_matter() -> None:
    events = [
        event(1, "open", "alice", 0),
        event(2, "approved", "bob", 10),
        event(3, "merged", "alice", 20),
    ]
    shuffled = [replace(e, seq=s) for e, s in zip(reversed(events), (1, 2, 3), strict=True)]
    in_order, out_of_order = fold(events), fold(shuffled)
    for key in ("state", "decision", "decided_by", "decided_at", "approvers", "merged_by"):
        assert in_order[key] == out_of_order[key]
    assert out_of_order["state"] == "merged"


def test_a_reopen_clears_the_close() -> None:
    """Reopened, the MR is open: the close it undid is no decision of the row any more."""
    row = fold(
        [
            event(1, "open", "alice", 0),
            event(2, "closed", "bob", 5),
            event(3, "reopened", "carol", 10),
        ]
    )
    assert (row["state"], row["decision"], row["decided_by"]) == ("opened", "reopened", "carol")
    assert (row["closed_by"], row["closed_at"]) == (None, None)


def test_a_close_after_a_reopen_is_the_close_and_an_untold_one_has_no_time() -> None:
    """Closed, reopened and closed again: the second close is the row's. When only a later
    event shows it closed again (that close's webhook lost), no close time is known."""
    history = [
        event(1, "open", "alice", 0),
        event(2, "closed", "bob", 5),
        event(3, "reopened", "carol", 10),
    ]
    closed_again = fold([*history, event(4, "closed", "dave", 20)])
    twenty = T0 + timedelta(minutes=20)
    assert (closed_again["closed_by"], closed_again["closed_at"]) == ("dave", twenty)
    seen_closed = fold([*history, event(4, "update", "dave", 20, state="closed")])
    assert seen_closed["state"] == "closed"
    assert (seen_closed["closed_by"], seen_closed["closed_at"]) == (None, None)


def test_an_event_showing_the_mr_open_after_its_close_clears_the_close() -> None:
    """The reopen's webhook was lost, but a later event shows the MR open again."""
    row = fold(
        [
            event(1, "open", "alice", 0),
            event(2, "closed", "bob", 5),
            event(3, "update", "carol", 10),
        ]
    )
    assert (row["state"], row["closed_by"], row["closed_at"]) == ("opened", None, None)


def test_same_second_events_keep_arrival_order() -> None:
    row = fold([event(1, "approved", "bob", 10), event(2, "merged", "alice", 10)])
    assert row["decision"] == "merged"


def test_an_edit_showing_the_mr_open_goes_before_a_close_of_the_same_second() -> None:
    """GitLab's times are whole seconds and its hooks can arrive out of order. An edit
    whose payload still shows the MR open was made before a close stamped with the same
    second, whichever arrived first; applied after it, it left the MR open."""
    row = fold(
        [
            event(1, "open", "alice", 0),
            event(2, "closed", "bob", 5),
            event(3, "update", "carol", 5, title="Edited just before the close"),
        ]
    )
    assert (row["state"], row["closed_by"], row["decision"]) == ("closed", "bob", "closed")
    assert row["title"] == "Edited just before the close"


def test_an_approval_of_the_same_second_counts_before_a_merge_that_arrived_first() -> None:
    row = fold(
        [
            event(1, "open", "alice", 0),
            event(2, "merged", "carol", 5),
            event(3, "approved", "bob", 5),
        ]
    )
    assert (row["state"], row["decision"], row["decided_by"]) == ("merged", "merged", "carol")
    assert row["approvers"] == ["bob"]


def test_an_edit_made_while_the_merge_was_under_way_goes_before_the_merge() -> None:
    """GitLab shows an MR ``locked`` while it merges it: not merged yet."""
    row = fold(
        [
            event(1, "open", "alice", 0),
            event(2, "merged", "carol", 5),
            event(3, "update", "erin", 5, state="locked"),
        ]
    )
    assert (row["state"], row["merged_by"]) == ("merged", "carol")


def test_a_same_second_group_with_a_reopen_keeps_arrival_order() -> None:
    """With a reopen in the second, an edit showing the MR open may come after it: the
    events keep the order they arrived in."""
    row = fold(
        [
            event(1, "open", "alice", 0),
            event(2, "closed", "bob", 5),
            event(3, "reopened", "carol", 5),
            event(4, "closed", "dave", 5),
            event(5, "update", "erin", 5),
        ]
    )
    assert (row["state"], row["closed_by"]) == ("opened", None)


def test_an_edit_showing_the_mr_merged_stays_after_its_merge() -> None:
    row = fold(
        [
            event(1, "open", "alice", 0),
            event(2, "merged", "carol", 5),
            event(3, "update", "erin", 5, state="merged", security_labels=(), labels=()),
        ]
    )
    assert (row["state"], row["security_labels"]) == ("merged", [])


# No deadline: a loaded machine stalls one example past Hypothesis's 200 ms.
@settings(deadline=None)
@given(
    st.permutations(
        [
            ("update", "erin"),
            ("approved", "bob"),
            ("approved", "carol"),
            ("unapproved", "carol"),
            ("merged", "dave"),
        ]
    )
)
def test_within_one_second_the_fold_does_not_depend_on_when_the_merge_arrived(
    arrival: list[tuple[str, str]],
) -> None:
    """Events showing the MR open (an edit, approvals, a revocation) and its merge, all
    stamped with one second, in any order of arrival: the row is the one where the merge
    came last, the others keeping their own order."""
    kept = [item for item in arrival if item[0] != "merged"]
    expected = fold(
        [event(1, "open", "alice", 0)]
        + [event(seq, kind, actor, 5) for seq, (kind, actor) in enumerate(kept, 2)]
        + [event(len(arrival) + 1, "merged", "dave", 5)]
    )
    row = fold(
        [event(1, "open", "alice", 0)]
        + [event(seq, kind, actor, 5) for seq, (kind, actor) in enumerate(arrival, 2)]
    )
    expected.pop("last_seq")
    row.pop("last_seq")
    assert row == expected
    assert row["state"] == "merged"


def test_tier_and_labels_follow_the_latest_event_but_tier_survives_label_removal() -> None:
    row = fold(
        [
            event(1, "open", "alice", 0),
            event(2, "update", "erin", 5, tier="critical", security_labels=("sec::critical",)),
            event(3, "update", "erin", 9, tier="unclassified", security_labels=(), labels=()),
        ]
    )
    assert row["risk_tier"] == "critical"
    assert row["security_labels"] == []
    assert row["event_count"] == 3
    assert row["last_seq"] == 3


def test_an_undated_api_approval_comes_before_the_webhooks_merge_of_its_second() -> None:
    """The API's approval without a time is placed a microsecond before its merged_at
    (22:00:00.700); the webhook's merge reads 22:00:00, so the approval sorted after it."""
    merged_at = T0 + timedelta(hours=13)
    approval = event(
        3,
        "approved",
        "bob",
        0,
        event_at=merged_at + timedelta(microseconds=699_999),
        event_at_source=UNDATED_APPROVAL,
        source="api",
        state="merged",
    )
    merge = event(2, "merged", "carol", 0, event_at=merged_at)
    history = [event(1, "open", "alice", 0), merge, approval]
    assert [e.seq for e in ordered_facts(history)] == [1, 3, 2]
    row = fold(history)
    assert (row["decision"], row["decided_by"], row["approvers"]) == ("merged", "carol", ["bob"])


def test_a_dated_api_approval_comes_before_the_webhooks_merge_of_its_second() -> None:
    """Auto-merge right after the last approval: the API dates the approval 22:00:00.412,
    the webhook's merge reads 22:00:00. GitLab approves open MRs only, so the approval
    came first; after the merge it left the MR merged without a standing approval."""
    merged_at = T0 + timedelta(hours=13)
    approval = event(
        3,
        "approved",
        "bob",
        0,
        event_at=merged_at + timedelta(microseconds=412_000),
        event_at_source="api.approval",
        source="api",
        state=None,
    )
    merge = event(2, "merged", "carol", 0, event_at=merged_at)
    history = [event(1, "open", "alice", 0), merge, approval]
    assert [e.seq for e in ordered_facts(history)] == [1, 3, 2]
    row = fold(history)
    assert (row["decision"], row["decided_by"], row["approvers"]) == ("merged", "carol", ["bob"])


def test_removing_only_the_tier_label_keeps_the_tier() -> None:
    both = ("sec::critical", "sec/crypto")
    row = fold(
        [
            event(1, "open", "alice", 0, tier="critical", security_labels=both, labels=both),
            event(
                2,
                "update",
                "erin",
                5,
                tier="unclassified",
                tier_before="critical",
                security_labels=("sec/crypto",),
                labels=("sec/crypto",),
            ),
            event(3, "update", "erin", 9, tier="unclassified", security_labels=("sec/crypto",)),
        ]
    )
    assert row["risk_tier"] == "critical"
    # An MR that only ever carried a security label naming no tier is unclassified.
    only = ("sec/crypto",)
    first = event(1, "open", "alice", 0, tier="unclassified", security_labels=only, labels=only)
    assert fold([first])["risk_tier"] == "unclassified"
    # A tier label named later still sets the tier.
    named = event(2, "update", "erin", 5, tier="low", security_labels=("sec/crypto", "sec::low"))
    assert fold([first, named])["risk_tier"] == "low"


def test_a_decision_delivered_by_two_hooks_counts_once_and_the_first_copy_stands() -> None:
    """A system hook repeats a project hook's approval in other bytes: fewer fields
    (no reviewers), the time read from another field."""
    project_hook = event(2, "approved", "bob", 10, reviewers=("carol",))
    system_hook = event(
        3, "approved", "bob", 10, reviewers=(), event_at_source="changes.updated_at"
    )
    history = [
        event(1, "open", "alice", 0),
        project_hook,
        system_hook,
        event(4, "merged", "dave", 20),
    ]
    row = fold(history)
    assert row == fold([e for e in history if e is not system_hook])
    assert row["approvers"] == ["bob"]
    assert row["assigned_reviewers"] == ["carol"]
    assert row["event_count"] == 3
    assert row["last_seq"] == 4
    assert distinct_facts(history) == [e for e in history if e is not system_hook]
    assert distinct_facts(reversed(history)) == [
        e for e in reversed(history) if e is not system_hook
    ]


def test_the_same_decision_again_later_is_another_fact() -> None:
    row = fold(
        [
            event(1, "approved", "bob", 10),
            event(2, "unapproved", "bob", 11),
            event(3, "approved", "bob", 12),
            event(4, "approved", "carol", 12),
        ]
    )
    assert row["approvers"] == ["bob", "carol"]
    assert row["event_count"] == 4


def test_two_edits_by_one_user_in_one_second_are_two_events() -> None:
    """GitLab's times are whole seconds: events that are not decisions must agree on every
    fact to be one event."""
    label = {"security_added": ("sec::high",), "labeled_at": T0 + timedelta(minutes=10)}
    labelled = event(2, "update", "erin", 10, labeled_at_source="label_added", **label)
    assigned = event(3, "update", "erin", 10, reviewers=("bob",))
    repeated = replace(assigned, seq=4)
    repeated = replace(repeated, facts=replace(assigned.facts, source="replay"))
    opened = event(1, "open", "alice", 0, security_labels=(), labels=())
    row = fold([opened, labelled, assigned, repeated])
    assert row["event_count"] == 3
    assert row["assigned_reviewers"] == ["bob"]
    assert (row["labeled_at_source"], row["labeled_by"]) == ("label_added", "erin")


def added(seq: int, minutes: int, actor: str = "erin") -> SequencedEvent:
    """A webhook edit that adds ``sec::high`` (its ``changes.labels`` say so)."""
    at = T0 + timedelta(minutes=minutes)
    told = {"security_added": ("sec::high",), "labeled_at": at}
    return event(seq, "update", actor, minutes, labeled_at_source="label_added", **told)


def test_a_label_carried_before_the_first_told_addition_starts_the_clock_earlier() -> None:
    """An edit at 3 min already carries a security label (no ``changes.labels``: its
    addition was never delivered); a later addition must not start the clock after bob's
    review. The start falls back to the creation time, at or before the first sighting."""
    row = fold(
        [
            event(1, "update", "erin", 3),
            event(2, "approved", "bob", 4),
            added(3, 10),
        ]
    )
    assert (row["labeled_at"], row["labeled_at_source"]) == (T0, "created_at_fallback")
    assert row["labeled_by"] is None
    assert row["time_to_decision_seconds"] == 4 * 60


def test_a_removed_and_re_added_label_starts_at_its_first_addition() -> None:
    unlabelled = {"security_labels": (), "labels": ()}
    removed = event(3, "update", "erin", 8, security_removed=("sec::high",), **unlabelled)
    row = fold([event(1, "open", "alice", 0, **unlabelled), added(2, 5), removed, added(4, 12)])
    assert (row["labeled_at"], row["labeled_at_source"]) == (
        T0 + timedelta(minutes=5),
        "label_added",
    )
    assert row["labeled_by"] == "erin"


def test_a_removal_stored_before_it_told_its_tier_is_the_same_event() -> None:
    """Facts of one removal stored by an older version lack tier_before; a later copy from
    another hook has it. Still one event, whose tier the fold keeps."""
    removal = {"security_labels": (), "labels": (), "security_removed": ("sec::high",)}
    older = event(1, "update", "erin", 5, tier="unclassified", **removal)
    newer = replace(older, seq=2, facts=replace(older.facts, tier_before="high"))
    assert distinct_facts([older, newer]) == [older]
    assert fold([newer])["risk_tier"] == "high"


# No deadline: a loaded machine stalls one example past Hypothesis's 200 ms.
@settings(deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["open", "update", "approved", "unapproved", "merged"]),
            st.sampled_from(["bob", "carol"]),
            st.integers(0, 2),
            st.sampled_from([(), ("bob",), None]),
        ),
        max_size=8,
    )
)
def test_distinct_facts_keeps_the_first_copy_of_each_identity(
    drawn: list[tuple[str, str, int, tuple[str, ...] | None]],
) -> None:
    """Whatever the history: an event is kept unless an earlier kept one has its identity
    and, for other events than decisions, names the same reviewers or is named by a copy
    that tells none (a system hook's); a kept copy that told none takes those of the
    first later copy that does (the shortcut for histories without a shared kind, actor
    and time too)."""
    history = [
        event(seq, kind, actor, minutes, reviewers=reviewers)
        for seq, (kind, actor, minutes, reviewers) in enumerate(drawn, 1)
    ]
    expected: list[SequencedEvent] = []
    for item in history:
        facts = item.facts
        for i, kept in enumerate(expected):
            told = kept.facts.reviewers
            if fact_identity(kept.facts) != fact_identity(facts):
                continue
            differs = None not in (told, facts.reviewers) and told != facts.reviewers
            if facts.decision is None and differs:
                continue
            if told is None and facts.reviewers is not None:
                expected[i] = replace(kept, facts=replace(kept.facts, reviewers=facts.reviewers))
            break
        else:
            expected.append(item)
    assert distinct_facts(history) == expected


def test_a_system_hooks_copy_without_reviewers_is_the_same_event() -> None:
    """A label edit delivered by the project hook (reviewer bob) and by a system hook,
    whose payload names no reviewers: counted twice, and the later copy blanked the
    reviewers, whichever hook came first."""
    project = facts_of(mr_event("update", labels=["sec::high"], reviewers=["bob"]))
    system = replace(project, reviewers=None)
    assert replace(project, reviewers=()) != project  # (the identity once told them apart)
    for first, second in ((project, system), (system, project)):
        row = fold([SequencedEvent(1, first), SequencedEvent(2, second)])
        assert (row["event_count"], row["assigned_reviewers"]) == (1, ["bob"])
    # Two edits of one second that name different reviewers stay two.
    other = replace(project, reviewers=("carol",))
    assert len(distinct_facts([SequencedEvent(1, project), SequencedEvent(2, other)])) == 2
    # Events are told apart by position, not seq alone (no caller repeats a seq).
    twins = [SequencedEvent(1, project), SequencedEvent(1, other)]
    assert distinct_facts(twins) == twins


def test_a_label_ending_with_the_unclassified_name_does_not_name_a_tier() -> None:
    """``sec::unclassified`` names no tier: removing ``sec::critical`` beside it keeps
    the MR critical, as removing it beside ``sec/crypto`` does."""
    both = ("sec::critical", "sec::unclassified")
    rest = ("sec::unclassified",)
    removal = facts_of(
        mr_event("update", labels=list(rest), changes=label_change(list(both), list(rest), AT))
    )
    assert (removal.tier, removal.untiered) == ("unclassified", True)
    opened = facts_of(mr_event("open", labels=list(both)))
    assert fold([SequencedEvent(1, opened), SequencedEvent(2, removal)])["risk_tier"] == "critical"


def test_an_unclassified_bucket_named_after_a_tier_is_still_named_by_its_label() -> None:
    """SECLEDGER_UNCLASSIFIED_TIER=low: ``sec::low`` names the tier low, and moving an
    MR from critical to it lowers the tier; ``sec/crypto`` alone names none."""
    policy = LabelPolicy(unclassified="low")
    critical, low = ["sec::critical"], ["sec::low"]
    opened = facts_of(mr_event("open", labels=critical), policy)
    lowered = facts_of(
        mr_event("update", labels=low, changes=label_change(critical, low, AT)), policy
    )
    assert (lowered.tier, lowered.untiered) == ("low", False)
    assert fold([SequencedEvent(1, opened), SequencedEvent(2, lowered)])["risk_tier"] == "low"
    crypto = facts_of(mr_event("open", labels=["sec/crypto"]), policy)
    assert (crypto.tier, crypto.untiered) == ("low", True)


def test_a_tier_label_with_a_trailing_blank_names_its_tier() -> None:
    """``tier_of_label`` strips the blank; a later, lower tier label replaces the tier."""
    policy = LabelPolicy(patterns=("security/*",))
    high, low = ["security/HIGH "], ["security/LOW "]
    opened = facts_of(mr_event("open", labels=high), policy)
    lowered = facts_of(mr_event("update", labels=low, changes=label_change(high, low, AT)), policy)
    assert (opened.tier, lowered.tier) == ("high", "low")
    assert fold([SequencedEvent(1, opened), SequencedEvent(2, lowered)])["risk_tier"] == "low"


@pytest.mark.parametrize("anchor", [r"\Z", r"\z"])
def test_tier_labels_name_their_tier_whichever_anchor_fnmatch_ends_with(
    monkeypatch: pytest.MonkeyPatch, anchor: str
) -> None:
    """Python 3.14's ``fnmatch.translate`` ends with ``\\z`` where 3.11-3.13's end with
    ``\\Z``: left in the tail's regex, it matched no label, and every MR was unclassified."""
    translate = fnmatch.translate
    monkeypatch.setattr(
        fnmatch, "translate", lambda pattern: translate(pattern).removesuffix(r"\Z") + anchor
    )
    policy = LabelPolicy(patterns=("sec::*",))
    assert [policy.tier_of_label(t) for t in ("sec::high", "sec::LOW")] == ["high", "low"]


def test_an_fnmatch_without_a_known_end_anchor_fails_loudly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    translate = fnmatch.translate
    monkeypatch.setattr(fnmatch, "translate", lambda pattern: translate(pattern) + "$")
    with pytest.raises(RuntimeError, match=r"unexpected fnmatch\.translate output"):
        LabelPolicy(patterns=("sec::*",))


def test_a_reset_ends_a_nameless_approval_for_an_undated_api_one() -> None:
    """With neither the webhook's approval nor the API's naming a user, the standing check
    returned at once and skipped the reset a push made between them, which
    ``copies.api_twin`` counts: the API's approval was dropped in the fold and kept in
    SQL."""
    from secledger.extract import APPROVALS_RESET  # noqa: PLC0415
    from secledger.projection import merge_sources  # noqa: PLC0415

    approval = event(1, "approved", None, 0)  # type: ignore[arg-type]
    reset = event(2, APPROVALS_RESET, "alice", 5)
    api = event(3, "approved", None, 60, source="api", event_at_source=UNDATED_APPROVAL)  # type: ignore[arg-type]
    assert [e.seq for e in merge_sources([approval, reset, api])] == [1, 2, 3]
    # Without the reset, the undated approval is the standing one's copy.
    assert [e.seq for e in merge_sources([approval, api])] == [1]
