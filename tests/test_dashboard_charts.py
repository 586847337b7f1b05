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
