"""A small GitLab REST API on 127.0.0.1 for tests and benchmarks: real HTTP, recorded shapes.

Responses follow GitLab's documented shapes (``tests/payloads/api_*.json``). Groups nest
by path (``acme/platform`` is a subgroup of ``acme``) and hold group-level labels; the
label lists answer with GitLab's defaults (a group's: its own labels and its ancestors',
no subgroup's, no project's). Lists are
paginated like GitLab's offset pagination (``x-next-page``, ``x-total``, ``Link``), with
a page size the server caps, any path can be made to answer 429 with ``Retry-After``
once, and any endpoint can be made missing (404, as on a GitLab too old to have it, or
behind a proxy). MR lists are ordered as GitLab orders them (``order_by``,
``sort``, ties broken by id, descending). Every request is logged for assertions, and
``after`` is called with each one answered, so a test can change GitLab between two
requests (an MR leaving a list while its pages are read).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

TOKEN = "glpat-test-token"
API = "/api/v4"


@dataclass
class Seen:
    """One request the fake answered."""

    method: str
    path: str
    query: dict[str, str]
    status: int
    at: float


@dataclass
class Project:
    """A project and everything the fake knows about it."""

    id: int
    path: str
    labels: list[str] = field(default_factory=list)
    mrs: dict[int, dict[str, Any]] = field(default_factory=dict)
    label_events: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    state_events: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    approvals: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    hooks: list[dict[str, Any]] = field(default_factory=list)
    hook_events: dict[int, list[dict[str, Any]]] = field(default_factory=dict)


class FakeGitLab:
    """The server state, the HTTP server, and the thread serving it."""

    def __init__(self, *, max_per_page: int = 100, latency: tuple[float, float] = (0, 0)) -> None:
        self.projects: dict[int, Project] = {}
        self.groups: dict[str, list[int]] = {}  # group path -> ids of its own projects
        self.group_labels: dict[str, list[str]] = {}  # group path -> group-level labels
        self.group_ids: dict[int, str] = {}
        self.max_per_page = max_per_page
        self.latency = latency
        # path fragment -> Retry-After (seconds, or an HTTP-date as proxies send; a callable
        # is asked for it when the 429 is sent), answered once
        self.throttle: dict[str, int | str | Callable[[], str]] = {}
        self.missing: set[str] = set()  # path endings that answer 404 whatever they name
        self.seen: list[Seen] = []
        self.after: Callable[[Seen], None] | None = None  # called with each request answered
        self.hook_tokens: dict[int, str] = {}  # GitLab never returns a hook's token
        # The next hook creations answer 502: "after" once GitLab created the hook (its
        # answer lost on the way back, as through a proxy's timeout), "before" without.
        self.hook_post_502: list[str] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        """Base URL, as SECLEDGER_GITLAB_URL."""
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeGitLab:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    def add_project(self, pid: int, path: str, group: str | None = None) -> Project:
        """A project, optionally in a group (created with its parents if need be)."""
        project = Project(pid, path)
        self.projects[pid] = project
        if group is not None:
            self.add_group(group)
            self.groups[group].append(pid)
            self.group_ids.setdefault(900 + len(self.group_ids), group)
        return project

    def add_group(self, path: str, labels: tuple[str, ...] = ()) -> None:
        """A group (with its parents), and labels defined at its level."""
        for known in (*ancestors(path), path):
            self.groups.setdefault(known, [])
        self.group_labels.setdefault(path, []).extend(labels)

    def self_and_descendants(self, path: str) -> list[str]:
        """A group and its subgroups, at any depth."""
        return [g for g in self.groups if g == path or g.startswith(f"{path}/")]

    def group_of(self, project: Project) -> str | None:
        """The group a project sits in directly, if any."""
        return next((g for g, pids in self.groups.items() if project.id in pids), None)

    def project(self, ref: str) -> Project | None:
        """A project by numeric ID or full path."""
        if ref.isdigit():
            return self.projects.get(int(ref))
        return next((p for p in self.projects.values() if p.path == ref), None)

    def group_path(self, ref: str) -> str | None:
        """A group's path from its ID or path; None for an unknown group."""
        path = self.group_ids.get(int(ref)) if ref.isdigit() else ref
        return path if path in self.groups else None

    def group_projects(self, path: str, *, subgroups: bool = True) -> list[Project]:
        """The projects of a group, with those of its subgroups by default."""
        paths = self.self_and_descendants(path) if subgroups else [path]
        return [self.projects[pid] for g in paths for pid in self.groups[g]]

    def count(self, fragment: str) -> int:
        """How many requests had ``fragment`` in their path."""
        return sum(fragment in s.path for s in self.seen)


