"""Least privilege: the app role appends and never changes the log; triggers stop the rest."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy import text
from sqlalchemy.engine import make_url

from builders import dumps, mr_event
from chainkit import app_url, cli, readonly_url, record_history
from commandline import run_secledger
from secledger.cli import main
from secledger.config import Settings
from secledger.errors import ConfigError
from secledger.policy import LabelPolicy
from secledger.service import feed
from secledger.store import db, grants, migrate
from secledger.web import create_app

DENIED = psycopg.errors.InsufficientPrivilege


def feed_one(engine) -> None:
    """One security delivery through the recording path, without a web app."""
    outcome = feed(
        engine,
        LabelPolicy.from_settings(Settings()),
        {"x-gitlab-event": "Merge Request Hook"},
        dumps(mr_event("open")),
        max_body_bytes=1 << 20,
        source="replay",
    )
    assert outcome.status == "recorded"


def _as(database_url: str, role: str, statement: str) -> None:
    with psycopg.connect(database_url) as conn:
        conn.execute(f"SET ROLE {role}")
        conn.execute(statement)


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE delivery_log SET event = 'Forged Hook'",
        "DELETE FROM delivery_log",
        "TRUNCATE delivery_log CASCADE",
        "UPDATE checkpoints SET seq = 0",
        "DELETE FROM checkpoints",
        "UPDATE review_events SET actor = 'mallory'",
        "DELETE FROM review_events",
        "DELETE FROM security_review_ledger",
        "ALTER TABLE delivery_log DISABLE TRIGGER USER",
        "DROP TRIGGER delivery_log_append_only ON delivery_log",
    ],
)
def test_app_role_is_denied_by_privileges(database_url, statement) -> None:
    """Privileges are checked before any row is read: an empty log proves the point."""
    with pytest.raises(DENIED, match=r"permission denied|must be owner"):
        _as(database_url, "secledger_app", statement)


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE delivery_log SET event = 'x'",
        "DELETE FROM delivery_log",
        "TRUNCATE delivery_log CASCADE",
    ],
)
def test_even_the_owner_is_refused_by_the_append_only_trigger(engine, database_url, statement):
    feed_one(engine)
    with pytest.raises(DENIED, match="the table is append-only"):
        _as(database_url, "secledger_owner", statement)


def test_readonly_role_reads_and_cannot_write(engine, database_url) -> None:
    feed_one(engine)
    with psycopg.connect(database_url) as conn:
        conn.execute("SET ROLE secledger_readonly")
        assert conn.execute("SELECT count(*) FROM delivery_log").fetchone() == (1,)
        with pytest.raises(DENIED):
            conn.execute(
                "INSERT INTO checkpoints (seq, head_hash, signed_at, key_id, signature)"
                " VALUES (0, '\\x00', now(), 'k', '\\x00')"
            )


def test_receiver_records_and_verifies_as_an_app_login(settings, database_url, engine) -> None:
    """The whole live path works with nothing but secledger_app's grants."""
    url = app_url(database_url)
    app_settings = settings.model_copy(update={"database_url": SecretStr(url)})
    with TestClient(create_app(app_settings, db.Database(url, embedded=False))) as client:
        record_history(client)
    assert cli(url, "verify").exit_code == 0
    with engine.connect() as conn:
        owners = (
            conn.execute(
                text("SELECT DISTINCT tableowner FROM pg_tables WHERE schemaname = 'public'")
            )
            .scalars()
            .all()
        )
    assert owners == ["secledger_owner"]


def test_app_login_cannot_migrate_and_says_how(server_url, database_url) -> None:
    """A fresh database: the app login may not create tables, so start-up explains."""
    fresh = "secledger_test_unmigrated"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{fresh}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{fresh}"')
    try:
        fresh_owner = _database(database_url, fresh)
        app = db.create(app_url(fresh_owner), pool_size=1)
        with pytest.raises(ConfigError, match="SECLEDGER_MIGRATION_DATABASE_URL"):
            migrate.ensure_current(app, None)
        migrate.ensure_current(app, fresh_owner)  # with the owner URL it migrates
        with app.connect() as conn:
            assert migrate.is_current(conn)
        app.dispose()
    finally:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{fresh}" WITH (FORCE)')


