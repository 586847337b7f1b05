"""A real `secledger serve` process on real PostgreSQL: signatures, rotation, instances,
a streamed 1 GB body, secrets kept out of the log, and a small fuzz campaign."""

from __future__ import annotations

import json
import re
import select
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import psycopg
import pytest

from builders import dumps, mr_event
from conftest import TEMPLATE, _with_database
from live import SIGNING_SECRET, LiveServer, live_server, signed_headers
from secledger import replicapolicy

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import fuzz_campaign

pytestmark = pytest.mark.slow

TOKENS = ("rotation-old-token-51c2", "rotation-new-token-a9e0")
OTHER_KEY = bytes(range(200, 232))
OTHER_SECRET = "whsec_" + __import__("base64").b64encode(OTHER_KEY).decode()
B_TOKEN = "instance-b-token-77aa"
EVERY_SECRET = (*TOKENS, SIGNING_SECRET, SIGNING_SECRET[6:], OTHER_SECRET, B_TOKEN)


@pytest.fixture(scope="module")
def module_db(server_url: str, template_url: str) -> Iterator[str]:
    """One fresh migrated database shared by the tests of this module."""
    name = f"secledger_live_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{TEMPLATE}"')
    try:
        yield _with_database(server_url, name)
    finally:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def server(module_db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """Two rotating tokens and one signing secret, all from files; a second instance in TOML."""
    tmp = tmp_path_factory.mktemp("live")
    tokens = tmp / "tokens"
    tokens.write_text("\n".join(TOKENS) + "\n")
    signing = tmp / "signing"
    signing.write_text(SIGNING_SECRET + "\n")
    b_token = tmp / "b-token"
    b_token.write_text(B_TOKEN)
    config = tmp / "secledger.toml"
    config.write_text(
        '[[webhook_sources]]\ninstance = "https://a.example.com"\nauth = "signature"\n'
        f'signing_secrets = ["{OTHER_SECRET}"]\n\n'
        '[[webhook_sources]]\ninstance = "https://b.example.org"\nauth = "token"\n'
        f'tokens_file = "{b_token}"\n'
    )
    env = {
        "SECLEDGER_WEBHOOK_SECRETS_FILE": str(tokens),
        "SECLEDGER_WEBHOOK_SIGNING_SECRETS_FILE": str(signing),
        "SECLEDGER_CONFIG": str(config),
        "SECLEDGER_LOG_LEVEL": "info",
    }
    with live_server(module_db, tmp, env) as running:
        yield running
        log = running.stderr()
    for secret in EVERY_SECRET:
        assert secret not in log, "a secret reached the server log"
    # docs/operations.md: JSON on stderr, one object per line, from the first line on.
    events = [json.loads(line)["event"] for line in log.splitlines()]
    assert events.index("serve_starting") < events.index("serve_receiving")
    starting = json.loads(log.splitlines()[events.index("serve_starting")])
    assert re.fullmatch("[0-9a-f]{12}", starting["policy"]), starting


def test_serve_names_its_policy_in_its_database_sessions(server, module_db) -> None:
    """Replicas compare policies through pg_stat_activity (docs/deployment.md)."""
    with psycopg.connect(module_db) as conn:
        names = conn.execute(
            "SELECT application_name FROM pg_stat_activity WHERE datname = current_database()"
        ).fetchall()
    assert any(name.startswith(replicapolicy.PREFIX) for (name,) in names), names


def rows(database_url: str) -> int:
    with psycopg.connect(database_url) as conn:
        return int(conn.execute("SELECT count(*) FROM delivery_log").fetchone()[0])


def deliver(server: LiveServer, body: bytes, **headers: str) -> httpx.Response:
    sent = {"X-Gitlab-Event": "Merge Request Hook", "Content-Type": "application/json"}
    return httpx.post(server.url + "/webhooks/gitlab", content=body, headers=sent | headers)


def test_signed_deliveries_valid_invalid_expired_and_replayed(server, module_db) -> None:
    before = rows(module_db)
    body = dumps(mr_event("open", iid=501, labels=["sec::high"]))
    good = signed_headers(body, "msg_501")
    assert deliver(server, body, **good).json()["status"] == "recorded"

    bad = good | {
        "webhook-signature": signed_headers(body, "msg_501", key=OTHER_KEY)["webhook-signature"]
    }
    answer = deliver(server, body, **bad)
    assert (answer.status_code, answer.json()["error"]) == (401, "invalid_signature")

    expired = signed_headers(body, "msg_502", timestamp=int(time.time()) - 3600)
    answer = deliver(server, body, **expired)
    assert (answer.status_code, answer.json()["error"]) == (401, "timestamp_out_of_tolerance")
    assert "in the past; the tolerance is 300 s" in answer.json()["message"]

    # A captured request replayed, even with a fresh Idempotency-Key, is refused...
    answer = deliver(server, body, **good, **{"Idempotency-Key": "attacker-new-key"})
    assert (answer.status_code, answer.json()["error"]) == (401, "replayed_webhook_id")
    # ...while GitLab's own resend, signed afresh, is a harmless duplicate.
    resend = signed_headers(body, "msg_501", timestamp=int(time.time()) + 1)
    assert deliver(server, body, **resend).json()["status"] == "duplicate"
    assert rows(module_db) == before + 1


def test_two_active_tokens_both_work_during_rotation(server, module_db) -> None:
    for iid, token in zip((601, 602), TOKENS, strict=True):
        body = dumps(mr_event("open", iid=iid, labels=["sec::high"]))
        assert deliver(server, body, **{"X-Gitlab-Token": token}).json()["status"] == "recorded"
    answer = deliver(server, dumps(mr_event("open", iid=603)), **{"X-Gitlab-Token": "retired"})
    assert answer.status_code == 401
    assert answer.json()["message"] == "X-Gitlab-Token does not match any configured secret"


def test_each_instance_needs_its_own_secrets(server, module_db) -> None:
    body = dumps(mr_event("open", iid=701, labels=["sec::high"]))
    a = {"X-Gitlab-Instance": "https://a.example.com"}
    assert (
        deliver(server, body, **a, **signed_headers(body, "a1", key=OTHER_KEY)).json()["ledger"][
            "instance"
        ]
        == "https://a.example.com"
    )
    # The default signing secret does not open instance A; a token does not either.
    answer = deliver(server, body, **a, **signed_headers(body, "a2"))
    assert answer.json()["error"] == "invalid_signature"
    answer = deliver(server, body, **a, **{"X-Gitlab-Token": TOKENS[0]})
    assert answer.json()["message"] == "webhook-signature header is missing"
    b = {"X-Gitlab-Instance": "https://b.example.org"}
    assert deliver(server, body, **b, **{"X-Gitlab-Token": B_TOKEN}).status_code == 200
    answer = deliver(server, body, **b, **{"X-Gitlab-Token": TOKENS[0]})
    assert answer.status_code == 401
    # Default credentials cannot write for an instance that has its own secrets.
    forged = mr_event("open", iid=702, labels=["sec::high"])
    forged["project"]["web_url"] = "https://b.example.org/acme/payments"
    answer = deliver(server, dumps(forged), **{"X-Gitlab-Token": TOKENS[0]})
    assert (answer.status_code, answer.json()["error"]) == (401, "wrong_instance")


class PeakRSS(threading.Thread):
    """Samples a process's resident memory until stopped; keeps the highest value."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.process = psutil.Process(pid)
        self.peak = self.process.memory_info().rss
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.02):
            self.peak = max(self.peak, self.process.memory_info().rss)


def stream(url: str, head: bytes, total: int) -> tuple[bytes, int]:
    """Send ``head`` then a chunked body of up to ``total`` bytes; the answer and bytes sent."""
    host, port = url.removeprefix("http://").split(":")
    block = b"A" * (1 << 20)
    chunk = b"%x\r\n%s\r\n" % (len(block), block)
    sent = 0
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(head)
        try:
            while sent < total:
                conn.sendall(chunk)
                sent += len(block)
                if select.select([conn], [], [], 0)[0]:
                    break  # the server answered before the body was complete
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = read_answer(conn)
    return answer, sent


def read_answer(conn: socket.socket) -> bytes:
    """One whole HTTP response (headers and Content-Length bytes of body), or what came."""
    answer = b""
    while True:
        head, found, body = answer.partition(b"\r\n\r\n")
        if found:
            length = next(
                (
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                ),
                0,
            )
            if len(body) >= length:
                return answer
        data = conn.recv(65536)
        if not data:
            return answer
        answer += data


def test_streamed_1_gb_body_is_refused_without_memory_growth(server) -> None:
    one_gb = 1 << 30
    head = (
        b"POST /webhooks/gitlab HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"X-Gitlab-Event: Merge Request Hook\r\nX-Gitlab-Token: " + TOKENS[0].encode() + b"\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    sampler = PeakRSS(server.pid)
    baseline = sampler.peak
    sampler.start()
    answer, sent = stream(server.url, head, one_gb)
    sampler.done.set()
    sampler.join()
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"the limit is 26214400 bytes" in answer
    assert sent < one_gb // 4  # refused at the limit, not after reading everything
    # 25 MiB may be buffered before refusing; a body read into memory would be 1 GiB.
    assert sampler.peak - baseline < 150 * (1 << 20)
    declared = head.replace(b"Transfer-Encoding: chunked", b"Content-Length: %d" % one_gb)
    answer, sent = stream(server.url, declared, 4 << 20)
    assert answer.startswith(b"HTTP/1.1 413")
    assert httpx.get(server.url + "/healthz").status_code == 200


@pytest.mark.parametrize("part", ["header", "url"])
def test_a_streamed_request_head_is_refused_at_64_kib(server, part: str) -> None:
    """httptools bounds neither the URL nor a header, and gathers them at a cost that
    grows with the square of their size: one such stranger held every delivery past
    GitLab's 10 s. The head is cut off at 64 KiB (plus at most one read), with a 431."""
    if part == "header":
        head = b"POST /webhooks/gitlab HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: "
    else:
        head = b"POST /webhooks/gitlab?"
    host, port = server.url.removeprefix("http://").split(":")
    sent = 0
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(head)
        try:
            while sent < 64 << 20:
                conn.sendall(b"a" * 16384)
                sent += 16384
                if select.select([conn], [], [], 0)[0]:
                    break
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = read_answer(conn)
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    assert answer.endswith(b"Request head too large.")
    # The client's count includes what the kernel buffered on both sides (a few MiB
    # on loopback): far below the 64 MiB it would have streamed.
    assert sent < 16 << 20
    # A head that comes whole, in a read or two, is measured once complete.
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(
            b"POST /webhooks/gitlab HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: "
            + b"b" * 100_000
            + b"\r\nContent-Length: 2\r\n\r\n{}"
        )
        assert read_answer(conn).startswith(b"HTTP/1.1 431")
    # A head just under the bound is a request like any other.
    big_but_fine = {"X-Gitlab-Token": TOKENS[0], "X-Filler": "f" * 60_000}
    response = httpx.post(
        server.url + "/webhooks/gitlab",
        content=dumps(mr_event("open", labels=["frontend"])),
        headers={"X-Gitlab-Event": "Merge Request Hook", **big_but_fine},
    )
    assert response.status_code == 200, response.text


def test_unauthenticated_streamer_is_refused_before_the_body(server) -> None:
    head = (
        b"POST /webhooks/gitlab HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"X-Gitlab-Event: Merge Request Hook\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    answer, sent = stream(server.url, head, 1 << 30)
    assert answer.startswith(b"HTTP/1.1 401")
    assert sent < 64 << 20


def test_small_fuzz_campaign_gets_no_5xx_and_stores_nothing_rejected(
    database_url, tmp_path
) -> None:
    with live_server(database_url, tmp_path, fuzz_campaign.server_env()) as running:
        figures = fuzz_campaign.run_campaign(running.url, database_url, 2000, threads=3, seed=3)
        log = running.stderr()
    assert figures["requests_sent"] == 2000
    assert figures["5xx"] == 0, figures["first_5xx"]
    assert figures["rows_stored_by_rejected_requests"] == 0
    assert figures["recorded_answers"] > 0
    assert figures["healthz_ok"]
    assert figures["valid_delivery_recorded_after"]
    assert set(figures["answers_by_status"]) >= {"200", "400", "401", "413"}
    assert fuzz_campaign.secrets_in_log(log) == 0
    assert json.dumps(figures)  # printable as the benchmark prints it


def _partial(url: str, token: str) -> socket.socket:
    """A request that declares 100 bytes of body and sends 10: it holds its slot."""
    host, port = url.removeprefix("http://").split(":")
    conn = socket.create_connection((host, int(port)), timeout=30)
    conn.sendall(
        b"POST /webhooks/gitlab HTTP/1.1\r\nHost: x\r\nX-Gitlab-Event: Merge Request Hook\r\n"
        b"X-Gitlab-Token: " + token.encode() + b"\r\nContent-Length: 100\r\n\r\n0123456789"
    )
    return conn


def test_slow_bodies_are_cut_off_and_saturation_is_a_503_with_retry_after(
    database_url, tmp_path
) -> None:
    env = {
        "SECLEDGER_WEBHOOK_SECRETS": TOKENS[0],
        # Long enough for the next delivery to find the slot held on a loaded machine.
        "SECLEDGER_BODY_TIMEOUT_SECONDS": "3",
        "SECLEDGER_MAX_CONCURRENT_DELIVERIES": "1",
        "SECLEDGER_CONCURRENCY_WAIT_SECONDS": "0",
    }
    with live_server(database_url, tmp_path, env) as running:
        slow = _partial(running.url, TOKENS[0])
        try:
            time.sleep(0.5)  # for the server to read its head and take the slot
            # The slow request holds the only slot: the next one is refused at once.
            busy = deliver(running, dumps(mr_event("open")), **{"X-Gitlab-Token": TOKENS[0]})
            assert busy.status_code == 503
            assert busy.json()["error"] == "saturated"
            assert busy.headers["retry-after"] == "5"
            answer = read_answer(slow)  # the body timeout answers the slow sender
        finally:
            slow.close()
        assert answer.startswith(b"HTTP/1.1 408")
        assert b"the body was not received within 3 s" in answer
        body = dumps(mr_event("open", iid=801, labels=["sec::high"]))
        assert deliver(running, body, **{"X-Gitlab-Token": TOKENS[0]}).status_code == 200


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=30)


def _closed_by_peer(conn: socket.socket) -> bool:
    """Whether a readable socket was closed by the server: an end of stream, or a reset
    (a close with our blank lines still unread in its buffer sends one)."""
    try:
        return conn.recv(1) == b""
    except ConnectionResetError:
        return True


def test_silent_connections_neither_refuse_deliveries_nor_stay_open(database_url, tmp_path) -> None:
    """uvicorn's own limit counted open connections: about 500 that sent nothing made it
    answer every delivery 503 (GitLab disables a hook after four), and it closed none of
    them. The backstop counts requests in progress; a head must come within the body's
    time limit, or the connection is closed (with a 408 once the head has begun)."""
    env = {
        "SECLEDGER_WEBHOOK_SECRETS": TOKENS[0],
        "SECLEDGER_BODY_TIMEOUT_SECONDS": "2",
        "SECLEDGER_MAX_CONCURRENT_DELIVERIES": "16",  # the backstop: 64 requests
    }
    token = {"X-Gitlab-Token": TOKENS[0]}
    with live_server(database_url, tmp_path, env) as running:
        silent = [_connect(running.url) for _ in range(100)]
        begun = _connect(running.url)
        begun.sendall(b"POST /webhooks/gitlab HTTP/1.1\r\nHost: x\r\nX-Gitl")
        # One request, then blank lines that begin none: they cancel uvicorn's own timer.
        blank = _connect(running.url)
        blank.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_answer(blank).startswith(b"HTTP/1.1 200")
        try:
            body = dumps(mr_event("open", iid=811, labels=["sec::high"]))
            assert deliver(running, body, **token).json()["status"] == "recorded"
            started = time.monotonic()
            answer = read_answer(begun)
            assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
            assert answer.endswith(b"Request head not received in time.")
            assert silent[0].recv(1) == b""  # closed by the server, without a word
            assert silent[-1].recv(1) == b""
            assert time.monotonic() - started < 10
            closed = False
            for _ in range(20):
                try:
                    blank.sendall(b"\r\n")
                except OSError:
                    closed = True
                    break
                if select.select([blank], [], [], 0.5)[0] and _closed_by_peer(blank):
                    closed = True
                    break
            assert closed, "blank lines held the connection open"
            assert time.monotonic() - started < 15
        finally:
            for conn in (*silent, begun, blank):
                conn.close()
        # Requests in progress still meet the backstop at once.
        holding = [_partial(running.url, TOKENS[0]) for _ in range(64)]
        try:
            time.sleep(0.3)
            refused = deliver(running, dumps(mr_event("open", iid=812)), **token)
            assert refused.status_code == 503, refused.text
        finally:
            for conn in holding:
                conn.close()


def _unsigned_partial(url: str) -> socket.socket:
    """Well-formed signature headers over no real signature (anyone can send them), and
    100 bytes of body declared, 10 sent: the signature cannot be checked, the slot held."""
    host, port = url.removeprefix("http://").split(":")
    conn = socket.create_connection((host, int(port)), timeout=30)
    forged = f"webhook-signature: v1,{'A' * 43}=\r\n".encode()
    conn.sendall(
        b"POST /webhooks/gitlab HTTP/1.1\r\nHost: x\r\nX-Gitlab-Event: Merge Request Hook\r\n"
        + f"webhook-id: {uuid.uuid4()}\r\nwebhook-timestamp: {int(time.time())}\r\n".encode()
        + forged
        + b"Content-Length: 100\r\n\r\n0123456789"
    )
    return conn


def test_requests_with_unchecked_signatures_cannot_take_the_places_of_token_deliveries(
    database_url, tmp_path
) -> None:
    """Signature headers prove nothing until the body is read: such requests share a
    quarter of the limits, so a sender without any secret cannot get a token-carrying
    GitLab delivery refused 503 (and the hook disabled after four)."""
    env = {
        "SECLEDGER_WEBHOOK_SECRETS": TOKENS[0],
        "SECLEDGER_WEBHOOK_SIGNING_SECRETS": SIGNING_SECRET,
        "SECLEDGER_BODY_TIMEOUT_SECONDS": "5",
        "SECLEDGER_MAX_CONCURRENT_DELIVERIES": "4",
        "SECLEDGER_CONCURRENCY_WAIT_SECONDS": "0",
    }
    with live_server(database_url, tmp_path, env) as running:
        forged = [_unsigned_partial(running.url) for _ in range(4)]
        try:
            time.sleep(0.5)  # all four are in (or refused) before the genuine ones come
            body = dumps(mr_event("open", iid=802, labels=["sec::high"]))
            answer = deliver(running, body, **{"X-Gitlab-Token": TOKENS[0]})
            # GitLab with both a secret and a signing token sends both: the token proves
            # it before the body, though the signature is still checked after.
            signed_too = dumps(mr_event("open", iid=803, labels=["sec::high"]))
            both = signed_headers(signed_too, f"msg-{uuid.uuid4()}") | {"X-Gitlab-Token": TOKENS[0]}
            answer_both = deliver(running, signed_too, **both)
            refused = [read_answer(conn) for conn in forged[1:]]  # the pool holds one
        finally:
            for conn in forged:
                conn.close()
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "recorded"
    assert answer_both.status_code == 200, answer_both.text
    assert answer_both.json()["status"] == "recorded"
    assert all(a.startswith(b"HTTP/1.1 503") and b'"saturated"' in a for a in refused), refused