def _handler(fake: FakeGitLab) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_args: Any) -> None:  # keep test output quiet
            return

        def do_GET(self) -> None:
            self._serve("GET")

        def do_POST(self) -> None:
            self._serve("POST")

        def _serve(self, method: str) -> None:
            parts = urlsplit(self.path)
            query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
            status, body, headers = self._answer(method, parts.path, query)
            seen = Seen(method, parts.path, query, status, time.monotonic())
            with fake.lock:
                fake.seen.append(seen)
            if fake.after is not None:
                fake.after(seen)
            low, high = fake.latency
            if high:
                time.sleep(low + (high - low) * (hash(self.path) % 1000) / 1000)
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def _answer(
            self, method: str, path: str, query: dict[str, str]
        ) -> tuple[int, Any, dict[str, str]]:
            if self.headers.get("PRIVATE-TOKEN") != TOKEN:
                return 401, {"message": "401 Unauthorized"}, {}
            with fake.lock:
                for fragment, wait in list(fake.throttle.items()):
                    if fragment in path:
                        del fake.throttle[fragment]
                        said = wait() if callable(wait) else str(wait)
                        return 429, {"message": "Retry later"}, {"Retry-After": said}
            if any(path.endswith(ending) for ending in fake.missing):
                return 404, {"message": "404 Not found"}, {}
            if method == "POST":
                length = int(self.headers.get("Content-Length") or 0)
                data = json.loads(self.rfile.read(length) or b"{}")
                fails = fake.hook_post_502.pop(0) if fake.hook_post_502 else None
                if fails == "before":
                    return 502, {"message": "502 Bad Gateway"}, {}
                created = _post(fake, path, data)
                return (502, {"message": "502 Bad Gateway"}, {}) if fails else created
            found = _get(fake, path, query)
            if found is None:
                return 404, {"message": "404 Not found"}, {}
            if isinstance(found, list):
                return _page(fake, path, query, found)
            return 200, found, {}

    return Handler


def ancestors(path: str) -> list[str]:
    """The parent groups of a group path, outermost first."""
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def _flag(query: dict[str, str], name: str, default: bool) -> bool:
    return query.get(name, str(default)).lower() in {"true", "1"}


def _segments(path: str) -> list[str]:
    return [unquote(s) for s in path.removeprefix(API).strip("/").split("/")]


def _labels_matching(mrs: list[dict[str, Any]], query: dict[str, str]) -> list[dict[str, Any]]:
    wanted = [label for label in query.get("labels", "").split(",") if label]
    bounds = [
        (name, field, query.get(f"{field.removesuffix('_at')}_{name}"))
        for name in ("after", "before")
        for field in ("created_at", "updated_at")
    ]
    state = query.get("state", "all")
    out = []
    for mr in mrs:
        if not all(label in mr["labels"] for label in wanted):
            continue
        if state != "all" and mr["state"] != state:
            continue
        if all(_within(mr[field], name, bound) for name, field, bound in bounds):
            out.append(mr)
    return _ordered(out, query)


def _ordered(mrs: list[dict[str, Any]], query: dict[str, str]) -> list[dict[str, Any]]:
    """GitLab's order: ``order_by`` (default created_at), ``sort`` (default desc), then
    ``id`` descending whatever the sort (``Issuable.sort_by_attribute`` breaks ties so)."""
    column = query.get("order_by", "created_at")
    if query.get("sort", "desc") == "asc":
        return sorted(mrs, key=lambda m: (datetime.fromisoformat(m[column]), -m["id"]))
    return sorted(mrs, key=lambda m: (datetime.fromisoformat(m[column]), m["id"]), reverse=True)


def _within(moment: str, name: str, bound: str | None) -> bool:
    """``created_after``/``updated_after`` and their ``_before``: GitLab includes both
    ends (``CreatedAtFilterable``: ``gteq``/``lteq``)."""
    if bound is None:
        return True
    at, edge = datetime.fromisoformat(moment), datetime.fromisoformat(bound)
    return at >= edge if name == "after" else at <= edge


def _get(fake: FakeGitLab, path: str, query: dict[str, str]) -> Any:
    seg = _segments(path)
    if len(seg) == 2 and seg[0] == "projects":
        found = fake.project(seg[1])
        return None if found is None else _project_json(found)
    if len(seg) < 3:
        return None
    kind, ref, rest = seg[0], seg[1], seg[2:]
    if kind == "groups":
        group = fake.group_path(ref)
        if group is None:
            return None
        return _group_get(fake, group, rest, query)
    project = fake.project(ref)
    if kind != "projects" or project is None:
        return None
    return _project_get(fake, project, rest, query)


def _group_get(fake: FakeGitLab, group: str, rest: list[str], query: dict[str, str]) -> Any:
    if rest == ["projects"]:
        projects = fake.group_projects(group, subgroups=_flag(query, "include_subgroups", False))
        return [_project_json(p) for p in projects]
    if rest == ["labels"]:
        return _group_labels(fake, group, query)
    if rest == ["merge_requests"]:  # a group's MRs include its subgroups'
        mrs = [m for p in fake.group_projects(group) for m in p.mrs.values()]
        return _labels_matching(mrs, query)
    if rest == ["hooks"]:
        return []
    return None


