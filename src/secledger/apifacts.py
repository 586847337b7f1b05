"""Facts read from GitLab's REST API, as log entries and as EventFacts. Pure: no I/O.

Each API fact (one label event, one state event, one approval) becomes one
``delivery_log`` row with source ``api``. Its payload is the canonical JSON of an
*envelope*: the raw item GitLab returned, a summary of its merge request, and what
secledger derived at record time (the label set after a label event). Its dedup key
names the fact itself (``api:<instance>:<project>:<iid>:label_event:<id>``), so
fetching the same history twice, or from backfill and from enrichment, logs it once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

import orjson

from secledger import payloads as p
from secledger.extract import EventFacts, bounded, tier_before, untiered
from secledger.intake import API_SOURCE, Delivery
from secledger.policy import LabelPolicy
from secledger.projection import API_APPROVAL, UNDATED_APPROVAL
from secledger.times import isoformat, parse_optional, parse_time

SOURCE = API_SOURCE
EVENT = "GitLab API"
LABEL_EVENT, STATE_EVENT, APPROVAL = "label_event", "state_event", "approval"
# resource_state_events.state → the decision it records ("locked" records none).
STATE_DECISIONS = {"merged": "merged", "closed": "closed", "reopened": "reopened"}
_STATE_AFTER = {"merged": "merged", "closed": "closed", "reopened": "opened"}
# Approvals carry approved_at only on newer GitLab versions. Without it, an approval is
# placed just before the decision it preceded (merge or close), or at the MR's
# updated_at, and says so in event_at_source (UNDATED_APPROVAL); the fold matches it
# to any earlier webhook approval by the same user.
_BEFORE_DECISION = timedelta(microseconds=1)


def canonical(value: Any) -> bytes:
    """JSON with sorted keys and no spaces: the bytes logged for an API fact."""
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def project_path(mr: Mapping[str, Any]) -> str | None:
    """``group/project`` from ``references.full`` or, failing that, ``web_url``."""
    full = p.text(p.obj(mr, "references"), "full")
    if full and "!" in full:
        return full.rsplit("!", 1)[0]
    url = p.text(mr, "web_url")
    if url and "/-/" in url:
        path = url.split("/-/", 1)[0].split("://", 1)[-1]
        return path.split("/", 1)[1] if "/" in path else None
    return None


def mr_summary(mr: Mapping[str, Any]) -> dict[str, Any]:
    """The merge-request fields every API fact repeats (identity and description)."""
    author = p.obj(mr, "author")
    return {
        "id": p.integer(mr, "id"),
        "iid": int(mr["iid"]),
        "project_id": int(mr["project_id"]),
        "project_path": project_path(mr),
        "title": p.text(mr, "title"),
        "web_url": p.text(mr, "web_url"),
        "author_id": p.integer(author, "id") if author else p.integer(mr, "author_id"),
        "created_at": p.text(mr, "created_at"),
    }


def _when(item: Mapping[str, Any]) -> tuple[datetime, int]:
    return event_time(item), p.integer(item, "id") or 0


def event_time(item: Mapping[str, Any]) -> datetime:
    """When a ``resource_*_events`` item happened."""
    return parse_time(str(item["created_at"]))


def label_name(item: Mapping[str, Any]) -> str | None:
    """The label a ``resource_label_events`` item is about (``label`` may be null if deleted)."""
    return p.text(p.obj(item, "label"), "name")


def label_envelopes(
    mr: Mapping[str, Any], events: Iterable[Mapping[str, Any]], policy: LabelPolicy
) -> list[dict[str, Any]]:
    """One envelope per security-label event, each with the full label set after it."""
    summary = mr_summary(mr)
    labels: list[str] = []
    out: list[dict[str, Any]] = []
    for item in sorted(events, key=_when):
        name, action = label_name(item), p.text(item, "action")
        if name is None or action not in {"add", "remove"}:
            continue
        if action == "add" and name not in labels:
            labels.append(name)
        elif action == "remove" and name in labels:
            labels.remove(name)
        if policy.is_security_label(name):
            env = {"fact": LABEL_EVENT, "mr": summary, "event": dict(item)}
            out.append(env | {"labels_after": list(labels)})
    return out


def state_envelopes(
    mr: Mapping[str, Any], events: Iterable[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """One envelope per decision state event (merged, closed, reopened)."""
    summary = mr_summary(mr)
    reviewers = p.usernames(mr.get("reviewers"))
    return [
        {"fact": STATE_EVENT, "mr": summary, "event": dict(item), "reviewers": reviewers}
        for item in sorted(events, key=_when)
        if p.text(item, "state") in STATE_DECISIONS
    ]


def approval_bound(mr: Mapping[str, Any], approvals: Mapping[str, Any] | None = None) -> str | None:
    """Latest time an undated approval can have happened: before merge or close, else
    the MR's last update as of the approvals read (``approvals``, GitLab's answer, carries
    it). The listing's ``updated_at`` alone can be minutes or hours older on a large
    group: an approval given since would be dated before it happened, and no longer
    match its webhook."""
    for name in ("merged_at", "closed_at"):
        decided = parse_optional(mr.get(name))
        if decided is not None:
            return isoformat(decided - _BEFORE_DECISION)
    listed = p.text(mr, "updated_at")
    current = p.text(approvals, "updated_at") if approvals is not None else None
    if listed is None or current is None:
        return current or listed
    later = parse_optional(current), parse_optional(listed)
    if later[0] is not None and later[1] is not None and later[0] > later[1]:
        return current
    return listed


def approval_envelopes(mr: Mapping[str, Any], approvals: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One envelope per current approver in the ``/approvals`` answer."""
    summary = mr_summary(mr)
    bound = approval_bound(mr, approvals)
    out = []
    for item in approvals.get("approved_by") or []:
        if isinstance(item, dict) and p.integer(p.obj(item, "user"), "id") is not None:
            out.append({"fact": APPROVAL, "mr": summary, "event": item, "upper_bound": bound})
    return out


