"""Turn headers and a raw body into a verified Delivery, or a typed rejection. No I/O here."""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import orjson

from secledger import digest
from secledger.errors import (
    BodyTooLarge,
    InvalidSignature,
    InvalidToken,
    MalformedJSON,
    MissingField,
    StaleTimestamp,
    UnsupportedEncoding,
    WrongInstance,
)
from secledger.headers import RequestHeaders
from secledger.quickinit import quick

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
MAX_URL_CHARS = 2048
MAX_WEBHOOK_ID_CHARS = 256
MAX_SIGNATURES = 16
DEFAULT_SOURCE = "default"
# Log rows built from GitLab's REST API rather than received (apifacts): their dedup keys
# already name the fact, so they take no part in deduplication by body.
API_SOURCE = "api"
# PostgreSQL bigint: a larger id would make the insert fail instead of the intake.
MAX_ID = 2**63 - 1
# Origins only: a host name or bracketed IPv6 address, an optional port. Anything
# else (NUL, spaces, userinfo) is refused before it can reach a text column.
_HOST = re.compile(r"^(?:[a-z0-9_](?:[a-z0-9_.-]{0,251}[a-z0-9_])?|\[[0-9a-f:.]+\])(?::\d{1,5})?$")
_PRINTABLE = re.compile(r"^[\x21-\x7e]+$")


@quick
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

    @functools.cached_property
    def body_sha256(self) -> bytes:
        """SHA-256 of the raw body: the same body logged twice is the same GitLab event."""
        return digest.sha256(self.body)

    def without_payload(self) -> Delivery:
        """This delivery without its decoded JSON: what logging it needs (the raw body
        stays), once the facts have been extracted."""
        return self._with_payload({})

    def with_payload(self) -> Delivery:
        """This delivery with its JSON decoded again, after ``without_payload`` (a delivery
        held for a while is kept without it: two to three times its body's size)."""
        return self if self.payload else self._with_payload(decode_json(self.body))

    def _with_payload(self, payload: dict[str, Any]) -> Delivery:
        # A copy of the instance's fields (and of the body's hash, if it was computed)
        # with the payload swapped: about a fifth of what calling the frozen __init__ cost.
        copy: Delivery = object.__new__(Delivery)
        fields = copy.__dict__
        fields.update(self.__dict__)
        fields["payload"] = payload
        return copy


@dataclass(frozen=True)
class Ignored:
    """A delivery GitLab was right to send but that secledger does not keep."""

    reason: str


@dataclass(frozen=True)
class Source:
    """Who may send deliveries: one GitLab instance (or the default) and its credentials."""

    name: str
    tokens: tuple[bytes, ...] = ()
    keys: tuple[bytes, ...] = ()
    policy: str = "either"
    open: bool = False

    @property
    def accepted(self) -> str:
        """The credentials this source accepts, for error messages."""
        names = ["X-Gitlab-Token"] * bool(self.tokens) + ["webhook-signature"] * bool(self.keys)
        joiner = " and " if self.policy == "both" else " or "
        return joiner.join(names) or "nothing (no secret is configured)"


