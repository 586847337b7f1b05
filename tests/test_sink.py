"""The HTTP sink: transactional outbox, ordered at-least-once delivery, outages, status."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import structlog
from click.testing import CliRunner
from pydantic import SecretStr
from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError
from structlog.testing import capture_logs

from builders import dumps, mr_event
from conftest import post
from receiver import Receiver, unused_port
from secledger import sink, sinkhttp
from secledger.cli import main
from secledger.config import Settings
from secledger.extract import extract_facts
from secledger.intake import Delivery, parse_delivery
from secledger.policy import LabelPolicy
from secledger.service import Recording, feed, record
from secledger.store import db, outbox
from secledger.store.log import Chain
from secledger.times import utcnow
from secledger.web import create_app

POLICY = LabelPolicy()
HEADERS = {"x-gitlab-event": "Merge Request Hook"}
SINK_TOKEN = "sink-secret-value"


def record_body(engine: Engine, body: dict, *, emit: bool = True) -> str:
    outcome = feed(
        engine,
        POLICY,
        HEADERS,
        dumps(body),
        max_body_bytes=10**6,
        source="replay",
        recording=Recording(emit=emit),
    )
    return outcome.status


def history(count: int) -> list[dict]:
    """``count`` distinct security deliveries over two merge requests."""
    return [
        mr_event("update", iid=1 + i % 2, updated_at=f"2025-08-06 10:{i:02d}:00 UTC")
        for i in range(count)
    ]


def outbox_seqs(engine: Engine) -> list[int]:
    with engine.connect() as conn:
        return list(conn.execute(text("SELECT seq FROM outbox ORDER BY seq")).scalars())


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    started = Receiver().start()
    yield started
    started.stop()


@pytest.fixture
def sink_cli(database_url: str, tmp_path: Path):
    """Run the CLI with a sink URL; fast backoff so outage tests take milliseconds."""

    def invoke(url: str, *args: str, attempts: int = 3, timeout: float = 5):
        env = {
            "SECLEDGER_DATABASE_URL": database_url,
            "SECLEDGER_DATA_DIR": str(tmp_path / "data"),
            "SECLEDGER_SINK_URL": url,
            "SECLEDGER_SINK_TOKEN": SINK_TOKEN,
            "SECLEDGER_SINK_MAX_ATTEMPTS": str(attempts),
            "SECLEDGER_SINK_BACKOFF_SECONDS": "0.01",
            "SECLEDGER_SINK_BACKOFF_MAX_SECONDS": "0.05",
            "SECLEDGER_SINK_TIMEOUT_SECONDS": str(timeout),
        }
        return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)

    return invoke


def test_no_outbox_rows_when_no_sink_is_configured(client, engine: Engine) -> None:
    """Without SECLEDGER_SINK_URL the hot path writes nothing to the outbox."""
    for body in history(3):
        assert post(client, body).json()["status"] == "recorded"
    assert outbox_seqs(engine) == []
    assert record_body(engine, mr_event("approved", actor="bob"), emit=False) == "recorded"
    assert outbox_seqs(engine) == []


def test_each_recorded_seq_queues_its_ledger_row(engine: Engine) -> None:
    """One outbox row per new seq, holding the row as that recording left it."""
    assert record_body(engine, mr_event("open")) == "recorded"
    assert record_body(engine, mr_event("approved", actor="bob")) == "recorded"
    assert record_body(engine, mr_event("approved", actor="bob")) == "duplicate"
    assert record_body(engine, mr_event("open", iid=7, labels=["docs"])) == "ignored"
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT o.seq, o.idempotency_key, o.body, l.hash FROM outbox o"
                " JOIN delivery_log l USING (seq) ORDER BY o.seq"
            )
        ).all()
    assert [row.seq for row in rows] == [1, 2]
    first, second = (json.loads(row.body) for row in rows)
    assert first["seq"] == 1
    assert first["ledger"]["decision"] is None
    assert first["ledger"]["last_seq"] == 1
    assert second["ledger"]["decision"] == "approved"
    assert second["ledger"]["approvers"] == ["bob"]
    assert [row.idempotency_key for row in rows] == [bytes(row.hash).hex() for row in rows]


def test_outbox_row_is_rolled_back_with_its_recording(engine: Engine) -> None:
    """The outbox row is part of the recording transaction: no commit, no row to send."""
    delivery = parse_delivery(
        HEADERS,
        dumps(mr_event("open")),
        secrets=(),
        max_body_bytes=10**6,
        received_at=utcnow(),
        require_token=False,
        source="replay",
    )
    assert isinstance(delivery, Delivery)
    with engine.connect() as conn:
        transaction = conn.begin()
        chain = Chain.open(conn)
        outcome = record(
            conn, chain, delivery, extract_facts(delivery, POLICY), recording=Recording(emit=True)
        )
        assert outcome.status == "recorded"
        assert conn.execute(text("SELECT count(*) FROM outbox")).scalar_one() == 1
        transaction.rollback()
    assert outbox_seqs(engine) == []


def test_outbox_rows_cannot_be_changed(engine: Engine) -> None:
    """What was queued is what is sent: an UPDATE is refused by the database."""
    record_body(engine, mr_event("open"))
    with pytest.raises(DBAPIError, match="refused"), engine.begin() as conn:
        conn.execute(text("UPDATE outbox SET body = '{}'"))


def test_outage_then_recovery_delivers_every_row_once_in_order(
    engine: Engine, sink_cli, receiver: Receiver
) -> None:
    """Not listening, then 500s, then up: each row is acknowledged exactly once, in seq order."""
    for body in history(4):
        assert record_body(engine, body) == "recorded"

    down = sink_cli(f"http://127.0.0.1:{unused_port()}/ingest", "sink", "drain")
    assert down.exit_code == 1
    assert "seq 1 still fails after 3 attempts (ConnectError); it stays pending" in down.output
    status = json.loads(sink_cli(receiver.url, "sink", "status", "--format", "json").output)
    assert status["pending"] == 4
    assert status["failed"] == 1
    assert status["failed_attempts"] == 3
    assert status["delivered"] == 0
    assert status["oldest_pending_seq"] == 1
    assert status["last_error"] == "seq 1: ConnectError"

    receiver.failures = 5  # more than one drain's attempts: the second drain finishes it
    failing = sink_cli(receiver.url, "sink", "drain")
    assert failing.exit_code == 1
    assert "seq 1 still fails after 3 attempts (HTTP 500)" in failing.output
    recovered = sink_cli(receiver.url, "sink", "drain")
    assert recovered.exit_code == 0, recovered.output
    assert recovered.output.strip() == "delivered 4, pending 0"

    accepted = receiver.accepted()
    assert [r.seq for r in accepted] == [1, 2, 3, 4]
    assert len({r.headers["Idempotency-Key"] for r in accepted}) == 4
    retried = [r for r in receiver.requests if r.seq == 1]
    assert len(retried) == 6  # 5 answered 500, then the 200
    assert len({r.headers["Idempotency-Key"] for r in retried}) == 1
    assert all(r.headers["X-Secledger-Token"] == SINK_TOKEN for r in receiver.requests)
    assert accepted[0].headers["X-Secledger-Seq"] == "1"

    record_body(engine, mr_event("approved", actor="bob", iid=2))
    assert sink_cli(receiver.url, "sink", "drain").output.strip() == "delivered 1, pending 0"
    assert [r.seq for r in receiver.accepted()] == [1, 2, 3, 4, 5]
    status = json.loads(sink_cli(receiver.url, "sink", "status", "--format", "json").output)
    assert (status["pending"], status["failed"], status["delivered"]) == (0, 0, 5)
    assert status["last_error"] is None


def test_attempts_are_counted_per_row_not_across_rows(
    engine: Engine, sink_cli, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each row fails once and then goes through: with 3 attempts allowed, none of them
    is stuck, however many rows there are. One row a transaction, so that no success
    in the same batch resets the count by the way."""
    monkeypatch.setattr(sink, "SEND_BATCH", 1)
    for body in history(4):
        assert record_body(engine, body) == "recorded"
    receiver.flaky = True
    drained = sink_cli(receiver.url, "sink", "drain")
    assert drained.exit_code == 0, drained.output
    assert drained.output.strip() == "delivered 4, pending 0"
    assert [r.seq for r in receiver.accepted()] == [1, 2, 3, 4]
    assert len(receiver.requests) == 8


