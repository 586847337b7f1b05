"""What PostgreSQL itself guarantees: append-only log, chain links, concurrency, NOTIFY."""

from __future__ import annotations

import importlib
import json
import threading

import psycopg
import pytest
from alembic import command
from click.testing import CliRunner
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from builders import dumps, mr_event
from live import live_server
from secledger.cli import main
from secledger.policy import LabelPolicy
from secledger.service import feed
from secledger.store import db, migrate
from secledger.store.chain import GENESIS, LogRow, link
from secledger.store.pipeline import driver

POLICY = LabelPolicy()
HEADERS = {"x-gitlab-event": "Merge Request Hook"}


def record(engine: Engine, body: dict) -> str:
    return feed(engine, POLICY, HEADERS, dumps(body), max_body_bytes=10**6, source="replay").status


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE delivery_log SET source = 'forged'",
        "DELETE FROM delivery_log",
        "TRUNCATE delivery_log CASCADE",
    ],
)
def test_append_only_trigger_refuses_changes_to_the_log(engine: Engine, statement: str) -> None:
    record(engine, mr_event("open"))
    with pytest.raises(DBAPIError, match="append-only"), engine.begin() as conn:
        conn.execute(text(statement))
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM delivery_log")).scalar_one() == 1


def test_each_row_links_to_the_previous_hash(engine: Engine) -> None:
    for action in ("open", "approved", "merge"):
        record(engine, mr_event(action, actor="bob"))
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT * FROM delivery_log ORDER BY seq")).mappings().all()
    previous = GENESIS
    for row in rows:
        as_hashed = LogRow.from_row(row)
        assert bytes(row["prev_hash"]) == previous
        assert bytes(row["hash"]) == link(previous, as_hashed)
        previous = bytes(row["hash"])
    assert [r["seq"] for r in rows] == [1, 2, 3]


HISTORY = [
    ("open", "alice", "2025-08-05 20:00:00 UTC"),
    ("approved", "bob", "2025-08-05 21:00:00 UTC"),
    ("approved", "carol", "2025-08-05 21:30:00 UTC"),
    ("unapproved", "bob", "2025-08-05 22:00:00 UTC"),
    ("merge", "alice", "2025-08-05 23:00:00 UTC"),
]
COMPARED = (
    "state",
    "decision",
    "decided_by",
    "decided_at",
    "approvers",
    "reviewer",
    "merged_by",
    "labeled_at",
    "time_to_decision_seconds",
    "event_count",
    "last_event_at",
)


def test_concurrent_deliveries_for_one_mr_end_like_sequential_ones(engine: Engine) -> None:
    for action, actor, at in HISTORY:
        record(engine, mr_event(action, iid=1, actor=actor, updated_at=at))
    barrier = threading.Barrier(len(HISTORY))

    def send(action: str, actor: str, at: str) -> None:
        barrier.wait()
        record(engine, mr_event(action, iid=2, actor=actor, updated_at=at))

    threads = [threading.Thread(target=send, args=item) for item in HISTORY]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with engine.connect() as conn:
        rows = (
            conn.execute(text("SELECT * FROM security_review_ledger ORDER BY mr_iid"))
            .mappings()
            .all()
        )
    sequential, concurrent = rows
    assert {k: sequential[k] for k in COMPARED} == {k: concurrent[k] for k in COMPARED}
    assert concurrent["approvers"] == ["carol"]


def test_each_committed_change_is_notified(engine: Engine, database_url: str) -> None:
    with psycopg.connect(db.conninfo(database_url), autocommit=True) as listener:
        listener.execute("LISTEN secledger_ledger")
        record(engine, mr_event("approved", iid=5, actor="bob"))
        notes = list(listener.notifies(timeout=5, stop_after=1))
    assert len(notes) == 1
    assert '"mr_iid":5' in notes[0].payload
    assert '"seq":1' in notes[0].payload


def test_an_ignored_delivery_is_not_notified(engine: Engine, database_url: str) -> None:
    with psycopg.connect(db.conninfo(database_url), autocommit=True) as listener:
        listener.execute("LISTEN secledger_ledger")
        assert record(engine, mr_event("open", labels=["docs"])) == "ignored"
        assert list(listener.notifies(timeout=0.5)) == []


def test_connections_give_up_on_a_silent_server_unless_the_url_says_otherwise(
    database_url: str,
) -> None:
    """libpq waits forever by default for a server that does not answer: the writer would
    hang with its batch instead of spooling it. Timeouts and keepalives are set on every
    connection, and one the configured URL sets is kept."""
    url = make_url(database_url).update_query_dict({"connect_timeout": "3"})
    configured = url.render_as_string(hide_password=False)
    engine = db.create(configured)
    try:
        with engine.connect() as conn:
            pooled = driver(conn).info.get_parameters()
    finally:
        engine.dispose()
    with psycopg.connect(db.conninfo(configured)) as conn:
        plain = conn.info.get_parameters()
    for applied in (pooled, plain):
        assert applied["connect_timeout"] == "3"
        for name in ("keepalives", "keepalives_idle", "tcp_user_timeout"):
            assert applied[name] == db.CONNECTION_DEFAULTS[name]