def undated_approver(env: Mapping[str, Any]) -> str | None:
    """The username of an approval envelope the API gives no time, else None."""
    if env["fact"] != APPROVAL or p.text(env["event"], "approved_at"):
        return None
    return p.text(p.obj(env["event"], "user"), "username")


def approver_id(env: Mapping[str, Any]) -> int | None:
    """The user id of an approval envelope's approver (a rename keeps it), else None."""
    return p.integer(p.obj(env["event"], "user"), "id")


def dated_approval(env: Mapping[str, Any]) -> tuple[str, datetime] | None:
    """The username and time of an approval envelope the API dates, else None."""
    if env["fact"] != APPROVAL:
        return None
    at = parse_optional(env["event"].get("approved_at"))
    user = p.text(p.obj(env["event"], "user"), "username")
    return None if at is None or user is None else (user, at)


def after_revocation(env: dict[str, Any], seq: int | None) -> dict[str, Any]:
    """An undated approval ``env``, marked as standing after its user's revocation logged
    at ``seq`` (None: no revocation of theirs is logged for the MR).

    Without a time, the same user's approvals differ only by the revocations between
    them: an approval the API shows after one is another approval, with a key of its
    own, and one shown again with no new revocation is the same (``dedup_key``).
    """
    return env if seq is None else env | {"after_revocation": seq}


def dedup_key(instance: str, env: Mapping[str, Any]) -> str:
    """The identity of an API fact, stable across runs and across backfill and enrichment."""
    mr, item = env["mr"], env["event"]
    prefix = f"api:{instance}:{mr['project_id']}:{mr['iid']}:{env['fact']}"
    if env["fact"] == APPROVAL:
        user_id = p.obj(item, "user")["id"]
        when = p.text(item, "approved_at") or "undated"
        if "after_revocation" in env and when == "undated":
            when += f":after:{int(env['after_revocation'])}"
        return f"{prefix}:{user_id}:{when}"
    return f"{prefix}:{item['id']}"


