"""One load-generator process: keep-alive HTTP/1.1 over raw asyncio protocols on uvloop.

Run by ``run.py`` (several at once); prints one JSON result on stdout. Closed loop
(each connection sends its next request when the answer arrives) unless ``rate`` is
set, in which case requests are due at fixed times and latency is counted from the
time a request was due, so a stalled server cannot hide its queue (no coordinated
omission).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
import time
from array import array
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))
from traffic import Plan

RECORDED = b'"status":"recorded"'
DUPLICATE = b'"status":"duplicate"'


class Connection(asyncio.Protocol):
    """One keep-alive connection with at most one request in flight."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0 or self.waiter is None or self.waiter.done():
            return
        head = bytes(self.buffer[:end]).lower()
        at = head.find(b"content-length:")
        stop = head.find(b"\r\n", at)
        length = int(head[at + 15 : stop if stop > 0 else len(head)])
        total = end + 4 + length
        if len(self.buffer) < total:
            return
        status = int(self.buffer[9:12])
        body = bytes(self.buffer[end + 4 : total])
        del self.buffer[:total]
        self.waiter.set_result((status, body))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection closed"))

    async def send(self, data: bytes) -> tuple[int, bytes]:
        self.waiter = asyncio.get_running_loop().create_future()
        assert self.transport is not None
        self.transport.write(data)
        return await self.waiter


class Stats:
    """What this process saw."""

    def __init__(self, start: float, warmup: float) -> None:
        self.start = start
        self.measure_from = start + warmup
        self.sent = 0
        self.statuses: dict[int, int] = {}
        self.security_2xx = 0
        self.recorded = 0
        self.duplicates = 0
        self.errors = 0
        self.latencies_us = array("I")
        self.measured = 0

    def note(self, security: bool, status: int, body: bytes, due: float, done: float) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if 200 <= status < 300 and security:
            self.security_2xx += 1
            self.recorded += RECORDED in body
            self.duplicates += DUPLICATE in body
        if due >= self.measure_from:
            self.measured += 1
            self.latencies_us.append(min(max(int((done - due) * 1e6), 0), 2**32 - 1))


async def worker(
    args: argparse.Namespace, plan: Plan, port: int, counter: itertools.count[int], stats: Stats
) -> None:
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(Connection, "127.0.0.1", port)
    end = stats.start + args.duration
    while True:
        k = next(counter)
        if args.rate:
            due = stats.start + k / args.rate
            if due >= end:
                return
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            due = min(due, time.perf_counter())  # sent early: timers may wake a little early
        else:
            due = time.perf_counter()
            if due >= end:
                return
        data, security = plan.request(k)
        stats.sent += 1
        try:
            status, body = await asyncio.wait_for(conn.send(data), args.timeout)
        except (ConnectionError, TimeoutError, OSError):
            stats.errors += 1
            conn.transport.close()  # type: ignore[union-attr]
            _, conn = await loop.create_connection(Connection, "127.0.0.1", port)
            continue
        stats.note(security, status, body, due, time.perf_counter())


async def main(args: argparse.Namespace) -> dict[str, object]:
    plan = Plan(
        args.run,
        args.mix,
        args.project,
        args.client,
        args.path.encode(),
        (args.security_path or args.path).encode(),
    )
    delay = args.start_at - time.time()  # the wall clock only to start processes together
    if delay > 0:
        await asyncio.sleep(delay)
    stats = Stats(time.perf_counter(), args.warmup)
    counter = itertools.count()
    cpu = time.process_time()
    ports = args.ports
    await asyncio.gather(
        *(worker(args, plan, ports[i % len(ports)], counter, stats) for i in range(args.conns))
    )
    return {
        "sent": stats.sent,
        "statuses": stats.statuses,
        "security_2xx": stats.security_2xx,
        "recorded": stats.recorded,
        "duplicates": stats.duplicates,
        "errors": stats.errors,
        "measured": stats.measured,
        "window": args.duration - args.warmup,
        "cpu": time.process_time() - cpu,
        "wall": time.perf_counter() - stats.start,
        "latencies_us": stats.latencies_us.tobytes().hex(),
    }


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ports", type=int, nargs="+", required=True)
    parser.add_argument("--path", default="/webhooks/gitlab")
    parser.add_argument("--security-path", default="")
    parser.add_argument("--mix", choices=("ignored", "security", "mixed"), required=True)
    parser.add_argument("--run", required=True)
    parser.add_argument("--project", type=int, required=True)
    parser.add_argument("--client", type=int, default=0)
    parser.add_argument("--conns", type=int, default=32)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--rate", type=float, default=0.0, help="requests/s; 0 = closed loop")
    parser.add_argument("--timeout", type=float, default=15.0)
    parser.add_argument("--start-at", type=float, default=0.0)
    parser.add_argument("--out", type=Path, required=True, help="where the JSON result goes")
    return parser.parse_args()


if __name__ == "__main__":
    uvloop.install()
    arguments = parse()
    arguments.out.write_text(json.dumps(asyncio.run(main(arguments))))
