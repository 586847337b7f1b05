"""Set-up help: register secledger's webhook in GitLab, and check that it is delivering.

The secret token is generated here, written to the TOML configuration file (mode
0600) before GitLab is told about it, and never printed.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomlkit

from secledger.errors import ConfigError, GitLabAPIError
from secledger.gitlab_api import GitLabAPI, Scope
from secledger.times import parse_time, utcnow

# GitLab turns push events on unless told otherwise; secledger wants merge requests only.
HOOK_EVENTS = {
    "merge_requests_events": True,
    "push_events": False,
    "issues_events": False,
    "confidential_issues_events": False,
    "note_events": False,
    "confidential_note_events": False,
    "tag_push_events": False,
    "pipeline_events": False,
    "job_events": False,
    "wiki_page_events": False,
    "deployment_events": False,
    "releases_events": False,
}


def add_secret(config: Path, secret: str) -> None:
    """Append ``secret`` to ``webhook_secrets`` in the TOML file, keeping everything else."""
    document = tomlkit.parse(config.read_text()) if config.exists() else tomlkit.document()
    current = document.get("webhook_secrets", [])
    if isinstance(current, str):  # a comma-separated string is accepted too
        current = [part.strip() for part in current.split(",") if part.strip()]
    document["webhook_secrets"] = [*current, secret]
    config.parent.mkdir(parents=True, exist_ok=True)
    config.touch(mode=0o600, exist_ok=True)
    config.chmod(0o600)
    config.write_text(tomlkit.dumps(document))


def remove_secret(config: Path, secret: str) -> None:
    """Take ``secret`` out of ``webhook_secrets`` again, keeping everything else."""
    document = tomlkit.parse(config.read_text())
    current = document.get("webhook_secrets", [])
    if isinstance(current, str):
        current = [part.strip() for part in current.split(",") if part.strip()]
    document["webhook_secrets"] = [kept for kept in current if kept != secret]
    config.write_text(tomlkit.dumps(document))


def find_hooks(hooks: list[dict[str, Any]], url: str | None) -> list[dict[str, Any]]:
    """Hooks pointing at ``url``, or at any ``/webhooks/gitlab`` receiver when none is given."""
    if url is not None:
        return [h for h in hooks if _url(h) == url.rstrip("/")]
    return [h for h in hooks if _url(h).endswith("/webhooks/gitlab")]


def _url(hook: Mapping[str, Any]) -> str:
    return str(hook.get("url", "")).rstrip("/")


def connect(api: GitLabAPI, scope: Scope, url: str, config: Path) -> dict[str, Any]:
    """Register a merge-request-only hook with a new secret; the created hook."""
    if not url.startswith("https://"):
        raise ConfigError("the receiver URL must be https:// (GitLab verifies its certificate)")
    existing = find_hooks(api.hooks(scope), url)
    if existing:
        raise ConfigError(
            f"{scope} already has hook {existing[0].get('id')} for {url}; "
            "see `secledger gitlab check`"
        )
    secret = secrets.token_urlsafe(32)
    add_secret(config, secret)  # first, so the receiver accepts GitLab's first delivery
    data = {"url": url, "token": secret, "enable_ssl_verification": True, **HOOK_EVENTS}
    try:
        return api.add_hook(scope, data)
    except GitLabAPIError as exc:
        if exc.status is not None and 400 <= exc.status < 500:
            # GitLab answered and refused: no hook will ever send this secret, and a
            # secret the receiver accepts should belong to one.
            remove_secret(config, secret)
            raise
        failure = exc
    # No answer, or a 5xx: the hook may have been created all the same (it is not
    # retried, which would have made a second one). GitLab's list says so when it is
    # there; when it is not, GitLab may still be creating it (a proxy's timeout), so
    # the secret stays, for a hook that may appear.
    try:
        created = find_hooks(api.hooks(scope), url)
    except GitLabAPIError:
        created = []
    if created:
        return created[0]
    raise GitLabAPIError(
        f"{failure}; the hook is not listed (yet): the secret stays in {config} (the"
        " last of webhook_secrets); run `secledger gitlab check` in a minute, and if no"
        " hook appears, remove that secret and run `gitlab connect` again",
        failure.status,
    ) from None


def succeeded(event: Mapping[str, Any]) -> bool:
    """GitLab counts 2xx and 3xx answers as delivered."""
    status = str(event.get("response_status", ""))
    return status.isdigit() and 200 <= int(status) < 400


@dataclass(frozen=True)
class HookHealth:
    """What ``gitlab check`` reports for one hook."""

    hook: dict[str, Any]
    last_success: dict[str, Any] | None
    failures: list[dict[str, Any]] = field(default_factory=list)
    # Ids of the scope's other hooks that deliver to the same URL.
    twins: list[int] = field(default_factory=list)
    # Ids of failures whose Idempotency-Key a later successful delivery carried (resent).
    resent: frozenset[object] = frozenset()

    @property
    def unresolved(self) -> list[dict[str, Any]]:
        """The failures not delivered since by a resend."""
        return [e for e in self.failures if e.get("id") not in self.resent]

    @property
    def enabled(self) -> bool:
        """False while GitLab has disabled the hook after repeated failures.

        GitLab's ``alert_status`` says it (``executable`` once a temporary disabling is
        over, though ``disabled_until`` keeps its past time until the next success);
        without it (an older GitLab), ``disabled_until`` still in the future does."""
        status = self.hook.get("alert_status")
        if status is not None:
            return bool(status == "executable")
        until = self.hook.get("disabled_until")
        if not until:
            return True
        try:
            return parse_time(str(until)) <= utcnow()
        except ValueError:
            return False

    @property
    def problems(self) -> list[str]:
        """Why this hook may lose deliveries; empty when it looks healthy."""
        found = []
        if not self.enabled:
            found.append(f"disabled ({self.hook.get('alert_status')})")
        if not self.hook.get("merge_requests_events"):
            found.append("merge request events are off")
        if not self.hook.get("enable_ssl_verification", True):
            found.append("SSL verification is off")
        if self.unresolved:
            found.append(f"{len(self.unresolved)} failed deliveries in the last 7 days")
        if self.twins:
            others = ", ".join(str(twin) for twin in self.twins)
            found.append(
                f"hook {others} also delivers to this URL: each event arrives"
                f" {len(self.twins) + 1} times (delete all but one in GitLab)"
            )
        return found


# Failed deliveries read per kind: a week of them, unless the receiver was down for long.
MAX_FAILURES_READ = 10_000


def check(api: GitLabAPI, scope: Scope, url: str | None) -> list[HookHealth]:
    """The health of every secledger hook of a project or group."""
    report = []
    hooks = find_hooks(api.hooks(scope), url)
    for hook in hooks:
        hook_id = int(hook["id"])
        newest = api.hook_events(scope, hook_id)
        success = next((e for e in newest if succeeded(e)), None)
        twins = [int(h["id"]) for h in hooks if h is not hook and _url(h) == _url(hook)]
        failures = _failures(api, scope, hook_id, newest)
        report.append(HookHealth(hook, success, failures, twins, _resent(failures, newest)))
    return report


def idempotency_key(event: Mapping[str, Any]) -> str | None:
    """The Idempotency-Key GitLab sent with a delivery (a resend keeps it)."""
    headers = event.get("request_headers")
    if not isinstance(headers, Mapping):
        return None
    for name, value in headers.items():
        if str(name).lower() == "idempotency-key" and value:
            return str(value)
    return None


def _resent(failures: list[dict[str, Any]], newest: list[dict[str, Any]]) -> frozenset[object]:
    """Failures delivered since: a successful delivery among the newest carries the
    same Idempotency-Key (a resend, from GitLab's page or the API)."""
    delivered = {
        (key, str(e.get("created_at", "")))
        for e in newest
        if succeeded(e) and (key := idempotency_key(e)) is not None
    }
    return frozenset(
        failure.get("id")
        for failure in failures
        if any(
            key == idempotency_key(failure) and when > str(failure.get("created_at", ""))
            for key, when in delivered
        )
    )


def _failures(
    api: GitLabAPI, scope: Scope, hook_id: int, newest: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Every failed delivery GitLab still keeps, newest first. The newest page alone
    missed older failures of a busy hook: 100 deliveries may be an hour of them. Those
    GitLab files under no status (a timeout, a refused connection) are found among the
    newest ones only."""
    found: dict[object, dict[str, Any]] = {}
    for status in ("server_failure", "client_failure"):
        for event in api.hook_events(scope, hook_id, status=status, limit=MAX_FAILURES_READ):
            found.setdefault(event.get("id"), event)
    for event in newest:
        found.setdefault(event.get("id"), event)
    failures = [e for e in found.values() if not succeeded(e)]
    return sorted(failures, key=lambda e: str(e.get("created_at", "")), reverse=True)
