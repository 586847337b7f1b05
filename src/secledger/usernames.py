"""SQL that matches a username a person typed (``:reviewer``) to those GitLab sent.

GitLab tells usernames apart without their case (``Bob`` cannot sign up beside
``bob``) and sends each as its owner wrote it, so a filter compares them lowered.
"""

from __future__ import annotations


def same_name(column: str) -> str:
    """SQL: ``column`` is the username ``:reviewer``, whatever the case."""
    return f"lower({column}) = lower(:reviewer)"


def among(names: str) -> str:
    """SQL: ``:reviewer`` is among the usernames of array ``names``, whatever the case."""
    return f"EXISTS (SELECT FROM unnest({names}) AS a(name) WHERE {same_name('a.name')})"