def test_a_transaction_posts_up_to_a_hundred_rows(
    engine: Engine, sink_cli, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One commit for the markers of many rows, as docs/downstream.md says."""
    taken: list[int] = []
    real = outbox.next_pending

    def counted(conn: Any, limit: int) -> list[outbox.Pending]:
        rows = real(conn, limit)
        taken.append(len(rows))
        return rows

    monkeypatch.setattr(outbox, "next_pending", counted)
    for body in history(5):
        assert record_body(engine, body) == "recorded"
    assert sink_cli(receiver.url, "sink", "drain").exit_code == 0
    assert taken[0] == 5


def test_a_second_sender_waits_for_the_first(engine: Engine, sink_cli, receiver: Receiver) -> None:
    """While another sender holds the sink lock, drain sends nothing and says so."""
    record_body(engine, mr_event("open"))
    with engine.begin() as conn:
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": outbox.SINK_LOCK_KEY})
        busy = sink_cli(receiver.url, "sink", "drain")
    assert busy.exit_code == 1
    assert "another sender is delivering" in busy.output
    assert receiver.requests == []
    assert sink_cli(receiver.url, "sink", "drain").exit_code == 0
    assert [r.seq for r in receiver.accepted()] == [1]


def test_a_server_idle_in_transaction_limit_shorter_than_a_post_does_not_end_the_pass(
    engine: Engine, database_url: str, sink_cli, receiver: Receiver
) -> None:
    """Managed servers often end idle transactions; the sender's waits on POSTs are not idle."""
    for body in history(2):
        assert record_body(engine, body) == "recorded"
    name = engine.url.database
    with engine.begin() as conn:
        conn.execute(text(f'ALTER DATABASE "{name}" SET idle_in_transaction_session_timeout = 100'))
    receiver.delay = 0.4
    result = sink_cli(receiver.url, "sink", "drain")
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "delivered 2, pending 0"
    assert [r.seq for r in receiver.accepted()] == [1, 2]


def test_a_server_transaction_limit_shorter_than_a_pass_does_not_end_it(
    engine: Engine, database_url: str, sink_cli, receiver: Receiver
) -> None:
    """PostgreSQL 17's transaction_timeout (managed servers set it) ended the sender's
    transaction, which holds a batch of POSTs: the rows were posted again every few
    seconds and never marked. Before 17 the setting does not exist, and the sender's
    transaction must not trip over its name."""
    for body in history(3):
        assert record_body(engine, body) == "recorded"
    name = engine.url.database
    with engine.begin() as conn:
        version = int(conn.execute(text("SHOW server_version_num")).scalar_one())
        if version >= 170000:
            conn.execute(text(f'ALTER DATABASE "{name}" SET transaction_timeout = 500'))
    receiver.delay = 0.3
    result = sink_cli(receiver.url, "sink", "drain")
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "delivered 3, pending 0"
    assert [r.seq for r in receiver.accepted()] == [1, 2, 3]


def test_drain_without_a_sink_is_a_clear_error(database_url: str, tmp_path: Path) -> None:
    env = {"SECLEDGER_DATABASE_URL": database_url, "SECLEDGER_DATA_DIR": str(tmp_path)}
    result = CliRunner().invoke(main, ["sink", "drain"], env=env)
    assert result.exit_code == 1
    assert "no HTTP sink configured: set SECLEDGER_SINK_URL" in result.output


def test_sink_url_must_be_http() -> None:
    with pytest.raises(ValueError, match="http:// or https://"):
        Settings(sink_url="ftp://example.com/x")


def test_serve_delivers_in_the_background(
    settings: Settings, database_url: str, receiver: Receiver, engine: Engine
) -> None:
    """`serve` queues each recording and its sender POSTs it soon after, in order."""
    from fastapi.testclient import TestClient  # noqa: PLC0415

    configured = settings.model_copy(
        update={
            "sink_url": receiver.url,
            "sink_token": SecretStr(SINK_TOKEN),
            "sink_backoff_seconds": 0.01,
        }
    )
    receiver.failures = 1  # the first attempt fails: the background sender retries it
    app = create_app(configured, db.Database(database_url, embedded=False))
    with TestClient(app) as test_client:
        for body in history(3):
            assert post(test_client, body).json()["status"] == "recorded"
        accepted = receiver.wait_accepted(3)
    assert [r.seq for r in accepted] == [1, 2, 3]
    assert [r.body["ledger"]["last_seq"] for r in accepted] == [1, 2, 3]
    assert outbox_seqs(engine) == [1, 2, 3]
    with engine.connect() as conn:
        assert outbox.status(conn).pending == 0


class Trickler:
    """An HTTP receiver that answers 200 and then sends its body one byte every
    ``interval`` seconds, or, with ``head``, its status line and then a header line each
    ``interval``."""

    def __init__(self, *, head: bool = False, interval: float = 1.0) -> None:
        self._head = head
        self._interval = interval
        self._server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._server.getsockname()[1]}/ingest"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self._server.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.recv(65536)
                if self._head:
                    conn.sendall(b"HTTP/1.1 200 OK\r\n")
                else:
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\n")
                for number in range(20):
                    if self._stop.wait(self._interval):
                        break
                    with contextlib.suppress(OSError):
                        conn.sendall(b"X-Slow-%d: x\r\n" % number if self._head else b"x")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._server.close()


