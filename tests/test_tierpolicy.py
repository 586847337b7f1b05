"""Tier policy: defaults, TOML overrides, and clear start-up errors."""

from __future__ import annotations

from datetime import UTC, date, datetime, time
from pathlib import Path

import pytest
from pydantic import ValidationError

from secledger.config import Settings
from secledger.tierpolicy import CompliancePolicy


def settings_from(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, toml: str) -> Settings:
    path = tmp_path / "secledger.toml"
    path.write_text(toml)
    monkeypatch.setenv("SECLEDGER_CONFIG", str(path))
    return Settings()


def test_defaults_cover_every_tier_and_unclassified() -> None:
    policy = CompliancePolicy.from_settings(Settings())
    hours = {tier: policy.rule(tier).sla_hours for tier in policy.rules}
    approvals = {tier: policy.rule(tier).approvals for tier in policy.rules}
    assert hours == {"critical": 24, "high": 72, "medium": 168, "low": 336, "unclassified": 168}
    assert approvals == {"critical": 2, "high": 1, "medium": 1, "low": 1, "unclassified": 1}
    assert all(rule.reviewers is None and not rule.business_hours for rule in policy.rules.values())
    assert policy.rule("no-such-tier") == policy.rule("unclassified")


def test_toml_overrides_only_what_it_names(tmp_path, monkeypatch) -> None:
    settings = settings_from(
        tmp_path,
        monkeypatch,
        """
[tier_policy.critical]
sla_hours = 8
business_hours = true
reviewers = ["@Alice", "bob"]

[business_hours]
weekdays = ["mon", "Tuesday", "WED", "4"]
start = "08:30"
end = "16:00"
timezone = "Europe/Paris"
holidays = [2025-12-25]
""",
    )
    policy = CompliancePolicy.from_settings(settings)
    critical = policy.rule("critical")
    assert (critical.sla_hours, critical.approvals, critical.business_hours) == (8, 2, True)
    assert critical.reviewers == frozenset({"alice", "bob"})
    assert critical.allows("Alice") and not critical.allows("carol")
    assert policy.rule("high").sla_hours == 72
    calendar = policy.calendar
    assert calendar.weekdays == frozenset({1, 2, 3, 4})
    assert (calendar.start, calendar.end) == (time(8, 30), time(16))
    assert calendar.holidays == frozenset({date(2025, 12, 25)})
    # Thursday 2025-12-18 15:00 CET + 8 business hours: 1 h Thursday, then Monday 08:30-15:30.
    labelled = datetime(2025, 12, 18, 14, 0, tzinfo=UTC)
    assert policy.deadline("critical", labelled) == datetime(2025, 12, 22, 14, 30, tzinfo=UTC)


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[tier_policy.crtical]\nsla_hours = 4\n", "unknown tier(s) crtical"),
        ("[tier_policy.high]\nsla_hours = 0\n", "greater than 0"),
        ("[tier_policy.high]\napprovals = -1\n", "greater than or equal to 0"),
        ("[tier_policy.high]\nslahours = 3\n", "Extra inputs are not permitted"),
        ('[business_hours]\ntimezone = "Mars/Olympus"\n', "unknown time zone"),
        ('[business_hours]\nstart = "18:00"\nend = "09:00"\n', "must be before end"),
        ("[business_hours]\nweekdays = [0]\n", "weekdays must list days"),
        ('[business_hours]\nweekdays = ["mon", "funday"]\n', "or mon..sun: 'funday'"),
        ('[business_hours]\nweekdays = ["monkey"]\n', "or mon..sun: 'monkey'"),
    ],
)
def test_invalid_policy_is_refused_with_a_clear_message(tmp_path, monkeypatch, toml, message):
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        settings_from(tmp_path, monkeypatch, toml)


def test_custom_tiers_get_the_fallback_rule(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SECLEDGER_RISK_TIERS", "p1,p2")
    settings = settings_from(tmp_path, monkeypatch, "[tier_policy.p1]\napprovals = 3\n")
    policy = CompliancePolicy.from_settings(settings)
    assert (policy.rule("p1").approvals, policy.rule("p1").sla_hours) == (3, 168)
    assert policy.rank("p1") == 0 and policy.rank("p2") == 1 and policy.rank("unclassified") == 2
