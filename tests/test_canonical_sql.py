"""The auditor's SQL in docs/integrity.md reproduces the Python canonical bytes and hashes."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from builders import dumps, mr_event
from chainkit import log_row, record_history, tamper
from secledger.chainsql import CHECK_CHAIN, CHECK_CHAIN_FILE
from secledger.config import Settings
from secledger.policy import LabelPolicy
from secledger.service import feed
from secledger.store.chain import canonical, link
from secledger.store.verify import ChainBroken, verify

DOC = Path(__file__).parents[1] / "docs" / "integrity.md"


def doc_sql() -> str:
    """The query after the ``canonical-sql`` marker, exactly as documented."""
    text = DOC.read_text()
    block = text.split("<!-- canonical-sql -->", 1)[1]
    return block.split("```sql\n", 1)[1].split("```", 1)[0]


def test_the_documented_query_is_the_one_evidence_packs_carry() -> None:
    assert doc_sql() == CHECK_CHAIN


def canonical_sql() -> str:
    """The documented CTE, selecting the canonical bytes instead of the problems."""
    return doc_sql().split("\nSELECT seq,", 1)[0] + (
        "\nSELECT seq, canonical, sha256(prev_hash || canonical), hash FROM canon ORDER BY seq"
    )


def _query(database_url: str, sql: str) -> list[tuple]:
    with psycopg.connect(database_url) as conn:
        # Another session time zone must not change the bytes.
        conn.execute("SET TimeZone = 'America/New_York'")
        return conn.execute(sql).fetchall()


@pytest.fixture
def history(client, engine) -> None:
    record_history(client)
    # Non-ASCII in a stored header: the SQL must encode text columns as UTF-8 too.
    outcome = feed(
        engine,
        LabelPolicy.from_settings(Settings()),
        {"x-gitlab-event": "Merge Request Hook", "user-agent": "GitLab/17.4 — prüfung"},
        dumps(mr_event("update", iid=3, title="Zugriff für Gäste 🔒")),
        max_body_bytes=1 << 20,
        source="replay",
    )
    assert outcome.seq == 7


def test_sql_canonical_bytes_and_hashes_equal_python(history, database_url, engine) -> None:
    rows = _query(database_url, canonical_sql())
    assert [row[0] for row in rows] == list(range(1, 8))
    for seq, sql_canonical, sql_hash, stored_hash in rows:
        row, prev_hash = log_row(engine, seq)
        assert bytes(sql_canonical) == canonical(row)
        assert bytes(sql_hash) == link(prev_hash, row) == bytes(stored_hash)
    assert verify(engine).head_hash == bytes(rows[-1][3])


def test_documented_query_finds_nothing_on_a_sound_chain(history, database_url) -> None:
    assert _query(database_url, doc_sql()) == []


def test_a_received_at_moved_before_year_1_is_named_by_the_query_and_verify(
    history, database_url, engine
) -> None:
    """to_char's YYYY has no era: the same wall-clock time 4051 BC spells the same text."""
    tamper(
        engine,
        "UPDATE delivery_log SET received_at = received_at - interval '4051 years' WHERE seq = 5",
    )
    assert _query(database_url, doc_sql()) == [(5, "received_at before year 1")]
    with pytest.raises(ChainBroken) as broken:
        verify(engine)
    assert broken.value.seq == 5
    assert "received_at" in broken.value.reason


def test_documented_query_names_tampered_rows(history, database_url, engine) -> None:
    tamper(
        engine,
        "UPDATE delivery_log SET payload = payload || ' '::bytea WHERE seq = 2",
        "DELETE FROM delivery_log WHERE seq = 5",
    )
    problems = _query(database_url, doc_sql())
    assert problems[0] == (2, "hash mismatch")
    assert (6, "sequence gap") in problems


def test_the_packs_query_file_cannot_be_shadowed_by_a_function_in_public(
    history, database_url, engine
) -> None:
    """The database's owner may create functions in public. One named like a catalog
    function, taking text where the catalog's takes name, was picked for the query's
    untyped 'UTF8' and could turn an edited column back into the bytes hashed before:
    the file the evidence pack ships then listed no wrong row. Its path leaves public
    out (the tables are named with their schema)."""
    tamper(engine, "UPDATE delivery_log SET dedup_key = dedup_key || '~' WHERE seq = 2")
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "CREATE FUNCTION public.convert_to(text, text) RETURNS bytea LANGUAGE sql"
            " AS $$ SELECT pg_catalog.convert_to(pg_catalog.rtrim($1, '~'), $2::name) $$"
        )
        try:
            problems: list[tuple] = []
            for statement in CHECK_CHAIN_FILE.split(";\n")[:2]:  # the SET, the check
                found = conn.execute(statement)
                if found.description is not None:
                    problems = found.fetchall()
            conn.execute("SET search_path = pg_catalog, public, pg_temp")
            shadowed = conn.execute("SELECT convert_to('a~', 'UTF8')").fetchone()
        finally:
            conn.execute("DROP FUNCTION public.convert_to(text, text)")
    assert shadowed is not None and bytes(shadowed[0]) == b"a"  # the attack is real
    assert problems == [(2, "hash mismatch")]