@dataclass(frozen=True)
class Sources:
    """Every configured source; a request is matched to one by X-Gitlab-Instance."""

    default: Source
    instances: Mapping[str, Source] = field(default_factory=dict)
    tolerance: int = 300
    _reserved: dict[str, frozenset[str]] = field(init=False, repr=False, compare=False)
    _verified: dict[tuple[str, str], Verified] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names = frozenset(self.instances)
        reserved = {name: names - {name} for name in (*names, self.default.name)}
        object.__setattr__(self, "_reserved", reserved)
        # Answers without a signature are the same for every request of a source.
        verified = {
            (name, method): Verified(name, method, reserved=others)
            for name, others in reserved.items()
            for method in ("open", "token")
        }
        object.__setattr__(self, "_verified", verified)

    def reserved(self, name: str) -> frozenset[str]:
        """Instances with their own secrets, other than ``name``: its credentials may not
        speak for them."""
        return self._reserved[name]

    def verified(self, name: str, method: str) -> Verified:
        """How a request of source ``name`` proved itself without a signature."""
        return self._verified[name, method]

    def select(self, headers: Mapping[str, str]) -> Source:
        """The source a request claims to come from; the default when it names no known one.

        GitLab sends X-Gitlab-Instance from 15.5 on. Without it, a token that the default
        source does not hold but one instance does selects that instance: its deliveries
        were otherwise refused (401), and GitLab disables a hook after four failures.
        """
        if not self.instances:
            return self.default
        claimed = origin(headers.get("x-gitlab-instance", "").strip())
        if claimed:
            return self.instances.get(claimed, self.default)
        given = token_bytes(headers)
        if given is None or _holds(self.default.tokens, given):
            return self.default
        holders = [source for source in self.instances.values() if _holds(source.tokens, given)]
        return holders[0] if len(holders) == 1 else self.default


@quick
@dataclass(frozen=True)
class Verified:
    """How a request proved where it came from."""

    source: str
    method: str
    webhook_id: str | None = None
    timestamp: str | None = None
    # Instances with their own secrets: these credentials may not speak for them.
    reserved: frozenset[str] = frozenset()


@dataclass(frozen=True)
class SignedHeaders:
    """The Standard Webhooks headers of one request, parsed."""

    webhook_id: str
    timestamp: str
    signatures: tuple[bytes, ...]


def _wanted(source: Source, headers: Mapping[str, str], sources: Sources) -> tuple[bool, bool]:
    """Which credentials to check: (token, signature), by policy and what was sent."""
    if not (source.tokens or source.keys):
        raise InvalidToken(
            f"no secret is configured for deliveries from {source.name}"
            + _unmatched(headers, source, sources)
        )
    if source.policy == "token" or not source.keys:
        return True, False
    if source.policy == "signature" or not source.tokens:
        return False, True
    if source.policy == "both":
        return True, True
    # "either": check every credential that was sent and can be checked; a bad one
    # fails the request even when the other is good (it means tampering or confusion).
    token = bool(source.tokens) and "x-gitlab-token" in headers
    signature = bool(source.keys) and "webhook-signature" in headers
    if not (token or signature):
        raise InvalidToken(
            f"no credential: deliveries from {source.name} must carry {source.accepted}"
        )
    return token, signature


def _signature_entries(raw: str) -> tuple[bytes, ...]:
    entries = raw.split()
    if len(entries) > MAX_SIGNATURES:
        raise InvalidSignature(f"webhook-signature carries more than {MAX_SIGNATURES} signatures")
    found: list[bytes] = []
    for entry in entries:
        version, _, value = entry.partition(",")
        if version != "v1":
            continue  # other schemes (v1a: asymmetric) are not configured here
        try:
            found.append(base64.b64decode(value, validate=True))
        except (binascii.Error, ValueError):
            continue
    if not found:
        raise InvalidSignature("webhook-signature carries no well-formed v1,<base64> signature")
    return tuple(found)


def signature_headers(
    headers: Mapping[str, str], *, now: datetime, tolerance: int
) -> SignedHeaders:
    """Parse webhook-id/-timestamp/-signature and refuse a timestamp outside ``tolerance``."""
    raw = headers.get("webhook-signature")
    if raw is None:
        raise InvalidSignature("webhook-signature header is missing")
    webhook_id = headers.get("webhook-id", "")
    if not webhook_id:
        raise InvalidSignature("webhook-id header is missing")
    if len(webhook_id) > MAX_WEBHOOK_ID_CHARS or not _PRINTABLE.match(webhook_id):
        raise InvalidSignature(
            f"webhook-id must be 1 to {MAX_WEBHOOK_ID_CHARS} printable ASCII characters"
        )
    stamp = headers.get("webhook-timestamp", "")
    if not stamp:
        raise InvalidSignature("webhook-timestamp header is missing")
    if not (stamp.isascii() and stamp.isdigit() and len(stamp) <= 12):
        raise InvalidSignature("webhook-timestamp must be whole seconds since 1970, digits only")
    skew = int(now.timestamp()) - int(stamp)
    if abs(skew) > tolerance:
        when = "in the past" if skew > 0 else "in the future"
        raise StaleTimestamp(
            f"webhook-timestamp is {abs(skew)} s {when}; the tolerance is {tolerance} s"
        )
    return SignedHeaders(webhook_id, stamp, _signature_entries(raw))