def test_the_documented_migrator_login_migrates_a_database_it_owns(
    server_url: str, template_url: str
) -> None:
    """docs/integrity.md: a CREATEROLE login in secledger_owner that owns the database
    (the roles exist: the template database's migration made them).
    PostgreSQL 15 and later give nobody CREATE on schema public, which a new table owner
    needs: 0002 was refused with "permission denied for schema public"."""
    fresh, login = "secledger_test_migrator_db", "secledger_test_migrator"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{fresh}" WITH (FORCE)')
        conn.execute(f'DROP ROLE IF EXISTS "{login}"')
        conn.execute(f'CREATE ROLE "{login}" LOGIN CREATEROLE IN ROLE secledger_owner')
        conn.execute(f'CREATE DATABASE "{fresh}" OWNER "{login}"')
    url = make_url(_database(server_url, fresh)).set(username=login, password=None)
    as_migrator = url.render_as_string(hide_password=False)
    # The app's own URL names a login that does not exist: only the migrator's is used,
    # and the message names the database it migrated through.
    as_app = url.set(username="secledger_test_no_such_app").render_as_string(hide_password=False)
    env = {"SECLEDGER_DATABASE_URL": as_app, "SECLEDGER_MIGRATION_DATABASE_URL": as_migrator}
    try:
        result = CliRunner().invoke(main, ["db", "upgrade"], env=env)
        assert result.exit_code == 0, result.output
        assert f"is at revision {migrate.head_revision()}" in result.output
        assert f"//{login}" in result.output
        assert "no_such_app" not in result.output
        with psycopg.connect(_database(server_url, fresh)) as conn:
            owner = conn.execute(
                "SELECT tableowner FROM pg_tables WHERE tablename = 'delivery_log'"
            ).fetchone()
        assert owner == ("secledger_owner",)
    finally:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{fresh}" WITH (FORCE)')
            conn.execute(f'DROP ROLE IF EXISTS "{login}"')


def test_a_database_whose_0002_granted_no_create_on_public_is_repaired_or_explained(
    server_url: str, template_url: str
) -> None:
    """0002 grants secledger_owner CREATE on public only since a later edit, and a
    migration that ran never runs again: databases migrated before then (as a superuser)
    refused every later migration to the documented migrator ("permission denied for
    schema public", blamed on the login). The migrator is told the one statement to run;
    a superuser's upgrade grants it."""
    fresh, login = "secledger_test_old_0002", "secledger_test_member"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{fresh}" WITH (FORCE)')
        conn.execute(f'DROP ROLE IF EXISTS "{login}"')
        conn.execute(f'CREATE ROLE "{login}" LOGIN IN ROLE secledger_owner')
        conn.execute(f'CREATE DATABASE "{fresh}"')
    as_superuser = _database(server_url, fresh)
    as_member = make_url(as_superuser).set(username=login, password=None)
    try:
        migrate.upgrade(db.create(as_superuser, pool_size=1), "0024")
        with psycopg.connect(as_superuser, autocommit=True) as conn:  # as 0002 once left it
            conn.execute("REVOKE CREATE ON SCHEMA public FROM secledger_owner, PUBLIC")
        member = db.create(as_member.render_as_string(hide_password=False), pool_size=1)
        with pytest.raises(ConfigError, match="GRANT CREATE ON SCHEMA public TO secledger_owner"):
            migrate.upgrade(member)
        migrate.upgrade(db.create(as_superuser, pool_size=1))
        migrate.upgrade(member, "0024")  # nothing to do: the member may migrate from now on
        with psycopg.connect(as_superuser) as conn:
            granted = conn.execute(
                "SELECT has_schema_privilege('secledger_owner', 'public', 'CREATE')"
            ).fetchone()
            assert granted == (True,)
        member.dispose()
    finally:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{fresh}" WITH (FORCE)')
            conn.execute(f'DROP ROLE IF EXISTS "{login}"')


