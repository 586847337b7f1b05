"""Dashboard page load time with a 100,000-MR ledger.

Fills a fresh database with set-based SQL (ledger rows, review events, log rows, SLA
clocks per MR with the default tier policy, sla-breached findings for every late or
overdue MR, author-approved findings for 2% of MRs),
starts a real `secledger serve` on a free loopback port, logs in, and times the pages
and read-API calls people use. With Debian's chromium present it also times a full
browser load of the dashboard (HTML, plotly.js, charts drawn).

Run from the repository root:  .venv/bin/python benchmarks/dashboard.py [--mrs 100000]
Uses SECLEDGER_BENCH_DATABASE_URL (an admin libpq URL) or an embedded server in a temp dir.
The generated log rows carry placeholder hashes: the chain does not verify (by design).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

import httpx
import psycopg
from sqlalchemy.engine import make_url

from secledger import embedded
from secledger.dashboard.auth import hash_password
from secledger.store import db, migrate

DATABASE = "secledger_bench_dashboard"
USER, PASSWORD = "bench", "bench-password-123"
INSTANCE = "https://gitlab.example.com"
EVENTS_PER_MR = 4

FILL = """
INSERT INTO delivery_log
  (seq, received_at, source, event, instance, dedup_key, headers, payload, prev_hash, hash)
SELECT g, now() - make_interval(secs => (%(events)s - g) * 60), 'bench', 'Merge Request Hook',
       %(instance)s, 'bench-' || g, '{}', '\\x7b7d'::bytea,
       sha256(int8send(g - 1)), sha256(int8send(g))
FROM generate_series(1, %(events)s) AS g;

INSERT INTO review_events
  (seq, instance, project_id, mr_iid, event_at, kind, decision, actor, facts)
SELECT g, %(instance)s, 1000 + (m %% 25), m,
       timestamptz '2025-01-01' + make_interval(mins => m * 10 + k * 37),
       (ARRAY['update', 'approved', 'unapproved', 'merged'])[k + 1],
       (ARRAY[NULL, 'approved', 'unapproved', 'merged'])[k + 1],
       'user' || ((m * 7 + k) %% 40),
       CASE WHEN k = 0 THEN '{"security_added": ["sec::high"]}'::jsonb ELSE '{}'::jsonb END
FROM generate_series(1, %(events)s) AS g,
     LATERAL (SELECT (g - 1) / 4 + 1 AS m, (g - 1) %% 4 AS k) AS x;

INSERT INTO security_review_ledger
  (instance, project_id, mr_iid, mr_id, project_path, title, url, author_id, risk_tier,
   security_labels, state, decision, decided_by, decided_at, reviewer, approvers,
   assigned_reviewers, labeled_at, labeled_at_source, labeled_by, time_to_decision_seconds,
   merged_by, merged_at, closed_by, closed_at, last_event_at, last_seq, event_count, updated_at)
SELECT %(instance)s, 1000 + (m %% 25), m, 500000 + m, 'group/project-' || (m %% 25),
       'Security change ' || m, %(instance)s || '/group/project-' || (m %% 25)
         || '/-/merge_requests/' || m,
       m %% 300, tier, ARRAY['sec::' || tier],
       st, CASE st WHEN 'opened' THEN 'approved' ELSE st END,
       'user' || (m %% 40), labeled + make_interval(secs => ttd),
       'user' || (m %% 40), ARRAY['user' || (m %% 40)], ARRAY['user' || (m %% 40)],
       labeled, 'label_added', 'user' || ((m + 3) %% 40),
       CASE st WHEN 'opened' THEN NULL ELSE ttd END,
       CASE st WHEN 'merged' THEN 'user' || ((m + 1) %% 40) END,
       CASE st WHEN 'merged' THEN labeled + make_interval(secs => ttd) END,
       CASE st WHEN 'closed' THEN 'user' || ((m + 2) %% 40) END,
       CASE st WHEN 'closed' THEN labeled + make_interval(secs => ttd) END,
       labeled + make_interval(secs => ttd), m * 4, 4, now()
