"""Where the CPU goes: CPU time per recorded delivery, by process, secledger against its ceiling.

Throughput says how fast; this says why. It shows how far apart the two apps' costs
per delivery are in one run (the host's speed moves both), and whether a run is limited
by the CPU or by waiting: processes that together use less than the machine's cores,
with one thread on a CPU most of the time, are bound by that thread.

Starts an embedded PostgreSQL, the ceiling app and `secledger serve` (as run.py does),
runs the recorded-security mix against each in turn and, over the middle of each run,
reads /proc (Linux only):

- CPU time (user + system) per delivery of the serving process and of all PostgreSQL
  processes, and the cores they used together;
- for the busiest PostgreSQL backend, the serving process's main thread (the event
  loop) and its busiest other thread (in secledger, the writer), the share of the wall
  time each spent on a CPU and waiting in the run queue for one
  (``/proc/.../schedstat``), and the two threads' CPU time per delivery. Waiting for
  the interpreter lock is sleeping, not queueing.

Usage: python benchmarks/cpu.py [--duration 12] [--rate 0] [--conns 64]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import servers

from secledger import embedded

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(stat: Path) -> float:
    """utime + stime of one process or thread, from its ``stat`` file."""
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def schedstat(path: Path) -> tuple[float, float]:
    """Seconds on a CPU and seconds waiting in the run queue."""
    on_cpu, queued, _ = path.read_text().split()
    return int(on_cpu) / 1e9, int(queued) / 1e9


def postgres_pids() -> list[int]:
    found = subprocess.run(["pgrep", "-x", "postgres"], capture_output=True, text=True, check=False)
    return [int(pid) for pid in found.stdout.split()]


@dataclass
class Sample:
    """Counters read at one instant."""

    at: float
    server: dict[int, tuple[float, float, float]]  # thread id: cpu, on cpu, queued
    postgres: dict[int, tuple[float, float, float]]  # pid: the same

    @classmethod
    def take(cls, server_pid: int) -> Sample:
        threads: dict[int, tuple[float, float, float]] = {}
        for task in Path(f"/proc/{server_pid}/task").iterdir():
            try:
                threads[int(task.name)] = _counters(task)
            except OSError:  # the thread ended while listed
                continue
        backends: dict[int, tuple[float, float, float]] = {}
        for pid in postgres_pids():
            try:
                backends[pid] = _counters(Path(f"/proc/{pid}"))
            except OSError:  # exited between pgrep and the read
                continue
        return cls(time.monotonic(), threads, backends)


def _counters(path: Path) -> tuple[float, float, float]:
    return (cpu_seconds(path / "stat"), *schedstat(path / "schedstat"))


def deltas(
    before: dict[int, tuple[float, float, float]], after: dict[int, tuple[float, float, float]]
) -> list[tuple[float, float, float]]:
    """Per id present in both samples, busiest first."""
    out = [
        (after[key][0] - old[0], after[key][1] - old[1], after[key][2] - old[2])
        for key, old in before.items()
        if key in after
    ]
    return sorted(out, reverse=True)


def split_threads(
    before: dict[int, tuple[float, float, float]],
    after: dict[int, tuple[float, float, float]],
    main: int,
) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """The deltas of thread ``main`` (a process's main thread has the process's id) and of
    the busiest other thread (zeros when there is none).

    Named rather than ranked: which thread is busiest differs between apps and runs, and
    telling them apart by rank once led to the writer's figures being read as the event
    loop's.
    """
    zero = (0.0, 0.0, 0.0)
    both = main in before and main in after
    mine = deltas({main: before[main]}, {main: after[main]}) if both else []
    others = deltas(
        {k: v for k, v in before.items() if k != main},
        {k: v for k, v in after.items() if k != main},
    )
    return (mine[0] if mine else zero), (others[0] if others else zero)


@dataclass
class Row:
    name: str
    rate: float
    server_us: float
    postgres_us: float
    cores: float
    backend: tuple[float, float]  # busiest PostgreSQL backend: on CPU, queued (share of wall)
    loop: tuple[float, float, float]  # main thread: us/delivery, on CPU, queued (share of wall)
    other: tuple[float, float, float]  # busiest other thread: the same

    def cells(self) -> list[str]:
        return [
            self.name,
            f"{self.rate:,.0f}",
            f"{self.server_us:.0f}",
            f"{self.postgres_us:.0f}",
            f"{self.server_us + self.postgres_us:.0f}",
            f"{self.cores:.2f}",
            f"{self.backend[0]:.2f} / {self.backend[1]:.2f}",
            _thread_cell(self.loop),
            _thread_cell(self.other),
        ]


def _thread_cell(thread: tuple[float, float, float]) -> str:
    us, on, queued = thread
    return f"{us:.0f} us; {on:.2f} / {queued:.2f}"


def sampled_load(
    name: str, server: servers.Server, args: argparse.Namespace, mix: str, **paths: str
) -> tuple[servers.Load, Sample, Sample]:
    """Load ``server`` with ``mix``; its counters at the start and end of the middle 60 %
    of the measured run (the window that leaves out warm-up and wind-down)."""
    window: list[Sample] = []

    def sample() -> None:
        time.sleep(1.5 + args.warmup + args.duration * 0.2)
        window.append(Sample.take(server.process.pid))
        time.sleep(args.duration * 0.6)
        window.append(Sample.take(server.process.pid))

    sampler = threading.Thread(target=sample)
    sampler.start()
    load = servers.load(
        run=f"{name}-{time.time_ns()}",
        mix=mix,
        ports=[server.port],
        project=time.time_ns() // 1000 % 1_000_000,
        clients=2,
        conns=args.conns,
        duration=args.duration,
        warmup=args.warmup,
        rate=args.rate,
        **paths,
    )
    sampler.join()
    first, last = window
    return load, first, last


def measure(name: str, server: servers.Server, args: argparse.Namespace, **paths: str) -> Row:
    """Load ``server`` with the security mix; sample over the middle of the run."""
    load, first, last = sampled_load(f"cpu-{name}", server, args, "security", **paths)
    wall = last.at - first.at
    deliveries = load.rate * wall
    threads = deltas(first.server, last.server)
    backends = deltas(first.postgres, last.postgres)
    if not backends:
        raise SystemExit("no process named 'postgres' was found to measure")
    loop, other = split_threads(first.server, last.server, server.process.pid)
    return Row(
        name,
        load.rate,
        sum(t[0] for t in threads) / deliveries * 1e6,
        sum(b[0] for b in backends) / deliveries * 1e6,
        (sum(t[0] for t in threads) + sum(b[0] for b in backends)) / wall,
        (backends[0][1] / wall, backends[0][2] / wall),
        (loop[0] / deliveries * 1e6, loop[1] / wall, loop[2] / wall),
        (other[0] / deliveries * 1e6, other[1] / wall, other[2] / wall),
    )


HEADERS = [
    "app",
    "deliveries/s",
    "serving process us/delivery",
    "PostgreSQL us/delivery",
    "total us/delivery",
    "cores used",
    "busiest backend on CPU / queued",
    "main thread (event loop): us/delivery; on CPU / queued",
    "busiest other thread (secledger: writer): us/delivery; on CPU / queued",
]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=12.0, help="seconds per run")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring")
    parser.add_argument("--rate", type=float, default=0.0, help="offered rate (0: saturate)")
    parser.add_argument("--conns", type=int, default=64, help="keep-alive connections")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="secledger-cpu-") as tmp:
        workdir = Path(tmp)
        workdir.chmod(0o755)  # the embedded server may run as its own user (as root)
        url = embedded.start(workdir / "pg")
        try:
            ceiling = servers.start_ceiling(url, workdir, 10)
            try:
                rows = [measure("ceiling", ceiling, args, path="/parse", security_path="/insert")]
            finally:
                ceiling.stop()
            serve = servers.start_secledger("serve", url, workdir)
            try:
                rows.append(measure("secledger", serve, args))
            finally:
                serve.stop()
        finally:
            embedded.stop(workdir / "pg")
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in rows]
    ceiling, mine = rows
    cpu_ratio = ceiling.server_us / mine.server_us
    print(f"{os.cpu_count()} cores; shares are of the wall time\n")
    print("\n".join(lines))
    print(
        f"\nthroughput, secledger / ceiling: {mine.rate / ceiling.rate:.0%}; serving"
        f" process's CPU per delivery, ceiling / secledger: {cpu_ratio:.0%}"
    )


if __name__ == "__main__":
    main()