def test_a_receiver_trickling_its_answer_cannot_hold_the_sender(engine: Engine, sink_cli) -> None:
    """The timeout bounds each read: a body sent a byte a second held one row 20 s, with
    the sender's transaction open. The answer's status is all it reads now."""
    assert record_body(engine, mr_event("open")) == "recorded"
    trickler = Trickler()
    try:
        started = time.monotonic()
        drained = sink_cli(trickler.url, "sink", "drain")
        took = time.monotonic() - started
    finally:
        trickler.close()
    assert drained.output.strip() == "delivered 1, pending 0", drained.output
    assert took < 10, took


def test_a_receiver_trickling_its_answer_head_is_cut_off_at_the_deadline(
    engine: Engine, sink_cli
) -> None:
    """Each read of a head sent a line a second came within the timeout: the sender, its
    transaction and the sink lock were held for as long as the receiver liked, and no
    failure was recorded. A POST as a whole gets three timeouts."""
    assert record_body(engine, mr_event("open")) == "recorded"
    # Lines come well inside the 1 s read timeout, so only the whole-answer deadline can
    # stop it: a line a second raced the read timeout on a loaded machine.
    trickler = Trickler(head=True, interval=0.25)
    try:
        started = time.monotonic()
        drained = sink_cli(trickler.url, "sink", "drain", attempts=1, timeout=1)
        took = time.monotonic() - started
    finally:
        trickler.close()
    assert drained.exit_code == 1, drained.output
    assert "no answer within 3 s" in drained.output, drained.output
    assert took < 8, took
    with engine.connect() as connection:
        failures = connection.execute(text("SELECT error FROM outbox_failures")).scalars().all()
    assert failures == ["no answer within 3 s"]