def test_the_environment_and_a_service_file_keep_their_connection_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A value in the URL would override libpq's environment and service file."""
    url = "postgresql://app@db.internal/secledger"

    def options(given: str) -> dict[str, str]:
        told = psycopg.conninfo.conninfo_to_dict(db.conninfo(given))
        return {k: str(v) for k, v in told.items() if k not in {"user", "host", "dbname"}}

    monkeypatch.setenv("PGCONNECT_TIMEOUT", "3")
    assert "connect_timeout" not in options(url)
    assert "keepalives" in options(url)
    monkeypatch.setenv("PGSERVICE", "ledger")
    assert options(url) == {}
    monkeypatch.delenv("PGSERVICE")
    assert options(url + "?service=ledger") == {"service": "ledger"}


def test_0021_repairs_databases_that_ran_earlier_texts_of_0010_and_0014(engine: Engine) -> None:
    """Two migrations changed after some development databases had run them: those are
    stamped done and never got the new text. One whose 0014 added no column (the view
    0021 writes reads it) and whose 0010 made a non-unique body index (every dedup probe
    scanned the log) upgrades to the schema a new database gets."""
    config = migrate.alembic_config()
    index = text(
        "SELECT indisunique FROM pg_index WHERE indexrelid = to_regclass('delivery_log_body')"
    )
    old_0014 = importlib.import_module(
        "secledger.store.migrations.versions.0014_sla_labeled_after_end"
    )
    with engine.connect() as conn:
        assert conn.execute(index).scalar_one() is True
        config.attributes["connection"] = conn
        command.downgrade(config, "0020")
        conn.execute(text(old_0014.DOWNGRADE))  # 0014 as first written: no column
        conn.execute(text("DROP INDEX delivery_log_body_before; DROP INDEX delivery_log_body"))
        conn.execute(
            text(
                "CREATE INDEX delivery_log_body ON delivery_log"
                " ((coalesce(body_sha256, sha256(payload))))"
            )
        )
        command.upgrade(config, "head")
        assert conn.execute(index).scalar_one() is True
        assert conn.execute(text("SELECT to_regclass('delivery_log_body_before')")).scalar()
        conn.execute(text("SET ROLE secledger_readonly"))
        conn.execute(text("SELECT ended_before_label FROM review_sla")).all()
        conn.execute(text("SELECT sla_tier, sla_status FROM bi_sla_status")).all()
        conn.execute(text("RESET ROLE"))
        conn.commit()
    with engine.connect() as conn:
        assert migrate.is_current(conn)


def _downgrade(engine: Engine, revision: str) -> None:
    """Take the test database back to ``revision``, as an older version left it."""
    config = migrate.alembic_config()
    with engine.connect() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, revision)
        conn.commit()


def test_db_upgrade_of_an_older_database_says_to_rebuild(
    engine: Engine, database_url: str, tmp_path
) -> None:
    """Stored rows follow the rules of the version that wrote them: an upgrade says how
    to bring them to this version's (a new database has nothing to say it of)."""
    _downgrade(engine, "0020")
    env = {"SECLEDGER_DATABASE_URL": database_url, "SECLEDGER_DATA_DIR": str(tmp_path)}
    upgraded = CliRunner().invoke(main, ["db", "upgrade"], env=env)
    assert upgraded.exit_code == 0, upgraded.output
    assert "upgraded from 0020: run `secledger rebuild` once" in upgraded.output
    again = CliRunner().invoke(main, ["db", "upgrade"], env=env)
    assert "upgraded from" not in again.output


def test_any_command_that_migrates_an_older_database_says_to_rebuild(
    engine: Engine, database_url: str, tmp_path
) -> None:
    """Every command (and ``serve``) migrates a database that is behind before it runs:
    the advice ``db upgrade`` gives must not be lost when it is not the one that ran."""
    _downgrade(engine, "0020")
    env = {"SECLEDGER_DATABASE_URL": database_url, "SECLEDGER_DATA_DIR": str(tmp_path)}
    listed = CliRunner().invoke(main, ["ledger", "--format", "json"], env=env)
    assert listed.exit_code == 0, listed.output
    assert (
        "the database was upgraded from revision 0020: run `secledger rebuild` once"
    ) in listed.stderr
    assert json.loads(listed.stdout) == []
    again = CliRunner().invoke(main, ["ledger", "--format", "json"], env=env)
    assert "upgraded" not in again.stderr

    # serve, as run: its start migrates too, and says so in its JSON log.
    _downgrade(engine, "0020")
    with live_server(database_url, tmp_path, {"SECLEDGER_WEBHOOK_SECRETS": "t"}) as server:
        logged = [json.loads(x) for x in server.stderr().splitlines() if x.startswith("{")]
    [line] = [line for line in logged if line["event"] == "schema_upgraded"]
    assert line["from_revision"] == "0020"
    assert line["hint"].startswith("run `secledger rebuild` once")
