"""Pure functions: a verified Delivery becomes the review facts one event tells."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from secledger import payloads as p
from secledger.errors import TimestampError
from secledger.intake import Decoded, Delivery
from secledger.policy import LabelPolicy
from secledger.quickinit import quick
from secledger.times import isoformat, parse_optional, parse_stored

# GitLab's action → the decision it records. EE sends approval/unapproval per user,
# CE always approved/unapproved; both mean the same thing for the ledger.
DECISIONS = {
    "approved": "approved",
    "approval": "approved",
    "unapproved": "unapproved",
    "unapproval": "unapproved",
    "merge": "merged",
    "close": "closed",
    "reopen": "reopened",
}
NON_DECISIONS = {"open": "open", "update": "update"}
# GitLab 18.6+ tells approvals it removed after a push as ``unapproved``/``unapproval``
# marked ``system``, its user the person who pushed: nobody's decision. A plain reset
# removes every approval given on the old diff; a Code Owners reset only those of the
# owners of the changed files, without saying whose.
APPROVALS_RESET = "approvals_reset"
CODE_OWNER_RESET = "code_owner_approvals_reset"
_RESETS = {"code_owner_approvals_reset_on_push": CODE_OWNER_RESET}
_STATE_DECISIONS = {"closed": "closed", "merged": "merged"}
_TIME_FIELDS = ("event_at", "created_at", "labeled_at")

# Longest strings kept in facts and the ledger. GitLab's own limits are lower (titles,
# labels and usernames: 255 characters), so only a forged or broken payload is cut;
# delivery_log keeps the raw payload byte-exact whatever it holds.
TEXT_LIMITS = {
    "title": 1024,
    "url": 2048,
    # Indexed lowered (0023): 512 characters of up to 4 bytes stay under the 2704 bytes a
    # btree entry may hold; 1024 astral characters were refused by PostgreSQL.
    "project_path": 512,
    "actor": 256,
    "state": 32,
    "kind": 32,
    "decision": 32,
}
LIST_LIMITS = {
    "labels": 512,
    "security_labels": 512,
    "security_added": 512,
    "security_removed": 512,
    "reviewers": 256,
}
MAX_LIST_ITEMS = 500
# PostgreSQL text and jsonb cannot hold U+0000: it becomes U+FFFD in facts and ledger.
NUL_REPLACEMENT = "\ufffd"


class MRKey(NamedTuple):
    """How people name a merge request: instance, target project, iid.

    A named tuple, not a frozen dataclass: keys are built and hashed several times per
    delivery (dict keys of every batch), and a tuple does both in C.
    """

    instance: str
    project_id: int
    mr_iid: int


@quick
@dataclass(frozen=True)
class EventFacts:
    """What one event says about a security merge request."""

    instance: str
    project_id: int
    mr_iid: int
    mr_id: int | None
    kind: str
    decision: str | None
    event_at: datetime
    event_at_source: str
    is_security: bool
    tier: str
    state: str | None = None
    actor: str | None = None
    actor_id: int | None = None
    project_path: str | None = None
    title: str | None = None
    url: str | None = None
    author_id: int | None = None
    created_at: datetime | None = None
    labels: tuple[str, ...] = ()
    security_labels: tuple[str, ...] = ()
    security_added: tuple[str, ...] = ()
    security_removed: tuple[str, ...] = ()
    # The tier of the security labels just before this event removed one: a removal seen
    # first (or alone) still tells the tier it lowered.
    tier_before: str | None = None
    # Security labels, none of which names a tier (``tier`` is the unclassified bucket):
    # the fold then keeps the tier an earlier label named.
    untiered: bool = False
    reviewers: tuple[str, ...] | None = None
    labeled_at: datetime | None = None
    labeled_at_source: str | None = None
    source: str = "webhook"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> MRKey:
        """The merge request this event is about."""
        return MRKey(self.instance, self.project_id, self.mr_iid)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (times as ISO 8601 UTC)."""
        # A shallow copy: dataclasses.asdict deep-copies every field and was the largest
        # cost of recording a batch; the values here are immutable or rendered as-is.
        # An instance's __dict__ holds exactly its fields, in their order.
        data = dict(self.__dict__)
        for name in _TIME_FIELDS:
            data[name] = isoformat(data[name])
        # Facts stored before tier_before existed lack the key: leaving it out when it
        # says nothing keeps them equal to what rebuild extracts again (rebuild --check).
        if data["tier_before"] is None:
            del data["tier_before"]
        if not data["untiered"]:  # likewise for facts stored before it existed
            del data["untiered"]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EventFacts:
        """Inverse of :meth:`to_json`."""
        values = dict(data)
        for name in _TIME_FIELDS:
            values[name] = parse_stored(values.get(name))
        for name in ("labels", "security_labels", "security_added", "security_removed"):
            values[name] = tuple(values.get(name) or ())
        if values.get("reviewers") is not None:
            values["reviewers"] = tuple(values["reviewers"])
        return cls(**values)


