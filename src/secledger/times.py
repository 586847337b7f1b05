"""Every timestamp spelling GitLab sends, parsed in one place into aware UTC datetimes."""

from __future__ import annotations

import email.utils
import functools
import re
from datetime import UTC, datetime, timedelta, timezone

from secledger.errors import TimestampError

# Webhooks say "2025-08-05 21:48:25 UTC"; instances in another zone say
# "2026-07-28 15:09:25 -0700"; docs and the Test button use RFC 3339; the REST
# API adds milliseconds ("2018-08-20T06:17:28.394Z").
_PATTERN = re.compile(
    r"""^\s*
    (?P<date>\d{4}-\d{2}-\d{2})
    [T\s]
    (?P<time>\d{2}:\d{2}(?::\d{2})?)
    (?P<frac>\.\d{1,9})?
    \s*
    (?P<zone>Z|UTC|[+-]\d{2}:?\d{2})?
    \s*$""",
    re.VERBOSE | re.IGNORECASE,
)
_WEBHOOK = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2} UTC\Z", re.ASCII)
# GitLab did not exist before 1970, and an instant near year 9999 overflows Python's date
# arithmetic as soon as an SLA deadline is added to it (a forged `created_at` of
# 9999-12-31 made every delivery of that MR fail with 503).
MIN_YEAR = 1970
MAX_YEAR = 2999


def _offset(zone: str | None) -> timezone:
    if zone is None or zone.upper() in {"Z", "UTC"}:
        return UTC
    sign = -1 if zone[0] == "-" else 1
    digits = zone[1:].replace(":", "")
    delta = timedelta(hours=int(digits[:2]), minutes=int(digits[2:]))
    if delta > timedelta(hours=18):
        raise TimestampError(f"time zone offset out of range: {zone!r}")
    return timezone(sign * delta)


def parse_time(value: str) -> datetime:
    """Parse a GitLab timestamp into an aware UTC datetime, or raise TimestampError."""
    if not isinstance(value, str):
        raise TimestampError(f"timestamp must be a string, got {type(value).__name__}")
    return _parse(value)


# Each delivery carries several times, most of them seen before (an MR's created_at in
# every event of it): parsed once. Bounded, as the strings come from senders.
@functools.lru_cache(maxsize=4096)
def _parse(value: str) -> datetime:
    # The webhook spelling, "2025-08-05 21:48:25 UTC", without the general pattern.
    if _WEBHOOK.match(value):
        try:
            parsed = datetime.fromisoformat(value[:19]).replace(tzinfo=UTC)
        except ValueError:
            pass
        else:
            if MIN_YEAR <= parsed.year <= MAX_YEAR:
                return parsed
    match = _PATTERN.match(value)
    if match is None:
        raise TimestampError(f"unrecognised timestamp: {value[:64]!r}")
    hms = match["time"] if match["time"].count(":") == 2 else match["time"] + ":00"
    frac = (match["frac"] or ".0")[1:7].ljust(6, "0")
    try:
        naive = datetime.fromisoformat(f"{match['date']}T{hms}.{frac}")
        # Year 1 with a positive offset (or 9999 with a negative one) leaves the range.
        parsed = naive.replace(tzinfo=_offset(match["zone"])).astimezone(UTC)
    except (ValueError, OverflowError) as exc:
        raise TimestampError(f"impossible timestamp: {value[:64]!r}") from exc
    if not MIN_YEAR <= parsed.year <= MAX_YEAR:
        raise TimestampError(f"timestamp outside {MIN_YEAR}-{MAX_YEAR}: {value[:64]!r}")
    return parsed


def parse_optional(value: object) -> datetime | None:
    """Parse a timestamp that may be absent or null; a malformed one still raises."""
    if value is None or value == "":
        return None
    return parse_time(value)  # type: ignore[arg-type]


def parse_stored(value: object) -> datetime | None:
    """A time secledger wrote itself (``isoformat``), read back fast; any other spelling
    goes through ``parse_optional``."""
    if isinstance(value, str) and value.endswith("Z"):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return parse_optional(value)
        if parsed.utcoffset() == timedelta(0):
            return parsed.astimezone(UTC)
    return parse_optional(value)


def isoformat(value: datetime | None) -> str | None:
    """ISO 8601 in UTC with a Z, the one spelling secledger writes."""
    if value is None:
        return None
    return _isoformat(value)


# The same instants are written again and again (an event's time in its facts, in the
# ledger row, in each answer). Equal aware datetimes are the same instant, so one
# spelling serves them all.
@functools.lru_cache(maxsize=4096)
def _isoformat(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def parse_http_date(value: str) -> datetime | None:
    """An HTTP-date (``Wed, 21 Oct 2015 07:28:00 GMT``, RFC 9110) as an aware UTC
    datetime, or None when ``value`` is not one."""
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    # Always GMT by definition; the obsolete "-0000" zone comes back naive.
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def utcnow() -> datetime:
    """The current time, aware and in UTC."""
    return datetime.now(UTC)
