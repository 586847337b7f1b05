"""The auditor's evidence pack: population, decision trails, findings, SLA, sample, chain proof.

The population is the security MRs whose final decision (merge or close) falls in
``[since, until)``. It is read in one REPEATABLE READ snapshot into a temporary table
numbered in a fixed order (instance in byte order, project id, MR iid), so the CSV and
JSON files, the findings and the sample all describe the same set, and streamed to
disk with server-side cursors: memory stays constant whatever the period.

After that snapshot the whole chain is verified (``store.verify``) in a later one, so
every row the pack cites is covered by the verification.
"""

from __future__ import annotations

import base64
import random
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import Connection, Engine, RowMapping, text

from secledger import findings, packchain, packreadme, reports
from secledger.filtermatch import check_project, project_params, same_project
from secledger.packfiles import PackDir
from secledger.packpolicy import policy_json
from secledger.policy import LabelPolicy
from secledger.progress import Silent, Tracker
from secledger.rebuild import log_rows, rebuild
from secledger.store import checkpoints, db
from secledger.store.chain import time_text
from secledger.store.derived import differences
from secledger.tierpolicy import CompliancePolicy
from secledger.times import utcnow

FORMAT = "secledger.evidence.v1"
# Named with its schema: the search_path is pinned with pg_temp last (db.pin_search_path),
# so a table of this name in public would otherwise be read instead.
POPULATION = "pg_temp.evidence_population"
STREAM_ROWS = 5000
SAMPLE_ALGORITHM = (
    "positions = sorted(i + 1 for i in random.Random(SEED).sample(range(N), min(SIZE, N)))"
    " (Python 3 random, Mersenne Twister), where N is the population size and position is"
    " the 1-based row number of population.csv (sorted by instance in byte order,"
    " project_id, mr_iid)"
)
POPULATION_COLUMNS = (
    "position",
    "instance",
    "project_id",
    "mr_iid",
    "project_path",
    "title",
    "url",
    "risk_tier",
    "outcome",
    "decided_at",
    "decided_at_source",
    "decided_by",
    "author_id",
    "labeled_at",
    "approvers",
    "sla_deadline",
    "first_decision_at",
    "first_decision_by",
    "sla_status",
    "findings",
    "event_count",
    "last_seq",
)
TRAIL_COLUMNS = ("seq", "event_at", "kind", "decision", "actor", "actor_id", "hash")
TRAIL_CSV_COLUMNS = ("position", "instance", "project_id", "mr_iid", *TRAIL_COLUMNS)
_FIRST_EVENT_COLUMN = TRAIL_CSV_COLUMNS.index("seq")
FINDING_COLUMNS = tuple(f.name for f in fields(findings.Finding))