def test_a_silent_receiver_fails_as_no_answer_within_the_timeout(
    engine: Engine, sink_cli, receiver: Receiver
) -> None:
    """It was recorded as `ReadTimeout`, not as the documented `no answer within N s`."""
    assert record_body(engine, mr_event("open")) == "recorded"
    receiver.delay = 2.0
    drained = sink_cli(receiver.url, "sink", "drain", attempts=1, timeout=0.5)
    assert drained.exit_code == 1, drained.output
    assert "seq 1 still fails after 1 attempt (no answer within 0.5 s)" in drained.output
    with engine.connect() as connection:
        failures = connection.execute(text("SELECT error FROM outbox_failures")).scalars().all()
    assert failures == ["no answer within 0.5 s"]


def test_a_sink_token_that_is_not_header_text_is_refused_without_echoing_it(
    database_url: str, tmp_path: Path
) -> None:
    """Sent as a header, it failed every POST before it was one: nothing was recorded as
    failed, and `sink status` stayed silent while rows piled up."""
    env = {
        "SECLEDGER_DATABASE_URL": database_url,
        "SECLEDGER_DATA_DIR": str(tmp_path / "data"),
        "SECLEDGER_SINK_URL": "http://127.0.0.1:9/ingest",
        "SECLEDGER_SINK_TOKEN": "s\u00e9cret-value",
    }
    result = CliRunner().invoke(main, ["sink", "status"], env=env)
    assert result.exit_code == 1
    assert "printable ASCII" in result.output
    assert "cret-value" not in result.output


