"""Signed webhooks, sources and replay protection as pure functions (no server)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from builders import dumps, mr_event
from conftest import post
from live import SIGNING_KEY, SIGNING_SECRET, sign
from secledger.config import Settings, WebhookSource
from secledger.errors import (
    ConfigError,
    InvalidSignature,
    InvalidToken,
    ReplayedDelivery,
    StaleTimestamp,
    WrongInstance,
)
from secledger.intake import (
    TOKEN_PROVEN,
    UNPROVEN,
    Delivery,
    Source,
    Sources,
    authenticate,
    origin,
    parse_delivery,
    precheck,
)
from secledger.replay import ReplayGuard
from secledger.senders import sources_from_settings
from secledger.store import db
from secledger.web import create_app

NOW = datetime(2026, 11, 29, 12, 0, 0, tzinfo=UTC)
STAMP = int(NOW.timestamp())
OTHER_KEY = bytes(range(100, 132))
BODY = dumps(mr_event("approved", labels=["sec::high"], actor="bob"))


def signed(body: bytes = BODY, *, key: bytes = SIGNING_KEY, stamp: int = STAMP, wid: str = "m1"):
    return {
        "x-gitlab-event": "Merge Request Hook",
        "webhook-id": wid,
        "webhook-timestamp": str(stamp),
        "webhook-signature": sign(key, wid, stamp, body),
    }


def sources(policy: str = "signature", tokens=(), keys=(SIGNING_KEY,)) -> Sources:
    return Sources(Source("default", tuple(tokens), tuple(keys), policy), {}, 300)


def test_valid_signature_is_verified_with_its_id_and_timestamp() -> None:
    verified = authenticate(signed(), BODY, sources(), now=NOW)
    assert (verified.method, verified.webhook_id, verified.timestamp) == (
        "signature",
        "m1",
        str(STAMP),
    )


def test_any_one_of_several_signatures_passes() -> None:
    headers = signed()
    good = headers["webhook-signature"]
    headers["webhook-signature"] = f"v1,AAAA v1a,whatever v1,not*base64 {good}"
    assert authenticate(headers, BODY, sources(), now=NOW).method == "signature"


def test_signature_over_another_body_is_refused() -> None:
    with pytest.raises(InvalidSignature, match="no webhook-signature matches"):
        authenticate(signed(), BODY + b" ", sources(), now=NOW)


def test_signature_with_an_unknown_key_is_refused() -> None:
    with pytest.raises(InvalidSignature, match="no webhook-signature matches"):
        authenticate(signed(key=OTHER_KEY), BODY, sources(), now=NOW)


def test_two_active_signing_secrets_both_verify_during_rotation() -> None:
    rotating = sources(keys=(OTHER_KEY, SIGNING_KEY))
    assert authenticate(signed(key=SIGNING_KEY), BODY, rotating, now=NOW).method == "signature"
    assert authenticate(signed(key=OTHER_KEY), BODY, rotating, now=NOW).method == "signature"


@pytest.mark.parametrize(
    ("offset", "message"),
    [
        (-301, "webhook-timestamp is 301 s in the past; the tolerance is 300 s"),
        (301, "webhook-timestamp is 301 s in the future; the tolerance is 300 s"),
    ],
)
def test_timestamp_outside_the_tolerance_is_refused(offset: int, message: str) -> None:
    headers = signed(stamp=STAMP + offset)
    with pytest.raises(StaleTimestamp) as caught:
        precheck(headers, sources(), now=NOW)
    assert str(caught.value) == message
    assert caught.value.status_code == 401


def test_timestamp_at_the_edge_of_the_tolerance_passes() -> None:
    headers = signed(stamp=STAMP - 300)
    assert authenticate(headers, BODY, sources(), now=NOW).method == "signature"


@pytest.mark.parametrize(
    ("drop", "change", "message"),
    [
        ("webhook-signature", {}, "webhook-signature header is missing"),
        ("webhook-id", {}, "webhook-id header is missing"),
        ("webhook-timestamp", {}, "webhook-timestamp header is missing"),
        (None, {"webhook-timestamp": "1.5e9"}, "digits only"),
        (None, {"webhook-id": "id with spaces"}, "printable ASCII"),
        (None, {"webhook-signature": "v2,abc"}, "no well-formed v1"),
        (None, {"webhook-signature": " ".join(["v1,AAAA"] * 17)}, "more than 16"),
    ],
)
def test_malformed_signature_headers_get_a_precise_401(drop, change, message) -> None:
    headers = signed() | change
    if drop:
        del headers[drop]
    with pytest.raises(InvalidSignature, match=message) as caught:
        authenticate(headers, BODY, sources(), now=NOW)
    assert caught.value.status_code == 401


def test_either_policy_accepts_a_token_or_a_signature_but_not_a_bad_one() -> None:
    either = sources("either", tokens=(b"tok",))
    assert authenticate(signed(), BODY, either, now=NOW).method == "signature"
    token_only = {"x-gitlab-token": "tok", "webhook-id": "m1", "webhook-timestamp": "1"}
    assert authenticate(token_only, BODY, either, now=NOW).method == "token"
    with pytest.raises(InvalidToken, match="does not match"):
        authenticate(signed() | {"x-gitlab-token": "wrong"}, BODY, either, now=NOW)
    with pytest.raises(InvalidToken, match="must carry X-Gitlab-Token or webhook-signature"):
        authenticate({}, BODY, either, now=NOW)


def test_both_policy_needs_token_and_signature() -> None:
    both = sources("both", tokens=(b"tok",))
    with pytest.raises(InvalidToken, match="missing"):
        authenticate(signed(), BODY, both, now=NOW)
    with pytest.raises(InvalidSignature, match="missing"):
        authenticate({"x-gitlab-token": "tok"}, BODY, both, now=NOW)
    verified = authenticate(signed() | {"x-gitlab-token": "tok"}, BODY, both, now=NOW)
    assert verified.method == "token+signature"


def test_signature_policy_ignores_a_token() -> None:
    with pytest.raises(InvalidSignature, match="missing"):
        authenticate({"x-gitlab-token": "tok"}, BODY, sources("signature"), now=NOW)


def _multi() -> Sources:
    settings = Settings(
        webhook_secrets=[SecretStr("default-token")],
        webhook_sources=[
            WebhookSource(
                instance="https://gitlab.example.com",
                signing_secrets=[SecretStr(SIGNING_SECRET)],
                auth="signature",
            ),
            WebhookSource(instance="https://other.example.org/", tokens=[SecretStr("other")]),
        ],
    )
    return sources_from_settings(settings)


def test_each_instance_is_matched_by_header_and_uses_its_own_secrets() -> None:
    multi = _multi()
    example = signed() | {"x-gitlab-instance": "https://gitlab.example.com"}
    assert authenticate(example, BODY, multi, now=NOW).source == "https://gitlab.example.com"
    other = {"x-gitlab-instance": "https://OTHER.example.org", "x-gitlab-token": "other"}
    assert authenticate(other, BODY, multi, now=NOW).source == "https://other.example.org"
    # Another instance's token does not open this one.
    stolen = {"x-gitlab-instance": "https://other.example.org", "x-gitlab-token": "default-token"}
    with pytest.raises(InvalidToken, match="does not match"):
        authenticate(stolen, BODY, multi, now=NOW)


def _other_body(url: str = "https://other.example.org/acme/p") -> bytes:
    body = mr_event("approved", labels=["sec::high"], actor="bob")
    body["project"]["web_url"] = url
    body["object_attributes"]["url"] = url + "/-/merge_requests/1"
    return dumps(body)


def _delivered(headers: dict[str, str], body: bytes, given: Sources) -> Delivery:
    """The delivery the endpoint would record: authenticated, then decoded."""
    verified = authenticate(headers, body, given, now=NOW)
    delivery = parse_delivery(
        headers,
        body,
        secrets=(),
        max_body_bytes=10**6,
        received_at=NOW,
        require_token=False,
        verified=verified,
    )
    assert isinstance(delivery, Delivery)
    return delivery


def _instance_of(headers: dict[str, str], body: bytes, multi: Sources) -> str:
    return _delivered(headers, body, multi).instance


def test_without_the_instance_header_an_instances_token_selects_it() -> None:
    """GitLab before 15.5 sends no X-Gitlab-Instance: the partner's token was checked
    against the default source, and every delivery refused (401) until GitLab disabled
    the hook. The token that selected the instance names it, as the header would."""
    multi = _multi()
    headers = {"x-gitlab-event": "Merge Request Hook", "x-gitlab-token": "other"}
    assert precheck(headers, multi, now=NOW).source == "https://other.example.org"  # type: ignore[union-attr]
    assert _instance_of(headers, _other_body(), multi) == "https://other.example.org"
    assert _instance_of(headers, _other_body("https://x.test/p"), multi) == (
        "https://other.example.org"
    )
    # Still no way into a third instance's ledger, nor a way round a wrong token.
    with pytest.raises(WrongInstance):  # BODY is gitlab.example.com's
        _instance_of(headers, BODY, multi)
    wrong = {"x-gitlab-event": "Merge Request Hook", "x-gitlab-token": "nobody's"}
    with pytest.raises(
        InvalidToken, match=r"^X-Gitlab-Token does not match any configured secret$"
    ):
        precheck(wrong, multi, now=NOW)
    # The default source's own token keeps selecting it.
    default = {"x-gitlab-event": "Merge Request Hook", "x-gitlab-token": "default-token"}
    assert _instance_of(default, _other_body("https://x.test/p"), multi) == "https://x.test"


def test_a_header_naming_no_configured_instance_says_the_default_source_was_checked() -> None:
    """The partner's token with the header in another scheme: the token is configured,
    so "does not match any configured secret" alone sent the operator the wrong way."""
    headers = {"x-gitlab-instance": "http://other.example.org", "x-gitlab-token": "other"}
    with pytest.raises(InvalidToken, match="of the default source: X-Gitlab-Instance"):
        precheck(headers, _multi(), now=NOW)


def test_an_unmatched_instance_with_no_default_secret_says_why_it_fell_to_the_default() -> None:
    """Only an instance has secrets, and GitLab names it in another scheme (TLS ended
    at a proxy): "no secret is configured for deliveries from default" alone did not say
    why the default was asked, while GitLab disabled the hook after four refusals."""
    only = sources_from_settings(
        Settings(
            webhook_sources=[
                WebhookSource(instance="https://gitlab.example.com", tokens=[SecretStr("t")])
            ]
        )
    )
    headers = {"x-gitlab-instance": "http://gitlab.example.com:8443", "x-gitlab-token": "t"}
    with pytest.raises(InvalidToken) as refused:
        precheck(headers, only, now=NOW)
    assert str(refused.value) == (
        "no secret is configured for deliveries from default: X-Gitlab-Instance"
        " 'http://gitlab.example.com:8443' names no configured instance (instances are"
        " matched by scheme, host and port)"
    )
    named = headers | {"x-gitlab-instance": "https://gitlab.example.com"}
    assert precheck(named, only, now=NOW).source == "https://gitlab.example.com"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        (
            {"webhook_auth": "both", "webhook_signing_secrets": [SecretStr(SIGNING_SECRET)]},
            "SECLEDGER_WEBHOOK_AUTH 'both' needs at least one token in SECLEDGER_WEBHOOK_SECRETS",
        ),
        (
            {
                "webhook_sources": [
                    WebhookSource(
                        instance="https://p.test",
                        auth="token",
                        signing_secrets=[SecretStr(SIGNING_SECRET)],
                    )
                ]
            },
            "webhook_sources[0].auth 'token' needs at least one token in webhook_sources[0].tokens",
        ),
    ],
)
def test_a_policy_without_its_secret_names_the_settings_to_fix(settings, named) -> None:
    with pytest.raises(ConfigError) as caught:
        sources_from_settings(Settings(**settings))
    assert str(caught.value) == named


@pytest.mark.parametrize("claimed", [None, "https://x.test"])
def test_default_credentials_cannot_record_for_an_instance_with_its_own_secrets(claimed) -> None:
    """The payload's project URL names gitlab.example.com: neither leaving the header out
    nor a made-up one may file its MR (its links, its paths) under the default source."""
    headers = {"x-gitlab-event": "Merge Request Hook", "x-gitlab-token": "default-token"}
    if claimed is not None:
        headers["x-gitlab-instance"] = claimed
    _refused_for_gitlab_example(headers, BODY)


@pytest.mark.parametrize(
    "url", ["https://gitlab.example.com./acme/p", "https://u@gitlab.example.com/acme/p"]
)
def test_a_reserved_instance_is_found_behind_a_trailing_dot_or_a_user_part(url) -> None:
    """Neither is taken as an instance name, but a browser opens the reserved host."""
    body = mr_event("approved", labels=["sec::high"], actor="bob")
    body["project"]["web_url"] = url
    body["object_attributes"]["url"] = url + "/-/merge_requests/1"
    headers = {
        "x-gitlab-event": "Merge Request Hook",
        "x-gitlab-token": "default-token",
        "x-gitlab-instance": "https://x.test",
    }
    _refused_for_gitlab_example(headers, dumps(body))


def _refused_for_gitlab_example(headers: dict[str, str], body: bytes) -> None:
    """Authenticated by the default token, then refused: gitlab.example.com is reserved."""
    with pytest.raises(WrongInstance, match=r"gitlab\.example\.com(:\d+)?, whose host has its own"):
        _delivered(headers, body, _multi())


@pytest.mark.parametrize(
    "url",
    [
        "http://gitlab.example.com/acme/p",
        "HTTP://GitLab.Example.com:80/acme/p",
        "http://gitlab.example.com:443/acme/p",
    ],
)
def test_another_scheme_of_a_reserved_host_is_refused_too(url) -> None:
    """Filed as http://gitlab.example.com, a default-token holder's rows would stand
    beside the reserved host's own (same host, project path and MR number)."""
    body = mr_event("approved", labels=["sec::high"], actor="bob")
    body["project"]["web_url"] = url
    body["object_attributes"]["url"] = url + "/-/merge_requests/1"
    headers = {"x-gitlab-event": "Merge Request Hook", "x-gitlab-token": "default-token"}
    _refused_for_gitlab_example(headers, dumps(body))


