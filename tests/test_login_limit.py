"""The failed-login limit lives in PostgreSQL: replicas share it and restarts keep it."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from alembic import command
from alembic.script import ScriptDirectory
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy import Engine, text

from chainkit import app_url
from dashboard_fixtures import PASSWORD, USER, post_login, reader_settings
from secledger.dashboard.auth import COOKIE, Authenticator
from secledger.dashboard.throttle import (
    LoginThrottle,
    client_key,
    name_key,
    user_digest,
    user_key,
)
from secledger.store import db, logins, migrate
from secledger.web import create_app

GUESS = "guess-0123456789"
LIMIT = 5
# Replicas share the session secret (docs/deployment.md), and with it the name digests.
SESSION_SECRET = "replicas-share-this-session-secret"
KEY = name_key(SESSION_SECRET.encode())
WINDOW = timedelta(seconds=300)
TYPED = "Tr0ub4dor&3-typed-in-the-wrong-field"  # a password in the user name field
DIGEST = re.compile("[0-9a-f]{64}")


def digest_of(name: str) -> str:
    """The user name as login_attempts keeps it."""
    return user_digest(KEY, name)


@contextmanager
def instance(database_url: str, data_dir: Path, address: str) -> Iterator[TestClient]:
    """One `serve` replica, as the app login, seen from one client address."""
    url = app_url(database_url)
    settings = reader_settings(database_url, data_dir, session_secret=SecretStr(SESSION_SECRET))
    settings = settings.model_copy(update={"database_url": SecretStr(url)})
    app = create_app(settings, db.Database(url, embedded=False))
    with TestClient(app, client=(address, 50000)) as client:
        yield client


def attempts(engine: Engine) -> list[tuple[str, str, str]]:
    """Every stored attempt: user, client, outcome (oldest first)."""
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT user_name, client, outcome FROM login_attempts ORDER BY id")
        )
        return [tuple(row) for row in rows]


class Clock:
    """A settable wall clock for the throttle."""

    def __init__(self) -> None:
        self.now = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


def test_two_replicas_share_one_users_failures(database_url, tmp_path, engine) -> None:
    """Three guesses on one replica and two on another use up the user's five."""
    with (
        instance(database_url, tmp_path / "a", "10.0.0.1") as first,
        instance(database_url, tmp_path / "b", "10.0.0.2") as second,
    ):
        for client in (first, first, first, second, second):
            assert post_login(client, USER, GUESS).status_code == 401
        for client in (first, second):
            blocked = post_login(client, USER, PASSWORD)
            assert blocked.status_code == 429
            assert COOKIE not in blocked.cookies
    assert [outcome for _, _, outcome in attempts(engine)] == ["failed"] * LIMIT


def test_two_replicas_share_one_clients_failures(database_url, tmp_path) -> None:
    """Guessing at five user names from one address, across replicas, blocks that address."""
    with (
        instance(database_url, tmp_path / "a", "10.0.0.7") as first,
        instance(database_url, tmp_path / "b", "10.0.0.7") as second,
    ):
        for number in range(LIMIT):
            client = first if number % 2 else second
            assert post_login(client, f"user{number}", GUESS).status_code == 401
        assert post_login(first, USER, PASSWORD).status_code == 429
        assert post_login(second, USER, PASSWORD).status_code == 429
    with instance(database_url, tmp_path / "a", "10.0.0.8") as elsewhere:
        assert post_login(elsewhere, USER, PASSWORD).status_code == 303


def test_the_limit_survives_a_restart(database_url, tmp_path) -> None:
    with instance(database_url, tmp_path / "a", "10.0.0.1") as before:
        for _ in range(LIMIT):
            assert post_login(before, USER, GUESS).status_code == 401
    with instance(database_url, tmp_path / "a", "10.0.0.2") as after:
        assert post_login(after, USER, PASSWORD).status_code == 429


def test_failures_leave_the_count_after_the_window_and_are_pruned(engine) -> None:
    clock = Clock()
    throttle = LoginThrottle(2, WINDOW, clock, key=KEY)
    for _ in range(2):
        throttle.settle(engine, throttle.reserve(engine, "alice", "10.0.0.1"), succeeded=False)
    clock.now += timedelta(seconds=299)
    assert not throttle.reserve(engine, "alice", "10.0.0.2").allowed
    assert len(attempts(engine)) == 2
    clock.now += timedelta(seconds=2)
    again = throttle.reserve(engine, "alice", "10.0.0.2")
    assert again.allowed
    assert (again.user_failures, again.client_failures) == (0, 0)
    assert attempts(engine) == [(digest_of("alice"), "10.0.0.2", "pending")]  # old two deleted


