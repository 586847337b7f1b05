"""The README.md of an evidence pack: what each file is, and how to re-verify it by hand."""

from __future__ import annotations

from typing import TYPE_CHECKING

from secledger import __version__
from secledger.packpolicy import policy_json, policy_text
from secledger.rules import RULES
from secledger.times import isoformat

if TYPE_CHECKING:
    from secledger.evidence import Pack

FILES = (
    ("README.md", "this file"),
    (
        "pack.json",
        "the facts of this README, machine-readable (period, filters, seed, counts, policy)",
    ),
    (
        "population.csv",
        "one row per security MR decided in the period, numbered by `position`",
    ),
    ("population.json", "the same MRs, each with its decision trail (`trail`)"),
    (
        "decision-trail.csv",
        "every recorded event of those MRs: kind, decision, actor (username and GitLab"
        " user id), event time, log `seq` and the log row's chain `hash` (hex)",
    ),
    (
        "findings.csv, findings.json",
        "every finding of those MRs, open and resolved, as they stood when the pack was made",
    ),
    (
        "sla-summary.json, sla-tiers.csv, sla-reviewers.csv",
        "SLA figures per risk tier and per reviewer (`secledger report tiers|reviewers`)",
    ),
    ("sample/index.csv", "the sampled MRs: rank, population position, key, file"),
    (
        "sample/NNN-pP-mrM.json",
        "one sampled MR: its population row and every log row in full, raw payload in base64",
    ),
    ("chain/verify.json", "the hash-chain verification run when the pack was made"),
    ("chain/check-chain.sql", "the SQL that re-checks the whole chain with `psql` alone"),
    ("chain/checkpoint-*.json", "the newest signed checkpoint, when one exists"),
    ("chain/checkpoint-key.pem.pub", "the checkpoint public key, when configured"),
    ("MANIFEST.sha256", "SHA-256 of every other file (`sha256sum -c` format)"),
)

REHASH = """\
import base64, csv, hashlib, json, pathlib

def field(name, value):
    return name.encode() + b" " + str(len(value)).encode() + b"\\n" + value + b"\\n"

trail, seqs_of = {}, {}
with open("decision-trail.csv", newline="", encoding="utf-8") as handle:
    for row in csv.DictReader(handle):
        trail[row["seq"]] = row["hash"]
        seqs_of.setdefault(row["position"], []).append(row["seq"])
with open("sample/index.csv", newline="", encoding="utf-8") as handle:
    listed = list(csv.DictReader(handle))
bad = 0
for entry in listed:
    name = entry["file"]
    events = json.loads(pathlib.Path(name).read_text("utf-8"))["events"]
    seqs = [str(event["log"]["seq"]) for event in events]
    if seqs != seqs_of.get(entry["position"], []) or len(seqs) != int(entry["events"]):
        bad += 1  # a row left out, added or moved: the trail and the index say otherwise
        print(name, "events", seqs, "are NOT those of decision-trail.csv and index.csv")
    for event in events:
        log = event["log"]
        canonical = b"secledger.log.v1\\n"
        for key in ("seq", "received_at", "source", "event", "instance", "dedup_key", "headers"):
            canonical += field(key, str(log[key]).encode("utf-8"))
        canonical += field("payload", base64.b64decode(log["payload_base64"]))
        digest = hashlib.sha256(bytes.fromhex(log["prev_hash"]) + canonical).hexdigest()
        before = trail.get(str(int(log["seq"]) - 1), log["prev_hash"])  # when in the trail
        ok = digest == log["hash"] == trail.get(str(log["seq"])) and before == log["prev_hash"]
        bad += not ok
        print(name, log["seq"], "ok" if ok else "MISMATCH")
print("every sampled row rehashes" if bad == 0 else f"{bad} problems: NOT every row checks out")
raise SystemExit(1 if bad else 0)
"""

REDRAW = """\
import csv, random
with open("population.csv", newline="", encoding="utf-8") as handle:
    n = sum(1 for _ in csv.DictReader(handle))
print(sorted(i + 1 for i in random.Random({seed}).sample(range(n), min({size}, n))))
"""