def test_two_gitlabs_on_one_host_keep_their_own_deliveries() -> None:
    """Host and port are compared, not the host alone: a GitLab on another port of a
    reserved host, a source of its own or the default one, keeps its deliveries."""
    settings = Settings(
        webhook_secrets=[SecretStr("default")],
        webhook_sources=[
            WebhookSource(instance="https://git.example.com", tokens=[SecretStr("a")]),
            WebhookSource(instance="https://git.example.com:8443", tokens=[SecretStr("b")]),
            WebhookSource(instance="https://other.example.com:8443", tokens=[SecretStr("c")]),
        ],
    )
    for instance, token in (
        ("https://git.example.com", "a"),
        ("https://git.example.com:8443", "b"),
        ("https://other.example.com", "default"),
    ):
        body = mr_event("approved", labels=["sec::high"], actor="bob")
        body["project"]["web_url"] = instance + "/acme/p"
        body["object_attributes"]["url"] = instance + "/acme/p/-/merge_requests/1"
        headers = {
            "x-gitlab-event": "Merge Request Hook",
            "x-gitlab-token": token,
            "x-gitlab-instance": instance,
        }
        verified = authenticate(headers, dumps(body), sources_from_settings(settings), now=NOW)
        delivery = parse_delivery(
            headers,
            dumps(body),
            secrets=(),
            max_body_bytes=10**6,
            received_at=NOW,
            require_token=False,
            verified=verified,
        )
        assert delivery.instance == instance


