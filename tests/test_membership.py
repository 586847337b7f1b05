"""The in-memory set of ledger keys the receiver uses to ignore non-security MRs cheaply."""

from __future__ import annotations

from typing import Any

import psycopg
import structlog

from builders import dumps, mr_event
from replicas import recorded_elsewhere, wait_for
from secledger import membership
from secledger.config import Settings
from secledger.extract import MRKey
from secledger.membership import KnownMRs
from secledger.policy import LabelPolicy
from secledger.service import feed
from secledger.store import db
from secledger.times import utcnow

KEY = MRKey("https://gitlab.example.com", 14, 1)


def test_keys_written_before_listening_are_not_missed(engine, database_url) -> None:
    """A row committed between load() and LISTEN (or while the listener was reconnecting)
    sends its NOTIFY to nobody; the listener reads the keys again once it listens."""
    known = KnownMRs()
    known.load(engine)
    assert KEY not in known
    # Another replica records the MR now: its NOTIFY reaches no listener.
    policy = LabelPolicy.from_settings(Settings())
    headers = {"x-gitlab-event": "Merge Request Hook"}
    outcome = feed(
        engine, policy, headers, dumps(mr_event("open")), max_body_bytes=1 << 20, source="replay"
    )
    assert outcome.status == "recorded"
    known.listen(db.conninfo(database_url))
    try:
        assert wait_for(lambda: KEY in known)
    finally:
        known.close()


def test_the_follower_reads_the_ledger_in_public_not_a_copy_in_the_logins_schema(
    engine, database_url
) -> None:
    """Its raw connection does not get the engine's search path: an empty copy in a
    schema named after the login hid every known MR, and their unlabelled deliveries
    were ignored."""
    policy = LabelPolicy.from_settings(Settings())
    headers = {"x-gitlab-event": "Merge Request Hook"}
    outcome = feed(
        engine, policy, headers, dumps(mr_event("open")), max_body_bytes=1 << 20, source="replay"
    )
    assert outcome.status == "recorded"
    with psycopg.connect(database_url, autocommit=True) as conn:
        login = conn.execute("SELECT current_user").fetchone()[0]  # type: ignore[index]
        conn.execute(f'CREATE SCHEMA "{login}"')
        conn.execute(
            f'CREATE TABLE "{login}".security_review_ledger'
            " AS TABLE public.security_review_ledger WITH NO DATA"
        )
    known = KnownMRs()
    known.listen(db.conninfo(database_url))
    try:
        assert wait_for(lambda: KEY in known)
    finally:
        known.close()


def test_the_follower_goes_on_after_an_error_that_is_not_the_database(
    engine, database_url, monkeypatch
) -> None:
    """A follower thread that died on an unexpected error would let every later key of
    another replica go unseen, with no sign of it; it logs the error and starts over."""
    real = psycopg.Connection.notifies
    calls = {"n": 0}

    def flaky(self: psycopg.Connection[Any], *args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise TypeError("notifies() got an unexpected keyword argument 'timeout'")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(psycopg.Connection, "notifies", flaky)
    monkeypatch.setattr(membership, "log", structlog.get_logger("secledger.membership"))
    known = KnownMRs()
    known.load(engine)
    with structlog.testing.capture_logs() as lines:
        known.listen(db.conninfo(database_url))
        try:
            assert wait_for(lambda: calls["n"] >= 2, 10)  # the first attempt fails at once
            recorded_elsewhere(engine, mr_event("open"), utcnow())
            assert wait_for(lambda: KEY in known)
        finally:
            known.close()
    failed = [line for line in lines if line["event"] == "listen_failed"]
    assert failed and failed[0]["error"] == "TypeError"
