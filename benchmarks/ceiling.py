"""The reference ceiling: a bare ASGI app on the same uvicorn, doing the least work possible.

``POST /parse``: read the body, parse the JSON, answer.
``POST /insert``: the same, then insert the raw body as one row and commit before
answering, on a small pool of async psycopg connections (one per in-flight request,
up to ``--pool``), against the same database as secledger.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import orjson
import psycopg
import uvicorn

TABLE = "bench_ceiling"
OK = orjson.dumps({"status": "recorded"})


class Pool:
    """A fixed set of connections handed out through a queue."""

    def __init__(self, url: str, size: int) -> None:
        self.url = url
        self.size = size
        self.idle: asyncio.Queue[psycopg.AsyncConnection[Any]] = asyncio.Queue()

    async def open(self) -> None:
        for _ in range(self.size):
            self.idle.put_nowait(await psycopg.AsyncConnection.connect(self.url))

    async def insert(self, body: bytes) -> None:
        conn = await self.idle.get()
        try:
            await conn.execute(f"INSERT INTO {TABLE} (body) VALUES (%s)", (body,))
            await conn.commit()
        finally:
            self.idle.put_nowait(conn)


def create(url: str, size: int) -> Any:
    pool = Pool(url, size)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await receive()
            await pool.open()
            await send({"type": "lifespan.startup.complete"})
            await receive()
            await send({"type": "lifespan.shutdown.complete"})
            return
        chunks = []
        more = True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        orjson.loads(body)
        if scope["path"] == "/insert":
            await pool.insert(body)
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(OK))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": OK})

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--pool", type=int, default=10)
    args = parser.parse_args()
    with psycopg.connect(args.database_url, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (id bigserial PRIMARY KEY, body bytea)")
    # The same options `secledger serve` passes (src/secledger/cli.py, _serve).
    uvicorn.run(
        create(args.database_url, args.pool),
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
        access_log=False,
        timeout_keep_alive=30,
    )


if __name__ == "__main__":
    main()
