"""Plotly figure specifications (plain JSON) built from the dashboard's query results.

The browser only draws: every figure is computed here, so the page needs no data
beyond what the server rendered into it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from secledger.dashboard.queries import ReviewerFigures, TierDistribution, VolumePoint

HOUR = 3600.0
# Colour-blind-safe palette (Okabe-Ito), highest tier first; prints legibly in grey.
PALETTE = ("#D55E00", "#E69F00", "#0072B2", "#009E73", "#CC79A7", "#56B4E9", "#999999")


def duration(seconds: float | None) -> str:
    """``3d 4h``, ``5h 10m`` or ``12m``; an em dash when unknown."""
    if seconds is None:
        return "—"
    minutes = int(seconds // 60)
    days, rest = divmod(minutes, 24 * 60)
    hours, mins = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {mins}m"
    return f"{mins}m"


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


def volume_chart(points: Sequence[VolumePoint], tiers: Sequence[str]) -> dict[str, Any]:
    """Stacked bars: security MRs per period, one trace per tier."""
    colours = _colours(tiers)
    traces = []
    for tier in _ordered({p.tier for p in points}, tiers):
        mine = [p for p in points if p.tier == tier]
        traces.append(
            {
                "type": "bar",
                "name": tier,
                "x": [p.bucket.isoformat() for p in mine],
                "y": [p.count for p in mine],
                "marker": {"color": colours.get(tier, PALETTE[-1])},
            }
        )
    return {
        "data": traces,
        "layout": _layout("Review volume by tier", "review started", "MRs", barmode="stack"),
    }


def time_to_decision_chart(
    dists: Sequence[TierDistribution], tiers: Sequence[str]
) -> dict[str, Any]:
    """Box per tier from precomputed quantiles (hours), with the SLA marked when known."""
    colours = _colours(tiers)
    by_tier = {d.tier: d for d in dists}
    traces: list[dict[str, Any]] = []
    for tier in _ordered(set(by_tier), tiers):
        d = by_tier[tier]
        traces.append(
            {
                "type": "box",
                "name": f"{tier} (n={d.count})",
                "x": [tier],
                "q1": [d.q1 / HOUR],
                "median": [d.median / HOUR],
                "q3": [d.q3 / HOUR],
                "lowerfence": [d.min / HOUR],
                "upperfence": [d.max / HOUR],
                "marker": {"color": colours.get(tier, PALETTE[-1])},
                "showlegend": False,
            }
        )
    with_sla = [by_tier[t] for t in _ordered(set(by_tier), tiers) if by_tier[t].sla_seconds]
    if with_sla:
        traces.append(
            {
                "type": "scatter",
                "mode": "markers",
                "name": "SLA",
                "x": [d.tier for d in with_sla],
                "y": [(d.sla_seconds or 0) / HOUR for d in with_sla],
                "marker": {"symbol": "line-ew-open", "size": 40, "color": "#000"},
            }
        )
    layout = _layout("Time to decision per tier", "tier", "hours")
    return {"data": traces, "layout": layout}


def reviewer_chart(people: Sequence[ReviewerFigures]) -> dict[str, Any]:
    """Horizontal bars: approvals and revocations per reviewer."""
    shown = list(people)[:15][::-1]  # most active at the top
    names = [p.reviewer for p in shown]
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
    layout = _layout("Approvals per reviewer", "MRs", "", barmode="group")
    layout["height"] = max(220, 60 + 28 * len(shown))
    return {"data": traces, "layout": layout}


def dashboard_charts(
    volume: Sequence[VolumePoint],
    ttd: Sequence[TierDistribution],
    people: Sequence[ReviewerFigures],
    tiers: Sequence[str],
) -> dict[str, Any]:
    """Every chart on the dashboard, keyed by the id of the element that shows it."""
    return {
        "volume-chart": volume_chart(volume, tiers),
        "ttd-chart": time_to_decision_chart(ttd, tiers),
        "reviewer-chart": reviewer_chart(people),
    }
