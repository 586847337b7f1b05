"""Who may send webhooks, from the configuration: each GitLab instance's secrets and policy."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import SecretStr

from secledger.config import Settings
from secledger.errors import ConfigError
from secledger.intake import DEFAULT_SOURCE, Source, Sources, origin

MIN_SIGNING_KEY_BYTES = 16


def signing_key(secret: str, where: str) -> bytes:
    """The HMAC key of a ``whsec_<base64>`` secret; errors name the setting, never the value."""
    prefix, _, encoded = secret.strip().partition("_")
    try:
        key = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if prefix != "whsec" or len(key) < MIN_SIGNING_KEY_BYTES:
        raise ConfigError(
            f"{where} is not a signing secret: expected whsec_ followed by the base64 of "
            f"at least {MIN_SIGNING_KEY_BYTES} bytes"
        )
    return key


@dataclass(frozen=True)
class SourceSettings:
    """The settings of one source, as errors name them."""

    tokens: str
    secrets: str
    policy: str


def make_source(
    name: str,
    tokens: Sequence[SecretStr],
    secrets: Sequence[SecretStr],
    policy: str,
    named: SourceSettings,
) -> Source:
    """Build one source, refusing a policy its secrets cannot satisfy."""
    keys = tuple(
        signing_key(s.get_secret_value(), f"{named.secrets}[{i}]") for i, s in enumerate(secrets)
    )
    source = Source(name, tuple(t.get_secret_value().encode() for t in tokens), keys, policy)
    if policy in {"token", "both"} and not source.tokens:
        raise ConfigError(f"{named.policy} {policy!r} needs at least one token in {named.tokens}")
    if policy in {"signature", "both"} and not source.keys:
        raise ConfigError(
            f"{named.policy} {policy!r} needs at least one signing secret in {named.secrets}"
        )
    return source


DEFAULT_NAMES = SourceSettings(
    "SECLEDGER_WEBHOOK_SECRETS", "SECLEDGER_WEBHOOK_SIGNING_SECRETS", "SECLEDGER_WEBHOOK_AUTH"
)


def sources_from_settings(settings: Settings, *, open_default: bool = False) -> Sources:
    """Sources from the configuration; ``open_default`` accepts anything without credentials."""
    default = Source(DEFAULT_SOURCE, open=True)
    if not open_default and (settings.webhook_secrets or settings.webhook_signing_secrets):
        default = make_source(
            DEFAULT_SOURCE,
            settings.webhook_secrets,
            settings.webhook_signing_secrets,
            settings.webhook_auth,
            DEFAULT_NAMES,
        )
    elif not open_default:
        default = Source(DEFAULT_SOURCE)
    instances: dict[str, Source] = {}
    for index, config in enumerate(settings.webhook_sources):
        where = f"webhook_sources[{index}]"
        name = origin(config.instance)
        if name is None or name in instances:
            raise ConfigError(f"{where}.instance must be a distinct http(s) base URL")
        if not config.tokens and not config.signing_secrets:
            raise ConfigError(f"{where} has neither tokens nor signing_secrets")
        named = SourceSettings(f"{where}.tokens", f"{where}.signing_secrets", f"{where}.auth")
        instances[name] = make_source(
            name, config.tokens, config.signing_secrets, config.auth, named
        )
    return Sources(default, instances, settings.webhook_tolerance_seconds)