def verify_signature(signed: SignedHeaders, body: bytes, keys: Sequence[bytes]) -> None:
    """Raise InvalidSignature unless one signature is HMAC-SHA256(key, "id.timestamp.body").

    Every (signature, key) pair is compared, so timing does not reveal which matched.
    """
    prefix = f"{signed.webhook_id}.{signed.timestamp}.".encode("ascii")
    expected = [digest.hmac_sha256(key, prefix, body) for key in keys]
    matched = False
    for given in signed.signatures:
        for wanted in expected:
            matched |= hmac.compare_digest(given, wanted)
    if not matched:
        raise InvalidSignature("no webhook-signature matches any configured signing secret")


@dataclass(frozen=True)
class SignaturePending:
    """A request whose signature can only be checked once its body is read
    (:func:`authenticate`); ``token`` when a token already proved its sender."""

    token: bool


UNPROVEN = SignaturePending(token=False)
TOKEN_PROVEN = SignaturePending(token=True)


def precheck(
    headers: Mapping[str, str], sources: Sources, *, now: datetime
) -> Verified | SignaturePending:
    """Everything that can be refused before the body is read: token, headers, timestamp.

    Returns how the request proved itself when nothing is left to check (a token, or an
    open source), else what is known while a signature over the body waits.
    """
    source = sources.select(headers)
    if source.open:
        return sources.verified(source.name, "open")
    token, signature = _wanted(source, headers, sources)
    if token:
        _check_token(headers, source, sources)
    if signature:
        signature_headers(headers, now=now, tolerance=sources.tolerance)
        return TOKEN_PROVEN if token else UNPROVEN
    return sources.verified(source.name, "token")


def authenticate(
    headers: Mapping[str, str], body: bytes, sources: Sources, *, now: datetime
) -> Verified:
    """Verify a request against its source's policy; how it proved itself, or a 401 error."""
    source = sources.select(headers)
    reserved = sources.reserved(source.name)
    if source.open:
        return sources.verified(source.name, "open")
    token, signature = _wanted(source, headers, sources)
    if token:
        _check_token(headers, source, sources)
    if not signature:
        return sources.verified(source.name, "token")
    signed = signature_headers(headers, now=now, tolerance=sources.tolerance)
    verify_signature(signed, body, source.keys)
    method = "token+signature" if token else "signature"
    return Verified(source.name, method, signed.webhook_id, signed.timestamp, reserved)


def _check_token(headers: Mapping[str, str], source: Source, sources: Sources) -> None:
    try:
        verify_token(headers, source.tokens)
    except InvalidToken as exc:
        hint = _unmatched(headers, source, sources)
        if not hint:
            raise
        raise InvalidToken(f"{exc} of the default source{hint}") from None


def _unmatched(headers: Mapping[str, str], source: Source, sources: Sources) -> str:
    """Why a request naming an instance was checked against the default source: its
    X-Gitlab-Instance named no configured one, which a scheme or port other than the
    configured one also does ("" when that is not why)."""
    claimed = headers.get("x-gitlab-instance", "").strip()
    if source.name != DEFAULT_SOURCE or not (sources.instances and claimed):
        return ""
    return (
        f": X-Gitlab-Instance {claimed[:100]!r} names no configured instance (instances"
        " are matched by scheme, host and port)"
    )


