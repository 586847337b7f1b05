"""Secrets that secledger generates once and keeps in the data directory."""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

from secledger.errors import ConfigError

# How long an empty file is given to be written by the process that created it.
WRITE_WAIT_SECONDS = 2.0


def ensure_secret_file(path: Path, nbytes: int) -> str:
    """The secret kept in ``path``, created first (mode 0600) when it does not exist.

    O_EXCL makes processes starting together on one data directory agree on the first
    value; an existing file is never rewritten.
    """
    try:
        value = _created_or_read(path, nbytes)
    except OSError as exc:
        raise ConfigError(f"cannot keep a generated secret in {path}: {exc.strerror}") from exc
    if not value:
        raise ConfigError(f"{path} is empty; delete it and secledger will generate a new one")
    return value


def _created_or_read(path: Path, nbytes: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_urlsafe(nbytes) + "\n")
    # Another process may have created the file an instant ago and not written it yet.
    deadline = time.monotonic() + WRITE_WAIT_SECONDS
    value = path.read_text().strip()
    while not value and time.monotonic() < deadline:
        time.sleep(0.05)
        value = path.read_text().strip()
    return value
