"""`make bench`: secledger against the ceiling of its own stack, measured in one run.

Starts an embedded PostgreSQL in a temporary directory, `secledger serve` as users run
it, the bare ASGI ceiling app on the same uvicorn, and load-client processes
(benchmarks/loadgen.py), all on 127.0.0.1 and bounded in time; prints one table.
Every run is checked for loss: the 2xx answers to security deliveries must equal the
new log rows, one for one, with no duplicate answers. The scale-out run adds a second
replica and walks the whole hash chain afterwards.

Runs 1-3 alternate with their ceilings over several rounds (``--rounds``, 3 by
default) and show the round with the median ratio, each round's ratio listed below.

Usage: python benchmarks/run.py [--duration 10] [--rounds 3] [--results benchmarks/RESULTS.md]
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
from collections.abc import Callable
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


@dataclass
class Pair:
    """A scenario next to its ceiling, measured in alternating rounds: (ceiling, secledger)."""

    rounds: list[tuple[Row, Row]]

    def ratios(self) -> list[float]:
        """Each round's ratio, in the order run."""
        return [mine.load.rate / ceiling.load.rate for ceiling, mine in self.rounds]

    @property
    def median(self) -> tuple[Row, Row]:
        """The round with the median ratio (of an even number, the higher middle one): the
        one the table shows."""
        ratios = self.ratios()
        return self.rounds[sorted(range(len(ratios)), key=ratios.__getitem__)[len(ratios) // 2]]

    def lossless(self) -> bool:
        return all(row.lossless() for pair in self.rounds for row in pair)

    def summary(self) -> str:
        listed = ", ".join(f"{ratio:.0%}" for ratio in self.ratios())
        return f"{self.median[1].name}: ratio by round {listed}; the table shows the median round"


def pair(
    bench: Bench,
    names: tuple[str, str],
    ceiling_run: Callable[[str], tuple[Load, int]],
    secledger_run: Callable[[str], tuple[Load, int]],
    target: str,
) -> Pair:
    """Run a scenario and its ceiling ``--rounds`` times, in alternating order.

    A shared host drifts by tens of percent within minutes: alternating which of the two
    goes first cancels a steady drift, and the median round keeps one slow moment from
    deciding the ratio. Every round is checked for loss.
    """
    rounds: list[tuple[Row, Row]] = []
    for number in range(bench.args.rounds):
        stamp = f"{int(time.time())}-{number}"
        if number % 2 == 0:
            ceiling_load, ceiling_rows = ceiling_run(stamp)
            load, rows = secledger_run(stamp)
        else:
            load, rows = secledger_run(stamp)
            ceiling_load, ceiling_rows = ceiling_run(stamp)
        ceiling = Row(names[0], ceiling_load, ceiling_rows)
        rounds.append((ceiling, Row(names[1], load, rows, ceiling_load, target)))
    return Pair(rounds)


def scenarios(
    bench: Bench, serve: servers.Server, ceiling: servers.Server
) -> tuple[list[Row], list[Pair]]:
    """Runs 1-5 against one replica, each next to its ceiling."""
    port = [serve.port]
    pairs = [
        pair(
            bench,
            ("ceiling: parse + answer", "1. ignored (10 KB, valid token)"),
            lambda s: bench.ceiling(ceiling.port, f"c-parse-{s}", "ignored", "/parse"),
            lambda s: bench.secledger(port, f"ignored-{s}", "ignored"),
            ">= 70%",
        ),
        pair(
            bench,
            ("ceiling: parse + insert 1 row + commit", "2. recorded security"),
            lambda s: bench.ceiling(ceiling.port, f"c-insert-{s}", "security", "/insert"),
            lambda s: bench.secledger(port, f"security-{s}", "security"),
            ">= 80%",
        ),
        pair(
            bench,
            ("ceiling: 90% parse / 10% insert", "3. mixed 90% ignored / 10% security"),
            lambda s: bench.ceiling(ceiling.port, f"c-mixed-{s}", "mixed", "/insert"),
            lambda s: bench.secledger(port, f"mixed-{s}", "mixed"),
            "",
        ),
    ]
    paced, paced_rows = bench.secledger(
        port,
        f"rate-{int(time.time())}",
        "mixed",
        rate=300.0,
        duration=bench.args.rate_duration,
        clients=1,
    )
    memory = f"{serve.peak_rss_mib():.0f} MiB"
    rows = [row for each in pairs for row in each.median]
    rows.append(Row("4. mixed at 300/s offered", paced, paced_rows, None, "p99 < 50 ms", memory))
    return rows, pairs


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
    parser.add_argument(
        "--rounds", type=int, default=3, help="alternating rounds of runs 1-3 and their ceilings"
    )
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
        rows, pairs = scenarios(bench, serve, ceiling)
        scaled, chain = scale_out(bench, serve, pairs[1].median[0].load)
        rows.append(scaled)
    finally:
        ceiling.stop()
        serve.stop()
    table = markdown(rows)
    settings = (
        f"{args.duration:.0f} s per run ({args.warmup:.0f} s warm-up not measured),"
        f" {args.conns} keep-alive connections from {args.clients} client processes;"
        f" runs 1-3 and their ceilings in {args.rounds} alternating rounds"
    )
    rounds = "\n".join(each.summary() for each in pairs)
    chain_line = (
        f"hash chain: {chain.rows} rows walked, {chain.broken} broken links, {chain.gaps} gaps:"
        f" {'intact' if chain.intact else 'BROKEN'}"
    )
    print(f"\n{header}\n{settings}\n\n{table}\n\n{rounds}\n{chain_line}")
    if args.results:
        with args.results.open("a") as out:
            out.write(f"\n## {header}\n\n{settings}\n\n{table}\n\n{rounds}\n{chain_line}\n")
    lossless = all(row.lossless() for row in rows) and all(each.lossless() for each in pairs)
    if not chain.intact or not lossless:
        sys.exit(1)


if __name__ == "__main__":
    main()
