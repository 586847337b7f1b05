"""The SLA clock: when a review is due, in wall-clock or business hours. Pure: no I/O.

Business hours are read in the calendar's time zone: a working day is one of the
configured weekdays that is not a holiday, and only the part of it between ``start``
and ``end`` counts. Arithmetic happens in UTC so a DST change inside a working day
cannot make an hour count twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from zoneinfo import ZoneInfo

# Ten years without one working day means the calendar is unusable, not slow.
_MAX_DAYS = 3660
WEEKDAYS = frozenset({1, 2, 3, 4, 5})


@dataclass(frozen=True)
class Calendar:
    """Working days (ISO weekday numbers, 1 = Monday), hours and holidays in one zone."""

    weekdays: frozenset[int] = WEEKDAYS
    start: time = time(9, 0)
    end: time = time(17, 0)
    zone: tzinfo = field(default_factory=lambda: ZoneInfo("UTC"))
    holidays: frozenset[date] = frozenset()

    def __post_init__(self) -> None:
        if not self.weekdays or not self.weekdays <= set(range(1, 8)):
            raise ValueError("weekdays must be ISO weekday numbers 1 (Monday) to 7 (Sunday)")
        if self.start >= self.end:
            raise ValueError("business hours must start before they end")

    def is_working_day(self, day: date) -> bool:
        """True when ``day`` is a configured weekday and not a holiday."""
        return day.isoweekday() in self.weekdays and day not in self.holidays

    def window(self, day: date) -> tuple[datetime, datetime]:
        """The working window of ``day`` as UTC instants."""
        opens = datetime.combine(day, self.start, tzinfo=self.zone).astimezone(UTC)
        closes = datetime.combine(day, self.end, tzinfo=self.zone).astimezone(UTC)
        return opens, closes

    def add(self, start: datetime, seconds: float) -> datetime:
        """The instant ``seconds`` of business time after ``start``."""
        remaining = timedelta(seconds=seconds)
        cursor = start.astimezone(UTC)
        day = cursor.astimezone(self.zone).date()
        for _ in range(_MAX_DAYS):
            if self.is_working_day(day):
                opens, closes = self.window(day)
                cursor = max(cursor, opens)
                if cursor < closes:
                    if remaining <= closes - cursor:
                        return cursor + remaining
                    remaining -= closes - cursor
            day += timedelta(days=1)
        raise ValueError("the business calendar has no working time in ten years")

    def elapsed(self, start: datetime, end: datetime) -> float:
        """Business seconds between ``start`` and ``end`` (0 when ``end`` is earlier)."""
        begin, finish = start.astimezone(UTC), end.astimezone(UTC)
        total = timedelta()
        day = begin.astimezone(self.zone).date()
        last = finish.astimezone(self.zone).date()
        while day <= last:
            if self.is_working_day(day):
                opens, closes = self.window(day)
                overlap = min(closes, finish) - max(opens, begin)
                total += max(overlap, timedelta())
            day += timedelta(days=1)
        return total.total_seconds()


def deadline(labeled_at: datetime, hours: float, calendar: Calendar | None) -> datetime:
    """When a review labelled at ``labeled_at`` is due: wall clock, or business time."""
    if calendar is None:
        return labeled_at + timedelta(hours=hours)
    return calendar.add(labeled_at, hours * 3600)
