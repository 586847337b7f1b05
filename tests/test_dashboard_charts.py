"""The dashboard's chart figures, as plotly receives them (pure: no server)."""

from __future__ import annotations

from datetime import date

from secledger.dashboard.charts import reviewer_chart, volume_chart
from secledger.dashboard.queries import VolumePoint
from secledger.reports import ReviewerRow


def reviewer(name: str, approvals: int) -> ReviewerRow:
    return ReviewerRow(
        reviewer=name,
        decisions=approvals,
        approvals=approvals,
        revocations=0,
        median_hours=None,
        p90_hours=None,
        sla_met=0,
        sla_missed=0,
        sla_adherence_pct=None,
    )


def test_the_reviewer_chart_with_nobody_draws_nothing() -> None:
    """Two empty traces drew bare axes where the other charts say "No data"."""
    assert reviewer_chart([])["data"] == []


def test_the_reviewer_chart_makes_room_for_long_names() -> None:
    """A fixed 60-pixel margin showed katherine.johnson-appsec as "on-appsec"."""
    figure = reviewer_chart([reviewer("katherine.johnson-appsec", 3)])
    assert figure["layout"]["yaxis"]["automargin"] is True
    assert figure["data"][0]["y"] == ["katherine.johnson-appsec"]


def test_volume_buckets_are_days_not_instants() -> None:
    """On a date axis a single bar was labelled "00:00:00 Mar 2, 2026"."""
    figure = volume_chart([VolumePoint(date(2026, 3, 2), "high", 4)], ["high"])
    assert figure["layout"]["xaxis"]["type"] == "category"
    assert figure["data"][0]["x"] == ["2026-03-02"]


def test_a_quiet_stretch_shows_as_empty_buckets() -> None:
    """Listed only where there was activity, January and June looked adjacent."""
    points = [
        VolumePoint(date(2026, 1, 5), "critical", 1),
        VolumePoint(date(2026, 2, 2), "high", 2),
    ]
    weekly = volume_chart(points, ["critical", "high"], "week")["data"]
    assert [len(trace["x"]) for trace in weekly] == [5, 5]  # Jan 5 to Feb 2
    assert weekly[0]["y"] == [1, 0, 0, 0, 0]
    assert weekly[1]["y"] == [0, 0, 0, 0, 2]
    months = [VolumePoint(date(2025, 11, 1), "high", 1), VolumePoint(date(2026, 2, 1), "high", 1)]
    monthly = volume_chart(months, ["high"], "month")["data"][0]
    assert monthly["x"] == ["2025-11-01", "2025-12-01", "2026-01-01", "2026-02-01"]


def test_a_span_too_long_to_fill_draws_only_the_buckets_with_activity() -> None:
    """One MR misdated 2999 made 355,958 daily buckets, 24 MB of chart on every load."""
    points = [VolumePoint(date(2025, 6, 2), "high", 1), VolumePoint(date(2999, 12, 30), "high", 1)]
    figure = volume_chart(points, ["high"], "day")
    assert figure["data"][0]["x"] == ["2025-06-02", "2999-12-30"]
