"""The webhook hot path's small parts: body deadlines, the delivery tally, the ignored-
delivery summary and the queued log writer."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import io
import logging
import threading
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import orjson
import pytest
import structlog
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from secledger import digest, logs, throttle, webhook
from secledger.deadlines import Deadlines
from secledger.headers import RequestHeaders
from secledger.intake import MAX_HEADER_CHARS, kept_headers
from secledger.logs import LineWriter
from secledger.metrics import Metrics
from secledger.rules import stamp
from secledger.store.chain import LogRow, canonical, link, time_text
from secledger.throttle import MAX_KINDS, Throttle
from secledger.webhook import IgnoredLog


def test_a_deadline_turns_a_stalled_await_into_timeout_error() -> None:
    deadlines = Deadlines(0.2, granularity=0.05)

    async def stalled() -> float:
        started = time.monotonic()
        with pytest.raises(TimeoutError), deadlines.limit():
            await asyncio.Event().wait()  # a body that never arrives
        return time.monotonic() - started

    waited = asyncio.run(stalled())
    assert 0.2 <= waited < 1.0  # the sweeps may run late on a loaded machine; never early


def test_work_finished_in_time_is_not_cancelled_and_the_timer_stops() -> None:
    deadlines = Deadlines(1.0, granularity=0.05)

    async def quick() -> str:
        with deadlines.limit():
            await asyncio.sleep(0.01)
        await asyncio.sleep(1.2)  # past the deadline, outside the block: no cancel
        return "done"

    assert asyncio.run(quick()) == "done"
    assert deadlines._running == {}
    assert deadlines._timer is None  # nothing left to watch: the sweep stopped itself


def test_a_cancel_from_outside_still_propagates_as_cancellation() -> None:
    deadlines = Deadlines(5.0, granularity=0.05)

    async def main() -> None:
        async def reader() -> None:
            with deadlines.limit():
                await asyncio.Event().wait()

        task = asyncio.create_task(reader())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())


def test_many_concurrent_deadlines_fire_independently() -> None:
    # 1 s against sleeps of 10 ms: a stalled loop cannot make the quick ones miss theirs.
    deadlines = Deadlines(1.0, granularity=0.05)

    async def one(delay: float) -> str:
        try:
            with deadlines.limit():
                await asyncio.sleep(delay)
        except TimeoutError:
            return "timeout"
        return "ok"

    async def main() -> list[str]:
        return await asyncio.gather(*(one(d) for d in (0.01, 30.0, 0.02, 30.0)))

    assert asyncio.run(main()) == ["ok", "timeout", "ok", "timeout"]


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_the_tally_exposes_counts_and_a_cumulative_histogram() -> None:
    metrics = Metrics()
    metrics.tally.add("Merge Request Hook", "ignored", 0.001)  # on a bound: counted in it
    metrics.tally.add("Merge Request Hook", "ignored", 0.003)
    metrics.tally.add("System Hook", "recorded", 20.0)  # past the last bound: +Inf only
    found = samples(metrics)
    ignored = (("event", "Merge Request Hook"), ("outcome", "ignored"))
    assert found[("secledger_deliveries_total", ignored)] == 2
    recorded = (("event", "System Hook"), ("outcome", "recorded"))
    assert found[("secledger_deliveries_total", recorded)] == 1
    bucket = "secledger_delivery_processing_seconds_bucket"
    assert found[(bucket, (("le", "0.001"),))] == 1
    assert found[(bucket, (("le", "0.005"),))] == 2
    assert found[(bucket, (("le", "10.0"),))] == 2
    assert found[(bucket, (("le", "+Inf"),))] == 3
    assert found[("secledger_delivery_processing_seconds_count", ())] == 3
    assert found[("secledger_delivery_processing_seconds_sum", ())] == pytest.approx(20.004)


def test_sender_chosen_event_names_do_not_grow_the_tally() -> None:
    metrics = Metrics()
    for n in range(500):
        metrics.tally.add(f"Evil Hook {n}", "ignored", 0.001)
    metrics.tally.add(None, "rejected", 0.001)
    assert len(metrics.tally._counts) == 2
    found = samples(metrics)
    other = (("event", "other"), ("outcome", "ignored"))
    assert found[("secledger_deliveries_total", other)] == 500
    assert found[("secledger_deliveries_total", (("event", "none"), ("outcome", "rejected")))] == 1


@pytest.fixture
def fresh_log(monkeypatch: pytest.MonkeyPatch) -> None:
    """The webhook module's logger, not cached by an earlier test, so capture_logs sees it."""
    monkeypatch.setattr(webhook, "log", structlog.get_logger("secledger.webhook"))


