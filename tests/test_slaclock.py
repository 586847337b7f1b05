"""The SLA clock: wall-clock and business-hours deadlines, weekends, holidays, DST."""

from __future__ import annotations

from datetime import UTC, date, datetime, time
from zoneinfo import ZoneInfo

import pytest

from secledger.slaclock import Calendar, deadline

OFFICE = Calendar()  # Monday to Friday, 09:00-17:00 UTC


def utc(day: int, hour: int, minute: int = 0, month: int = 8) -> datetime:
    return datetime(2025, month, day, hour, minute, tzinfo=UTC)


def test_wall_clock_deadline_is_label_time_plus_hours_across_a_weekend() -> None:
    # Friday 2025-08-08 16:00 + 72 h, weekend included.
    assert deadline(utc(8, 16), 72, None) == utc(11, 16)


def test_business_hours_skip_the_weekend() -> None:
    # Friday 16:00 leaves one working hour; the second is Monday 09:00-10:00.
    assert deadline(utc(8, 16), 2, OFFICE) == utc(11, 10)


def test_business_hours_skip_a_holiday_after_the_weekend() -> None:
    calendar = Calendar(holidays=frozenset({date(2025, 8, 11)}))
    assert deadline(utc(8, 16), 2, calendar) == utc(12, 10)


def test_label_outside_hours_starts_counting_at_the_next_opening() -> None:
    assert OFFICE.add(utc(4, 7), 3600) == utc(4, 10)  # Monday before opening
    assert OFFICE.add(utc(4, 20), 3600) == utc(5, 10)  # Monday evening
    assert OFFICE.add(utc(9, 12), 3600) == utc(11, 10)  # Saturday


def test_deadline_exactly_at_closing_time_stays_on_that_day() -> None:
    assert OFFICE.add(utc(8, 15), 2 * 3600) == utc(8, 17)


def test_several_business_days() -> None:
    # 24 business hours from Monday 09:00 are three 8-hour days: Wednesday 17:00.
    assert deadline(utc(4, 9), 24, OFFICE) == utc(6, 17)


def test_hours_are_read_in_the_calendar_time_zone_across_a_dst_change() -> None:
    paris = Calendar(zone=ZoneInfo("Europe/Paris"))
    # Friday 2026-03-27 16:00 CET (15:00 UTC); clocks go forward on Sunday 29 March.
    labelled = datetime(2026, 3, 27, 15, 0, tzinfo=UTC)
    # One hour on Friday, one on Monday from 09:00 CEST (07:00 UTC).
    assert paris.add(labelled, 2 * 3600) == datetime(2026, 3, 30, 8, 0, tzinfo=UTC)


def test_elapsed_counts_only_business_time() -> None:
    assert OFFICE.elapsed(utc(8, 16), utc(11, 10)) == 2 * 3600
    with_holiday = Calendar(holidays=frozenset({date(2025, 8, 11)}))
    assert with_holiday.elapsed(utc(8, 16), utc(12, 10)) == 2 * 3600
    assert OFFICE.elapsed(utc(11, 10), utc(8, 16)) == 0


def test_custom_weekdays_and_hours() -> None:
    # A Sunday-to-Thursday week, 08:00-12:00.
    calendar = Calendar(weekdays=frozenset({7, 1, 2, 3, 4}), start=time(8), end=time(12))
    # Thursday 11:00 + 2 h: one hour Thursday, Friday and Saturday off, Sunday 08:00-09:00.
    assert calendar.add(utc(7, 11), 2 * 3600) == utc(10, 9)


def test_invalid_calendars_are_refused() -> None:
    with pytest.raises(ValueError, match="weekday"):
        Calendar(weekdays=frozenset({0}))
    with pytest.raises(ValueError, match="start before"):
        Calendar(start=time(17), end=time(9))
