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


def same_project(prefix: str = "") -> str:
    """SQL: the row (columns ``project_path``, ``project_id`` after ``prefix``) is the
    project ``:project``, given by id or by path whatever the case."""
    return f"(lower({prefix}project_path) = lower(:project) OR {prefix}project_id::text = :project)"


def approved_by(mr: str, approvers: str) -> str:
    """SQL: ``:reviewer`` approved the MR whose key columns are ``mr``'s: is among
    ``approvers`` now, or gave an approval it revoked later or a push reset (the findings
    about such an MR are about that approval)."""
    return (
        f"({among(approvers)} OR EXISTS (SELECT FROM review_events e"
        f" WHERE e.instance = {mr}.instance AND e.project_id = {mr}.project_id"
        f" AND e.mr_iid = {mr}.mr_iid AND e.decision = 'approved' AND {same_name('e.actor')}))"
    )