def _filters(pack: Pack) -> str:
    options = pack.options
    chosen = [f"project = `{options.project}`"] if options.project else []
    chosen += [f"risk tier = `{options.tier}`"] if options.tier else []
    return ", ".join(chosen) or "none (every project and tier)"


def _chain(pack: Pack) -> str:
    chain = pack.chain
    if not chain.get("ok"):
        failure = chain.get("failure") or {}
        return (
            f"**BROKEN** at log row seq {failure.get('seq')}: {failure.get('reason')}."
            " Treat every row from there on as unproven."
        )
    text = (
        f"OK: {chain['rows']} rows, seq {chain['first_seq']}..{chain['last_seq']},"
        f" head hash `{chain['head_hash']}` (verified {chain['verified_at']})."
    )
    if pack.checkpoint:
        cp = pack.checkpoint
        kind = "signed" if pack.checkpoint_verified else "stored"
        text += (
            f" Newest {kind} checkpoint: seq {cp['seq']}, key `{cp['key_id']}`,"
            f" signature {cp['signature']}."
        )
    else:
        text += " No signed checkpoint is stored."
    if pack.unsigned and pack.checkpoint_verified:
        rows = pack.unsigned
        text += (
            f" **Log rows seq {rows['first_seq']}..{rows['last_seq']} are newer than that"
            " checkpoint:** no signature covers them, so a rewrite of those rows would"
            " not be detected."
        )
    elif pack.unsigned and pack.checkpoint:
        rows = pack.unsigned
        text += (
            f" **No checked signature covers log rows seq {rows['first_seq']}.."
            f"{rows['last_seq']}:** the stored checkpoint was taken at its word (the"
            " application's login may insert one), so this pack would not show a rewrite"
            " of those rows; check the checkpoint's signature with step 4 below."
        )
    for label in pack.forged:
        text += (
            f" **FORGED** {label}: a checkpoint the key did not sign was inserted into the"
            " database; it was not trusted, and the chain was checked without it."
        )
    return text


def _derived(pack: Pack) -> str:
    derived = pack.derived
    if not derived:
        return "not checked."
    if not derived.get("differences"):
        return (
            "every ledger and event row the population, decisions and trail are read from"
            " is what a rebuild from the log gives (`secledger rebuild --check`, in the"
            " pack's snapshot). Findings and SLA clocks are derived from those rows and are"
            " not compared."
        )
    shown = "".join(f"\n  - {line}" for line in derived.get("first", []))
    return (
        f"**{derived['differences']} rows DIFFER** from a rebuild from the log, so the"
        " population, decisions and trail below may not be what the log says. Either"
        " the derived tables were edited, or they were written under other rules: a"
        " label policy changed since, or an upgrade of secledger whose CHANGELOG asks"
        " for `secledger rebuild`, which rewrites them from the log; then make the pack"
        f" again:{shown}"
    )


def _late(pack: Pack) -> str:
    late = pack.late_dated
    slack = f"{late.get('slack_seconds', 0) // 60} minutes"
    if not late.get("events"):
        return f"no event is dated more than {slack} after its delivery was received."
    shown = "".join(
        f"\n  - position {row['position']}, log seq {row['seq']}: dated"
        f" {isoformat(row['event_at'])}, received {isoformat(row['received_at'])}"
        for row in late["first"]
    )
    return (
        f"**{late['events']} events are dated more than {slack} after their delivery was"
        " received.** GitLab cannot report a time it has not reached, so its clock, the"
        " receiving host's or the payload is wrong, and the decision times and SLA figures"
        " read from those events are not to be relied on"
        f"{_first_of(late['events'], len(late['first']))}:{shown}"
    )


def _first_of(total: int, shown: int) -> str:
    return f" (the first {shown})" if shown < total else ""