def clean_text(value: str, limit: int) -> str:
    """``value`` as PostgreSQL can store it: at most ``limit`` characters, NUL replaced."""
    return value[:limit].replace("\x00", NUL_REPLACEMENT)


def bounded(facts: EventFacts) -> EventFacts:
    """``facts`` with every string bounded and storable; cut fields named in extra.truncated."""
    # Nearly every delivery needs no change: copying the facts only when one is needed
    # saves rebuilding a frozen dataclass of ~30 fields per delivery.
    changes: dict[str, Any] = {}
    truncated: list[str] = []
    for name, limit in TEXT_LIMITS.items():
        value = getattr(facts, name)
        if isinstance(value, str) and (len(value) > limit or "\x00" in value):
            if len(value) > limit:
                truncated.append(name)
            changes[name] = clean_text(value, limit)
    for name, limit in LIST_LIMITS.items():
        values: tuple[str, ...] | None = getattr(facts, name)
        if values is None:
            continue
        # max() over map() and one joined string: C loops, not a generator per item.
        over = len(values) > MAX_LIST_ITEMS or (bool(values) and max(map(len, values)) > limit)
        if over:
            truncated.append(name)
        if over or type(values) is not tuple or "\x00" in "".join(values):
            changes[name] = tuple(clean_text(v, limit) for v in values[:MAX_LIST_ITEMS])
    if truncated:
        changes["extra"] = {**facts.extra, "truncated": truncated}
    return replace(facts, **changes) if changes else facts


def _reviewers(payload: Mapping[str, Any], attrs: Mapping[str, Any]) -> tuple[str, ...] | None:
    """The reviewers a payload names; None when it tells nothing of them.

    GitLab omits ``reviewers`` when nobody is assigned, so its absence means "none" in a
    payload that speaks of reviewers at all (project and group hooks carry
    ``object_attributes.reviewer_ids``); system hooks carry neither, and read as "none"
    their copy of an event blanked the reviewers its project hook's copy had named.
    """
    if "reviewers" not in payload and "reviewer_ids" not in attrs:
        return None
    return tuple(p.usernames(payload.get("reviewers")))


def _safe_time(value: object) -> datetime | None:
    try:
        return parse_optional(value)
    except TimestampError:
        return None


# ``event_at_source`` of an event GitLab gave no time for: it is the time received.
RECEIVED = "received_at"
# The times an event's time may be read from, best first, unparsed, each with its name.
Stamps = tuple[tuple[str, str], ...]
# GitLab's longest spelling, "2025-08-05 20:30:00.123456789 +0000" and the like, with room.
MAX_STAMP_CHARS = 64
# Actions after which GitLab does not save the MR: their payload's ``updated_at`` is the
# time of the MR's last edit, often its labelling, and read as the decision time it made
# such a decision look instant. GitLab now sends ``actioned_at`` (GitLab MR 224849).
_UNSAVED = frozenset({"approved", "approval", "unapproved", "unapproval"})


def event_time(payload: dict[str, Any], received_at: datetime) -> tuple[datetime, str]:
    """When the event happened in GitLab, and what told it (``event_stamps``); the time
    received when nothing did."""
    return event_time_of(event_stamps(payload), received_at)


