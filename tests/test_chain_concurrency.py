"""The chain stays one unbroken line under many parallel deliveries to two real replicas."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

from builders import dumps, mr_event
from chainkit import app_url
from conftest import SECRET
from secledger.store.verify import verify

DELIVERIES = 160
REPLICAS = 2


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_ready(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"serve exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    pytest.fail(f"serve on port {port} was not ready within 60 s: {log.read_text()[-2000:]}")


@pytest.fixture
def replicas(database_url: str, tmp_path: Path) -> Iterator[list[int]]:
    """Two ``secledger serve`` processes on one database, as the app login."""
    env = dict(os.environ)
    env |= {
        "SECLEDGER_DATABASE_URL": app_url(database_url),
        "SECLEDGER_MIGRATION_DATABASE_URL": database_url,
        "SECLEDGER_WEBHOOK_SECRETS": SECRET,
        "SECLEDGER_DATA_DIR": str(tmp_path / "data"),
        "SECLEDGER_LOG_LEVEL": "warning",
        "SECLEDGER_MAX_BATCH": "16",
    }
    started: list[tuple[subprocess.Popen[bytes], int]] = []
    try:
        for index in range(REPLICAS):
            port = _free_port()
            log = tmp_path / f"serve-{index}.log"
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    "from secledger.cli import run; run()",
                    "serve",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                ],
                env=env,
                stdout=log.open("wb"),
                stderr=subprocess.STDOUT,
            )
            started.append((process, port))
            _wait_ready(port, process, log)
        yield [port for _, port in started]
    finally:
        for process, _ in started:
            process.terminate()
        for process, _ in started:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


def _deliver(port: int, index: int) -> str:
    body = mr_event("open", iid=index + 1, title=f"Security change {index}")
    response = httpx.post(
        f"http://127.0.0.1:{port}/webhooks/gitlab",
        content=dumps(body),
        headers={
            "X-Gitlab-Event": "Merge Request Hook",
            "X-Gitlab-Token": SECRET,
            "Idempotency-Key": f"concurrency-{index}",
        },
        timeout=60,
    )
    assert response.status_code == 200, response.text
    return str(response.json()["status"])


@pytest.mark.slow
def test_parallel_deliveries_to_two_replicas_keep_one_valid_chain(replicas, engine) -> None:
    with ThreadPoolExecutor(max_workers=16) as pool:
        statuses = list(pool.map(lambda i: _deliver(replicas[i % REPLICAS], i), range(DELIVERIES)))
    assert statuses == ["recorded"] * DELIVERIES
    summary = verify(engine)
    assert (summary.rows, summary.first_seq, summary.last_seq) == (DELIVERIES, 1, DELIVERIES)
    with engine.connect() as conn:
        keys = conn.execute(text("SELECT count(DISTINCT dedup_key) FROM delivery_log")).scalar()
        ledger_rows = conn.execute(text("SELECT count(*) FROM security_review_ledger")).scalar()
    assert keys == DELIVERIES
    assert ledger_rows == DELIVERIES