def verify_token(headers: Mapping[str, str], secrets: Sequence[bytes]) -> None:
    """Raise InvalidToken unless X-Gitlab-Token equals one of ``secrets``.

    Every secret is compared, so the time taken does not reveal which one matched.
    """
    given = token_bytes(headers)
    if given is None:
        raise InvalidToken("X-Gitlab-Token header is missing")
    if not _holds(secrets, given):
        raise InvalidToken("X-Gitlab-Token does not match any configured secret")


def token_bytes(headers: Mapping[str, str]) -> bytes | None:
    """X-Gitlab-Token's bytes as sent, or None without the header."""
    supplied = headers.get("x-gitlab-token")
    if supplied is None:
        return None
    # The HTTP edge decodes header values as Latin-1; GitLab sends the token's UTF-8
    # bytes, and the secrets are UTF-8: compare bytes as sent, not a re-encoding.
    raw = headers.raw("x-gitlab-token") if isinstance(headers, RequestHeaders) else None
    return raw if raw is not None else supplied.encode("utf-8", "surrogateescape")


def _holds(secrets: Sequence[bytes], given: bytes) -> bool:
    """Whether ``given`` is one of ``secrets``; every one is compared, so the time taken
    does not reveal which one matched."""
    matched = False
    for secret in secrets:
        matched |= hmac.compare_digest(given, secret)
    return matched


def check_size(length: int, limit: int) -> None:
    """Raise BodyTooLarge when ``length`` bytes exceed ``limit``."""
    if length > limit:
        raise BodyTooLarge(f"body is {length} bytes; the limit is {limit} bytes")


def decode_json(body: bytes) -> dict[str, Any]:
    """Decode a JSON object or raise MalformedJSON saying what is wrong."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        if str(exc).startswith("depth limit exceeded"):
            # orjson stops at 1024 levels before any deep recursion can happen.
            raise MalformedJSON("JSON is nested deeper than 1024 levels") from None
        raise MalformedJSON(f"body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise MalformedJSON(f"body must be a JSON object, got {type(value).__name__}")
    return value


def dedup_key(headers: Mapping[str, str], body: bytes, verified: Verified | None = None) -> str:
    """GitLab keeps Idempotency-Key across manual resends; otherwise the body identifies it.

    A signed delivery is identified by its signed webhook-id instead: Idempotency-Key is
    not covered by the signature, so a captured request replayed with a new key to
    another replica would otherwise be logged twice.
    """
    scope = _key_scope(verified)
    if verified is not None and verified.webhook_id:
        return "whid" + scope + verified.webhook_id
    key = headers.get("idempotency-key", "").strip()
    if key and len(key) <= MAX_HEADER_CHARS and _PRINTABLE.match(key):
        return "idem" + scope + key
    if key:
        return "idem-sha256" + scope + hashlib.sha256(key.encode("utf-8", "replace")).hexdigest()
    return "sha256:" + digest.sha256(body).hex()  # the body names its instance


def _key_scope(verified: Verified | None) -> str:
    """What follows a dedup key's kind: ``:`` for the default source, as always, and
    ``@<instance> `` for one of ``[[webhook_sources]]``. The sender picks the key: with
    one namespace for all, one instance's credentials could send another's pending
    resend's key first, and that delivery was then answered ``duplicate`` and never
    logged. A key holds no blank, so the two forms never meet."""
    if verified is None or verified.source == DEFAULT_SOURCE:
        return ":"
    return "@" + verified.source + " "


def kept_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The headers stored with a delivery, bounded in length."""
    if isinstance(headers, RequestHeaders):  # the HTTP edge's: one pass over the raw pairs
        return headers.pick(KEPT_HEADERS, MAX_HEADER_CHARS)
    return {k: headers[k][:MAX_HEADER_CHARS] for k in KEPT_HEADERS if k in headers}