def test_a_zero_backoff_cap_does_not_hammer_a_failing_receiver(
    engine: Engine, database_url: str, receiver: Receiver
) -> None:
    """With a cap of 0 the background sender began its next pass at once, POSTing and
    recording a failure in a tight loop."""
    assert record_body(engine, mr_event("open")) == "recorded"
    receiver.failures = 10_000
    config = sink.SinkConfig(receiver.url, "X-Secledger-Token", None, 5.0, 1, 0.0, 0.0)
    worker = sink.SinkWorker(engine, config, db.conninfo(database_url))
    worker.start()
    # From its first POST (its start, on a loaded machine, may take a while): then 1.5 s
    # at 1 s between passes.
    deadline = time.monotonic() + 20
    while not receiver.requests and time.monotonic() < deadline:
        time.sleep(0.02)
    assert receiver.requests, "the sender never POSTed"
    time.sleep(1.5)
    worker.close()
    assert len(receiver.requests) <= 3, len(receiver.requests)


def test_a_name_lookup_that_hangs_is_cut_off_at_the_posts_deadline(
    receiver: Receiver,
) -> None:
    """The resolver's own timeouts and retries were not bound by the POST's deadline: a
    DNS server that did not answer held the sender (and the sink lock) for half a minute."""
    released = threading.Event()

    def hanging(host: str, port: int) -> list[str]:
        released.wait(10)
        return ["127.0.0.1"]

    poster = sinkhttp.Poster(5.0, resolver=hanging)
    url = f"http://sink.example.test:{receiver.port}/ingest"
    try:
        started = time.monotonic()
        with pytest.raises(httpx.ConnectTimeout) as raised:
            poster.post(url, b"{}", {}, within=0.5)
        took = time.monotonic() - started
        failure = poster.failure(raised.value)
        # Still hanging: it must not hold up the process's exit either.
        lookups = [t for t in threading.enumerate() if t.name == "secledger-sink-lookup"]
        assert lookups and all(thread.daemon for thread in lookups)
    finally:
        released.set()
        poster.close()
    assert took < 3.0, took  # the lookup alone would have taken 10 s
    assert failure == "no name lookup within 0.5 s"
    assert receiver.requests == []