def _scope(pack: Pack) -> str:
    options = pack.options
    return f"""\
- **Period:** final decisions at or after {isoformat(options.since)} and before
  {isoformat(options.until)} (UTC).
- **Filters:** {_filters(pack)}.
- **Population:** {pack.population} security merge requests (MRs) whose final decision (merge
  or close) falls in the period, with {pack.events} recorded events (the rows of the
  decision trail: an event two hooks delivered is two rows there, and counts once in
  `event_count`). An MR merged or closed
  and later reopened is not in it; the decision time is the merge (or close) event's time,
  or, when none was recorded, that of the first event showing the MR merged (or closed)
  since it was last shown open: `decided_at_source` says which.
- **Findings:** {pack.findings} findings of those MRs, separation of duties and SLA alike
  (open and resolved).
- **Sample:** {len(pack.sample)} of {pack.population} MRs, **seed {options.seed}**
  (requested size {options.sample}).
- **Ledger snapshot:** log rows up to seq {pack.snapshot_head_seq} were committed when the
  pack was read (one consistent snapshot for every file except `chain/`).
- **Hash chain:** {_chain(pack)}
- **Ledger against the log:** {_derived(pack)}
- **Event times:** {_late(pack)}

The policy configured when the pack was made (`pack.json`'s `policy`). SLA deadlines and
findings were judged as each event was recorded, under the policy in force then: after a
policy change, `secledger findings --reevaluate` judges them all again, and until it runs
a finding's evidence may cite the policy before (its approver list, for one):

{policy_text(policy_json(options.labels, options.policy))}"""


def _rules() -> str:
    rows = "\n".join(f"| `{r.id}` | {r.severity} | {r.meaning} |" for r in RULES.values())
    return f"| rule | default severity | raised when |\n| --- | --- | --- |\n{rows}\n"


def _files() -> str:
    rows = "\n".join(f"| `{name}` | {meaning} |" for name, meaning in FILES)
    return f"| file | content |\n| --- | --- |\n{rows}\n"


def _checkpoint_steps(pack: Pack) -> str:
    """Step 4's text, indented to stay inside the numbered list."""
    if pack.checkpoint is None:
        return "no checkpoint was stored when the pack was made, so there is none to check.\n"
    name = pack.checkpoint["file"]
    key = (
        "`chain/checkpoint-key.pem.pub` (compare it with the key the organisation gave you"
        " independently, in full or by its key id; a key shipped with the evidence proves"
        " nothing alone)"
        if pack.public_key
        else "the organisation's checkpoint public key (PEM, saved as `checkpoint-key.pem.pub`)"
    )
    pem = "chain/checkpoint-key.pem.pub" if pack.public_key else "checkpoint-key.pem.pub"
    return f"""\
`{name}` signs `secledger.checkpoint.v1 LF seq <seq> LF head <hash> LF at <time> LF`
   with Ed25519. The pack writes it from the database: its content, not its bytes, is that
   of the file secledger wrote when it signed (keys in another order). Its `key_id` is the
   first 16 hex digits of SHA-256 over the raw 32-byte public key:
   `openssl pkey -pubin -in {pem} -outform DER | tail -c 32 | sha256sum | cut -c1-16`
   prints it. With {key} and OpenSSL 3, in this directory (the commands write into a new
   temporary directory, not into the pack):

   ```sh
   work=$(mktemp -d)
   python3 -c 'import json, sys; sys.stdout.write(json.load(open(sys.argv[1]))["message"])' \\
     {name} > "$work/message"
   python3 -c 'import base64, json, sys; sys.stdout.buffer.write(base64.b64decode(
     json.load(open(sys.argv[1]))["signature"]))' {name} > "$work/signature"
   openssl pkeyutl -verify -pubin -inkey {pem} -rawin \\
     -in "$work/message" -sigfile "$work/signature"
   ```

   Check that the message spells the file's `seq`, `head_hash` and `signed_at`, and that
   the chain still has that hash at that seq (`chain/verify.json`, or with database
   access `SELECT encode(hash, 'hex') FROM public.delivery_log WHERE seq = <seq>`: with
   the schema, so that no table of another schema is read instead).
"""