def test_a_success_restarts_the_users_count_and_keeps_the_rows(engine) -> None:
    """Decided: success resets the user's count (not the address's); no row is removed."""
    throttle = LoginThrottle(3, WINDOW, Clock(), key=KEY)

    def attempt(name: str, host: str, *, ok: bool) -> bool:
        reservation = throttle.reserve(engine, name, host)
        if reservation.allowed:
            throttle.settle(engine, reservation, succeeded=ok)
        return reservation.allowed

    assert attempt("alice", "10.0.0.1", ok=False)
    assert attempt("alice", "10.0.0.2", ok=False)
    assert attempt("alice", "10.0.0.3", ok=True)
    for host in ("10.0.0.4", "10.0.0.5", "10.0.0.6"):
        assert attempt("alice", host, ok=False)  # three more: the count began again
    assert not attempt("alice", "10.0.0.7", ok=True)
    outcomes = [outcome for _, _, outcome in attempts(engine)]
    assert outcomes == ["failed", "failed", "succeeded", "failed", "failed", "failed"]
    # The address's failures are not forgiven by a success of any user from it.
    assert attempt("bob", "10.0.0.9", ok=False)
    assert attempt("bob", "10.0.0.9", ok=True)
    assert attempt("carol", "10.0.0.9", ok=False)
    assert attempt("dave", "10.0.0.9", ok=False)
    assert not attempt("erin", "10.0.0.9", ok=True)


def test_checks_in_progress_count_so_concurrent_guesses_stay_within_the_limit(
    engine, database_url
) -> None:
    """A reserved check is a failure until settled: twenty at once get three checks."""
    throttle = LoginThrottle(3, WINDOW, Clock(), key=KEY)
    for host in ("10.0.0.1", "10.0.0.2", "10.0.0.3"):
        assert throttle.reserve(engine, "alice", host).allowed
    assert not throttle.reserve(engine, "alice", "10.0.0.4").allowed
    other = db.create(database_url, pool_size=10)  # a second replica's pool
    try:
        barrier = threading.Barrier(20)
        allowed: list[bool] = []

        def guess(number: int) -> None:
            barrier.wait()
            answer = throttle.reserve(engine if number % 2 else other, "bob", f"10.1.0.{number}")
            allowed.append(answer.allowed)

        threads = [threading.Thread(target=guess, args=(n,)) for n in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        other.dispose()
    assert sorted(allowed) == [False] * 17 + [True] * 3


def test_an_attempt_holds_its_users_lock_until_it_commits(engine, database_url) -> None:
    """The count and the insert are one step for everyone else: a second check waits."""
    at = datetime(2026, 12, 1, tzinfo=UTC)
    horizon = at - timedelta(minutes=5)
    with engine.begin() as conn:
        logins.reserve(conn, logins.Attempt(digest_of("alice"), "10.0.0.1", at), horizon, 5)
        with psycopg.connect(database_url, autocommit=True) as other:
            other.execute("SET lock_timeout = '200ms'")
            key = logins._lock_key("user", digest_of("alice"))
            with pytest.raises(psycopg.errors.LockNotAvailable):
                other.execute("SELECT pg_advisory_lock(%s, %s)", (logins.LOCK_CLASS, key))
            unrelated = logins._lock_key("user", digest_of("bob"))
            other.execute("SELECT pg_advisory_lock(%s, %s)", (logins.LOCK_CLASS, unrelated))


def test_user_names_and_addresses_are_counted_normalised() -> None:
    assert user_key("  \uff21LICE ") == user_key("alice") == "alice"
    assert user_key("a\x00b") == "a\ufffdb"
    assert len(user_key("x" * 10_000)) == 256
    assert (
        client_key("2001:db8:1:2:3:4:5:6") == client_key("2001:db8:1:2::9") == "2001:db8:1:2::/64"
    )
    assert client_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert client_key("192.0.2.7") == "192.0.2.7"
    assert client_key("testclient") == "testclient"


def test_the_password_is_never_stored(database_url, tmp_path, engine) -> None:
    with instance(database_url, tmp_path / "a", "10.0.0.1") as client:
        assert post_login(client, "Auditor", GUESS).status_code == 401
        assert post_login(client, USER, PASSWORD).status_code == 303
    with engine.connect() as conn:
        stored = conn.execute(text("SELECT login_attempts::text FROM login_attempts")).scalars()
        dump = "\n".join(stored)
    assert GUESS not in dump
    assert PASSWORD not in dump
    assert [(user, outcome) for user, _, outcome in attempts(engine)] == [
        (digest_of(USER), "failed"),
        (digest_of(USER), "succeeded"),
    ]


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE login_attempts SET user_name = 'x'",
        "UPDATE login_attempts SET attempted_at = now()",
        "TRUNCATE login_attempts",
    ],
)
def test_app_role_changes_only_the_outcome(database_url, statement) -> None:
    with psycopg.connect(database_url) as conn:
        conn.execute("SET ROLE secledger_app")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(statement)


