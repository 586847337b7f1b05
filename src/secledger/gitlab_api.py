"""The GitLab REST API client: python-gitlab, configured once, answering plain dicts.

python-gitlab owns authentication, pagination (it follows ``Link: rel="next"``; MR
listings page themselves, from the last MR read) and retries: it sleeps for
``Retry-After`` on 429 (given as a date, it is rewritten as seconds first) and, with
``retry_transient_errors``, backs off on 5xx. The token lives only inside the client;
it is never logged or printed.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar
from urllib.parse import urlsplit

import gitlab
import gitlab.exceptions
from gitlab.utils import EncodedId

from secledger.config import Settings
from secledger.errors import ConfigError, GitLabAPIError, TimestampError
from secledger.gitlab_http import OriginBoundSession, brief, retry_after_in_seconds, unreachable
from secledger.intake import origin
from secledger.times import isoformat, parse_time

PER_PAGE = 100
T = TypeVar("T")


@dataclass(frozen=True)
class Scope:
    """A project or a group, by numeric ID or full path."""

    kind: str  # "projects" or "groups", as in the API path
    ref: str

    @property
    def path(self) -> str:
        """The API path of this project or group."""
        return f"/{self.kind}/{EncodedId(self.ref)}"

    def __str__(self) -> str:
        return f"{self.kind[:-1]} {self.ref}"


def scopes(projects: tuple[str, ...], groups: tuple[str, ...]) -> list[Scope]:
    """Scopes from repeated ``--project`` and ``--group`` options."""
    return [Scope("projects", p) for p in projects] + [Scope("groups", g) for g in groups]


def _created_at(mr: dict[str, Any], path: str) -> datetime:
    try:
        return parse_time(mr["created_at"])
    except (KeyError, TypeError, TimestampError):
        raise GitLabAPIError(f"GitLab API: {path} answered an MR without created_at") from None


def _unseen(mrs: list[dict[str, Any]], seen: set[tuple[int, int]]) -> list[dict[str, Any]]:
    """The MRs not in ``seen``, which now holds them too."""
    fresh = []
    for mr in mrs:
        ref = (int(mr["project_id"]), int(mr["iid"]))
        if ref not in seen:
            seen.add(ref)
            fresh.append(mr)
    return fresh


def _calling(action: Callable[[], T], path: str, instance: str) -> T:
    try:
        return action()
    except gitlab.exceptions.GitlabError as exc:
        code = getattr(exc, "response_code", None)
        # The path says which endpoint: an old GitLab lacks some (resource_state_events).
        message = f"GitLab API: {path}: {code or 'error'}: {brief(exc.error_message)}"
        answer = _error_body(getattr(exc, "response_body", None))
        scope = code == 403 and answer.get("error") == "insufficient_scope"
        message += _token_hint(code, answer, scope=scope)
        status = code if isinstance(code, int) else None
        raise GitLabAPIError(message, status, short_of_scope=scope) from None
    except OSError as exc:  # requests' ConnectionError and timeouts are OSErrors
        where = f" at {instance}" if instance else ""
        raise GitLabAPIError(
            f"GitLab API unreachable{where}: {unreachable(exc)}", unreachable=True
        ) from None


def _error_body(body: object) -> dict[str, Any]:
    """GitLab's JSON error answer, or {} (a proxy's HTML page, nothing)."""
    try:
        data = json.loads(body) if isinstance(body, bytes | str) else None
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _token_hint(code: object, answer: dict[str, Any], *, scope: bool) -> str:
    """For a refused token (401) or a 403: GitLab's own description (python-gitlab keeps
    only its ``error`` word, such as ``insufficient_scope``) and what to check."""
    if code not in {401, 403}:
        return ""
    described = answer.get("error_description")
    said = f" ({brief(described)})" if isinstance(described, str) else ""
    if code == 403 and not scope:
        return (
            f"{said}; the token's user may not read this project's merge requests (GitLab"
            " answers 403 to a Guest of a private project): give it Reporter access"
        )
    return (
        f"{said}; the token (SECLEDGER_GITLAB_TOKEN) needs the read_api scope and access"
        " to the projects, and must not be expired or revoked"
    )


def _netloc(url: str) -> str:
    """The URL's authority part; empty when it cannot be read."""
    try:
        return urlsplit(url).netloc
    except ValueError:  # "https://[host": said below, as any unreadable URL
        return ""


@contextmanager
def about_existing_mr() -> Iterator[None]:
    """Around the requests about an MR just read: their 404 does not mean it is gone.
    resource_state_events exists from GitLab 13.2, an approvals endpoint may be missing,
    a proxy may answer 404; taken as deleted, the MR was reported "deleted or hidden"
    and its lookup counted as done."""
    try:
        yield
    except GitLabAPIError as exc:
        if exc.status != 404:
            raise
        raise GitLabAPIError(
            f"{exc} (the merge request itself exists: this endpoint is missing here)",
            exc.status,
            gone=False,
        ) from None