_DECISION_AT = "CASE l.state WHEN 'merged' THEN l.merged_at ELSE l.closed_at END"
# A merged or closed MR whose merge or close event was never recorded (its webhook lost,
# or the security label added only afterwards) has no decision time; nor has one closed
# again after a reopen with that close untold (the fold clears the undone close). The
# first recorded event that shows it in that state since it was last in another (in fold
# order) stands in: it falls in one period instead of none, later events do not move it
# to another, and a close that a reopen undid is not it.
_SAME_MR = "{0}.instance = l.instance AND {0}.project_id = l.project_id AND {0}.mr_iid = l.mr_iid"
# Found once per ledger row, and only for a row with no decision time (the gate each
# subquery opens with), in two probes of review_events_mr: the MR's last event in another
# state (a backward scan), then its first event in the ledger state after that one. As a
# scalar subquery it would be evaluated again in the SELECT list and in each bound, and a
# NOT EXISTS per event is quadratic in the MR's events. Every seq is above 0 (delivery_log's
# CHECK), so with no event in another state, ('-infinity', 0) comes before every event.
_STATE_SEEN = f"""
LEFT JOIN LATERAL (
    SELECT o.event_at, o.seq FROM review_events o
    WHERE {_DECISION_AT} IS NULL AND {_SAME_MR.format("o")} AND o.facts->>'state' <> l.state
    ORDER BY o.event_at DESC, o.seq DESC LIMIT 1
) other ON true
LEFT JOIN LATERAL (
    SELECT e.event_at FROM review_events e
    WHERE {_DECISION_AT} IS NULL AND {_SAME_MR.format("e")} AND e.facts->>'state' = l.state
      AND (e.event_at, e.seq) > (coalesce(other.event_at, '-infinity'), coalesce(other.seq, 0))
    ORDER BY e.event_at, e.seq LIMIT 1
) seen ON true"""
_DECIDED_AT = f"COALESCE({_DECISION_AT}, seen.event_at)"
_CREATE = f"""
CREATE TEMPORARY TABLE {POPULATION} ON COMMIT DROP AS
SELECT row_number() OVER (ORDER BY l.instance COLLATE "C", l.project_id, l.mr_iid) AS position,
       l.instance, l.project_id, l.mr_iid, l.state AS outcome, {_DECIDED_AT} AS decided_at,
       CASE WHEN {_DECISION_AT} IS NULL THEN 'state_seen' ELSE 'decision' END
           AS decided_at_source
FROM security_review_ledger l{_STATE_SEEN}
WHERE l.state IN ('merged', 'closed') AND {_DECIDED_AT} >= :since AND {_DECIDED_AT} < :until
"""
_POPULATION_ROWS = f"""
SELECT p.position, l.instance, l.project_id, l.mr_iid, l.project_path, l.title, l.url,
       l.risk_tier, p.outcome, p.decided_at, p.decided_at_source,
       CASE p.outcome WHEN 'merged' THEN l.merged_by ELSE l.closed_by END AS decided_by,
       l.author_id, l.labeled_at, l.approvers, s.deadline AS sla_deadline,
       s.first_decision_at, s.first_decision_by, {reports.SLA_STATUS} AS sla_status,
       coalesce(found.findings, 0) AS findings, l.event_count, l.last_seq
FROM {POPULATION} p
JOIN security_review_ledger l USING (instance, project_id, mr_iid)
LEFT JOIN review_sla s USING (instance, project_id, mr_iid)
LEFT JOIN (SELECT instance, project_id, mr_iid, count(*) AS findings
           FROM {findings.findings_as_of(POPULATION)} f GROUP BY instance, project_id, mr_iid) found
    USING (instance, project_id, mr_iid)
ORDER BY p.position
"""
# The actor's GitLab user id beside the username: population.csv identifies the author
# by id only (GitLab's MR hooks carry no author username), so an auditor checks separation
# of duties for every MR, not only the sampled ones, by comparing ids.
_ACTOR_ID = (
    "CASE WHEN jsonb_typeof(e.facts -> 'actor_id') = 'number'"
    " THEN (e.facts ->> 'actor_id')::bigint END"
)
_EVENTS = f"""
SELECT p.position, p.instance, p.project_id, p.mr_iid, e.seq, e.event_at, e.kind, e.decision,
       e.actor, {_ACTOR_ID} AS actor_id, encode(d.hash, 'hex') AS hash{{extra}}
FROM {POPULATION} p
JOIN review_events e USING (instance, project_id, mr_iid)
JOIN delivery_log d ON d.seq = e.seq
{{where}}
ORDER BY p.position, e.event_at, e.seq
"""
_TRAIL = _EVENTS.format(extra="", where="")
# GitLab cannot tell a time it has not reached when it sends a hook, so an event dated
# after its delivery was received means a wrong clock (GitLab's or this host's) or a
# payload that chose its own date; the decision times and SLA figures read from it are
# then wrong. Minutes of skew between two hosts are common and not named.
LATE_SLACK = timedelta(minutes=5)
LATE_SHOWN = 20
_LATE = f"""
SELECT count(*) OVER () AS total, p.position, e.seq, e.event_at, d.received_at
FROM {POPULATION} p
JOIN review_events e USING (instance, project_id, mr_iid)
JOIN delivery_log d ON d.seq = e.seq
WHERE e.event_at > d.received_at + :slack
ORDER BY p.position, e.event_at, e.seq
LIMIT {LATE_SHOWN}
"""
_SAMPLE = _EVENTS.format(
    extra=", e.facts, d.received_at, d.source, d.event, d.instance AS log_instance,"
    " d.dedup_key, d.headers, d.payload, d.prev_hash",
    where="WHERE p.position = ANY(:positions)",
)


