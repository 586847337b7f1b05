"""Settings: built once at the entry point from the environment and an optional TOML file."""

from __future__ import annotations

import difflib
import os
import re
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote

import platformdirs
import psycopg
from psycopg.conninfo import conninfo_to_dict
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from secledger.errors import ConfigError
from secledger.tierpolicy import BusinessHoursConfig, TierPolicyConfig, check_tiers

DEFAULT_TIERS = ("critical", "high", "medium", "low")
DEFAULT_MAX_BODY_BYTES = 25 * 1024 * 1024
ENV_PREFIX = "SECLEDGER_"
AuthPolicy = Literal["token", "signature", "either", "both"]
LogLevel = Literal["debug", "info", "warning", "error", "critical"]


def default_data_dir() -> Path:
    """Where the embedded database and spool live when nothing else is configured."""
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # The embedded server runs as a dedicated system user, which cannot
        # traverse /root; a system location is the conventional place for root.
        return Path("/var/lib/secledger")
    return Path(platformdirs.user_data_dir("secledger"))


def _split_csv(value: Any) -> Any:
    # Newlines separate too, so a secret file may hold one secret per line.
    if isinstance(value, str):
        return [part.strip() for part in value.replace("\n", ",").split(",") if part.strip()]
    return value


def _mentions_secret(annotation: Any) -> bool:
    """True when a field's type is or contains SecretStr (``SecretStr | None``, lists...)."""
    if annotation is SecretStr:
        return True
    return any(_mentions_secret(arg) for arg in typing.get_args(annotation))


def secret_field_names(settings_cls: type[BaseSettings]) -> list[str]:
    """Fields that hold secrets: each can also be read from ``SECLEDGER_<NAME>_FILE``.

    A field that declares its own ``<name>_file`` setting keeps that mechanism.
    """
    fields = settings_cls.model_fields
    return [
        name
        for name, info in fields.items()
        if _mentions_secret(info.annotation) and f"{name}_file" not in fields
    ]


