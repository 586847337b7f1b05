"""One merge request's history, told twice: as webhook bodies and as GitLab API answers.

Both tellings come from the same facts, so a ledger built from either (or both) can
be compared. Webhook times have second precision (MR ``updated_at``); the API's own
event times carry milliseconds, a fraction of a second later, as in real GitLab.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from builders import label_change, mr_event, user_id
from fakegitlab import FakeGitLab

WEB = "https://gitlab.example.com"


def api_user(username: str) -> dict[str, Any]:
    """A user as the REST API returns it."""
    return {
        "id": user_id(username),
        "name": username.title(),
        "username": username,
        "state": "active",
        "avatar_url": None,
        "web_url": f"{WEB}/{username}",
    }


def iso(second_text: str, millis: int) -> str:
    """``2025-08-05 21:00:00 UTC`` plus ``millis`` as the REST API spells it."""
    return second_text.replace(" UTC", "").replace(" ", "T") + f".{millis:03d}Z"


@dataclass
class Story:
    """A security MR: opened with a label by ``author``, approved, then merged or closed."""

    iid: int
    project_id: int = 14
    path: str = "acme/payments"
    author: str = "alice"
    label: str = "sec::high"
    created: str = "2025-08-05 20:00:00 UTC"
    approvals: list[tuple[str, str]] = field(
        default_factory=lambda: [("bob", "2025-08-05 21:00:00 UTC")]
    )
    decision: tuple[str, str, str] | None = ("merge", "carol", "2025-08-05 21:48:25 UTC")
    relabel: tuple[str, str, str] | None = None  # (new label, by, at): a tier change
    opened_with_label: bool = True
    approved_at_in_api: bool = True
    next_event_id: int = 100

    def _event_id(self) -> int:
        self.next_event_id += 1
        return self.iid * 1000 + self.next_event_id

    def webhooks(self) -> list[dict[str, Any]]:
        """The Merge Request Hook bodies GitLab sent, in order."""
        bodies = []
        common = {"iid": self.iid, "project_id": self.project_id, "created_at": self.created}
        common |= {"author": self.author}
        labels = [self.label]
        if self.opened_with_label:
            bodies.append(
                mr_event(
                    "open", actor=self.author, updated_at=self.created, labels=labels, **common
                )
            )
        if self.relabel:
            new, by, at = self.relabel
            change = label_change(labels, [new], at)
            labels = [new]
            bodies.append(
                mr_event("update", actor=by, updated_at=at, labels=labels, changes=change, **common)
            )
        for who, at in self.approvals:
            bodies.append(mr_event("approved", actor=who, updated_at=at, labels=labels, **common))
        if self.decision:
            action, who, at = self.decision
            bodies.append(mr_event(action, actor=who, updated_at=at, labels=labels, **common))
        return bodies

    def mr(self) -> dict[str, Any]:
        """The merge request as the REST API lists it."""
        labels = [self.relabel[0]] if self.relabel else [self.label]
        state, merged_at, closed_at, merge_user, closed_by = "opened", None, None, None, None
        updated = iso(self.created, 0)
        if self.decision:
            action, who, at = self.decision
            updated = iso(at, 394)
            if action == "merge":
                state, merged_at, merge_user = "merged", iso(at, 394), api_user(who)
            else:
                state, closed_at, closed_by = "closed", iso(at, 394), api_user(who)
        return {
            "id": 1000 + self.iid,
            "iid": self.iid,
            "project_id": self.project_id,
            "title": "Harden session cookies",
            "state": state,
            "created_at": iso(self.created, 0),
            "updated_at": updated,
            "merged_at": merged_at,
            "closed_at": closed_at,
            "merge_user": merge_user,
            "merged_by": merge_user,
            "closed_by": closed_by,
            "author": api_user(self.author),
            "labels": labels,
            "web_url": f"{WEB}/{self.path}/-/merge_requests/{self.iid}",
            "references": {"short": f"!{self.iid}", "full": f"{self.path}!{self.iid}"},
        }

    def label_events(self) -> list[dict[str, Any]]:
        """``resource_label_events``: the label added at creation, and any tier change."""
        events = [self._label_event("add", self.label, self.author, iso(self.created, 120))]
        if self.relabel:
            new, by, at = self.relabel
            events.append(self._label_event("remove", self.label, by, iso(at, 250)))
            events.append(self._label_event("add", new, by, iso(at, 250)))
        return events

    def _label_event(self, action: str, name: str, who: str, at: str) -> dict[str, Any]:
        return {
            "id": self._event_id(),
            "user": api_user(who),
            "created_at": at,
            "resource_type": "MergeRequest",
            "resource_id": 1000 + self.iid,
            "label": {
                "id": abs(hash(name)) % 1000,
                "name": name,
                "color": "#dc143c",
                "description": "",
            },
            "action": action,
        }

    def state_events(self) -> list[dict[str, Any]]:
        """``resource_state_events`` for the decision."""
        if not self.decision:
            return []
        action, who, at = self.decision
        state = "merged" if action == "merge" else "closed"
        return [
            {
                "id": self._event_id(),
                "user": api_user(who),
                "created_at": iso(at, 394),
                "resource_type": "MergeRequest",
                "resource_id": 1000 + self.iid,
                "state": state,
            }
        ]

    def approved_by(self) -> list[dict[str, Any]]:
        """``approved_by`` of the approvals endpoint."""
        out = []
        for who, at in self.approvals:
            item: dict[str, Any] = {"user": api_user(who)}
            if self.approved_at_in_api:
                item["approved_at"] = iso(at, 450)
            out.append(item)
        return out

    def publish(self, fake: FakeGitLab) -> None:
        """Serve this history from the fake API."""
        project = fake.projects.get(self.project_id) or fake.add_project(self.project_id, self.path)
        for name in (self.label, *(self.relabel[:1] if self.relabel else ())):
            if name not in project.labels:
                project.labels.append(name)
        project.mrs[self.iid] = self.mr()
        project.label_events[self.iid] = self.label_events()
        project.state_events[self.iid] = self.state_events()
        project.approvals[self.iid] = self.approved_by()
