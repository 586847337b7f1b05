"""What the hash chain costs: write rate with and without it, and verify time for many rows.

Usage:
  python benchmarks/chain.py          # embedded PostgreSQL in /tmp/secledger-bench-chain
  python benchmarks/chain.py --rows 1000000 --deliveries 4000
  SECLEDGER_BENCH_DATABASE_URL=postgresql://postgres@localhost/postgres python benchmarks/chain.py

Write rate: the same batched recording path the writer thread uses (128 deliveries per
transaction), once with ``Chain`` (advisory lock, head read, SHA-256 of the canonical
bytes) and once with a stand-in that inserts the same rows with a counter for seq and
zero hashes. Measured for the log append alone and for the full record (log + facts +
ledger projection), single writer, fresh database each.

Verify: N log rows with correct hashes are generated in Python and loaded with COPY,
then ``secledger.store.verify.verify`` walks them (server-side cursor, one snapshot).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
from sqlalchemy import Connection
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from secledger import embedded  # noqa: E402
from secledger.config import Settings  # noqa: E402
from secledger.extract import EventFacts, extract_facts  # noqa: E402
from secledger.intake import Delivery, parse_delivery  # noqa: E402
from secledger.policy import LabelPolicy  # noqa: E402
from secledger.service import record  # noqa: E402
from secledger.store import db, migrate  # noqa: E402
from secledger.store.chain import GENESIS, LogRow, link  # noqa: E402
from secledger.store.log import Chain, Logged, headers_text  # noqa: E402
from secledger.store.verify import verify  # noqa: E402

SAMPLE = ROOT / "tests" / "payloads" / "webhook_events_mr_open.json"
BATCH = 128


class PlainLog(Chain):
    """The same rows and INSERT with no lock, no head read and no hashing: the baseline."""

    next_seq = 0

    @classmethod
    def open(cls, conn: Connection) -> Chain:
        """Start from an in-memory counter kept across batches."""
        return cls(PlainLog.next_seq, GENESIS)

    def extend(
        self, deliveries: Sequence[Delivery], logged: Logged
    ) -> tuple[list[int | None], list[dict[str, object]]]:
        """Counter seqs and zero hashes instead of chaining (dedup stays the same)."""
        rows: list[dict[str, object]] = []
        seqs: list[int | None] = []
        for delivery in deliveries:
            if logged.first(delivery) is not None:
                seqs.append(None)
                continue
            PlainLog.next_seq += 1
            rows.append(
                {
                    "seq": PlainLog.next_seq,
                    "received_at": delivery.received_at,
                    "source": delivery.source,
                    "event": delivery.event,
                    "instance": delivery.instance,
                    "dedup_key": delivery.dedup_key,
                    "headers": headers_text(delivery.headers),
                    "payload": delivery.body,
                    "prev_hash": GENESIS,
                    "hash": GENESIS,
                    "body_sha256": delivery.body_sha256,
                }
            )
            logged.add(delivery, PlainLog.next_seq)
            self.seq = PlainLog.next_seq
            self.appended[PlainLog.next_seq] = GENESIS
            seqs.append(PlainLog.next_seq)
        return seqs, rows


def server_url(args: argparse.Namespace) -> str:
    given = os.environ.get("SECLEDGER_BENCH_DATABASE_URL")
    if given:
        return db.libpq_url(given)
    return embedded.start(Path(args.data_dir) / "pg", database="postgres")


def fresh_database(admin: str) -> str:
    name = f"secledger_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_url(admin).set(database=name).render_as_string(hide_password=False)
    engine = db.create(url, pool_size=1)
    migrate.upgrade(engine)
    engine.dispose()
    return url


def drop_database(admin: str, url: str) -> None:
    name = make_url(url).database
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def sample_payload(iid: int) -> bytes:
    body = json.loads(SAMPLE.read_text())
    body["object_attributes"].update(iid=iid, id=100000 + iid, action="open")
    body["labels"] = [{"title": "sec::high", "id": 1}]
    return json.dumps(body, separators=(",", ":")).encode()


def deliveries(count: int, policy: LabelPolicy) -> list[tuple[Delivery, EventFacts]]:
    now = datetime.now(UTC)
    made = []
    for index in range(count):
        delivery = parse_delivery(
            {"x-gitlab-event": "Merge Request Hook", "idempotency-key": f"bench-{index}"},
            sample_payload(index + 1),
            secrets=(),
            max_body_bytes=1 << 22,
            received_at=now,
            require_token=False,
        )
        assert isinstance(delivery, Delivery)
        made.append((delivery, extract_facts(delivery, policy)))
    return made


def write_rate(admin: str, items: list, chain_cls: type[Chain], full: bool) -> float:
    url = fresh_database(admin)
    engine = db.create(url, pool_size=1)
    PlainLog.next_seq = 0
    try:
        started = time.perf_counter()
        for start in range(0, len(items), BATCH):
            with engine.begin() as conn:
                chain = chain_cls.open(conn)
                for delivery, facts in items[start : start + BATCH]:
                    if full:
                        record(conn, chain, delivery, facts)
                    else:
                        chain.append(conn, delivery)
        return len(items) / (time.perf_counter() - started)
    finally:
        engine.dispose()
        drop_database(admin, url)


def load_rows(url: str, rows: int) -> float:
    """Generate ``rows`` correctly chained log rows and COPY them in; seconds taken."""
    started = time.perf_counter()
    base = datetime(2026, 1, 1, tzinfo=UTC)
    template = sample_payload(1)
    headers = headers_text({"x-gitlab-event": "Merge Request Hook"})
    prev = GENESIS
    columns = (
        "seq, received_at, source, event, instance, dedup_key, headers, payload, prev_hash, hash"
    )
    with psycopg.connect(url) as conn, conn.cursor() as cur:
        with cur.copy(f"COPY delivery_log ({columns}) FROM STDIN") as copy:
            for seq in range(1, rows + 1):
                payload = template.replace(b'"iid":1,', b'"iid":%d,' % seq, 1)
                row = LogRow(
                    seq,
                    base + timedelta(milliseconds=seq),
                    "webhook",
                    "Merge Request Hook",
                    "https://gitlab.example.com",
                    f"idem:bench-{seq}",
                    headers,
                    payload,
                )
                digest = link(prev, row)
                copy.write_row(
                    (*(getattr(row, f) for f in LogRow.__dataclass_fields__), prev, digest)
                )
                prev = digest
        conn.commit()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="log rows for verify")
    parser.add_argument("--deliveries", type=int, default=4000, help="deliveries per write run")
    parser.add_argument(
        "--data-dir", default="/tmp/secledger-bench-chain", help="embedded server dir"
    )
    parser.add_argument("--skip-write", action="store_true")
    parser.add_argument("--skip-verify", action="store_true")
    args = parser.parse_args()
    admin = server_url(args)
    policy = LabelPolicy.from_settings(Settings())
    print(f"cpus: {os.cpu_count()}, payload: {len(sample_payload(1))} bytes")
    if not args.skip_write:
        items = deliveries(args.deliveries, policy)
        for label, full in (("log append only", False), ("full record path", True)):
            chained = write_rate(admin, items, Chain, full)
            plain = write_rate(admin, items, PlainLog, full)
            print(
                f"write rate, {label}: chained {chained:,.0f}/s, unchained {plain:,.0f}/s,"
                f" chained/unchained = {chained / plain:.2f}"
            )
    if not args.skip_verify:
        url = fresh_database(admin)
        try:
            loaded = load_rows(url, args.rows)
            print(f"generated and loaded {args.rows:,} chained rows in {loaded:.1f} s")
            summary = verify(db.create(url, pool_size=1))
            print(
                f"verify: {summary.rows:,} rows in {summary.seconds:.1f} s"
                f" ({summary.rows / summary.seconds:,.0f} rows/s), head {summary.head_hash.hex()}"
            )
        finally:
            drop_database(admin, url)


if __name__ == "__main__":
    main()
