"""One error family for secledger; each edge translates it (HTTP status, CLI exit)."""

from __future__ import annotations


class SecledgerError(Exception):
    """Base of every error secledger raises on purpose."""


class ConfigError(SecledgerError):
    """The configuration cannot work (missing secret, bad policy, unreachable path)."""


class IntakeError(SecledgerError):
    """A delivery was rejected; nothing about it is stored."""

    status_code = 400
    code = "bad_request"


class InvalidToken(IntakeError):
    """X-Gitlab-Token is missing or does not match any configured secret."""

    status_code = 401
    code = "invalid_token"


class BodyTooLarge(IntakeError):
    """The body is larger than the configured limit."""

    status_code = 413
    code = "body_too_large"


class MalformedJSON(IntakeError):
    """The body is not a JSON object."""

    code = "malformed_json"


class MissingField(IntakeError):
    """A merge-request payload lacks a field needed to identify the merge request."""

    code = "missing_field"


class TimestampError(SecledgerError, ValueError):
    """A timestamp is in none of the spellings GitLab is known to send."""


class StoreUnavailable(SecledgerError):
    """The database could not be reached or the write failed for a transient reason."""


class GitLabAPIError(SecledgerError):
    """The GitLab REST API refused a request or could not be reached."""
