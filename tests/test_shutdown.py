"""``secledger serve`` stopped with SIGTERM (systemd, Docker, Kubernetes) on the embedded
default: it drains, writes its last log lines and stops the PostgreSQL it started."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from builders import dumps, mr_event
from faultkit import SECRET, Postgres, Receiver, wait_until

_START_AND_HANG = (
    "import sys, time; from pathlib import Path; from secledger import embedded;"
    " embedded.start(Path(sys.argv[1])); print('up', flush=True); time.sleep(600)"
)


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Outside pytest's basetemp (mode 0700): the embedded server may run as its own user.
    path = Path(tempfile.mkdtemp(prefix="secledger-test-stop-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        leftover = Postgres(path / "data" / "pg")
        if leftover.running():
            leftover.stop()
        shutil.rmtree(path, ignore_errors=True)


def test_sigterm_drains_logs_and_stops_the_embedded_server(workdir: Path) -> None:
    # A process that started the server and was killed (kill -9, out of memory) never
    # released its handle on it; the server must still stop when the receiver does.
    starter = subprocess.Popen(
        [sys.executable, "-c", _START_AND_HANG, str(workdir / "data" / "pg")],
        stdout=subprocess.PIPE,
    )
    assert starter.stdout is not None
    assert starter.stdout.readline() == b"up\n"
    starter.kill()
    starter.wait(timeout=10)

    receiver = Receiver(workdir, "unused")
    del receiver.env["SECLEDGER_DATABASE_URL"]  # the embedded default, as a user starts it
    receiver.start(seconds=120)
    assert receiver.process is not None
    try:
        headers = {
            "X-Gitlab-Event": "Merge Request Hook",
            "X-Gitlab-Token": SECRET,
            "Idempotency-Key": "stop-1",
        }
        answer = httpx.post(
            receiver.base + "/webhooks/gitlab",
            content=dumps(mr_event("open", iid=1)),
            headers=headers,
            timeout=15,
        )
        assert answer.json()["status"] == "recorded"
        postgres = Postgres(workdir / "data" / "pg")
        assert postgres.running()
    finally:
        receiver.process.send_signal(signal.SIGTERM)
        code = receiver.process.wait(timeout=60)
    assert code == 0, receiver.log_tail()
    wait_until(lambda: not postgres.running(), 30, "the embedded PostgreSQL to stop")
    log = receiver.log_path.read_text()
    assert '"outcome":"recorded"' in log, log[-2000:]
    assert "listen_lost" not in log  # the server stopped after the listener was closed
