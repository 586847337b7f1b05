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
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from click.testing import CliRunner
from sqlalchemy import Engine, text
from structlog.testing import capture_logs

from builders import dumps, mr_event
from chainkit import tamper
from faultkit import database_down
from secledger import watch as watch_module
from secledger.cli import main
from secledger.commands.downstream import start_after
from secledger.errors import ConfigError
from secledger.policy import LabelPolicy
from secledger.service import feed
from secledger.store import db
from secledger.watch import LogReplaced, Position, StateFile, StateFileError, Watcher

POLICY = LabelPolicy()
HEADERS = {"x-gitlab-event": "Merge Request Hook"}
SECLEDGER = Path(sys.executable).parent / "secledger"
LINE_TIMEOUT = 30.0  # a bound so a broken watcher fails the test instead of hanging it


def record(engine: Engine, body: dict) -> int:
    outcome = feed(engine, POLICY, HEADERS, dumps(body), max_body_bytes=10**6, source="replay")
    assert outcome.status == "recorded"
    assert outcome.seq is not None
    return outcome.seq


def log_hash(engine: Engine, seq: int) -> str:
    with engine.connect() as conn:
        found = conn.execute(text("SELECT hash FROM delivery_log WHERE seq = :s"), {"s": seq})
        return bytes(found.scalar_one()).hex()


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
    watcher = Watcher(engine, db.conninfo(database_url), out, after, threading.Event())
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
    for bad in ('{"last_seq": -1}', '{"last_seq": true}', '{"last_seq": 4.0}'):
        state.path.write_text(bad)
        with pytest.raises(StateFileError, match="no valid last_seq"):
            state.load()
    state.save(43, bytes(range(32)))
    assert json.loads(state.path.read_text()) == {"last_seq": 43, "hash": bytes(range(32)).hex()}
    assert state.position() == Position(43, bytes(range(32)))
    for bad in ('"ab"', "12", '"' + "zz" * 32 + '"'):
        state.path.write_text('{"last_seq": 43, "hash": ' + bad + "}")
        with pytest.raises(StateFileError, match="no valid hash"):
            state.load()


def test_a_state_file_that_cannot_be_saved_is_refused_before_any_line(
    engine: Engine, database_url: str, tmp_path: Path
) -> None:
    """Before, watch wrote its first read's lines, then died with a traceback."""
    record(engine, event(1))
    missing = tmp_path / "no-such-dir" / "watch.state"
    result = CliRunner().invoke(
        main,
        ["watch", "--state-file", str(missing)],
        env={"SECLEDGER_DATABASE_URL": database_url},
    )
    assert result.exit_code == 1, result.output
    assert f"cannot save the state file {missing}: No such file or directory" in result.output
    assert '"seq"' not in result.output
    writable = tmp_path / "writable"
    writable.mkdir()
    StateFile(writable / "watch.state").probe()  # leaves nothing behind
    assert list(writable.iterdir()) == []


def test_a_state_file_ahead_of_the_log_is_refused(
    engine: Engine, database_url: str, tmp_path: Path
) -> None:
    """After a restore from an older backup, watch said "after seq 40" and emitted
    nothing: the new deliveries took seqs up to 40 again and never reached downstream."""
    record(engine, event(1))
    state = tmp_path / "watch.state"
    state.write_text('{"last_seq": 40}')
    result = CliRunner().invoke(
        main, ["watch", "--state-file", str(state)], env={"SECLEDGER_DATABASE_URL": database_url}
    )
    assert result.exit_code == 1, result.output
    assert "says seq 40 was emitted, but the log ends at seq 1" in result.output
    assert "--from-seq" in result.output


def test_a_state_file_of_a_log_restored_and_written_on_since_is_refused(
    engine: Engine, database_url: str, other_database_url: str, tmp_path: Path
) -> None:
    """Once the restored log's new deliveries passed the saved seq, nothing told the two
    logs apart: watch resumed after seq 2, and the new seqs 1 and 2 were never emitted."""
    state = tmp_path / "watch.state"
    for n in (1, 2):
        record(engine, event(n, iid=n))
    out = io.StringIO()
    watcher = Watcher(engine, db.conninfo(database_url), out, 0, threading.Event())
    watcher.state = StateFile(state)
    watcher.catch_up()
    assert json.loads(state.read_text()) == {"last_seq": 2, "hash": log_hash(engine, 2)}
    # "Restored": another log, whose seqs 1..3 are other deliveries.
    restored = db.create(other_database_url)
    try:
        for n in (11, 12, 13):
            record(restored, event(n, iid=n))
        # Where `watch --state-file` starts (called, not run: it would follow for good).
        with pytest.raises(ConfigError, match="the log's row at seq 2 is another one"):
            start_after(restored, None, StateFile(state))
        assert start_after(engine, None, StateFile(state)) == 2  # its own log: resumes
        assert start_after(restored, 1, StateFile(state)) == 0  # --from-seq 1 overrides
    finally:
        restored.dispose()