def origin(url: object) -> str | None:
    """``scheme://host[:port]`` of a URL, or None when it has none."""
    if not isinstance(url, str) or not url or len(url) > MAX_URL_CHARS:
        return None
    return _origin(url)


# Each delivery asks up to three times, mostly about the same few instance URLs.
@functools.lru_cache(maxsize=1024)
def _origin(url: str) -> str | None:
    try:
        parts = urlsplit(url)
    except ValueError:  # "http://[" and friends
        return None
    if parts.scheme.lower() not in _DEFAULT_PORTS or not _HOST.match(parts.netloc.lower()):
        return None
    # One spelling per origin: "host:443" and "host:0443" are "host" to a browser and
    # to GitLab, and must not pass for another instance than "host".
    return _host_of(url)


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _host_of(url: object) -> str | None:
    """The origin a browser would open for ``url``, read leniently: also through a
    ``user@`` part or a trailing dot, which ``origin`` refuses to take as an instance
    name but which still lead to the host (so they must not hide a reserved one)."""
    if not isinstance(url, str) or len(url) > MAX_URL_CHARS:
        return None
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    scheme, host = parts.scheme.lower(), (parts.hostname or "").rstrip(".")
    if scheme not in _DEFAULT_PORTS or not host:
        return None
    shown = f"[{host}]" if ":" in host else host
    if port is not None and port != _DEFAULT_PORTS[scheme]:
        return f"{scheme}://{shown}:{port}"
    return f"{scheme}://{shown}"


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


def _shown(value: object, limit: int = 160) -> str:
    """A sender's value for a message: quoted and cut if a string or number, else its
    JSON type. repr of an array or object nested near orjson's 1,024 levels raised
    RecursionError, answered 500."""
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return repr(value if not isinstance(value, str) else value[:limit])[: limit + 2]


def _positive_int(container: Mapping[str, Any], key: str, where: str) -> int:
    value = container.get(key)
    if type(value) is int and 0 <= value <= MAX_ID:  # the usual case, checked first
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise MissingField(f"{where}.{key} must be an integer, got {_shown(value)}")
    if value < 0 or value > MAX_ID:
        raise MissingField(f"{where}.{key} must be between 0 and {MAX_ID}")
    return value


def require_identity(payload: Mapping[str, Any]) -> tuple[int, int]:
    """``(project_id, iid)`` of the merge request the payload names; MissingField unless it
    names one unambiguously."""
    attrs = payload.get("object_attributes")
    if not isinstance(attrs, dict):
        raise MissingField("object_attributes is missing or not an object")
    iid = _positive_int(attrs, "iid", "object_attributes")
    _positive_int(attrs, "id", "object_attributes")
    if "target_project_id" in attrs:
        return _positive_int(attrs, "target_project_id", "object_attributes"), iid
    project = payload.get("project")
    if not isinstance(project, dict):
        raise MissingField("neither object_attributes.target_project_id nor project.id is present")
    return _positive_int(project, "id", "project"), iid


class Decoded(NamedTuple):
    """A merge-request delivery's JSON, decoded and checked for identity, not yet a Delivery."""

    event: str
    instance: str
    payload: dict[str, Any]
    project_id: int
    iid: int


def decode_mr(
    headers: Mapping[str, str], body: bytes, *, verified: Verified | None = None
) -> Decoded | Ignored:
    """Decode a merge-request event and check that it names its MR and sender, or say why
    it is ignored. The cheaper half of :func:`parse_delivery`: enough to decide whether
    the delivery is kept at all."""
    event = headers.get("x-gitlab-event", "").strip()
    if event not in MR_EVENTS:
        shown = event[:64] or "(none)"
        return Ignored(f"event {shown!r} is not a merge request event")
    try:
        payload = decode_json(body)
    except MalformedJSON:
        # Looked at only when decoding failed: nothing on the path of a good delivery.
        encoding = headers.get("content-encoding", "").strip().lower()
        if encoding and encoding != "identity":
            raise UnsupportedEncoding(
                f"Content-Encoding {encoding[:40]!r} is not supported: send the JSON body"
                " uncompressed, as GitLab does"
            ) from None
        raise
    kind = payload.get("object_kind", payload.get("event_type"))
    if kind != "merge_request":
        return Ignored(f"object_kind {_shown(kind, 64)} is not merge_request")
    project_id, iid = require_identity(payload)
    instance = instance_of(headers, payload)
    if verified is not None and verified.source != DEFAULT_SOURCE:
        instance = verified.source  # the header named it, or (without one) the token did
    if verified is not None and verified.reserved:
        _refuse_reserved(instance, headers, payload, verified)
    return Decoded(event, instance, payload, project_id, iid)


