"""`secledger watch`: every change as a JSON line, resumable without gaps or repeats."""

from __future__ import annotations

import io
import json
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text

from builders import dumps, mr_event
from secledger.policy import LabelPolicy
from secledger.service import feed
from secledger.store import db
from secledger.watch import StateFile, StateFileError, Watcher

POLICY = LabelPolicy()
HEADERS = {"x-gitlab-event": "Merge Request Hook"}
SECLEDGER = Path(sys.executable).parent / "secledger"
LINE_TIMEOUT = 30.0  # a bound so a broken watcher fails the test instead of hanging it


def record(engine: Engine, body: dict) -> int:
    outcome = feed(engine, POLICY, HEADERS, dumps(body), max_body_bytes=10**6, source="replay")
    assert outcome.status == "recorded"
    assert outcome.seq is not None
    return outcome.seq


def event(n: int, *, iid: int = 1, action: str = "update", actor: str = "root") -> dict:
    """A distinct security delivery (the minute makes each body, so each dedup key, unique)."""
    return mr_event(action, iid=iid, actor=actor, updated_at=f"2025-08-06 10:{n:02d}:00 UTC")


class WatchProcess:
    """`secledger watch` as users run it: a real process, read line by line."""

    def __init__(self, database_url: str, data_dir: Path, *args: str) -> None:
        env = os.environ | {
            "SECLEDGER_DATABASE_URL": database_url,
            "SECLEDGER_DATA_DIR": str(data_dir),
            "SECLEDGER_LOG_LEVEL": "warning",
        }
        self.process = subprocess.Popen(
            [str(SECLEDGER), "watch", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def take(self, count: int) -> list[dict[str, Any]]:
        """The next ``count`` lines, parsed; fails if they do not come."""
        taken = []
        for _ in range(count):
            line = self.lines.get(timeout=LINE_TIMEOUT)
            assert line is not None, f"watch ended early: {self.stop_and_stderr()}"
            taken.append(json.loads(line))
        return taken

    def stop(self, sig: int = signal.SIGTERM) -> list[dict[str, Any]]:
        """Signal the process, wait for a clean exit, return any lines it still wrote."""
        self.process.send_signal(sig)
        assert self.process.wait(timeout=LINE_TIMEOUT) == 0, self.stop_and_stderr()
        self._reader.join(timeout=LINE_TIMEOUT)
        rest = []
        while (line := self.lines.get(timeout=LINE_TIMEOUT)) is not None:
            rest.append(json.loads(line))
        return rest

    def stop_and_stderr(self) -> str:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=LINE_TIMEOUT)
        assert self.process.stderr is not None
        return self.process.stderr.read()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=LINE_TIMEOUT)


@pytest.fixture
def watch(database_url: str, tmp_path: Path) -> Iterator[Any]:
    started: list[WatchProcess] = []

    def start(*args: str) -> WatchProcess:
        process = WatchProcess(database_url, tmp_path / "data", *args)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()


def catch_up(engine: Engine, database_url: str, after: int) -> tuple[list[dict], Watcher]:
    out = io.StringIO()
    watcher = Watcher(engine, db.libpq_url(database_url), out, after, threading.Event())
    watcher.catch_up()
    return [json.loads(line) for line in out.getvalue().splitlines()], watcher


def test_caught_up_seqs_of_one_mr_make_one_line_with_its_current_row(
    engine: Engine, database_url: str
) -> None:
    """Several seqs of one MR read together: one line at its highest seq, listing them all."""
    record(engine, event(1, iid=1))  # seq 1: MR 1
    record(engine, event(2, iid=2))  # seq 2: MR 2
    record(engine, event(3, iid=1, action="approved", actor="bob"))  # seq 3: MR 1
    lines, watcher = catch_up(engine, database_url, after=0)
    assert [(line["mr_iid"], line["seq"], line["seqs"]) for line in lines] == [
        (2, 2, [2]),
        (1, 3, [1, 3]),
    ]
    assert lines[1]["ledger"]["decision"] == "approved"  # the row as it is now
    assert lines[1]["ledger"]["last_seq"] == 3
    assert watcher.last_seq == 3

    record(engine, event(4, iid=2, action="merge", actor="alice"))
    again, _ = catch_up(engine, database_url, after=watcher.last_seq)
    assert [(line["mr_iid"], line["seq"], line["seqs"]) for line in again] == [(2, 4, [4])]
    assert again[0]["ledger"]["decision"] == "merged"


def test_catch_up_from_a_seq_skips_what_came_before(engine: Engine, database_url: str) -> None:
    for n in range(1, 4):
        record(engine, event(n, iid=n))
    lines, _ = catch_up(engine, database_url, after=1)
    assert [line["seq"] for line in lines] == [2, 3]


