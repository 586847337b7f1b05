"""Downstream emit figures: outbox cost on the recording path, watch catch-up, sink drain.

Usage: python benchmarks/downstream.py [--rows N]
Uses SECLEDGER_DATABASE_URL's server (a scratch database is created and dropped) or an
embedded server in a temporary directory. Prints figures; asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import orjson
import psycopg
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url

from secledger import embedded, logs
from secledger.extract import extract_facts
from secledger.intake import Delivery, parse_delivery
from secledger.policy import LabelPolicy
from secledger.service import ledger_json, record
from secledger.sink import Sender, SinkConfig
from secledger.store import db, migrate, outbox
from secledger.store.log import Chain
from secledger.times import utcnow
from secledger.watch import StateFile, Watcher

POLICY = LabelPolicy()
BASE = json.loads(
    (Path(__file__).resolve().parents[1] / "tests/payloads/webhook_events_mr_open.json").read_text()
)
BATCH = 100  # like the receiver's group commit


def delivery(n: int, iid: int) -> Delivery:
    body = json.loads(json.dumps(BASE))
    body["object_attributes"].update(iid=iid, id=100000 + iid, action="update")
    body["object_attributes"]["updated_at"] = f"2025-08-06 10:00:{n % 60:02d} UTC"
    body["labels"] = [{"title": "sec::high"}]
    body["changes"] = {}
    body["bench_n"] = n  # a distinct body, so a distinct dedup key
    parsed = parse_delivery(
        {"x-gitlab-event": "Merge Request Hook"},
        json.dumps(body).encode(),
        secrets=(),
        max_body_bytes=10**7,
        received_at=utcnow(),
        require_token=False,
        source="replay",
    )
    assert isinstance(parsed, Delivery)
    return parsed


def record_rows(engine: Engine, start: int, count: int, *, emit: bool, mrs: int) -> float:
    # Each phase gets its own 500 merge requests, so the folds cost the same in each.
    items = [delivery(start + i, iid=mrs + i % 500) for i in range(count)]
    facts = [extract_facts(item, POLICY) for item in items]
    began = time.perf_counter()
    for offset in range(0, count, BATCH):
        with engine.begin() as conn:
            chain = Chain.open(conn)
            for item, fact in zip(
                items[offset : offset + BATCH], facts[offset : offset + BATCH], strict=True
            ):
                record(conn, chain, item, fact, emit=emit)
    return time.perf_counter() - began


def insert_cost(engine: Engine, seqs: range) -> float:
    """Seconds per outbox INSERT alone, for log rows that have none (rolled back)."""
    with engine.connect() as conn:
        transaction = conn.begin()
        bodies = conn.execute(
            text("SELECT seq, hash FROM delivery_log WHERE seq BETWEEN :a AND :b ORDER BY seq"),
            {"a": seqs.start, "b": seqs.stop - 1},
        ).all()
        row = conn.execute(text("SELECT * FROM security_review_ledger LIMIT 1")).mappings().one()
        body = orjson.dumps({"seq": 0, "ledger": ledger_json(row)}).decode()
        began = time.perf_counter()
        for seq, digest in bodies:
            outbox.add(conn, seq, bytes(digest).hex(), body)
        elapsed = time.perf_counter() - began
        transaction.rollback()
    return elapsed / len(bodies)


def watch_catch_up(engine: Engine, url: str, state: StateFile | None) -> tuple[float, int]:
    out = io.StringIO()
    watcher = Watcher(engine, db.libpq_url(url), out, 0, threading.Event(), state)
    began = time.perf_counter()
    watcher.catch_up()
    return time.perf_counter() - began, watcher.emitted


class Sink(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as a real receiver would

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(204)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *_args: object) -> None:
        return


def drain(engine: Engine) -> tuple[float, int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    config = SinkConfig(
        url=f"http://127.0.0.1:{server.server_address[1]}/",
        token_header="X-Secledger-Token",
        token=None,
        timeout=5,
        max_attempts=3,
        backoff=0.01,
        backoff_max=0.1,
    )
    sender = Sender(engine, config)
    began = time.perf_counter()
    result = sender.drain()
    elapsed = time.perf_counter() - began
    sender.close()
    server.shutdown()
    return elapsed, result.delivered


def scratch_database(workdir: Path) -> tuple[str, str]:
    given = os.environ.get("SECLEDGER_DATABASE_URL")
    server = db.libpq_url(given) if given else embedded.start(workdir / "pg", "postgres")
    name = f"secledger_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return server, make_url(server).set(database=name).render_as_string(hide_password=False)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=5000)
    rows = parser.parse_args().rows
    logs.configure("warning")
    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o755)  # the embedded server runs as its own user when we are root
        server, url = scratch_database(Path(tmp))
        engine = db.create(url, pool_size=2)
        try:
            migrate.upgrade(engine)
            record_rows(engine, 10**6, 500, emit=True, mrs=5000)  # warm-up, not measured
            plain = record_rows(engine, 0, rows, emit=False, mrs=1)
            emitted = record_rows(engine, rows, rows, emit=True, mrs=1000)
            print(
                f"record, no sink:   {rows / plain:8.0f} deliveries/s ({plain / rows * 1e6:.0f} us)"
            )
            print(
                f"record, with sink: {rows / emitted:8.0f} deliveries/s"
                f" ({emitted / rows * 1e6:.0f} us; outbox INSERT adds"
                f" {(emitted - plain) / rows * 1e6:.0f} us)"
            )
            per_insert = insert_cost(engine, range(501, 501 + rows))
            print(f"outbox INSERT alone:   {per_insert * 1e6:8.0f} us per recording")
            seconds, lines = watch_catch_up(engine, url, None)
            print(f"watch catch-up, no state file: {lines / seconds:8.0f} lines/s ({lines} lines)")
            state = StateFile(Path(tmp) / "watch.state")
            seconds, lines = watch_catch_up(engine, url, state)
            print(f"watch catch-up, state file:    {lines / seconds:8.0f} lines/s (fsync per line)")
            seconds, sent = drain(engine)
            print(f"sink drain to 127.0.0.1:       {sent / seconds:8.0f} rows/s ({sent} rows)")
        finally:
            engine.dispose()
            with psycopg.connect(server, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)')


if __name__ == "__main__":
    main()
