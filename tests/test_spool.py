"""The durable spool: files on disk, the drain, and the receiver while the database is down."""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import os
import shutil
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
import structlog
from click.testing import CliRunner
from fastapi.testclient import TestClient
from sqlalchemy import Engine, create_engine, text
from structlog.testing import capture_logs

from builders import delivery_of, label_change, mr_event
from chainkit import readonly_url
from conftest import post
from faultkit import database_down
from replicas import recorded_elsewhere
from secledger import ignoredspool, web
from secledger import recorder as recorder_module
from secledger import spool as spool_module
from secledger import webhook as webhook_module
from secledger.cli import main
from secledger.config import Settings
from secledger.drain import Drainer, is_transient
from secledger.extract import mr_key
from secledger.intake import Delivery
from secledger.membership import KnownMRs
from secledger.policy import LabelPolicy
from secledger.recorder import Recorder
from secledger.service import Outcome
from secledger.spool import CORRUPT, TEMP_PREFIX, Spool, SpoolUnavailable, decode, encode
from secledger.store import db
from secledger.store.log import CHAIN_LOCK_KEY
from secledger.times import utcnow
from secledger.web import create_app

RECEIVED = datetime(2025, 8, 5, 21, 48, 25, 123456, tzinfo=UTC)


def delivery(body: dict[str, Any], key: str, received_at: datetime = RECEIVED) -> Delivery:
    return delivery_of(body, key, received_at)


def log_rows(engine: Engine) -> list[tuple[int, str, datetime, str]]:
    with engine.connect() as conn:
        query = text("SELECT seq, dedup_key, received_at, source FROM delivery_log ORDER BY seq")
        return [tuple(row) for row in conn.execute(query)]  # type: ignore[misc]


def refuse_iid_7(engine: Engine, errcode: str = "P0001") -> None:
    """Make the database refuse any delivery of MR !7 (a trigger on review_events), with
    SQLSTATE ``errcode``."""
    with engine.begin() as conn:
        conn.execute(
            text(
                "CREATE FUNCTION refuse_iid_7() RETURNS trigger LANGUAGE plpgsql AS $$"
                " BEGIN IF NEW.mr_iid = 7 THEN RAISE EXCEPTION 'refused for the test'"
                f" USING ERRCODE = '{errcode}'; END IF;"
                " RETURN NEW; END $$"
            )
        )
        conn.execute(
            text(
                "CREATE TRIGGER refuse_iid_7 BEFORE INSERT ON review_events"
                " FOR EACH ROW EXECUTE FUNCTION refuse_iid_7()"
            )
        )


def wait_for(condition: Any, seconds: float = 20.0) -> None:
    """Poll until ``condition()`` is true; fail the test after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail("condition not reached in time")
        time.sleep(0.05)


@pytest.fixture
def spool_settings(settings: Settings) -> Settings:
    """Settings that retry the database quickly, so a drain follows recovery at once."""
    return settings.model_copy(update={"spool_retry_seconds": 0.05})


@pytest.fixture
def receiver(spool_settings: Settings, database_url: str) -> Iterator[TestClient]:
    app = create_app(spool_settings, db.Database(database_url, embedded=False))
    with TestClient(app) as test_client:
        yield test_client


def spool_depth(client: TestClient) -> int:
    return int(client.get("/readyz").json()["spool"]["depth"])


def test_spool_file_keeps_everything_needed_to_record_later(tmp_path: Path) -> None:
    original = delivery(mr_event("approved", actor="bob"), "k-1")
    spool = Spool.open(tmp_path / "spool")
    [path] = spool.write([original])
    kept = decode(path.read_bytes())
    assert kept.received_at == RECEIVED
    assert (kept.source, kept.event, kept.instance) == (
        "webhook",
        original.event,
        original.instance,
    )
    assert kept.dedup_key == "idem:k-1"
    assert kept.headers == original.headers
    assert kept.body == original.body
    assert spool.depth == 1


def test_names_sort_in_write_order(tmp_path: Path) -> None:
    spool = Spool.open(tmp_path / "spool")
    keys = [f"k-{i}" for i in range(50)]
    for key in keys:
        spool.write([delivery(mr_event("update"), key)])
    assert [spool.read(p).dedup_key for p in spool.entries()] == [f"idem:{k}" for k in keys]
    reopened = Spool.open(tmp_path / "spool")
    reopened.write([delivery(mr_event("update"), "after-restart")])
    assert reopened.read(reopened.entries()[-1]).dedup_key == "idem:after-restart"


def test_interrupted_write_is_never_read_as_a_delivery(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    directory.mkdir()
    data = encode(delivery(mr_event("open"), "half"))
    (directory / f"{TEMP_PREFIX}00000000000000000001-1.dlv").write_bytes(data[: len(data) // 2])
    spool = Spool.open(directory)
    assert spool.entries() == []
    assert spool.depth == 0
    assert list(directory.iterdir()) == []


def test_corrupt_file_is_set_aside_and_reported_not_dropped(tmp_path: Path, engine) -> None:
    spool = Spool.open(tmp_path / "spool")
    [good] = spool.write([delivery(mr_event("open"), "good")])
    data = encode(delivery(mr_event("approved", actor="bob"), "torn"))
    torn = spool.directory / "00000000000000000001-1.dlv"
    torn.write_bytes(data[:-10])
    result = Drainer(engine, spool, LabelPolicy()).all()
    assert (result.recorded, result.set_aside, result.remaining) == (1, 1, 0)
    assert not good.exists()
    assert (spool.directory / CORRUPT / torn.name).read_bytes() == data[:-10]
    reason = (spool.directory / CORRUPT / f"{torn.name}.reason").read_text()
    assert "body is" in reason
    assert spool.status().corrupt == 1
    assert [row[1] for row in log_rows(engine)] == ["idem:good"]


def test_drain_keeps_receipt_time_and_order_and_a_second_drain_is_harmless(
    tmp_path: Path, engine
) -> None:
    spool = Spool.open(tmp_path / "spool")
    times = [datetime(2025, 8, 5, 21, 0, i, 7, tzinfo=UTC) for i in range(3)]
    bodies = [
        mr_event("open", updated_at="2025-08-05 20:00:00 UTC"),
        mr_event("approved", actor="bob", updated_at="2025-08-05 20:30:00 UTC"),
        mr_event("merge", actor="alice", updated_at="2025-08-05 20:40:00 UTC"),
    ]
    spool.write(
        [delivery(b, f"k-{i}", t) for i, (b, t) in enumerate(zip(bodies, times, strict=True))]
    )
    copies = {p.name: p.read_bytes() for p in spool.entries()}
    assert Drainer(engine, spool, LabelPolicy()).all().recorded == 3
    # A crash after the commit but before the files were deleted drains them again.
    for name, data in copies.items():
        (spool.directory / name).write_bytes(data)
    again = Drainer(engine, spool, LabelPolicy()).all()
    assert (again.recorded, again.duplicates, again.remaining) == (0, 3, 0)
    rows = log_rows(engine)
    assert [r[1] for r in rows] == ["idem:k-0", "idem:k-1", "idem:k-2"]
    assert [r[2] for r in rows] == times
    assert {r[3] for r in rows} == {"webhook"}


def test_receiver_spools_with_202_while_the_database_is_down_and_drains_after(
    receiver: TestClient, engine, server_url: str, database_url: str, spool_settings
) -> None:
    first = post(receiver, mr_event("open"), Idempotency_Key="d-0")
    assert first.json()["status"] == "recorded"
    answers = []
    with database_down(server_url, database_url), capture_logs() as logs:
        for i in range(1, 4):
            body = mr_event("update", updated_at=f"2025-08-05 22:0{i}:00 UTC")
            answers.append(post(receiver, body, Idempotency_Key=f"d-{i}"))
        ready = receiver.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["spool"]["depth"] == 3
        # Anyone may ask /readyz: it must not say where the spool lives.
        assert "directory" not in ready.json()["spool"]
        assert str(spool_settings.spool_path) not in ready.text
        assert len(list(spool_settings.spool_path.glob("*.dlv"))) == 3

        def spooled() -> list[dict[str, Any]]:
            return [e for e in logs if e["event"] == "delivery" and e["outcome"] == "spooled"]

        # A delivery's line follows its answer: the last one may still be on its way.
        wait_for(lambda: len(spooled()) >= 3)
    # While the outage lasts, the log tells which MRs wait (the ledger cannot).
    assert [(e["project_id"], e["mr_iid"]) for e in spooled()] == [(14, 1)] * 3
    assert [a.status_code for a in answers] == [202, 202, 202]
    assert {a.json()["status"] for a in answers} == {"spooled"}
    assert [a.json()["spool_depth"] for a in answers] == [1, 2, 3]
    wait_for(lambda: spool_depth(receiver) == 0)
    rows = log_rows(engine)
    assert [r[1] for r in rows] == [f"idem:d-{i}" for i in range(4)]
    received = [datetime.fromisoformat(a.json()["received_at"]) for a in answers]
    assert [r[2] for r in rows[1:]] == received
    assert receiver.get("/readyz").json()["ready"] is True


def test_label_removal_behind_a_spooled_open_is_not_ignored(
    receiver: TestClient, engine, server_url: str, database_url: str
) -> None:
    """The receiver cannot know the MR is a security MR yet: the open is still spooled."""
    removed = mr_event(
        "update",
        labels=["backend"],
        updated_at="2025-08-05 23:00:00 UTC",
        changes=label_change(["sec::high"], ["backend"], "2025-08-05 23:00:00 UTC"),
    )
    merged = mr_event("merge", labels=["backend"], updated_at="2025-08-06 09:00:00 UTC")
    with database_down(server_url, database_url):
        assert post(receiver, mr_event("open")).json()["status"] == "spooled"
        assert post(receiver, removed).json()["status"] == "spooled"
        # Not a security delivery by itself, and the MR is not in the ledger yet.
        assert post(receiver, merged).json()["status"] == "spooled"
    wait_for(lambda: spool_depth(receiver) == 0)
    assert len(log_rows(engine)) == 3
    row = post(receiver, mr_event("close", labels=["backend"])).json()
    assert row["status"] == "recorded"
    assert row["ledger"]["decision"] == "merged"


def test_a_delivery_drained_as_ignored_is_recorded_once_another_replica_drains_its_mr(
    receiver: TestClient, engine, server_url: str, database_url: str
) -> None:
    """In one outage another replica spooled MR 7's first delivery (its security label)
    and this one, later, its merge (no label left): drained here first, the merge was
    found ignored and its file deleted, lost without a word though answered 202."""
    received_elsewhere = utcnow()  # the other replica had the open first
    merged = mr_event("merge", iid=7, labels=["backend"], updated_at="2025-08-06 09:00:00 UTC")
    with database_down(server_url, database_url):
        # Once one delivery is spooled, every later one is spooled behind it.
        assert post(receiver, mr_event("open", iid=5), Idempotency_Key="open-5").status_code == 202
        assert post(receiver, merged, Idempotency_Key="merge-7").json()["status"] == "spooled"
    wait_for(lambda: spool_depth(receiver) == 0)
    # MR 7 is not a security MR as far as this database knows yet.
    assert [row[1] for row in log_rows(engine)] == ["idem:open-5"]
    opened = mr_event("open", iid=7)
    recorded_elsewhere(engine, opened, received_elsewhere, **{"idempotency-key": "open-7"})
    wait_for(lambda: len(log_rows(engine)) == 3)
    assert [row[1] for row in log_rows(engine)] == ["idem:open-5", "idem:open-7", "idem:merge-7"]
    with engine.connect() as conn:
        state = conn.execute(
            text("SELECT state FROM security_review_ledger WHERE mr_iid = 7")
        ).scalar_one()
    assert state == "merged"


def test_a_delivery_drained_as_ignored_at_start_up_is_held_for_the_other_replica(
    spool_settings: Settings, database_url: str, engine
) -> None:
    """Restarted with the outage's deliveries in its spool, a replica drains them before
    any request comes, and so before the webhook's handler, which holds them, exists."""
    merged = mr_event("merge", iid=7, labels=["backend"], updated_at="2025-08-06 09:00:00 UTC")
    spool = Spool.open(spool_settings.spool_path)
    spool.write([delivery(merged, "merge-7", received_at=utcnow())])
    app = create_app(spool_settings, db.Database(database_url, embedded=False))
    with TestClient(app) as client:
        wait_for(lambda: spool_depth(client) == 0)  # the first request: a probe
        assert log_rows(engine) == []
        opened = mr_event("open", iid=7)
        recorded_elsewhere(engine, opened, RECEIVED, **{"idempotency-key": "open-7"})
        wait_for(lambda: len(log_rows(engine)) == 2)
    assert [row[1] for row in log_rows(engine)] == ["idem:open-7", "idem:merge-7"]