def test_a_database_a_newer_version_migrated_is_one_line_not_a_traceback(
    engine, database_url, tmp_path
) -> None:
    """What a rolled-back release or a lagging replica meets."""
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0999'"))
    for args in (["ledger"], ["db", "upgrade"]):
        done = run_secledger(
            *args,
            SECLEDGER_DATABASE_URL=database_url,
            SECLEDGER_DATA_DIR=str(tmp_path / "data"),
        )
        assert done.returncode == 1, done.stderr
        assert "Traceback" not in done.stderr
        assert "revision 0999, which this version of secledger" in done.stderr


def _database(url: str, name: str) -> str:
    return make_url(url).set(database=name).render_as_string(hide_password=False)


def test_findings_reevaluate_records_what_it_re_ran(engine, database_url) -> None:
    """docs/policy.md's step after a policy change. Reading the ledger rows must not
    leave the connection streaming: the writes after it ran as server-side cursors."""
    feed_one(engine)  # an open MR labelled in 2025: overdue by now, no breach recorded
    result = cli(database_url, "findings", "--reevaluate")
    assert result.exit_code == 0, result.output
    assert "re-evaluated 1 merge requests" in result.stderr
    # The re-run itself recorded the breach (id set), so the overdue pass found none.
    listed = json.loads(cli(database_url, "findings", "--format", "json").stdout)
    assert [(item["rule"], type(item["id"])) for item in listed] == [("sla-breached", int)]


