"""Plotly figure specifications (plain JSON) built from the dashboard's query results.

The browser only draws: every figure is computed here, so the page needs no data
beyond what the server rendered into it.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, timedelta
from typing import Any

from secledger.dashboard.queries import Bucket, VolumePoint
from secledger.reports import DecisionTimesRow, ReviewerRow
from secledger.tierpolicy import CompliancePolicy

# Colour-blind-safe palette (Okabe-Ito), highest tier first; prints legibly in grey.
PALETTE = ("#D55E00", "#E69F00", "#0072B2", "#009E73", "#CC79A7", "#56B4E9", "#999999")


def duration(seconds: float | None) -> str:
    """``3d 4h``, ``5h 10m`` or ``12m``; an em dash when unknown."""
    if seconds is None:
        return "—"
    if seconds < 0:  # floored, -81900 s read "-1d 1h"
        return "-" + duration(-seconds)
    minutes = int(seconds // 60)
    days, rest = divmod(minutes, 24 * 60)
    hours, mins = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {mins}m"
    return f"{mins}m"


def plain(text: str) -> str:
    """``text`` as plotly shows it literally: plotly reads ``<a href>``, ``<b>``, ``<br>``
    in labels as markup, so a reviewer named ``<a href="https://...">`` would have been
    a link in the chart. It decodes these three entities back for display."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _colours(tiers: Sequence[str]) -> dict[str, str]:
    return {tier: PALETTE[i % len(PALETTE)] for i, tier in enumerate(tiers)}


def _ordered(present: set[str], tiers: Sequence[str]) -> list[str]:
    known = [t for t in tiers if t in present]
    return known + sorted(present - set(tiers))


def _layout(title: str, x_title: str, y_title: str, **extra: Any) -> dict[str, Any]:
    return {
        "title": {"text": title, "font": {"size": 14}, "x": 0, "xanchor": "left"},
        "xaxis": {"title": {"text": x_title}},
        "yaxis": {"title": {"text": y_title}, "rangemode": "tozero"},
        "margin": {"l": 60, "r": 20, "t": 40, "b": 50},
        "legend": {
            "orientation": "h",
            "x": 1,
            "xanchor": "right",
            "y": 1.02,
            "yanchor": "bottom",
            "traceorder": "normal",
        },
        "height": 320,
        **extra,
    }


def volume_chart(
    points: Sequence[VolumePoint], tiers: Sequence[str], bucket: Bucket = "week"
) -> dict[str, Any]:
    """Stacked bars: security MRs per period, one trace per tier."""
    colours = _colours(tiers)
    # Buckets are days, not instants: with one bar, a date axis labelled it with a clock.
    # On a category axis every bucket of the span is listed, so that a quiet stretch
    # shows as one, not as bars side by side.
    every = _buckets({p.bucket for p in points}, bucket)
    traces = []
    for tier in _ordered({p.tier for p in points}, tiers):
        counts = {p.bucket: p.count for p in points if p.tier == tier}
        traces.append(
            {
                "type": "bar",
                "name": tier,
                "x": [day.isoformat() for day in every],
                "y": [counts.get(day, 0) for day in every],
                "marker": {"color": colours.get(tier, PALETTE[-1])},
            }
        )
    layout = _layout("Review volume by tier", "review started", "MRs", barmode="stack")
    layout["xaxis"] |= {"type": "category"}
    return {"data": traces, "layout": layout}


# Past this many buckets in the span (a misdated MR in 2999, years of days), only the
# buckets with activity are drawn: the page must not carry hundreds of thousands of bars.
MAX_FILLED_BUCKETS = 400