def delivery(instance: str, env: dict[str, Any], received_at: datetime) -> Delivery:
    """The log entry for one API fact."""
    return Delivery(
        event=EVENT,
        instance=instance,
        headers={"content-type": "application/json"},
        body=canonical(env),
        payload=env,
        dedup_key=dedup_key(instance, env),
        received_at=received_at,
        source=SOURCE,
    )


def _base(instance: str, env: Mapping[str, Any]) -> dict[str, Any]:
    mr = env["mr"]
    return {
        "instance": instance,
        "project_id": int(mr["project_id"]),
        "mr_iid": int(mr["iid"]),
        "mr_id": mr.get("id"),
        "project_path": mr.get("project_path"),
        "title": mr.get("title"),
        "url": mr.get("web_url"),
        "author_id": mr.get("author_id"),
        "created_at": parse_optional(mr.get("created_at")),
        "is_security": True,
        "source": SOURCE,
    }


def _actor(item: Mapping[str, Any]) -> dict[str, Any]:
    user = p.obj(item, "user")
    return {"actor": p.text(user, "username"), "actor_id": p.integer(user, "id")}


def _label_facts(env: Mapping[str, Any], policy: LabelPolicy) -> dict[str, Any]:
    item = env["event"]
    name = label_name(item) or ""
    labels = tuple(str(label) for label in env.get("labels_after") or ())
    at = parse_time(item["created_at"])
    added = item.get("action") == "add"
    security = policy.security_labels(labels)
    tier = policy.tier(labels)
    return {
        "kind": "label_added" if added else "label_removed",
        "decision": None,
        "event_at": at,
        "event_at_source": "api.label_event",
        "tier": tier,
        "untiered": untiered(policy, security, tier),
        "labels": labels,
        "security_labels": security,
        "security_added": (name,) if added else (),
        "security_removed": () if added else (name,),
        "tier_before": None if added else tier_before(policy, security, (), (name,)),
        "labeled_at": at if added else None,
        "labeled_at_source": "api" if added else None,
    } | _actor(item)


def _state_facts(env: Mapping[str, Any], policy: LabelPolicy) -> dict[str, Any]:
    item = env["event"]
    state = str(item["state"])
    reviewers = env.get("reviewers")
    return {
        "kind": STATE_DECISIONS[state],
        "decision": STATE_DECISIONS[state],
        "event_at": parse_time(item["created_at"]),
        "event_at_source": "api.state_event",
        "tier": policy.unclassified,
        "state": _STATE_AFTER[state],
        "reviewers": tuple(reviewers) if isinstance(reviewers, list) else None,
    } | _actor(item)


def _approval_facts(env: Mapping[str, Any], policy: LabelPolicy) -> dict[str, Any]:
    item = env["event"]
    dated = parse_optional(item.get("approved_at"))
    bound = parse_optional(env.get("upper_bound"))
    if dated is None and bound is None:
        raise ValueError("an approval without approved_at needs an upper_bound")
    return {
        "kind": "approved",
        "decision": "approved",
        "event_at": dated or bound,
        "event_at_source": API_APPROVAL if dated else UNDATED_APPROVAL,
        "tier": policy.unclassified,
    } | _actor(item)


_BUILDERS = {LABEL_EVENT: _label_facts, STATE_EVENT: _state_facts, APPROVAL: _approval_facts}


def facts(instance: str, env: Mapping[str, Any], policy: LabelPolicy) -> EventFacts:
    """What one API fact says, in the same shape as a webhook's facts."""
    # Text from the API is as untrusted as a webhook body: bound it and make it storable.
    return bounded(EventFacts(**_base(instance, env), **_BUILDERS[env["fact"]](env, policy)))


def first_security_add(
    events: Sequence[Mapping[str, Any]], policy: LabelPolicy
) -> Mapping[str, Any] | None:
    """The earliest ``add`` of a security label among ``resource_label_events`` items."""
    adds = [
        item
        for item in events
        if item.get("action") == "add" and policy.is_security_label(label_name(item) or "")
    ]
    return min(adds, key=_when) if adds else None
