"""The ``secledger`` command: thin commands over the library, each with an example."""

from __future__ import annotations

import gc
import ipaddress
import os
import resource
import signal
import socket
import sys
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from importlib import resources
from pathlib import Path
from typing import Any

import click
import psycopg
import structlog
from pydantic import SecretStr, ValidationError
from sqlalchemy import Engine, text
from sqlalchemy.exc import OperationalError, ProgrammingError

from secledger import __version__, logs, replicapolicy
from secledger.config import (
    Settings,
    describe,
    loose_key_files,
    loose_secret_files,
    overridden_keys,
    unknown_variables,
)
from secledger.errors import IntakeError, SecledgerError
from secledger.keyfiles import ensure_secret_file
from secledger.listener import is_unreachable
from secledger.output import FORMATS, render, terminal_text
from secledger.policy import LabelPolicy
from secledger.projection import LEDGER_COLUMNS
from secledger.service import Recording, feed, ledger_json
from secledger.store import db, grants, ledger, migrate

log = structlog.get_logger("secledger.cli")

TABLE_COLUMNS = (
    "project_path",
    "mr_iid",
    "risk_tier",
    "state",
    "decision",
    "decided_by",
    "reviewer",
    "approvers",
    "time_to_decision_seconds",
)


OWNER_URL_ALONE = (
    "SECLEDGER_MIGRATION_DATABASE_URL is set without SECLEDGER_DATABASE_URL: this command"
    " works on the receiver's database; set SECLEDGER_DATABASE_URL too (only `db upgrade`"
    " and `rebuild` work with the owner's URL alone)"
)


class Context:
    """Settings read once per invocation when a command first needs them, and the
    database opened on demand.

    Read lazily so that ``secledger COMMAND --help`` works with a broken configuration:
    the group runs before a subcommand's ``--help`` is seen.
    """

    def __init__(self) -> None:
        self._settings: Settings | None = None
        self._database: db.Database | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = _load_settings()
            logs.configure(self._settings.log_level)
            for variable, close in unknown_variables(Settings, os.environ):
                # The name only: its value may be a secret.
                log.warning("unknown_setting_ignored", variable=variable, did_you_mean=close)
            for key, variable in overridden_keys(os.environ):
                log.warning("config_file_key_overridden", key=key, variable=variable)
            loose = loose_secret_files(Settings, os.environ) + loose_key_files(self._settings)
            for variable, mode in loose:
                log.warning("secret_file_readable_by_others", variable=variable, mode=f"{mode:o}")
        return self._settings

    @settings.setter
    def settings(self, settings: Settings) -> None:
        self._settings = settings

    @property
    def database(self) -> db.Database:
        """The receiver's database: its URL, else the embedded server, started on first use."""
        if self._database is None:
            if self.settings.database_url is None and db.migration_url(self.settings):
                # It would start the embedded server and work on its database, not the
                # one the owner's URL names (`verify` said "chain OK" of that one).
                raise click.ClickException(OWNER_URL_ALONE)
            try:
                self._database = db.resolve(self.settings)
            except SecledgerError as exc:
                raise click.ClickException(str(exc)) from exc
        return self._database

    @contextmanager
    def engine(
        self, *, upgrade: bool = True, logged: bool = False, url: str | None = None
    ) -> Iterator[Engine]:
        """An engine on the database (through ``url``, else the configured URL), migrated
        first unless ``upgrade`` is False. An upgrade of an older schema is said on
        stderr, or with ``logged`` (``serve``) as the ``schema_upgraded`` log line."""
        engine = db.create(url or self.database.url, pool_size=2)
        try:
            if upgrade:
                before = migrate.ensure_current(engine, db.migration_url(self.settings))
                if before is not None and logged:
                    log.warning("schema_upgraded", from_revision=before, hint=migrate.REBUILD_HINT)
                elif before is not None:
                    click.echo(
                        f"the database was upgraded from revision {before}: "
                        + migrate.REBUILD_HINT,
                        err=True,
                    )
            yield engine
        finally:
            engine.dispose()


pass_context = click.make_pass_decorator(Context)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="secledger")
@click.pass_context
def main(ctx: click.Context) -> None:
    """Record GitLab security merge-request reviews in a tamper-evident PostgreSQL ledger.

    Configuration comes from SECLEDGER_* environment variables and the TOML file named
    by SECLEDGER_CONFIG. With no SECLEDGER_DATABASE_URL, an embedded PostgreSQL is
    started under SECLEDGER_DATA_DIR.

    \b
    Example:
      SECLEDGER_WEBHOOK_SECRETS=s3cret secledger serve --port 8080
    """
    ctx.obj = Context()


