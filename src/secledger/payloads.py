"""Readers for the subset of GitLab's merge-request JSON secledger uses; extra fields are ignored.

GitLab's payloads vary by version and tier, so every reader tolerates a missing or
mistyped field and answers with an empty value rather than raising.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

STATE_IDS = {1: "opened", 2: "closed", 3: "merged", 4: "locked"}
# GitLab once had a state of its own for a reopened MR (its old system hooks send it):
# an open MR, as every later version calls it.
_STATE_NAMES = {"reopened": "opened"}
# Ids are stored as PostgreSQL bigint; anything outside is treated as absent.
_BIGINT = (-(2**63), 2**63 - 1)


def obj(container: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    """A nested object, or an empty one."""
    value = container.get(key)
    return value if isinstance(value, dict) else {}


def text(container: Mapping[str, Any], key: str) -> str | None:
    """A string field, or None."""
    value = container.get(key)
    return value if isinstance(value, str) else None


def integer(container: Mapping[str, Any], key: str) -> int | None:
    """An integer field (booleans and values outside bigint excluded), or None."""
    value = container.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value if _BIGINT[0] <= value <= _BIGINT[1] else None


def label_titles(items: object) -> list[str]:
    """Titles of a label list; webhooks say ``title``, the REST API says ``name``."""
    if not isinstance(items, list):
        return []
    titles: list[str] = []
    for item in items:
        if isinstance(item, dict):
            title = item["title"] if "title" in item else item.get("name")
            if isinstance(title, str):
                titles.append(title)
        elif isinstance(item, str):
            titles.append(item)
    return titles


def usernames(items: object) -> list[str]:
    """Usernames of a user list such as ``reviewers`` (absent when empty in GitLab)."""
    if not isinstance(items, list):
        return []
    return [
        item["username"]
        for item in items
        if isinstance(item, dict) and isinstance(item.get("username"), str)
    ]


def current_label_items(payload: Mapping[str, Any]) -> object:
    """The label list now, as sent: top-level, else under attributes, else from changes."""
    if isinstance(payload.get("labels"), list):
        return payload["labels"]
    attrs = obj(payload, "object_attributes")
    if isinstance(attrs.get("labels"), list):
        return attrs["labels"]
    return obj(obj(payload, "changes"), "labels").get("current")


def current_labels(payload: Mapping[str, Any]) -> list[str]:
    """The merge request's label titles now (see ``current_label_items``)."""
    return label_titles(current_label_items(payload))


def previous_labels(payload: Mapping[str, Any]) -> list[str] | None:
    """The label titles before this delivery changed them; None when it did not."""
    change = obj(obj(payload, "changes"), "labels")
    return label_titles(change.get("previous")) if change else None


def label_change(payload: Mapping[str, Any]) -> tuple[list[str], list[str]] | None:
    """``(previous, current)`` label titles when this delivery changed labels."""
    change = obj(obj(payload, "changes"), "labels")
    if not change:
        return None
    return label_titles(change.get("previous")), label_titles(change.get("current"))


def state_change(payload: Mapping[str, Any]) -> tuple[str | None, str | None] | None:
    """``(previous, current)`` state from ``changes.state`` (old) or ``changes.state_id`` (new)."""
    changes = obj(payload, "changes")
    named = obj(changes, "state")
    if named:
        return _state_name(text(named, "previous")), _state_name(text(named, "current"))
    numbered = obj(changes, "state_id")
    if numbered:
        prev, cur = integer(numbered, "previous"), integer(numbered, "current")
        return STATE_IDS.get(prev or 0), STATE_IDS.get(cur or 0)
    return None


def state_of(attrs: Mapping[str, Any]) -> str | None:
    """GitLab's state name from ``state`` or ``state_id``."""
    named = text(attrs, "state")
    if named:
        return _state_name(named)
    return STATE_IDS.get(integer(attrs, "state_id") or 0)


def _state_name(name: str | None) -> str | None:
    return _STATE_NAMES.get(name, name) if name is not None else None
