"""``verify``, ``rebuild``, ``keygen`` and ``checkpoint``: prove the ledger was not changed."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import click
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import Engine
from sqlalchemy.exc import DataError

from secledger import checkpoint as signing
from secledger import integrity
from secledger.errors import SecledgerError
from secledger.policy import LabelPolicy
from secledger.progress import RichTracker, stderr_progress
from secledger.rebuild import describe_key
from secledger.store import db
from secledger.store.verify import ChainBroken, Expected, Summary, log_rows, signed_by, verify
from secledger.tierpolicy import CompliancePolicy

if TYPE_CHECKING:
    from secledger.cli import Context

FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


@contextmanager
def _engine(url: str) -> Iterator[Engine]:
    engine = db.create(url, pool_size=1)
    try:
        yield engine
    finally:
        engine.dispose()


def _public_keys(context: Context, given: tuple[Path, ...]) -> list[Ed25519PublicKey]:
    settings = context.settings
    configured = settings.checkpoint_public_key_file or settings.checkpoint_key_file
    paths = given or ((configured,) if configured is not None else ())
    return [signing.load_public(path) for path in paths]


def _vouched(files: tuple[Path, ...], keys: list[Ed25519PublicKey]) -> list[Expected]:
    if not files:
        return []
    if not keys:
        raise click.ClickException(
            "a checkpoint file proves nothing without the signer's public key:"
            " pass --public-key or set SECLEDGER_CHECKPOINT_PUBLIC_KEY_FILE"
        )
    by_id = {signing.key_id(key): key for key in keys}
    vouched = []
    for path in files:
        read = signing.read_file(path)
        public = by_id.get(read.key_id)
        if public is None:
            given = ", ".join(sorted(by_id))
            raise signing.BadCheckpoint(
                f"checkpoint file {path.name} was signed by key {read.key_id}, not by a key"
                f" given ({given}); pass its public key too (--public-key is repeatable)"
            )
        signing.check_signature(read, public)
        vouched.append(Expected(read.seq, read.head_hash, f"checkpoint file {path.name}"))
    return vouched


FORGED_HINT = (
    "the chain itself is intact (above), but someone inserted checkpoints the key did not"
    " sign: whoever holds a login that may insert into `checkpoints` (serve's), or the"
    " database's owner; find out who, and keep checkpoint files outside the database"
)


def _report(summary: Summary, checked: bool) -> None:
    span = f"seq {summary.first_seq}..{summary.last_seq}" if summary.rows else "empty log"
    click.echo(
        f"chain OK: {summary.rows} rows, {span}, head {summary.head_hash.hex()},"
        f" {summary.seconds:.2f} s"
    )
    signatures = len(summary.trusted) if checked else 0
    forged = len(summary.forged)
    other = len(summary.stored) - signatures - forged if checked else 0
    note = f", {other} signed by another key not used" if other else ""
    note += f", {forged} FORGED" if forged else ""
    click.echo(
        f"checkpoints: {len(summary.matched)} matched"
        f" ({len(summary.stored)} stored, {signatures} stored signatures verified{note})"
    )
    for label in summary.matched:
        click.echo(f"  matches {label}")


@click.command(name="verify")
@click.option(
    "--checkpoint",
    "files",
    multiple=True,
    type=FILE,
    help="A signed checkpoint file the chain must still contain (repeatable).",
)
@click.option(
    "--public-key",
    "public_keys",
    multiple=True,
    type=FILE,
    help="PEM public key that signed checkpoints (repeatable: the keys before and after a"
    " rotation).",
)
@click.pass_obj
def verify_command(
    context: Context, files: tuple[Path, ...], public_keys: tuple[Path, ...]
) -> None:
    """Walk the hash-chained delivery log and prove every row and link.

    Exits 0 with a summary, or 1 naming the first row whose sequence, link or hash is
    wrong and why. Checkpoints stored in the database are always compared; a
    checkpoint FILE (kept outside the database) also catches a rewritten history and
    a removed tail. With a public key (--public-key, else the one configured in
    SECLEDGER_CHECKPOINT_PUBLIC_KEY_FILE or derived from SECLEDGER_CHECKPOINT_KEY_FILE),
    a stored checkpoint whose signature fails is named FORGED, not trusted, and also
    exits 1 (the chain's own verdict is printed apart); without one, stored
    checkpoints are taken at their word. After a key rotation, give the old public key
    and the new one. Reads only: a secledger_readonly login is enough.

    \b
    Example:
      secledger verify
      secledger verify --checkpoint /mnt/worm/checkpoint-000000001234-20261129T120000123456Z.json \\
        --public-key checkpoint-key.pem.pub
      secledger verify --public-key key-2025.pem.pub --public-key key-2026.pem.pub
    """
    try:
        keys = _public_keys(context, public_keys)
        vouched = _vouched(files, keys)
        with _engine(context.database.url) as engine, stderr_progress() as bar:
            advance = RichTracker(bar).task("verifying", log_rows(engine))
            summary = verify(engine, vouched, progress=advance, screen=signed_by(*keys))
    except ChainBroken as exc:
        click.echo(f"chain BROKEN at row seq={exc.seq}: {exc.reason}", err=True)
        raise SystemExit(1) from None
    except SecledgerError as exc:
        click.echo(f"verify failed: {exc}", err=True)
        raise SystemExit(1) from None
    _report(summary, bool(keys))
    if summary.forged:
        for label in summary.forged:
            click.echo(f"FORGED {label}", err=True)
        click.echo(FORGED_HINT, err=True)
        raise SystemExit(1)


def _rebuild_url(context: Context, *, check: bool) -> str:
    """The database rebuild works on: the receiver's for --check when it is configured;
    else the owner's (a release job may hold only that one: not an embedded server),
    which must then be the receiver's database."""
    settings = context.settings
    if check and settings.database_url is not None:
        return context.database.url
    url = db.admin_url(settings, lambda: context.database)
    if not check and settings.database_url is not None:
        try:
            db.check_same_urls(context.database.url, url)
        except SecledgerError as exc:
            raise click.ClickException(str(exc)) from exc
    return url


@click.command(name="rebuild")
@click.option(
    "--check",
    is_flag=True,
    help="Only list the review_events and ledger rows that differ; write nothing.",
)
@click.pass_obj
def rebuild_command(context: Context, check: bool) -> None:
    """Recompute review_events and security_review_ledger from the delivery log alone.

    Every log row goes through the same decoding, extraction and fold as a live
    delivery, under the current label policy; then every MR's SLA clock and findings
    are re-run under the current tier policy, and counted when they change. Prints
    every review_events and ledger row that differs; with --check no derived row is
    written (an older schema is migrated first, as every command but verify and
    checkpoint does), the exit status is 1 when any such row differs, and SLA clocks
    and findings are not compared (docs/integrity.md). Writing needs the owner login
    (SECLEDGER_MIGRATION_DATABASE_URL).

    \b
    Example:
      secledger rebuild --check
      SECLEDGER_MIGRATION_DATABASE_URL=postgresql://secledger_migrator@db/secledger \\
        secledger rebuild
    """
    policy = LabelPolicy.from_settings(context.settings)
    url = _rebuild_url(context, check=check)
    try:
        # Rebuilt by this version's rules into this version's tables: an older schema is
        # migrated first, as every other command does.
        with context.engine(url=url) as engine, stderr_progress() as bar:
            found = integrity.rebuild_ledger(
                engine,
                policy,
                write=not check,
                compliance=CompliancePolicy.from_settings(context.settings),
                tracker=RichTracker(bar),
            )
    except SecledgerError as exc:
        raise click.ClickException(str(exc)) from exc
    except DataError as exc:  # a value written around secledger: verify names the row
        raise click.ClickException(
            f"a log row holds a value that cannot be read ({exc.orig}); run `secledger verify`"
        ) from exc
    for difference in found.differences:
        click.echo(difference.describe())
    verb = "differ from" if check else "were rewritten from"
    click.echo(f"{len(found.differences)} derived rows {verb} the log")
    if check:
        click.echo(
            "SLA clocks and findings are not compared by --check: `secledger rebuild`"
            " re-runs them and counts those that change",
            err=True,
        )
    if not check:
        click.echo(f"{found.rederived} SLA clocks and findings came out different when re-run")
        for key in found.rederived_mrs:
            # Findings may have opened or resolved: past reports and packs change with them.
            click.echo(f"SLA clock or findings changed: {describe_key(key)}")
    if not check and found.differences:
        # No recording happened: no new seq, so watch, the sink and NOTIFY say nothing.
        click.echo(
            "downstream copies (watch, the HTTP sink) were not told: re-read the ledger"
            " there, e.g. `secledger watch --from-seq 1` (docs/downstream.md)",
            err=True,
        )
    if check and found.differences:
        raise SystemExit(1)


@click.command()
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Private key file (default SECLEDGER_CHECKPOINT_KEY_FILE,"
    " else checkpoint-key.pem in the data directory).",
)
@click.pass_obj
def keygen(context: Context, out: Path | None) -> None:
    """Create an Ed25519 key for signing checkpoints (private file mode 0600).

    Writes the public key next to it as FILE.pub and prints it; give the public key to
    auditors. An existing key file is never overwritten.

    \b
    Example:
      secledger keygen --out /etc/secledger/checkpoint-key.pem
    """
    settings = context.settings
    path = out or settings.checkpoint_key_file or settings.data_dir / "checkpoint-key.pem"
    public_path = path.with_name(path.name + ".pub")
    if public_path.exists():
        # An old public key is what auditors check the old checkpoints with.
        raise click.ClickException(
            f"{public_path} exists; refusing to replace a public key (choose another --out)"
        )
    try:
        public = signing.generate(path)
        with public_path.open("xb") as written:
            written.write(signing.public_pem(public))
    except OSError as exc:
        if isinstance(exc, FileExistsError) and exc.filename == str(path):
            message = f"{path} exists; refusing to replace a signing key"
            raise click.ClickException(message) from None
        raise click.ClickException(f"cannot write {exc.filename or path}: {exc.strerror}") from exc
    click.echo(f"private key: {path} (mode 0600)")
    click.echo(f"public key:  {public_path} (key id {signing.key_id(public)})")
    click.echo(signing.public_pem(public).decode(), nl=False)
    configured = context.settings.checkpoint_key_file
    if configured is None or configured.resolve() != path.resolve():
        # serve and checkpoint read the key from the setting only, not from keygen's
        # default place: say how to point them at it.
        click.echo(
            f"to sign with it, set SECLEDGER_CHECKPOINT_KEY_FILE={path} (serve then signs"
            " every SECLEDGER_CHECKPOINT_INTERVAL_MINUTES; `secledger checkpoint` signs now)",
            err=True,
        )


@click.command(name="checkpoint")
@click.option("--key", type=FILE, help="Private key (default SECLEDGER_CHECKPOINT_KEY_FILE).")
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    help="Also write the checkpoint here (default SECLEDGER_CHECKPOINT_DIR).",
)
@click.option(
    "--restored",
    is_flag=True,
    help="Sign although the log no longer holds the head this key signed last: only"
    " after restoring a backup (docs/operations.md).",
)
@click.pass_obj
def checkpoint_command(
    context: Context, key: Path | None, directory: Path | None, restored: bool
) -> None:
    """Sign the current chain head (sequence, hash, time) and store the checkpoint.

    The checkpoint goes into the database and, when a directory is configured, into
    a new JSON file there: keep that directory outside the database's reach (for
    example object-locked storage mounted as a path).

    The head must extend the one this key signed last (the newest checkpoint in the
    directory or the database whose signature holds): a log rewritten or cut since
    is refused, exit 1, unless --restored says a backup was restored.

    \b
    Example:
      SECLEDGER_CHECKPOINT_KEY_FILE=/etc/secledger/checkpoint-key.pem \\
        secledger checkpoint --dir /mnt/worm/secledger
    """
    settings = context.settings
    path = key or settings.checkpoint_key_file
    if path is None:
        raise click.ClickException(
            "no signing key: pass --key or set SECLEDGER_CHECKPOINT_KEY_FILE (see keygen)"
        )
    try:
        private = signing.load_private(path)
        with _engine(context.database.url) as engine:
            signed, file = integrity.take_checkpoint(
                engine, private, directory or settings.checkpoint_dir, restored=restored
            )
    except SecledgerError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(
        f"checkpoint seq={signed.seq} head={signed.head_hash.hex()}"
        f" signed_at={signed.to_json()['signed_at']} key={signed.key_id}"
    )
    if file is not None:
        click.echo(f"written to {file}")
