"""Review policy per risk tier: SLA, business hours, required approvals, allowed reviewers.

The ``*Config`` models are what the TOML file says (validated when Settings are
built, so a bad policy stops start-up with a precise message); ``CompliancePolicy``
is the resolved form the rules and the SLA clock use.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, time
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from secledger.slaclock import Calendar, deadline

if TYPE_CHECKING:
    from secledger.config import Settings

_DAY_NAMES = {"mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6, "sun": 7}
_FULL_DAY_NAMES = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_DAY_NAMES |= {name: number for number, name in enumerate(_FULL_DAY_NAMES, start=1)}


def _day_number(name: str) -> int:
    """A weekday by its name (``mon`` or ``monday``, any case) or its ISO number."""
    found = _DAY_NAMES.get(name.strip().lower())
    if found is None and name.strip().isdecimal() and name.strip().isascii():
        found = int(name)
    if found is None:
        raise ValueError(f"weekdays must list days 1 (Monday) to 7 (Sunday), or mon..sun: {name!r}")
    return found


@dataclass(frozen=True)
class TierRule:
    """The resolved policy of one tier."""

    tier: str
    sla_hours: float
    approvals: int
    business_hours: bool = False
    reviewers: frozenset[str] | None = None

    def allows(self, username: str | None) -> bool:
        """True when ``username`` may approve in this tier (no list means anyone)."""
        return self.reviewers is None or (username or "").lower() in self.reviewers


# Chosen so a critical change is looked at within a day by two people, and nothing
# waits more than two weeks; unclassified security MRs get the medium budget.
DEFAULT_RULES: Mapping[str, TierRule] = {
    "critical": TierRule("critical", sla_hours=24, approvals=2),
    "high": TierRule("high", sla_hours=72, approvals=1),
    "medium": TierRule("medium", sla_hours=168, approvals=1),
    "low": TierRule("low", sla_hours=336, approvals=1),
    "unclassified": TierRule("unclassified", sla_hours=168, approvals=1),
}
FALLBACK = TierRule("custom", sla_hours=168, approvals=1)


class TierPolicyConfig(BaseModel):
    """``[tier_policy.<tier>]`` in the config file; unset keys keep the tier's default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sla_hours: float | None = Field(default=None, gt=0, le=24 * 366)
    approvals: int | None = Field(default=None, ge=0, le=50)
    business_hours: bool | None = None
    reviewers: list[str] | None = None

    @field_validator("reviewers")
    @classmethod
    def _usernames(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        names = [name.strip().lstrip("@").lower() for name in value]
        if not all(names):
            raise ValueError("reviewers must be non-empty GitLab usernames")
        return names


class BusinessHoursConfig(BaseModel):
    """``[business_hours]``: the calendar used by tiers with ``business_hours = true``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    weekdays: list[int] = Field(default_factory=lambda: [1, 2, 3, 4, 5])
    start: time = time(9, 0)
    end: time = time(17, 0)
    timezone: str = "UTC"
    holidays: list[date] = Field(default_factory=list)

    @field_validator("weekdays", mode="before")
    @classmethod
    def _day_names(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [_day_number(v) if isinstance(v, str) else v for v in value]
        return value

    @field_validator("weekdays")
    @classmethod
    def _valid_days(cls, value: list[int]) -> list[int]:
        if not value or any(day not in range(1, 8) for day in value):
            raise ValueError("weekdays must list days 1 (Monday) to 7 (Sunday), or mon..sun")
        return sorted(set(value))

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {value!r} (use an IANA name)") from exc
        return value

    @model_validator(mode="after")
    def _ordered(self) -> BusinessHoursConfig:
        if self.start >= self.end:
            raise ValueError(f"business hours start ({self.start}) must be before end ({self.end})")
        return self

    def calendar(self) -> Calendar:
        """The pure clock for these hours."""
        return Calendar(
            weekdays=frozenset(self.weekdays),
            start=self.start,
            end=self.end,
            zone=ZoneInfo(self.timezone),
            holidays=frozenset(self.holidays),
        )


def spelled(known: Sequence[str], tier: str) -> str | None:
    """``tier`` as ``known`` spells it (a tier label matches whatever its case, so a filter
    does too), or None when no known tier has that name."""
    wanted = tier.strip().casefold()
    return next((name for name in known if name.casefold() == wanted), None)


def check_tiers(configured: Mapping[str, TierPolicyConfig], tiers: list[str], other: str) -> None:
    """Refuse policy for a tier that no label can produce (a typo would silently not apply)."""
    unknown = sorted(set(configured) - {*tiers, other})
    if unknown:
        known = ", ".join([*tiers, other])
        raise ValueError(f"tier_policy names unknown tier(s) {', '.join(unknown)}; known: {known}")


def _resolve(tier: str, config: TierPolicyConfig | None) -> TierRule:
    base = DEFAULT_RULES.get(tier, FALLBACK)
    overrides = config.model_dump(exclude_none=True) if config else {}
    if "reviewers" in overrides:
        overrides["reviewers"] = frozenset(overrides["reviewers"])
    values = {
        "sla_hours": base.sla_hours,
        "approvals": base.approvals,
        "business_hours": base.business_hours,
        "reviewers": base.reviewers,
    }
    return TierRule(tier=tier, **(values | overrides))


@dataclass(frozen=True)
class CompliancePolicy:
    """Every tier's rule, highest tier first, and the business calendar."""

    tiers: tuple[str, ...] = ("critical", "high", "medium", "low")
    unclassified: str = "unclassified"
    rules: Mapping[str, TierRule] = field(default_factory=lambda: dict(DEFAULT_RULES))
    calendar: Calendar = field(default_factory=Calendar)

    @classmethod
    def from_settings(cls, settings: Settings) -> CompliancePolicy:
        """Resolve configured tier policy over the defaults."""
        names = [*settings.risk_tiers, settings.unclassified_tier]
        configured = settings.tier_policy
        return cls(
            tiers=tuple(settings.risk_tiers),
            unclassified=settings.unclassified_tier,
            rules={name: _resolve(name, configured.get(name)) for name in names},
            calendar=settings.business_hours.calendar(),
        )

    def rule(self, tier: str) -> TierRule:
        """The rule of ``tier``; an unknown tier gets the unclassified rule."""
        return self.rules.get(tier) or self.rules.get(self.unclassified) or FALLBACK

    def rank(self, tier: str | None) -> int:
        """0 for the highest tier; unclassified and unknown tiers rank below every tier."""
        return self.tiers.index(tier) if tier in self.tiers else len(self.tiers)

    def outranks(self, tier: str, other: str) -> bool:
        """Whether ``tier`` is higher than ``other``."""
        return self.rank(tier) < self.rank(other)

    def deadline(self, tier: str, labeled_at: datetime) -> datetime:
        """When a review of ``tier`` labelled at ``labeled_at`` is due."""
        rule = self.rule(tier)
        return deadline(labeled_at, rule.sla_hours, self.calendar if rule.business_hours else None)
