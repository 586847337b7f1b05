"""``secledger evidence``: write the auditor's evidence pack for a period."""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import click
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy.exc import DataError

from secledger import checkpoint as signing
from secledger import evidence
from secledger.commands.compliance import _when, check_period, known_tier
from secledger.commands.integrity import FORGED_HINT
from secledger.errors import SecledgerError
from secledger.packfiles import MANIFEST
from secledger.policy import LabelPolicy
from secledger.progress import RichTracker, stderr_progress
from secledger.tierpolicy import CompliancePolicy

if TYPE_CHECKING:
    from secledger.cli import Context

SEED_LIMIT = 2**32


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise click.BadParameter(f"{out} exists and is not a directory", param_hint="--out")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise click.BadParameter(
            f"{out} is not empty; choose a new directory or pass --force", param_hint="--out"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file on the way, no permission, a read-only place
        reason = exc.strerror or type(exc).__name__
        raise click.BadParameter(f"cannot create {out}: {reason}", param_hint="--out") from None


def _public_key(context: Context) -> Ed25519PublicKey | None:
    settings = context.settings
    path = settings.checkpoint_public_key_file or settings.checkpoint_key_file
    return signing.load_public(path) if path is not None else None


def _report(pack: evidence.Pack, out: Path, stale: int) -> None:
    options = pack.options
    click.echo(f"evidence pack written to {out}")
    click.echo(f"population: {pack.population} security MRs, {pack.events} events")
    click.echo(f"findings: {pack.findings}")
    click.echo(f"sample: {len(pack.sample)} MRs, seed {options.seed}")
    chain = pack.chain
    if pack.chain_ok:
        click.echo(f"chain OK: {chain['rows']} rows, head {chain['head_hash']}")
    click.echo(f"manifest: {len(pack.files)} files in {MANIFEST} (check: sha256sum -c {MANIFEST})")
    # Not signed: the auditor trusts the manifest by this hash, sent apart from the pack.
    digest = hashlib.sha256((out / MANIFEST).read_bytes()).hexdigest()
    click.echo(f"manifest sha256: {digest} (send it to the auditor apart from the pack)")
    if pack.unsigned and (pack.checkpoint is None or pack.checkpoint_verified):
        rows = pack.unsigned
        click.echo(
            f"note: log rows seq {rows['first_seq']}..{rows['last_seq']} are newer than the"
            " newest signed checkpoint: run `secledger checkpoint` first for a pack whose"
            " every row a signature covers",
            err=True,
        )
    if pack.checkpoint is not None and not pack.public_key:
        click.echo(
            "note: the checkpoint's signature was not checked (no public key: set"
            " SECLEDGER_CHECKPOINT_PUBLIC_KEY_FILE); the pack's README says so, and the"
            " auditor can check it with the README's step 4",
            err=True,
        )
    late = pack.late_dated.get("events")
    if late:
        click.echo(
            f"note: {late} events are dated more than"
            f" {pack.late_dated['slack_seconds'] // 60} minutes after their delivery was"
            " received (a wrong clock or payload); the pack's README lists them",
            err=True,
        )
    if stale:
        note = f"note: {stale} files in {out} were there before and are not in the pack"
        click.echo(note, err=True)


@click.command(name="evidence")
@click.option(
    "--since", required=True, callback=_when, metavar="DATE", help="Decided at or after (UTC)."
)
@click.option(
    "--until", required=True, callback=_when, metavar="DATE", help="Decided before (UTC)."
)
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory to write (new or empty).",
)
@click.option(
    "--sample",
    default=25,
    show_default=True,
    type=click.IntRange(min=0),
    help="How many MRs to sample for testing.",
)
@click.option(
    "--seed",
    type=click.IntRange(0, SEED_LIMIT - 1),
    help="Sample seed (default: a random one, printed and recorded in the pack).",
)
@click.option(
    "--project",
    help="Only this project (id, group/project path in any case, or URL); one the ledger"
    " holds no merge request of is refused.",
)
@click.option("--tier", help="Only this risk tier.")
@click.option("--force", is_flag=True, help="Write into a non-empty directory.")
@click.pass_obj
def evidence_command(  # noqa: PLR0917 - click passes one argument per option
    context: Context,
    since: datetime,
    until: datetime,
    out: Path,
    sample: int,
    seed: int | None,
    project: str | None,
    tier: str | None,
    force: bool,
) -> None:
    """Write the auditor's evidence pack for the security MRs decided in a period.

    The pack holds the population (MRs merged or closed in [--since, --until), CSV and
    JSON) with each MR's decision trail, their findings, the SLA summary per tier and
    per reviewer, a reproducible random sample with every raw log row, the hash-chain
    verification and the newest signed checkpoint, a README.md explaining it all, and
    MANIFEST.sha256. An auditor re-verifies it without secledger (see the pack's
    README.md and docs/evidence.md). Exits 1 (after writing the pack) when the chain
    does not verify, a stored checkpoint is forged, or ledger or event rows differ from
    the log (the pack runs `rebuild --check` in its snapshot).

    \b
    Example:
      secledger evidence --since 2025-07-01 --until 2025-10-01 --out evidence-2025q3
      secledger evidence --since 2025-01-01 --until 2026-01-01 --out ev-2025 \\
        --sample 40 --seed 20260115 --tier critical
      cd evidence-2025q3 && sha256sum -c MANIFEST.sha256
    """
    check_period(since, until)
    _check_out(out, force)
    before = {path for path in out.rglob("*") if path.is_file()}
    options = evidence.Options(
        since=since,
        until=until,
        seed=secrets.randbelow(SEED_LIMIT) if seed is None else seed,
        sample=sample,
        project=project,
        tier=known_tier(context.settings, tier),
        policy=CompliancePolicy.from_settings(context.settings),
        labels=LabelPolicy.from_settings(context.settings),
    )
    click.echo(f"sample seed: {options.seed}", err=True)
    try:
        public = _public_key(context)
        with context.engine() as engine, stderr_progress() as progress:
            pack = evidence.build(
                engine, options, out, public_key=public, tracker=RichTracker(progress)
            )
    except SecledgerError as exc:
        raise click.ClickException(str(exc)) from exc
    except DataError as exc:  # a value written around secledger: the chain is broken there
        raise click.ClickException(
            f"a log row holds a value that cannot be read ({exc.orig}); run `secledger verify`"
            f" to find it. The pack in {out} is incomplete."
        ) from exc
    stale = len(before - {out / name for name in [*pack.files, MANIFEST]})
    _report(pack, out, stale)
    if not pack.chain_ok:
        failure = pack.chain["failure"]
        click.echo(f"chain BROKEN at row seq={failure['seq']}: {failure['reason']}", err=True)
        raise SystemExit(1)
    if not pack.derived_ok:
        click.echo(
            f"{pack.derived['differences']} ledger or event rows differ from the log (the"
            " population and its trail are read from them): `secledger rebuild --check`"
            " lists them. After a policy change or an upgrade that asks for it, run"
            " `secledger rebuild` and make the pack again; otherwise find who edited them",
            err=True,
        )
        raise SystemExit(1)
    if pack.forged:
        for label in pack.forged:
            click.echo(f"FORGED {label}", err=True)
        click.echo(FORGED_HINT, err=True)
        raise SystemExit(1)
