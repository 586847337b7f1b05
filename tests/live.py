"""A real ``secledger serve`` process for tests: 127.0.0.1, a free port, stderr captured."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

SIGNING_KEY = bytes(range(32))
SIGNING_SECRET = "whsec_" + base64.b64encode(SIGNING_KEY).decode()


def free_port() -> int:
    """A port the kernel just handed out on 127.0.0.1."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def sign(key: bytes, webhook_id: str, timestamp: int | str, body: bytes) -> str:
    """A Standard Webhooks ``v1,<base64>`` signature."""
    message = f"{webhook_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, message, hashlib.sha256).digest()).decode()


def signed_headers(
    body: bytes, webhook_id: str, *, key: bytes = SIGNING_KEY, timestamp: int | None = None
) -> dict[str, str]:
    """The headers GitLab sends with a signing token configured."""
    stamp = int(time.time()) if timestamp is None else timestamp
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(stamp),
        "webhook-signature": sign(key, webhook_id, stamp, body),
    }


@dataclass
class LiveServer:
    """A running server process."""

    url: str
    process: subprocess.Popen[bytes]
    stderr_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")


@contextmanager
def live_server(
    database_url: str, tmp_path: Path, env: Mapping[str, str], *, timeout: float = 60
) -> Iterator[LiveServer]:
    """Start ``secledger serve`` with ``env`` added, wait for /healthz, stop it afterwards."""
    port = free_port()
    stderr_path = tmp_path / f"serve-{port}.stderr"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SECLEDGER_")} | {
        "SECLEDGER_DATABASE_URL": database_url,
        "SECLEDGER_DATA_DIR": str(tmp_path / "data"),
        "SECLEDGER_HOST": "127.0.0.1",
        "SECLEDGER_PORT": str(port),
        **env,
    }
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-c", "from secledger.cli import run; run()", "serve"],
            env=full_env,
            stdout=stderr,
            stderr=stderr,
        )
    server = LiveServer(f"http://127.0.0.1:{port}", process, stderr_path)
    try:
        _wait_healthy(server, timeout)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def _wait_healthy(server: LiveServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"secledger serve exited early:\n{server.stderr()}")
        try:
            if httpx.get(server.url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"secledger serve did not become ready:\n{server.stderr()}")
