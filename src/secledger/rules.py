"""Separation-of-duties rules over one merge request's history. Pure: no I/O.

A rule is a small function registered with :func:`rule`; it reads the MR's events
(in event-time order, as the ledger fold reads them), the tier policy and the SLA
clock, and yields :class:`Hit` values. ``subject`` distinguishes several findings of
one rule on one MR (for example each approver outside the reviewer group); the store
deduplicates on ``(MR, rule, subject)``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from secledger.extract import APPROVALS_RESET, EventFacts, MRKey
from secledger.projection import STATE_AFTER, SequencedEvent, same_approver, tier_changes
from secledger.quickinit import quick
from secledger.tierpolicy import CompliancePolicy, TierRule

SEVERITIES = ("critical", "high", "medium", "low")
CLOCK_STOPPERS = frozenset({"approved", "merged", "closed"})
# The states of an MR nobody can review any more.
ENDED_STATES = frozenset({"merged", "closed"})


def stamp(value: datetime | None) -> str | None:
    """Evidence time spelling (whole seconds, UTC, Z); SQL writes the same."""
    if value is None:
        return None
    # isoformat spells years 1000-9999 as strftime("%Y-%m-%dT%H:%M:%S") does, faster.
    return value.astimezone(UTC).replace(microsecond=0, tzinfo=None).isoformat() + "Z"


@quick
@dataclass(frozen=True)
class SlaClock:
    """When one MR's review was due and when (and by what) its clock stopped."""

    tier: str
    sla_hours: float
    business_hours: bool
    required_approvals: int
    labeled_at: datetime | None
    label_seq: int | None
    deadline: datetime | None
    first_decision_at: datetime | None = None
    first_decision: str | None = None
    first_decision_by: str | None = None
    first_decision_seq: int | None = None
    # "merged" or "closed" when the MR already was so when labelled and no review
    # decision followed the label: nothing is left to wait for and the clock never runs
    # (policy.md, "The SLA clock"). Stored in review_sla, where SQL reads it.
    ended_before_label: str | None = None

    @property
    def met(self) -> bool | None:
        """True/False once decided; None while the clock runs (or never started)."""
        if self.deadline is None or self.first_decision_at is None:
            return None
        return self.first_decision_at <= self.deadline

    @property
    def running(self) -> bool:
        """True while the MR awaits its first review decision (it may be past due)."""
        stopped = self.first_decision_at is not None or self.ended_before_label is not None
        return self.deadline is not None and not stopped

    def status(self, now: datetime) -> str:
        """The verdict at ``now``, as SQL spells it (``reports.SLA_STATUS``)."""
        if self.deadline is None:
            return "no_clock"
        if self.met is not None:
            return "met" if self.met else "breached"
        if self.ended_before_label == "merged":
            return "labeled_after_merge"
        if self.ended_before_label == "closed":
            return "labeled_after_close"
        return "overdue" if now > self.deadline else "running"


@quick
@dataclass(frozen=True)
class MRHistory:
    """One merge request: its events in event-time order and what the ledger folded."""

    key: MRKey
    events: tuple[SequencedEvent, ...]
    author_id: int | None
    tier: str
    labeled_at: datetime | None


@quick
@dataclass(frozen=True)
class Hit:
    """One finding as a rule reports it."""

    rule: str
    severity: str
    subject: str
    seqs: tuple[int, ...]
    evidence: dict[str, Any] = field(default_factory=dict)


@quick
@dataclass(frozen=True)
class Context:
    """Everything a rule may read."""

    history: MRHistory
    policy: CompliancePolicy
    clock: SlaClock
    now: datetime

    @functools.cached_property
    def first_merge(self) -> SequencedEvent | None:
        """The first merge event, if the MR was merged (several rules ask)."""
        return next((e for e in self.history.events if e.facts.decision == "merged"), None)

    @functools.cached_property
    def unrecorded_merge(self) -> SequencedEvent | None:
        """With no merge event, the first event that found the MR merged: its merge
        webhook was lost (GitLab does not retry). Not for an MR already merged at its
        label, as the SLA clock judges it (``ended_before_label``): that merge was of no
        security MR."""
        if self.first_merge is not None or self.clock.ended_before_label == "merged":
            return None
        return next(
            (
                e
                for e in self.history.events
                if (e.facts.state or STATE_AFTER.get(e.facts.kind)) == "merged"
            ),
            None,
        )

    @property
    def merge(self) -> SequencedEvent | None:
        """The merge the merge rules judge at: the first merge event, else the event that
        found the MR merged when its merge webhook was lost."""
        return self.first_merge or self.unrecorded_merge

    def merge_evidence(self, merge: SequencedEvent) -> dict[str, Any]:
        """When the MR merged, as far as the events tell."""
        if merge is self.first_merge:
            return {"merged_at": stamp(merge.facts.event_at)}
        return {"merge_recorded": False, "seen_merged_at": stamp(merge.facts.event_at)}

    @property
    def tier_rule(self) -> TierRule:
        """The policy of the MR's tier."""
        return self.policy.rule(self.history.tier)

    def by_author(self, facts: EventFacts) -> bool:
        """True when the acting user is the MR's author (both ids known)."""
        author = self.history.author_id
        return author is not None and facts.actor_id == author