FROM generate_series(1, %(mrs)s) AS m,
     LATERAL (SELECT
       (ARRAY['critical', 'high', 'medium', 'low', 'unclassified'])[1 + (m * 7) %% 5] AS tier,
       CASE WHEN m %% 20 = 0 THEN 'closed' WHEN m %% 10 = 0 THEN 'opened' ELSE 'merged' END AS st,
       timestamptz '2025-01-01' + make_interval(mins => m * 10) AS labeled,
       (600 + ((m * 7919) %% 1000) ^ 2 / 4.0)::float8 AS ttd) AS x;

INSERT INTO review_sla
  (instance, project_id, mr_iid, risk_tier, sla_hours, business_hours, required_approvals,
   labeled_at, label_seq, deadline, first_decision_at, first_decision, first_decision_by,
   first_decision_seq, updated_at)
SELECT l.instance, l.project_id, l.mr_iid, l.risk_tier, h, false, 1, l.labeled_at,
       l.last_seq - 3, l.labeled_at + make_interval(hours => h),
       CASE WHEN l.state <> 'opened' THEN l.decided_at END,
       CASE WHEN l.state <> 'opened' THEN l.decision END,
       CASE WHEN l.state <> 'opened' THEN l.decided_by END,
       CASE WHEN l.state <> 'opened' THEN l.last_seq END, now()
FROM security_review_ledger l,
     LATERAL (SELECT CASE l.risk_tier WHEN 'critical' THEN 24 WHEN 'high' THEN 72
                     WHEN 'low' THEN 336 ELSE 168 END AS h) AS x;

INSERT INTO findings
  (instance, project_id, mr_iid, rule, subject, severity, seqs, evidence, detected_at,
   updated_at)
SELECT s.instance, s.project_id, s.mr_iid, 'sla-breached', '', 'medium', ARRAY[s.label_seq],
       jsonb_build_object('tier', s.risk_tier, 'sla_hours', s.sla_hours,
                          'deadline', s.deadline, 'decided_at', s.first_decision_at),
       coalesce(s.first_decision_at, s.deadline), now()
FROM review_sla s
WHERE coalesce(s.first_decision_at, now()) > s.deadline;

INSERT INTO findings
  (instance, project_id, mr_iid, rule, subject, severity, seqs, evidence, detected_at,
   updated_at)
SELECT l.instance, l.project_id, l.mr_iid, 'author-approved', '', 'high', ARRAY[l.last_seq - 2],
       jsonb_build_object('author_id', l.author_id, 'approver', l.approvers[1]),
       l.labeled_at + interval '1 hour', now()
FROM security_review_ledger l WHERE l.mr_iid %% 50 = 0;