def _group_labels(fake: FakeGitLab, group: str, query: dict[str, str]) -> list[dict[str, Any]]:
    """GitLab's LabelsFinder behind ``GET /groups/:id/labels``, with the API's defaults:
    include_ancestor_groups=true, include_descendant_groups=false, only_group_labels=true.
    Asked for descendants, the project labels read are those of the subgroups' projects too."""
    descendants = _flag(query, "include_descendant_groups", False)
    groups = fake.self_and_descendants(group) if descendants else [group]
    if _flag(query, "include_ancestor_groups", True):
        groups += ancestors(group)
    names = {n for g in groups for n in fake.group_labels.get(g, [])}
    if not _flag(query, "only_group_labels", True):
        projects = fake.group_projects(group, subgroups=descendants)
        names |= {n for p in projects for n in p.labels}
    return [{"id": i, "name": n} for i, n in enumerate(sorted(names))]


def _project_labels(fake: FakeGitLab, project: Project, query: dict[str, str]) -> list[str]:
    """A project's labels, with its groups' by default (include_ancestor_groups=true)."""
    names = list(project.labels)
    group = fake.group_of(project)
    if group is not None and _flag(query, "include_ancestor_groups", True):
        for known in (group, *ancestors(group)):
            names += [n for n in fake.group_labels.get(known, []) if n not in names]
    return names


# GitLab's hook events filter: a code, or a category of codes.
_STATUS_CATEGORIES = {
    "successful": range(200, 300),
    "client_failure": range(400, 500),
    "server_failure": range(500, 600),
}


def _by_status(events: list[dict[str, Any]], status: str | None) -> list[dict[str, Any]]:
    """The hook events GitLab answers for ``?status=``: only numeric statuses match."""
    if status is None:
        return events
    wanted = _STATUS_CATEGORIES.get(status) or range(int(status), int(status) + 1)
    return [
        e
        for e in events
        if str(e.get("response_status")).isdigit() and int(e["response_status"]) in wanted
    ]


def _project_json(project: Project) -> dict[str, Any]:
    """A project as GitLab's ``simple`` representation has it (the fields tests use)."""
    name = project.path.rsplit("/", 1)[-1]
    return {"id": project.id, "path_with_namespace": project.path, "path": name, "name": name}


def _project_get(fake: FakeGitLab, project: Project, rest: list[str], query: dict[str, str]) -> Any:
    if rest == ["labels"]:
        names = _project_labels(fake, project, query)
        return [{"id": i, "name": name} for i, name in enumerate(names)]
    if rest == ["merge_requests"]:
        return _labels_matching(list(project.mrs.values()), query)
    if rest == ["hooks"]:
        return project.hooks
    if len(rest) == 3 and rest[0] == "hooks" and rest[2] == "events":
        return _by_status(project.hook_events.get(int(rest[1]), []), query.get("status"))
    if len(rest) < 2 or rest[0] != "merge_requests" or int(rest[1]) not in project.mrs:
        return None
    iid = int(rest[1])
    mr = project.mrs[iid]
    tail = rest[2:]
    if not tail:
        return mr
    if tail == ["resource_label_events"]:
        return project.label_events.get(iid, [])
    if tail == ["resource_state_events"]:
        return project.state_events.get(iid, [])
    if tail == ["approvals"]:
        approved = project.approvals.get(iid, [])
        return {
            "id": mr["id"],
            "iid": iid,
            "project_id": project.id,
            "title": mr["title"],
            "state": mr["state"],
            "created_at": mr["created_at"],
            "updated_at": mr["updated_at"],
            "approvals_required": 1,
            "approvals_left": 0 if approved else 1,
            "approved_by": approved,
        }
    return None


def _post(fake: FakeGitLab, path: str, data: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
    seg = _segments(path)
    project = fake.project(seg[1]) if seg[0] == "projects" else None
    if project is None or seg[2:] != ["hooks"]:
        return 404, {"message": "404 Not found"}, {}
    hook = {"id": 700 + len(project.hooks), "project_id": project.id, "alert_status": "executable"}
    hook |= {k: v for k, v in data.items() if k != "token"}
    project.hooks.append(hook)
    fake.hook_tokens[hook["id"]] = str(data.get("token"))
    return 201, hook, {}


def _page(
    fake: FakeGitLab, path: str, query: dict[str, str], items: list[Any]
) -> tuple[int, Any, dict[str, str]]:
    per_page = min(int(query.get("per_page", 20)), fake.max_per_page)
    page = int(query.get("page", 1))
    total_pages = max(1, -(-len(items) // per_page))
    chunk = items[(page - 1) * per_page : page * per_page]
    headers = {
        "x-page": str(page),
        "x-per-page": str(per_page),
        "x-total": str(len(items)),
        "x-total-pages": str(total_pages),
        "x-next-page": str(page + 1) if page < total_pages else "",
        "x-prev-page": str(page - 1) if page > 1 else "",
    }
    if page < total_pages:
        following = urlencode({**query, "page": page + 1, "per_page": per_page})
        headers["Link"] = f'<{fake.url}{path}?{following}>; rel="next"'
    return 200, chunk, headers