def _buckets(present: set[date], bucket: Bucket) -> list[date]:
    """Every bucket from the first to the last of ``present``, empty ones too (only the
    ones in ``present`` past ``MAX_FILLED_BUCKETS``)."""
    if not present:
        return []
    day, last = min(present), max(present)
    every: list[date] = []
    while day <= last:
        if len(every) == MAX_FILLED_BUCKETS:
            return sorted(present)
        every.append(day)
        if bucket == "month":
            day = date(day.year + day.month // 12, day.month % 12 + 1, 1)
        else:
            day += timedelta(days=7 if bucket == "week" else 1)
    return every


def _sla_marker(rows: Sequence[DecisionTimesRow], policy: CompliancePolicy) -> dict[str, Any]:
    """The tier's SLA as a black bar across its box (hours; business hours say so)."""
    rules = [policy.rule(row.tier) for row in rows]
    return {
        "type": "scatter",
        "mode": "markers",
        "name": "SLA",
        "x": [row.tier for row in rows],
        "y": [rule.sla_hours for rule in rules],
        "text": [
            f"SLA {rule.sla_hours:g} {'business ' if rule.business_hours else ''}hours"
            for rule in rules
        ],
        "hoverinfo": "text",
        "marker": {"symbol": "line-ew-open", "size": 40, "color": "#000", "line": {"width": 3}},
    }


def time_to_decision_chart(
    rows: Sequence[DecisionTimesRow], policy: CompliancePolicy, tiers: Sequence[str]
) -> dict[str, Any]:
    """Box per tier from precomputed quantiles (hours to first decision), with its SLA."""
    colours = _colours(tiers)
    by_tier = {row.tier: row for row in rows}
    ordered = [by_tier[tier] for tier in _ordered(set(by_tier), tiers)]
    traces: list[dict[str, Any]] = [
        {
            "type": "box",
            "name": f"{row.tier} (n={row.decided})",
            "x": [row.tier],
            "q1": [row.q1_hours],
            "median": [row.median_hours],
            "q3": [row.q3_hours],
            "lowerfence": [row.min_hours],
            "upperfence": [row.max_hours],
            "marker": {"color": colours.get(row.tier, PALETTE[-1])},
            "showlegend": False,
        }
        for row in ordered
    ]
    if ordered:
        traces.append(_sla_marker(ordered, policy))
    # Log scale: decisions in minutes and SLAs of two weeks both stay readable.
    layout = _layout("Label to first review decision, per tier, against its SLA", "tier", "hours")
    layout["yaxis"] = {"title": {"text": "hours (log scale)"}, "type": "log"}
    return {"data": traces, "layout": layout}


def reviewer_chart(people: Sequence[ReviewerRow]) -> dict[str, Any]:
    """Horizontal bars: approvals and revocations per reviewer (the 15 most decisive)."""
    busiest = sorted(people, key=lambda p: (-p.decisions, -p.approvals, p.reviewer))
    shown = busiest[:15][::-1]  # most active at the top
    names = [plain(p.reviewer) for p in shown]
    layout = _layout("Approvals per reviewer", "MRs", "", barmode="group")
    layout["height"] = max(220, 60 + 28 * len(shown))
    # Room for the names, however long: a fixed margin showed "on-appsec".
    layout["yaxis"]["automargin"] = True
    if not shown:  # no traces: the page says "No data in this selection."
        return {"data": [], "layout": layout}
    traces = [
        {
            "type": "bar",
            "orientation": "h",
            "name": "approvals",
            "y": names,
            "x": [p.approvals for p in shown],
            "marker": {"color": PALETTE[2]},
        },
        {
            "type": "bar",
            "orientation": "h",
            "name": "revoked",
            "y": names,
            "x": [p.revocations for p in shown],
            "marker": {"color": PALETTE[0]},
        },
    ]
    return {"data": traces, "layout": layout}


def dashboard_charts(
    volume: Sequence[VolumePoint],
    ttd: Sequence[DecisionTimesRow],
    people: Sequence[ReviewerRow],
    policy: CompliancePolicy,
    bucket: Bucket = "week",
) -> dict[str, Any]:
    """Every chart on the dashboard, keyed by the id of the element that shows it."""
    tiers = [*policy.tiers, policy.unclassified]
    return {
        "volume-chart": volume_chart(volume, tiers, bucket),
        "ttd-chart": time_to_decision_chart(ttd, policy, tiers),
        "reviewer-chart": reviewer_chart(people),
    }
