"""Processes the benchmark starts and stops: `secledger serve`, the ceiling app, load clients."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from traffic import TOKEN

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    """A port nobody listens on right now (bind port 0 and let the kernel choose)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_ready(port: int, path: str, timeout: float = 60.0) -> None:
    """Poll ``path`` until it answers 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"nothing answered on 127.0.0.1:{port}{path} within {timeout:.0f}s")


@dataclass
class Server:
    """One server process and the port it listens on."""

    name: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    def peak_rss_mib(self) -> float:
        """Peak resident memory (VmHWM) of the process so far."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        """SIGTERM, then wait (uvicorn drains and the writer commits what it holds)."""
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_secledger(
    name: str, database_url: str, workdir: Path, env: dict[str, str] | None = None
) -> Server:
    """`secledger serve` exactly as a user runs it, configured through the environment
    (``env`` adds to it)."""
    port = free_port()
    env = (
        os.environ
        | (env or {})
        | {
            "SECLEDGER_DATABASE_URL": database_url,
            "SECLEDGER_WEBHOOK_SECRETS": TOKEN,
            "SECLEDGER_DATA_DIR": str(workdir / name),
        }
    )
    log = workdir / f"{name}.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [str(BIN / "secledger"), "serve", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=sink,
            stderr=sink,
        )
    server = Server(name, port, process, log)
    wait_ready(port, "/readyz")
    return server


def start_ceiling(database_url: str, workdir: Path, pool: int) -> Server:
    """The bare ASGI reference app."""
    port = free_port()
    log = workdir / "ceiling.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [
                sys.executable,
                str(HERE / "ceiling.py"),
                "--port",
                str(port),
                "--database-url",
                database_url,
                "--pool",
                str(pool),
            ],
            stdout=sink,
            stderr=sink,
        )
    server = Server("ceiling", port, process, log)
    wait_ready_post(port)
    return server


def wait_ready_post(port: int, timeout: float = 60.0) -> None:
    """The ceiling app has no GET route: wait until it parses a POST."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        request = urllib.request.Request(f"http://127.0.0.1:{port}/parse", data=b"{}")
        try:
            with urllib.request.urlopen(request, timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"the ceiling app did not start on port {port}")


@dataclass
class Load:
    """Merged results of every client process of one run."""

    sent: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    security_2xx: int = 0
    recorded: int = 0
    duplicates: int = 0
    errors: int = 0
    measured: int = 0
    window: float = 0.0
    client_busy: float = 0.0  # the busiest client process's CPU share of its wall time
    latencies_us: list[int] = field(default_factory=list)

    @property
    def ok(self) -> int:
        return sum(n for status, n in self.statuses.items() if 200 <= status < 300)

    @property
    def rate(self) -> float:
        return self.measured / self.window if self.window else 0.0

    def percentile_ms(self, q: float) -> float:
        if not self.latencies_us:
            return float("nan")
        ordered = sorted(self.latencies_us)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000

    def add(self, part: dict[str, Any]) -> None:
        self.sent += part["sent"]
        for status, n in part["statuses"].items():
            self.statuses[int(status)] = self.statuses.get(int(status), 0) + n
        for name in ("security_2xx", "recorded", "duplicates", "errors", "measured"):
            setattr(self, name, getattr(self, name) + part[name])
        self.window = part["window"]
        self.client_busy = max(self.client_busy, part["cpu"] / part["wall"])
        self.latencies_us.extend(array("I", bytes.fromhex(part["latencies_us"])))


def load(
    *,
    run: str,
    mix: str,
    ports: list[int],
    project: int,
    clients: int,
    conns: int,
    duration: float,
    warmup: float,
    rate: float = 0.0,
    path: str = "/webhooks/gitlab",
    security_path: str | None = None,
) -> Load:
    """Run ``clients`` load processes together; their merged results."""
    start_at = time.time() + 1.5  # every client starts its clock at the same instant
    processes = []
    outputs = []
    for client in range(clients):
        outputs.append(Path(tempfile.mkstemp(prefix=f"load-{run}-", suffix=".json")[1]))
        command = [
            sys.executable,
            str(HERE / "loadgen.py"),
            "--ports",
            *map(str, ports),
            "--mix",
            mix,
            "--run",
            run,
            "--project",
            str(project),
            "--client",
            str(client),
            "--conns",
            str(conns // clients),
            "--duration",
            str(duration),
            "--warmup",
            str(warmup),
            "--rate",
            str(rate / clients),
            "--path",
            path,
            "--security-path",
            security_path or path,
            "--start-at",
            str(start_at),
            "--out",
            str(outputs[-1]),
        ]
        processes.append(subprocess.Popen(command))
    merged = Load()
    for process, output in zip(processes, outputs, strict=True):
        if process.wait(timeout=duration + 120) != 0:
            raise RuntimeError(f"a load client failed (exit {process.returncode})")
        merged.add(json.loads(output.read_text()))
        output.unlink()
    return merged
