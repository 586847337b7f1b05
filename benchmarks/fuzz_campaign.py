"""Fuzz campaign: many malformed or adversarial requests against a real `secledger serve`.

Starts an embedded PostgreSQL in a temporary directory and `secledger serve` on
127.0.0.1 (a free port), sends generated requests from a few threads, then prints:
requests sent, answers by status, 5xx count (must be 0), rows stored by rejected
requests (must be 0), secrets found in the server's log (must be 0), and whether the
server is still healthy (/healthz, and a valid delivery still recorded).

    .venv/bin/python benchmarks/fuzz_campaign.py --requests 100000 --max-seconds 900
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from builders import mr_event  # noqa: E402
from live import SIGNING_SECRET, live_server, signed_headers  # noqa: E402
from secledger import embedded  # noqa: E402

TOKEN = "fuzz-campaign-token-9d1c"
MAX_BODY = 64 * 1024
HOSTILE = [
    "\x00",
    "\u202e",
    "\u200f",
    '"',
    "'",
    "\\",
    "\x1b[31m",
    "[/]",
    "%s%n",
    "' OR 1=1 --",
    "🦀",
    "\r\n",
    "\x7f",
    "\ufeff",
]
EVENTS = ["Merge Request Hook", "System Hook", "Push Hook", "", "merge request hook", "\x01"]


@dataclass
class Request:
    kind: str
    method: str = "POST"
    path: str = "/webhooks/gitlab"
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    raw: bytes | None = None  # sent as-is over a fresh socket
    records: bool = False  # a new security delivery that should be stored


@dataclass
class Tally:
    statuses: Counter[str] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)
    recorded: int = 0
    sent: int = 0
    unexpected: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, request: Request, status: str, body: bytes) -> None:
        with self.lock:
            self.sent += 1
            self.statuses[status] += 1
            self.kinds[request.kind] += 1
            if status == "200" and b'"status":"recorded"' in body:
                self.recorded += 1
            if status.startswith("5") and len(self.unexpected) < 20:
                self.unexpected.append(f"{request.kind}: {status} {body[:200]!r}")


def hostile_text(rng: random.Random, size: int = 12) -> str:
    parts = [rng.choice(HOSTILE) if rng.random() < 0.4 else chr(rng.randint(32, 0x2FFF))]
    parts += [
        rng.choice(HOSTILE) if rng.random() < 0.3 else chr(rng.randint(0, 0x10FFFF) % 0xD7FF)
        for _ in range(rng.randint(0, size))
    ]
    return "".join(parts)


def random_json(rng: random.Random, depth: int = 0) -> Any:
    roll = rng.random()
    if depth > 3 or roll < 0.5:
        return rng.choice(
            [
                None,
                True,
                rng.randint(-(2**63), 2**64 - 1),
                rng.random() * 1e300,
                hostile_text(rng),
                "2025-08-05 21:48:25 UTC",
                "0001-01-01T00:00:00+05:00",
            ]
        )
    if roll < 0.75:
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {hostile_text(rng, 4): random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def base_headers(token: str | None = TOKEN, event: str = "Merge Request Hook") -> dict[str, str]:
    headers = {"Content-Type": "application/json", "X-Gitlab-Event": event}
    if token is not None:
        headers["X-Gitlab-Token"] = token
    return headers


class Generator:
    """Deterministic (seeded) adversarial requests."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.iid = 10_000
        self.lock = threading.Lock()
        self.replayable: list[Request] = []
        self.kinds = [
            (self.no_token, 8),
            (self.wrong_token, 8),
            (self.random_bytes, 10),
            (self.mutated_bytes, 12),
            (self.mutated_fields, 16),
            (self.hostile_security_mr, 5),
            (self.bad_signature, 8),
            (self.stale_signature, 4),
            (self.replayed_signature, 3),
            (self.signed_for_other_instance, 2),
            (self.oversized, 2),
            (self.deep_nesting, 3),
            (self.wrong_method_or_path, 4),
            (self.non_mr_event, 6),
            (self.garbage_http, 3),
            (self.huge_header, 2),
            (self.bad_headers, 4),
        ]
        self.weights = [w for _, w in self.kinds]

    def next(self) -> Request:
        with self.lock:
            make = self.rng.choices([k for k, _ in self.kinds], self.weights)[0]
            return make()

    def _valid(self, labels: list[str] | None = None) -> dict[str, Any]:
        self.iid += 1
        return mr_event("open", iid=self.iid, labels=labels or ["sec::high"])

    def no_token(self) -> Request:
        return Request(
            "no_token", headers=base_headers(None), body=json.dumps(self._valid()).encode()
        )

    def wrong_token(self) -> Request:
        token = self.rng.choice([TOKEN[:-1], TOKEN + "x", "", TOKEN.upper(), "\u00e9" * 40])
        headers = base_headers(token.encode("utf-8").decode("latin-1"))
        return Request("wrong_token", headers=headers, body=json.dumps(self._valid()).encode())

    def random_bytes(self) -> Request:
        body = self.rng.randbytes(self.rng.randint(0, 2048))
        return Request("random_bytes", headers=base_headers(), body=body)

    def mutated_bytes(self) -> Request:
        body = bytearray(json.dumps(self._valid()).encode())
        for _ in range(self.rng.randint(1, 8)):
            op = self.rng.random()
            pos = self.rng.randrange(len(body))
            if op < 0.4:
                body[pos] = self.rng.randrange(256)
            elif op < 0.7:
                del body[pos : pos + self.rng.randint(1, 20)]
            else:
                body[pos:pos] = self.rng.randbytes(self.rng.randint(1, 10))
        return Request("mutated_bytes", headers=base_headers(), body=bytes(body))

    def mutated_fields(self) -> Request:
        payload = self._valid()
        targets = [payload, payload["object_attributes"], payload["project"], payload["user"]]
        for _ in range(self.rng.randint(1, 5)):
            target = self.rng.choice(targets)
            key = self.rng.choice([*target.keys(), hostile_text(self.rng, 3)])
            target[key] = random_json(self.rng)
        body = json.dumps(payload).encode()
        return Request("mutated_fields", headers=base_headers(), body=body)

    def hostile_security_mr(self) -> Request:
        labels = ["sec::high", *(hostile_text(self.rng) for _ in range(self.rng.randint(1, 5)))]
        payload = self._valid(labels)
        payload["object_attributes"]["title"] = hostile_text(self.rng, self.rng.choice([20, 5000]))
        payload["user"]["username"] = hostile_text(self.rng)
        body = json.dumps(payload).encode()
        return Request("hostile_security_mr", headers=base_headers(), body=body, records=True)

    def _signed(self, kind: str, **overrides: Any) -> Request:
        body = json.dumps(self._valid()).encode()
        headers = base_headers(None) | signed_headers(body, f"msg_{self.iid}", **overrides)
        return Request(kind, headers=headers, body=body)

    def bad_signature(self) -> Request:
        request = self._signed("bad_signature")
        choice = self.rng.random()
        if choice < 0.3:
            request.body += b" "
        elif choice < 0.5:
            request.headers["webhook-signature"] = "v1," + "A" * self.rng.randint(0, 60)
        elif choice < 0.7:
            request.headers["webhook-signature"] = " ".join(["v1,x"] * self.rng.randint(1, 40))
        elif choice < 0.85:
            request.headers["webhook-id"] = hostile_text(self.rng).encode().decode("latin-1")[:300]
        else:
            request.headers["webhook-timestamp"] = self.rng.choice(["", "-1", "1e9", "9" * 30])
        return request

    def stale_signature(self) -> Request:
        offset = self.rng.choice([-1, 1]) * self.rng.randint(301, 10**8)
        return self._signed("stale_signature", timestamp=int(time.time()) + offset)

    def replayed_signature(self) -> Request:
        if self.replayable and self.rng.random() < 0.7:
            original = self.rng.choice(self.replayable)
            headers = dict(original.headers) | {"Idempotency-Key": f"new-{self.rng.random()}"}
            return Request("replayed_signature", headers=headers, body=original.body)
        request = self._signed("signed_valid")
        request.records = True
        self.replayable = [*self.replayable[-50:], request]
        return request

    def signed_for_other_instance(self) -> Request:
        request = self._signed("other_instance", key=bytes(32))
        request.headers["X-Gitlab-Instance"] = "https://other.example.org"
        return request

    def oversized(self) -> Request:
        body = b'{"object_kind":"merge_request","x":"' + b"A" * (MAX_BODY + 10) + b'"}'
        return Request("oversized", headers=base_headers(), body=body)

    def deep_nesting(self) -> Request:
        depth = self.rng.choice([100, 1023, 1025, 5000])
        body = b'{"object_kind":"merge_request","a":' + b"[" * depth + b"]" * depth + b"}"
        return Request("deep_nesting", headers=base_headers(), body=body)

    def wrong_method_or_path(self) -> Request:
        method = self.rng.choice(["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "POST"])
        path = self.rng.choice(["/webhooks/gitlab", "/webhooks/gitlab/", "/x", "/%00", "/docs"])
        return Request("wrong_method_or_path", method=method, path=path, headers=base_headers())

    def non_mr_event(self) -> Request:
        event = self.rng.choice(EVENTS)
        body = json.dumps(random_json(self.rng)).encode()
        return Request("non_mr_event", headers=base_headers(event=event), body=body)

    def garbage_http(self) -> Request:
        raw = self.rng.choice(
            [
                self.rng.randbytes(self.rng.randint(1, 300)),
                b"POST /webhooks/gitlab HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
                b"POST /webhooks/gitlab HTTP/1.1\r\nHost: x\r\nX-Gitlab-Token: a\x00b\r\n\r\n",
                b"POST /webhooks/gitlab HTTP/1.1\r\nHost: x\r\n"
                b"Transfer-Encoding: chunked\r\n\r\nzz\r\n",
                b"POST /webhooks/gitlab HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\n",
                b"GET / HTTP/9.9\r\n\r\n",
            ]
        )
        return Request("garbage_http", raw=raw)

    def huge_header(self) -> Request:
        headers = base_headers() | {"X-Junk": "j" * self.rng.choice([8_000, 70_000])}
        return Request("huge_header", headers=headers, body=b"{}")

    def bad_headers(self) -> Request:
        headers = base_headers() | {
            "X-Gitlab-Instance": hostile_text(self.rng).encode().decode("latin-1"),
            "Idempotency-Key": hostile_text(self.rng, 600).encode().decode("latin-1"),
            "Content-Type": self.rng.choice(["text/plain", "", "application/json; charset=ebcdic"]),
        }
        body = json.dumps(self._valid()).encode()
        return Request("bad_headers", headers=headers, body=body)


def send_raw(host: str, port: int, raw: bytes) -> tuple[str, bytes]:
    with socket.create_connection((host, port), timeout=10) as conn:
        try:
            conn.sendall(raw)
            conn.shutdown(socket.SHUT_WR)
            data = conn.recv(4096)
        except OSError:
            return "closed", b""
    if data.startswith(b"HTTP/1.1 "):
        return data[9:12].decode(), data
    return "closed", data


def worker(url: str, gen: Generator, tally: Tally, count: int, deadline: float) -> None:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    for _ in range(count):
        if time.monotonic() > deadline:
            return
        request = gen.next()
        if request.raw is not None:
            status, body = send_raw(host, int(port), request.raw)
            tally.add(request, status, body)
            continue
        try:
            conn.putrequest(request.method, request.path, skip_accept_encoding=True)
            for name, value in request.headers.items():
                # CR/LF would split the header (that case is in garbage_http).
                clean = value.replace("\r", " ").replace("\n", " ")
                conn.putheader(name, clean.encode("latin-1", "replace"))
            conn.putheader("Content-Length", str(len(request.body)))
            conn.endheaders(request.body)
            response = conn.getresponse()
            body = response.read()
            tally.add(request, str(response.status), body)
            if response.will_close:
                conn.close()
        except (OSError, http.client.HTTPException):
            tally.add(request, "closed", b"")
            conn.close()
            conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.close()


def count_rows(database_url: str) -> int:
    with psycopg.connect(database_url) as conn:
        return int(conn.execute("SELECT count(*) FROM delivery_log").fetchone()[0])


def still_healthy(url: str, database_url: str) -> tuple[bool, bool]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("GET", "/healthz")
    healthy = conn.getresponse().read() == b'{"status":"ok"}'
    before = count_rows(database_url)
    body = json.dumps(mr_event("open", iid=9_999_999, labels=["sec::critical"])).encode()
    conn.request("POST", "/webhooks/gitlab", body=body, headers=base_headers())
    answer = json.loads(conn.getresponse().read())
    conn.close()
    return healthy, answer.get("status") == "recorded" and count_rows(database_url) == before + 1


def run_campaign(
    url: str,
    database_url: str,
    requests: int,
    *,
    threads: int = 4,
    seed: int = 8,
    max_seconds: float = 900,
) -> dict[str, Any]:
    """Send ``requests`` generated requests; the figures as a dict."""
    gen = Generator(seed)
    tally = Tally()
    rows_before = count_rows(database_url)
    deadline = time.monotonic() + max_seconds
    started = time.monotonic()
    per_thread = [requests // threads + (i < requests % threads) for i in range(threads)]
    pool = [
        threading.Thread(target=worker, args=(url, gen, tally, n, deadline)) for n in per_thread
    ]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    elapsed = time.monotonic() - started
    rows = count_rows(database_url) - rows_before
    healthy, valid_recorded = still_healthy(url, database_url)
    return {
        "requests_sent": tally.sent,
        "seconds": round(elapsed, 1),
        "answers_by_status": dict(sorted(tally.statuses.items())),
        "requests_by_kind": dict(sorted(tally.kinds.items())),
        "5xx": sum(n for s, n in tally.statuses.items() if s.startswith("5")),
        "recorded_answers": tally.recorded,
        "rows_stored": rows,
        "rows_stored_by_rejected_requests": rows - tally.recorded,
        "healthz_ok": healthy,
        "valid_delivery_recorded_after": valid_recorded,
        "first_5xx": tally.unexpected,
    }


def server_env() -> dict[str, str]:
    return {
        "SECLEDGER_WEBHOOK_SECRETS": TOKEN,
        "SECLEDGER_WEBHOOK_SIGNING_SECRETS": SIGNING_SECRET,
        "SECLEDGER_MAX_BODY_BYTES": str(MAX_BODY),
        "SECLEDGER_LOG_LEVEL": "info",
    }


def secrets_in_log(log: str) -> int:
    return sum(log.count(s) for s in (TOKEN, SIGNING_SECRET, SIGNING_SECRET[6:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--seed", type=int, default=8)
    parser.add_argument("--max-seconds", type=float, default=900)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="secledger-fuzz-") as tmp:
        database_url = embedded.start(Path(tmp) / "pg")
        with live_server(database_url, Path(tmp), server_env()) as server:
            figures = run_campaign(
                server.url,
                database_url,
                args.requests,
                threads=args.threads,
                seed=args.seed,
                max_seconds=args.max_seconds,
            )
            figures["secrets_in_server_log"] = secrets_in_log(server.stderr())
            figures["server_log_lines"] = server.stderr().count("\n")
    print(json.dumps(figures, indent=2))
    ok = (
        figures["5xx"] == 0
        and figures["rows_stored_by_rejected_requests"] == 0
        and figures["healthz_ok"]
        and figures["valid_delivery_recorded_after"]
        and figures["secrets_in_server_log"] == 0
        and figures["requests_sent"] >= args.requests
    )
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
