"""The failed-login limit lives in PostgreSQL: replicas share it and restarts keep it."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy import Engine, text

from chainkit import app_url
from dashboard_fixtures import PASSWORD, USER, post_login, reader_settings
from secledger.dashboard.auth import COOKIE
from secledger.dashboard.throttle import LoginThrottle, client_key, user_key
from secledger.store import db, logins
from secledger.web import create_app

GUESS = "guess-0123456789"
LIMIT = 5


@contextmanager
def instance(database_url: str, data_dir: Path, address: str) -> Iterator[TestClient]:
    """One `serve` replica, as the app login, seen from one client address."""
    url = app_url(database_url)
    settings = reader_settings(database_url, data_dir)
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
    throttle = LoginThrottle(2, timedelta(seconds=300), clock)
    for _ in range(2):
        throttle.settle(engine, throttle.reserve(engine, "alice", "10.0.0.1"), succeeded=False)
    clock.now += timedelta(seconds=299)
    assert not throttle.reserve(engine, "alice", "10.0.0.2").allowed
    assert len(attempts(engine)) == 2
    clock.now += timedelta(seconds=2)
    again = throttle.reserve(engine, "alice", "10.0.0.2")
    assert again.allowed
    assert (again.user_failures, again.client_failures) == (0, 0)
    assert attempts(engine) == [("alice", "10.0.0.2", "pending")]  # the old two deleted


def test_a_success_restarts_the_users_count_and_keeps_the_rows(engine) -> None:
    """Decided: success resets the user's count (not the address's); no row is removed."""
    throttle = LoginThrottle(3, timedelta(seconds=300), Clock())

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
    throttle = LoginThrottle(3, timedelta(seconds=300), Clock())
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
        logins.reserve(conn, logins.Attempt("alice", "10.0.0.1", at), horizon, 5)
        with psycopg.connect(database_url, autocommit=True) as other:
            other.execute("SET lock_timeout = '200ms'")
            key = logins._lock_key("user", "alice")
            with pytest.raises(psycopg.errors.LockNotAvailable):
                other.execute("SELECT pg_advisory_lock(%s, %s)", (logins.LOCK_CLASS, key))
            unrelated = logins._lock_key("user", "bob")
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
        ("auditor", "failed"),
        ("auditor", "succeeded"),
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


def test_login_attempts_is_the_only_new_table_the_app_role_may_delete_from(engine) -> None:
    with engine.connect() as conn:
        deletable = conn.execute(
            text(
                "SELECT table_name FROM information_schema.table_privileges"
                " WHERE grantee = 'secledger_app' AND privilege_type = 'DELETE'"
                " ORDER BY table_name"
            )
        ).scalars()
        assert list(deletable) == ["backfill_cursor", "login_attempts"]


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
