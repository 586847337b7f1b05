"""The policy an evidence pack was judged by, for ``pack.json`` and its README.

An auditor re-judging a verdict (``met``, ``breached``, a missing second approval)
needs the rules it was judged by, and the label patterns that decided which MRs are in
the population at all.
"""

from __future__ import annotations

from typing import Any

from secledger.policy import LabelPolicy
from secledger.tierpolicy import CompliancePolicy


def policy_json(labels: LabelPolicy, policy: CompliancePolicy) -> dict[str, Any]:
    """The label patterns, each tier's rule and the business calendar, as JSON."""
    calendar = policy.calendar
    names = [*policy.tiers, policy.unclassified]
    return {
        "security_labels": list(labels.patterns),
        "tiers": list(policy.tiers),
        "unclassified_tier": policy.unclassified,
        "tier_rules": {
            name: {
                "sla_hours": rule.sla_hours,
                "approvals": rule.approvals,
                "business_hours": rule.business_hours,
                "reviewers": None if rule.reviewers is None else sorted(rule.reviewers),
            }
            for name in names
            for rule in (policy.rule(name),)
        },
        "business_hours": {
            "weekdays": sorted(calendar.weekdays),
            "start": calendar.start.isoformat("minutes"),
            "end": calendar.end.isoformat("minutes"),
            "time_zone": str(calendar.zone),
            "holidays": [day.isoformat() for day in sorted(calendar.holidays)],
        },
    }


def policy_text(facts: dict[str, Any]) -> str:
    """The README's lines for :func:`policy_json`'s facts."""
    patterns = ", ".join(f"`{p}`" for p in facts["security_labels"])
    lines = [f"- **Security labels** (which MRs are recorded at all): {patterns}."]
    for name, rule in facts["tier_rules"].items():
        hours = f"{rule['sla_hours']:g} {'business ' if rule['business_hours'] else ''}hours"
        who = ", ".join(rule["reviewers"]) if rule["reviewers"] is not None else "anyone"
        lines.append(
            f"- **Tier `{name}`:** first review decision within {hours},"
            f" {rule['approvals']} standing approval(s) by others than the author at the"
            f" merge, approvers: {who}."
        )
    calendar = facts["business_hours"]
    if any(rule["business_hours"] for rule in facts["tier_rules"].values()):
        holidays = len(calendar["holidays"])
        lines.append(
            f"- **Business hours:** {calendar['start']}-{calendar['end']}"
            f" {calendar['time_zone']}, ISO weekdays {calendar['weekdays']},"
            f" {holidays} holidays (listed in `pack.json`)."
        )
    return "\n".join(lines) + "\n"