def _load_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        raise click.ClickException(f"invalid configuration: {describe(exc)}") from None
    except tomllib.TOMLDecodeError as exc:
        # Its message says where in the file, not which file.
        named = os.environ.get("SECLEDGER_CONFIG", "the configuration file")
        raise click.ClickException(f"invalid configuration: {named} is not TOML: {exc}") from exc
    except ValueError as exc:
        raise click.ClickException(f"invalid configuration: {exc}") from exc


def _has_credentials(settings: Settings) -> bool:
    return bool(
        settings.webhook_secrets or settings.webhook_signing_secrets or settings.webhook_sources
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


SWITCH_INTERVAL_SECONDS = 0.001
# Young, middle and old generation thresholds (the defaults are 700, 10, 10).
GC_THRESHOLDS = (20_000, 50, 50)


def _exit_after_drain(signum: int, frame: object) -> None:
    """SIGTERM, raised again by uvicorn once it has drained: exit through the interpreter.

    uvicorn answers SIGTERM by finishing the requests in flight (the writer commits and
    answers what it holds), then raises the signal again for the handler it found. With
    the default action the process would die at once, before the exit handlers: the log
    lines still queued would be lost, and the embedded PostgreSQL this process started
    would be left running (and, its handle never released, never stopped by a later
    run either).
    """
    raise SystemExit(0)


def _serve(context: Context, host: str, port: int, *, allow_open: bool) -> None:
    import uvicorn  # noqa: PLC0415 - only `serve` needs the server
    from uvicorn.config import STARTUP_FAILURE  # noqa: PLC0415

    from secledger.headlimit import protocol_class  # noqa: PLC0415
    from secledger.senders import sources_from_settings  # noqa: PLC0415
    from secledger.web import check_settings, create_app  # noqa: PLC0415

    # From the start: a stop while the database starts or migrates also exits cleanly.
    signal.signal(signal.SIGTERM, _exit_after_drain)
    settings = context.settings
    default_secrets = bool(settings.webhook_secrets or settings.webhook_signing_secrets)
    if allow_open and not default_secrets:
        settings = settings.model_copy(update={"allow_open_loopback": True})
    # The default source takes deliveries without credentials then (webhook.py), also
    # beside [[webhook_sources]] entries: that is for loopback only, whatever else is set.
    open_default = settings.allow_open_loopback and not default_secrets
    if open_default and not _is_loopback(host):
        raise click.ClickException(
            "--allow-open (SECLEDGER_ALLOW_OPEN_LOOPBACK) accepts deliveries without"
            " credentials and is only allowed on a loopback address"
        )
    if not _has_credentials(settings) and not open_default:
        raise click.ClickException(
            "no webhook secret configured: set SECLEDGER_WEBHOOK_SECRETS (comma-separated for "
            "rotation), SECLEDGER_WEBHOOK_SIGNING_SECRETS or webhook_sources, or pass "
            "--allow-open to accept unauthenticated deliveries on loopback"
        )
    sources_from_settings(settings)  # refuse a bad signing secret or policy before serving
    check_settings(settings)  # and a token or key file that cannot be read
    # Bound before the database starts: a port in use is one line at once, not uvicorn's
    # log line after ``serve_receiving`` (and exit 3, the status of an unreachable database).
    sockets = _listen(host, port)
    _allow_open_files()
    database = context.database
    # Events, not plain lines: the log is JSON, one object per line (docs/operations.md),
    # and a parser that expects that would choke on the first two lines of every start.
    log.info(
        "serve_starting",
        version=__version__,
        database=database.redacted(),
        policy=replicapolicy.digest(settings),
    )
    # Reached and migrated before serving: an outage or a wrong database is then one line
    # and exit 3 (``run``), not uvicorn's start-up traceback after ``serve_receiving``.
    with context.engine(logged=True) as engine, engine.connect() as conn:
        grants.refuse_unless_recording(conn)
    bound = sockets[0].getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    log.info("serve_receiving", url=f"http://{shown}:{bound}/webhooks/gitlab")
    app = create_app(settings, database)
    # What start-up created (modules, FastAPI, SQLAlchemy, settings) lives as long as the
    # process. Frozen, the collector stops re-scanning it: a full collection of it took
    # ~80 ms on the benchmark machine, a pause in answering every request.
    gc.collect()
    gc.freeze()
    # What the writer keeps (up to 4096 merge requests' events) is long-lived but not
    # frozen, and every in-flight request's objects are promoted towards it at each young
    # collection: at the default thresholds a full collection, ~45 ms with the whole
    # process stalled, came every second or two under load. Rarer young collections let
    # request objects die first; recorded deliveries went ~15-25 % faster.
    gc.set_threshold(*GC_THRESHOLDS)
    # The writer thread gives up the interpreter lock for every database round trip and
    # then waits for the busy event loop to hand it back, by default up to 5 ms each
    # time: a fifth of a batch's time under load. At 1 ms recorded deliveries went ~6 %
    # faster (benchmarks/RESULTS.md); ignored ones, with no writer at work, did not change.
    sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)
    config = uvicorn.Config(
        app,
        host=host,
        port=bound,
        log_level="warning",
        # uvicorn's own formatters write plain text; its records go to ours (logs.py).
        log_config=None,
        access_log=False,
        # Idle keep-alive connections are closed after 5 s (slow or idle clients).
        timeout_keep_alive=5,
        # uvicorn's own limit counts open connections too (headlimit.py has the
        # backstop, on requests in progress only).
        limit_concurrency=None,
        server_header=False,
        # Applied by create_app to the dashboard and API only; the webhook needs none.
        proxy_headers=False,
        # httptools, with bounds on each request's head (headlimit.py), and a backstop
        # above the handler's own limit that answers 503 at once.
        http=protocol_class(
            head_timeout=settings.body_timeout_seconds,
            task_limit=max(64, 4 * settings.max_concurrent_deliveries),
        ),
    )
    server = uvicorn.Server(config)
    try:
        server.run(sockets=sockets)
    except KeyboardInterrupt:
        # Ctrl-C, raised again by uvicorn once it has drained: the stop asked for, done
        # cleanly, as after SIGTERM (click would say "Aborted!" and exit 1).
        if not server.started:
            raise
        # A second Ctrl-C forces the exit: deliveries in flight were cut off unanswered.
        raise SystemExit(130 if server.force_exit else 0) from None
    except SystemExit as exc:
        # uvicorn's own start-up failure is 3, the status of an unreachable database.
        if server.started or exc.code != STARTUP_FAILURE:
            raise
        raise click.ClickException("the receiver did not start; the log says why") from None


