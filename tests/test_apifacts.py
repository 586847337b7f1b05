"""API facts: envelopes, dedup keys, extraction, the log decoder, and the fold's merge. Pure."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime, timedelta

from apistory import Story
from builders import label_change, mr_event, sample
from secledger import apifacts
from secledger.extract import extract_facts
from secledger.intake import parse_delivery
from secledger.policy import LabelPolicy
from secledger.projection import SequencedEvent, fold, merge_sources, same_fact
from secledger.rebuild import LoggedRow, facts_of

POLICY = LabelPolicy()
INSTANCE = "https://gitlab.example.com"


def webhook_facts(body):
    headers = {"x-gitlab-event": "Merge Request Hook", "x-gitlab-instance": INSTANCE}
    delivery = parse_delivery(
        headers,
        json.dumps(body).encode(),
        secrets=(),
        max_body_bytes=1 << 20,
        received_at=datetime(2025, 8, 5, tzinfo=UTC),
        require_token=False,
    )
    return extract_facts(delivery, POLICY)


def api_facts(story: Story):
    mr = story.mr()
    envelopes = apifacts.label_envelopes(mr, story.label_events(), POLICY)
    envelopes += apifacts.state_envelopes(mr, story.state_events())
    envelopes += apifacts.approval_envelopes(mr, {"approved_by": story.approved_by()})
    return envelopes, [apifacts.facts(INSTANCE, env, POLICY) for env in envelopes]


def test_published_label_events_sample_keeps_only_security_labels() -> None:
    events = sample("api_mr_resource_label_events.json")
    mr = Story(iid=28).mr()
    assert apifacts.label_envelopes(mr, events, POLICY) == []
    events[1]["label"]["name"] = "sec/critical"
    [env] = apifacts.label_envelopes(mr, events, POLICY)
    assert env["labels_after"] == ["p1", "sec/critical"]
    facts = apifacts.facts(INSTANCE, env, POLICY)
    assert (facts.kind, facts.actor, facts.tier) == ("label_added", "root", "critical")
    assert facts.labeled_at == datetime(2018, 8, 20, 6, 17, 28, 394000, tzinfo=UTC)
    assert apifacts.dedup_key(INSTANCE, env) == f"api:{INSTANCE}:14:28:label_event:120"


def test_published_approvals_sample_without_approved_at_is_placed_before_the_merge() -> None:
    approvals = sample("api_mr_approvals.json")
    mr = Story(iid=5).mr()
    [env] = apifacts.approval_envelopes(mr, approvals)
    facts = apifacts.facts(INSTANCE, env, POLICY)
    merged_at = datetime(2025, 8, 5, 21, 48, 25, 394000, tzinfo=UTC)
    assert facts.event_at == merged_at - timedelta(microseconds=1)
    assert facts.event_at_source == apifacts.UNDATED_APPROVAL
    assert apifacts.dedup_key(INSTANCE, env).endswith(":approval:1:undated")


def test_an_undated_approvals_bound_is_the_mrs_update_as_of_the_approvals_read() -> None:
    """A large group's listing is read long before each MR's approvals: an approval given
    in between was dated at the listing's updated_at, before it happened (its webhook
    then no longer matched it, and it counted twice, once at the label time)."""
    listed = Story(iid=5, decision=None).mr() | {"updated_at": "2025-08-05T20:00:00.000Z"}
    approvals = {
        "updated_at": "2025-08-05T21:00:00.250Z",
        "approved_by": [{"user": {"id": 102, "username": "bob"}}],
    }
    [env] = apifacts.approval_envelopes(listed, approvals)
    assert env["upper_bound"] == "2025-08-05T21:00:00.250Z"
    older = approvals | {"updated_at": "2025-08-05T19:00:00.000Z"}  # never before the listing
    [env] = apifacts.approval_envelopes(listed, older)
    assert env["upper_bound"] == "2025-08-05T20:00:00.000Z"
    [env] = apifacts.approval_envelopes(Story(iid=5).mr(), approvals)  # merged: before it
    assert env["upper_bound"] == "2025-08-05T21:48:25.393999Z"


def test_an_undated_approval_after_a_revocation_has_a_key_of_its_own() -> None:
    """The revocation it follows names it; a dated approval is named by its time alone."""
    approvals = sample("api_mr_approvals.json")
    [env] = apifacts.approval_envelopes(Story(iid=5).mr(), approvals)
    assert apifacts.undated_approver(env) is not None
    assert apifacts.after_revocation(env, None) is env
    marked = apifacts.after_revocation(env, 42)
    assert apifacts.dedup_key(INSTANCE, marked).endswith(":approval:1:undated:after:42")
    received = datetime(2025, 8, 6, tzinfo=UTC)
    assert b'"after_revocation":42' in apifacts.delivery(INSTANCE, marked, received).body
    dated = marked | {"event": env["event"] | {"approved_at": "2025-08-05T21:00:00.000Z"}}
    assert apifacts.undated_approver(dated) is None
    assert apifacts.dedup_key(INSTANCE, dated).endswith(":approval:1:2025-08-05T21:00:00.000Z")


def test_the_same_history_gives_the_same_dedup_keys() -> None:
    first, _ = api_facts(Story(iid=1))
    second, _ = api_facts(Story(iid=1))
    keys = [apifacts.dedup_key(INSTANCE, e) for e in first]
    assert keys == [apifacts.dedup_key(INSTANCE, e) for e in second]
    assert len(set(keys)) == len(keys)


def test_log_decoder_reads_api_and_webhook_rows_back() -> None:
    envelopes, facts = api_facts(Story(iid=1))
    delivery = apifacts.delivery(INSTANCE, envelopes[0], datetime(2025, 9, 1, tzinfo=UTC))
    row = LoggedRow(
        seq=1,
        received_at=delivery.received_at,
        source=delivery.source,
        event=delivery.event,
        instance=delivery.instance,
        dedup_key=delivery.dedup_key,
        headers=delivery.headers,
        payload=delivery.body,
    )
    assert facts_of(row, POLICY) == facts[0]
    body = mr_event("approved", actor="bob")
    hook_row = dataclasses.replace(
        row,
        source="webhook",
        event="Merge Request Hook",
        headers={"x-gitlab-event": "Merge Request Hook"},
        payload=json.dumps(body).encode(),
    )
    assert facts_of(hook_row, POLICY) == webhook_facts(body)


def test_api_fact_matches_the_webhook_that_told_it() -> None:
    story = Story(iid=1)
    hooks = [webhook_facts(b) for b in story.webhooks()]
    _, api = api_facts(story)
    assert [any(same_fact(a, h) for h in hooks) for a in api] == [True, True, True]


def test_api_fact_by_another_actor_or_later_is_a_different_fact() -> None:
    story = Story(iid=1)
    hooks = [webhook_facts(b) for b in story.webhooks()]
    other = Story(iid=1, approvals=[("dave", "2025-08-05 21:00:00 UTC")])
    _, [_, _, dave] = api_facts(other)
    assert not any(same_fact(dave, h) for h in hooks)
    later = Story(iid=1, approvals=[("bob", "2025-08-05 21:00:09 UTC")])
    _, [_, _, late_bob] = api_facts(later)
    assert not any(same_fact(late_bob, h) for h in hooks)


def test_tier_change_matches_both_label_events() -> None:
    story = Story(iid=3, relabel=("sec::critical", "erin", "2025-08-05 20:30:00 UTC"))
    hooks = [webhook_facts(b) for b in story.webhooks()]
    _, api = api_facts(story)
    label_facts = [a for a in api if a.kind in {"label_added", "label_removed"}]
    assert len(label_facts) == 3
    assert all(any(same_fact(a, h) for h in hooks) for a in label_facts)


def test_an_api_removal_seen_first_tells_the_tier_it_lowered() -> None:
    story = Story(iid=3, relabel=("sec::critical", "erin", "2025-08-05 20:30:00 UTC"))
    removal, added = story.label_events()[1:]  # the addition at creation is not listed
    envelopes = apifacts.label_envelopes(story.mr(), [removal, added], POLICY)
    first, then = (apifacts.facts(INSTANCE, env, POLICY) for env in envelopes)
    assert (first.kind, first.security_labels, first.tier_before) == ("label_removed", (), "high")
    assert (then.kind, then.tier_before) == ("label_added", None)


def test_merge_does_not_depend_on_log_order() -> None:
    story = Story(iid=1)
    hooks = [webhook_facts(b) for b in story.webhooks()]
    _, api = api_facts(story)
    api_first = [SequencedEvent(i + 1, f) for i, f in enumerate(api + hooks)]
    hooks_first = [SequencedEvent(i + 1, f) for i, f in enumerate(hooks + api)]
    assert fold(api_first) == fold(hooks_first)
    assert [e.facts for e in merge_sources(api_first)] == hooks


def test_api_label_facts_set_labels_and_api_decisions_leave_them() -> None:
    """An API label fact knows the label set; API approvals and merges do not touch it."""
    change = label_change([], ["sec::low"], "2025-08-05 20:10:00 UTC")
    body = mr_event("update", labels=["sec::low"], changes=change)
    story = Story(iid=1, relabel=("sec::critical", "erin", "2025-08-05 20:30:00 UTC"))
    _, api = api_facts(story)
    events = [SequencedEvent(1, webhook_facts(body))]
    events += [SequencedEvent(i + 2, f) for i, f in enumerate(api)]
    row = fold(events)
    assert (row["security_labels"], row["risk_tier"]) == (["sec::critical"], "critical")
    assert (row["decision"], row["approvers"]) == ("merged", ["bob"])


def test_an_api_label_event_tells_when_the_security_labels_name_no_tier() -> None:
    """As extraction tells it for a webhook: the fold keeps the tier an earlier label
    named when only ``sec::unclassified`` (or ``sec/crypto``) is left."""

    def event(number: int, action: str, name: str) -> dict:
        return {
            "id": number,
            "action": action,
            "label": {"id": number, "name": name},
            "created_at": f"2025-08-05T20:1{number}:00.000Z",
            "user": {"id": 5, "username": "erin"},
        }

    events = [
        event(1, "add", "sec::critical"),
        event(2, "add", "sec::unclassified"),
        event(3, "remove", "sec::critical"),
    ]
    envelopes = apifacts.label_envelopes(Story(iid=1).mr(), events, POLICY)
    facts = [apifacts.facts(INSTANCE, env, POLICY) for env in envelopes]
    assert [f.untiered for f in facts] == [False, False, True]
    assert (facts[-1].tier, facts[-1].tier_before) == ("unclassified", "critical")
    row = fold([SequencedEvent(i, f) for i, f in enumerate(facts, 1)])
    assert row["risk_tier"] == "critical"
