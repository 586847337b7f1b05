"""Compare two source trees of secledger, interleaved: is a change faster, and by how much?

These machines are shared: the same code's throughput moves by tens of percent from one
minute to the next, more than most changes are worth. This runs `secledger serve` from
two trees side by side (each on its own database of one embedded PostgreSQL) and loads
them in alternating order, round after round, so that both see the same moments of the
host, then prints the median of each.

Two measures:

- ``--rate N`` (default 1000/s): a fixed offered rate, below saturation. The figure is
  CPU time per delivery of the serving process and of PostgreSQL, read from /proc
  (Linux) over the middle of each run. At a fixed rate the batches are alike in both
  trees, and CPU per delivery is far steadier than throughput: this is the one to use
  for changes of a few percent.
- ``--rate 0``: saturation, with the ceiling app's rounds among them; the figure is each
  tree's throughput as a ratio to the ceiling's in the same round, as `make bench`
  prints it.

A tree is a directory holding the ``secledger`` package, such as a checkout's ``src``;
it is put first on PYTHONPATH, ahead of the installed one. For another revision:
``git worktree add /tmp/before HEAD~1`` and ``--b /tmp/before/src``.

Usage: python benchmarks/ab.py --b /tmp/before/src [--a src] [--rounds 8] [--rate 1000]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import cpu
import servers

from secledger import embedded

SRC = Path(__file__).resolve().parent.parent / "src"
# Each round's order: over four rounds every app goes first, in the middle and last.
ORDERS = (("C", "A", "B"), ("B", "A", "C"), ("A", "C", "B"), ("C", "B", "A"))


@dataclass
class Runs:
    """One app's measurements, a round each."""

    rates: list[float] = field(default_factory=list)
    serving_us: list[float] = field(default_factory=list)
    postgres_us: list[float] = field(default_factory=list)


def run_once(name: str, server: servers.Server, runs: Runs, args: argparse.Namespace) -> None:
    """Load ``server`` once; add its rate and CPU per delivery to ``runs``."""
    paths = {"path": "/parse", "security_path": "/insert"} if name == "C" else {}
    load, first, last = cpu.sampled_load(f"ab-{name}", server, args, args.mix, **paths)
    if load.ok != load.sent:
        raise SystemExit(f"{name}: {load.sent - load.ok} of {load.sent} requests were not 2xx")
    deliveries = load.rate * (last.at - first.at)
    serving = sum(t[0] for t in cpu.deltas(first.server, last.server))
    postgres = sum(b[0] for b in cpu.deltas(first.postgres, last.postgres))
    runs.rates.append(load.rate)
    runs.serving_us.append(serving / deliveries * 1e6)
    runs.postgres_us.append(postgres / deliveries * 1e6)


def report(results: dict[str, Runs], saturate: bool) -> None:
    """The median of each app (CPU per delivery), and B against A."""
    median = statistics.median
    print("\n| tree | deliveries/s | ratio to ceiling | serving us | PostgreSQL us |")
    print("|---|---|---|---|---|")
    for name in ("A", "B"):
        runs = results[name]
        ratio = ""
        if saturate:
            ceiling = results["C"].rates
            ratio = f"{median(m / c for m, c in zip(runs.rates, ceiling, strict=True)):.1%}"
        print(
            f"| {name} | {median(runs.rates):,.0f} | {ratio} | {median(runs.serving_us):.0f}"
            f" | {median(runs.postgres_us):.0f} |"
        )
    a, b = results["A"], results["B"]
    per_round = [x / y for x, y in zip(b.serving_us, a.serving_us, strict=True)]
    print(
        f"\nB's serving CPU per delivery against A's: median {median(per_round):.1%}"
        f" (rounds {', '.join(f'{r:.0%}' for r in per_round)})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--a", type=Path, default=SRC, help="tree A (default: this checkout)")
    parser.add_argument("--b", type=Path, required=True, help="tree B")
    parser.add_argument("--rounds", type=int, default=8, help="rounds (each runs A and B)")
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per run")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring")
    parser.add_argument("--rate", type=float, default=1000.0, help="offered rate (0: saturate)")
    parser.add_argument("--mix", choices=("security", "ignored", "mixed"), default="security")
    parser.add_argument("--conns", type=int, default=64, help="keep-alive connections")
    args = parser.parse_args()
    for tree in (args.a, args.b):
        if not (tree / "secledger" / "__init__.py").is_file():
            parser.error(f"{tree} holds no secledger package (pass a checkout's src)")
    saturate = args.rate == 0
    results = {name: Runs() for name in "ABC"}
    with tempfile.TemporaryDirectory(prefix="secledger-ab-") as tmp:
        workdir = Path(tmp)
        workdir.chmod(0o755)  # the embedded server may run as its own user (as root)
        apps: dict[str, servers.Server] = {}
        try:
            for name, tree in (("A", args.a), ("B", args.b)):
                url = embedded.start(workdir / "pg", database=f"ab_{name.lower()}")
                env = {"PYTHONPATH": str(tree.resolve())}
                apps[name] = servers.start_secledger(name, url, workdir, env=env)
            if saturate:
                url = embedded.start(workdir / "pg", database="ab_ceiling")
                apps["C"] = servers.start_ceiling(url, workdir, 10)
            for number in range(args.rounds):
                for name in ORDERS[number % len(ORDERS)]:
                    if name in apps:
                        run_once(name, apps[name], results[name], args)
                line = ", ".join(
                    f"{name} {results[name].rates[-1]:,.0f}/s {results[name].serving_us[-1]:.0f} us"
                    for name in apps
                )
                print(f"round {number + 1}: {line}", flush=True)
        finally:
            for server in apps.values():
                server.stop()
            embedded.stop(workdir / "pg")
    report(results, saturate)


if __name__ == "__main__":
    main()