def test_state_file_round_trip_and_errors(tmp_path: Path) -> None:
    state = StateFile(tmp_path / "watch.state")
    assert state.load() is None
    state.save(41)
    state.save(42)
    assert state.load() == 42
    assert json.loads(state.path.read_text()) == {"last_seq": 42}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["watch.state"]
    state.path.write_text("garbage")
    with pytest.raises(StateFileError, match="not a watch state file"):
        state.load()
    state.path.write_text('{"last_seq": -1}')
    with pytest.raises(StateFileError, match="no valid last_seq"):
        state.load()


def test_watch_emits_every_change(engine: Engine, database_url: str, watch) -> None:
    """Live: one line per committed change, each with the seq and the row it produced."""
    first = record(engine, event(1, iid=1, action="open"))
    process = watch("--from-seq", "1")
    assert process.take(1)[0]["seq"] == first
    expected = [
        (record(engine, event(2, iid=1, action="approved", actor="bob")), 1, "approved"),
        (record(engine, event(3, iid=2, action="open")), 2, None),
        (record(engine, event(4, iid=1, action="merge", actor="alice")), 1, "merged"),
    ]
    got = []
    for seq, _iid, _decision in expected:
        line = process.take(1)[0]  # wait for each line, so no two seqs are read together
        got.append((line["seq"], line["mr_iid"], line["ledger"]["decision"]))
        assert line["seqs"] == [seq]
        assert line["ledger"]["last_seq"] == seq
    assert got == expected
    assert process.stop(signal.SIGINT) == []


def test_watch_resumes_from_its_state_file_without_gaps_or_repeats(
    engine: Engine, database_url: str, tmp_path: Path, watch
) -> None:
    """Stopped, then changes recorded, then restarted: exactly the missed seqs, once."""
    state = tmp_path / "watch.state"
    record(engine, event(1, iid=1))
    record(engine, event(2, iid=2))
    first = watch("--state-file", str(state))  # no state yet: from the first seq
    seen = first.take(2)
    record(engine, event(3, iid=3))
    seen += first.take(1)
    seen += first.stop(signal.SIGTERM)
    assert json.loads(state.read_text()) == {"last_seq": 3}

    for n in range(4, 7):  # recorded while nothing watches
        record(engine, event(n, iid=n))

    second = watch("--state-file", str(state))
    seen += second.take(3)
    record(engine, event(7, iid=1, action="approved", actor="bob"))
    seen += second.take(1)
    seen += second.stop(signal.SIGTERM)
    assert json.loads(state.read_text()) == {"last_seq": 7}

    assert [line["seq"] for line in seen] == [1, 2, 3, 4, 5, 6, 7]
    assert [line["mr_iid"] for line in seen] == [1, 2, 3, 4, 5, 6, 1]
    assert seen[-1]["ledger"]["approvers"] == ["bob"]


def test_watch_catches_up_after_losing_its_connections(
    engine: Engine, database_url: str, watch
) -> None:
    """Connections killed under it: it reconnects and reads what it missed from the tables."""
    record(engine, event(1, iid=1))
    process = watch("--from-seq", "1")
    assert process.take(1)[0]["seq"] == 1
    with engine.connect() as conn:
        killed = conn.execute(
            text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        ).scalar_one()
    assert killed >= 1
    record(engine, event(2, iid=2))
    line = process.take(1)[0]
    assert (line["seq"], line["mr_iid"]) == (2, 2)
    assert process.stop() == []


class LineQueue(io.StringIO):
    """A TextIO that hands each complete line to a queue (the watcher writes whole lines)."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()

    def write(self, text: str) -> int:
        for line in text.splitlines():
            self.lines.put(json.loads(line))
        return len(text)


def test_a_notification_wakes_the_watcher(engine: Engine, database_url: str) -> None:
    """With polling pushed out to 10 minutes, only NOTIFY can deliver the line in time."""
    out = LineQueue()
    stop = threading.Event()
    watcher = Watcher(engine, db.libpq_url(database_url), out, 0, stop, poll_seconds=600)
    thread = threading.Thread(target=watcher.run, daemon=True)
    thread.start()
    try:
        record(engine, event(1, iid=1))
        assert out.lines.get(timeout=LINE_TIMEOUT)["seq"] == 1
        record(engine, event(2, iid=2))
        assert out.lines.get(timeout=LINE_TIMEOUT)["seq"] == 2
    finally:
        stop.set()
        thread.join(timeout=LINE_TIMEOUT)
    assert not thread.is_alive()