class GitLabAPI:
    """The few endpoints secledger reads and writes."""

    def __init__(self, client: gitlab.Gitlab, instance: str, max_retries: int = 10) -> None:
        self.client = client
        self.instance = instance
        self.max_retries = max_retries

    def _call(self, action: Callable[[], T], path: str) -> T:
        """``action()``, its failure a GitLabAPIError that says what went wrong."""
        return _calling(action, path, self.instance)

    @classmethod
    def from_settings(cls, settings: Settings) -> GitLabAPI:
        """A client for ``gitlab_url`` with the configured token; ConfigError when unset."""
        url = settings.gitlab_url
        token = settings.gitlab_token_value()
        instance = origin(url)
        if url and "@" in _netloc(url):
            # Named, never shown: the part before @ may be a password.
            raise ConfigError(
                "SECLEDGER_GITLAB_URL holds credentials (user@ or user:password@): give the"
                " base URL alone, and the token in SECLEDGER_GITLAB_TOKEN"
            )
        if not url or instance is None:
            raise ConfigError("set SECLEDGER_GITLAB_URL to the GitLab base URL (https://...)")
        if token is None:
            raise ConfigError(
                "set SECLEDGER_GITLAB_TOKEN or SECLEDGER_GITLAB_TOKEN_FILE (read_api scope)"
            )
        client = gitlab.Gitlab(
            url,
            private_token=token,
            timeout=settings.gitlab_timeout_seconds,
            retry_transient_errors=True,
            ssl_verify=True,
            # Next pages stay on the configured URL, whatever host GitLab's Link header
            # names (its external_url may differ, even be http://): the token goes along.
            keep_base_url=True,
            session=OriginBoundSession(instance),
        )
        client.session.hooks["response"].append(retry_after_in_seconds)
        return cls(client, instance, settings.gitlab_max_retries)

    def _list(self, path: str, query: Mapping[str, Any] | None = None) -> Iterator[dict[str, Any]]:
        # http_list does not apply Gitlab(per_page=...) (python-gitlab 8.6: only the
        # managers do): without it GitLab answers 20 a page, five times the requests
        # against its rate limit. Later pages follow the Link header, which keeps it.
        first_page = {"per_page": PER_PAGE, **(query or {})}
        listing = self._call(
            lambda: self.client.http_list(
                path, first_page, iterator=True, max_retries=self.max_retries
            ),
            path,
        )
        iterator = iter(listing)
        while True:
            item = self._call(lambda: next(iterator, None), path)
            if item is None:
                return
            yield item

    def _get(self, path: str) -> dict[str, Any]:
        result = self._call(lambda: self.client.http_get(path, max_retries=self.max_retries), path)
        if not isinstance(result, dict):
            raise GitLabAPIError(f"GitLab API: {path} did not answer a JSON object")
        return result

    def labels(self, scope: Scope) -> Iterator[dict[str, Any]]:
        """Labels of a project (with its groups'), or of a group with its ancestors', its
        subgroups' and those of the projects in it and in its subgroups."""
        query = {"include_ancestor_groups": "true"}
        if scope.kind == "groups":
            # GitLab's defaults (only_group_labels=true, include_descendant_groups=false)
            # leave out every label defined in a subgroup or a project (GitLab 13.6+).
            query |= {"include_descendant_groups": "true", "only_group_labels": "false"}
        return self._list(f"{scope.path}/labels", query)

    def project_ids(self, scope: Scope) -> list[int]:
        """The projects a scope covers: a project itself, or every project of a group and
        its subgroups. Projects only shared with a group are left out, as GitLab's list of
        a group's merge requests leaves them out."""
        if scope.kind == "projects":
            found = [self._get(scope.path)]
        else:
            query = {"include_subgroups": "true", "with_shared": "false", "simple": "true"}
            found = list(self._list(f"{scope.path}/projects", query))
        ids: list[int] = []
        for project in found:
            pid = project.get("id")
            if not isinstance(pid, int) or isinstance(pid, bool):
                raise GitLabAPIError(f"GitLab API: {scope} answered a project without a numeric id")
            ids.append(pid)
        return ids

    def merge_requests(
        self,
        scope: Scope,
        label: str | None,
        since: datetime,
        until: datetime | None,
        *,
        open_only: bool = False,
    ) -> Iterator[dict[str, Any]]:
        """MRs carrying ``label`` (every MR, with None) that may have been active in the
        period, any state, oldest first: updated since its start and, with ``until``,
        created before its end. With ``open_only``, the open ones whenever last updated:
        an approval or its revocation does not move ``updated_at``, so an MR only
        approved in the period is not "updated since" it.

        Not ``updated_before``: an MR active in the period and updated again after it
        would be left out, and its facts in the period with it.

        Ordered by creation, which an update does not change (an MR updated while the
        pages are read keeps its place), and paged from the last MR read, not by offset
        (``_list_by_creation``). A group's list includes its archived projects' MRs
        (GitLab leaves them out by default); an audit of the period needs them.
        """
        query: dict[str, Any] = {
            "state": "opened" if open_only else "all",
            "order_by": "created_at",
            "sort": "asc",
            "scope": "all",
        }
        if not open_only:
            query["updated_after"] = isoformat(since)
        if scope.kind == "groups":
            query["non_archived"] = "false"
        if label is not None:
            query["labels"] = label
        if until is not None:
            query["created_before"] = isoformat(until)
        return self._list_by_creation(f"{scope.path}/merge_requests", query)

    def _list_by_creation(self, path: str, query: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
        """Every MR of an MR listing ordered by ``created_at`` ascending, each once."""
        # By offset, an MR leaving the list while its pages are read (label removed, MR
        # deleted) moves every later one a place back, and the first of the next page is
        # never seen. MR lists offer no keyset pagination (GitLab's docs list the
        # endpoints that do: projects, groups, users, jobs, audit events, issues since
        # 18.3), and listing again what was updated during the run would not find the MR
        # that was skipped, which did not change. So each page asks for MRs created at or
        # after the last one read (``created_after`` is inclusive and GitLab writes times
        # truncated to the millisecond: none is left out), and those read already are
        # dropped. Only MRs created in one and the same millisecond, more than a page of
        # them, are still read by offset, the page number counting within that instant.
        after: datetime | None = None  # created_at of the last MR read
        page, seen = 1, set[tuple[int, int]]()
        while True:
            bounds: dict[str, Any] = {} if after is None else {"created_after": isoformat(after)}
            if page > 1:
                bounds["page"] = page
            items, more = self._page(path, {**query, **bounds})
            times = [_created_at(mr, path) for mr in items]
            if times != sorted(times) or (after is not None and times and times[0] < after):
                raise GitLabAPIError(f"GitLab API: {path} did not answer in creation order")
            fresh = _unseen(items, seen)
            yield from fresh
            if not more or not items:
                return
            # A first page may bring only MRs read already (all of one instant, they
            # filled the page before); a page read by offset that does shows the server
            # did not move on: one ignoring ``page`` would be asked page + 1 forever.
            if page > 1 and not fresh:
                raise GitLabAPIError(
                    f"GitLab API: {path} answered page {page} with only MRs read already"
                    " (does it ignore the page parameter?)"
                )
            if times[-1] == after:
                page += 1
            else:
                after, page = times[-1], 1

    def _page(self, path: str, query: Mapping[str, Any]) -> tuple[list[dict[str, Any]], bool]:
        """One page of a listing, and whether GitLab has another after it."""
        response = self._call(
            lambda: self.client.http_request(
                "get",
                path,
                query_data={"per_page": PER_PAGE, **query},
                max_retries=self.max_retries,
            ),
            path,
        )
        try:
            items = response.json()
        except ValueError:
            items = None
        if not isinstance(items, list):
            raise GitLabAPIError(f"GitLab API: {path} did not answer a JSON list")
        more = "next" in response.links or bool(response.headers.get("x-next-page"))
        return items, more

    def _mr_path(self, project_id: int, iid: int) -> str:
        return f"/projects/{project_id}/merge_requests/{iid}"

    def merge_request(self, project_id: int, iid: int) -> dict[str, Any]:
        """One merge request."""
        return self._get(self._mr_path(project_id, iid))

    def label_events(self, project_id: int, iid: int) -> list[dict[str, Any]]:
        """Every label added to or removed from a merge request, with who and when."""
        return list(self._list(f"{self._mr_path(project_id, iid)}/resource_label_events"))

    def state_events(self, project_id: int, iid: int) -> list[dict[str, Any]]:
        """Every close, merge and reopen of a merge request, with who and when."""
        return list(self._list(f"{self._mr_path(project_id, iid)}/resource_state_events"))

    def approvals(self, project_id: int, iid: int) -> dict[str, Any]:
        """Who approves the merge request now."""
        return self._get(f"{self._mr_path(project_id, iid)}/approvals")

    def hooks(self, scope: Scope) -> list[dict[str, Any]]:
        """The webhooks of a project or group."""
        return list(self._list(f"{scope.path}/hooks"))

    def add_hook(self, scope: Scope, data: Mapping[str, Any]) -> dict[str, Any]:
        """Register a webhook; the created hook (GitLab never returns its token)."""
        result = self._call(
            lambda: self.client.http_post(
                f"{scope.path}/hooks",
                post_data=dict(data),
                max_retries=self.max_retries,
                # A 5xx or a lost answer may come after GitLab created the hook: a retry
                # would create a second, and every event would arrive twice. 429 is
                # still retried (nothing was created); ``hooks.connect`` looks.
                retry_transient_errors=False,
            ),
            f"{scope.path}/hooks",
        )
        if not isinstance(result, dict):
            raise GitLabAPIError("GitLab API: creating the hook did not answer a JSON object")
        return result

    def hook_events(
        self, scope: Scope, hook_id: int, *, status: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        """The hook's deliveries (GitLab keeps 7 days), newest first, at most ``limit``;
        with ``status`` (``successful``, ``client_failure``, ``server_failure``), only
        those, where GitLab filters (older versions ignore it and answer all)."""
        query = {"status": status} if status else None
        events = self._list(f"{scope.path}/hooks/{hook_id}/events", query)
        return [event for _, event in zip(range(limit), events, strict=False)]
