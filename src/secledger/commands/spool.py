"""``secledger spool``: inspect and drain the durable spool of deliveries."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click
import orjson

from secledger.drain import Drainer, DrainResult
from secledger.errors import ConfigError
from secledger.policy import LabelPolicy
from secledger.spool import DrainBusy, Spool, SpoolStatus, SpoolUnavailable
from secledger.times import isoformat

if TYPE_CHECKING:
    from secledger.cli import Context
from secledger.service import Recording
from secledger.store import grants


@click.group(name="spool")
def spool_group() -> None:
    """Deliveries acknowledged while the database was down, waiting to be recorded.

    `serve` drains the spool by itself as soon as the database answers; these commands
    show it and drain it by hand (for example while no receiver is running).

    \b
    Example:
      secledger spool status
      secledger spool drain
    """


def _open(context: Context) -> Spool:
    try:
        return Spool.open(context.settings.spool_path, writer=False)
    except SpoolUnavailable as exc:
        raise click.ClickException(str(exc)) from exc


def status_lines(status: SpoolStatus) -> list[str]:
    """The human-readable status report."""
    oldest = isoformat(status.oldest) or "-"
    if status.problem is not None:
        return [
            f"directory: {status.directory}",
            f"problem:   the directory {status.problem}",
            "writable:  NO (deliveries cannot be kept in an outage)",
        ]
    return [
        f"directory: {status.directory}",
        f"depth:     {status.depth} deliveries waiting",
        f"bytes:     {status.bytes}",
        f"oldest:    {oldest}",
        f"corrupt:   {status.corrupt} (set aside in corrupt/, see the .reason files)",
        f"failed:    {status.failed} (refused on drain, set aside in failed/)",
        f"ignored:   {status.ignored} (no security label on drain, judged again in ignored/)",
        f"writable:  {'yes' if status.writable else 'NO (deliveries cannot be kept in an outage)'}",
    ]


@spool_group.command(name="status")
@click.option(
    "--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True
)
@click.pass_obj
def status_command(context: Context, fmt: str) -> None:
    """Show how many deliveries wait in the spool, how old the oldest is, and its size.

    Exits 0 whatever the depth, also when the directory cannot be used (`writable` is
    then false and `problem` says why); use --format json in monitoring.

    \b
    Example:
      secledger spool status
      secledger spool status --format json | jq .depth
    """
    # Not Spool.open: looking must not create the directory it reports on.
    status = Spool(context.settings.spool_path).status()
    if fmt == "json":
        click.echo(orjson.dumps(status.to_json()).decode())
        return
    click.echo("\n".join(status_lines(status)))


def summary(result: DrainResult) -> str:
    """One line saying what a drain did."""
    return (
        f"recorded {result.recorded}, duplicates {result.duplicates}, "
        f"ignored {result.ignored}, set aside {result.set_aside}, remaining {result.remaining}"
    )


@spool_group.command(name="drain")
@click.option(
    "--batch",
    type=click.IntRange(1, 10_000),
    default=None,
    help="Deliveries recorded per transaction (default: SECLEDGER_MAX_BATCH, 128).",
)
@click.pass_obj
def drain_command(context: Context, batch: int | None) -> None:
    """Record every spooled delivery, oldest first, through the normal recording path.

    Each file is deleted only after its transaction committed; draining twice is
    harmless (the second time a delivery is a duplicate). Exits 3 if the database
    cannot be reached at the start, and 1 if it did not take them before the spool was
    empty (lost on the way, read-only, or a login that may not write): the files stay
    in the spool. Deliveries of MRs without a security label go to the spool's
    ignored/ folder (another replica's spool may still hold the delivery that makes
    their MR a security one): each drain, and serve, first judges those again, queueing
    the ones whose MR is known now and that came after its first logged delivery; 5
    minutes after the move, the others are deleted.

    \b
    Example:
      SECLEDGER_DATABASE_URL=postgresql://secledger@db/secledger secledger spool drain
    """
    spool = _open(context)
    policy = LabelPolicy.from_settings(context.settings)
    with context.engine() as engine:
        try:
            with engine.connect() as conn:
                grants.refuse_unless_recording(conn)
            with spool.draining():
                drainer = Drainer(
                    engine, spool, policy, recording=Recording.from_settings(context.settings)
                )
                drainer.sweep_ignored_logged(all_files=True)
                result = drainer.all(batch or context.settings.max_batch)
        except DrainBusy as exc:
            raise click.ClickException(f"{exc}; `serve` drains it by itself") from exc
        except (SpoolUnavailable, ConfigError) as exc:
            raise click.ClickException(str(exc)) from exc
    click.echo(summary(result))
    if result.unavailable and result.remaining:
        why = f" ({result.why})" if result.why else ""
        raise click.ClickException(
            f"the database did not take them{why}; {result.remaining} deliveries still spooled"
        )