@dataclass(frozen=True)
class Options:
    """What goes into the pack: the period (``until`` exclusive), filters and the sample."""

    since: datetime
    until: datetime
    seed: int
    sample: int = 25
    project: str | None = None
    tier: str | None = None
    # Which tier's breaches are high: the findings are listed as they stand at the pack.
    policy: CompliancePolicy = field(default_factory=CompliancePolicy)
    # The label policy the ledger is rebuilt under to check it against the log.
    labels: LabelPolicy = field(default_factory=LabelPolicy)


@dataclass(frozen=True)
class Sampled:
    """One sampled MR and its file in the pack."""

    rank: int
    position: int
    instance: str
    project_id: int
    mr_iid: int
    file: str
    events: int


@dataclass
class Pack:
    """What was written, for the command's summary, ``pack.json`` and the README."""

    options: Options
    generated_at: datetime
    population: int = 0
    events: int = 0
    findings: int = 0
    snapshot_head_seq: int = 0
    snapshot_head_hash: bytes = b""
    sample: list[Sampled] = field(default_factory=list)
    chain: dict[str, Any] = field(default_factory=dict)
    # The ledger and event rows against a rebuild from the log, in the pack's snapshot.
    derived: dict[str, Any] = field(default_factory=dict)
    checkpoint: dict[str, Any] | None = None
    # Events of the population dated after their delivery was received (``_LATE``).
    late_dated: dict[str, Any] = field(default_factory=dict)
    public_key: bool = False
    files: list[str] = field(default_factory=list)

    @property
    def sample_algorithm(self) -> str:
        """How the sample was drawn, in words an auditor can re-run."""
        return SAMPLE_ALGORITHM

    @property
    def unsigned(self) -> dict[str, int] | None:
        """The log rows newer than the newest signed checkpoint (all of them when there is
        none, or when its signature was not checked), when the chain verified: a rewrite
        of those would go unnoticed."""
        last = self.chain.get("last_seq") if self.chain_ok else None
        signed = self.checkpoint["seq"] if self.checkpoint and self.checkpoint_verified else 0
        if not last or last <= signed:
            return None
        return {"first_seq": signed + 1, "last_seq": int(last)}

    @property
    def checkpoint_verified(self) -> bool:
        """True when the pack's checkpoint's signature was checked and holds. Without a
        public key it is a row taken at its word (the app's login may insert one)."""
        return self.checkpoint is not None and self.checkpoint.get("signature") == "verified"

    @property
    def chain_ok(self) -> bool:
        """True when the chain verified at pack time."""
        return bool(self.chain.get("ok"))

    @property
    def derived_ok(self) -> bool:
        """True when the ledger and event rows are what the log says (or were not checked)."""
        return not self.derived.get("differences")

    @property
    def forged(self) -> list[str]:
        """Stored checkpoints whose signature failed under the configured key."""
        return list(self.chain.get("forged_checkpoints") or [])

    def to_json(self) -> dict[str, Any]:
        """The content of ``pack.json``."""
        data = asdict(self)
        # The settings' policies, not choices of the pack's: told apart from the options.
        data["options"].pop("policy")
        data["options"].pop("labels")
        data["policy"] = policy_json(self.options.labels, self.options.policy)
        data["unsigned_rows"] = self.unsigned
        data["format"] = FORMAT
        data["sample_algorithm"] = self.sample_algorithm
        data.pop("files")
        return data


def draw(population: int, size: int, seed: int) -> list[int]:
    """The 1-based positions of the sample, sorted (see :data:`SAMPLE_ALGORITHM`)."""
    # Reproducibility for the auditor is the point here, not unpredictability.
    rng = random.Random(seed)  # noqa: S311
    picked = rng.sample(range(population), min(size, population))
    return sorted(index + 1 for index in picked)


# How many differing rows the pack names (all are counted; `rebuild --check` lists them).
DERIVED_SHOWN = 20


def _check_derived(conn: Connection, labels: LabelPolicy, tracker: Tracker) -> dict[str, Any]:
    """`rebuild --check` in the pack's snapshot. The population, its decisions and its
    trail come from the ledger and event rows, which the app's login may update: the
    chain proves the log, and this ties those rows to it."""
    done = tracker.task("check derived rows", log_rows(conn))
    found = differences(conn, rebuild(conn, labels, progress=done))
    return {
        "checked": "security_review_ledger and review_events against the log",
        "differences": len(found),
        "first": [d.describe()[:300] for d in found[:DERIVED_SHOWN]],
    }


