"""Time every compliance report on a generated history (see benchmarks/history.py).

    python benchmarks/history.py URL --rows 1000000   # once
    python benchmarks/reports.py URL

Prints one line per report and filter set: wall time of the best of three runs (the
first run also warms the cache, as a dashboard would) and the number of rows.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime, timedelta

import history  # the sibling module: benchmarks/ is on sys.path when run as a script
from sqlalchemy import text

from secledger import findings, reports
from secledger.store import db

TARGET_SECONDS = 2.0


def filter_sets(conn) -> dict[str, reports.Filters]:
    """No filter, the last quarter, one busy project, one tier, one reviewer."""
    latest = conn.execute(text("SELECT max(labeled_at) FROM review_sla")).scalar_one()
    project = conn.execute(
        text("SELECT project_path FROM security_review_ledger GROUP BY 1 ORDER BY count(*) DESC")
    ).first()[0]
    reviewer = conn.execute(
        text("SELECT actor FROM review_events WHERE decision = 'approved' LIMIT 1")
    ).scalar_one()
    now = datetime.now(UTC)
    return {
        "all": reports.Filters(now=now),
        "last 90 days": reports.Filters(since=latest - timedelta(days=90), now=now),
        f"project {project}": reports.Filters(project=project, now=now),
        "tier critical": reports.Filters(tier="critical", now=now),
        f"reviewer {reviewer}": reports.Filters(reviewer=reviewer, now=now),
        "month periods": reports.Filters(period="month", now=now),
    }


def timed(engine, name: str, filters: reports.Filters) -> tuple[float, int]:
    query, _row = reports.REPORTS[name]
    return best_of(engine, lambda conn: query(conn, filters))


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", nargs="?", help="PostgreSQL URL of a generated history")
    args = parser.parse_args(argv)
    engine = db.create(history.bench_url(args.url), pool_size=1)
    with engine.begin() as conn:
        log_rows = conn.execute(text("SELECT count(*) FROM delivery_log")).scalar_one()
        mrs = conn.execute(text("SELECT count(*) FROM security_review_ledger")).scalar_one()
        started = time.perf_counter()
        findings.refresh_overdue(conn, history.bench_policy(), datetime.now(UTC))
        refresh = time.perf_counter() - started
        sets = filter_sets(conn)
    print(f"history: {log_rows} log rows, {mrs} merge requests")
    check = "(serve's periodic SLA check)"
    print(f"{'refresh_overdue':<12} {check:<28} {refresh:7.3f} s")
    slow = 0
    for name in reports.REPORTS:
        for label, filters in sets.items():
            if label == "month periods" and name != "periods":
                continue
            seconds, count = timed(engine, name, filters)
            slow += seconds > TARGET_SECONDS
            flag = "" if seconds <= TARGET_SECONDS else "  OVER TARGET"
            print(f"{name:<12} {label:<28} {seconds:7.3f} s  {count:>7} rows{flag}")
    for label, run in extras().items():
        seconds, count = best_of(engine, run)
        slow += seconds > TARGET_SECONDS
        print(f"{label:<41} {seconds:7.3f} s  {count:>7} rows")
    engine.dispose()
    print(f"{slow} runs over {TARGET_SECONDS} s")


def extras():
    """The BI views as a BI tool would read them, and the findings listing."""

    def view(sql):
        return lambda conn: conn.execute(text(sql)).all()

    return {
        "bi_reviewer_metrics (all)": view("SELECT * FROM bi_reviewer_metrics"),
        "bi_sla_status (count by status)": view(
            "SELECT sla_status, count(*) FROM bi_sla_status GROUP BY 1"
        ),
        "bi_findings (open, by rule)": view(
            "SELECT rule, count(*) FROM bi_findings WHERE is_open GROUP BY 1"
        ),
        "findings.list_findings (all open)": lambda conn: findings.list_findings(
            conn, history.bench_policy(), datetime.now(UTC)
        ),
    }


def best_of(engine, run) -> tuple[float, int]:
    best, count = float("inf"), 0
    for _ in range(3):
        with engine.connect() as conn:
            started = time.perf_counter()
            count = len(run(conn))
            best = min(best, time.perf_counter() - started)
    return best, count


if __name__ == "__main__":
    main(sys.argv[1:])