def read_secret_file(variable: str, path: str) -> str:
    """The secret in ``path`` without its trailing newline; errors name the file, never its text."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "it is not UTF-8 text"
        raise ConfigError(f"{variable}: cannot read {path}: {reason}") from None
    value = text.rstrip("\r\n")
    if not value.strip():
        raise ConfigError(f"{variable}: {path} is empty")
    return value


# SECLEDGER_ variables read outside the settings: the config file, and the tools'.
OTHER_VARIABLES = frozenset(
    {
        "SECLEDGER_CONFIG",
        "SECLEDGER_TEST_DATABASE_URL",
        "SECLEDGER_BENCH_DATABASE_URL",
        "SECLEDGER_CHROMIUM",
    }
)


def unknown_variables(
    settings_cls: type[BaseSettings], environ: Mapping[str, str]
) -> list[tuple[str, str | None]]:
    """``SECLEDGER_`` variables no setting reads, each with the closest name that one does
    (or None): a misspelt variable is otherwise ignored without a word."""
    known = {f"{ENV_PREFIX}{name.upper()}" for name in settings_cls.model_fields}
    known |= {f"{ENV_PREFIX}{name.upper()}_FILE" for name in secret_field_names(settings_cls)}
    known |= OTHER_VARIABLES
    found = []
    for variable in sorted(environ):
        if variable.upper().startswith(ENV_PREFIX) and variable.upper() not in known:
            close = difflib.get_close_matches(variable.upper(), sorted(known), n=1)
            found.append((variable, close[0] if close else None))
    return found


def variable_for(name: str, environ: Mapping[str, str]) -> str | None:
    """The variable the settings read setting ``name`` from, if any: ``SECLEDGER_<NAME>``
    in any case, even empty; for a secret, else ``SECLEDGER_<NAME>_FILE`` as spelt and
    not empty (``SecretFileSource``)."""
    plain = f"{ENV_PREFIX}{name.upper()}"
    if any(variable.upper() == plain for variable in environ):
        return plain
    if name in secret_field_names(Settings) and environ.get(f"{plain}_FILE"):
        return f"{plain}_FILE"
    return None


def overridden_keys(environ: Mapping[str, str]) -> list[tuple[str, str]]:
    """(key of the SECLEDGER_CONFIG file, variable) for each key the environment hides:
    the environment wins, so an edit of the file (``gitlab connect`` adds a secret
    there) would change nothing, without a word."""
    path = environ.get("SECLEDGER_CONFIG")
    if not path:
        return []
    try:
        keys = tomllib.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return []  # said when the settings load
    found = []
    for key in sorted(keys):
        variable = variable_for(key, environ)
        if variable is not None:
            found.append((key, variable))
    return found


def loose_secret_files(
    settings_cls: type[BaseSettings], environ: Mapping[str, str]
) -> list[tuple[str, int]]:
    """``SECLEDGER_<NAME>_FILE`` variables whose file others may read (group or world
    bits set), each with its permission bits: SECURITY.md asks for mode 0400 or 0600."""
    named = {
        variable: environ.get(variable)
        for variable in (f"{ENV_PREFIX}{n.upper()}_FILE" for n in secret_field_names(settings_cls))
    }
    return _loose(named)


def loose_key_files(settings: Settings) -> list[tuple[str, int]]:
    """The settings naming a secret file of their own (the GitLab token, the checkpoint
    signing key, a webhook source's ``tokens_file`` or ``signing_secrets_file``) whose
    file others may read, each with its permission bits."""
    names = ("gitlab_token_file", "checkpoint_key_file")
    paths: dict[str, str | Path | None] = {
        f"{ENV_PREFIX}{n.upper()}": getattr(settings, n) for n in names
    }
    for index, source in enumerate(settings.webhook_sources):
        for key, path in source.secret_files.items():
            paths[f"webhook_sources[{index}].{key}"] = path
    return _loose(paths)


def _loose(paths: Mapping[str, str | Path | None]) -> list[tuple[str, int]]:
    found = []
    for variable, path in paths.items():
        if not path:
            continue
        try:
            mode = Path(path).stat().st_mode & 0o777
        except OSError:
            continue  # reading it reports what is wrong
        if mode & 0o077:
            found.append((variable, mode))
    return found


def describe(exc: ValidationError) -> str:
    """Each problem as ``field: message``; pydantic's own text would echo the input,
    which for a secret field is the secret."""
    problems = exc.errors(include_input=False, include_url=False, include_context=False)
    return "; ".join(
        f"{'.'.join(str(part) for part in problem['loc']) or 'settings'}: {problem['msg']}"
        for problem in problems
    )


# The cookie signing key set by hand: shorter is guessable.
MIN_SECRET_CHARS = 16


class SecretFileSource(PydanticBaseSettingsSource):
    """``SECLEDGER_<NAME>_FILE`` for every SecretStr field: Docker/Kubernetes secret files.

    Generic on purpose: a secret field added to Settings gets its ``_FILE`` variable
    without further code. Setting both the variable and its ``_FILE`` is an error,
    because silently preferring one hides a misconfiguration.
    """

    def __init__(self, settings_cls: type[BaseSettings]) -> None:
        super().__init__(settings_cls)
        self._values: dict[str, Any] = {}
        for name in secret_field_names(settings_cls):
            variable = f"{ENV_PREFIX}{name.upper()}"
            path = os.environ.get(f"{variable}_FILE")
            if not path:
                continue
            if variable in os.environ:
                # Empty too (a compose or Helm template's blank): the environment source
                # would then win with "", and the file be dropped without a word.
                blank = "" if os.environ[variable] else f" ({variable} is set, empty)"
                raise ConfigError(f"set {variable} or {variable}_FILE, not both{blank}")
            self._values[name] = read_secret_file(f"{variable}_FILE", path)

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        """Part of the source protocol; ``__call__`` does the work."""
        return self._values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._values)


class WebhookSource(BaseModel):
    """One GitLab instance with its own secrets and policy, matched by X-Gitlab-Instance."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    instance: str = Field(description="Base URL GitLab sends in X-Gitlab-Instance.")
    tokens: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    signing_secrets: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    auth: AuthPolicy = "either"
    # Filled from ``tokens_file`` / ``signing_secrets_file`` (key -> path), not a TOML
    # key of its own: kept so that start-up can warn about a file others may read.
    secret_files: dict[str, str] = Field(default_factory=dict, exclude=True, repr=False)

    @model_validator(mode="before")
    @classmethod
    def _secret_files(cls, data: Any) -> Any:
        # ``tokens_file`` / ``signing_secrets_file`` keep secrets out of the TOML file.
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if "secret_files" in data:
            raise ConfigError("webhook_sources: unknown key secret_files")
        files: dict[str, str] = {}
        for name in ("tokens", "signing_secrets"):
            path = data.pop(f"{name}_file", None)
            if path is None:
                continue
            if data.get(name):
                raise ConfigError(f"webhook_sources: set {name} or {name}_file, not both")
            data[name] = read_secret_file(f"webhook_sources.{name}_file", str(path))
            files[f"{name}_file"] = str(path)
        data["secret_files"] = files
        return data

    @field_validator("tokens", "signing_secrets", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        return _split_csv(value)


def _user_pair(item: str) -> tuple[str, str]:
    name, sep, hashed = item.partition(":")
    if not sep or not name.strip() or not hashed.strip():
        # Never echo the item: it holds a password hash.
        raise ValueError("users entries must be name:hash (see secledger user hash-password)")
    return name.strip(), hashed.strip()


_POSTGRESQL_SCHEMES = ("postgresql://", "postgres://", "postgresql+psycopg://")
# libpq checks these values only when it connects, and calls a bad one a failed
# connection: the outage status, not a configuration error.
_ENUMERATED_OPTIONS = {
    "sslmode": ("disable", "allow", "prefer", "require", "verify-ca", "verify-full"),
    "gssencmode": ("disable", "prefer", "require"),
    "target_session_attrs": (
        "any",
        "read-write",
        "read-only",
        "primary",
        "standby",
        "prefer-standby",
    ),
}


def _check_options(url: str) -> None:
    """Refuse a query option libpq does not know, or a value it would refuse later."""
    plain = "postgresql://" + url.split("://", 1)[1]
    try:
        options = conninfo_to_dict(plain)
    except psycopg.Error as exc:
        reason = str(exc).strip()
        # libpq quotes the text it could not read, which may be a password.
        if any(secret in reason for secret in _secrets(plain)):
            reason = "it cannot be parsed"
        raise ValueError(f"is not a valid PostgreSQL URL: {reason}") from None
    for name, allowed in _ENUMERATED_OPTIONS.items():
        value = options.get(name)
        if value is not None and value not in allowed:
            raise ValueError(f"has {name}={value}; use one of {', '.join(allowed)}")
    for name in _INTEGER_OPTIONS:
        number = str(options.get(name, "0"))
        # libpq's own reading: blanks around, a sign, digits, within a C int.
        if not re.fullmatch(r"\s*[+-]?\d+\s*", number) or abs(int(number)) > 2**31 - 1:
            raise ValueError(f"has {name}={number[:40]!r}; it takes a whole number")


# Options libpq reads as integers: a word there failed at the first connection, with a
# traceback. (Not port: several hosts take a list of ports.)
_INTEGER_OPTIONS = (
    "connect_timeout",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
)


def _secrets(url: str) -> set[str]:
    """The URL's passwords (after ``user:``, and the ``password`` and ``sslpassword``
    options), as written and decoded, to keep them out of error messages."""
    rest = url.split("://", 1)[1]
    found: list[str] = []
    userinfo = rest.split("@", 1)
    if len(userinfo) == 2 and ":" in userinfo[0]:
        found.append(userinfo[0].split(":", 1)[1])
    query = rest.split("?", 1)[1] if "?" in rest else ""
    for part in query.split("&"):
        name, _, value = part.partition("=")
        if name in {"password", "sslpassword"}:
            found.append(value)
    return {text for raw in found for text in (raw, unquote(raw)) if text}


class Settings(BaseSettings):
    """Every knob secledger has. Environment variables use the prefix ``SECLEDGER_``."""

    model_config = SettingsConfigDict(
        env_prefix="SECLEDGER_",
        extra="forbid",
        frozen=True,
    )

    database_url: SecretStr | None = Field(
        default=None,
        description="PostgreSQL URL; unset starts the embedded server under data_dir.",
    )
    data_dir: Path = Field(default_factory=default_data_dir)
    webhook_secrets: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    allow_open_loopback: bool = False
    security_label_patterns: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["sec/*", "sec::*"]
    )
    risk_tiers: Annotated[list[str], NoDecode] = Field(default_factory=lambda: list(DEFAULT_TIERS))
    unclassified_tier: str = "unclassified"
    max_body_bytes: int = Field(default=DEFAULT_MAX_BODY_BYTES, gt=0)
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    log_level: LogLevel = "info"
    max_batch: int = Field(default=128, ge=1, le=10_000)

    # GitLab REST API (issue 4): backfill, label-time enrichment, reconciliation, hooks.
    gitlab_url: str | None = Field(
        default=None,
        description="Base URL of the GitLab instance, e.g. https://gitlab.example.com.",
    )
    gitlab_token: SecretStr | None = Field(
        default=None, description="Personal, group or project access token with read_api scope."
    )
    gitlab_token_file: Path | None = Field(
        default=None, description="File holding the token (first line); used when no token is set."
    )
    gitlab_timeout_seconds: float = Field(default=30.0, gt=0)
    gitlab_max_retries: int = Field(default=10, ge=0, le=100)
    gitlab_workers: int = Field(default=4, ge=1, le=32)
    enrich_interval_seconds: float = Field(default=300.0, ge=0)
    recover_lost_deliveries: bool = Field(
        default=True,
        description="Record from GitLab's API the MR of a delivery found lost (needs the URL"
        " and a token).",
    )

    # Durable spool (issue 4): where verified deliveries wait while PostgreSQL is down.
    spool_dir: Path | None = Field(
        default=None, description="Spool directory; unset means <data_dir>/spool."
    )
    spool_retry_seconds: float = Field(default=1.0, gt=0, le=300)
    spool_after_seconds: float = Field(
        default=7.0,
        ge=0,
        le=600,
        description="A delivery the database has not committed within this many seconds of"
        " its request's arrival is spooled and answered 202 (GitLab waits 10 s); 0 waits for"
        " the database.",
    )

    # Downstream emit: the optional HTTP sink (secledger sink, docs/downstream.md).
    sink_url: str | None = Field(
        default=None, description="POST each new ledger row here; unset disables the outbox."
    )
    sink_token: SecretStr | None = None
    sink_token_header: str = "X-Secledger-Token"  # noqa: S105 - a header name, not a secret
    sink_timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    sink_max_attempts: int = Field(default=5, ge=1, le=100)
    sink_backoff_seconds: float = Field(default=1.0, ge=0, le=3600)
    sink_backoff_max_seconds: float = Field(default=60.0, ge=0, le=86400)

    @field_validator("log_level", mode="before")
    @classmethod
    def _level_in_any_case(cls, value: object) -> object:
        # A typo used to fall back to info in silence.
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("database_url", "migration_database_url")
    @classmethod
    def _postgresql_url(cls, value: SecretStr | None) -> SecretStr | None:
        # Checked here, not at the first connection: another scheme ended in a driver's
        # import error. The URL itself is never echoed (it may hold a password).
        if value is None:
            return None
        if not value.get_secret_value().startswith(_POSTGRESQL_SCHEMES):
            raise ValueError("must be a PostgreSQL URL (postgresql://user@host:port/database)")
        authority = value.get_secret_value().split("://", 1)[1].split("/", 1)[0]
        if authority.count("@") > 1:
            # Read as user:pass@word@host, the rest of the password became the host, and
            # was then printed in every "failed to resolve host" message and banner.
            raise ValueError("has an @ in its user name or password: write it as %40")
        _check_options(value.get_secret_value())
        return value

    @field_validator("sink_url")
    @classmethod
    def _sink_is_http(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError("sink_url must be an http:// or https:// URL")
        return value.strip()

    @field_validator("sink_token", "sink_token_header")
    @classmethod
    def _sink_header_text(cls, value: object) -> object:
        # An HTTP header holds visible ASCII: anything else failed every send before it
        # was one (no failure recorded, `sink status` silent while rows piled up).
        text = value.get_secret_value() if isinstance(value, SecretStr) else value
        if isinstance(text, str) and not all(" " <= ch <= "~" for ch in text):
            raise ValueError("must be printable ASCII (it is sent as an HTTP header)")
        return value

    @field_validator("session_secret")
    @classmethod
    def _not_guessable(cls, value: SecretStr | None) -> SecretStr | None:
        # A blank left in a template (`SECLEDGER_SESSION_SECRET=`) signed every cookie and
        # form token with an empty key, which anyone can compute; a short one, guessable.
        if value is not None and len(value.get_secret_value().strip()) < MIN_SECRET_CHARS:
            raise ValueError(
                f"must be at least {MIN_SECRET_CHARS} characters (e.g. `openssl rand -hex"
                " 32`); unset it to have one generated into the data directory"
            )
        return value

    @field_validator("gitlab_token")
    @classmethod
    def _gitlab_token_text(cls, value: SecretStr | None) -> SecretStr | None:
        # Sent as a header (surrounding blanks dropped): anything else ended every API
        # command in a traceback that could print it.
        text = value.get_secret_value().strip() if value is not None else ""
        if not all(" " <= ch <= "~" for ch in text):
            raise ValueError("must be printable ASCII (it is sent as an HTTP header)")
        return value

    @property
    def sink_enabled(self) -> bool:
        """True when recordings must also be queued in the outbox for the HTTP sink."""
        return self.sink_url is not None

    # Integrity (docs/integrity.md): who migrates, and the signed checkpoints.
    migration_database_url: SecretStr | None = Field(
        default=None,
        description="URL of a login in secledger_owner (or a superuser) for `db upgrade`,"
        " start-up migration and `rebuild`; unset uses database_url.",
    )
    checkpoint_key_file: Path | None = None
    checkpoint_public_key_file: Path | None = None
    checkpoint_dir: Path | None = None
    checkpoint_interval_minutes: float = Field(default=60.0, ge=0)

    # Compliance policy (issue 5): per-tier SLA, approvals, reviewers; business calendar.
    tier_policy: dict[str, TierPolicyConfig] = Field(default_factory=dict)
    business_hours: BusinessHoursConfig = Field(default_factory=BusinessHoursConfig)

    # Compliance in serve (dashboard integration): the periodic SLA check of open MRs.
    sla_refresh_interval_seconds: float = Field(
        default=300.0, ge=0, description="How often serve records overdue open MRs; 0 disables."
    )

    # Hardening (issue 8): signed webhooks, several instances, hostile clients.
    webhook_signing_secrets: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    webhook_auth: AuthPolicy = "either"
    webhook_tolerance_seconds: int = Field(default=300, ge=1, le=86_400)
    webhook_sources: list[WebhookSource] = Field(default_factory=list)
    max_concurrent_deliveries: int = Field(default=128, ge=1, le=10_000)
    concurrency_wait_seconds: float = Field(default=5.0, ge=0, le=60)
    body_timeout_seconds: float = Field(default=10.0, gt=0, le=300)

    # Performance (issue 7): the sum of declared body sizes in progress; bounds memory
    # whatever the count, so the count can let the group commit gather large batches.
    max_inflight_body_bytes: int = Field(default=64 * 1024 * 1024, ge=1)

    # Dashboard, read API and metrics (docs/dashboard.md).
    users: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict,
        description="Dashboard users as name:hash pairs (secledger user hash-password).",
    )
    users_file: Path | None = Field(
        default=None, description="File of name:hash lines; default data_dir/users."
    )
    read_token: SecretStr | None = Field(
        default=None, description="Bearer token for the read API (SECLEDGER_READ_TOKEN)."
    )
    session_secret: SecretStr | None = Field(
        default=None, description="Cookie signing key; default generated into data_dir."
    )
    session_max_age_seconds: int = Field(default=8 * 3600, ge=60)
    cookie_secure: bool = False
    trusted_user_header: str | None = None
    trusted_proxies: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["127.0.0.1/32", "::1/128"]
    )
    login_max_failures: int = Field(default=5, ge=1)
    login_window_seconds: int = Field(default=300, ge=1)
    metrics_require_auth: bool = False

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Explicit arguments win, then the environment, then ``*_FILE`` secrets, then TOML."""
        sources: list[PydanticBaseSettingsSource] = [
            init_settings,
            env_settings,
            SecretFileSource(settings_cls),
        ]
        config_path = os.environ.get("SECLEDGER_CONFIG")
        if config_path:
            path = Path(config_path)
            if not path.is_file():
                raise ValueError(f"SECLEDGER_CONFIG points to {path}, which is not a file")
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)

    @field_validator(
        "webhook_secrets",
        "webhook_signing_secrets",
        "security_label_patterns",
        "risk_tiers",
        "trusted_proxies",
        mode="before",
    )
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        return _split_csv(value)

    @field_validator("users", mode="before")
    @classmethod
    def _user_pairs(cls, value: Any) -> Any:
        if isinstance(value, str):
            return dict(_user_pair(item) for item in _split_csv(value))
        return value

    @field_validator("risk_tiers")
    @classmethod
    def _tiers_are_names(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("risk_tiers needs at least one tier, highest first")
        tiers = [tier.strip().lower() for tier in value]
        if len(set(tiers)) != len(tiers):
            raise ValueError("risk_tiers has a tier twice (tier names ignore case)")
        return tiers

    @model_validator(mode="after")
    def _patterns_present(self) -> Settings:
        if not self.security_label_patterns:
            raise ValueError("security_label_patterns is empty: no merge request would be kept")
        check_tiers(self.tier_policy, self.risk_tiers, self.unclassified_tier)
        # An empty token authenticates no one: the same as none.
        if self.metrics_require_auth and not self.read_token and not self.trusted_user_header:
            # Prometheus has no dashboard session: every scrape would get 401.
            raise ValueError(
                "metrics_require_auth needs read_token (the scraper's bearer token) or"
                " trusted_user_header (a proxy that authenticates it)"
            )
        return self

    @property
    def gitlab_api_set(self) -> bool:
        """Whether a GitLab URL and a token (or token file) are configured, without
        reading the file: ``serve``'s background API work starts only then."""
        return bool(self.gitlab_url) and (
            self.gitlab_token is not None or self.gitlab_token_file is not None
        )

    def gitlab_token_value(self) -> str | None:
        """The GitLab token from ``gitlab_token``, else the first line of ``gitlab_token_file``."""
        if self.gitlab_token is not None and self.gitlab_token.get_secret_value().strip():
            return self.gitlab_token.get_secret_value().strip()
        if self.gitlab_token_file is None:
            return None
        try:
            lines = self.gitlab_token_file.read_bytes().splitlines()
        except OSError as exc:
            raise ConfigError(
                f"SECLEDGER_GITLAB_TOKEN_FILE: cannot read {self.gitlab_token_file}:"
                f" {exc.strerror or exc}"
            ) from exc
        first = lines[0].strip() if lines else b""
        if not all(0x20 <= byte <= 0x7E for byte in first):
            # Named, never shown: it is sent as a header, and it is a secret.
            raise ConfigError(
                f"gitlab_token_file {self.gitlab_token_file}: its first line must be"
                " printable ASCII (the token is sent as an HTTP header)"
            )
        return first.decode("ascii") or None

    def secret_values(self) -> list[bytes]:
        """The configured webhook secrets as bytes, for constant-time comparison."""
        return [s.get_secret_value().encode() for s in self.webhook_secrets]

    @property
    def users_path(self) -> Path:
        """The file ``secledger user add`` writes and the dashboard reads."""
        return self.users_file or self.data_dir / "users"

    @property
    def pg_data_dir(self) -> Path:
        """The embedded PostgreSQL data directory."""
        return self.data_dir / "pg"

    @property
    def spool_path(self) -> Path:
        """The spool directory: ``spool_dir``, or ``<data_dir>/spool``."""
        return self.spool_dir if self.spool_dir is not None else self.data_dir / "spool"