ANALYZE
"""


def admin_url(tmp: Path) -> str:
    given = os.environ.get("SECLEDGER_BENCH_DATABASE_URL")
    return db.libpq_url(given) if given else embedded.start(tmp / "pg", database="postgres")


def fresh_database(admin: str, mrs: int) -> str:
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{DATABASE}"')
    url = make_url(admin).set(database=DATABASE).render_as_string(hide_password=False)
    engine = db.create(url, pool_size=1)
    migrate.upgrade(engine)
    engine.dispose()
    started = time.perf_counter()
    params = {"mrs": mrs, "events": mrs * EVENTS_PER_MR, "instance": INSTANCE}
    with psycopg.connect(url, autocommit=True) as conn:
        for statement in FILL.split(";\n\n"):
            conn.execute(statement, params)  # type: ignore[arg-type]
    elapsed = time.perf_counter() - started
    with psycopg.connect(url) as conn:
        found = conn.execute("SELECT count(*) FROM findings").fetchone()
    print(
        f"filled {mrs:,} MRs, {mrs * EVENTS_PER_MR:,} events, {found[0] if found else 0:,}"
        f" findings in {elapsed:.1f} s"
    )
    return url


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_server(url: str, data_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {
        **os.environ,
        "SECLEDGER_DATABASE_URL": url,
        "SECLEDGER_DATA_DIR": str(data_dir),
        "SECLEDGER_WEBHOOK_SECRETS": "bench-secret",
        "SECLEDGER_USERS": f"{USER}:{hash_password(PASSWORD)}",
        "SECLEDGER_LOG_LEVEL": "warning",
    }
    binary = str(Path(sys.executable).parent / "secledger")
    server = subprocess.Popen([binary, "serve", "--port", str(port)], env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return server, base
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    server.terminate()
    raise SystemExit("secledger serve did not become ready")


def timed(client: httpx.Client, path: str, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        response = client.get(path)
        times.append(time.perf_counter() - started)
        assert response.status_code == 200, (path, response.status_code)
    return times


def http_figures(base: str, mrs: int, repeat: int) -> None:
    with httpx.Client(base_url=base, timeout=120, follow_redirects=True) as client:
        login = client.post("/login", data={"username": USER, "password": PASSWORD})
        assert login.status_code == 200 and "total-mrs" in login.text, "login failed"
        mr = f"/mr/{quote(INSTANCE, safe='')}/{1000 + 7 % 25}/7"
        cases = [
            ("dashboard, no filter", "/"),
            ("dashboard, tier=critical", "/?tier=critical"),
            ("dashboard, reviewer=user7", "/?reviewer=user7"),
            (
                "dashboard, one project, 2025",
                "/?project=group/project-3&since=2025-01-01&until=2025-12-31",
            ),
            ("MR page with timeline and findings", mr),
            ("GET /api/reports/reviewers", "/api/reports/reviewers"),
            ("GET /api/reports/open", "/api/reports/open"),
            ("GET /api/reports/decision-times", "/api/reports/decision-times"),
            ("GET /api/findings?limit=100", "/api/findings?limit=100"),
            ("GET /api/ledger?limit=100", "/api/ledger?limit=100"),
            (
                "GET /api/ledger?limit=100, 90% deep",
                f"/api/ledger?limit=100&offset={mrs * 9 // 10}",
            ),
            ("GET /metrics", "/metrics"),
        ]
        print(f"\nserver response times, {repeat} requests each (median / min), {mrs:,} MRs:")
        for name, path in cases:
            times = timed(client, path, repeat)
            median, best = statistics.median(times) * 1000, min(times) * 1000
            print(f"  {name:42s} {median:8.1f} ms {best:8.1f} ms")


def browser_figures(base: str, repeat: int) -> None:
    chromium = os.environ.get("SECLEDGER_CHROMIUM", "/usr/bin/chromium")
    if not Path(chromium).exists():
        print("\nbrowser load: skipped, no chromium at", chromium)
        return
    from playwright.sync_api import sync_playwright  # noqa: PLC0415

    args = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
    ]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=args)
        page = browser.new_page(viewport={"width": 1366, "height": 768})
        page.goto(f"{base}/login")
        page.fill("input[name=username]", USER)
        page.fill("input[name=password]", PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_selector("#ttd-chart[data-rendered=true]", timeout=120_000)
        times = []
        for _ in range(repeat):
            started = time.perf_counter()
            page.goto(f"{base}/", wait_until="load")
            for chart in ("volume-chart", "ttd-chart", "reviewer-chart"):
                page.wait_for_selector(f"#{chart}[data-rendered=true]", timeout=120_000)
            times.append(time.perf_counter() - started)
        browser.close()
    print(f"\nbrowser: navigation to all charts drawn (plotly.js cached), {repeat} loads:")
    print(f"  median {statistics.median(times) * 1000:.0f} ms, min {min(times) * 1000:.0f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mrs", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="secledger-bench-") as tmp:
        os.chmod(tmp, 0o755)  # the embedded server runs as its own user when we are root
        url = fresh_database(admin_url(Path(tmp)), options.mrs)
        server, base = start_server(url, Path(tmp) / "data")
        try:
            http_figures(base, options.mrs, options.repeat)
            browser_figures(base, options.repeat)
        finally:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
