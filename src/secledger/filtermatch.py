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
