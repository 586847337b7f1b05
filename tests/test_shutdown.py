"""``secledger serve`` stopped with SIGTERM (systemd, Docker, Kubernetes) on the embedded
default: it drains, writes its last log lines and stops the PostgreSQL it started."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from builders import dumps, mr_event
from faultkit import SECRET, Postgres, Receiver, wait_until
from secledger import embedded

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


def test_ctrl_c_drains_and_exits_0_without_aborted(workdir: Path, database_url: str) -> None:
    """The README's way to stop `make demo` printed "Aborted!" and exited 1 (make: Error 1)
    after a clean stop."""
    receiver = Receiver(workdir, database_url)
    receiver.start()
    assert receiver.process is not None
    receiver.process.send_signal(signal.SIGINT)
    code = receiver.process.wait(timeout=60)
    log = receiver.log_path.read_text()
    assert code == 0, log[-2000:]
    assert "Aborted" not in log


def test_a_second_ctrl_c_forces_the_exit_and_says_so_in_the_status(
    workdir: Path, database_url: str
) -> None:
    """uvicorn cuts off the requests in flight at a second Ctrl-C: that stop is not clean,
    and exiting 0 would say it was."""
    receiver = Receiver(workdir, database_url)
    receiver.start()
    assert receiver.process is not None
    # A delivery whose body never comes in full: in flight until its body deadline.
    with socket.create_connection(("127.0.0.1", receiver.port)) as held:
        held.sendall(
            b"POST /webhooks/gitlab HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
            + f"X-Gitlab-Token: {SECRET}\r\n".encode()
            + b"X-Gitlab-Event: Merge Request Hook\r\n\r\n{"
        )
        time.sleep(0.5)
        receiver.process.send_signal(signal.SIGINT)
        time.sleep(1.0)  # uvicorn now waits for the request in flight
        assert receiver.process.poll() is None
        receiver.process.send_signal(signal.SIGINT)
        code = receiver.process.wait(timeout=60)
    assert code == 130, receiver.log_path.read_text()[-2000:]


def test_a_first_start_stopped_during_initdb_is_set_aside_and_started_afresh(
    workdir: Path,
) -> None:
    """SIGTERM while ``serve`` first created its cluster killed initdb after it wrote
    PG_VERSION: every later start failed, since the wheel runs initdb only without that
    file. A cluster that never served (no postmaster.opts) is moved aside now. The
    private directory above the data gets the search bits for the server's user, and no
    read bit for anyone (the wheel gave every parent g+rx,o+rx: /root became 0755)."""
    private = workdir / "private"
    private.mkdir(mode=0o700)
    pg = private / "data" / "pg"
    (pg / "global").mkdir(parents=True)
    # Late in initdb: the control file and pg_hba.conf are written, the databases not.
    (pg / "PG_VERSION").write_text("18\n")
    (pg / "global" / "pg_control").write_bytes(b"\0" * 8192)
    (pg / "pg_hba.conf").write_text("local all all trust\n")
    url = embedded.start(pg, database="postgres")
    try:
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        [aside] = (private / "data").glob("pg.unfinished-*")
        assert (aside / "PG_VERSION").exists()
        assert (pg / "global" / "pg_control").exists()
        mode = stat.S_IMODE(private.stat().st_mode)
        assert mode & 0o066 == 0
        assert mode == (0o711 if os.geteuid() == 0 else 0o700)
    finally:
        embedded.stop(pg)