@pytest.mark.parametrize(
    "claimed", ["https://gitlab.example.com:443", "https://GITLAB.example.com:0443"]
)
def test_a_default_port_names_the_same_instance_and_its_policy(claimed) -> None:
    """Before, "host:443" was another instance: default credentials were accepted for it."""
    headers = {"x-gitlab-token": "default-token", "x-gitlab-instance": claimed}
    with pytest.raises(InvalidSignature, match="webhook-signature header is missing"):
        authenticate(headers, BODY, _multi(), now=NOW)


def test_an_origin_has_one_spelling() -> None:
    assert origin("https://gitlab.example.com:443/group/p") == "https://gitlab.example.com"
    assert origin("HTTP://Host:0080") == "http://host"
    assert origin("https://host:8443/") == "https://host:8443"
    assert origin("https://[::1]:443") == "https://[::1]"
    assert origin("https://[::1]") == "https://[::1]"
    assert origin("http://host:443") == "http://host:443"


def test_signed_delivery_is_deduplicated_on_its_signed_webhook_id() -> None:
    headers = signed() | {"idempotency-key": "attacker-chosen"}
    assert _delivered(headers, BODY, sources()).dedup_key == "whid:m1"


@pytest.mark.parametrize(
    ("update", "message"),
    [
        ({"webhook_signing_secrets": [SecretStr("whsec_c2hvcnQ=")]}, "at least 16 bytes"),
        ({"webhook_signing_secrets": [SecretStr("no-prefix-secret-value")]}, "whsec_"),
        ({"webhook_auth": "signature"}, "needs at least one signing secret"),
    ],
)
def test_bad_signing_configuration_is_refused_without_echoing_the_secret(update, message) -> None:
    settings = Settings(webhook_secrets=[SecretStr("tok")]).model_copy(update=update)
    with pytest.raises(ConfigError, match=message) as caught:
        sources_from_settings(settings)
    assert "c2hvcnQ" not in str(caught.value)
    assert "no-prefix-secret-value" not in str(caught.value)


