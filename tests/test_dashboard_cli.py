"""`secledger user`: hashes people can paste into settings, and the users file."""

from __future__ import annotations

import errno
import io
import os
import stat
from pathlib import Path

from click.testing import CliRunner

from secledger.cli import main
from secledger.dashboard import auth
from secledger.dashboard.auth import read_users_file, verify_password

PASSWORD = "a long enough passphrase"


def test_hash_password_prints_a_hash_that_verifies(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("SECLEDGER_DATA_DIR", str(tmp_path))
    result = CliRunner().invoke(main, ["user", "hash-password", "--password-stdin"], PASSWORD)
    assert result.exit_code == 0, result.output
    hashed = result.output.strip()
    assert verify_password(PASSWORD, hashed)
    assert PASSWORD not in result.output


def test_user_add_writes_a_private_users_file_and_replaces_a_password(
    monkeypatch, tmp_path
) -> None:
    monkeypatch.setenv("SECLEDGER_DATA_DIR", str(tmp_path))
    runner = CliRunner()
    first = runner.invoke(main, ["user", "add", "alice", "--password-stdin"], PASSWORD)
    assert first.exit_code == 0, first.output
    assert first.output.startswith("added alice")
    path = tmp_path / "users"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = runner.invoke(main, ["user", "add", "alice", "--password-stdin"], "another passphrase")
    assert again.output.startswith("updated alice")
    users = read_users_file(path)
    assert list(users) == ["alice"]
    assert verify_password("another passphrase", users["alice"])


def test_user_add_says_when_the_users_file_cannot_be_written(monkeypatch, tmp_path) -> None:
    """A traceback before (a root-owned data directory, a path under a file)."""
    (tmp_path / "data").write_text("a file, not a directory")
    monkeypatch.setenv("SECLEDGER_USERS_FILE", str(tmp_path / "data" / "users"))
    result = CliRunner().invoke(main, ["user", "add", "zed", "--password-stdin"], PASSWORD)
    assert result.exit_code == 1
    assert f"Error: cannot write {tmp_path / 'data' / 'users'}: " in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_a_failed_write_leaves_the_users_file_as_it_was(monkeypatch, tmp_path) -> None:
    """Truncated in place, a full disk mid-write left a users file with no users."""
    monkeypatch.setenv("SECLEDGER_DATA_DIR", str(tmp_path))
    runner = CliRunner()
    assert (
        runner.invoke(main, ["user", "add", "alice", "--password-stdin"], PASSWORD).exit_code == 0
    )
    before = (tmp_path / "users").read_text()

    class FullDisk(io.StringIO):
        def write(self, text: str) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(auth.os, "fdopen", lambda fd, mode: (os.close(fd), FullDisk())[1])
    result = runner.invoke(main, ["user", "add", "bob", "--password-stdin"], PASSWORD)
    assert result.exit_code == 1
    assert "No space left on device" in result.output
    assert (tmp_path / "users").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["users"]  # no partial file left


def test_a_linked_users_file_keeps_its_link_owner_and_mode(monkeypatch, tmp_path) -> None:
    """Renamed over, the link became a file of root's, mode 0600: the file it named was
    never updated, and a serve running as another user could not read the new one."""
    real = tmp_path / "real-users"
    real.write_text("")
    owner = 65534 if os.geteuid() == 0 else os.getuid()  # nobody, where root may say so
    os.chown(real, owner, -1)
    real.chmod(0o640)
    link = tmp_path / "users"
    link.symlink_to(real)
    monkeypatch.setenv("SECLEDGER_USERS_FILE", str(link))
    result = CliRunner().invoke(main, ["user", "add", "alice", "--password-stdin"], PASSWORD)
    assert result.exit_code == 0, result.output
    assert link.is_symlink()
    assert list(read_users_file(real)) == ["alice"]
    assert (real.stat().st_uid, stat.S_IMODE(real.stat().st_mode)) == (owner, 0o640)


def test_short_passwords_and_bad_names_are_refused(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("SECLEDGER_DATA_DIR", str(tmp_path))
    runner = CliRunner()
    short = runner.invoke(main, ["user", "hash-password", "--password-stdin"], "short")
    assert short.exit_code == 2  # a usage error, as README's exit codes say
    assert "at least 12" in short.output
    bad = runner.invoke(main, ["user", "add", "a:b", "--password-stdin"], PASSWORD)
    assert bad.exit_code == 2
    assert "a user name has no colon and no white space" in bad.output
    # Piped in without --password-stdin: no prompt read from the pipe, no "Aborted!".
    piped = runner.invoke(main, ["user", "add", "dave"], PASSWORD)
    assert piped.exit_code == 2
    assert "pass --password-stdin" in piped.output
    assert not (tmp_path / "users").exists()


def test_user_commands_have_help_with_an_example_and_docs() -> None:
    docs = (Path(__file__).parents[1] / "docs" / "dashboard.md").read_text()
    for command in (["user"], ["user", "add"], ["user", "hash-password"]):
        result = CliRunner().invoke(main, [*command, "--help"])
        assert result.exit_code == 0
        assert "Example:" in result.output
        assert "secledger " + " ".join(command) in docs
