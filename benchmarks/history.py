"""Generate a large, realistic review history straight into PostgreSQL.

Every event is a Merge Request Hook body that goes through the real intake and
extraction (``parse_delivery``, ``extract_facts``); the log rows are hash-chained with
``store.chain.link``; the ledger rows come from ``projection.fold`` and the SLA clocks
and findings from ``rules``; only the writes are batched (COPY) instead of one
transaction per delivery. Reusable: ``generate(url, rows)``.

    python benchmarks/history.py [URL] --rows 1000000

Without URL an embedded server is started under /tmp/secledger-bench.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import psycopg
from sqlalchemy import text

from secledger import embedded
from secledger.extract import extract_facts
from secledger.findings import clock_row, finding_row, history_of, refresh_overdue
from secledger.intake import Delivery, parse_delivery
from secledger.policy import LabelPolicy
from secledger.projection import LEDGER_COLUMNS, SequencedEvent, fold
from secledger.rules import evaluate, sla_clock
from secledger.store import db, migrate
from secledger.store.chain import GENESIS, LogRow, link
from secledger.store.log import headers_text
from secledger.tierpolicy import CompliancePolicy, TierRule

INSTANCES = ("https://gitlab.example.com", "https://git.corp.example")
TIERS = (("critical", 0.05), ("high", 0.20), ("medium", 0.35), ("low", 0.30), ("review", 0.10))
END = datetime(2026, 10, 1, tzinfo=UTC)
SPAN = timedelta(days=730)
REVIEWERS = [f"sec-{i:02d}" for i in range(60)]
DEVELOPERS = [f"dev-{i:03d}" for i in range(800)]
USER_IDS = {name: 10_000 + i for i, name in enumerate(REVIEWERS + DEVELOPERS)}
CHUNK_MRS = 4000
LOG_COLUMNS = (
    "seq, received_at, source, event, instance, dedup_key, headers, payload, prev_hash, hash"
)
EVENT_COLUMNS = "seq, instance, project_id, mr_iid, event_at, kind, decision, actor, facts"
CLOCK_COLUMNS = (
    "instance, project_id, mr_iid, risk_tier, sla_hours, business_hours, required_approvals,"
    " labeled_at, label_seq, deadline, first_decision_at, first_decision, first_decision_by,"
    " first_decision_seq, ended_before_label, updated_at"
)
FINDING_COLUMNS = (
    "instance, project_id, mr_iid, rule, subject, severity, seqs, evidence, detected_at, updated_at"
)


def bench_policy() -> CompliancePolicy:
    """Defaults, with the security reviewers as the only allowed approvers for critical/high."""
    rules = dict(CompliancePolicy().rules)
    group = frozenset(REVIEWERS)
    for tier in ("critical", "high"):
        base = rules[tier]
        rules[tier] = TierRule(tier, base.sla_hours, base.approvals, reviewers=group)
    return CompliancePolicy(rules=rules)


@dataclass
class MR:
    """One merge request being scripted."""

    instance: str
    project_id: int
    path: str
    iid: int
    author: str
    label: str
    created: datetime
    labels: list[str] = field(default_factory=list)


@dataclass
class Planned:
    """One delivery to be written: when it happened and its body."""

    at: datetime
    mr: MR
    body: dict[str, Any]


def stamp(value: datetime) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S UTC")


def label_obj(title: str, project_id: int) -> dict[str, Any]:
    return {
        "id": abs(hash(title)) % 99_991,
        "title": title,
        "color": "#dc143c",
        "project_id": project_id,
        "type": "ProjectLabel",
        "template": False,
    }


def body(mr: MR, action: str, actor: str, at: datetime, changes: dict[str, Any]) -> dict[str, Any]:
    """A compact but complete Merge Request Hook body."""
    state = {"merge": "merged", "close": "closed"}.get(action, "opened")
    url = f"{mr.instance}/{mr.path}"
    labels = [label_obj(t, mr.project_id) for t in mr.labels]
    return {
        "object_kind": "merge_request",
        "event_type": "merge_request",
        "user": {"id": USER_IDS[actor], "name": actor, "username": actor, "email": "[REDACTED]"},
        "project": {"id": mr.project_id, "web_url": url, "path_with_namespace": mr.path},
        "object_attributes": {
            "id": mr.project_id * 100_000 + mr.iid,
            "iid": mr.iid,
            "target_project_id": mr.project_id,
            "author_id": USER_IDS[mr.author],
            "title": f"Change {mr.iid} in {mr.path}",
            "created_at": stamp(mr.created),
            "updated_at": stamp(at),
            "state": state,
            "action": action,
            "url": f"{url}/-/merge_requests/{mr.iid}",
            "source_branch": f"feature-{mr.iid}",
            "target_branch": "main",
        },
        "labels": labels,
        "changes": changes,
    }


class Script:
    """Writes the story of one MR as a list of planned deliveries."""

    def __init__(self, rng: random.Random, speed: dict[str, float]) -> None:
        self.rng = rng
        self.speed = speed

    def later(self, at: datetime, mean_hours: float) -> datetime:
        return at + timedelta(hours=self.rng.expovariate(1 / mean_hours), seconds=1)

    def story(self, mr: MR, required: int) -> list[Planned]:
        rng, out = self.rng, []
        at = mr.created
        if rng.random() < 0.8:
            mr.labels = [mr.label, "backend"]
            out.append(Planned(at, mr, body(mr, "open", mr.author, at, {})))
        else:  # labelled after opening: the clock starts at the label
            at = self.later(at, 6)
            mr.labels = [mr.label, "backend"]
            change = self._label_change(["backend"], mr.labels, at, mr)
            out.append(Planned(at, mr, body(mr, "update", mr.author, at, change)))
        for _ in range(rng.choice((0, 1, 1, 2, 3))):
            at = self.later(at, 8)
            edit = {
                "title": {"previous": "WIP", "current": "Ready"},
                "updated_at": {"previous": stamp(mr.created), "current": stamp(at)},
            }
            out.append(Planned(at, mr, body(mr, "update", mr.author, at, edit)))
        at = self._approvals(mr, required, at, out)
        self._ending(mr, at, out)
        return out

    def _label_change(
        self, prev: list[str], cur: list[str], at: datetime, mr: MR
    ) -> dict[str, Any]:
        return {
            "labels": {
                "previous": [label_obj(t, mr.project_id) for t in prev],
                "current": [label_obj(t, mr.project_id) for t in cur],
            },
            "updated_at": {"previous": stamp(mr.created), "current": stamp(at)},
        }

    def _approvals(self, mr: MR, required: int, at: datetime, out: list[Planned]) -> datetime:
        rng = self.rng
        approvers = rng.sample(REVIEWERS, k=max(1, required + rng.choice((-1, 0, 0, 0, 1))))
        if rng.random() < 0.04:
            approvers[0] = rng.choice(DEVELOPERS)  # someone outside the reviewer group
        if rng.random() < 0.03:
            approvers.append(mr.author)  # self-approval
        for name in approvers:
            at = self.later(at, self.speed.get(name, 30))
            out.append(Planned(at, mr, body(mr, "approved", name, at, {})))
        if rng.random() < 0.08:
            name = approvers[0]
            at = self.later(at, 4)
            out.append(Planned(at, mr, body(mr, "unapproved", name, at, {})))
            if rng.random() < 0.5:
                at = self.later(at, 6)
                out.append(Planned(at, mr, body(mr, "approved", name, at, {})))
        if rng.random() < 0.03:
            at = self.later(at, 2)
            before, mr.labels = mr.labels, ["backend"]
            change = self._label_change(before, mr.labels, at, mr)
            out.append(Planned(at, mr, body(mr, "update", mr.author, at, change)))
        return at

    def _ending(self, mr: MR, at: datetime, out: list[Planned]) -> None:
        roll = self.rng.random()
        if roll < 0.75:
            merger = mr.author if self.rng.random() < 0.06 else self.rng.choice(REVIEWERS)
            at = self.later(at, 3)
            out.append(Planned(at, mr, body(mr, "merge", merger, at, {})))
        elif roll < 0.87:
            at = self.later(at, 24)
            out.append(Planned(at, mr, body(mr, "close", self.rng.choice(REVIEWERS), at, {})))


@dataclass
class Loader:
    """Chains, extracts and COPYs planned deliveries; folds each MR once complete."""

    conn: psycopg.Connection[Any]
    policy: CompliancePolicy
    labels: LabelPolicy = field(default_factory=LabelPolicy)
    seq: int = 0
    head: bytes = GENESIS
    now: datetime = field(default_factory=lambda: datetime.now(UTC))
    findings: int = 0

    def deliver(self, planned: Planned, rng: random.Random) -> tuple[Delivery, Any]:
        raw = orjson.dumps(planned.body)
        headers = {
            "x-gitlab-event": "Merge Request Hook",
            "x-gitlab-instance": planned.mr.instance,
            "idempotency-key": f"{rng.getrandbits(64):016x}-{self.seq + 1}",
        }
        received = planned.at + timedelta(milliseconds=rng.randint(40, 3000))
        delivery = parse_delivery(
            headers,
            raw,
            secrets=(),
            max_body_bytes=1 << 24,
            received_at=received,
            require_token=False,
        )
        assert isinstance(delivery, Delivery)
        return delivery, extract_facts(delivery, self.labels)

    def load(self, chunk: list[Planned], rng: random.Random) -> None:
        """Write one chunk of complete MRs: log, events, ledger, clocks, findings."""
        log_rows, event_rows = [], []
        per_mr: dict[tuple[str, int, int], list[SequencedEvent]] = defaultdict(list)
        for planned in sorted(chunk, key=lambda p: p.at):
            delivery, facts = self.deliver(planned, rng)
            self.seq += 1
            kept = headers_text(delivery.headers)
            row = LogRow(
                self.seq,
                delivery.received_at,
                delivery.source,
                delivery.event,
                delivery.instance,
                delivery.dedup_key,
                kept,
                delivery.body,
            )
            digest = link(self.head, row)
            log_rows.append(
                (
                    row.seq,
                    row.received_at,
                    row.source,
                    row.event,
                    row.instance,
                    row.dedup_key,
                    kept,
                    row.payload,
                    self.head,
                    digest,
                )
            )
            self.head = digest
            event_rows.append(
                (
                    self.seq,
                    facts.instance,
                    facts.project_id,
                    facts.mr_iid,
                    facts.event_at,
                    facts.kind,
                    facts.decision,
                    facts.actor,
                    orjson.dumps(facts.to_json()).decode(),
                )
            )
            per_mr[(facts.instance, facts.project_id, facts.mr_iid)].append(
                SequencedEvent(self.seq, facts)
            )
        self.copy("delivery_log", LOG_COLUMNS, log_rows)
        self.copy("review_events", EVENT_COLUMNS, event_rows)
        self.project(per_mr)
        self.conn.commit()

    def project(self, per_mr: dict[tuple[str, int, int], list[SequencedEvent]]) -> None:
        ledger_rows, clock_rows, finding_rows = [], [], []
        columns = (*LEDGER_COLUMNS, "updated_at")
        for events in per_mr.values():
            row = fold(events)
            row["updated_at"] = self.now
            ledger_rows.append(tuple(row[c] for c in columns))
            history = history_of(events, row)
            clock = clock_row(history.key, sla_clock(history, self.policy))
            clock_rows.append((*clock.values(), self.now))
            for hit in evaluate(history, self.policy, row["last_event_at"]):
                values = finding_row(history.key, hit)
                values["evidence"] = orjson.dumps(values["evidence"]).decode()
                finding_rows.append((*values.values(), self.now, self.now))
        self.copy("security_review_ledger", ", ".join(columns), ledger_rows)
        self.copy("review_sla", CLOCK_COLUMNS, clock_rows)
        self.copy("findings", FINDING_COLUMNS, finding_rows)
        self.findings += len(finding_rows)

    def copy(self, table: str, columns: str, rows: list[tuple[Any, ...]]) -> None:
        with self.conn.cursor() as cur, cur.copy(f"COPY {table} ({columns}) FROM STDIN") as copy:
            for values in rows:
                copy.write_row(values)


def mrs(rng: random.Random, rows: int, policy: CompliancePolicy):
    """Yield chunks of planned deliveries, MRs in creation order, ``rows`` deliveries in all."""
    projects = [
        (INSTANCES[1] if i % 7 == 0 else INSTANCES[0], 1000 + i, f"group-{i % 25}/service-{i}")
        for i in range(400)
    ]
    iids: dict[int, int] = defaultdict(int)
    speed = {name: rng.uniform(2, 60) for name in REVIEWERS}
    script = Script(rng, speed)
    total, chunk, count = 0, [], 0
    step = SPAN / (rows / 4.8)
    created = END - SPAN
    while total < rows:
        instance, project_id, path = rng.choice(projects)
        iids[project_id] += 1
        tier = rng.choices([t for t, _ in TIERS], [w for _, w in TIERS])[0]
        label = "sec/review" if tier == "review" else f"sec::{tier}"
        created += step * rng.expovariate(1.0)
        author = rng.choice(DEVELOPERS)
        mr = MR(instance, project_id, path, iids[project_id], author, label, created)
        story = script.story(mr, policy.rule(tier).approvals)[: rows - total]
        total += len(story)
        chunk += story
        count += 1
        if count % CHUNK_MRS == 0 or total >= rows:
            yield chunk
            chunk = []


def generate(url: str, rows: int = 1_000_000, *, seed: int = 5) -> dict[str, Any]:
    """Fill an empty secledger database at ``url`` with ``rows`` log rows; figures."""
    started = time.perf_counter()
    engine = db.create(url, pool_size=1)
    migrate.upgrade(engine)
    with engine.connect() as conn:
        if conn.execute(text("SELECT count(*) FROM delivery_log")).scalar_one():
            raise SystemExit("the database already has a delivery log; use an empty one")
    policy = bench_policy()
    rng = random.Random(seed)
    with psycopg.connect(db.libpq_url(url)) as conn:
        loader = Loader(conn, policy)
        for chunk in mrs(rng, rows, policy):
            loader.load(chunk, rng)
            print(f"  {loader.seq:>9} rows  {time.perf_counter() - started:7.1f} s", flush=True)
    with engine.begin() as conn:
        overdue = refresh_overdue(conn, policy, datetime.now(UTC))
    with psycopg.connect(db.libpq_url(url), autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")
    engine.dispose()
    return {
        "rows": loader.seq,
        "findings": loader.findings + overdue,
        "seconds": round(time.perf_counter() - started, 1),
    }


def bench_url(given: str | None) -> str:
    """``given``, or a database on an embedded server under /tmp/secledger-bench."""
    if given:
        return given
    return embedded.start(Path("/tmp/secledger-bench/pg"), database="bench")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", nargs="?", help="PostgreSQL URL of an empty database")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=5)
    args = parser.parse_args(argv)
    print(generate(bench_url(args.url), args.rows, seed=args.seed))


if __name__ == "__main__":
    main(sys.argv[1:])