def _refuse_reserved(
    instance: str, headers: Mapping[str, str], payload: Mapping[str, Any], verified: Verified
) -> None:
    """WrongInstance when the header or any URL of the payload names a place (host and
    port) with secrets of its own: a payload that carries its MR links may not be filed
    elsewhere.

    The scheme is left out: ``http://`` of a reserved ``https://`` host would otherwise
    file look-alike rows (same host, project and MR number, and to the eye the same
    instance) beside that host's real ones. The port is not, so a GitLab on another
    port of the same host (a source of its own, or the default one) keeps its
    deliveries.
    """
    project = payload.get("project")
    attrs = payload.get("object_attributes")
    named = {
        instance,
        _host_of(headers.get("x-gitlab-instance", "").strip()),
        _host_of(project.get("web_url")) if isinstance(project, dict) else None,
        _host_of(attrs.get("url")) if isinstance(attrs, dict) else None,
    }
    reserved = verified.reserved
    places = _places(reserved) - {_place(verified.source)}
    for found in sorted(
        n for n in named if n is not None and (n in reserved or _place(n) in places)
    ):
        raise WrongInstance(
            f"the payload is from {found}, whose host has its own secrets; "
            "these credentials are not valid for it"
        )


def _place(origin_: str) -> tuple[str, int | None]:
    """Host and port of an origin, the port None when it is a default one (80 or 443,
    whatever the scheme: ``http://host:443`` is a look-alike of ``https://host``)."""
    parts = urlsplit(origin_)
    port = parts.port
    if port in _DEFAULT_PORTS.values():
        port = None
    return (parts.hostname or "").rstrip("."), port


@functools.cache
def _places(origins: frozenset[str]) -> frozenset[tuple[str, int | None]]:
    return frozenset(_place(o) for o in origins)


def to_delivery(
    decoded: Decoded,
    headers: Mapping[str, str],
    body: bytes,
    *,
    received_at: datetime,
    source: str = "webhook",
    verified: Verified | None = None,
) -> Delivery:
    """The Delivery of a decoded request: what is logged about it."""
    return Delivery(
        event=decoded.event,
        instance=decoded.instance,
        headers=kept_headers(headers),
        body=body,
        payload=decoded.payload,
        dedup_key=dedup_key(headers, body, verified),
        received_at=received_at,
        source=source,
    )


def parse_delivery(
    headers: Mapping[str, str],
    body: bytes,
    *,
    secrets: Sequence[bytes],
    max_body_bytes: int,
    received_at: datetime,
    require_token: bool = True,
    source: str = "webhook",
    verified: Verified | None = None,
) -> Delivery | Ignored:
    """Verify and decode one webhook request. ``headers`` must have lower-case names.

    ``verified`` is what :func:`authenticate` returned when the caller checked the
    credentials itself (the HTTP edge does, to refuse before reading the body).
    """
    if require_token:
        verify_token(headers, secrets)
    check_size(len(body), max_body_bytes)
    decoded = decode_mr(headers, body, verified=verified)
    if isinstance(decoded, Ignored):
        return decoded
    return to_delivery(
        decoded, headers, body, received_at=received_at, source=source, verified=verified
    )
