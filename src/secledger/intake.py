"""Turn headers and a raw body into a verified Delivery, or a typed rejection. No I/O here."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import orjson

from secledger.errors import BodyTooLarge, InvalidToken, MalformedJSON, MissingField

MR_EVENTS = frozenset({"Merge Request Hook", "System Hook"})

# Headers kept with each delivery: enough to trace it in GitLab, never the token.
KEPT_HEADERS = (
    "content-type",
    "idempotency-key",
    "user-agent",
    "webhook-id",
    "webhook-timestamp",
    "x-gitlab-event",
    "x-gitlab-event-uuid",
    "x-gitlab-instance",
    "x-gitlab-webhook-uuid",
)
MAX_HEADER_CHARS = 512


@dataclass(frozen=True)
class Delivery:
    """A verified, decoded merge-request delivery, ready for extraction."""

    event: str
    instance: str
    headers: dict[str, str]
    body: bytes
    payload: dict[str, Any] = field(repr=False)
    dedup_key: str
    received_at: datetime
    source: str = "webhook"


@dataclass(frozen=True)
class Ignored:
    """A delivery GitLab was right to send but that secledger does not keep."""

    reason: str


def verify_token(headers: Mapping[str, str], secrets: Sequence[bytes]) -> None:
    """Raise InvalidToken unless X-Gitlab-Token equals one of ``secrets``.

    Every secret is compared, so the time taken does not reveal which one matched.
    """
    supplied = headers.get("x-gitlab-token")
    if supplied is None:
        raise InvalidToken("X-Gitlab-Token header is missing")
    given = supplied.encode("utf-8", "surrogateescape")
    matched = False
    for secret in secrets:
        matched |= hmac.compare_digest(given, secret)
    if not matched:
        raise InvalidToken("X-Gitlab-Token does not match any configured secret")


def check_size(length: int, limit: int) -> None:
    """Raise BodyTooLarge when ``length`` bytes exceed ``limit``."""
    if length > limit:
        raise BodyTooLarge(f"body is {length} bytes; the limit is {limit} bytes")


def decode_json(body: bytes) -> dict[str, Any]:
    """Decode a JSON object or raise MalformedJSON saying what is wrong."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise MalformedJSON(f"body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise MalformedJSON(f"body must be a JSON object, got {type(value).__name__}")
    return value


def dedup_key(headers: Mapping[str, str], body: bytes) -> str:
    """GitLab keeps Idempotency-Key across manual resends; otherwise the body identifies it."""
    key = headers.get("idempotency-key", "").strip()
    if key:
        return "idem:" + key[:MAX_HEADER_CHARS]
    return "sha256:" + hashlib.sha256(body).hexdigest()


def kept_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The headers stored with a delivery, bounded in length."""
    return {k: headers[k][:MAX_HEADER_CHARS] for k in KEPT_HEADERS if k in headers}


def origin(url: object) -> str | None:
    """``scheme://host[:port]`` of a URL, or None when it has none."""
    if not isinstance(url, str) or not url:
        return None
    parts = urlsplit(url)
    if not parts.scheme or not parts.netloc:
        return None
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}"


def instance_of(headers: Mapping[str, str], payload: Mapping[str, Any]) -> str:
    """The sending GitLab: X-Gitlab-Instance, else the origin of the project's URL."""
    header = origin(headers.get("x-gitlab-instance", "").strip())
    if header:
        return header
    project = payload.get("project")
    attrs = payload.get("object_attributes")
    for candidate in (
        project.get("web_url") if isinstance(project, dict) else None,
        attrs.get("url") if isinstance(attrs, dict) else None,
    ):
        found = origin(candidate)
        if found:
            return found
    raise MissingField(
        "cannot tell which GitLab sent this: no X-Gitlab-Instance header and no project.web_url"
    )


def _positive_int(container: Mapping[str, Any], key: str, where: str) -> int:
    value = container.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise MissingField(f"{where}.{key} must be an integer, got {value!r}"[:200])
    if value < 0:
        raise MissingField(f"{where}.{key} must not be negative")
    return value


def require_identity(payload: Mapping[str, Any]) -> None:
    """Raise MissingField unless the payload names its merge request unambiguously."""
    attrs = payload.get("object_attributes")
    if not isinstance(attrs, dict):
        raise MissingField("object_attributes is missing or not an object")
    _positive_int(attrs, "iid", "object_attributes")
    _positive_int(attrs, "id", "object_attributes")
    if "target_project_id" in attrs:
        _positive_int(attrs, "target_project_id", "object_attributes")
        return
    project = payload.get("project")
    if not isinstance(project, dict):
        raise MissingField("neither object_attributes.target_project_id nor project.id is present")
    _positive_int(project, "id", "project")


def parse_delivery(
    headers: Mapping[str, str],
    body: bytes,
    *,
    secrets: Sequence[bytes],
    max_body_bytes: int,
    received_at: datetime,
    require_token: bool = True,
    source: str = "webhook",
) -> Delivery | Ignored:
    """Verify and decode one webhook request. ``headers`` must have lower-case names."""
    if require_token:
        verify_token(headers, secrets)
    check_size(len(body), max_body_bytes)
    event = headers.get("x-gitlab-event", "").strip()
    if event not in MR_EVENTS:
        shown = event[:64] or "(none)"
        return Ignored(f"event {shown!r} is not a merge request event")
    payload = decode_json(body)
    kind = payload.get("object_kind", payload.get("event_type"))
    if kind != "merge_request":
        return Ignored(f"object_kind {str(kind)[:64]!r} is not merge_request")
    require_identity(payload)
    return Delivery(
        event=event,
        instance=instance_of(headers, payload),
        headers=kept_headers(headers),
        body=body,
        payload=payload,
        dedup_key=dedup_key(headers, body),
        received_at=received_at,
        source=source,
    )