@pytest.mark.usefixtures("fresh_log")
def test_ignored_deliveries_are_summarised_once_per_interval() -> None:
    summary = IgnoredLog(interval=60.0)
    summary.since = 1000.0
    with capture_logs() as logged:
        for second in range(59):
            summary.note(1000.0 + second, "no label")
        assert logged == []
        summary.note(1060.0, "no label")
    assert logged == [
        {"event": "deliveries_ignored", "count": 60, "seconds": 60.0, "log_level": "info"}
    ]
    assert summary.count == 0


@pytest.mark.usefixtures("fresh_log")
def test_at_debug_level_each_ignored_delivery_gets_its_line() -> None:
    summary = IgnoredLog(interval=60.0, each=True)
    with capture_logs() as logged:
        summary.note(summary.since + 1, "event 'Push Hook' is not a merge request event")
    assert logged == [
        {
            "event": "delivery",
            "outcome": "ignored",
            "reason": "event 'Push Hook' is not a merge request event",
            "log_level": "debug",
        }
    ]


def test_the_line_writer_keeps_every_line_in_order() -> None:
    sink = io.BytesIO()
    writer = LineWriter(sink)  # type: ignore[arg-type]
    lines = [orjson.dumps({"n": n}) + b"\n" for n in range(5000)]
    for line in lines:
        writer.write(line)
    writer.drain()
    assert sink.getvalue() == b"".join(lines)


def test_the_line_writer_writes_without_being_drained() -> None:
    sink = io.BytesIO()
    writer = LineWriter(sink)  # type: ignore[arg-type]
    writer.write(b"hello\n")
    deadline = time.monotonic() + 5
    while sink.getvalue() != b"hello\n" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sink.getvalue() == b"hello\n"


def test_the_line_writer_drops_and_counts_lines_its_file_does_not_take() -> None:
    """stderr to a log shipper that stalled: the queue grew by a line per delivery until
    the process was killed for its memory."""

    class Stalled(io.BytesIO):
        def __init__(self) -> None:
            super().__init__()
            self.go = threading.Event()

        def write(self, data: bytes) -> int:  # type: ignore[override]
            self.go.wait(10)
            return super().write(data)

    sink = Stalled()
    writer = LineWriter(sink, limit=1000)  # type: ignore[arg-type]
    writer.write(b"first\n")  # taken by the log thread, which then waits in write()
    deadline = time.monotonic() + 5
    while writer._lines and time.monotonic() < deadline:
        time.sleep(0.01)
    lines = [b"%04d %s\n" % (n, b"x" * 90) for n in range(100)]
    for line in lines:
        writer.write(line)
    assert sum(map(len, writer._lines)) <= 1000
    sink.go.set()
    writer.drain()
    written = sink.getvalue().splitlines()
    kept = 1000 // len(lines[0])
    assert written[: kept + 1] == [b"first"] + [line.rstrip(b"\n") for line in lines[:kept]]
    dropped = orjson.loads(written[-1])
    assert (dropped["event"], dropped["lines"]) == ("log_lines_dropped", 100 - kept)


def _json_logs_to(monkeypatch: pytest.MonkeyPatch, level: str) -> tuple[io.BytesIO, LineWriter]:
    """``logs.configure`` as ``serve`` runs it, writing JSON lines to a buffer."""
    sink = io.BytesIO()
    writer = LineWriter(sink)  # type: ignore[arg-type]
    monkeypatch.setattr(logs, "_writer", writer)
    monkeypatch.setattr("sys.stderr", io.TextIOWrapper(io.BytesIO()))
    logs.configure(level)
    return sink, writer


def _without_time(lines: bytes) -> list[dict[str, object]]:
    parsed = [orjson.loads(line) for line in lines.splitlines()]
    for line in parsed:
        assert str(line.pop("timestamp")).endswith("Z")
    return parsed


def test_lines_written_together_are_the_lines_logger_info_writes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sink, writer = _json_logs_to(monkeypatch, "info")
    logger = structlog.get_logger("secledger.test")
    records: list[dict[str, object]] = [
        {"outcome": "recorded", "seq": 7, "ms": 1.5, "instance": "https://g", "mr_iid": 3},
        {"outcome": "duplicate", "seq": None, "token": "s3cret"},  # never in a log line
    ]
    for record in records:
        logger.info("delivery", **record)
    writer.drain()
    one_by_one = sink.getvalue()
    sink.seek(0)
    sink.truncate()
    with structlog.contextvars.bound_contextvars(request="r1"):
        logs.info_lines(logger, "delivery", records)
    writer.drain()
    together = sink.getvalue()
    assert b"s3cret" not in one_by_one + together
    expected = _without_time(one_by_one)
    assert list(expected[0])[-2:] == ["event", "level"]
    assert _without_time(together) == [{"request": "r1", **line} for line in expected]