def render(pack: Pack) -> str:
    """The pack's README.md."""
    options = pack.options
    redraw = REDRAW.format(seed=options.seed, size=options.sample)
    return f"""\
# Evidence pack: security code reviews

Generated {isoformat(pack.generated_at)} by secledger {__version__} (format
`secledger.evidence.v1`) from a tamper-evident ledger of GitLab merge-request reviews.

## Scope

{_scope(pack)}
## Files

{_files()}
Times are ISO 8601 UTC. In CSV files, lists are space-separated and objects are JSON.
`sla_status` is `met`/`breached` (first review decision by/after the deadline),
`labeled_after_merge`/`labeled_after_close` (merged or closed before the security label:
the clock never ran), `overdue` (labelled while open, merged or closed since with no
review decision recorded, and past the deadline), `running` (the same, before the deadline:
a pack made after it shows the MR `overdue`, with an `sla-breached` finding) or
`no_clock`. Separation of duties can be checked for every MR, sampled or not: `author_id`
(population) and `actor_id` (decision trail, joined on `position`) are GitLab user ids.
An `approved` event whose `actor_id` is its MR's `author_id` is a self-approval (each is
an `author-approved` finding); a `merged` one is the author merging their own change,
which is a finding (`merged-by-author`) only when no approval by anyone else was
standing (see "What each finding means"). An empty `actor_id` is an event whose payload
named no user id. SLA figures follow the report
definitions: per tier, MRs whose security label was applied in the period; per reviewer,
decisions made in the period.

## What each finding means

{_rules()}
## How the sample was drawn

{pack.sample_algorithm}. The same seed and the same population always give the same sample.
To re-draw it (Python 3 standard library), run in this directory:

```python
{redraw}```

The printed positions equal the `position` column of `sample/index.csv`.

## Re-verifying this pack without secledger

1. **The files are those the manifest lists:** `sha256sum -c MANIFEST.sha256` prints
   `OK` for every file. The manifest is not signed: whoever changes a file can write a
   new one. Compare `sha256sum MANIFEST.sha256` with the hash the organisation sent you
   apart from the pack (`secledger evidence` prints it), and record it in your working
   papers.
2. **The sampled rows are the ledger's evidence:** each log row's hash is
   `SHA-256(prev_hash || canonical bytes)`, where the canonical bytes are the header
   `secledger.log.v1` LF followed, for `seq, received_at, source, event, instance,
   dedup_key, headers, payload` in this order, by `<name> SP <byte length> LF <value> LF`
   (the payload is the request body exactly as received). This script (Python 3, standard
   library only) recomputes the hash of every row of the files `sample/index.csv` lists,
   compares it with the stored one and with `decision-trail.csv`, and compares each
   `prev_hash` with the trail's hash of the row before, when the trail has that row:

```python
{REHASH}```

   It also checks that each file holds exactly the rows `decision-trail.csv` lists for
   that MR, as many as `sample/index.csv` says. This shows that each sampled row holds
   what its hash commits to, and that the pack agrees with itself. Only the `log` object
   of each event is proven so: its other fields (`kind`, `decision`, `actor`, ...) are
   secledger's reading of that payload, which you can compare with the decoded
   `payload_base64`. It does not show alone that these hashes are links of the
   organisation's chain: that takes every row from the sampled one to the signed
   checkpoint, which step 3 walks.

3. **The whole chain:** with read access to the database (a login in
   `secledger_readonly`), `psql -X -f chain/check-chain.sql '<database URL>'` recomputes
   every row's canonical bytes and hash with PostgreSQL alone and lists the rows whose
   hash, link or sequence is wrong (psql exits 0 either way: read what it lists), then
   the log's last seq and head hash. An empty list shows the rows present sound, not
   that none is missing at the end: the last seq and head must be at least those of
   `chain/verify.json` (the same walk at pack time; more when rows came since), and the
   checkpoint of step 4 must still be in the chain.
4. **The signed checkpoint:** {_checkpoint_steps(pack)}"""
