"""The ledger row of one merge request, folded from its events. Pure: no I/O.

The same fold serves live recording and ``rebuild``, so the ledger can always be
recomputed from the log. Events are applied in event-time order (arrival order breaks
ties, but for events that show the MR still open beside its close or merge: see
``open_before_end``), which is why a late, older delivery can never roll a row back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields, replace
from datetime import datetime, timedelta
from operator import attrgetter
from typing import Any

from secledger.extract import APPROVALS_RESET, CODE_OWNER_RESET, EventFacts
from secledger.quickinit import quick

# Webhook times are MR updated_at with second precision; the API has the fact's own
# time in milliseconds. The two clocks differ by well under this for one action.
MATCH_TOLERANCE = timedelta(seconds=5)
API_LABEL_KINDS = frozenset({"label_added", "label_removed"})
# ``event_at_source`` of an approval told by the API: dated by its approved_at, or not.
API_APPROVAL = "api.approval"
UNDATED_APPROVAL = "api.approval_upper_bound"
# A webhook's event time read from the MR's last save (``extract.event_stamps``): for an
# approval, no later than when it was given (GitLab does not save the MR to approve).
SAVED_TIMES = ("changes.updated_at", "object_attributes.updated_at")
DECISION_KINDS = frozenset({"approved", "unapproved", "merged", "closed", "reopened"})
# Approvals GitLab withdrew after a push: no one's decision, but one event per push.
RESET_KINDS = frozenset({APPROVALS_RESET, CODE_OWNER_RESET})
# Kinds that end an MR's review, and the states an MR is in before one of them.
_ENDS = frozenset({"merged", "closed"})
_STILL_OPEN = frozenset({"opened", "locked"})
# Approvals told by the API, which carry no state: always given while the MR was open.
_API_APPROVALS = frozenset({UNDATED_APPROVAL, API_APPROVAL})
# The state an event of this kind leaves an MR in, for events that carry none of their own.
STATE_AFTER = {"merged": "merged", "closed": "closed", "reopened": "opened", "open": "opened"}

LEDGER_COLUMNS = (
    "instance",
    "project_id",
    "mr_iid",
    "mr_id",
    "project_path",
    "title",
    "url",
    "author_id",
    "risk_tier",
    "security_labels",
    "state",
    "decision",
    "decided_by",
    "decided_at",
    "reviewer",
    "approvers",
    "assigned_reviewers",
    "labeled_at",
    "labeled_at_source",
    "labeled_by",
    "time_to_decision_seconds",
    "merged_by",
    "merged_at",
    "closed_by",
    "closed_at",
    "last_event_at",
    "last_seq",
    "event_count",
)


@quick
@dataclass(frozen=True)
class SequencedEvent:
    """An event with its position in the log."""

    seq: int
    facts: EventFacts


def _order(event: SequencedEvent) -> tuple[datetime, int]:
    return event.facts.event_at, event.seq


def _label_start(events: list[SequencedEvent]) -> tuple[datetime | None, str | None, str | None]:
    """The first time a security label was applied, where that came from, and by whom."""
    added = [e.facts for e in events if e.facts.labeled_at is not None]
    first: EventFacts | None = min(added, key=attrgetter("labeled_at"), default=None)
    created = [e.facts.created_at for e in events if e.facts.created_at is not None]
    start = first.labeled_at if first is not None else None
    if first is not None and start is not None:
        earlier = _carried_before(first) or _shown_before(start, events)
        # Without a creation time to fall back on, a late start is better than no clock.
        if not (created and earlier):
            by = first.actor if first.labeled_at_source in {"label_added", "api"} else None
            return start, first.labeled_at_source, by
    if created:
        return min(created), "created_at_fallback", None
    return None, None, None


def _carried_before(facts: EventFacts) -> bool:
    # A webhook's label change whose labels before it already held a security label (a
    # tier change, a second security label) is not the first labelling: that one was
    # never delivered, or came before the hook existed.
    if facts.labeled_at_source != "label_added":
        return False
    kept = any(label not in facts.security_added for label in facts.security_labels)
    return kept or bool(facts.security_removed)


def _shown_before(labeled_at: datetime, events: list[SequencedEvent]) -> bool:
    # An event that already carried (or removed) a security label before the first add
    # told proves an earlier add no delivery told: starting the clock at the later add
    # would ignore every review given in between. The tolerance covers an API add
    # (milliseconds) that a webhook (whole seconds) shows in the same second.
    shown = [e.facts.event_at for e in events if _shows_security_label(e.facts)]
    return bool(shown) and labeled_at > min(shown) + MATCH_TOLERANCE


def _shows_security_label(facts: EventFacts) -> bool:
    return _carries_labels(facts) and bool(facts.security_labels or facts.security_removed)


def _close(a: datetime, b: datetime) -> bool:
    return abs(a - b) <= MATCH_TOLERANCE


def _same_decision(api: EventFacts, other: EventFacts) -> bool:
    if other.decision != api.decision:
        return False
    if api.event_at_source == UNDATED_APPROVAL:  # an earlier approval (``_standing`` too)
        return other.event_at <= api.event_at
    return _close(api.event_at, other.event_at) or _told_early(api, other)


def _told_early(api: EventFacts, other: EventFacts) -> bool:
    """``other``, an approval a webhook dated by the MR's last save (a GitLab that sends
    no ``actioned_at``), was given at that time or after: the API's own time for it
    (``approved_at``) can be hours later. Matched when earlier than the API's time by
    more than the tolerance (closer ones match anyway), and only while it still stands
    then (``_tells``): an approval revoked by then is not the one the API lists."""
    return (
        api.event_at_source != UNDATED_APPROVAL
        and other.decision == "approved"
        and other.event_at_source in SAVED_TIMES
        and other.event_at < api.event_at - MATCH_TOLERANCE
        and same_user(api, other) is True
    )


def _repeat(event: SequencedEvent, told: list[SequencedEvent]) -> bool:
    """``event`` repeats an earlier one at its time, which ``distinct_facts`` keeps
    instead (``copies.REPEATED``): no twin of an API fact, which would then count for
    neither."""
    return any(t.seq < event.seq and _brief(t.facts) == _brief(event.facts) for t in told)


def _early_twin(api: EventFacts, other: SequencedEvent, told: list[SequencedEvent]) -> bool:
    """``_told_early``'s approval is the API's: counted by the fold (not a repeat of an
    earlier one at its time, which ``distinct_facts`` drops: an approval given again
    after a revocation, all dated by one save), no save between the two times (an
    approval after it would carry that save's time), and still standing then."""
    facts = other.facts
    saved = any(
        t.facts.event_at_source in SAVED_TIMES
        and facts.event_at < t.facts.event_at < api.event_at - MATCH_TOLERANCE
        for t in told
    )
    return not _repeat(other, told) and not saved and _standing(api, other, told)


def same_user(a: EventFacts, b: EventFacts) -> bool | None:
    """Whether two facts name one GitLab user: by id when both carry one (a username
    can change, and the API tells the name a user has now, a webhook the name they had
    then), else by name; None when either names nobody."""
    if a.actor_id is not None and b.actor_id is not None:
        return a.actor_id == b.actor_id
    if not a.actor or not b.actor:
        return None
    return a.actor == b.actor


def _standing(api: EventFacts, approval: SequencedEvent, told: list[SequencedEvent]) -> bool:
    """``approval`` still stands at the API approval's time (an undated one's bound):
    its user did not revoke it, nor did a push reset approvals, before then (in
    event-time order, then log seq), so the API's approval can be that one."""
    named = approval.facts.actor or approval.facts.actor_id is not None
    user = approval.facts if named else api
    # A nameless one is revoked by nobody's revocation (``same_user`` is not True), but
    # a push's reset still ends it (``copies._revoked`` alike).
    return not any(
        (
            t.facts.kind == APPROVALS_RESET
            or (t.facts.decision == "unapproved" and same_user(t.facts, user) is True)
        )
        and _order(approval) < _order(t)
        and t.facts.event_at <= api.event_at
        for t in told
    )


def _tells(api: EventFacts, other: SequencedEvent, told: list[SequencedEvent]) -> bool:
    if not same_fact(api, other.facts):
        return False
    # The API lists standing approvals only: one without a time (or one matched to an
    # approval dated earlier, by the MR's last save) is never a copy of an approval
    # revoked before its time, but of one given again after that revocation.
    if api.event_at_source == UNDATED_APPROVAL:
        return not _repeat(other, told) and _standing(api, other, told)
    if _told_early(api, other.facts):
        return _early_twin(api, other, told)
    return True


def _same_label_change(api: EventFacts, other: EventFacts) -> bool:
    if api.security_added:
        label = api.security_added[0]
        opened_with = other.kind == "open" and label in other.security_labels
        told = label in other.security_added or opened_with
        return told and _close(api.event_at, other.labeled_at or other.event_at)
    if api.security_removed:
        told = api.security_removed[0] in other.security_removed
        return told and _close(api.event_at, other.event_at)
    return False


def same_fact(api: EventFacts, other: EventFacts) -> bool:
    """True when a webhook (or replayed) event may tell what an API fact tells.

    Enough for every fact but an API approval without a time, which ``merge_sources``
    matches only to an approval still standing at its bound.
    """
    if same_user(api, other) is False:
        return False
    if api.decision is not None:
        return _same_decision(api, other)
    return api.kind in API_LABEL_KINDS and _same_label_change(api, other)


def merge_sources(events: list[SequencedEvent]) -> list[SequencedEvent]:
    """Drop API facts that a webhook event already tells, so either way counts once.

    An API approval without a time tells an earlier approval by the same user only if
    that approval still stands at the API fact's bound: the API lists standing approvals,
    so when the user revoked it by then, the API's is a later approval no webhook told.

    Does not depend on when the API facts were logged, so backfill before or after the
    webhooks folds to the same row (an approval and its revocation in one second keep
    their arrival order, as in the fold). ``copies.api_twin`` is the same rule for
    decisions, in SQL: a change here needs one there, and a migration.
    """
    told = [e for e in events if e.facts.source != "api"]
    return [
        e
        for e in events
        if e.facts.source != "api" or not any(_tells(e.facts, other, told) for other in told)
    ]


# Where a fact was read from, not what it says: a system hook and a project hook may
# spell one event differently (the time in another field).
_PROVENANCE = frozenset({"event_at_source", "source", "extra"})
# Compared apart: a system hook tells no reviewers (None), which agrees with any.
_REVIEWERS = frozenset({"reviewers"})
# Follows from the labels and the labels removed, and copies stored before it was
# extracted lack it: one event recorded before and after that must stay one event.
_DERIVED = frozenset({"tier_before", "untiered"})
# attrgetter builds the tuple in C: this runs for every event of an MR at each fold.
_TOLD = attrgetter(
    *(f.name for f in fields(EventFacts) if f.name not in _PROVENANCE | _DERIVED | _REVIEWERS)
)


def fact_identity(facts: EventFacts) -> tuple[object, ...]:
    """What one GitLab event tells, whichever hook delivered it.

    A decision is who decided what, and when (``copies.REPEATED`` is the same rule in
    SQL); so is an approval reset, told by whose push and when. Any other event must agree
    on every fact (reviewers aside, which ``distinct_facts`` compares): GitLab's times are
    whole seconds, and two edits by one user within a second may differ in what they
    change.
    """
    if facts.decision is not None or facts.kind in RESET_KINDS:
        return facts.kind, facts.decision, facts.actor, facts.event_at
    told: tuple[object, ...] = _TOLD(facts)
    return told


def _brief(facts: EventFacts) -> tuple[object, ...]:
    return facts.kind, facts.decision, facts.actor, facts.event_at


def distinct_facts(events: Iterable[SequencedEvent]) -> list[SequencedEvent]:
    """Drop each event that repeats an earlier one (lower seq) of the same MR.

    A system hook repeats what a project or group hook delivered, in a body that is not
    byte for byte the same (identical bodies are never logged twice). The first delivery
    stands for the event, so every later copy counts for nothing.
    """
    events = list(events)
    # Every identity starts with what this key holds (a decision's identity is this key):
    # when no two events share it, none repeats another, and no identity need be built.
    if len({_brief(event.facts) for event in events}) == len(events):
        return events
    standing: dict[tuple[object, ...], list[int]] = {}
    kept: dict[int, SequencedEvent] = {}  # by position, each with the reviewers a copy told
    for i in sorted(range(len(events)), key=lambda i: events[i].seq):
        facts = events[i].facts
        same = standing.setdefault(fact_identity(facts), [])
        first = next((j for j in same if _agree(facts, kept[j].facts)), None)
        if first is None:
            same.append(i)
            kept[i] = events[i]
        elif kept[first].facts.reviewers is None and facts.reviewers is not None:
            # The first copy came from a system hook: a later one names the reviewers.
            told = replace(kept[first].facts, reviewers=facts.reviewers)
            kept[first] = SequencedEvent(kept[first].seq, told)
    return [kept[i] for i in range(len(events)) if i in kept]


def _agree(facts: EventFacts, other: EventFacts) -> bool:
    """Whether two events of one identity tell the same reviewers, as far as both tell
    (a decision is who decided what, and when, whatever reviewers its copies name)."""
    if facts.decision is not None or facts.kind in RESET_KINDS:
        return True
    return facts.reviewers is None or other.reviewers is None or facts.reviewers == other.reviewers


def _carries_labels(facts: EventFacts) -> bool:
    # API state and approval facts do not know the label set; API label facts do.
    return facts.source != "api" or facts.kind in API_LABEL_KINDS


def ordered_facts(events: list[SequencedEvent]) -> list[SequencedEvent]:
    """The events a fold (and the findings rules) read: API facts a webhook event tells
    and repeats dropped, in event-time order."""
    ordered = sorted(distinct_facts(merge_sources(events)), key=_order)
    if len({_second(event) for event in ordered}) == len(ordered):
        return ordered  # no two events share a second: nothing to settle
    return open_before_end(ordered)


def _second(event: SequencedEvent) -> datetime:
    # Webhook times are whole seconds; the API's carry milliseconds.
    return event.facts.event_at.replace(microsecond=0)


def open_before_end(ordered: list[SequencedEvent]) -> list[SequencedEvent]:
    """``ordered`` with, among events of one second, those that show the MR still open
    moved before the close or merge of that second.

    GitLab's webhook times are whole seconds and its hooks can arrive in any order. An
    edit, approval or revocation whose payload shows the MR open was made before a close
    or merge stamped with the same second: applied after it, an edit reopened the MR in
    the ledger and an approval came too late for the merge. A second that also holds a
    reopen keeps arrival order: an event showing the MR open may then follow either.

    An approval the API gives no time is placed just before the merge or close the API
    told (``apifacts.approval_bound``), to the millisecond; the webhook's merge of that
    second, stamped at the second's start, came before it, and the approval counted as
    given after the merge. It goes before the end of its second too, and so does one
    the API dates (``approved_at`` has milliseconds): GitLab approves open MRs only.
    """
    settled: list[SequencedEvent] = []
    start = 0
    for end in range(1, len(ordered) + 1):
        if end == len(ordered) or _second(ordered[end]) != _second(ordered[start]):
            settled.extend(_open_first(ordered[start:end]))
            start = end
    return settled


def _open_first(group: list[SequencedEvent]) -> list[SequencedEvent]:
    kinds = {event.facts.kind for event in group}
    if len(group) < 2 or "reopened" in kinds or not kinds & _ENDS:
        return group
    first_end = next(i for i, event in enumerate(group) if event.facts.kind in _ENDS)
    after = group[first_end:]
    moved = [event for event in after if _before_the_end(event.facts)]
    if not moved:
        return group
    kept = [event for event in after if not _before_the_end(event.facts)]
    return group[:first_end] + moved + kept


def _before_the_end(facts: EventFacts) -> bool:
    return _shows_open(facts) or facts.event_at_source in _API_APPROVALS


def _shows_open(facts: EventFacts) -> bool:
    # "locked" is GitLab's state while a merge is under way: the MR is not merged yet.
    state = facts.state or STATE_AFTER.get(facts.kind)
    return facts.kind not in _ENDS and state in _STILL_OPEN


def fold(events: Iterable[SequencedEvent]) -> dict[str, Any]:
    """Compute one ledger row from every event of one merge request."""
    return fold_read(list(events))[0]


def fold_read(every: list[SequencedEvent]) -> tuple[dict[str, Any], list[SequencedEvent]]:
    """``fold`` of ``every``, and the events it read (``ordered_facts``)."""
    if not every:
        raise ValueError("fold needs at least one event")
    ordered = ordered_facts(every)
    row: dict[str, Any] = dict.fromkeys(LEDGER_COLUMNS)
    approvals: list[EventFacts] = []  # standing, in the order given
    for event in ordered:
        facts = event.facts
        for name in ("mr_id", "project_path", "title", "url", "author_id"):
            value = getattr(facts, name)
            if value is not None:
                row[name] = value
        if _carries_labels(facts):
            row["security_labels"] = list(facts.security_labels)
        if facts.reviewers is not None:
            row["assigned_reviewers"] = list(facts.reviewers)
        if facts.state is not None:
            row["state"] = facts.state
        elif facts.kind in STATE_AFTER:
            row["state"] = STATE_AFTER[facts.kind]
        _apply_decision(row, approvals, facts)
        if row["state"] != "closed":  # reopened since, told or not: that close was undone
            row.update(closed_by=None, closed_at=None)
    first = ordered[0].facts
    row.update(instance=first.instance, project_id=first.project_id, mr_iid=first.mr_iid)
    tiers = tier_changes(ordered)
    row["risk_tier"] = tiers[-1][1] if tiers else first.tier
    row["security_labels"] = row["security_labels"] or []
    row["assigned_reviewers"] = row["assigned_reviewers"] or []
    approvers = [str(approval.actor) for approval in approvals]
    row["approvers"] = approvers
    row["reviewer"] = approvers[-1] if approvers else row["decided_by"]
    labeled_at, source, labeled_by = _label_start(ordered)
    row.update(labeled_at=labeled_at, labeled_at_source=source, labeled_by=labeled_by)
    if row["decided_at"] is not None and labeled_at is not None:
        row["time_to_decision_seconds"] = (row["decided_at"] - labeled_at).total_seconds()
    row["last_event_at"] = ordered[-1].facts.event_at
    row["last_seq"] = max(e.seq for e in every)
    row["event_count"] = len(ordered)
    return row, ordered


def tier_changes(
    ordered: Iterable[SequencedEvent], outranks: Callable[[str, str], bool] | None = None
) -> list[tuple[datetime, str]]:
    """(from when, tier) each time the MR's tier changes over ``ordered``
    (``ordered_facts``): the tier of the latest event with a security label, or of the
    labels a removal took away. Once the MR merged with a tier, that tier stays: a
    relabel after the merge cannot change what the merge is judged by. Without a merge
    event, the first event that finds the MR merged after one found it open ends it
    likewise, before its own labels (an MR first seen merged was labelled after its
    merge, and its labels may still be corrected).

    With ``outranks`` (is the first tier higher than the second), a change whose
    removed labels name a tier no event told before shows that tier held before it (the
    change that set it was never delivered): from the previous event, since that one
    showed another, or from the start when none came earlier. Only a tier above every
    one shown before counts: GitLab's previous labels are sometimes stale (after a
    rebase), and a stale one would name a tier already left.
    """
    changes: list[tuple[datetime, str]] = []
    tier: str | None = None
    shown: set[str] = set()
    merged_under = False
    seen_open = False
    previous: datetime | None = None
    for event in ordered:
        facts = event.facts
        state = facts.state or STATE_AFTER.get(facts.kind)
        if seen_open and tier is not None and state == "merged":
            # Found merged after it was seen open, with no merge event before (its webhook
            # lost): the merge came before this event, and so did the tier it merged
            # under; this event's labels were set after it.
            merged_under = True
        if not merged_under:
            before = facts.tier_before
            if outranks and before is not None and _untold_above(before, shown, outranks):
                start = previous if tier is not None and previous else facts.event_at
                changes.append((start, before))
                tier = before
                shown.add(before)
            after = _tier_after(tier, facts)
            if after is not None and after != tier:
                changes.append((facts.event_at, after))
                tier = after
                shown.add(after)
        merged_under = merged_under or (facts.decision == "merged" and tier is not None)
        seen_open = seen_open or state not in {None, "merged", "closed"}
        previous = facts.event_at
    return changes


def _untold_above(tier: str, shown: set[str], outranks: Callable[[str, str], bool]) -> bool:
    """``tier`` was named by no event so far and is above every tier one named."""
    return tier not in shown and all(outranks(tier, t) for t in shown)


def _tier_after(tier: str | None, facts: EventFacts) -> str | None:
    if facts.security_labels and (tier is None or _names_its_tier(facts)):
        return facts.tier
    if facts.tier_before is not None:
        return facts.tier_before  # the labels a removal took away named it
    return tier


def _names_its_tier(facts: EventFacts) -> bool:
    """Whether a current security label names ``facts.tier``; else the tier is the
    unclassified bucket. Removing the tier's label while another security label stays
    (``sec/crypto``) keeps the tier, as removing every security label does: it had
    made a critical MR unclassified, and one approval enough."""
    if facts.untiered:
        return False
    # A label naming a tier ends with its name, blanks aside (``LabelPolicy.tier_of_label``).
    # Only facts stored before ``untiered`` existed can have an unclassified tier here,
    # when a label ends with the bucket's name.
    wanted = facts.tier.lower()
    return any(label.lower().rstrip().endswith(wanted) for label in facts.security_labels)


def _apply_decision(row: dict[str, Any], approvals: list[EventFacts], facts: EventFacts) -> None:
    if facts.kind == APPROVALS_RESET:
        approvals.clear()  # nobody's decision: ``decision`` keeps the last one made
        return
    decision = facts.decision
    if decision not in DECISION_KINDS:
        return
    row.update(decision=decision, decided_by=facts.actor, decided_at=facts.event_at)
    actor = facts.actor
    if decision == "approved" and actor and _given_by(approvals, facts) is None:
        approvals.append(facts)
    elif decision == "unapproved":
        given = _given_by(approvals, facts)
        if given is not None:
            del approvals[given]  # listed under the name they had then, if renamed since
    elif decision == "merged":
        row.update(merged_by=actor, merged_at=facts.event_at)
    elif decision == "closed":
        row.update(closed_by=actor, closed_at=facts.event_at)


def _given_by(approvals: list[EventFacts], facts: EventFacts) -> int | None:
    """Where in ``approvals`` the user of ``facts`` stands (``same_approver``), if they do."""
    return next((i for i, given in enumerate(approvals) if same_approver(given, facts)), None)


def same_approver(a: EventFacts, b: EventFacts) -> bool:
    """Whether an approval and a later decision are one user's, as the fold and the rules
    read standing approvals: ``same_user``, and facts naming nobody are one unknown user."""
    same = same_user(a, b)
    return (a.actor or "") == (b.actor or "") if same is None else same