def test_a_delivery_drained_as_ignored_at_stop_is_looked_at_again_after_a_restart(
    settings: Settings, engine, server_url: str, database_url: str
) -> None:
    """Found by a review: stopped right after an outage (a rolling restart), a replica's
    last drain found MR 7's merge ignored and deleted its file; the hold in memory went
    with the process, and the merge was lost without a word though answered 202."""
    slow = settings.model_copy(update={"spool_retry_seconds": 300})
    received_elsewhere = utcnow()  # the other replica had the open first
    merged = mr_event("merge", iid=7, labels=["backend"], updated_at="2025-08-06 09:00:00 UTC")
    app = create_app(slow, db.Database(database_url, embedded=False))
    # The database comes back first, the next drain 5 minutes away: the stop drains.
    with TestClient(app) as client, database_down(server_url, database_url):
        assert post(client, mr_event("open", iid=5), Idempotency_Key="open-5").status_code == 202
        assert post(client, merged, Idempotency_Key="merge-7").json()["status"] == "spooled"
    assert [row[1] for row in log_rows(engine)] == ["idem:open-5"]
    spool = Spool.open(slow.spool_path)
    assert (spool.depth, spool.ignored_count(), spool.status().ignored) == (0, 1, 1)
    # Meanwhile the other replica's spool gave MR 7's first delivery.
    opened = mr_event("open", iid=7)
    recorded_elsewhere(engine, opened, received_elsewhere, **{"idempotency-key": "open-7"})
    with TestClient(create_app(slow, db.Database(database_url, embedded=False))) as client:
        wait_for(lambda: len(log_rows(engine)) == 3)
    assert [row[1] for row in log_rows(engine)] == ["idem:open-5", "idem:open-7", "idem:merge-7"]
    assert (spool.recount(), spool.ignored_count()) == (0, 0)


def aged(path: Path, seconds: float) -> None:
    """Make ``path`` look moved to ignored/ ``seconds`` ago."""
    stamp = time.time() - seconds
    os.utime(path, (stamp, stamp))


