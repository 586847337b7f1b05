from datetime import UTC, datetime

import pytest

from secledger.errors import TimestampError
from secledger.times import isoformat, parse_http_date, parse_stored, parse_time


@pytest.mark.parametrize(
    ("spelling", "expected"),
    [
        ("2025-08-05 21:48:25 UTC", datetime(2025, 8, 5, 21, 48, 25, tzinfo=UTC)),
        ("2013-12-03T17:23:34Z", datetime(2013, 12, 3, 17, 23, 34, tzinfo=UTC)),
        ("2026-07-28 15:09:25 -0700", datetime(2026, 7, 28, 22, 9, 25, tzinfo=UTC)),
        ("2018-08-20T06:17:28.394Z", datetime(2018, 8, 20, 6, 17, 28, 394000, tzinfo=UTC)),
        ("2012-01-03T23:36:29+02:00", datetime(2012, 1, 3, 21, 36, 29, tzinfo=UTC)),
        ("2024-02-29 00:00:00 +0530", datetime(2024, 2, 28, 18, 30, tzinfo=UTC)),
    ],
)
def test_every_gitlab_spelling_becomes_aware_utc(spelling: str, expected: datetime) -> None:
    parsed = parse_time(spelling)
    assert parsed == expected
    assert parsed.tzinfo is UTC


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "yesterday",
        "2025-13-01 00:00:00 UTC",
        "2025-02-30T00:00:00Z",
        "2025-01-01 00:00:00 +9900",
        "9999-12-31T23:59:59Z",
        "0001-01-01 00:00:00 UTC",
        "1969-12-31T23:59:59Z",
    ],
)
def test_unknown_spellings_raise_a_typed_error(bad: str) -> None:
    with pytest.raises(TimestampError):
        parse_time(bad)


def test_isoformat_writes_utc_with_z() -> None:
    assert isoformat(parse_time("2026-07-28 15:09:25 -0700")) == "2026-07-28T22:09:25Z"


def test_a_stored_time_reads_back_as_it_was_written() -> None:
    """``parse_stored`` (the writer's fast path) agrees with ``parse_time`` on every spelling."""
    written = datetime(2025, 1, 2, 3, 4, 5, 6789, tzinfo=UTC)
    assert parse_stored(isoformat(written)) == written
    assert parse_stored(isoformat(written)).tzinfo is UTC  # type: ignore[union-attr]
    for spelling in (
        "2025-08-05 21:48:25 UTC",
        "2026-07-28 15:09:25 -0700",
        "2018-08-20T06:17:28.394Z",
    ):
        assert parse_stored(spelling) == parse_time(spelling)
    assert parse_stored(None) is None


@pytest.mark.parametrize(
    "value",
    [
        "2025-08-05 21:48+05 UTC",
        "2025-08-05 21:48:2x UTC",
        "2025-13-05 21:48:25 UTC",
        "0001-01-01 00:00:00 UTC",
    ],
)
def test_near_misses_of_the_webhook_spelling_are_refused(value: str) -> None:
    with pytest.raises(TimestampError):
        parse_time(value)


def test_the_webhook_spelling_parses_as_the_general_pattern_does() -> None:
    assert parse_time("2025-08-05 21:48:25 UTC") == parse_time("2025-08-05T21:48:25Z")
    assert parse_time("2025-08-05 21:48:25 UTC") == datetime(2025, 8, 5, 21, 48, 25, tzinfo=UTC)


def test_an_http_date_becomes_aware_utc() -> None:
    """Retry-After may name a moment: RFC 9110's IMF-fixdate or an obsolete form."""
    expected = datetime(2015, 10, 21, 7, 28, tzinfo=UTC)
    for spelling in (
        "Wed, 21 Oct 2015 07:28:00 GMT",
        "Wed, 21 Oct 2015 07:28:00 -0000",
        "Wednesday, 21-Oct-15 07:28:00 GMT",
        "Wed Oct 21 07:28:00 2015",
    ):
        assert parse_http_date(spelling) == expected
        assert parse_http_date(spelling).tzinfo is UTC
    assert parse_http_date("120") is None
    assert parse_http_date("in a while") is None