def event_stamps(payload: dict[str, Any]) -> Stamps:
    """What ``event_time`` reads, unparsed: cheap to keep for later (on the path of every
    ignored delivery, hence no helper calls). Kept only as short strings: a sender's
    value may be anything, and it would stay in memory as long as kept.

    ``changes.updated_at.current``, else ``object_attributes.updated_at``; for an
    approval or its revocation, ``object_attributes.actioned_at`` before both. Without
    it (GitLab before that field) ``updated_at`` is all the payload holds: the receipt
    would be no better, as a resend or a queued hook arrives long after, and every copy
    and twin of the decision is matched by its time."""
    changes, attrs = payload.get("changes"), payload.get("object_attributes")
    updated = changes.get("updated_at") if isinstance(changes, dict) else None
    changed = updated.get("current") if isinstance(updated, dict) else None
    found: list[tuple[str, str]] = []
    if isinstance(attrs, dict):
        stamp = attrs.get("updated_at")
        action = attrs.get("action")
        if type(action) is str and action in _UNSAVED:
            actioned = attrs.get("actioned_at")
            if type(actioned) is str and len(actioned) <= MAX_STAMP_CHARS:
                found.append((actioned, "object_attributes.actioned_at"))
    else:
        stamp = None
    if type(changed) is str and len(changed) <= MAX_STAMP_CHARS:
        found.append((changed, "changes.updated_at"))
    if type(stamp) is str and len(stamp) <= MAX_STAMP_CHARS:
        found.append((stamp, "object_attributes.updated_at"))
    return tuple(found)


def event_time_of(stamps: Stamps, received_at: datetime) -> tuple[datetime, str]:
    """``event_time`` from what ``event_stamps`` read."""
    for value, name in stamps:
        parsed = _safe_time(value)
        if parsed is not None:
            return parsed, name
    return received_at, RECEIVED


def _from_action(attrs: Mapping[str, Any], action: str) -> tuple[str, str | None]:
    decision = DECISIONS.get(action)
    if decision == "unapproved" and attrs.get("system") is True:
        # Another system-started removal is read as a full reset: standing approvals are
        # then understated, never overstated.
        return _RESETS.get(str(attrs.get("system_action")), APPROVALS_RESET), None
    if decision is not None:
        return decision, decision
    return NON_DECISIONS.get(action, action[:32]), None


def classify(payload: dict[str, Any]) -> tuple[str, str | None]:
    """``(kind, decision)`` from the action, or from state changes when there is no action."""
    attrs = p.obj(payload, "object_attributes")
    action = p.text(attrs, "action")
    if action:
        return _from_action(attrs, action)
    # System hooks before 2017 carry no action: read what the state change says.
    change = p.state_change(payload)
    if change is not None:
        previous, current = change
        if current in _STATE_DECISIONS:
            return _STATE_DECISIONS[current], _STATE_DECISIONS[current]
        if current == "opened" and previous in {"closed", "locked"}:
            return "reopened", "reopened"
    # Times are strings: comparing two lists nested 1000 deep raised RecursionError.
    created, updated = p.text(attrs, "created_at"), p.text(attrs, "updated_at")
    if not p.obj(payload, "changes") and created is not None and created == updated:
        return "open", None
    return "update", None


def label_facts(
    payload: dict[str, Any], policy: LabelPolicy
) -> tuple[list[str], tuple[str, ...], tuple[str, ...], tuple[str, ...], bool]:
    """Current labels, security labels, security labels added and removed, ever-security."""
    labels = p.current_labels(payload)
    security = policy.security_labels(labels)
    change = p.label_change(payload)
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    was_security = False
    if change is not None and not change[0] and _pushed(payload):
        # After a push (a rebase), GitLab has sent ``previous`` empty whatever the labels
        # were: read as the label's addition, it restarted the MR's SLA clock then.
        change = None
    if change is not None:
        previous, current = change
        prev_sec = set(policy.security_labels(previous))
        cur_sec = policy.security_labels(current)
        added = tuple(label for label in cur_sec if label not in prev_sec)
        removed = tuple(label for label in policy.security_labels(previous) if label not in cur_sec)
        was_security = bool(prev_sec)
    return labels, security, added, removed, bool(security) or was_security


def _pushed(payload: dict[str, Any]) -> bool:
    """Whether an update tells a push: GitLab then sends ``oldrev``, the head before it."""
    attrs = payload.get("object_attributes")
    return isinstance(attrs, dict) and bool(attrs.get("oldrev"))


def untiered(policy: LabelPolicy, security: tuple[str, ...], tier: str) -> bool:
    """Whether there are security labels and none names a tier."""
    if not security or tier != policy.unclassified:
        return False
    if tier not in policy.tiers:
        return True
    # The unclassified bucket may bear a tier's name (SECLEDGER_UNCLASSIFIED_TIER=low):
    # then only the labels tell whether one named it.
    return not any(policy.tier_of_label(label) for label in security)


