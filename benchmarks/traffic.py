"""Realistic webhook requests for the benchmark, built once as byte templates.

Every request is unique (its own Idempotency-Key, merge request and times), so the
zero-loss check can match answers to log rows exactly. Bodies start from GitLab's
published Merge Request Hook example and are padded to ~10 KB the way real ones are:
a Markdown description, several labels, assignees and reviewers.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "tests" / "payloads" / "webhook_events_mr_open.json"
INSTANCE = "https://gitlab.example.com"
TOKEN = "bench-token-0123456789abcdef"
WINDOW = 500  # merge requests in flight at once in the security mix
STEPS = ("open", "update", "approved", "finish")  # finish: merge for 4 MRs in 5, else close

_SLOT = re.compile(rb"(@@[A-Z_]+@@)")
_DESCRIPTION = (
    "## What does this MR do?\n\nReworks the session handling so that cookies are"
    " rotated on privilege change and bound to the client. Follows up on the review"
    " of the authentication flow.\n\n## Checklist\n\n- [x] tests added\n- [x] docs"
    " updated\n- [ ] changelog entry\n\n```ruby\nsession.regenerate!\ncookies.encrypted"
    "[:sid] = { value: sid, httponly: true, secure: true, same_site: :strict }\n```\n"
) * 6


def _label(title: str, n: int) -> dict[str, object]:
    return {
        "id": 4000 + n,
        "title": title,
        "color": "#dc143c",
        "project_id": 14,
        "created_at": "2025-01-01 00:00:00 UTC",
        "updated_at": "2025-01-01 00:00:00 UTC",
        "template": False,
        "description": f"Label {title} used by the triage bot",
        "type": "ProjectLabel",
        "group_id": None,
    }


def _user(name: str, n: int) -> dict[str, object]:
    return {
        "id": 100 + n,
        "name": name.title(),
        "username": name,
        "avatar_url": f"https://gitlab.example.com/uploads/-/system/user/avatar/{100 + n}/a.png",
        "email": "[REDACTED]",
    }


class Template:
    """A body or request with named ``@@SLOTS@@``, filled in by joining bytes."""

    def __init__(self, raw: bytes) -> None:
        self.parts = _SLOT.split(raw)

    def render(self, values: dict[bytes, bytes]) -> bytes:
        parts = self.parts
        out = [parts[0]]
        for i in range(1, len(parts), 2):
            out.append(values[parts[i]])
            out.append(parts[i + 1])
        return b"".join(out)


def _body(action: str, labels: list[str], actor: str, changes: dict[str, object]) -> Template:
    body = json.loads(SAMPLE.read_text())
    attrs = body["object_attributes"]
    attrs.update(
        id="@@MR_ID@@",
        iid="@@IID@@",
        target_project_id="@@PROJECT@@",
        description=_DESCRIPTION,
        created_at="@@CREATED@@",
        updated_at="@@UPDATED@@",
        url=f"{INSTANCE}/acme/payments/-/merge_requests/@@IID@@",
        action=action,
    )
    attrs["state"], attrs["state_id"] = {"merge": ("merged", 3), "close": ("closed", 2)}.get(
        action, ("opened", 1)
    )
    body["project"].update(
        id="@@PROJECT@@",
        web_url=f"{INSTANCE}/acme/payments",
        path_with_namespace="acme/payments",
    )
    body["labels"] = [_label(t, n) for n, t in enumerate(labels)]
    attrs["labels"] = copy.deepcopy(body["labels"])
    body["user"] = _user(actor, 1)
    body["assignees"] = [_user("alice", 2), _user("dave", 4)]
    body["reviewers"] = [_user("bob", 3), _user("carol", 5)]
    body["changes"] = changes
    raw = orjson.dumps(body)
    for name in (b"MR_ID", b"IID", b"PROJECT"):  # integers: drop the quotes
        raw = raw.replace(b'"@@%s@@"' % name, b"@@%s@@" % name)
    return Template(raw)


def _changes(previous: list[str], current: list[str]) -> dict[str, object]:
    return {
        "labels": {
            "previous": [_label(t, n) for n, t in enumerate(previous)],
            "current": [_label(t, n) for n, t in enumerate(current)],
        },
        "updated_at": {"previous": "@@CREATED@@", "current": "@@UPDATED@@"},
    }


PLAIN = ["backend", "performance", "needs-docs", "team::payments"]
SECURE = ["sec::high", "backend", "team::payments"]
BODIES = {
    "ignored": _body("update", PLAIN, "alice", _changes(PLAIN[:2], PLAIN)),
    "open": _body("open", SECURE, "alice", {}),
    "update": _body("update", [*SECURE, "reviewed"], "alice", _changes(SECURE, [*SECURE, "x"])),
    "approved": _body("approved", [*SECURE, "reviewed"], "bob", {}),
    "merge": _body("merge", [*SECURE, "reviewed"], "carol", {}),
    "close": _body("close", [*SECURE, "reviewed"], "carol", {}),
}
_HEAD = Template(
    b"POST @@PATH@@ HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: GitLab/18.3.0\r\n"
    b"Content-Type: application/json\r\nX-Gitlab-Event: Merge Request Hook\r\n"
    b"X-Gitlab-Instance: " + INSTANCE.encode() + b"\r\nX-Gitlab-Token: " + TOKEN.encode() + b"\r\n"
    b"X-Gitlab-Webhook-UUID: @@KEY@@\r\nX-Gitlab-Event-UUID: @@KEY@@\r\n"
    b"Idempotency-Key: @@KEY@@\r\nContent-Length: @@LENGTH@@\r\n\r\n"
)
_EPOCH = datetime(2025, 6, 1, tzinfo=UTC)


def _stamp(minutes: int) -> bytes:
    return (_EPOCH + timedelta(minutes=minutes)).strftime("%Y-%m-%d %H:%M:%S UTC").encode()


@dataclass(frozen=True)
class Plan:
    """Which requests one client process sends: ``mix`` is ignored, security or mixed."""

    run: str
    mix: str
    project: int
    client: int
    path: bytes = b"/webhooks/gitlab"
    security_path: bytes = b"/webhooks/gitlab"  # the ceiling app inserts only on this path

    def request(self, k: int) -> tuple[bytes, bool]:
        """The ``k``-th request of this client, and whether it is a security delivery."""
        if self.mix == "ignored" or (self.mix == "mixed" and k % 10 != 0):
            return self._render("ignored", 5_000_000 + k, 0, self.path), False
        n = k // 10 if self.mix == "mixed" else k
        block, rest = divmod(n, len(STEPS) * WINDOW)
        step, slot = divmod(rest, WINDOW)
        mr = block * WINDOW + slot
        name = STEPS[step]
        if name == "finish":
            name = "close" if mr % 5 == 4 else "merge"
        return self._render(name, mr, step, self.security_path), True

    def _render(self, name: str, mr: int, step: int, path: bytes) -> bytes:
        iid = self.client * 10_000_000 + mr + 1
        body = BODIES[name].render(
            {
                b"@@MR_ID@@": b"%d" % (self.project * 100_000_000 + iid),
                b"@@IID@@": b"%d" % iid,
                b"@@PROJECT@@": b"%d" % self.project,
                b"@@CREATED@@": _stamp(mr),
                b"@@UPDATED@@": _stamp(mr + 60 * (step + 1)),
            }
        )
        head = _HEAD.render(
            {
                b"@@PATH@@": path,
                b"@@KEY@@": f"{self.run}-{self.client}-{name}-{iid}".encode(),
                b"@@LENGTH@@": b"%d" % len(body),
            }
        )
        return head + body
