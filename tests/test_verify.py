"""``secledger verify`` against every kind of tampering a database superuser can do in SQL."""

from __future__ import annotations

import psycopg
import pytest
from sqlalchemy import text

from chainkit import HISTORY_ROWS, cli, record_history, rehash_from, tamper


@pytest.fixture
def history(client, engine) -> None:
    """Six recorded log rows."""
    record_history(client)


def test_untouched_chain_verifies_with_a_summary(history, database_url, engine) -> None:
    result = cli(database_url, "verify")
    assert result.exit_code == 0, result.output
    with engine.connect() as conn:
        head = bytes(conn.execute(text("SELECT hash FROM delivery_log WHERE seq = 6")).scalar_one())
    assert (
        f"chain OK: {HISTORY_ROWS} rows, seq 1..{HISTORY_ROWS}, head {head.hex()}" in result.output
    )


def test_empty_log_verifies(database_url) -> None:
    result = cli(database_url, "verify")
    assert result.exit_code == 0
    assert "chain OK: 0 rows, empty log" in result.output


def test_edited_payload_byte_is_a_hash_mismatch_at_that_row(history, database_url, engine) -> None:
    tamper(
        engine,
        "UPDATE delivery_log SET payload = overlay(payload placing 'X'::bytea from 20 for 1)"
        " WHERE seq = 3",
    )
    result = cli(database_url, "verify")
    assert result.exit_code == 1
    assert "chain BROKEN at row seq=3: hash mismatch" in result.output


def test_edited_column_is_a_hash_mismatch_at_that_row(history, database_url, engine) -> None:
    tamper(
        engine,
        "UPDATE delivery_log SET received_at = received_at - interval '1 day' WHERE seq = 2",
    )
    result = cli(database_url, "verify")
    assert result.exit_code == 1
    assert "chain BROKEN at row seq=2: hash mismatch" in result.output


def test_a_body_hash_edited_to_another_bodys_is_named_at_that_row(
    history, database_url, engine
) -> None:
    """body_sha256 is outside the chain's hash, but deduplication reads it: set to the
    hash of a body GitLab has yet to send, that delivery would be a `duplicate` of this
    row and logged nowhere, and `verify` said the chain was OK."""
    tamper(engine, "UPDATE delivery_log SET body_sha256 = sha256('a later body') WHERE seq = 4")
    result = cli(database_url, "verify")
    assert result.exit_code == 1
    assert "chain BROKEN at row seq=4: body_sha256 is not the SHA-256 of the payload" in (
        result.output
    )
    tamper(engine, "UPDATE delivery_log SET body_sha256 = NULL WHERE seq = 4")  # pre-0010
    assert cli(database_url, "verify").exit_code == 0


def test_a_value_python_cannot_read_breaks_the_chain_instead_of_crashing(
    history, database_url, engine, tmp_path
) -> None:
    """PostgreSQL keeps a timestamp of 'infinity'; the driver cannot turn it into a
    datetime. Only someone writing around secledger puts it there: a broken chain, said
    as such, in verify and in the evidence pack, not a traceback."""
    tamper(engine, "UPDATE delivery_log SET received_at = 'infinity' WHERE seq = 2")
    result = cli(database_url, "verify")
    assert result.exit_code == 1
    assert "chain BROKEN at row seq=2: unreadable: received_at is 'infinity'" in result.output
    rebuilt = cli(database_url, "rebuild", "--check")
    assert rebuilt.exit_code == 1
    assert "secledger verify" in rebuilt.output
    pack = cli(
        database_url,
        "evidence",
        "--since",
        "2025-01-01",
        "--until",
        "2026-01-01",
        "--out",
        str(tmp_path / "pack"),
    )
    assert pack.exit_code == 1
    assert "cannot be read" in pack.output
    assert "secledger verify" in pack.output


