"""Property-based: whatever arrives, parsing and extraction give a typed result or error."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from builders import mr_event
from secledger import payloads
from secledger.errors import IntakeError, SecledgerError, TimestampError
from secledger.extract import (
    LIST_LIMITS,
    MAX_LIST_ITEMS,
    TEXT_LIMITS,
    extract_facts,
    is_security_event,
)
from secledger.intake import Delivery, Ignored, Source, Sources, authenticate, parse_delivery
from secledger.policy import LabelPolicy
from secledger.times import parse_optional, parse_time

NOW = datetime(2026, 11, 29, 12, tzinfo=UTC)
POLICY = LabelPolicy()
SOURCES = Sources(Source("default", (b"tok",), (bytes(32),), "either"), {}, 300)
HEADER_NAMES = (
    "x-gitlab-token",
    "x-gitlab-event",
    "x-gitlab-instance",
    "idempotency-key",
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
    "content-type",
)
# Strings as hostile as JSON allows: NUL, controls, bidi marks, quotes, astral planes.
hostile_text = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",))
    | st.sampled_from(["\x00", "\u202e", "\u200f", '"', "'", "\\", "\x1b"]),
    max_size=40,
) | st.sampled_from(["sec::high", "sec/critical\x00", "\x1b[31m", "x" * 2000])
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)  # what orjson can write
    | st.floats(allow_nan=False, allow_infinity=False)
    | hostile_text,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(hostile_text, inner, max_size=5),
    max_leaves=20,
)
headers = st.dictionaries(st.sampled_from(HEADER_NAMES), hostile_text, max_size=8)
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _parse(head: dict[str, str], body: bytes) -> Delivery | Ignored:
    return parse_delivery(
        head, body, secrets=(b"tok",), max_body_bytes=4096, received_at=NOW, require_token=False
    )


@FAST
@given(head=headers, body=st.binary(max_size=600))
def test_any_bytes_give_a_delivery_an_ignore_or_an_intake_error(head, body) -> None:
    try:
        result = _parse(head | {"x-gitlab-event": "Merge Request Hook"}, body)
    except IntakeError as exc:
        assert 400 <= exc.status_code < 500
    else:
        assert isinstance(result, Delivery | Ignored)


@FAST
@given(head=headers, body=st.binary(max_size=200), skew=st.integers(-(10**6), 10**6))
def test_any_headers_authenticate_or_raise_a_401(head, body, skew) -> None:
    try:
        verified = authenticate(head, body, SOURCES, now=NOW + timedelta(seconds=skew))
    except IntakeError as exc:
        assert exc.status_code == 401
    else:
        assert verified.method in {"token", "signature", "token+signature"}


@FAST
@given(value=st.text(max_size=60) | st.from_regex(r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d(:\d\d)?.*"))
def test_any_text_is_a_utc_time_or_a_timestamp_error(value) -> None:
    try:
        parsed = parse_time(value)
    except TimestampError:
        return
    assert parsed.utcoffset() == timedelta(0)


@FAST
@given(value=json_values)
def test_any_json_value_as_a_time_is_none_a_time_or_a_typed_error(value) -> None:
    try:
        parsed = parse_optional(value)
    except SecledgerError:
        return
    assert parsed is None or parsed.tzinfo is not None


@FAST
@given(payload=st.dictionaries(hostile_text, json_values, max_size=6) | json_values)
def test_payload_readers_never_raise(payload) -> None:
    container = payload if isinstance(payload, dict) else {"x": payload}
    payloads.current_labels(container)
    payloads.label_change(container)
    payloads.state_change(container)
    payloads.state_of(container)
    payloads.usernames(container.get("x"))
    titles = payloads.label_titles(container.get("x"))
    assert POLICY.any_security_in(container.get("x")) == POLICY.any_security(titles)
    value = payloads.integer(container, "x")
    assert value is None or -(2**63) <= value < 2**63


MUTABLE_PATHS = (
    ("object_attributes", "action"),
    ("object_attributes", "title"),
    ("object_attributes", "labels"),
    ("object_attributes", "updated_at"),
    ("object_attributes", "created_at"),
    ("object_attributes", "state"),
    ("object_attributes", "state_id"),
    ("object_attributes", "url"),
    ("object_attributes", "target"),
    ("object_attributes", "author_id"),
    ("labels",),
    ("changes",),
    ("user",),
    ("project",),
    ("reviewers",),
)


def _mutate(base: dict[str, Any], changes: dict[tuple[str, ...], Any]) -> dict[str, Any]:
    payload = copy.deepcopy(base)
    for path, value in changes.items():
        target = payload
        for part in path[:-1]:
            target = target[part]
        target[path[-1]] = value
    return payload


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    changes=st.dictionaries(st.sampled_from(MUTABLE_PATHS), json_values, max_size=6),
    labels=st.lists(hostile_text, max_size=6),
)
def test_any_mutated_payload_extracts_to_storable_bounded_facts(changes, labels) -> None:
    base = mr_event("approved", labels=["sec::high", *labels], actor="bob")
    body = orjson.dumps(_mutate(base, changes))
    try:
        delivery = _parse({"x-gitlab-event": "Merge Request Hook"}, body)
    except IntakeError:
        return
    if isinstance(delivery, Ignored):
        return
    facts = extract_facts(delivery, POLICY)
    # The ignore fast path decides from the labels alone, exactly as extraction does.
    assert is_security_event(delivery, POLICY) == facts.is_security
    stored = orjson.dumps(facts.to_json()).decode()
    assert "\\u0000" not in stored  # PostgreSQL jsonb would refuse it
    for name, limit in TEXT_LIMITS.items():
        value = getattr(facts, name)
        assert value is None or (len(value) <= limit and "\x00" not in value)
    for name, limit in LIST_LIMITS.items():
        values = getattr(facts, name) or ()
        assert len(values) <= MAX_LIST_ITEMS
        assert all(len(v) <= limit and "\x00" not in v for v in values)
