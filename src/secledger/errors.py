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


class UnsupportedEncoding(IntakeError):
    """A compressed body (Content-Encoding): GitLab sends JSON as it is."""

    status_code = 415
    code = "unsupported_encoding"


class MissingField(IntakeError):
    """A merge-request payload lacks a field needed to identify the merge request."""

    code = "missing_field"


class TimestampError(SecledgerError, ValueError):
    """A timestamp is in none of the spellings GitLab is known to send."""


class StoreUnavailable(SecledgerError):
    """The database could not be reached or the write failed for a transient reason."""


class GitLabAPIError(SecledgerError):
    """The GitLab REST API refused a request or could not be reached."""

    def __init__(
        self,
        message: str,
        status: int | None = None,
        *,
        gone: bool | None = None,
        unreachable: bool = False,
        short_of_scope: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status  # the HTTP status GitLab answered, when it answered
        self._gone = gone
        self.unreachable = unreachable  # no answer at all (after the client's retries)
        self.short_of_scope = short_of_scope  # 403 insufficient_scope: the token's scope

    @property
    def systemic(self) -> bool:
        """A failure every other request would meet too: GitLab unreachable, the token
        refused (401) or short of a scope (403 ``insufficient_scope``; another 403 may be
        one project's, whose MRs a Guest may not read), the rate limit still hit after
        the retries (429). A pass over many MRs stops at it rather than wait out each."""
        return self.unreachable or self.short_of_scope or self.status in {401, 429}

    @property
    def gone(self) -> bool:
        """GitLab answered 404: deleted, or hidden from the token (GitLab answers 404,
        not 403, for what a token may not see). A 403 is the token's own problem (a
        missing scope, a blocked user), for the operator to fix. False for a 404 of an
        endpoint about an MR that was just read (``gitlab_api.about_existing_mr``)."""
        return self.status == 404 if self._gone is None else self._gone


class InvalidSignature(IntakeError):
    """The webhook-signature headers are missing, malformed or match no signing secret."""

    status_code = 401
    code = "invalid_signature"


class StaleTimestamp(IntakeError):
    """webhook-timestamp is further from now than the configured tolerance."""

    status_code = 401
    code = "timestamp_out_of_tolerance"


class ReplayedDelivery(IntakeError):
    """This signed message (webhook-id and timestamp) was already received."""

    status_code = 401
    code = "replayed_webhook_id"


class WrongInstance(IntakeError):
    """The credentials used belong to a different GitLab instance than the payload names."""

    status_code = 401
    code = "wrong_instance"


class BodyTimeout(IntakeError):
    """The client did not send the whole body in time."""

    status_code = 408
    code = "body_timeout"


class Saturated(IntakeError):
    """Too many deliveries are in progress; the client may retry."""

    status_code = 503
    code = "saturated"


def first_line(exc: BaseException) -> str:
    """The database's (or the driver's) first line about ``exc``: never a password, and
    none of the statement's bound values, which SQLAlchemy's own text would add."""
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