# A rule yields (subject, seqs, evidence) or (subject, seqs, evidence, severity).
Finding = (
    tuple[str, tuple[int, ...], dict[str, Any]] | tuple[str, tuple[int, ...], dict[str, Any], str]
)
RuleFunction = Callable[[Context], Iterator[Finding]]


@dataclass(frozen=True)
class Rule:
    """A registered rule: id, default severity, function."""

    id: str
    severity: str
    check: RuleFunction
    # What the finding says, for readers without the docs (an evidence pack's README).
    meaning: str


RULES: dict[str, Rule] = {}


def rule(rule_id: str, severity: str, meaning: str) -> Callable[[RuleFunction], RuleFunction]:
    """Register a rule function under ``rule_id``; ``meaning`` says when it fires."""
    if severity not in SEVERITIES:
        raise ValueError(f"unknown severity {severity!r}")

    def register(check: RuleFunction) -> RuleFunction:
        RULES[rule_id] = Rule(rule_id, severity, check, meaning)
        return check

    return register


def sla_clock(history: MRHistory, policy: CompliancePolicy) -> SlaClock:
    """The SLA clock: from the label to the first non-author approval, merge or close.

    Decisions before the label do not stop it: an MR already merged or closed when it
    was labelled, with no decision after the label, has nothing left to wait for, and its
    clock never runs. One closed before the label and reopened after it is open again:
    its clock runs from the label.

    The deadline is the one of the tier the MR carried while its clock ran. When that
    tier changed, the review was due at the first moment the tier carried then was past
    its own deadline (``_due``): a downgrade after the deadline passed does not undo the
    breach, and a relabel after the decision does not make it late.
    """
    labeled_at = history.labeled_at
    stop = _clock_stop(history)
    tier, deadline = _due(history, policy, stop.facts.event_at if stop else None)
    tier_rule = policy.rule(tier)
    clock = SlaClock(
        tier=tier,
        sla_hours=tier_rule.sla_hours,
        business_hours=tier_rule.business_hours,
        # What ``insufficient-approvals`` asks: the MR's tier's, not the SLA's.
        required_approvals=policy.rule(history.tier).approvals,
        labeled_at=labeled_at,
        label_seq=_label_seq(history),
        deadline=deadline,
    )
    if labeled_at is None:
        return clock
    if stop is not None:
        return SlaClock(
            **{
                **clock.__dict__,
                "first_decision_at": stop.facts.event_at,
                "first_decision": stop.facts.decision,
                "first_decision_by": stop.facts.actor,
                "first_decision_seq": stop.seq,
            }
        )
    ended = _ended_before_label(history)
    return replace(clock, ended_before_label=ended) if ended else clock


def _clock_stop(history: MRHistory) -> SequencedEvent | None:
    """The first decision after the label that stops the clock, if one did."""
    labeled_at = history.labeled_at
    if labeled_at is None:
        return None
    author = history.author_id
    events = history.events
    for position, event in enumerate(events):
        facts = event.facts
        if facts.decision not in CLOCK_STOPPERS or facts.event_at < labeled_at:
            continue
        if facts.decision == "approved" and author is not None and facts.actor_id == author:
            continue  # an author approving their own change is not a review
        if facts.decision == "closed" and _reopened(events[position + 1 :]):
            continue  # the MR was open for review again: that close decided nothing
        return event
    return None


