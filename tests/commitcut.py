"""A TCP proxy to PostgreSQL that can lose the answer to a COMMIT.

Armed, it lets the next COMMIT through, waits until the server has answered it (the
transaction is then durable), and closes the client's connection without passing that
answer on. The client sees a broken connection and cannot tell whether its transaction
committed: the "in doubt" case that killing a backend cannot reproduce, since a backend
terminated after its COMMIT has already sent the answer.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import Any
from urllib.parse import quote

import psycopg.conninfo

# CommandComplete ('C', length 11, tag "COMMIT"): PostgreSQL sends it once the commit is done.
COMMIT_DONE = b"C\x00\x00\x00\x0bCOMMIT\x00"


def _upstream(libpq_url: str) -> tuple[int, Any]:
    """The address family and address of the server a libpq URL names."""
    params = psycopg.conninfo.conninfo_to_dict(libpq_url)
    host = str(params.get("host") or "/var/run/postgresql")
    port = int(params.get("port") or 5432)
    if host.startswith("/"):
        return socket.AF_UNIX, f"{host}/.s.PGSQL.{port}"
    return socket.AF_INET, (host, port)


class CommitCutter:
    """Listens on 127.0.0.1; ``url`` is the given libpq URL, through this proxy."""

    def __init__(self, libpq_url: str) -> None:
        self._family, self._address = _upstream(libpq_url)
        params = psycopg.conninfo.conninfo_to_dict(libpq_url)
        self._listener = socket.create_server(("127.0.0.1", 0))
        port = self._listener.getsockname()[1]
        user = quote(str(params.get("user") or "postgres"), safe="")
        password = quote(str(params.get("password") or ""), safe="")
        # The proxy must read the bytes to find the COMMIT: no encryption (which a server
        # on a Unix socket would refuse anyway).
        self.url = (
            f"postgresql://{user}:{password}@127.0.0.1:{port}/{params.get('dbname', '')}"
            "?sslmode=disable&gssencmode=disable"
        )
        self.armed = threading.Event()
        self.cut = threading.Event()  # set once an answer to a COMMIT was lost
        self._closing = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._closing = True
        self._listener.close()

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.socket(self._family, socket.SOCK_STREAM)
            server.connect(self._address)
            committing = threading.Event()
            threading.Thread(
                target=self._to_server, args=(client, server, committing), daemon=True
            ).start()
            threading.Thread(
                target=self._to_client, args=(server, client, committing), daemon=True
            ).start()

    def _to_server(
        self, client: socket.socket, server: socket.socket, committing: threading.Event
    ) -> None:
        tail = b""
        try:
            while data := client.recv(65536):
                if self.armed.is_set() and b"COMMIT" in tail + data:
                    committing.set()
                tail = data[-8:]
                server.sendall(data)
        except OSError:
            pass
        finally:
            _close(server)

    def _to_client(
        self, server: socket.socket, client: socket.socket, committing: threading.Event
    ) -> None:
        held = b""
        try:
            while data := server.recv(65536):
                if not committing.is_set():
                    client.sendall(data)
                    continue
                held += data  # withheld from the client: the results of the transaction
                if COMMIT_DONE in held:
                    self.armed.clear()
                    self.cut.set()
                    return
        except OSError:
            pass
        finally:
            _close(client)
            _close(server)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()
