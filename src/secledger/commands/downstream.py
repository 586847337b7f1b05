"""``secledger watch`` and ``secledger sink``: ledger changes for downstream systems."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import click
import orjson
from sqlalchemy import Engine

from secledger.errors import ConfigError, SecledgerError
from secledger.sink import Sender, SinkConfig
from secledger.store import changes, db, outbox
from secledger.watch import LogReplaced, StateFile, Watcher

if TYPE_CHECKING:
    from secledger.cli import Context


@contextmanager
def stopped_by_signals(stop: threading.Event) -> Iterator[None]:
    """Turn SIGINT and SIGTERM into ``stop`` (finish the line in hand, then exit 0)."""

    def handler(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def start_after(engine: Engine, from_seq: int | None, state: StateFile | None) -> int:
    """The seq to emit after: --from-seq, else the state file, else the current head."""
    if from_seq is not None:
        return from_seq - 1
    if state is not None:
        position = state.position()
        # A state file that does not exist yet means a new consumer: give it everything.
        if position is None:
            return 0
        saved = position.seq
        with engine.connect() as conn:
            head = changes.head(conn)
            found = changes.hash_at(conn, saved) if position.hash is not None else None
        if saved > head:
            # A log restored from an older backup: its new deliveries take seqs up to the
            # saved one again, and would never be emitted.
            raise ConfigError(
                f"{state.path} says seq {saved} was emitted, but the log ends at seq {head}"
                " (restored from an older backup?); pass --from-seq to say where to resume"
            )
        if position.hash is not None and found != position.hash:
            # The same, once new deliveries have passed the saved seq: the row there now
            # is another delivery's, and those after the backup were never emitted.
            raise ConfigError(
                f"{state.path} says seq {saved} was emitted, but the log's row at seq"
                f" {saved} is another one (restored from an older backup, and written on"
                " since?); pass --from-seq to say where to resume"
            )
        return saved
    with engine.connect() as conn:
        return changes.head(conn)


@click.command(name="watch")
@click.option(
    "--from-seq",
    type=click.IntRange(min=1),
    default=None,
    help="Start at this log seq (inclusive); overrides the state file.",
)
@click.option(
    "--state-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Resume after the seq saved here; save the last emitted seq after each read.",
)
@click.pass_obj
def watch_command(context: Context, from_seq: int | None, state_file: Path | None) -> None:
    """Stream ledger changes as JSON lines on stdout, one per change, until stopped.

    Each line is {"seq", "seqs", "instance", "project_id", "mr_iid", "ledger"}: the
    merge request's ledger row as it is when read, and the log seqs it covers. Several
    seqs of one merge request read together make one line, at its highest seq.

    Starts at --from-seq, else after the seq in --state-file, else (no state file yet:
    from the first seq; no --state-file at all: from now). Catches up from the
    database, then follows LISTEN secledger_ledger. SIGINT/SIGTERM stop it cleanly.

    \b
    Example:
      secledger watch --state-file /var/lib/secledger/watch.state | my-consumer
      secledger watch --from-seq 1 | jq 'select(.ledger.decision == "merged")'
    """
    state = StateFile(state_file) if state_file is not None else None
    stop = threading.Event()
    with context.engine() as engine:
        try:
            if state is not None:
                state.probe()
            after = start_after(engine, from_seq, state)
        except SecledgerError as exc:
            raise click.ClickException(str(exc)) from exc
        click.echo(f"watching ledger changes after seq {after}", err=True)
        watcher = Watcher(
            engine=engine,
            conninfo=db.conninfo(context.database.url),
            out=sys.stdout,
            last_seq=after,
            stop=stop,
            state=state,
        )
        with stopped_by_signals(stop):
            try:
                watcher.run()
            except LogReplaced as exc:
                raise click.ClickException(str(exc)) from exc
            except BrokenPipeError:
                # The reader went away: the line in hand was not delivered, so its seq
                # was not saved. Silence the interpreter's own flush at exit.
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    click.echo(f"stopped after seq {watcher.last_seq} ({watcher.emitted} lines)", err=True)


@click.group(name="sink")
def sink_group() -> None:
    """The optional HTTP sink: each new ledger row POSTed to SECLEDGER_SINK_URL.

    `serve` delivers in the background; these commands show the outbox and drain it by
    hand (for example while no receiver is running).

    \b
    Example:
      secledger sink status
      SECLEDGER_SINK_URL=https://siem.example.com/secledger secledger sink drain
    """


@sink_group.command(name="status")
@click.option(
    "--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True
)
@click.pass_obj
def sink_status_command(context: Context, fmt: str) -> None:
    """Show pending, failed and delivered outbox rows and the latest error.

    "failed" counts pending rows with at least one failed attempt. Exits 0 whatever
    the counts; use --format json in monitoring.

    \b
    Example:
      secledger sink status
      secledger sink status --format json | jq .pending
    """
    with context.engine() as engine, engine.connect() as conn:
        status = outbox.status(conn)
    data = status.to_json() | {"configured": context.settings.sink_enabled}
    if fmt == "json":
        click.echo(orjson.dumps(data).decode())
        return
    width = max(len(name) for name in data)
    for name, value in data.items():
        click.echo(f"{name + ':':<{width + 1}} {'-' if value is None else value}")


@sink_group.command(name="drain")
@click.pass_obj
def sink_drain_command(context: Context) -> None:
    """Deliver every pending outbox row now, in order, then exit.

    Each row is retried up to SECLEDGER_SINK_MAX_ATTEMPTS times with backoff; exits 1
    if a row still fails (it stays pending, nothing after it is sent) or if another
    sender (a running `serve`) holds the sink.

    \b
    Example:
      SECLEDGER_SINK_URL=https://siem.example.com/secledger secledger sink drain
    """
    try:
        config = SinkConfig.from_settings(context.settings)
    except SecledgerError as exc:
        raise click.ClickException(str(exc)) from exc
    with context.engine() as engine:
        sender = Sender(engine, config)
        try:
            result = sender.drain()
        finally:
            sender.close()
        with engine.connect() as conn:
            pending = outbox.status(conn).pending
    click.echo(f"delivered {result.delivered}, pending {pending}")
    if result.busy:
        raise click.ClickException("another sender is delivering (a running `serve`?)")
    if result.stuck_seq is not None:
        tries = "1 attempt" if config.max_attempts == 1 else f"{config.max_attempts} attempts"
        raise click.ClickException(
            f"seq {result.stuck_seq} still fails after {tries} ({result.error}); it stays pending"
        )