def test_replay_guard_refuses_a_message_seen_within_the_window() -> None:
    guard = ReplayGuard(tolerance=300)
    guard.check("default", "m1", "100", now=NOW)
    with pytest.raises(ReplayedDelivery, match="already received 10 s ago"):
        guard.check("default", "m1", "100", now=NOW + timedelta(seconds=10))
    # A resend signed afresh (new timestamp) is left to deduplication.
    guard.check("default", "m1", "160", now=NOW + timedelta(seconds=60))
    # Another instance may use the same id.
    guard.check("https://other.example.org", "m1", "100", now=NOW)


def test_replay_guard_forgets_after_twice_the_tolerance_and_stays_bounded() -> None:
    guard = ReplayGuard(tolerance=300, capacity=3)
    guard.check("default", "m1", "1", now=NOW)
    guard.check("default", "m1", "1", now=NOW + timedelta(seconds=602))
    for index in range(10):
        guard.check("default", f"x{index}", "1", now=NOW + timedelta(seconds=603))
    assert len(guard) == 3


def test_replay_guard_remembers_a_message_as_long_as_its_timestamp_is_accepted() -> None:
    """The timestamp check compares whole seconds: a message first seen at the window's
    start was accepted again 600.3 s later, after the guard had forgotten it."""
    sources_ = sources()
    guard = ReplayGuard(tolerance=sources_.tolerance)
    first = datetime.fromtimestamp(STAMP - sources_.tolerance, UTC)
    again = first + timedelta(seconds=2 * sources_.tolerance, milliseconds=300)
    for now in (first, again):  # both within the timestamp's tolerance
        assert authenticate(signed(), BODY, sources_, now=now).method == "signature"
    guard.check("default", "m1", str(STAMP), now=first)
    with pytest.raises(ReplayedDelivery):
        guard.check("default", "m1", str(STAMP), now=again)