def test_kept_ignored_files_are_judged_as_the_hold_in_memory_judges(engine, tmp_path) -> None:
    """Found by a review: the files put back in the queue were recorded whenever their MR
    was known by then, even one received before the MR's first security delivery, which
    the running replica had rightly left out; and each pass restarted their hold."""
    spool = Spool.open(tmp_path / "spool")
    t0 = utcnow()
    at = [t0 + timedelta(seconds=s) for s in range(5)]
    before = mr_event("update", iid=7, labels=["backend"], updated_at="2025-08-06 08:00:00 UTC")
    labelled = mr_event("update", iid=7, labels=["sec::high"], updated_at="2025-08-06 09:00:00 UTC")
    after = mr_event("update", iid=8, labels=["backend"], updated_at="2025-08-06 10:00:00 UTC")
    unknown = mr_event("update", iid=9, labels=["backend"], updated_at="2025-08-06 10:00:00 UTC")
    spool.write(
        [
            delivery(before, "before-7", at[0]),
            delivery(labelled, "label-7", at[1]),
            delivery(after, "after-8", at[3]),
            delivery(unknown, "other-9", at[4]),
        ]
    )
    drainer = Drainer(engine, spool, LabelPolicy())
    told: list[str] = []
    drainer.on_ignored = lambda found: told.extend(d.dedup_key for d in found)
    assert drainer.all().recorded == 1
    assert told == ["idem:before-7", "idem:after-8", "idem:other-9"]
    assert (spool.recount(), spool.ignored_count()) == (0, 3)
    waiting = spool.ignored_paths()[-1]  # other-9's: its MR stays unknown
    aged(waiting, 200)
    # MR 8's first security delivery, received before after-8, drained elsewhere.
    recorded_elsewhere(engine, mr_event("open", iid=8), at[2], **{"idempotency-key": "open-8"})
    swept = drainer.sweep_ignored()
    # before-7 came before MR 7 was known: not recorded, as the running replica left it
    # out; deleted only when its hold ends (another replica may yet drain an older one).
    assert (swept.queued, swept.left, swept.waiting, swept.expired) == (1, 0, 2, 0)
    assert time.time() - waiting.stat().st_mtime > 199  # its hold goes on, not anew
    assert drainer.all().recorded == 1
    keys = [row[1] for row in log_rows(engine)]
    assert keys == ["idem:label-7", "idem:open-8", "idem:after-8"]
    swept = drainer.ignored.sweep(now=time.time() + 301)  # every hold is over
    assert (swept.queued, swept.left, swept.waiting, swept.expired) == (0, 1, 0, 1)
    assert spool.ignored_count() == 0
    assert [row[1] for row in log_rows(engine)] == keys


def test_a_kept_file_is_deleted_on_the_databases_word_not_a_lagging_memory(
    engine, tmp_path: Path
) -> None:
    """serve judges by the MRs it knows in memory, which a listener that cannot reconnect
    leaves behind: at the end of the hold, the database is asked before a file goes."""
    spool = Spool.open(tmp_path / "spool")
    opened_at = utcnow()
    merged = mr_event("merge", iid=7, labels=["backend"], updated_at="2025-08-06 09:00:00 UTC")
    spool.write([delivery(merged, "merge-7", opened_at + timedelta(seconds=1))])
    drainer = Drainer(engine, spool, LabelPolicy(), KnownMRs())  # never told of MR 7
    drainer.all()
    assert spool.ignored_count() == 1
    recorded_elsewhere(engine, mr_event("open", iid=7), opened_at, **{"idempotency-key": "open-7"})
    assert drainer.ignored.sweep().waiting == 1
    assert drainer.ignored.sweep(now=time.time() + 301).queued == 1
    assert drainer.all().recorded == 1
    assert [row[1] for row in log_rows(engine)] == ["idem:open-7", "idem:merge-7"]
    assert not spool.has_ignored()


