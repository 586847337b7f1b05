"""SQL that matches what a person typed in a filter to what GitLab sent.

GitLab tells usernames apart without their case (``Bob`` cannot sign up beside
``bob``) and finds a project by its path whatever the case, and sends each as its
owner wrote it, so a filter compares them lowered.
"""

from __future__ import annotations


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
_CANDIDATES = (
    "(SELECT DISTINCT instance, project_id FROM security_review_ledger"
    " WHERE lower(project_path) = lower(:project))"
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
    project ``:project``, given by id or by its current path whatever the case."""
    return (
        f"({prefix}project_id = ANY({_IDS}) AND ({prefix}project_id::text = :project"
        f" OR ({prefix}instance, {prefix}project_id) IN {_NOW_AT_PATH}))"
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
