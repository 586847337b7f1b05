"""Payload builders: GitLab's published examples, changed only where a case needs it."""

from __future__ import annotations

import copy
import json
import zlib
from datetime import datetime
from pathlib import Path
from typing import Any

from secledger.intake import Delivery, parse_delivery

PAYLOADS = Path(__file__).parent / "payloads"
_BASE = json.loads((PAYLOADS / "webhook_events_mr_open.json").read_text())

USERS = {
    "root": 1,
    "alice": 101,
    "bob": 102,
    "carol": 103,
    "dave": 104,
    "erin": 105,
}


def user_id(username: str) -> int:
    """A user's GitLab id: fixed for the usual cast, and one of its own for any other
    name (the ledger tells users apart by id where both sides carry one)."""
    return USERS.get(username) or 1000 + zlib.crc32(username.encode()) % 1_000_000


def sample(name: str) -> dict[str, Any]:
    """A published example as a dict."""
    return json.loads((PAYLOADS / name).read_text())


def label(title: str) -> dict[str, Any]:
    """A label object as webhooks send it."""
    return {
        "id": abs(hash(title)) % 100000,
        "title": title,
        "color": "#dc143c",
        "project_id": 14,
        "created_at": "2025-01-01 00:00:00 UTC",
        "updated_at": "2025-01-01 00:00:00 UTC",
        "template": False,
        "description": None,
        "type": "ProjectLabel",
        "group_id": None,
    }


def user(username: str) -> dict[str, Any]:
    """A user object as webhooks send it."""
    return {
        "id": user_id(username),
        "name": username.title(),
        "username": username,
        "avatar_url": None,
        "email": "[REDACTED]",
    }


APPROVAL_ACTIONS = frozenset({"approved", "approval", "unapproved", "unapproval"})


def mr_event(
    action: str | None,
    *,
    iid: int = 1,
    project_id: int = 14,
    labels: list[str] | None = None,
    actor: str = "root",
    author: str = "alice",
    updated_at: str | None = None,
    created_at: str = "2025-08-05 20:00:00 UTC",
    state: str | None = None,
    changes: dict[str, Any] | None = None,
    reviewers: list[str] | None = None,
    title: str = "Harden session cookies",
    actioned_at: str | None = None,
    old_gitlab: bool = False,
) -> dict[str, Any]:
    """A Merge Request Hook body for one action; ``None`` removes the action key.

    An approval or its revocation carries ``actioned_at`` (``updated_at`` unless given),
    as GitLab sends it now; ``old_gitlab`` leaves it out, as GitLab did before: then
    ``updated_at``, which GitLab does not move for these, is all that tells the time."""
    if updated_at is None:
        # GitLab stamps a new MR's updated_at with its created_at.
        updated_at = created_at if action == "open" else "2025-08-05 21:48:25 UTC"
    body = copy.deepcopy(_BASE)
    attrs = body["object_attributes"]
    attrs.update(
        id=1000 + iid,
        iid=iid,
        target_project_id=project_id,
        author_id=user_id(author),
        title=title,
        created_at=created_at,
        updated_at=updated_at,
        url=f"https://gitlab.example.com/acme/payments/-/merge_requests/{iid}",
    )
    body["project"].update(
        id=project_id,
        web_url="https://gitlab.example.com/acme/payments",
        path_with_namespace="acme/payments",
    )
    default_state = {"merge": "merged", "close": "closed"}.get(action or "", "opened")
    attrs["state"] = state or default_state
    attrs["state_id"] = {"opened": 1, "closed": 2, "merged": 3, "locked": 4}[attrs["state"]]
    if action is None:
        attrs.pop("action", None)
    else:
        attrs["action"] = action
    if action in APPROVAL_ACTIONS and not old_gitlab:
        attrs["actioned_at"] = actioned_at or updated_at
    label_objs = [label(t) for t in (labels if labels is not None else ["sec::high"])]
    body["labels"] = label_objs
    attrs["labels"] = copy.deepcopy(label_objs)
    body["user"] = user(actor)
    body["changes"] = changes if changes is not None else {}
    if reviewers:
        body["reviewers"] = [user(r) for r in reviewers]
    else:
        body.pop("reviewers", None)
    return body


def system_hook_event(
    action: str,
    *,
    iid: int = 1,
    project_id: int = 14,
    labels: list[str] | None = None,
    actor: str = "root",
    author: str = "alice",
    updated_at: str = "2025-08-05T21:48:25Z",
    created_at: str = "2025-08-05T20:00:00Z",
) -> dict[str, Any]:
    """A System Hook body for the MR ``mr_event`` builds, from GitLab's system-hook example.

    It tells the same event in other bytes: the example's own field set (no
    ``object_attributes.labels``, no ``reviewers``) and ISO times (``...T...Z``).
    """
    body = sample("system_hook_mr_open.json")
    attrs = body["object_attributes"]
    attrs.update(
        id=1000 + iid,
        iid=iid,
        target_project_id=project_id,
        author_id=user_id(author),
        title="Harden session cookies",
        created_at=created_at,
        updated_at=updated_at,
        url=f"https://gitlab.example.com/acme/payments/-/merge_requests/{iid}",
        action=action,
        state={"merge": "merged", "close": "closed"}.get(action, "opened"),
    )
    if action in APPROVAL_ACTIONS:
        attrs["actioned_at"] = updated_at
    body["project"].update(
        id=project_id,
        web_url="https://gitlab.example.com/acme/payments",
        path_with_namespace="acme/payments",
    )
    body["labels"] = [label(t) for t in (labels if labels is not None else ["sec::high"])]
    body["user"] = user(actor)
    body["changes"] = {}
    return body


def label_change(previous: list[str], current: list[str], at: str) -> dict[str, Any]:
    """``changes`` for a label edit at ``at``."""
    return {
        "labels": {
            "previous": [label(t) for t in previous],
            "current": [label(t) for t in current],
        },
        "updated_at": {"previous": "2025-08-05 20:00:00 UTC", "current": at},
    }


def dumps(body: dict[str, Any]) -> bytes:
    """Encode a body as GitLab would send it."""
    return json.dumps(body).encode()


def delivery_of(body: dict[str, Any] | bytes, key: str, received_at: datetime) -> Delivery:
    """``body`` as a merge-request delivery with Idempotency-Key ``key`` (no token check)."""
    parsed = parse_delivery(
        {"x-gitlab-event": "Merge Request Hook", "idempotency-key": key},
        body if isinstance(body, bytes) else dumps(body),
        secrets=(),
        max_body_bytes=1 << 20,
        received_at=received_at,
        require_token=False,
    )
    assert isinstance(parsed, Delivery)
    return parsed