# uvicorn's default backlog.
LISTEN_BACKLOG = 2048


def _allow_open_files() -> None:
    """Raise the soft limit on open files to the hard one: each connection is one, and a
    receiver out of them accepts no delivery (Debian's soft limit is 1,024)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != soft:
        with suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _listen(host: str, port: int) -> list[socket.socket]:
    """Sockets listening on every address ``host`` names (``localhost`` may be both
    127.0.0.1 and ::1, as uvicorn would serve them), or a usage-level error."""
    try:
        found = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(found):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            # As uvicorn does: a restart need not wait for the old connections' TIME_WAIT.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:  # as asyncio does: "::" is not also 0.0.0.0
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            # Listening now, not when uvicorn starts: with SO_REUSEADDR two processes may
            # both bind a port, and only listen() tells the second one it is taken.
            sock.listen(LISTEN_BACKLOG)
            sock.set_inheritable(True)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        reason = exc.strerror or str(exc)
        raise click.ClickException(f"cannot listen on {host}:{port}: {reason}") from None
    return sockets


@main.command()
@click.option(
    "--host", default=None, help="Address to bind (default from SECLEDGER_HOST: 127.0.0.1)."
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Port (default from SECLEDGER_PORT: 8080).",
)
@click.option(
    "--allow-open",
    is_flag=True,
    help="Accept deliveries without X-Gitlab-Token; loopback addresses only.",
)
@pass_context
def serve(context: Context, host: str | None, port: int | None, allow_open: bool) -> None:
    """Receive GitLab webhooks on POST /webhooks/gitlab.

    Migrates the database first (safe with several replicas starting at once), answers
    200 only after a delivery is committed (202 "spooled" once it is kept on disk, when
    the database is slow or down: see SECLEDGER_SPOOL_AFTER_SECONDS), and serves
    /healthz and /readyz.

    \b
    Example:
      SECLEDGER_WEBHOOK_SECRETS=s3cret secledger serve --host 0.0.0.0 --port 8080
    """
    settings = context.settings
    _serve(
        context,
        host or settings.host,
        settings.port if port is None else port,
        allow_open=allow_open,
    )


@main.group(name="db")
def db_group() -> None:
    """Database administration.

    \b
    Example:
      secledger db upgrade
    """


@db_group.command()
@pass_context
def upgrade(context: Context) -> None:
    """Apply every pending migration (under an advisory lock).

    Connects with SECLEDGER_MIGRATION_DATABASE_URL (a login in secledger_owner) when it
    is set, else with SECLEDGER_DATABASE_URL.

    \b
    Example:
      SECLEDGER_MIGRATION_DATABASE_URL=postgresql://secledger_migrator@db/secledger \\
        secledger db upgrade
    """
    # As the owner login when SECLEDGER_MIGRATION_DATABASE_URL is set (docs/integrity.md).
    admin = db.Database(db.admin_url(context.settings, lambda: context.database), embedded=False)
    if context.settings.database_url is not None:
        try:
            db.check_same_urls(context.database.url, admin.url)
        except SecledgerError as exc:
            raise click.ClickException(str(exc)) from exc
    engine = db.create(admin.url, pool_size=1)
    try:
        with engine.connect() as conn:
            before = migrate.current_revision(conn)
        migrate.upgrade(engine)
        with engine.connect() as conn:
            revision = migrate.current_revision(conn)
    finally:
        engine.dispose()
    click.echo(f"database {admin.redacted()} is at revision {revision}")
    if before is not None and before != revision:
        # Stored rows follow the rules of the version that wrote them until re-derived.
        click.echo(f"upgraded from {before}: {migrate.REBUILD_HINT}", err=True)


def replay_files(context: Context, engine: Engine, paths: list[Path], event: str) -> int:
    """Feed files through the recording path; the number rejected."""
    policy = LabelPolicy.from_settings(context.settings)
    recording = Recording.from_settings(context.settings)
    rejected = 0
    for path in paths:
        try:
            outcome = feed(
                engine,
                policy,
                {"x-gitlab-event": event},
                path.read_bytes(),
                max_body_bytes=context.settings.max_body_bytes,
                source="replay",
                recording=recording,
            )
        except IntakeError as exc:
            rejected += 1
            click.echo(f"{path}: rejected ({exc.status_code} {exc.code}): {exc}")
            continue
        detail = f" seq={outcome.seq}" if outcome.seq else ""
        if outcome.row:
            row = outcome.row
            path_text = terminal_text(str(row["project_path"]))  # a GitLab user's text
            detail += f" {path_text}!{row['mr_iid']} decision={row['decision']}"
        if outcome.reason and outcome.status == "ignored":
            detail += f" ({outcome.reason})"
        click.echo(f"{path}: {outcome.status}{detail}")
    return rejected


@main.command()
@click.argument(
    "files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@click.option(
    "--event",
    default="Merge Request Hook",
    show_default=True,
    help="X-Gitlab-Event to assume for every file.",
)
@pass_context
def replay(context: Context, files: tuple[Path, ...], event: str) -> None:
    """Feed recorded webhook bodies through the same path as the endpoint.

    Prints one line per file with its outcome; exits 1 if any file was rejected.
    Replaying a file twice records it once: the second time it is a duplicate. A file
    ignored the first time (its MR carried no security label yet) is recorded when
    replayed once its MR is known, as a late delivery would be.

    \b
    Example:
      secledger replay deliveries/*.json
      secledger replay --event "System Hook" old-hook.json
    """
    with context.engine() as engine:
        rejected = replay_files(context, engine, list(files), event)
    if rejected:
        raise SystemExit(1)


def ledger_rows(engine: Engine) -> list[dict[str, Any]]:
    """Every ledger row as JSON-ready dicts, oldest event first."""
    with engine.connect() as conn:
        return [ledger_json(row) for row in ledger.rows(conn)]


@main.command(name="ledger")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True)
@pass_context
def ledger_command(context: Context, fmt: str) -> None:
    """Print the security review ledger: one row per security merge request.

    \b
    Example:
      secledger ledger --format json | jq '.[] | select(.decision == "merged")'
      secledger ledger --format csv > ledger.csv
    """
    with context.engine() as engine:
        rows = ledger_rows(engine)
    columns = TABLE_COLUMNS if fmt == "table" else (*LEDGER_COLUMNS, "updated_at")
    text = render(rows, fmt, columns, title=f"security_review_ledger ({len(rows)} rows)")
    if text is not None:
        click.echo(text, nl=False)
        if fmt == "json":
            click.echo()


def demo_files() -> list[Path]:
    """The bundled sample history, in delivery order."""
    folder = resources.files("secledger") / "demo"
    return sorted(Path(str(item)) for item in folder.iterdir() if item.name.endswith(".json"))


def _free(host: str, port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


@main.command()
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    default=8080,
    show_default=True,
    help="Port on 127.0.0.1 to serve on.",
)
@click.option("--no-serve", is_flag=True, help="Replay and print the ledger, then exit.")
@pass_context
def demo(context: Context, port: int, no_serve: bool) -> None:
    """Start the embedded database, replay a sample history, print the ledger, serve.

    The sample history is replayed into an empty log only: run again, the demo serves
    what it recorded.

    This is what `make demo` runs. The webhook secret and the dashboard password of
    user `demo` are generated once and kept in the data directory; the command prints
    where, never the secrets themselves.

    \b
    Example:
      secledger demo
      secledger demo --no-serve
    """
    settings = context.settings
    click.echo(f"database: {context.database.redacted()}")
    with context.engine() as engine:
        with engine.connect() as conn:
            logged = conn.execute(text("SELECT count(*) FROM delivery_log")).scalar_one()
        if logged:
            # Once an MR is known, its sample delivery that was ignored the first time
            # (no label yet) would be recorded: a second demo must not change the ledger.
            click.echo(
                f"the log already holds {logged} deliveries: the sample history is not"
                " replayed again (a new data directory, or an empty database, starts afresh)"
            )
        else:
            click.echo(f"replaying {len(demo_files())} sample deliveries")
            replay_files(context, engine, demo_files(), "Merge Request Hook")
        rows = ledger_rows(engine)
    render(rows, "table", TABLE_COLUMNS, title=f"security_review_ledger ({len(rows)} rows)")
    password_file = _users.ensure_demo_user(settings)
    login = f"(user {_users.DEMO_USER}, password in {password_file})"
    secret_file = settings.data_dir / "webhook-secret"
    # Created with mode 0600 from the start: never readable by others, even briefly.
    secret = ensure_secret_file(secret_file, 32)
    # serve reads no secret from the data directory by itself: the command says where.
    serve = f"SECLEDGER_WEBHOOK_SECRETS_FILE={secret_file} secledger serve"
    if no_serve:
        click.echo(f"\nNot serving (--no-serve). `{serve}` shows the dashboard {login}.")
        return
    if not _free("127.0.0.1", port):
        raise click.ClickException(f"port {port} on 127.0.0.1 is taken; {_free_port_hint(port)}")
    click.echo(f"\nDashboard: http://127.0.0.1:{port}/  {login}")
    click.echo(
        "\nPoint GitLab at it: Settings > Webhooks > Add new webhook\n"
        f"  URL:          http://127.0.0.1:{port}/webhooks/gitlab"
        f" (GitLab must reach it: bind a routable address with `{serve} --host`)\n"
        f"  Secret token: the contents of {secret_file}\n"
        "  Trigger:      Merge request events\n"
        "Try it from another terminal:\n"
        f"{try_it_command(port, secret_file, demo_files()[0])}\n"
        "Stop with Ctrl-C.\n"
    )
    context.settings = settings.model_copy(update={"webhook_secrets": [SecretStr(secret)]})
    _serve(context, "127.0.0.1", port, allow_open=False)


def _free_port_hint(port: int) -> str:
    """A port to try instead of ``port``: one free now, near it."""
    for candidate in range(port + 1, min(port + 100, 65536)):
        if _free("127.0.0.1", candidate):
            return f"try --port {candidate} (make demo DEMO_ARGS='--port {candidate}')"
    return "pass a free one with --port"


def try_it_command(port: int, secret_file: Path, body: Path) -> str:
    """The curl command `demo` prints: two lines joined by a backslash, ready to paste."""
    return (
        "  curl -s -H 'X-Gitlab-Event: Merge Request Hook'"
        f' -H "X-Gitlab-Token: $(cat {secret_file})" \\\n'
        f"       --data-binary @{body} http://127.0.0.1:{port}/webhooks/gitlab"
    )


# The exit status when the database cannot be reached: a scheduled `verify` or
# `reconcile` must tell an outage (try again) from what its exit 1 means (tampering,
# differences).
DATABASE_UNREACHABLE = 3


# Said when a login lacks a privilege (``run``).
WHICH_LOGIN = (
    "Writing commands need the login their docs name: rebuild and db upgrade the owner"
    " (SECLEDGER_MIGRATION_DATABASE_URL), checkpoint and findings --reevaluate"
    " secledger_app or the owner (docs/integrity.md, Roles and logins)"
)


# Undefined table, undefined column: a database never migrated, or by an older version.
_SCHEMA_MISSING = frozenset({"42P01", "42703"})
NO_SCHEMA = (
    "this database does not hold this version's secledger tables. Check that"
    " SECLEDGER_DATABASE_URL names the ledger's database, and run `secledger db upgrade`"
    " (with the owner login) to create or upgrade them"
)


def run() -> None:
    """Console entry point that turns library errors into clean exits."""
    try:
        main(standalone_mode=True)
    except SecledgerError as exc:
        _error(str(exc))
        sys.exit(1)
    except (OperationalError, psycopg.OperationalError) as exc:
        cause = getattr(exc, "orig", None) or exc
        if not is_unreachable(cause):
            raise  # a timeout, a deadlock, a full disk: not an outage to wait out
        # libpq's first line says what failed (refused, timed out, authentication);
        # it names the host and the user, never the password.
        reason = str(cause).strip().splitlines()[0]
        if _refused_login(reason):
            _error(f"the database refused the login: {reason}")
            sys.exit(1)
        if any(text in reason for text in _TLS_SETTINGS):
            # Waiting will not change the server's TLS or the URL's: not an outage.
            _error(f"the database connection's TLS settings failed: {reason}")
            sys.exit(1)
        _error(f"cannot reach the database: {reason}")
        sys.exit(DATABASE_UNREACHABLE)
    except (ProgrammingError, psycopg.errors.InsufficientPrivilege) as exc:
        cause = getattr(exc, "orig", None) or exc
        state = getattr(cause, "sqlstate", None)
        reason = str(cause).strip().splitlines()[0]
        if state == migrate.INSUFFICIENT_PRIVILEGE:
            _error(f"the database login may not do this: {reason}. {WHICH_LOGIN}")
            sys.exit(1)
        if state in _SCHEMA_MISSING:
            # Commands that only read (verify, checkpoint) do not migrate first.
            _error(f"{reason}: {NO_SCHEMA}")
            sys.exit(1)
        raise


def _error(message: str) -> None:
    """The last line of a failed command, after the log lines written before it."""
    logs.flush()
    click.echo(f"Error: {message}", err=True)


# The server answered and refused this login for a reason waiting will not change (a
# wrong database, user or password, pg_hba.conf). libpq gives such errors no SQLSTATE,
# only the server's text; a server whose messages are translated reads as an outage.
_REFUSED_LOGIN = (
    "does not exist",
    "password authentication failed",
    "no pg_hba.conf entry",
    "permission denied for database",
    "is not permitted to log in",
)


# libpq's words for a TLS setting of the URL (sslmode, sslrootcert, ...) that this
# server or its certificate cannot meet. Not "SSL SYSCALL error": a dropped connection.
_TLS_SETTINGS = (
    "server does not support SSL",
    "certificate verify failed",
    "root certificate file",
    "does not match host name",
    "private key file",  # could not load it, or it has group or world access
    "certificate present, but not private key",
    "certificate file",  # could not open it, or could not read it
)


def _refused_login(reason: str) -> bool:
    return "FATAL:" in reason and any(text in reason for text in _REFUSED_LOGIN)


# Commands from other areas register here, one line each.
from secledger.commands import compliance as _compliance  # noqa: E402
from secledger.commands import integrity as _integrity  # noqa: E402
from secledger.commands import users as _users  # noqa: E402
from secledger.commands.backfill import backfill, enrich, reconcile  # noqa: E402
from secledger.commands.downstream import sink_group, watch_command  # noqa: E402
from secledger.commands.evidence import evidence_command  # noqa: E402
from secledger.commands.gitlab import gitlab_group  # noqa: E402
from secledger.commands.spool import spool_group  # noqa: E402
from secledger.commands.users import user_group  # noqa: E402

main.add_command(backfill)
main.add_command(reconcile)
main.add_command(enrich)
main.add_command(gitlab_group)
main.add_command(spool_group)
main.add_command(watch_command)
main.add_command(sink_group)
main.add_command(evidence_command)
main.add_command(_integrity.verify_command)
main.add_command(_integrity.rebuild_command)
main.add_command(_integrity.keygen)
main.add_command(_integrity.checkpoint_command)
main.add_command(_compliance.findings_command)
main.add_command(_compliance.report_command)
main.add_command(user_group)


if __name__ == "__main__":
    run()