def test_a_looked_up_name_is_posted_to_at_its_address(receiver: Receiver) -> None:
    """Each address the lookup gives is tried in turn, as the socket library would."""
    asked: list[tuple[str, int]] = []

    def lookup(host: str, port: int) -> list[str]:
        asked.append((host, port))
        return ["127.0.0.2", "127.0.0.1"]  # nothing listens on the first

    poster = sinkhttp.Poster(5.0, resolver=lookup)
    try:
        status = poster.post(
            f"http://sink.example.test:{receiver.port}/ingest",
            json.dumps({"seq": 1}).encode(),
            {"content-type": "application/json"},
            within=5.0,
        )
        # An address needs no lookup.
        again = poster.post(receiver.url, json.dumps({"seq": 2}).encode(), {}, within=5.0)
    finally:
        poster.close()
    assert (status, again) == (200, 200)
    assert asked == [("sink.example.test", receiver.port)]
    assert [request.seq for request in receiver.requests] == [1, 2]


def test_a_name_that_does_not_resolve_is_named_by_its_failure(receiver: Receiver) -> None:
    def failing(host: str, port: int) -> list[str]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    poster = sinkhttp.Poster(5.0, resolver=failing)
    try:
        with pytest.raises(httpx.ConnectError) as raised:
            poster.post("http://nowhere.example.test/ingest", b"{}", {}, within=5.0)
        assert poster.failure(raised.value) == "ConnectError"
    finally:
        poster.close()


def test_a_link_local_address_keeps_its_scope() -> None:
    """Without its scope id, a link-local IPv6 address found by the lookup is no address."""
    scoped = ("fe80::1", 80, 0, 2)
    assert sinkhttp._spelled(socket.AF_INET6, scoped) == "fe80::1%2"
    assert sinkhttp._spelled(socket.AF_INET6, ("2001:db8::1", 80, 0, 0)) == "2001:db8::1"
    assert sinkhttp._spelled(socket.AF_INET, ("192.0.2.1", 80)) == "192.0.2.1"


def test_a_sender_that_keeps_failing_backs_off_and_says_why(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure that comes back at once (here: its notifications' database cannot be
    reached) was retried every 2 s for as long as it lasted, 43,000 lines a day, each
    naming only the exception's class."""
    monkeypatch.setattr(sink, "RECONNECT_SECONDS", 0.01)
    monkeypatch.setattr(sink, "MAX_RECONNECT_SECONDS", 0.04)
    monkeypatch.setattr(sink, "log", structlog.get_logger("test.sink"))
    config = sink.SinkConfig("http://127.0.0.1:9/", "X-Secledger-Token", None, 1.0, 1, 0.0, 0.0)
    worker = sink.SinkWorker(engine, config, f"host=127.0.0.1 port={unused_port()} dbname=x")
    with capture_logs() as logs:
        worker.start()
        deadline = time.monotonic() + 20
        while len([e for e in logs if e["event"] == "sink_error"]) < 5:
            assert time.monotonic() < deadline, logs
            time.sleep(0.01)
        worker.close()
    errors = [e for e in logs if e["event"] == "sink_error"]
    assert [e["retry_seconds"] for e in errors[:5]] == [0.01, 0.02, 0.04, 0.04, 0.04]
    assert all(e["connection"] for e in errors)
    assert "connection" in errors[0]["detail"] and "failed" in errors[0]["detail"]


def test_a_pausing_sender_keeps_reading_its_notifications(database_url: str) -> None:
    """A sender stuck on a row paused without reading its LISTEN connection: PostgreSQL's
    notification queue, which every recording's commit writes to, could not be trimmed
    past it for as long as the receiver was down."""
    from secledger.listener import CHANNEL, Listener  # noqa: PLC0415

    stop = threading.Event()
    with (
        Listener(db.conninfo(database_url)) as listener,
        psycopg.connect(database_url, autocommit=True) as notifier,
    ):
        sender = threading.Timer(
            0.1, lambda: [notifier.execute(f"NOTIFY {CHANNEL}, '{n}'") for n in range(5)]
        )
        sender.start()
        started = time.monotonic()
        listener.pause(0.6, stop)
        assert time.monotonic() - started >= 0.6
        sender.join()
        assert not listener.wait(0.05, stop)  # every one was read during the pause
