"""Secrets secledger generates once in the data directory, for processes starting together."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from secledger import keyfiles
from secledger.errors import ConfigError


def test_the_first_process_creates_the_secret_and_later_ones_read_it(tmp_path: Path) -> None:
    path = tmp_path / "data" / "secret"
    first = keyfiles.ensure_secret_file(path, 32)
    assert keyfiles.ensure_secret_file(path, 32) == first
    assert path.stat().st_mode & 0o777 == 0o600


def test_a_file_created_an_instant_ago_is_read_once_written(tmp_path: Path) -> None:
    """The process that created it has not written it yet: the reader waits for it
    instead of failing to start."""
    path = tmp_path / "secret"
    path.touch()
    writer = threading.Timer(0.2, path.write_text, args=("written-by-the-other\n",))
    writer.start()
    try:
        assert keyfiles.ensure_secret_file(path, 32) == "written-by-the-other"
    finally:
        writer.join()


def test_a_file_left_empty_is_an_error_that_says_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(keyfiles, "WRITE_WAIT_SECONDS", 0.1)
    path = tmp_path / "secret"
    path.touch()
    with pytest.raises(ConfigError, match="delete it"):
        keyfiles.ensure_secret_file(path, 32)
