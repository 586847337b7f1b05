"""Every integrity command has help with an example and an entry in docs/integrity.md."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner
from sqlalchemy.engine import make_url

from commandline import run_secledger
from secledger.cli import main

DOC = (Path(__file__).parents[1] / "docs" / "integrity.md").read_text()


@pytest.mark.parametrize("command", ["verify", "rebuild", "keygen", "checkpoint"])
def test_command_has_an_example_and_docs(command: str) -> None:
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0
    assert "Example:" in result.output
    assert f"secledger {command}" in result.output
    assert f"`secledger {command}" in DOC


def test_a_database_without_secledger_tables_is_one_line_not_a_traceback(
    server_url: str, tmp_path: Path
) -> None:
    """verify and checkpoint do not migrate first: pointed at the wrong or a new
    database, they ended in a traceback about a missing relation."""
    empty = "secledger_test_no_tables"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{empty}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{empty}"')
    env = {
        "SECLEDGER_DATABASE_URL": make_url(server_url)
        .set(database=empty)
        .render_as_string(hide_password=False),
        "SECLEDGER_DATA_DIR": str(tmp_path / "data"),
    }
    try:
        key = tmp_path / "key.pem"
        made = run_secledger("keygen", "--out", str(key), **env)
        assert made.returncode == 0, made.stderr
        for args in (["verify"], ["checkpoint", "--key", str(key)]):
            done = run_secledger(*args, **env)
            assert done.returncode == 1, done.stderr
            assert "Traceback" not in done.stderr
            last = done.stderr.strip().splitlines()[-1]
            assert last.startswith('Error: relation "delivery_log" does not exist: this database')
            assert "run `secledger db upgrade`" in last
    finally:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{empty}" WITH (FORCE)')


def test_a_table_without_a_column_this_version_reads_is_one_line(
    database_url: str, tmp_path: Path
) -> None:
    """A schema edited by hand, or restored from an older dump over a newer revision:
    an undefined column (42703) was a traceback."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("ALTER TABLE security_review_ledger DROP COLUMN title CASCADE")
    done = run_secledger(
        "ledger", SECLEDGER_DATABASE_URL=database_url, SECLEDGER_DATA_DIR=str(tmp_path / "data")
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert "does not exist: this database does not hold this version's" in last