def _due(
    history: MRHistory, policy: CompliancePolicy, stopped_at: datetime | None
) -> tuple[str, datetime | None]:
    """The tier whose deadline applies, and that deadline: the earliest moment the MR,
    between its label and ``stopped_at``, carried a tier whose deadline had passed; else
    (decided in time) the tier at the decision and its deadline."""
    labeled_at = history.labeled_at
    if labeled_at is None:
        return history.tier, None
    periods = _tier_periods(history, policy, labeled_at, stopped_at)
    # A business-hours deadline walks the calendar: one per tier, not one per period.
    deadlines = {tier: policy.deadline(tier, labeled_at) for tier in {p[2] for p in periods}}
    late = []
    for start, end, tier in periods:
        moment = max(start, deadlines[tier])
        if end is None or moment < end:
            late.append((moment, tier))
    if late:
        moment, tier = min(late, key=lambda due: due[0])
        return tier, moment
    tier = periods[-1][2]
    return tier, deadlines[tier]


def _tier_periods(
    history: MRHistory,
    policy: CompliancePolicy,
    labeled_at: datetime,
    stopped_at: datetime | None,
) -> list[tuple[datetime, datetime | None, str]]:
    """(from, until, tier) from the label to ``stopped_at`` (None: still running). A tier
    first told after the label stands from the label: nothing told another before it."""
    changes = tier_changes(history.events, policy.outranks)
    if not changes:
        return [(labeled_at, stopped_at, history.tier)]
    periods: list[tuple[datetime, datetime | None, str]] = []
    for index, (at, tier) in enumerate(changes):
        until = changes[index + 1][0] if index + 1 < len(changes) else None
        if until is not None and until <= labeled_at:
            continue  # replaced before the label
        start = at if periods else labeled_at
        if stopped_at is not None and periods and start >= stopped_at:
            break
        if stopped_at is not None and (until is None or until > stopped_at):
            until = stopped_at
        periods.append((start, until, tier))
    return periods


def _reopened(later: Sequence[SequencedEvent]) -> bool:
    """Whether an event after a close shows the MR open again (its reopen, or any event
    showing it open when the reopen's webhook was lost), as the fold reads it."""
    return any((e.facts.state or STATE_AFTER.get(e.facts.kind)) == "opened" for e in later)


def _ended_before_label(history: MRHistory) -> str | None:
    """``merged`` or ``closed`` when the MR already was so at its label (the state the
    label event shows, else the last one an event before it showed) and no later event
    shows it open.

    Judged from the events, not from the ledger's state now: an MR labelled while open
    whose merge or close was never recorded is still an unreviewed change past due. When
    no recorded event is the label's (its time came from ``created_at`` or the API),
    only events up to the label time count; none showing a state, the clock runs: an
    audit trail errs on the side of a breach.
    """
    labeled_at = history.labeled_at
    label = _label_event(history)
    state: str | None = None
    before = True
    for event in history.events:
        facts = event.facts
        shown = facts.state or STATE_AFTER.get(facts.kind)
        if before and label is None and labeled_at is not None and facts.event_at > labeled_at:
            before = False
        if before:
            state = shown or state
            before = event.seq != label
        elif shown == "opened":
            return None  # reopened after the label: its clock runs from the label
    return state if state in ENDED_STATES else None


def _label_seq(history: MRHistory) -> int | None:
    """The label event's seq, else the first event's (the clock's evidence needs one)."""
    label = _label_event(history)
    if label is not None:
        return label
    return history.events[0].seq if history.events else None


def _label_event(history: MRHistory) -> int | None:
    """The seq of the event that set ``labeled_at``; None when it came from elsewhere
    (``created_at``, the API)."""
    for event in history.events:
        if event.facts.labeled_at is not None and event.facts.labeled_at == history.labeled_at:
            return event.seq
    return None


def evaluate(
    history: MRHistory, policy: CompliancePolicy, now: datetime, clock: SlaClock | None = None
) -> list[Hit]:
    """Run every registered rule over one MR (``clock``: its ``sla_clock``, if known)."""
    context = Context(history, policy, clock or sla_clock(history, policy), now)
    hits: list[Hit] = []
    for registered in RULES.values():
        for found in registered.check(context):
            severity = found[3] if len(found) == 4 else registered.severity
            hits.append(Hit(registered.id, severity, found[0], found[1], found[2]))
    return hits


def standing_approvals(context: Context, until: SequencedEvent) -> dict[str, int]:
    """Approver → approval seq, for approvals standing just before ``until``.

    A revocation withdraws its user's approval by GitLab user id when both carry one, so
    a user renamed between the two (the webhook tells the name at the time) is one user.
    """
    standing: list[SequencedEvent] = []
    for event in context.history.events:
        if event is until:
            break
        facts = event.facts
        if facts.decision == "approved":
            if not any(same_approver(given.facts, facts) for given in standing):
                standing.append(event)
        elif facts.decision == "unapproved":
            standing = [given for given in standing if not same_approver(given.facts, facts)]
        elif facts.kind == APPROVALS_RESET:
            standing.clear()
    named: dict[str, int] = {}
    for given in standing:
        name = given.facts.actor or ""
        if name in named:  # two users who held one name at different times
            name = f"{name} (id {given.facts.actor_id})"
        named[name] = given.seq
    return named