def test_deleted_row_is_a_sequence_gap_at_the_next_row(history, database_url, engine) -> None:
    tamper(engine, "DELETE FROM delivery_log WHERE seq = 4")
    result = cli(database_url, "verify")
    assert result.exit_code == 1
    assert "chain BROKEN at row seq=5: sequence gap: expected seq 4; rows 4 are missing" in (
        result.output
    )


def test_deleted_first_rows_are_a_gap_at_the_new_first_row(history, database_url, engine) -> None:
    tamper(engine, "DELETE FROM delivery_log WHERE seq <= 2")
    result = cli(database_url, "verify")
    assert result.exit_code == 1
    assert "chain BROKEN at row seq=3: sequence gap: expected seq 1; rows 1..2 are missing" in (
        result.output
    )


def test_inserted_row_with_a_correct_own_hash_breaks_the_next_link(
    history, database_url, engine
) -> None:
    """The forger links and hashes the new row properly; the displaced row betrays it."""
    tamper(
        engine,
        "UPDATE delivery_log SET seq = seq + 1000 WHERE seq >= 3",
        "UPDATE delivery_log SET seq = seq - 999 WHERE seq >= 1000",
        "INSERT INTO delivery_log (seq, received_at, source, event, instance, dedup_key,"
        " headers, payload, prev_hash, hash)"
        " SELECT 3, received_at, source, event, instance, 'forged', headers, payload,"
        " hash, hash FROM delivery_log WHERE seq = 2",
    )
    rehash_from(engine, 3, last=3)  # the forged row's own link and hash are perfect
    result = cli(database_url, "verify")
    assert result.exit_code == 1
    assert "chain BROKEN at row seq=4: broken link" in result.output


def test_reordered_rows_break_the_link_at_the_first_moved_row(
    history, database_url, engine
) -> None:
    tamper(
        engine,
        "UPDATE delivery_log SET seq = 1000 WHERE seq = 2",
        "UPDATE delivery_log SET seq = 2 WHERE seq = 3",
        "UPDATE delivery_log SET seq = 3 WHERE seq = 1000",
    )
    result = cli(database_url, "verify")
    assert result.exit_code == 1
    assert "chain BROKEN at row seq=2: broken link" in result.output


def test_appended_row_with_a_made_up_hash_is_named(history, database_url, engine) -> None:
    tamper(
        engine,
        "INSERT INTO delivery_log (seq, received_at, source, event, instance, dedup_key,"
        " headers, payload, prev_hash, hash)"
        " SELECT 7, received_at, source, event, instance, 'forged', headers, payload,"
        " hash, sha256('made up') FROM delivery_log WHERE seq = 6",
    )
    result = cli(database_url, "verify")
    assert result.exit_code == 1
    assert "chain BROKEN at row seq=7: hash mismatch" in result.output


def test_a_copy_of_the_log_in_the_logins_own_schema_is_not_what_is_walked(
    history, database_url, engine
) -> None:
    """The default search_path looks in "$user" first: the database's owner could leave
    a pristine copy of the log there, edit the real one, and verify would walk the copy."""
    with engine.connect() as conn:
        login = conn.execute(text("SELECT current_user")).scalar_one()
    tamper(
        engine,
        f'CREATE SCHEMA "{login}"',
        f'CREATE TABLE "{login}".delivery_log AS TABLE public.delivery_log',
        f'CREATE TABLE "{login}".checkpoints AS TABLE public.checkpoints',
        "UPDATE public.delivery_log SET received_at = received_at - interval '1 day' WHERE seq = 2",
    )
    with psycopg.connect(database_url) as raw:  # what an unpinned reader sees: the copy
        found = raw.execute(
            "SELECT relnamespace::regnamespace::text FROM pg_class"
            " WHERE oid = to_regclass('delivery_log')"
        ).fetchone()
        assert found is not None and found[0].strip('"') == login
    result = cli(database_url, "verify")
    assert result.exit_code == 1, result.output
    assert "chain BROKEN at row seq=2: hash mismatch" in result.output
