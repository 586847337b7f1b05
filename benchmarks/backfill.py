"""Backfill throughput, in merge requests per second, against a local fake GitLab API.

Every API request waits 30-80 ms, like a real GitLab across a network. The database is
the embedded PostgreSQL (or SECLEDGER_BENCH_DATABASE_URL). Run once: it prints figures.

    .venv/bin/python benchmarks/backfill.py [--mrs 200] [--workers 1 4 8]
    .venv/bin/python benchmarks/backfill.py --label-history --plain 800

With --label-history, ``--plain`` MRs that never carried a security label are added and
the run also reads the label events of every MR the label filter did not return.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import psycopg
from pydantic import SecretStr
from sqlalchemy import text
from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from apistory import Story
from fakegitlab import TOKEN, FakeGitLab
from secledger import embedded
from secledger.backfill import Backfill, Period
from secledger.config import Settings
from secledger.gitlab_api import GitLabAPI, Scope
from secledger.policy import LabelPolicy
from secledger.store import db, migrate


def fresh_database(server: str) -> str:
    name = f"secledger_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return make_url(server).set(database=name).render_as_string(hide_password=False)


def run(
    server: str, fake: FakeGitLab, workers: int, *, label_history: bool = False
) -> tuple[int, int, float, int]:
    url = fresh_database(server)
    engine = db.create(url, pool_size=2)
    migrate.upgrade(engine)
    settings = Settings(
        database_url=SecretStr(url), gitlab_url=fake.url, gitlab_token=SecretStr(TOKEN)
    )
    api = GitLabAPI.from_settings(settings)
    requests_before = len(fake.seen)
    job = Backfill(
        engine,
        api,
        LabelPolicy(),
        [Scope("groups", "acme")],
        Period(datetime(2025, 8, 1, tzinfo=UTC)),
        workers=workers,
        label_history=label_history,
    )
    started = time.perf_counter()
    result = job.run()
    elapsed = time.perf_counter() - started
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT count(*) FROM security_review_ledger")).scalar_one()
    engine.dispose()
    return result.recorded_mrs, int(rows), elapsed, len(fake.seen) - requests_before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mrs", type=int, default=200)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--plain", type=int, default=0, help="MRs without a security label")
    parser.add_argument(
        "--label-history", action="store_true", help="run backfill with --label-history"
    )
    args = parser.parse_args()
    server = os.environ.get("SECLEDGER_BENCH_DATABASE_URL")
    if not server:
        server = embedded.start(
            Path(tempfile.mkdtemp(prefix="secledger-bench-")) / "pg", database="postgres"
        )
    with FakeGitLab(max_per_page=100, latency=(0.030, 0.080)) as fake:
        fake.add_project(14, "acme/payments", group="acme")
        for iid in range(1, args.mrs + 1):
            Story(iid=iid).publish(fake)
        for iid in range(args.mrs + 1, args.mrs + args.plain + 1):
            Story(iid=iid, label="frontend").publish(fake)
        print(
            f"fake GitLab API: {args.mrs} security MRs, {args.plain} others, 30-80 ms per"
            f" request; label history {'on' if args.label_history else 'off'}"
        )
        for workers in args.workers:
            mrs, rows, elapsed, requests = run(
                server, fake, workers, label_history=args.label_history
            )
            print(
                f"workers={workers}: {mrs} MRs ({rows} ledger rows, {requests} requests) in "
                f"{elapsed:.2f} s = {mrs / elapsed:.1f} MRs/s"
            )


if __name__ == "__main__":
    main()