def test_lines_written_together_follow_the_level_and_a_capture(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sink, writer = _json_logs_to(monkeypatch, "warning")
    logger = structlog.get_logger("secledger.test")
    logs.info_lines(logger, "delivery", [{"seq": 1}])
    writer.drain()
    assert sink.getvalue() == b""  # below the level
    logs.configure("info")
    with capture_logs() as captured:
        logs.info_lines(logger, "delivery", [{"seq": 1}, {"seq": 2}])
    writer.drain()
    assert sink.getvalue() == b""
    assert [(line["event"], line["seq"]) for line in captured] == [("delivery", 1), ("delivery", 2)]


def test_an_exception_logged_as_json_says_what_failed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`serve`'s `checkpoint_failed` and `delivery_failed` lines read `"exc_info": true`."""
    sink, writer = _json_logs_to(monkeypatch, "info")
    logger = structlog.get_logger("secledger.test")
    missing = tmp_path / "checkpoints" / "42.json"
    try:
        missing.read_text()
    except FileNotFoundError:
        logger.exception("checkpoint_failed", error="CheckpointFileFailed")
    writer.drain()
    [line] = _without_time(sink.getvalue())
    assert "exc_info" not in line
    assert f"No such file or directory: '{missing}'" in str(line["exception"])


def test_a_librarys_warning_is_a_json_line_like_ours(monkeypatch: pytest.MonkeyPatch) -> None:
    """psycopg and uvicorn log through the standard library; libpq's messages span lines."""
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    sink, writer = _json_logs_to(monkeypatch, "info")
    logging.getLogger("psycopg").warning("flush request failed: %s\n", "server closed\nit")
    logging.getLogger("psycopg").info("below the libraries' level")
    writer.drain()
    assert _without_time(sink.getvalue()) == [
        {
            "logger": "psycopg",
            "event": "flush request failed: server closed\nit",
            "level": "warning",
        }
    ]


def test_a_librarys_line_anyone_can_cause_is_counted_after_twenty(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """uvicorn warns of each malformed request: 2,000 garbage requests were 2,000 lines."""
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    monkeypatch.setattr(logs, "LIBRARIES", Throttle("library_lines_suppressed"))
    sink, writer = _json_logs_to(monkeypatch, "info")
    for _ in range(500):
        logging.getLogger("uvicorn.error").warning("Invalid HTTP request received.")
    logging.getLogger("psycopg").warning("another line")
    logs.LIBRARIES.flush(time.monotonic())
    writer.drain()
    lines = _without_time(sink.getvalue())
    assert [line["event"] for line in lines].count("Invalid HTTP request received.") == 20
    assert lines[-2]["event"] == "another line"
    summary = lines[-1]
    assert (summary["event"], summary["count"]) == ("library_lines_suppressed", 480)
    assert summary["line"] == "Invalid HTTP request received."


def test_a_throttle_keeps_no_more_kinds_than_its_limit() -> None:
    """A kind made of a sender's input must not grow the table without end."""
    throttle = Throttle("x_suppressed", each=1)
    allowed = [throttle.note(1.0, (("line", str(n)),)) for n in range(MAX_KINDS + 50)]
    assert allowed.count(True) == MAX_KINDS + 1  # the kinds it keeps, then one for the rest
    assert len(throttle._logged) == MAX_KINDS + 1


@pytest.mark.parametrize("size", [0, 1, 2046, 2047, 2048, 4094, 4095, 10_000, 100_003])
def test_digests_in_pieces_equal_hashlib(size: int) -> None:
    body = bytes(range(256)) * (size // 256 + 1)
    body = body[:size]
    assert digest.sha256(body) == hashlib.sha256(body).digest()
    assert (
        digest.sha256(b"head", body, b"tail") == hashlib.sha256(b"head" + body + b"tail").digest()
    )
    expected = hmac.new(b"key", b"id.1." + body, hashlib.sha256).digest()
    assert digest.hmac_sha256(b"key", b"id.1.", body) == expected


def test_the_chain_link_is_the_hash_of_the_canonical_bytes() -> None:
    row = LogRow(
        7,
        datetime(2026, 11, 29, 12, 0, tzinfo=UTC),
        "webhook",
        "Merge Request Hook",
        "https://gitlab.example.com",
        "idem:x",
        "{}",
        b"{" + b"x" * 9000 + b"}",
    )
    prev = bytes(range(32))
    assert link(prev, row) == hashlib.sha256(prev + canonical(row)).digest()


def test_no_piece_reaches_the_size_at_which_hashlib_lets_go_of_the_lock() -> None:
    fed: list[int] = []

    class Recorder:
        def update(self, data: bytes | memoryview) -> None:
            fed.append(len(data))

    digest._feed(Recorder(), (b"x" * 10_000, b"y" * 2047, b"z"))  # type: ignore[arg-type]
    assert sum(fed) == 12_048
    assert max(fed) < 2048  # hashlib's HASHLIB_GIL_MINSIZE


@pytest.mark.parametrize(
    "when",
    [
        datetime(1970, 1, 1, tzinfo=UTC),
        datetime(2025, 8, 5, 21, 48, 25, 123456, tzinfo=UTC),
        datetime(2026, 3, 29, 1, 30, tzinfo=timezone(timedelta(hours=-7))),
        datetime(2999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    ],
)
def test_time_spellings_are_the_strftime_ones_they_replace(when: datetime) -> None:
    """The chain's canonical bytes and the evidence stamps must never change spelling."""
    assert time_text(when) == when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    assert stamp(when) == when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def test_request_headers_read_like_the_dict_they_replace() -> None:
    pairs = [
        (b"x-gitlab-event", b"Merge Request Hook"),
        (b"idempotency-key", b"k" * 600),  # cut to MAX_HEADER_CHARS when kept
        (b"x-gitlab-token", b"secret"),
        (b"user-agent", b"GitLab/18.3.0 \xe9"),
        (b"x-gitlab-event", b"System Hook"),  # repeated: the last wins, as in a dict
    ]
    plain = {k.decode("latin-1"): v.decode("latin-1") for k, v in pairs}
    lazy = RequestHeaders(pairs)
    assert dict(lazy) == plain
    assert lazy.get("x-gitlab-instance") is None and lazy.get("x-gitlab-instance", "") == ""
    assert "x-gitlab-token" in lazy and "content-length" not in lazy
    assert kept_headers(lazy) == kept_headers(plain)
    assert "x-gitlab-token" not in kept_headers(lazy)
    assert len(kept_headers(lazy)["idempotency-key"]) == MAX_HEADER_CHARS


@pytest.mark.usefixtures("fresh_log")
def test_rejections_of_one_kind_are_logged_up_to_a_limit_then_counted() -> None:
    rejected = webhook.RejectedLog(interval=60.0, each=3)
    rejected.since = 1000.0
    with capture_logs() as logged:
        for second in range(5):
            rejected.refused(1000.0 + second, 401, "invalid_token")
        rejected.refused(1010.0, 413, "body_too_large")  # another kind has its own allowance
        rejected.refused(1070.0, 401, "invalid_token")  # a new interval: logged again
    assert [(line["event"], line.get("error")) for line in logged] == [
        ("delivery_rejected", "invalid_token"),
        ("delivery_rejected", "invalid_token"),
        ("delivery_rejected", "invalid_token"),
        ("delivery_rejected", "body_too_large"),
        ("deliveries_rejected_suppressed", "invalid_token"),
        ("delivery_rejected", "invalid_token"),
    ]
    summary = logged[4]
    assert (summary["status"], summary["count"], summary["seconds"]) == (401, 2, 70.0)
    assert summary["log_level"] == "warning"


@pytest.mark.usefixtures("fresh_log")
def test_a_summary_is_written_when_its_minute_ends_not_at_the_next_line() -> None:
    """After a flood stopped, its count waited for the next line of its kind: hours,
    while the docs say once a minute. serve ticks every summary (throttle.tick_all)."""
    rejected = webhook.RejectedLog(interval=60.0, each=1)
    ignored = IgnoredLog(interval=60.0)
    start = time.perf_counter()
    rejected.refused(start, 401, "invalid_token")
    rejected.refused(start, 401, "invalid_token")  # counted, not logged
    ignored.note(start, "no label")
    assert {rejected, ignored} <= set(throttle._SUMMARIES)  # what tick_all ticks
    with capture_logs() as logged:
        for summary in (rejected, ignored):
            summary.tick()
        assert logged == []  # the minute is not over
        rejected.since = ignored.since = start - 61
        for _ in range(2):  # written once
            for summary in (rejected, ignored):
                summary.tick()
    assert sorted((line["event"], line["count"]) for line in logged) == [
        ("deliveries_ignored", 1),
        ("deliveries_rejected_suppressed", 1),
    ]