def others(context: Context, approvals: dict[str, int]) -> dict[str, int]:
    """Approvals not given by the author (the author's own approval is no review)."""
    by_seq = {e.seq: e.facts for e in context.history.events}
    return {name: seq for name, seq in approvals.items() if not context.by_author(by_seq[seq])}


# ---- The rules. Each is registered here, in one place, with its id and severity. ----


@rule(
    "author-approved",
    "high",
    "an approval by the MR's author (same GitLab user id); each self-approval is one",
)
def author_approved(context: Context) -> Iterator[Finding]:
    """The author approved their own merge request."""
    seqs = [e.seq for e in context.history.events if _approval(e) and context.by_author(e.facts)]
    if seqs:
        events = [e.facts for e in context.history.events if e.seq in seqs]
        yield (
            "",
            tuple(seqs),
            {
                "author_id": context.history.author_id,
                "approver": events[0].actor,
                "approved_at": [stamp(f.event_at) for f in events],
            },
        )


@rule(
    "merged-by-author",
    "high",
    (
        "the author merged while no approval by anyone else was standing (an author's "
        "merge after another user's standing approval is not a finding)"
    ),
)
def merged_by_author(context: Context) -> Iterator[Finding]:
    """The author merged without a standing approval from anyone else."""
    merge = context.first_merge
    if merge is None or not context.by_author(merge.facts):
        return
    if not others(context, standing_approvals(context, merge)):
        yield (
            "",
            (merge.seq,),
            {
                "author_id": context.history.author_id,
                "merged_by": merge.facts.actor,
                "merged_at": stamp(merge.facts.event_at),
            },
        )


@rule(
    "insufficient-approvals",
    "high",
    (
        "at the first merge, fewer standing approvals by users other than the author than"
        " the tier requires (approved, and neither revoked nor reset by a push since); "
        "with the merge event lost, as of the first event that found the MR merged after "
        "it was seen open"
    ),
)
def insufficient_approvals(context: Context) -> Iterator[Finding]:
    """Merged with fewer standing non-author approvals than the tier requires (also when
    the merge event was lost: then as of the first event that found the MR merged)."""
    merge = context.merge
    if merge is None:
        return
    standing = others(context, standing_approvals(context, merge))
    required = context.tier_rule.approvals
    if len(standing) < required:
        evidence: dict[str, Any] = {
            "tier": context.history.tier,
            "required": required,
            "standing_approvers": sorted(standing),
        }
        if merge is context.first_merge:
            evidence["merged_by"] = merge.facts.actor
        evidence |= context.merge_evidence(merge)
        yield ("", (*sorted(standing.values()), merge.seq), evidence)


@rule(
    "approval-revoked-before-merge",
    "medium",
    (
        "an approval was revoked, and the MR was merged with no approval by another user "
        "than the author given after the revocation (a lost merge as for "
        "insufficient-approvals)"
    ),
)
def approval_revoked_before_merge(context: Context) -> Iterator[Finding]:
    """An approval was revoked and the MR merged with no non-author approval after it."""
    merge = context.merge
    if merge is None:
        return
    revoked: list[SequencedEvent] = []
    for event in context.history.events:
        if event is merge:
            break
        if event.facts.decision == "unapproved":
            revoked.append(event)
        elif _review(context, event):
            revoked.clear()  # a new approval after the revocation answers it
    if revoked:
        yield (
            "",
            (*(e.seq for e in revoked), merge.seq),
            {
                "revoked_by": [e.facts.actor for e in revoked],
                "revoked_at": [stamp(e.facts.event_at) for e in revoked],
                **context.merge_evidence(merge),
            },
        )


@rule(
    "approver-not-in-group",
    "medium",
    "an approval by a user outside the tier's configured approvers (one finding per approver)",
)
def approver_not_in_group(context: Context) -> Iterator[Finding]:
    """Someone outside the tier's reviewer list approved (one finding per approver)."""
    tier_rule = context.tier_rule
    if tier_rule.reviewers is None:
        return
    outsiders: dict[str, list[int]] = {}
    for event in context.history.events:
        if _approval(event) and not tier_rule.allows(event.facts.actor):
            outsiders.setdefault(event.facts.actor or "", []).append(event.seq)
    for approver, seqs in outsiders.items():
        yield (
            approver,
            tuple(seqs),
            {
                "approver": approver,
                "tier": tier_rule.tier,
                "allowed_reviewers": sorted(tier_rule.reviewers),
            },
        )


