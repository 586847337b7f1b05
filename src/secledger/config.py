"""Settings: built once at the entry point from the environment and an optional TOML file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import platformdirs
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

DEFAULT_TIERS = ("critical", "high", "medium", "low")
DEFAULT_MAX_BODY_BYTES = 25 * 1024 * 1024


def default_data_dir() -> Path:
    """Where the embedded database and spool live when nothing else is configured."""
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # The embedded server runs as a dedicated system user, which cannot
        # traverse /root; a system location is the conventional place for root.
        return Path("/var/lib/secledger")
    return Path(platformdirs.user_data_dir("secledger"))


def _split_csv(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def _user_pair(item: str) -> tuple[str, str]:
    name, sep, hashed = item.partition(":")
    if not sep or not name.strip() or not hashed.strip():
        # Never echo the item: it holds a password hash.
        raise ValueError("users entries must be name:hash (see secledger user hash-password)")
    return name.strip(), hashed.strip()


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
    log_level: str = "info"
    max_batch: int = Field(default=128, ge=1, le=10_000)

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
        """Explicit arguments win, then the environment, then the TOML file."""
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_path = os.environ.get("SECLEDGER_CONFIG")
        if config_path:
            path = Path(config_path)
            if not path.is_file():
                raise ValueError(f"SECLEDGER_CONFIG points to {path}, which is not a file")
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)

    @field_validator(
        "webhook_secrets", "security_label_patterns", "risk_tiers", "trusted_proxies", mode="before"
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
        if len(set(value)) != len(value):
            raise ValueError("risk_tiers has a tier twice")
        return [tier.strip().lower() for tier in value]

    @model_validator(mode="after")
    def _patterns_present(self) -> Settings:
        if not self.security_label_patterns:
            raise ValueError("security_label_patterns is empty: no merge request would be kept")
        return self

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