def test_the_app_role_may_delete_only_from_its_bookkeeping_tables(engine) -> None:
    with engine.connect() as conn:
        deletable = conn.execute(
            text(
                "SELECT table_name FROM information_schema.table_privileges"
                " WHERE grantee = 'secledger_app' AND privilege_type = 'DELETE'"
                " ORDER BY table_name"
            )
        ).scalars()
        assert list(deletable) == ["backfill_cursor", "ended_sessions", "login_attempts"]


def test_ended_sessions_are_serves_alone(database_url) -> None:
    with psycopg.connect(database_url) as conn:
        conn.execute("SET ROLE secledger_app")
        conn.execute("INSERT INTO ended_sessions VALUES ('abc', now())")
        conn.execute("DELETE FROM ended_sessions WHERE expires_at <= now()")
        conn.execute("RESET ROLE")
        conn.execute("SET ROLE secledger_readonly")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT 1 FROM ended_sessions")


def test_a_trusted_proxys_forwarded_address_is_the_client_counted(
    database_url, tmp_path, engine
) -> None:
    """serve runs uvicorn without proxy headers; the app applies them to the dashboard."""
    with instance(database_url, tmp_path / "a", "127.0.0.1") as proxied:
        proxied.headers["x-forwarded-for"] = "203.0.113.9"
        assert post_login(proxied, USER, GUESS).status_code == 401
    with instance(database_url, tmp_path / "b", "10.0.0.7") as untrusted:
        untrusted.headers["x-forwarded-for"] = "203.0.113.10"  # not from a trusted proxy
        assert post_login(untrusted, USER, GUESS).status_code == 401
    assert [client for _, client, _ in attempts(engine)] == ["203.0.113.9", "10.0.0.7"]


def test_a_name_typed_at_the_form_is_stored_only_as_a_keyed_digest(
    database_url, tmp_path, engine
) -> None:
    """A password typed into the user name field never reaches login_attempts, in any
    spelling; a configured user's name is digested too."""
    with instance(database_url, tmp_path / "a", "10.0.0.1") as client:
        assert post_login(client, TYPED, GUESS).status_code == 401
        assert post_login(client, TYPED.upper(), GUESS).status_code == 401
        assert post_login(client, USER, PASSWORD).status_code == 303
    with engine.connect() as conn:
        dump = "\n".join(
            conn.execute(text("SELECT login_attempts::text FROM login_attempts")).scalars()
        )
    for secret in (TYPED, TYPED.upper(), user_key(TYPED), GUESS, PASSWORD, USER):
        assert secret not in dump
    names = [user for user, _, _ in attempts(engine)]
    assert names == [digest_of(TYPED), digest_of(TYPED), digest_of(USER)]
    assert all(DIGEST.fullmatch(name) for name in names)


