"""SQL that matches what a person typed in a filter to what GitLab sent.

GitLab tells usernames apart without their case (``Bob`` cannot sign up beside
``bob``) and finds a project by its path whatever the case, and sends each as its
owner wrote it, so a filter compares them lowered.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import Connection, text

from secledger.errors import SecledgerError
from secledger.intake import origin


def same_name(column: str) -> str:
    """SQL: ``column`` is the username ``:reviewer``, whatever the case."""
    return f"lower({column}) = lower(:reviewer)"


def among(names: str) -> str:
    """SQL: ``:reviewer`` is among the usernames of array ``names``, whatever the case."""
    return f"EXISTS (SELECT FROM unnest({names}) AS a(name) WHERE {same_name('a.name')})"


# Projects whose path is now :project: the newest path of their MRs (by last event) is
# it. A ledger row keeps the path its MR was last seen under, so after a rename a row-by-
# row match missed the project's older MRs and took in those of whatever project took
# the old path since (``report projects`` shows each project under its newest path).
# The candidates come from the index on lowered paths (migration 0023); each one's
# newest path is aggregated from its own rows (the primary key's prefix): ordered and
# limited instead, it was planned as a walk down the index on every MR's last event.
# A project typed as its URL names its instance too (``:project_instance``, else NULL).
_ON_INSTANCE = "(CAST(:project_instance AS text) IS NULL OR {p}instance = :project_instance)"
_CANDIDATES = (
    "(SELECT DISTINCT instance, project_id FROM security_review_ledger"
    f" WHERE lower(project_path) = lower(:project) AND {_ON_INSTANCE.format(p='')})"
)
NEWEST_PATH = (
    "(array_agg({p}project_path ORDER BY {p}last_event_at DESC, {p}mr_iid DESC)"
    " FILTER (WHERE {p}project_path IS NOT NULL))[1]"
)
_NOW_AT_PATH = (
    f"(SELECT c.instance, c.project_id FROM {_CANDIDATES} c WHERE lower(("
    f"SELECT {NEWEST_PATH.format(p='n.')} FROM security_review_ledger n"
    " WHERE n.instance = c.instance AND n.project_id = c.project_id)) = lower(:project))"
)
# Their ids, and the id typed, as an array computed once: the condition on it is what
# the planner estimates (a few rows), where an OR with a subquery was estimated at half
# the ledger, and the report then scanned every SLA clock to join them (4-6 times
# slower on 500,000 MRs).
_IDS = (
    f"ARRAY(SELECT p.project_id FROM {_NOW_AT_PATH} p UNION ALL"
    " SELECT CASE WHEN :project ~ '^[0-9]{1,18}$' THEN CAST(:project AS bigint) END)"
)


def same_project(prefix: str = "") -> str:
    """SQL: the row (columns ``instance``, ``project_id`` after ``prefix``) is of the
    project ``:project``, given by id or by its current path whatever the case, on the
    instance ``:project_instance`` when it is not NULL (bind both with ``project_params``)."""
    return (
        f"({prefix}project_id = ANY({_IDS}) AND {_ON_INSTANCE.format(p=prefix)}"
        f" AND ({prefix}project_id::text = :project"
        f" OR ({prefix}instance, {prefix}project_id) IN {_NOW_AT_PATH}))"
    )


class BadProject(SecledgerError):
    """A project filter that names no project, none the ledger holds, or one on several
    GitLab instances."""


# An SSH clone URL as GitLab shows it (``git@gitlab.example.com:acme/payments.git``).
_SCP_LIKE = re.compile(r"[^@/\s]+@[^:/\s]+:(?!//)(?P<path>\S+)")


def project_params(typed: str) -> dict[str, Any]:
    """The values ``same_project`` binds for a project typed as an id, a path or its URL
    (``https://gitlab.example.com/acme/payments``, its clone URL, or any page under it:
    the path ends at GitLab's ``/-/``), which also names its instance. An SSH clone URL
    names the path only: its host need not be the web address the ledger knows."""
    typed = typed.strip()
    ssh = _SCP_LIKE.fullmatch(typed)
    if ssh is not None or typed.lower().startswith("ssh://"):
        path = ssh.group("path") if ssh is not None else urlsplit(typed).path
        return {"project": path.strip("/").removesuffix(".git"), "project_instance": None}
    if not typed.lower().startswith(("http://", "https://")):
        return {"project": typed, "project_instance": None}
    instance = origin(typed)
    path = urlsplit(typed).path.split("/-/", 1)[0].strip("/").removesuffix("/-")
    path = path.removesuffix(".git")
    if instance is None or not path:
        raise BadProject(
            f"{typed!r} is not a project's URL: give one such as"
            " https://gitlab.example.com/acme/payments, its path or its id"
        )
    return {"project": path, "project_instance": instance}


_INSTANCES = text(
    f"SELECT DISTINCT instance FROM security_review_ledger WHERE {same_project()} ORDER BY instance"
)


# The instances the ledger holds: a short walk of the primary key's first column.
_KNOWN = text(
    "WITH RECURSIVE i(instance) AS ("
    " (SELECT min(instance) FROM security_review_ledger) UNION ALL"
    " SELECT (SELECT min(instance) FROM security_review_ledger l WHERE l.instance > i.instance)"
    " FROM i WHERE i.instance IS NOT NULL)"
    " SELECT instance FROM i WHERE instance IS NOT NULL"
)


def check_project(conn: Connection, typed: str) -> None:
    """Refuse a project filter that would match nothing without a word, or mix projects:
    one the ledger holds no merge request of (a typo, an old path, a project with no
    security MR yet), a URL of an instance it holds nothing of (``http`` for
    ``https``), and an id or path it holds on more than one GitLab instance (their
    projects are not the same, and a report or a pack would mix them)."""
    params = project_params(typed)
    if params["project_instance"] is not None:
        known = list(conn.execute(_KNOWN).scalars())
        if known and params["project_instance"] not in known:
            raise BadProject(
                f"the ledger holds no merge request of {params['project_instance']}"
                f" (it holds those of {', '.join(known)})"
            )
    instances = list(conn.execute(_INSTANCES, params).scalars())
    if not instances:
        raise BadProject(
            f"the ledger holds no merge request of project {typed.strip()!r}: check its id,"
            " its path as it is now (group/project) or its URL (the projects report lists"
            " those the ledger holds)"
        )
    if len(instances) > 1:
        raise BadProject(
            f"project {typed.strip()!r} is on {len(instances)} GitLab instances"
            f" ({', '.join(instances)}): give its URL instead, such as"
            f" {instances[0]}/<group>/<project>"
        )


def approved_by(mr: str, approvers: str) -> str:
    """SQL: ``:reviewer`` approved the MR whose key columns are ``mr``'s: is among
    ``approvers`` now, or gave an approval it revoked later or a push reset (the findings
    about such an MR are about that approval)."""
    return (
        f"({among(approvers)} OR EXISTS (SELECT FROM review_events e"
        f" WHERE e.instance = {mr}.instance AND e.project_id = {mr}.project_id"
        f" AND e.mr_iid = {mr}.mr_iid AND e.decision = 'approved' AND {same_name('e.actor')}))"
    )