@rule(
    "label-removed-before-merge",
    "high",
    (
        "a security label was removed (the tier fell, or none remained), and the MR was "
        "merged with no approval by another user than the author after the removal (a "
        "lost merge as for insufficient-approvals)"
    ),
)
def label_removed_before_merge(context: Context) -> Iterator[Finding]:
    """A security label was removed (tier lowered or dropped) and then merged unreviewed."""
    merge = context.merge
    if merge is None:
        return
    policy = context.policy
    current: str | None = None
    downgrade: SequencedEvent | None = None
    before: str | None = None
    for event in context.history.events:
        if event is merge:
            break
        facts = event.facts
        after = facts.tier if facts.security_labels else None
        # GitLab's previous labels tell the tier a removal lowered, even when it is the
        # first event seen; events stored before that was extracted tell none. They are
        # sometimes wrong (empty after a rebase, or naming a lower tier than the last
        # one shown): a label change that leaves a label set lower than the last one an
        # event showed is a downgrade, whatever it says was removed, so the higher of the
        # two is what it fell from. An event that changed no label tells nothing: old
        # system hooks carry no labels, and a hook built before a label was added can
        # arrive after it, stamped with the same second.
        shown = [tier for tier in (facts.tier_before, current) if tier is not None]
        prior = min(shown, key=policy.rank) if shown else None
        lowered = prior is not None and (after is None or policy.rank(after) > policy.rank(prior))
        if lowered and (facts.security_removed or facts.security_added):
            downgrade, before = event, prior
        elif downgrade is not None and _review(context, event):
            downgrade = None  # reviewed after the downgrade
        if facts.security_labels or facts.security_removed:
            current = after
    if downgrade is not None:
        yield (
            "",
            (downgrade.seq, merge.seq),
            {
                "removed_labels": list(downgrade.facts.security_removed),
                # Only a change that names the removal tells who made it.
                "removed_by": downgrade.facts.actor if downgrade.facts.security_removed else None,
                "removed_at": stamp(downgrade.facts.event_at),
                "tier_before": before,
                "tier_after": downgrade.facts.tier if downgrade.facts.security_labels else None,
                **context.merge_evidence(merge),
            },
        )


@rule(
    "sla-breached",
    "medium",
    (
        "no review decision (approval by another user than the author, merge or close) by"
        " the tier's deadline: decided late, or undecided past it (an MR merged or closed"
        " before its label has no deadline); severity high for an MR of the highest tier"
    ),
)
def sla_breached(context: Context) -> Iterator[Finding]:
    """No decision by the tier's deadline (decided late, or still undecided past it).

    An MR already merged or closed when labelled has no breach (the SQL overdue check,
    ``findings._OVERDUE_MRS``, skips it too). The status "open past deadline" keeps its
    name for the evidence's readers, also for an MR merged since without a recorded merge.
    """
    clock = context.clock
    if clock.label_seq is None:
        return
    severity = "high" if context.policy.rank(clock.tier) == 0 else "medium"
    status = clock.status(context.now)
    if status == "breached" and clock.first_decision_seq is not None:
        seqs = (clock.label_seq, clock.first_decision_seq)
        yield "", seqs, breach_evidence(clock), severity
    elif status == "overdue":
        yield "", (clock.label_seq,), breach_evidence(clock), severity


def breach_evidence(clock: SlaClock) -> dict[str, Any]:
    """Evidence of an SLA breach; the SQL overdue check builds the same keys."""
    return {
        "tier": clock.tier,
        "sla_hours": clock.sla_hours,
        "business_hours": clock.business_hours,
        "labeled_at": stamp(clock.labeled_at),
        "deadline": stamp(clock.deadline),
        "decided_at": stamp(clock.first_decision_at),
        "decision": clock.first_decision,
        "status": "decided late" if clock.first_decision_at else "open past deadline",
    }


def _approval(event: SequencedEvent) -> bool:
    return event.facts.decision == "approved"


def _review(context: Context, event: SequencedEvent) -> bool:
    # The author's own approval is no review: it cannot answer a revocation or a removal.
    return _approval(event) and not context.by_author(event.facts)
