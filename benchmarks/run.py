"""`make bench`: secledger against the ceiling of its own stack, measured in one run.

Starts an embedded PostgreSQL in a temporary directory, `secledger serve` as users run
it, the bare ASGI ceiling app on the same uvicorn, and load-client processes
(benchmarks/loadgen.py), all on 127.0.0.1 and bounded in time; prints one table.
Every run is checked for loss: the 2xx answers to security deliveries must equal the
new log rows, one for one, with no duplicate answers. The scale-out run adds a second
replica and walks the whole hash chain afterwards.

Usage: python benchmarks/run.py [--duration 10] [--results benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import atexit
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import checks
import servers
from servers import Load

from secledger import embedded


@dataclass
class Row:
    """One line of the table."""

    name: str
    load: Load
    rows: int
    ceiling: Load | None = None
    target: str = ""
    memory: str = ""

    def lossless(self) -> bool:
        load = self.load
        return (
            load.ok == load.sent
            and load.errors == 0
            and load.duplicates == 0
            and load.security_2xx == self.rows == load.recorded
        )

    def cells(self) -> list[str]:
        load = self.load
        ratio = f"{load.rate / self.ceiling.rate:.0%}" if self.ceiling else ""
        return [
            self.name,
            f"{load.rate:,.0f}",
            f"{load.percentile_ms(0.50):.1f}",
            f"{load.percentile_ms(0.99):.1f}",
            f"{load.percentile_ms(1.0):.1f}",
            f"{self.ceiling.rate:,.0f}" if self.ceiling else "",
            ratio,
            self.target,
            f"{load.ok}/{load.sent}",
            f"{load.security_2xx}/{self.rows}",
            "yes" if self.lossless() else "NO",
            f"{load.client_busy:.0%}",
            self.memory,
        ]


HEADERS = [
    "scenario",
    "deliveries/s",
    "p50 ms",
    "p99 ms",
    "max ms",
    "ceiling/s",
    "ratio",
    "target",
    "2xx/sent",
    "sec 2xx/new rows",
    "zero loss",
    "client CPU",
    "peak RSS",
]


def markdown(rows: list[Row]) -> str:
    """The table in Markdown."""
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> str:
    """Date, cores and CPU model, for RESULTS.md."""
    model = "unknown"
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    for line in lscpu.splitlines():
        if line.startswith("Model name:"):
            model = line.split(":", 1)[1].strip()
    load = os.getloadavg()
    return (
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, nproc={os.cpu_count()}, CPU {model},"
        f" Python {platform.python_version()}, load average at start {load[0]:.1f}"
    )


class Bench:
    """The servers of one benchmark run and the settings every load shares."""

    def __init__(self, args: argparse.Namespace, url: str, workdir: Path) -> None:
        self.args = args
        self.url = url
        self.workdir = workdir
        self.project = 1000

    def load(self, run: str, mix: str, ports: list[int], **extra: object) -> Load:
        self.project += 1
        options: dict[str, object] = {
            "clients": self.args.clients,
            "conns": self.args.conns,
            "duration": self.args.duration,
            "warmup": self.args.warmup,
        }
        options |= extra
        print(f"  {run}: {mix} on {ports} {extra or ''}", file=sys.stderr, flush=True)
        return servers.load(run=run, mix=mix, ports=ports, project=self.project, **options)  # type: ignore[arg-type]

    def ceiling(self, port: int, run: str, mix: str, path: str) -> tuple[Load, int]:
        before = checks.ceiling_rows(self.url)
        result = self.load(run, mix, [port], path="/parse", security_path=path)
        return result, checks.ceiling_rows(self.url) - before

    def secledger(self, port: list[int], run: str, mix: str, **extra: object) -> tuple[Load, int]:
        result = self.load(run, mix, port, **extra)
        return result, checks.log_rows(self.url, run)


def scenarios(bench: Bench, serve: servers.Server, ceiling: servers.Server) -> list[Row]:
    """Runs 1-5 against one replica, each next to its ceiling."""
    stamp = f"{int(time.time())}"
    parse, parse_rows = bench.ceiling(ceiling.port, f"c-parse-{stamp}", "ignored", "/parse")
    ignored, ignored_rows = bench.secledger([serve.port], f"ignored-{stamp}", "ignored")
    insert, insert_rows = bench.ceiling(ceiling.port, f"c-insert-{stamp}", "security", "/insert")
    security, security_rows = bench.secledger([serve.port], f"security-{stamp}", "security")
    cmix, cmix_rows = bench.ceiling(ceiling.port, f"c-mixed-{stamp}", "mixed", "/insert")
    mixed, mixed_rows = bench.secledger([serve.port], f"mixed-{stamp}", "mixed")
    paced, paced_rows = bench.secledger(
        [serve.port],
        f"rate-{stamp}",
        "mixed",
        rate=300.0,
        duration=bench.args.rate_duration,
        clients=1,
    )
    memory = f"{serve.peak_rss_mib():.0f} MiB"
    return [
        Row("ceiling: parse + answer", parse, parse_rows),
        Row("1. ignored (10 KB, valid token)", ignored, ignored_rows, parse, ">= 70%"),
        Row("ceiling: parse + insert 1 row + commit", insert, insert_rows),
        Row("2. recorded security", security, security_rows, insert, ">= 80%"),
        Row("ceiling: 90% parse / 10% insert", cmix, cmix_rows),
        Row("3. mixed 90% ignored / 10% security", mixed, mixed_rows, cmix),
        Row("4. mixed at 300/s offered", paced, paced_rows, None, "p99 < 50 ms", memory),
    ]


def scale_out(bench: Bench, first: servers.Server, insert: Load) -> tuple[Row, checks.ChainReport]:
    """Run 8: a second replica on another port, security load spread over both."""
    second = servers.start_secledger("serve-b", bench.url, bench.workdir)
    try:
        run = f"scale-{int(time.time())}"
        both, rows = bench.secledger([first.port, second.port], run, "security")
        memory = f"{first.peak_rss_mib():.0f} + {second.peak_rss_mib():.0f} MiB"
    finally:
        second.stop()
    chain = checks.walk_chain(bench.url)
    row = Row("8. two replicas, security", both, rows, insert, "", memory)
    return row, chain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds not measured")
    parser.add_argument("--rate-duration", type=float, default=30.0)
    parser.add_argument("--clients", type=int, default=2, help="load-client processes")
    parser.add_argument("--conns", type=int, default=64, help="connections in total")
    parser.add_argument("--pool", type=int, default=10, help="ceiling app connections")
    parser.add_argument("--results", type=Path, help="append the table to this Markdown file")
    args = parser.parse_args()
    header = machine()
    workdir = Path(tempfile.mkdtemp(prefix="secledger-bench-"))
    # atexit runs last-in first-out: the embedded server (registered by start) stops
    # before its directory is removed.
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)
    url = embedded.start(workdir / "pg")
    bench = Bench(args, url, workdir)
    print(f"secledger benchmark: {header}", file=sys.stderr)
    serve = servers.start_secledger("serve-a", url, workdir)
    ceiling = servers.start_ceiling(url, workdir, args.pool)
    try:
        rows = scenarios(bench, serve, ceiling)
        scaled, chain = scale_out(bench, serve, rows[2].load)
        rows.append(scaled)
    finally:
        ceiling.stop()
        serve.stop()
    table = markdown(rows)
    settings = (
        f"{args.duration:.0f} s per run ({args.warmup:.0f} s warm-up not measured),"
        f" {args.conns} keep-alive connections from {args.clients} client processes"
    )
    chain_line = (
        f"hash chain: {chain.rows} rows walked, {chain.broken} broken links, {chain.gaps} gaps:"
        f" {'intact' if chain.intact else 'BROKEN'}"
    )
    print(f"\n{header}\n{settings}\n\n{table}\n\n{chain_line}")
    if args.results:
        with args.results.open("a") as out:
            out.write(f"\n## {header}\n\n{settings}\n\n{table}\n\n{chain_line}\n")
    if not chain.intact or not all(row.lossless() for row in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