def tier_before(
    policy: LabelPolicy,
    security: tuple[str, ...],
    added: tuple[str, ...],
    removed: tuple[str, ...],
) -> str | None:
    """The tier of the security labels before a change that removed ``removed``."""
    if not removed:
        return None
    # What was there before: what stayed, and what went. Only security labels name a tier.
    return policy.tier((*(label for label in security if label not in added), *removed))


def mr_key(delivery: Delivery | Decoded) -> MRKey:
    """The merge request a delivery is about (intake has checked these fields)."""
    if isinstance(delivery, Decoded):
        return MRKey(delivery.instance, delivery.project_id, delivery.iid)
    attrs = p.obj(delivery.payload, "object_attributes")
    project_id = p.integer(attrs, "target_project_id")
    if project_id is None:
        project_id = int(p.obj(delivery.payload, "project")["id"])
    return MRKey(delivery.instance, project_id, int(attrs["iid"]))


def is_security_event(delivery: Delivery | Decoded, policy: LabelPolicy) -> bool:
    """``extract_facts(...).is_security`` from the labels alone, for the ignore fast path:
    a security label now, or one before this delivery changed the labels."""
    payload = delivery.payload
    # The label lists as sent, checked without copying their titles into new lists.
    if policy.any_security_in(p.current_label_items(payload)):
        return True
    change = p.obj(p.obj(payload, "changes"), "labels")
    return bool(change) and policy.any_security_in(change.get("previous"))


# How far an open's time may be from the MR's creation for the open to be the creation.
# GitLab stamps a new MR's updated_at with its created_at; the "Test" button of a hook
# sends an `open` for the project's newest MR as it stands, its labels of today beside
# its old created_at, which read as labelled since creation moved the SLA clock back.
OPEN_AT_CREATION = timedelta(seconds=60)


def _at_creation(event_at: datetime, source: str, created_at: datetime | None) -> bool:
    """Whether an ``open`` event is the MR's creation (as far as its times can tell)."""
    if created_at is None or source == RECEIVED:
        return True  # nothing to compare: taken at its word, as before
    return abs(event_at - created_at) <= OPEN_AT_CREATION


def extract_facts(delivery: Delivery, policy: LabelPolicy) -> EventFacts:
    """Everything secledger needs from one merge-request delivery."""
    payload = delivery.payload
    attrs = p.obj(payload, "object_attributes")
    project = p.obj(payload, "project")
    user = p.obj(payload, "user")
    kind, decision = classify(payload)
    event_at, event_at_source = event_time(payload, delivery.received_at)
    created_at = _safe_time(attrs.get("created_at"))
    labels, security, added, removed, is_security = label_facts(payload, policy)
    labeled_at: datetime | None = None
    labeled_source: str | None = None
    if added and kind != "open":
        labeled_at, labeled_source = event_at, "label_added"
    elif kind == "open" and security and _at_creation(event_at, event_at_source, created_at):
        labeled_at, labeled_source = created_at or event_at, "opened_with_label"
    key = mr_key(delivery)
    tier = policy.tier(labels)
    return bounded(
        EventFacts(
            instance=key.instance,
            project_id=key.project_id,
            mr_iid=key.mr_iid,
            mr_id=p.integer(attrs, "id"),
            kind=kind,
            decision=decision,
            event_at=event_at,
            event_at_source=event_at_source,
            is_security=is_security,
            tier=tier,
            state=p.state_of(attrs),
            actor=p.text(user, "username"),
            actor_id=p.integer(user, "id"),
            project_path=p.text(project, "path_with_namespace")
            or p.text(p.obj(attrs, "target"), "path_with_namespace"),
            title=p.text(attrs, "title"),
            url=p.text(attrs, "url"),
            author_id=p.integer(attrs, "author_id"),
            created_at=created_at,
            labels=tuple(labels),
            security_labels=security,
            security_added=added,
            security_removed=removed,
            tier_before=tier_before(policy, security, added, removed),
            untiered=untiered(policy, security, tier),
            reviewers=_reviewers(payload, attrs),
            labeled_at=labeled_at,
            labeled_at_source=labeled_source,
            source=delivery.source,
        )
    )
