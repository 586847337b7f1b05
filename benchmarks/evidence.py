"""Time the evidence pack on a generated history (see benchmarks/history.py).

    python benchmarks/history.py URL --rows 1000000   # once
    python benchmarks/evidence.py URL

Without URL the embedded server under /tmp/secledger-bench is started (database
``bench1m``); an empty database is first filled with ``--rows`` log rows. The schema is
brought to head first. Each pack is built once (the chain walk alone reads every log
row): for the last full month and the last twelve full months before the newest
decision. Prints the wall time of the whole pack and of its phases (snapshot files:
population, trails, findings, SLA, sample; chain verification; README and manifest),
the counts, and the pack's size on disk.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import history  # the sibling module: benchmarks/ is on sys.path when run as a script
from sqlalchemy import Engine, text

from secledger import embedded, evidence
from secledger.store import db, migrate

DATABASE = "bench1m"
_LATEST = text(
    "SELECT max(CASE state WHEN 'merged' THEN merged_at ELSE closed_at END)"
    " FROM security_review_ledger WHERE state IN ('merged', 'closed')"
)


class Phases:
    """A tracker that notes when each phase starts (the pack's own progress tasks)."""

    def __init__(self) -> None:
        self.started: list[tuple[str, float]] = []

    def task(self, description: str, total: int | None) -> Callable[[int], None]:
        self.started.append((description, time.perf_counter()))
        return lambda _count: None


def month_start(value: datetime, months_back: int) -> datetime:
    index = value.year * 12 + value.month - 1 - months_back
    return datetime(index // 12, index % 12 + 1, 1, tzinfo=UTC)


def ready(url: str, rows: int) -> Engine:
    """The engine on a migrated database holding a history (generated when empty)."""
    engine = db.create(url, pool_size=2)
    with engine.connect() as conn:
        revision = migrate.current_revision(conn)
    if revision != migrate.head_revision():
        print(f"schema at {revision}: upgrading to {migrate.head_revision()}")
        migrate.upgrade(engine)
    with engine.connect() as conn:
        count = conn.execute(text("SELECT count(*) FROM delivery_log")).scalar_one()
        if conn.execute(text("SELECT to_regclass('checkpoints')")).scalar() is None:
            raise SystemExit("this database skipped a migration (no checkpoints table)")
    if count == 0:
        print(f"empty database: generating {rows} log rows (benchmarks/history.py)")
        print(history.generate(url, rows))
    return engine


def run(engine: Engine, label: str, options: evidence.Options) -> None:
    out = Path(tempfile.mkdtemp(prefix="secledger-evidence-bench-"))
    phases = Phases()
    started = time.perf_counter()
    pack = evidence.build(engine, options, out, tracker=phases)
    ended = time.perf_counter()
    marks = dict(phases.started)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    shutil.rmtree(out)
    snapshot = marks["verify chain"] - started
    chain = marks["manifest"] - marks["verify chain"]
    print(
        f"{label:<8} {options.since:%Y-%m-%d}..{options.until:%Y-%m-%d}"
        f"  total {ended - started:6.1f} s  (files {snapshot:5.1f} s, verify {chain:5.1f} s,"
        f" manifest {ended - marks['manifest']:4.1f} s)  {pack.population:>6} MRs"
        f"  {pack.events:>7} events  {pack.findings:>6} findings  {len(pack.sample)} sampled"
        f"  {size / 1e6:6.1f} MB  chain {'OK' if pack.chain_ok else 'BROKEN'}"
        f" ({pack.chain.get('rows')} rows)"
    )


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", nargs="?", help="PostgreSQL URL of a generated history")
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows to generate if empty")
    args = parser.parse_args(argv)
    url = args.url or embedded.start(Path("/tmp/secledger-bench/pg"), database=DATABASE)
    engine = ready(url, args.rows)
    with engine.connect() as conn:
        log_rows = conn.execute(text("SELECT count(*) FROM delivery_log")).scalar_one()
        mrs = conn.execute(text("SELECT count(*) FROM security_review_ledger")).scalar_one()
        latest = conn.execute(_LATEST).scalar_one()
    print(f"history: {log_rows} log rows, {mrs} merge requests, newest decision {latest:%Y-%m-%d}")
    until = month_start(latest, 0)
    for label, months in (("month", 1), ("year", 12)):
        options = evidence.Options(since=month_start(latest, months), until=until, seed=1)
        run(engine, label, options)
    engine.dispose()


if __name__ == "__main__":
    main(sys.argv[1:])
