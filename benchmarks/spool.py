"""Deliveries acknowledged while PostgreSQL was down, and how many reached the ledger after.

Starts its own embedded PostgreSQL and a real `secledger serve`, records a warm-up
load, crashes PostgreSQL (pg_ctl stop -m immediate), sends a load that the receiver
can only spool, restarts PostgreSQL and waits for the spool to drain. Prints the
acknowledgement rate and latency while spooling, the drain time, and the count of
acknowledged deliveries found in delivery_log afterwards (it must be all of them).

    .venv/bin/python benchmarks/spool.py [--down 1000] [--threads 8]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from faultkit import Answer, Load, Postgres, Receiver, key_for, logged, wait_until


def timed_load(base: str, indexes: range, threads: int) -> tuple[Load, list[float], float]:
    """Send ``indexes``; the load, per-request latencies (ms) and wall time (s)."""
    load = Load(base, threads=threads)
    latencies: list[float] = []
    send = load.send

    def measured(i: int) -> Answer:
        started = time.perf_counter()
        answer = send(i)
        latencies.append((time.perf_counter() - started) * 1000)
        return answer

    load.send = measured  # type: ignore[method-assign]  # timing wrapper
    started = time.perf_counter()
    load.run(indexes, lambda _load: None)
    return load, latencies, time.perf_counter() - started


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--up", type=int, default=200, help="deliveries before the crash")
    parser.add_argument("--down", type=int, default=1000, help="deliveries while it is down")
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="secledger-bench-spool-"))
    postgres = Postgres(work / "pg")
    receiver = Receiver(work, postgres.start())
    try:
        receiver.start()
        warm, _, _ = timed_load(receiver.base, range(args.up), args.threads)
        recorded = sum(1 for a in warm.answers.values() if a.acknowledged)

        postgres.crash()
        down_range = range(args.up, args.up + args.down)
        load, latencies, wall = timed_load(receiver.base, down_range, args.threads)
        acked = [a.index for a in load.answers.values() if a.acknowledged]
        spooled = load.count("spooled")
        refused = args.down - len(acked)
        spool_bytes = receiver.ready()["spool"]["bytes"]

        restarted = time.perf_counter()
        postgres.start()
        wait_until(receiver.drained, 300, "the spool to drain")
        drain_seconds = time.perf_counter() - restarted

        keys = {row["dedup_key"] for row in logged(postgres.url)}
        reached = sum(1 for i in acked if f"idem:{key_for(i)}" in keys)
    finally:
        receiver.stop()
        postgres.stop()
        shutil.rmtree(work, ignore_errors=True)

    print(f"before the crash: {recorded}/{args.up} recorded")
    print(f"while PostgreSQL was down ({args.threads} concurrent senders):")
    print(f"  sent {args.down}, acknowledged {len(acked)} (spooled {spooled}), refused {refused}")
    print(f"  {len(acked) / wall:.0f} acknowledgements/s over {wall:.2f} s")
    print(
        f"  latency ms: p50 {percentile(latencies, 50):.1f}, p99 {percentile(latencies, 99):.1f},"
        f" max {max(latencies):.1f}"
    )
    print(f"  spool size: {spool_bytes} bytes")
    print(
        f"after restart: drained in {drain_seconds:.2f} s (restart of PostgreSQL included);"
        f" {reached}/{len(acked)} acknowledged deliveries reached the ledger"
    )
    if reached != len(acked):
        print("LOSS: some acknowledged deliveries are missing from delivery_log")
        sys.exit(1)


if __name__ == "__main__":
    main()