def test_a_watcher_reconnecting_to_a_restored_log_stops_instead_of_skipping(
    engine: Engine, database_url: str, other_database_url: str
) -> None:
    """A watch left running across a restore reconnected, asked for the seqs after the
    last one it emitted, and skipped the restored log's new rows up to it, for good (its
    state file then held their hashes)."""
    for n in (1, 2):
        record(engine, event(n, iid=n))
    watcher = Watcher(engine, db.conninfo(database_url), io.StringIO(), 0, threading.Event())
    watcher.check_same_log()
    watcher.catch_up()
    assert (watcher.last_seq, watcher.last_hash) == (2, bytes.fromhex(log_hash(engine, 2)))
    watcher.check_same_log()  # the same log: goes on
    restored = db.create(other_database_url)
    try:
        for n in (11, 12, 13):
            record(restored, event(n, iid=n))
        watcher.engine = restored  # what a reconnect after the restore finds
        with pytest.raises(LogReplaced, match="row at seq 2, the last one emitted, is another"):
            watcher.check_same_log()
    finally:
        restored.dispose()
    # Started at a seq (from a state file without a hash, or --from-seq), a watcher takes
    # the hash of the log it found there on its first connection.
    later = Watcher(engine, db.conninfo(database_url), io.StringIO(), 1, threading.Event())
    later.check_same_log()
    assert later.last_hash == bytes.fromhex(log_hash(engine, 1))


def test_a_watcher_that_stays_connected_across_an_in_place_restore_stops(
    engine: Engine, database_url: str
) -> None:
    """`pg_restore --clean` into the live database kept the watcher's connections: it never
    reconnected, so the check above never ran, and the restored log's new rows up to its
    last seq were skipped for good. The check runs at every wake-up now."""
    for n in (1, 2):
        record(engine, event(n, iid=n))
    out = LineQueue()
    stop = threading.Event()
    watcher = Watcher(engine, db.conninfo(database_url), out, 0, stop, poll_seconds=0.05)
    failures: list[BaseException] = []

    def run() -> None:
        try:
            watcher.run()
        except BaseException as exc:  # noqa: BLE001 - what ended the thread, for the test
            failures.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        assert [out.lines.get(timeout=LINE_TIMEOUT)["seq"] for _ in (1, 2)] == [1, 2]
        tamper(
            engine,
            "DELETE FROM review_events WHERE seq >= 2",
            "DELETE FROM delivery_log WHERE seq >= 2",
        )
        for n in (12, 13):  # the restored log's seqs 2 and 3
            record(engine, event(n, iid=n))
        thread.join(timeout=LINE_TIMEOUT)
    finally:
        stop.set()
        thread.join(timeout=LINE_TIMEOUT)
    assert not thread.is_alive()
    assert len(failures) == 1 and isinstance(failures[0], LogReplaced), failures
    assert out.lines.empty()  # seq 3 was not written as if it followed the old seq 2


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
    assert json.loads(state.read_text()) == {"last_seq": 3, "hash": log_hash(engine, 3)}

    for n in range(4, 7):  # recorded while nothing watches
        record(engine, event(n, iid=n))

    second = watch("--state-file", str(state))
    seen += second.take(3)
    record(engine, event(7, iid=1, action="approved", actor="bob"))
    seen += second.take(1)
    seen += second.stop(signal.SIGTERM)
    assert json.loads(state.read_text()) == {"last_seq": 7, "hash": log_hash(engine, 7)}

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
    watcher = Watcher(engine, db.conninfo(database_url), out, 0, stop, poll_seconds=600)
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


def test_a_second_outage_starts_its_retries_from_one_second_again(
    engine: Engine, database_url: str, server_url: str, monkeypatch
) -> None:
    """The delay doubled across outages: after a long one, every later one waited 30 s
    before its first retry, though the watcher had followed again in between."""
    monkeypatch.setattr(watch_module, "log", structlog.get_logger("secledger.watch"))
    out = LineQueue()
    stop = threading.Event()
    watcher = Watcher(engine, db.conninfo(database_url), out, 0, stop, poll_seconds=0.2)
    thread = threading.Thread(target=watcher.run, daemon=True)
    with capture_logs() as logged:
        thread.start()
        try:
            record(engine, event(1, iid=1))
            assert out.lines.get(timeout=LINE_TIMEOUT)["seq"] == 1
            for n in (2, 3):
                with database_down(server_url, database_url):
                    time.sleep(3.5)  # retries after 1 s and 2 s (and 4 s, if it doubled on)
                engine.dispose()
                record(engine, event(n, iid=n))
                assert out.lines.get(timeout=LINE_TIMEOUT)["seq"] == n
        finally:
            stop.set()
            thread.join(timeout=LINE_TIMEOUT)
    delays = [e["in_seconds"] for e in logged if e["event"] == "watch_reconnecting"]
    assert delays[0] == 1.0
    assert delays.count(1.0) == 2, delays  # once per outage