def build(
    engine: Engine,
    options: Options,
    out: Path,
    *,
    public_key: Ed25519PublicKey | None = None,
    tracker: Tracker | None = None,
) -> Pack:
    """Write the evidence pack into ``out`` (which the caller made sure is usable)."""
    tracker = tracker or Silent()
    pack = Pack(options, utcnow())
    files = PackDir(out)
    with engine.connect() as plain:
        conn = plain.execution_options(isolation_level="REPEATABLE READ")
        with conn.begin():
            db.pin_search_path(conn)
            _snapshot(conn, pack, files, tracker)
            latest = checkpoints.stored(conn)
            pack.derived = _check_derived(conn, options.labels, tracker)
    advance = tracker.task("verify chain", pack.snapshot_head_seq or None)
    pack.chain = packchain.verify_now(
        engine, files, (pack.snapshot_head_seq, pack.snapshot_head_hash), advance, public_key
    )
    pack.checkpoint = packchain.add_checkpoint(
        files, packchain.newest(latest, public_key), public_key
    )
    pack.public_key = public_key is not None
    files.write_json("pack.json", pack.to_json())
    files.write_bytes("README.md", packreadme.render(pack).encode())
    pack.files = sorted(files.files)
    files.write_manifest(tracker.task("manifest", len(files.files)))
    return pack


def _snapshot(conn: Connection, pack: Pack, files: PackDir, tracker: Tracker) -> None:
    """Everything read from the ledger, in one snapshot."""
    # Every time comes back in UTC, so JSON and CSV spell it the same way ("Z").
    conn.execute(text("SET LOCAL TIME ZONE 'UTC'"))
    pack.snapshot_head_seq, pack.snapshot_head_hash = checkpoints.head(conn)
    pack.population = _create_population(conn, pack.options)
    positions = draw(pack.population, pack.options.sample, pack.options.seed)
    sampled = _write_population(conn, pack, files, set(positions), tracker)
    pack.findings = _write_findings(conn, pack, files)
    pack.late_dated = _late_dated(conn)
    _write_sla(conn, pack, files)
    _write_sample(conn, pack, files, sampled, tracker)


def _create_population(conn: Connection, options: Options) -> int:
    query = _CREATE
    params: dict[str, Any] = {"since": options.since, "until": options.until}
    if options.project is not None:
        check_project(conn, options.project)  # before anything is written
        query += " AND " + same_project("l.")
        params.update(project_params(options.project))
    if options.tier is not None:
        query += " AND l.risk_tier = :tier"
        params["tier"] = options.tier
    conn.execute(text(query), params)
    conn.execute(text(f"CREATE INDEX ON {POPULATION} (instance, project_id, mr_iid)"))
    conn.execute(text(f"CREATE INDEX ON {POPULATION} (position)"))
    conn.execute(text(f"ANALYZE {POPULATION}"))
    return int(conn.execute(text(f"SELECT count(*) FROM {POPULATION}")).scalar_one())


def _late_dated(conn: Connection) -> dict[str, Any]:
    rows = conn.execute(text(_LATE), {"slack": LATE_SLACK}).mappings().all()
    return {
        "events": rows[0]["total"] if rows else 0,
        "slack_seconds": int(LATE_SLACK.total_seconds()),
        "first": [{k: v for k, v in row.items() if k != "total"} for row in rows],
    }


def _stream(
    conn: Connection, query: str, params: Mapping[str, Any], *, mappings: bool = True
) -> Iterator[Any]:
    """Rows (mappings, or tuples) from a server-side cursor, fetched in batches."""
    # On the statement, not the connection (which would keep it for every later one).
    statement = text(query).execution_options(yield_per=STREAM_ROWS)
    result = conn.execute(statement, dict(params))
    yield from (result.mappings() if mappings else result)