def test_spool_drain_by_hand_judges_every_kept_file_past_one_sweeps_reads(
    engine, database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replica being retired: its operator drains its spool by hand once, and every
    kept file whose MR is known must be judged, however many a sweep reads."""
    monkeypatch.setattr(ignoredspool, "READS_PER_SWEEP", 1)
    spool = Spool.open(tmp_path / "spool")
    opened_at = utcnow()
    later = [opened_at + timedelta(seconds=i) for i in (1, 2, 3)]
    updates = [mr_event("update", iid=7, labels=["backend"], title=f"v{i}") for i in (1, 2, 3)]
    spool.write(
        [delivery(u, f"u-{i}", t) for i, (u, t) in enumerate(zip(updates, later, strict=True))]
    )
    Drainer(engine, spool, LabelPolicy()).all()
    assert spool.ignored_count() == 3
    recorded_elsewhere(engine, mr_event("open", iid=7), opened_at, **{"idempotency-key": "open-7"})
    env = {
        "SECLEDGER_DATABASE_URL": database_url,
        "SECLEDGER_SPOOL_DIR": str(tmp_path / "spool"),
        "SECLEDGER_DATA_DIR": str(tmp_path / "data"),
    }
    drained = CliRunner().invoke(main, ["spool", "drain"], env=env)
    assert drained.exit_code == 0, drained.output
    assert [r[1] for r in log_rows(engine)] == ["idem:open-7", "idem:u-0", "idem:u-1", "idem:u-2"]
    assert spool.ignored_count() == 0


def test_a_sweep_that_fails_leaves_the_writer_running(
    engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A spool error in the sweep escaped the writer's loop: the thread died, and every
    later delivery waited for an answer that never came."""
    monkeypatch.setattr(recorder_module, "log", structlog.get_logger("secledger.recorder"))
    spool = Spool.open(tmp_path / "spool")

    def unreadable() -> bool:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(spool, "has_ignored", unreadable)
    writer = Recorder(engine, drainer=Drainer(engine, spool, LabelPolicy()))
    with capture_logs() as logged:
        writer._sweep_step()
    assert [line["event"] for line in logged] == ["spool_ignored_sweep_failed"]
    assert logged[0]["error"] == "PermissionError"
    assert writer._next_sweep > time.monotonic() + recorder_module.SWEEP_SECONDS


def test_serve_records_a_kept_ignored_file_once_its_mr_is_known_without_a_restart(
    engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Held in memory only up to 32 MiB (and not at all before the first request), a
    delivery a drain left out must still be recorded when its MR becomes known: its file
    in ignored/ is what keeps it."""
    monkeypatch.setattr(recorder_module, "SWEEP_SECONDS", 0.05)
    monkeypatch.setattr(recorder_module, "RESCAN_SECONDS", 0.05)
    spool = Spool.open(tmp_path / "spool")
    opened_at = utcnow()
    merged = mr_event("merge", iid=7, labels=["backend"], updated_at="2025-08-06 09:00:00 UTC")
    spool.write([delivery(merged, "merge-7", opened_at + timedelta(seconds=1))])
    writer = Recorder(engine, drainer=Drainer(engine, spool, LabelPolicy()), retry_seconds=0.05)
    writer.start()
    try:
        wait_for(lambda: spool.ignored_count() == 1)
        assert log_rows(engine) == []
        opened = mr_event("open", iid=7)
        recorded_elsewhere(engine, opened, opened_at, **{"idempotency-key": "open-7"})
        wait_for(lambda: len(log_rows(engine)) == 2)
    finally:
        writer.close()
    assert [row[1] for row in log_rows(engine)] == ["idem:open-7", "idem:merge-7"]
    assert spool.ignored_count() == 0


def test_a_stop_says_when_ignored_files_wait_for_the_next_start(
    engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The spool drained a minute before the stop, its ignored files wait in ignored/:
    only a start within the hold judges them again, which the stop must say."""
    monkeypatch.setattr(recorder_module, "log", structlog.get_logger("secledger.recorder"))
    spool = Spool.open(tmp_path / "spool")
    spool.keep_ignored(spool.write([delivery(mr_event("merge", iid=3, labels=[]), "k-3")]))
    writer = Recorder(engine, drainer=Drainer(engine, spool, LabelPolicy()))
    writer.start()
    with capture_logs() as logged:
        writer.close()
    [kept] = [line for line in logged if line["event"] == "spool_ignored_kept_at_stop"]
    assert kept["count"] == 1


def test_new_delivery_does_not_overtake_a_spooled_one(
    settings: Settings, engine, server_url: str, database_url: str
) -> None:
    slow = settings.model_copy(update={"spool_retry_seconds": 300})
    app = create_app(slow, db.Database(database_url, embedded=False))
    with TestClient(app) as client:
        with database_down(server_url, database_url):
            assert post(client, mr_event("open"), Idempotency_Key="older").status_code == 202
        # The database is back but the writer has not drained yet: the newer one queues.
        newer = post(client, mr_event("approved", actor="bob"), Idempotency_Key="newer")
        assert newer.json()["status"] == "spooled"
        assert log_rows(engine) == []
        result = Drainer(engine, Spool.open(slow.spool_path), LabelPolicy()).all()
    assert result.recorded == 2
    assert [r[1] for r in log_rows(engine)] == ["idem:older", "idem:newer"]


def test_unwritable_spool_answers_503_never_2xx(
    receiver: TestClient, spool_settings: Settings, server_url: str, database_url: str, engine
) -> None:
    directory = spool_settings.spool_path
    assert receiver.get("/readyz").json()["spool"]["writable"] is True
    shutil.rmtree(directory)
    directory.write_text("a file where the spool directory should be\n")
    # Seen before an outage needs it: /readyz is not ready while the database is up.
    ready = receiver.get("/readyz")
    assert (ready.status_code, ready.json()["spool"]["writable"]) == (503, False)
    assert ready.json()["database"] is True
    with database_down(server_url, database_url):
        response = post(receiver, mr_event("open"))
    assert response.status_code == 503
    assert response.json()["status"] == "unavailable"
    assert log_rows(engine) == []


def test_an_outage_the_spool_cannot_take_logs_twenty_lines_of_a_kind_then_a_count(
    spool_settings: Settings, server_url: str, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every delivery of such an outage fails: a line for each (two, with the writer's)
    flooded the log at the worst time, 9,000 lines in 5 s under load."""
    # Loggers not cached by an earlier test's configuration, so capture_logs sees them.
    monkeypatch.setattr(webhook_module, "log", structlog.get_logger("secledger.webhook"))
    monkeypatch.setattr(recorder_module, "log", structlog.get_logger("secledger.recorder"))
    directory = spool_settings.spool_path
    app = create_app(spool_settings, db.Database(database_url, embedded=False))
    with capture_logs() as logs, TestClient(app) as client:
        shutil.rmtree(directory)
        directory.write_text("a file where the spool directory should be\n")
        with database_down(server_url, database_url):
            answers = [
                post(client, mr_event("update", updated_at=f"2025-08-05 22:{i:02d}:00 UTC"))
                for i in range(30)
            ]
    assert {answer.status_code for answer in answers} == {503}
    events = [entry["event"] for entry in logs]
    assert events.count("delivery_unavailable") == 20
    assert events.count("spool_write_failed") == 20
    counted = {
        entry["event"]: entry["count"]
        for entry in logs
        if entry["event"] in {"deliveries_rejected_suppressed", "spool_write_failed_suppressed"}
    }
    assert counted == {"deliveries_rejected_suppressed": 10, "spool_write_failed_suppressed": 10}


def test_a_write_that_fails_part_way_keeps_none_of_its_deliveries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every delivery of a failed write is answered 503, which must mean "not kept": the
    files written before the failure are taken back, not drained later behind a refusal."""
    spool = Spool.open(tmp_path / "spool")
    spool.write([delivery(mr_event("open"), "before")])
    real = spool_module._write_synced
    calls: list[Path] = []

    def disk_fills(path: Path, data: bytes) -> None:
        calls.append(path)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(spool_module, "_write_synced", disk_fills)
    with pytest.raises(SpoolUnavailable, match="No space left"):
        spool.write([delivery(mr_event("update"), f"k-{i}") for i in range(5)])
    assert [spool.read(p).dedup_key for p in spool.entries()] == ["idem:before"]
    assert spool.depth == 1
    assert not list((tmp_path / "spool").glob(TEMP_PREFIX + "*"))


def test_a_file_that_cannot_be_taken_back_does_not_keep_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool.open(tmp_path / "spool")
    paths = spool.write([delivery(mr_event("update"), f"k-{i}") for i in range(3)])
    real = Path.unlink

    def stuck(self: Path, missing_ok: bool = False) -> None:
        if self == paths[0]:
            raise PermissionError("held")
        real(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", stuck)
    spool.discard(paths)
    assert spool.entries() == [paths[0]]
    assert spool.depth == 1


def test_a_refused_delivery_that_cannot_be_set_aside_is_answered_503_and_blocks_nothing(
    receiver: TestClient, engine, spool_settings: Settings
) -> None:
    """Kept in the spool instead of failed/, the drain would meet it again at every retry,
    and every later delivery would be spooled behind it for good."""
    refuse_iid_7(engine)
    # A file where the failed/ folder would be made: setting aside fails (also as root).
    (spool_settings.spool_path / "failed").write_text("in the way\n")
    refused = post(receiver, mr_event("open", iid=7), Idempotency_Key="r-7")
    assert refused.status_code == 503
    assert spool_depth(receiver) == 0
    accepted = post(receiver, mr_event("open", iid=8), Idempotency_Key="r-8")
    assert accepted.json()["status"] == "recorded"
    assert [row[1] for row in log_rows(engine)] == ["idem:r-8"]


def test_spool_commands_show_and_drain(tmp_path: Path, database_url: str, engine) -> None:
    spool = Spool.open(tmp_path / "spool")
    spool.write([delivery(mr_event("open"), "c-1"), delivery(mr_event("close"), "c-2")])
    env = {
        "SECLEDGER_DATABASE_URL": database_url,
        "SECLEDGER_SPOOL_DIR": str(tmp_path / "spool"),
        "SECLEDGER_DATA_DIR": str(tmp_path / "data"),
    }
    runner = CliRunner()
    shown = runner.invoke(main, ["spool", "status", "--format", "json"], env=env)
    assert shown.exit_code == 0, shown.output
    status = orjson.loads(shown.output)
    assert status["depth"] == 2
    assert status["oldest"] == "2025-08-05T21:48:25.123456Z"
    assert status["bytes"] == sum(p.stat().st_size for p in spool.entries())
    text_before = runner.invoke(main, ["spool", "status"], env=env)
    assert "oldest:    2025-08-05T21:48:25.123456Z" in text_before.output  # one spelling
    drained = runner.invoke(main, ["spool", "drain"], env=env)
    assert drained.exit_code == 0, drained.output
    assert "recorded 2" in drained.output
    assert "remaining 0" in drained.output
    assert [r[1] for r in log_rows(engine)] == ["idem:c-1", "idem:c-2"]
    text_status = runner.invoke(main, ["spool", "status"], env=env)
    assert "depth:     0" in text_status.output


def test_a_login_that_may_not_write_leaves_the_spool_as_it_was(
    tmp_path: Path, database_url: str, engine: Engine
) -> None:
    """As secledger_readonly, the drain put every delivery in failed/ ("refused by the
    database: permission denied"), said "set aside 2" and exited 0: once the login was
    fixed, they and every later delivery of their MRs waited there for an operator."""
    spool = Spool.open(tmp_path / "spool")
    spool.write([delivery(mr_event("open"), "r-1"), delivery(mr_event("close"), "r-2")])
    env = {
        "SECLEDGER_DATABASE_URL": readonly_url(database_url),
        "SECLEDGER_SPOOL_DIR": str(tmp_path / "spool"),
        "SECLEDGER_DATA_DIR": str(tmp_path / "data"),
    }
    drained = CliRunner().invoke(main, ["spool", "drain"], env=env)
    assert drained.exit_code == 1
    assert "this database login may not record deliveries (no INSERT on delivery_log," in (
        drained.output
    )
    assert not (tmp_path / "spool" / "failed").exists()
    assert len(Spool.open(tmp_path / "spool").entries()) == 2
    env["SECLEDGER_DATABASE_URL"] = database_url
    again = CliRunner().invoke(main, ["spool", "drain"], env=env)
    assert again.exit_code == 0, again.output
    assert [r[1] for r in log_rows(engine)] == ["idem:r-1", "idem:r-2"]


def test_a_drain_that_cannot_take_its_lock_is_one_line(tmp_path: Path, database_url: str) -> None:
    """A spool directory the drain cannot write in (read-only, or here a lock path that
    is a directory) gave a traceback; nothing is recorded then, so say so plainly."""
    spool = Spool.open(tmp_path / "spool")
    spool.write([delivery(mr_event("open"), "l-1")])
    (tmp_path / "spool" / spool_module.LOCK_FILE).mkdir()
    env = {
        "SECLEDGER_DATABASE_URL": database_url,
        "SECLEDGER_SPOOL_DIR": str(tmp_path / "spool"),
        "SECLEDGER_DATA_DIR": str(tmp_path / "data"),
    }
    drained = CliRunner().invoke(main, ["spool", "drain"], env=env)
    assert drained.exit_code == 1
    assert f"cannot drain {tmp_path / 'spool'}: Is a directory" in drained.output


def test_a_delivery_the_database_refuses_is_kept_in_failed_and_answered_202(
    receiver: TestClient, engine, spool_settings
) -> None:
    """GitLab counts a 5xx against the hook; a refused delivery is kept, not lost."""
    refuse_iid_7(engine)
    with capture_logs() as logs:
        refused = post(receiver, mr_event("open", iid=7), Idempotency_Key="r-7")
    accepted = post(receiver, mr_event("open", iid=8), Idempotency_Key="r-8")
    # The line the runbook says to alert on, and the database's words for the cause.
    [aside] = [e for e in logs if e["event"] == "spool_file_set_aside"]
    assert aside["log_level"] == "error"
    assert "refused for the test" in aside["reason"]
    assert refused.status_code == 202
    assert refused.json()["status"] == "spooled"
    assert "failed/" in refused.json()["reason"]
    assert accepted.json()["status"] == "recorded"
    kept = list((spool_settings.spool_path / "failed").glob("*.dlv"))
    assert len(kept) == 1
    assert decode(kept[0].read_bytes()).dedup_key == "idem:r-7"
    assert aside["file"] == str(kept[0])
    why = Path(f"{kept[0]}.reason").read_text()
    assert why.startswith("the database refused it: ") and "refused for the test" in why
    assert [row[1] for row in log_rows(engine)] == ["idem:r-8"]
    assert receiver.get("/readyz").json()["spool"]["failed"] == 1


def test_a_refused_delivery_moved_to_failed_is_kept_and_held_though_the_count_fails(
    receiver: TestClient, engine, spool_settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The move into failed/ went through, then listing the spool to count it failed (a
    stale mount): the error was answered 503 as an internal one, and the MR was not held,
    so its later deliveries were recorded ahead of the one kept."""
    refuse_iid_7(engine)

    def unlisted(self: Spool) -> int:
        raise SpoolUnavailable("cannot list the spool: Stale file handle")

    monkeypatch.setattr(Spool, "recount", unlisted)
    refused = post(receiver, mr_event("open", iid=7), Idempotency_Key="r-7")
    monkeypatch.undo()
    assert (refused.status_code, refused.json()["status"]) == (202, "spooled"), refused.text
    assert len(list((spool_settings.spool_path / "failed").glob("*.dlv"))) == 1
    with engine.begin() as conn:  # the cause is fixed; the kept file waits for an operator
        conn.execute(text("DROP TRIGGER refuse_iid_7 ON review_events"))
    later = post(receiver, mr_event("update", iid=7), Idempotency_Key="r-7b")
    assert later.json()["status"] == "spooled"  # behind the kept one, not recorded ahead
    assert [row[1] for row in log_rows(engine)] == []


def test_later_spooled_deliveries_of_a_refused_mr_wait_behind_it_in_failed(
    tmp_path: Path, engine
) -> None:
    """The first delivery of MR !7 is refused; its merge, no longer labelled, found the MR
    unknown and was ignored and deleted: lost once the first was fixed and drained."""
    refuse_iid_7(engine)
    spool = Spool.open(tmp_path / "spool")
    spool.write(
        [
            delivery(mr_event("open", iid=7), "f-open"),
            delivery(mr_event("open", iid=8), "f-other"),
            delivery(mr_event("merge", iid=7, labels=[]), "f-merge"),
        ]
    )
    result = Drainer(engine, spool, LabelPolicy()).all()
    assert (result.recorded, result.ignored, result.set_aside) == (1, 0, 2)
    failed = sorted((spool.directory / "failed").glob("*.dlv"))
    assert [decode(p.read_bytes()).dedup_key for p in failed] == ["idem:f-open", "idem:f-merge"]
    # Later passes hold new ones back too, while the first waits in failed/.
    spool.write([delivery(mr_event("close", iid=7, labels=[]), "f-close")])
    assert Drainer(engine, spool, LabelPolicy()).all().set_aside == 1
    # Fixed, moved back in name order, and drained: all recorded, none ignored.
    with engine.begin() as conn:
        conn.execute(text("DROP TRIGGER refuse_iid_7 ON review_events"))
    for path in sorted((spool.directory / "failed").glob("*.dlv")):
        path.rename(spool.directory / path.name)
    again = Drainer(engine, spool, LabelPolicy()).all()
    assert (again.recorded, again.ignored, again.remaining) == (3, 0, 0)


def test_a_file_moved_into_the_spool_from_outside_is_drained_without_a_delivery(
    receiver: TestClient, engine, spool_settings: Settings, monkeypatch
) -> None:
    """docs/operations.md: move a file back from failed/ into the spool directory.
    serve counted only what it wrote itself: the file waited for the next delivery,
    which went ahead of it."""
    monkeypatch.setattr(recorder_module, "RESCAN_SECONDS", 0.1)
    elsewhere = Spool.open(spool_settings.spool_path.parent / "elsewhere")
    [written] = elsewhere.write([delivery(mr_event("open", iid=9), "moved-in")])
    post(receiver, mr_event("open", iid=1), Idempotency_Key="wakes-the-writer")
    written.rename(spool_settings.spool_path / written.name)
    wait_for(lambda: any(row[1] == "idem:moved-in" for row in log_rows(engine)))
    assert not list(spool_settings.spool_path.glob("*.dlv"))


def test_refresh_counts_a_file_moved_in_from_outside(tmp_path: Path) -> None:
    """What the writer asks before a batch while the spool counts empty (and what the
    depth gauge then shows): the directory's mtime changed, so it is listed again."""
    spool = Spool.open(tmp_path / "spool")
    assert spool.refresh() == 0
    elsewhere = Spool.open(tmp_path / "elsewhere")
    [written] = elsewhere.write([delivery(mr_event("open", iid=9), "moved-in")])
    written.rename(spool.directory / written.name)
    assert spool.depth == 0  # it wrote nothing itself
    assert spool.refresh() == 1


def test_later_live_deliveries_of_a_refused_mr_wait_behind_it_in_failed(
    receiver: TestClient, engine, spool_settings
) -> None:
    """The receiver's side of the same: the unlabelled merge of an MR whose first delivery
    the database refused was answered `ignored`, the MR being unknown, and lost."""
    refuse_iid_7(engine)
    assert post(receiver, mr_event("open", iid=7), Idempotency_Key="l-open").status_code == 202
    merge = post(receiver, mr_event("merge", iid=7, labels=[]), Idempotency_Key="l-merge")
    assert (merge.status_code, merge.json()["status"]) == (202, "spooled")
    other = post(receiver, mr_event("open", iid=8), Idempotency_Key="l-other")
    assert other.json()["status"] == "recorded"  # other MRs go on as usual
    failed = spool_settings.spool_path / "failed"
    wait_for(lambda: len(list(failed.glob("*.dlv"))) == 2)
    with engine.begin() as conn:
        conn.execute(text("DROP TRIGGER refuse_iid_7 ON review_events"))
    for path in sorted(failed.glob("*.dlv")):
        path.rename(spool_settings.spool_path / path.name)
    result = Drainer(engine, Spool.open(spool_settings.spool_path), LabelPolicy()).all()
    assert (result.recorded, result.ignored) == (2, 0)
    with engine.connect() as conn:
        state = conn.execute(
            text("SELECT state FROM security_review_ledger WHERE mr_iid = 7")
        ).scalar_one()
    assert state == "merged"


def test_a_read_only_database_is_waited_for_not_taken_for_a_refusal(
    receiver: TestClient, engine, spool_settings
) -> None:
    """SQLSTATE 25006 (a standby reached after a failover, a database set read-only when
    nearly full) comes as psycopg's InternalError: every delivery went to failed/, and
    each MR's later ones were held there too once the database could write again."""
    refuse_iid_7(engine, errcode="25006")
    waiting = post(receiver, mr_event("open", iid=7), Idempotency_Key="ro-7")
    assert (waiting.status_code, waiting.json()["status"]) == (202, "spooled")
    assert "failed/" not in waiting.json()["reason"]
    later = post(receiver, mr_event("close", iid=7), Idempotency_Key="ro-7b")
    assert later.status_code == 202
    assert not (spool_settings.spool_path / "failed").exists() or not list(
        (spool_settings.spool_path / "failed").iterdir()
    )
    with engine.begin() as conn:
        conn.execute(text("DROP TRIGGER refuse_iid_7 ON review_events"))
    wait_for(lambda: spool_depth(receiver) == 0)
    assert [row[1] for row in log_rows(engine)] == ["idem:ro-7", "idem:ro-7b"]


@pytest.mark.parametrize("errcode", ["54000", "42501"])
def test_a_write_past_a_program_limit_is_refused_not_taken_for_an_outage(
    receiver: TestClient, engine, spool_settings, tmp_path: Path, errcode: str
) -> None:
    """SQLSTATE class 54 (an index row too large, say) fails the same way every time: it
    was spooled as if the database were down, and the drain retried it for ever with
    every later delivery queued behind it. So does a trigger or a row security policy
    refusing one delivery with insufficient_privilege (42501): the login is checked at
    start, and that SQLSTATE is no sign of it."""
    refuse_iid_7(engine, errcode=errcode)
    refused = post(receiver, mr_event("open", iid=7), Idempotency_Key="p-7")
    accepted = post(receiver, mr_event("open", iid=8), Idempotency_Key="p-8")
    assert (refused.status_code, refused.json()["status"]) == (202, "spooled")
    assert "failed/" in refused.json()["reason"]
    assert accepted.json()["status"] == "recorded"
    assert [row[1] for row in log_rows(engine)] == ["idem:p-8"]
    # The same refusal met by a drain: set aside, and the rest recorded.
    spool = Spool.open(tmp_path / "spool")
    spool.write([delivery(mr_event("open", iid=n), f"d-{n}") for n in (6, 7, 9)])
    result = Drainer(engine, spool, LabelPolicy()).all()
    assert (result.recorded, result.set_aside, result.remaining) == (2, 1, 0)
    assert not result.unavailable


def test_a_delivery_the_database_does_not_commit_in_time_is_spooled_and_recorded_once(
    settings: Settings, engine, database_url: str
) -> None:
    """Another session holds the chain lock (a long `rebuild`, a stuck tool): the database
    answers but commits nothing. GitLab would give up after 10 s and count a failure; the
    receiver spools the delivery after `spool_after_seconds` and answers 202. When the lock
    is released, the writer's commit and the drain record it once between them."""
    quick = settings.model_copy(update={"spool_after_seconds": 0.5, "spool_retry_seconds": 0.05})
    app = create_app(quick, db.Database(database_url, embedded=False))
    with TestClient(app) as client:
        first = post(client, mr_event("open"), Idempotency_Key="first")
        assert first.status_code == 200
        answers: list[Any] = []

        def send(key: str, body: dict[str, Any]) -> threading.Thread:
            sender = threading.Thread(
                target=lambda: answers.append(post(client, body, Idempotency_Key=key))
            )
            sender.start()
            return sender

        with psycopg.connect(database_url) as holder, capture_logs() as logs:
            holder.execute("SELECT pg_advisory_xact_lock(%s)", (CHAIN_LOCK_KEY,))
            # Two in flight: the second is taken (its reads carried) while the first waits.
            senders = [send("late", mr_event("approved", actor="bob"))]
            time.sleep(0.2)
            senders.append(send("later", mr_event("update", updated_at="2025-08-06 09:00:00 UTC")))
            for sender in senders:
                sender.join(timeout=30)
            answered_while_held = not any(sender.is_alive() for sender in senders)
            ready = client.get("/readyz")
            holder.rollback()  # releases the lock

            def lines() -> list[dict[str, Any]]:
                # The first delivery's line follows its answer: it may come in here too.
                seq = first.json()["seq"]
                return [e for e in logs if e["event"] == "delivery" and e["seq"] != seq]

            wait_for(lambda: len(lines()) == 2)
        for sender in senders:
            sender.join()
        # The writer's own lines, once its write ends, say the sender was answered before.
        assert [e.get("answered") for e in lines()] == ["spooled", "spooled"], lines()
        assert answered_while_held
        assert [(a.status_code, a.json()["status"]) for a in answers] == [(202, "spooled")] * 2
        assert ready.status_code == 503
        assert ready.json()["writer"]["stalled"] is True
        # The writer's carried reads held the chain lock the drain waits for: released.
        wait_for(lambda: spool_depth(client) == 0)
        assert sorted(r[1] for r in log_rows(engine)) == ["idem:first", "idem:late", "idem:later"]
        assert client.get("/readyz").json()["writer"] == {
            "waiting_seconds": 0.0,
            "stalled": False,
            "alive": True,
        }


def test_a_delivery_behind_its_mrs_first_uncommitted_one_is_kept_not_ignored(
    settings: Settings, engine, database_url: str
) -> None:
    """The MR's first security delivery waits in the writer (the chain lock held): its
    merge, with the label already removed, was answered ``ignored`` and only held in
    memory, so a stop then lost an acknowledged merge. It now waits behind the first."""
    quick = settings.model_copy(update={"spool_after_seconds": 0.5, "spool_retry_seconds": 0.05})
    app = create_app(quick, db.Database(database_url, embedded=False))
    with TestClient(app) as client:
        answers: dict[str, Any] = {}

        def send(key: str, body: dict[str, Any]) -> threading.Thread:
            def run() -> None:
                answers[key] = post(client, body, Idempotency_Key=key)

            sender = threading.Thread(target=run)
            sender.start()
            return sender

        with psycopg.connect(database_url) as holder:
            holder.execute("SELECT pg_advisory_xact_lock(%s)", (CHAIN_LOCK_KEY,))
            first = send("first", mr_event("open", iid=31))
            time.sleep(0.2)
            merge = send("merge", mr_event("merge", iid=31, labels=[]))
            merge.join(timeout=30)
            first.join(timeout=30)
            holder.rollback()
        assert answers["merge"].json()["status"] != "ignored", answers["merge"].json()
        assert answers["merge"].status_code in (200, 202)
        wait_for(lambda: spool_depth(client) == 0)
        assert sorted(r[1] for r in log_rows(engine)) == ["idem:first", "idem:merge"]
    with engine.connect() as conn:
        state = conn.execute(text("SELECT state FROM security_review_ledger")).scalar_one()
    assert state == "merged"


def test_the_spool_timer_counts_from_the_requests_arrival(
    settings: Settings, engine, database_url: str
) -> None:
    """GitLab's 10 s include the wait for a place: a delivery admitted late was given the
    whole spool-after time again from there, and answered past GitLab's timeout."""
    quick = settings.model_copy(
        update={
            "spool_after_seconds": 3.0,
            "spool_retry_seconds": 0.05,
            "max_concurrent_deliveries": 1,
        }
    )
    app = create_app(quick, db.Database(database_url, embedded=False))
    with TestClient(app) as client:
        assert post(client, mr_event("open"), Idempotency_Key="first").status_code == 200
        took: dict[str, float] = {}

        def send(key: str, body: dict[str, Any]) -> threading.Thread:
            def run() -> None:
                started = time.monotonic()
                assert post(client, body, Idempotency_Key=key).status_code == 202
                took[key] = time.monotonic() - started

            sender = threading.Thread(target=run)
            sender.start()
            return sender

        with psycopg.connect(database_url) as holder:
            holder.execute("SELECT pg_advisory_xact_lock(%s)", (CHAIN_LOCK_KEY,))
            senders = [send("a", mr_event("approved", actor="bob"))]
            time.sleep(1.0)  # b waits for a's place until a is spooled, 2 s from now
            senders.append(send("b", mr_event("update", updated_at="2025-08-06 09:00:00 UTC")))
            for sender in senders:
                sender.join(timeout=30)
            holder.rollback()
        # b: 2 s for a place, then the 1 s left of its 3, as long as a took (not 3 s more:
        # 5 s). Compared with a, so that a slow host delays both alike.
        assert 2.5 < took["b"] < took["a"] + 1.0, took
        wait_for(lambda: spool_depth(client) == 0)
        assert sorted(r[1] for r in log_rows(engine)) == ["idem:a", "idem:b", "idem:first"]


def test_a_stop_drains_the_spool_while_the_database_answers(tmp_path: Path, engine) -> None:
    """A replica's spool is on its own disk: one pass of 128 at the stop left the rest of
    300 behind, to go with the replica when it is scaled down or replaced."""
    spool = Spool.open(tmp_path / "spool")
    spool.write([delivery(mr_event("open", iid=n), f"s-{n}") for n in range(1, 301)])
    writer = Recorder(engine, drainer=Drainer(engine, spool, LabelPolicy()))
    writer.start()
    writer.close()
    assert spool.recount() == 0
    assert len(log_rows(engine)) == 300


def test_a_stop_says_what_it_left_in_the_spool(
    tmp_path: Path, engine, server_url: str, database_url: str, monkeypatch
) -> None:
    # A logger of its own: one cached by an earlier test would bypass capture_logs.
    monkeypatch.setattr(recorder_module, "log", structlog.get_logger("secledger.recorder"))
    spool = Spool.open(tmp_path / "spool")
    spool.write([delivery(mr_event("open"), "left")])
    writer = Recorder(engine, drainer=Drainer(engine, spool, LabelPolicy()))
    with database_down(server_url, database_url), capture_logs() as logged:
        writer.start()
        writer.close()
    assert spool.recount() == 1
    assert [e["spool_depth"] for e in logged if e["event"] == "spool_left_at_stop"] == [1]


def test_a_write_during_a_recount_is_not_lost_from_the_depth(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The receiver spools a late delivery from another thread while the writer recounts:
    a count taken before that write and stored after it left its file undrained."""
    spool = Spool.open(tmp_path / "spool")
    listing = spool.entries
    writers: list[threading.Thread] = []

    def entries_then_a_write() -> list[Path]:
        found = listing()
        if not writers:  # the first listing only
            late = delivery(mr_event("open"), "late")
            writers.append(threading.Thread(target=spool.write, args=([late],)))
            writers[0].start()
            writers[0].join(timeout=1)  # blocks on the spool's lock while it is held
        return found

    monkeypatch.setattr(spool, "entries", entries_then_a_write)
    spool.recount()
    writers[0].join()
    assert spool.depth == len(listing()) == 1


def test_readyz_answers_within_its_deadline_while_the_database_does_not(
    receiver: TestClient, database_url: str, monkeypatch
) -> None:
    """A database that takes connections and never answers held each probe until TCP gave
    up, and each in a thread of the pool /healthz shared: a balancer saw neither. Here a
    lock keeps the migrations query waiting: /readyz says 503 within its deadline, one
    query at a time, and /healthz answers meanwhile."""
    monkeypatch.setattr(web, "READY_TIMEOUT_SECONDS", 0.3)
    queries: list[float] = []
    query = web._query_ready

    def counted(engine: Any) -> dict[str, Any]:
        queries.append(time.monotonic())
        return query(engine)

    monkeypatch.setattr(web, "_query_ready", counted)
    assert receiver.get("/readyz").json()["ready"] is True
    with psycopg.connect(db.conninfo(database_url)) as holder:
        holder.execute("LOCK TABLE alembic_version IN ACCESS EXCLUSIVE MODE")
        started = time.monotonic()
        answers = [receiver.get("/readyz") for _ in range(3)]
        assert time.monotonic() - started < 3
        assert [a.status_code for a in answers] == [503, 503, 503]
        assert {a.json()["error"] for a in answers} == {"timeout"}
        assert receiver.get("/healthz").json() == {"status": "ok"}
        assert len(queries) == 2  # the first probe's, then one for all three waiting
        holder.rollback()
    wait_for(lambda: receiver.get("/readyz").status_code == 200)


def test_a_spool_on_a_full_disk_is_not_writable(tmp_path: Path, monkeypatch) -> None:
    """Permission alone said writable on a full disk, where every spooled delivery then
    got 503: the next outage would lose them."""
    spool = Spool(tmp_path)
    assert spool.status().writable is True
    full = shutil.disk_usage(tmp_path)._replace(free=spool_module.MIN_FREE_BYTES - 1)
    monkeypatch.setattr(spool_module.shutil, "disk_usage", lambda _path: full)
    assert spool.status().writable is False


def test_a_copy_spooled_as_the_commit_lands_is_drained_on_a_quiet_receiver(
    tmp_path: Path, engine
) -> None:
    """The spool timer fired an instant before the writer's commit answered: the copy was
    written after the writer had gone to sleep with nothing to wait for, and sat in the
    spool (a depth alert, every delivery of its MR past the ignore fast path) until the
    next delivery woke it. The spool write now wakes the writer, which drains the copy
    (a duplicate by then)."""
    spool = Spool.open(tmp_path / "spool")
    drainer = Drainer(engine, spool, LabelPolicy())
    recorder = Recorder(engine, drainer=drainer, spool_after=5, retry_seconds=0.05)
    recorder.start()
    late = delivery(mr_event("open"), "as-the-commit-lands")

    async def scenario() -> str:
        outcome = await recorder.submit(late)
        answered: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        answered.set_result(outcome)
        await recorder._spool_late(late, answered, time.monotonic())  # the timer, losing the race
        return outcome.status

    try:
        assert asyncio.run(scenario()) == "recorded"
        wait_for(lambda: spool.depth == 0, seconds=5)
        assert [r[1] for r in log_rows(engine)] == ["idem:as-the-commit-lands"]
    finally:
        recorder.close()


def test_a_probe_left_pending_by_an_earlier_event_loop_is_not_awaited(
    spool_settings: Settings, database_url: str, monkeypatch
) -> None:
    """A probe still waiting when its event loop closed (one app served by one test
    client, then another) never completes: awaiting it from the new loop raised."""
    monkeypatch.setattr(web, "READY_TIMEOUT_SECONDS", 0.3)
    app = create_app(spool_settings, db.Database(database_url, embedded=False))
    with psycopg.connect(db.conninfo(database_url)) as holder:
        with TestClient(app) as first:
            holder.execute("LOCK TABLE alembic_version IN ACCESS EXCLUSIVE MODE")
            assert first.get("/readyz").json()["error"] == "timeout"
        holder.rollback()
    with TestClient(app) as second:
        wait_for(lambda: second.get("/readyz").status_code == 200, seconds=10)


def test_spool_status_reports_a_directory_it_cannot_use_and_creates_none(tmp_path: Path) -> None:
    missing = tmp_path / "absent"
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    runner = CliRunner()
    # Under a file, as under a directory this user may not enter, the path cannot be
    # reached: Path.exists raised there, a traceback instead of a report.
    cases = (
        (missing, "does not exist"),
        (a_file, "is not a directory"),
        (a_file / "spool", "cannot be reached"),
    )
    for directory, problem in cases:
        env = {"SECLEDGER_SPOOL_DIR": str(directory), "SECLEDGER_DATA_DIR": str(tmp_path)}
        shown = runner.invoke(main, ["spool", "status", "--format", "json"], env=env)
        assert shown.exit_code == 0, shown.output
        status = orjson.loads(shown.output)
        assert (status["writable"], status["depth"]) == (False, 0)
        assert status["problem"].startswith(problem)
        text = runner.invoke(main, ["spool", "status"], env=env)
        assert text.exit_code == 0, text.output
        assert f"problem:   the directory {problem}" in text.output
    assert not missing.exists()


def test_a_spool_that_cannot_be_listed_raises_its_own_error_and_status_reports_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EMFILE or EIO from listing the directory: a bare OSError escaped every guard on
    the writer's path (they expect SpoolUnavailable) and ended the writer thread."""
    spool = Spool.open(tmp_path / "spool")

    def refuse(self: Path) -> Iterator[Path]:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    monkeypatch.setattr(Path, "iterdir", refuse)
    with pytest.raises(SpoolUnavailable, match="cannot list the spool"):
        spool.entries()
    with pytest.raises(SpoolUnavailable):
        spool.recount()
    monkeypatch.setattr(spool, "_problem", lambda: None)  # the stat-based checks pass
    status = spool.status()
    assert not status.writable
    assert status.problem == f"cannot be listed: {os.strerror(errno.EMFILE)}"


def test_the_writer_outlives_a_spool_it_cannot_list_and_a_batch_that_fails_unexpectedly(
    spool_settings: Settings, engine: Engine, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure no guard sorts must cost its batch a 503, not the writer thread: once
    that thread was gone, every later delivery waited for the spool timer (or, without
    a spool, for GitLab's timeout), and nothing was recorded until a restart."""
    quick = spool_settings.model_copy(update={"spool_after_seconds": 2.0})
    unlisted = threading.Event()
    real_recount, real_record = Spool.recount, Recorder._record_batch

    def recount(self: Spool) -> int:
        if not unlisted.is_set():
            unlisted.set()
            raise SpoolUnavailable("cannot list the spool: Too many open files")
        return real_recount(self)

    def record_once_failing(self: Recorder, jobs: list[Any]) -> None:
        if any(job.delivery.dedup_key == "idem:boom" for job in jobs):
            raise RuntimeError("a bug")
        real_record(self, jobs)

    monkeypatch.setattr(Spool, "recount", recount)
    monkeypatch.setattr(Recorder, "_record_batch", record_once_failing)
    monkeypatch.setattr(recorder_module, "log", structlog.get_logger("test.writer"))
    app = create_app(quick, db.Database(database_url, embedded=False))
    with capture_logs() as logs, TestClient(app) as client:
        unlisted.wait(timeout=10)
        boom = post(client, mr_event("open"), Idempotency_Key="boom")
        after = post(client, mr_event("approved", actor="bob"), Idempotency_Key="after")
        ready = client.get("/readyz").json()
    assert unlisted.is_set()
    assert boom.status_code == 503, boom.text
    assert "internal error" in boom.json()["message"]
    assert (after.status_code, after.json()["status"]) == (200, "recorded")
    assert ready["writer"]["alive"] is True
    assert [r[1] for r in log_rows(engine)] == ["idem:after"]
    events = [e["event"] for e in logs]
    assert "spool_unreadable" in events and "writer_failed" in events


def test_no_free_pooled_connection_is_an_outage_not_a_refusal(database_url: str) -> None:
    """Every pooled connection busy (the dashboard, the sink and the periodic jobs share
    the pool) past its wait raises SQLAlchemy's TimeoutError, which is no DBAPIError:
    read as the database refusing the delivery, it went to failed/ and held its MR's
    later deliveries there until an operator moved the files back."""
    url = database_url.replace("postgresql://", "postgresql+psycopg://", 1)
    engine = create_engine(url, pool_size=1, max_overflow=0, pool_timeout=0.1)
    try:
        with engine.connect(), pytest.raises(Exception) as caught:
            engine.connect()
        assert is_transient(caught.value), repr(caught.value)
    finally:
        engine.dispose()


def test_a_late_delivery_is_spooled_in_time_while_the_default_executor_is_busy(
    spool_settings: Settings, database_url: str
) -> None:
    """In a stall, the loop's default executor fills with database calls that hang in it
    (the recheck's lookups, the periodic jobs); the late spooling waited behind them and
    GitLab's 10 s ran out. Its writes have threads of their own."""
    quick = spool_settings.model_copy(update={"spool_after_seconds": 0.3})
    app = create_app(quick, db.Database(database_url, embedded=False))
    release = threading.Event()

    async def occupy() -> None:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(max_workers=1))
        loop.run_in_executor(None, release.wait, 30)

    with TestClient(app) as client:
        assert post(client, mr_event("open"), Idempotency_Key="first").status_code == 200
        client.portal.call(occupy)
        answers: list[Any] = []
        try:
            with psycopg.connect(database_url) as holder:
                holder.execute("SELECT pg_advisory_xact_lock(%s)", (CHAIN_LOCK_KEY,))
                sender = threading.Thread(
                    target=lambda: answers.append(
                        post(client, mr_event("approved", actor="bob"), Idempotency_Key="late")
                    )
                )
                sender.start()
                sender.join(timeout=5)
                answered = not sender.is_alive()
                holder.rollback()
        finally:
            release.set()
        sender.join()
        assert answered
        assert (answers[0].status_code, answers[0].json()["status"]) == (202, "spooled")
        wait_for(lambda: spool_depth(client) == 0)


def test_a_drained_duplicate_makes_its_mr_known(engine: Engine, tmp_path: Path) -> None:
    """The late timer spools a delivery the writer then commits: the drain finds the copy
    a duplicate. Its MR was made known only for `recorded`, so until a notification came,
    a later delivery of it without the label (a merge after the label's removal) was
    answered `ignored` and only held in memory."""
    spool = Spool.open(tmp_path / "spool")
    late = delivery(mr_event("open", iid=21), "late")
    spool.write([late])
    assert Drainer(engine, spool, LabelPolicy(), KnownMRs()).all().recorded == 1
    spool.write([late])  # the copy the late timer kept, drained after the commit
    known = KnownMRs()
    result = Drainer(engine, spool, LabelPolicy(), known).all()
    assert (result.recorded, result.duplicates) == (0, 1)
    assert mr_key(late) in known


def test_a_delivery_answered_duplicate_makes_its_mr_known(client: TestClient) -> None:
    """The receiver's side of the same: only `recorded` answers made an MR known."""
    body = mr_event("open", iid=22)
    assert post(client, body, Idempotency_Key="first").json()["status"] == "recorded"
    known = client.app.api.state.runtime.known  # type: ignore[attr-defined]
    known._keys.clear()
    again = post(client, body, Idempotency_Key="first")
    assert again.json()["status"] == "duplicate"
    assert len(known) == 1