class CountingState(StateFile):
    """A real state file that also records each save and what stdout had flushed by then."""

    def __init__(self, path: Path, out: FlushedLines, crash_on_save: int | None = None) -> None:
        super().__init__(path)
        self.out = out
        self.crash_on_save = crash_on_save
        self.saves: list[tuple[int, int]] = []  # (seq saved, highest seq flushed at the time)

    def save(self, seq: int, chained: bytes | None = None) -> None:
        self.saves.append((seq, max(self.out.flushed_seqs(), default=0)))
        if len(self.saves) == self.crash_on_save:
            raise SimulatedCrash(seq)
        super().save(seq, chained)


class SimulatedCrash(Exception):
    """The process dies after flushing a read's lines, before their seq is saved."""


class FlushedLines(io.StringIO):
    """A TextIO that only counts text as delivered once flushed, as a pipe does."""

    def __init__(self, stop: threading.Event | None = None, stop_after: int = 0) -> None:
        super().__init__()
        self.flushed = ""
        self.stop = stop
        self.stop_after = stop_after

    def flush(self) -> None:
        self.flushed = self.getvalue()
        if self.stop is not None and len(self.flushed.splitlines()) == self.stop_after:
            self.stop.set()  # as SIGTERM does between two lines

    def flushed_seqs(self) -> list[int]:
        return [json.loads(line)["seq"] for line in self.flushed.splitlines()]


def watcher_with_state(
    engine: Engine, database_url: str, state: StateFile, out: io.StringIO, stop: threading.Event
) -> Watcher:
    after = state.load() or 0
    return Watcher(engine, db.conninfo(database_url), out, after, stop, state=state)


@pytest.fixture
def page_of_three(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reads of 3 seqs, so a few recordings make a catch-up of several reads."""
    monkeypatch.setattr(watch_module, "PAGE", 3)


def test_catch_up_saves_the_state_once_per_read_after_flushing_its_lines(
    engine: Engine, database_url: str, tmp_path: Path, page_of_three: None
) -> None:
    """10 changes read 3 at a time: 4 saves (not 10), each after the lines it covers."""
    for n in range(1, 11):
        record(engine, event(n, iid=n))
    out = FlushedLines()
    state = CountingState(tmp_path / "watch.state", out)
    watcher = watcher_with_state(engine, database_url, state, out, threading.Event())
    watcher.catch_up()
    assert out.flushed_seqs() == list(range(1, 11))
    assert state.saves == [(3, 3), (6, 6), (9, 9), (10, 10)]
    assert StateFile(state.path).load() == 10

    watcher.catch_up()  # a wake-up with nothing new writes nothing
    assert len(state.saves) == 4


def test_crash_before_saving_a_read_repeats_at_most_that_read_and_skips_nothing(
    engine: Engine, database_url: str, tmp_path: Path, page_of_three: None
) -> None:
    """Lines 4-6 flushed, then the process dies before saving 6: a restart repeats 4-6."""
    for n in range(1, 11):
        record(engine, event(n, iid=n))
    path = tmp_path / "watch.state"
    out = FlushedLines()
    crashing = CountingState(path, out, crash_on_save=2)
    with pytest.raises(SimulatedCrash):
        watcher_with_state(engine, database_url, crashing, out, threading.Event()).catch_up()
    assert out.flushed_seqs() == [1, 2, 3, 4, 5, 6]
    assert StateFile(path).load() == 3

    again = FlushedLines()
    restarted = CountingState(path, again)
    watcher_with_state(engine, database_url, restarted, again, threading.Event()).catch_up()
    assert again.flushed_seqs() == [4, 5, 6, 7, 8, 9, 10]
    assert sorted(set(out.flushed_seqs()) | set(again.flushed_seqs())) == list(range(1, 11))
    assert StateFile(path).load() == 10


def test_stop_in_the_middle_of_a_read_saves_the_lines_already_written(
    engine: Engine, database_url: str, tmp_path: Path
) -> None:
    """SIGTERM after 2 of 5 lines of one read: 2 is saved, so a restart starts at 3."""
    for n in range(1, 6):
        record(engine, event(n, iid=n))
    path = tmp_path / "watch.state"
    stop = threading.Event()
    out = FlushedLines(stop, stop_after=2)
    watcher_with_state(engine, database_url, StateFile(path), out, stop).catch_up()
    assert out.flushed_seqs() == [1, 2]
    assert StateFile(path).load() == 2


class BrokenAfter(FlushedLines):
    """A pipe whose reader goes away after ``lines`` lines."""

    def __init__(self, lines: int) -> None:
        super().__init__()
        self.lines = lines

    def flush(self) -> None:
        if len(self.getvalue().splitlines()) > self.lines:
            raise BrokenPipeError
        super().flush()


def test_broken_pipe_saves_the_lines_delivered_before_it(
    engine: Engine, database_url: str, tmp_path: Path
) -> None:
    """The reader leaves during the third line: 2 is saved, the third is written again."""
    for n in range(1, 6):
        record(engine, event(n, iid=n))
    path = tmp_path / "watch.state"
    out = BrokenAfter(2)
    with pytest.raises(BrokenPipeError):
        watcher_with_state(engine, database_url, StateFile(path), out, threading.Event()).catch_up()
    assert out.flushed_seqs() == [1, 2]
    assert StateFile(path).load() == 2