def test_a_write_the_login_may_not_make_is_one_line_not_a_traceback(
    engine, database_url, tmp_path
) -> None:
    """``rebuild`` as the receiver's login, ``checkpoint`` as the auditors': each names
    the login it needs instead of a traceback."""
    feed_one(engine)
    with engine.begin() as conn:  # something for rebuild to repair
        conn.execute(text("UPDATE review_events SET actor = 'mallory'"))
    key = tmp_path / "key.pem"
    assert cli(database_url, "keygen", "--out", str(key)).exit_code == 0
    for url, args in (
        (app_url(database_url), ["rebuild"]),
        (readonly_url(database_url), ["checkpoint", "--key", str(key)]),
    ):
        done = subprocess.run(
            [str(Path(sys.executable).parent / "secledger"), *args],
            env={
                "PATH": os.environ["PATH"],
                "SECLEDGER_DATABASE_URL": url,
                "SECLEDGER_DATA_DIR": str(tmp_path / "data"),
            },
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 1, done.stderr
        assert "Traceback" not in done.stderr
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith("Error: the database login may not do this: permission denied")
        assert "SECLEDGER_MIGRATION_DATABASE_URL" in last


def test_a_migration_url_naming_another_database_is_refused(
    database_url, other_database_url, tmp_path
) -> None:
    """After a restore into a new database with only SECLEDGER_DATABASE_URL updated,
    `db upgrade` and `rebuild` worked on the old one and said they were done."""
    env = {"migration_database_url": other_database_url, "data_dir": str(tmp_path / "data")}
    for args in (["db", "upgrade"], ["rebuild"]):
        result = CliRunner().invoke(
            main, args, env={"SECLEDGER_DATABASE_URL": database_url} | _env(env)
        )
        assert result.exit_code == 1, (args, result.output)
        assert "name different databases" in result.output
    # The same database under two logins is what the docs describe: accepted.
    same = {"migration_database_url": database_url, "data_dir": str(tmp_path / "data")}
    assert cli(database_url, "rebuild", **same).exit_code == 0


def test_the_owners_commands_with_only_the_owners_url_start_no_embedded_server(
    database_url, tmp_path
) -> None:
    """`db upgrade` and `rebuild` as their --help shows them (only the migration URL, in
    a release job) initialised an embedded cluster in the data directory, and `rebuild
    --check` checked that empty database."""
    env = {
        "SECLEDGER_DATABASE_URL": None,
        "SECLEDGER_MIGRATION_DATABASE_URL": database_url,
        "SECLEDGER_DATA_DIR": str(tmp_path / "data"),
    }
    for args in (["db", "upgrade"], ["rebuild"], ["rebuild", "--check"]):
        result = CliRunner().invoke(main, args, env=env)
        assert result.exit_code == 0, (args, result.output)
    # Other commands work on the receiver's database, which only its own URL names:
    # `verify` started an embedded server and said "chain OK" of its empty database.
    for args in (["ledger"], ["verify"], ["report", "tiers"], ["spool", "drain"]):
        refused = CliRunner().invoke(main, args, env=env)
        assert refused.exit_code == 1, (args, refused.output)
        assert "SECLEDGER_MIGRATION_DATABASE_URL is set without SECLEDGER_DATABASE_URL" in (
            refused.output
        )
    assert not (tmp_path / "data" / "pg").exists()


def _env(values: dict[str, str]) -> dict[str, str]:
    return {f"SECLEDGER_{k.upper()}": v for k, v in values.items()}


def test_serve_refuses_a_login_that_may_only_read(database_url, tmp_path) -> None:
    """It started, /readyz said ready, and every security delivery was answered 202
    while the drain could never record it."""
    secledger = Path(sys.executable).parent / "secledger"
    done = subprocess.run(
        [str(secledger), "serve", "--port", "0"],
        env={
            "PATH": os.environ["PATH"],
            "SECLEDGER_DATABASE_URL": readonly_url(database_url),
            "SECLEDGER_DATA_DIR": str(tmp_path / "data"),
            "SECLEDGER_WEBHOOK_SECRETS": "a-webhook-secret",
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: this database login may not record deliveries (no INSERT")
    assert "serve_receiving" not in done.stderr


def test_each_privilege_recording_needs_is_asked_on_its_own(database_url) -> None:
    """`has_table_privilege(t, 'INSERT, UPDATE')` is true when either is held: a login
    with INSERT alone on the ledger passed, and every delivery was then set aside."""
    login = "secledger_test_insert_only"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f'DROP ROLE IF EXISTS "{login}"')
        conn.execute(f'CREATE ROLE "{login}"')
        for table, _ in grants.RECORDING:
            conn.execute(f'GRANT INSERT ON {table} TO "{login}"')
    try:
        engine = db.create(database_url, pool_size=1)
        with engine.connect() as conn:
            conn.execute(text(f'SET ROLE "{login}"'))
            missing = grants.missing_to_record(conn)
        engine.dispose()
    finally:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(f'DROP OWNED BY "{login}"')
            conn.execute(f'DROP ROLE "{login}"')
    assert missing == [
        "UPDATE on security_review_ledger",
        "UPDATE on review_sla",
        "UPDATE on findings",
        "USAGE on sequence findings_id_seq",
    ]


def test_reports_and_findings_run_as_a_readonly_login(engine, database_url) -> None:
    """SECURITY.md has auditors report as secledger_readonly: same answers, nothing to skip."""
    feed_one(engine)  # an open MR labelled in 2025: overdue by now, no breach recorded
    auditor = readonly_url(database_url)
    for args in (["report", "open"], ["report", "findings"], ["findings"]):
        result = cli(auditor, *args, "--format", "json")
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)
        assert result.stderr == ""
    listed = json.loads(cli(auditor, "findings", "--format", "json").stdout)
    assert [(item["rule"], item["id"]) for item in listed] == [("sla-breached", None)]
    for flag in ("--refresh-only", "--reevaluate"):
        refused = CliRunner().invoke(
            main, ["findings", flag], env={"SECLEDGER_DATABASE_URL": auditor}
        )
        assert refused.exit_code == 1
        assert "may not write findings" in refused.output
    # The owner's explicit run records the breach the auditor's runs only computed.
    recorded = cli(database_url, "findings", "--refresh-only")
    assert recorded.exit_code == 0
    assert "sla-breached findings recorded or reopened: 1" in recorded.stderr
    listed = json.loads(cli(auditor, "findings", "--format", "json").stdout)
    assert [(item["rule"], type(item["id"])) for item in listed] == [("sla-breached", int)]