def test_typed_names_trip_the_limit_at_the_same_counts(engine) -> None:
    """Digests count exactly as names did: spellings of one name share its count, from
    any address, until the limit; another name and the client's count are untouched."""
    throttle = LoginThrottle(LIMIT, WINDOW, Clock(), key=KEY)
    spellings = [TYPED, TYPED.upper(), f"  {TYPED} ", TYPED.lower(), TYPED.swapcase()]
    for number, spelling in enumerate(spellings):
        answer = throttle.reserve(engine, spelling, f"10.0.0.{number}")
        assert (answer.allowed, answer.user_failures) == (True, number)
        throttle.settle(engine, answer, succeeded=False)
    refused = throttle.reserve(engine, TYPED, "10.0.0.9")
    assert (refused.allowed, refused.user_failures, refused.client_failures) == (False, 5, 0)
    assert throttle.reserve(engine, "another-name", "10.0.0.9").allowed


def test_a_users_limit_holds_across_authenticators_that_share_the_secret(
    database_url, tmp_path, engine
) -> None:
    """Two replicas (their own data directories, one SECLEDGER_SESSION_SECRET) share a
    user's failures; a replica with another secret would count the user apart, which
    is why replicas need the same secret."""

    def replica(name: str, secret: str) -> tuple[Authenticator, LoginThrottle]:
        settings = reader_settings(database_url, tmp_path / name, session_secret=SecretStr(secret))
        return Authenticator(settings), LoginThrottle.from_settings(settings)

    first, second = replica("a", SESSION_SECRET), replica("b", SESSION_SECRET)
    for number, (auth, throttle) in enumerate([first, second] * 2 + [first]):
        reservation = throttle.reserve(engine, USER, f"10.0.0.{number}")
        assert reservation.allowed
        throttle.settle(engine, reservation, succeeded=auth.check_password(USER, GUESS))
    for _, throttle in (first, second):
        refused = throttle.reserve(engine, USER, "10.0.0.9")
        assert (refused.allowed, refused.user_failures) == (False, LIMIT)
    _, elsewhere = replica("c", "another-session-secret")
    assert elsewhere.reserve(engine, USER, "10.0.0.9").allowed
    assert {user for user, _, _ in attempts(engine)} == {
        digest_of(USER),
        user_digest(name_key(b"another-session-secret"), USER),
    }


def test_postgresql_refuses_a_user_name_that_is_not_a_digest(database_url) -> None:
    """Whatever the code, no plain name can be stored: not even the owner may."""
    with psycopg.connect(database_url) as conn, pytest.raises(psycopg.errors.CheckViolation):
        conn.execute(
            "INSERT INTO login_attempts (attempted_at, user_name, client)"
            " VALUES (now(), %s, '10.0.0.1')",
            (user_key(TYPED),),
        )


def test_the_readonly_role_cannot_read_login_attempts(database_url) -> None:
    """BI logins (secledger_readonly) read the ledger, not the login counter."""
    with psycopg.connect(database_url) as conn:
        conn.execute("SET ROLE secledger_readonly")
        conn.execute("SELECT count(*) FROM delivery_log")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT count(*) FROM login_attempts")


MIGRATION = "0016"  # login_attempts keeps name digests


def test_the_migration_overwrites_stored_names_and_keeps_the_clients_count(engine) -> None:
    """Rows from before keep counting for their client; their names are gone; the
    downgrade gives the read back and the upgrade applies again."""
    script = ScriptDirectory.from_config(migrate.alembic_config()).get_revision(MIGRATION)
    assert script is not None
    before = script.down_revision
    assert isinstance(before, str)
    config = migrate.alembic_config()
    insert = text(
        "INSERT INTO login_attempts (attempted_at, user_name, client, outcome)"
        " VALUES (now(), :name, '10.0.0.5', 'failed')"
    )
    with engine.connect() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, before)
        for name in (user_key(TYPED), USER, "alice"):
            conn.execute(insert, {"name": name})
        command.upgrade(config, "head")
        conn.commit()
    assert [user for user, _, _ in attempts(engine)] == ["0" * 64] * 3
    throttle = LoginThrottle(LIMIT, WINDOW, key=KEY)
    counted = throttle.reserve(engine, USER, "10.0.0.5")
    assert (counted.user_failures, counted.client_failures) == (0, 3)
    with engine.connect() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, before)
        conn.execute(text("SET ROLE secledger_readonly"))
        assert conn.execute(text("SELECT count(*) FROM login_attempts")).scalar_one() == 4
        conn.execute(text("RESET ROLE"))
        command.upgrade(config, "head")
        conn.commit()
    with engine.connect() as conn:
        assert migrate.is_current(conn)