def test_precheck_answers_for_a_token_and_leaves_a_signature_to_authenticate() -> None:
    by_token = sources("token", tokens=(b"t0k3n",), keys=())
    verified = precheck({"x-gitlab-token": "t0k3n"}, by_token, now=NOW)
    assert verified == authenticate({"x-gitlab-token": "t0k3n"}, BODY, by_token, now=NOW)
    assert verified is not None and verified.method == "token"
    assert precheck(signed(), sources(), now=NOW) == UNPROVEN  # the body is not read yet
    # Under "both" the token is checked first: the sender is proved before the body.
    both = sources("both", tokens=(b"t0k3n",))
    assert precheck(signed() | {"x-gitlab-token": "t0k3n"}, both, now=NOW) == TOKEN_PROVEN
    with pytest.raises(InvalidToken):
        precheck({"x-gitlab-token": "wrong"}, by_token, now=NOW)


def test_one_sources_credentials_cannot_take_another_sources_key(settings, database_url) -> None:
    """The sender picks Idempotency-Key, and every source shared one namespace: a key
    sent first with the default token made the other instance's delivery of that key
    (a resend GitLab's hook log shows) a ``duplicate``, never logged."""
    two = settings.model_copy(
        update={
            "webhook_sources": [
                WebhookSource(instance="https://other.example.org", tokens=[SecretStr("other")])
            ]
        }
    )
    app = create_app(two, db.Database(database_url, embedded=False))
    other = {"X-Gitlab-Instance": "https://other.example.org", "Idempotency-Key": "k-1"}
    with TestClient(app) as client:
        first = post(client, mr_event("open", iid=3), **{"Idempotency-Key": "k-1"})
        assert first.json()["status"] == "recorded"
        theirs = post(client, _other_body(), token="other", **other)
        assert theirs.json()["status"] == "recorded", theirs.json()
        again = post(client, _other_body(), token="other", **other)
        assert again.json()["status"] == "duplicate"
    with psycopg.connect(database_url) as conn:
        keys = [row[0] for row in conn.execute("SELECT dedup_key FROM delivery_log ORDER BY seq")]
    assert keys == ["idem:k-1", "idem@https://other.example.org k-1"]