def _write_population(
    conn: Connection, pack: Pack, files: PackDir, wanted: set[int], tracker: Tracker
) -> dict[int, dict[str, Any]]:
    """Population (CSV, JSON with nested trails) and the trail CSV; the sampled MR rows."""
    advance = tracker.task("population", pack.population)
    # Plain tuples, in TRAIL_CSV_COLUMNS order: half a million of them for a year.
    trail = _stream(conn, _TRAIL, {}, mappings=False)
    pending = next(trail, None)
    sampled: dict[int, dict[str, Any]] = {}
    with (
        files.json_array("population.json") as as_json,
        files.csv_table("population.csv", POPULATION_COLUMNS) as as_csv,
        files.csv_table("decision-trail.csv", TRAIL_CSV_COLUMNS) as trail_csv,
    ):
        as_of = findings.as_of(pack.options.policy, pack.generated_at)
        for row in _stream(conn, _POPULATION_ROWS, as_of):
            mr = dict(row)
            events = []
            while pending is not None and pending[0] == mr["position"]:
                trail_csv.add_values(pending)
                events.append(dict(zip(TRAIL_COLUMNS, pending[_FIRST_EVENT_COLUMN:], strict=True)))
                pending = next(trail, None)
            pack.events += len(events)
            as_csv.add(mr)
            as_json.add({**mr, "trail": events})
            if mr["position"] in wanted:
                sampled[mr["position"]] = mr
            advance(1)
    return sampled


def _write_findings(conn: Connection, pack: Pack, files: PackDir) -> int:
    """Every finding (open and resolved) of the population's MRs, as they stand when the
    pack is made: SLA breaches that serve's periodic check has not recorded yet too."""
    count = 0
    with (
        files.json_array("findings.json") as as_json,
        files.csv_table("findings.csv", FINDING_COLUMNS) as as_csv,
    ):
        for finding in findings.of_mrs(conn, POPULATION, pack.options.policy, pack.generated_at):
            item = finding.to_json()
            as_json.add(item)
            as_csv.add(item)
            count += 1
    return count


def _write_sla(conn: Connection, pack: Pack, files: PackDir) -> None:
    """Per tier and per reviewer, from ``reports`` with the pack's period and filters."""
    options = pack.options
    filters = reports.Filters(
        since=options.since,
        until=options.until,
        project=options.project,
        tier=options.tier,
        now=pack.generated_at,
    )
    tiers = [row.as_dict() for row in reports.tiers(conn, filters)]
    reviewers = [row.as_dict() for row in reports.reviewers(conn, filters)]
    files.write_json("sla-summary.json", {"tiers": tiers, "reviewers": reviewers})
    files.write_csv("sla-tiers.csv", reports.TierRow.columns(), tiers)
    files.write_csv("sla-reviewers.csv", reports.ReviewerRow.columns(), reviewers)


def _write_sample(
    conn: Connection,
    pack: Pack,
    files: PackDir,
    sampled: dict[int, dict[str, Any]],
    tracker: Tracker,
) -> None:
    """One JSON file per sampled MR: its population row and every log row, raw payload included."""
    advance = tracker.task("sample", len(sampled))
    positions = sorted(sampled)
    history: dict[int, list[dict[str, Any]]] = {position: [] for position in positions}
    for row in conn.execute(text(_SAMPLE), {"positions": positions}).mappings():
        history[row["position"]].append(_sample_event(row))
    for rank, position in enumerate(positions, start=1):
        mr = sampled[position]
        name = f"sample/{rank:03d}-p{mr['project_id']}-mr{mr['mr_iid']}.json"
        events = history[position]
        files.write_json(
            name,
            {
                "rank": rank,
                "position": position,
                "seed": pack.options.seed,
                "mr": mr,
                "events": events,
            },
        )
        pack.sample.append(
            Sampled(
                rank, position, mr["instance"], mr["project_id"], mr["mr_iid"], name, len(events)
            )
        )
        advance(1)
    index_columns = tuple(f.name for f in fields(Sampled))
    files.write_csv("sample/index.csv", index_columns, (asdict(s) for s in pack.sample))


def _sample_event(row: RowMapping) -> dict[str, Any]:
    """One event with the exact log row it came from (the canonical fields and hashes)."""
    payload = bytes(row["payload"])
    return {
        "seq": row["seq"],
        "event_at": row["event_at"],
        "kind": row["kind"],
        "decision": row["decision"],
        "actor": row["actor"],
        "actor_id": row["actor_id"],
        "facts": row["facts"],
        "log": {
            "seq": row["seq"],
            "received_at": time_text(row["received_at"]),
            "source": row["source"],
            "event": row["event"],
            "instance": row["log_instance"],
            "dedup_key": row["dedup_key"],
            "headers": row["headers"],
            "payload_base64": base64.b64encode(payload).decode(),
            "payload_bytes": len(payload),
            "prev_hash": bytes(row["prev_hash"]).hex(),
            "hash": row["hash"],
        },
    }
