"""Zero loss under faults, with real processes: PostgreSQL crashed, ``serve`` killed with -9.

Each test starts its own PostgreSQL (so it can crash it) and its own ``secledger serve``
(so it can kill it), sends a few hundred deliveries from a thread pool, breaks
something in the middle, restarts it, and checks the log against what the sender was
told: every acknowledged delivery is in ``delivery_log`` exactly once, nothing is there
that was not sent, and the hash chain is intact.
"""

from __future__ import annotations

import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from faultkit import Load, Postgres, Receiver, chain_is_intact, key_for, logged, wait_until
from secledger.times import utcnow

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

N = 240


@pytest.fixture(scope="module")
def postgres_server() -> Iterator[Postgres]:
    """One PostgreSQL for the module (initdb is the slow part), stopped and removed at the end.

    Its data lives outside pytest's temporary root on purpose: every pytest session
    that starts resets that root to mode 0700, and as root the server runs as another
    user, who then could not reach its data directory to restart after a crash.
    """
    parent = Path(tempfile.mkdtemp(prefix="secledger-fault-"))
    server = Postgres(parent / "pg")
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(parent, ignore_errors=True)


@pytest.fixture
def postgres(postgres_server: Postgres, tmp_path: Path) -> Postgres:
    """The module's server, running, with a fresh database for this test."""
    postgres_server.start(database=f"fault_{tmp_path.name}".replace("-", "_")[:60])
    return postgres_server


@pytest.fixture
def receiver(tmp_path: Path, postgres: Postgres) -> Iterator[Receiver]:
    process = Receiver(tmp_path, postgres.url)
    process.start()
    yield process
    process.stop()


def dedup(i: int) -> str:
    return f"idem:{key_for(i)}"


def check_log(postgres: Postgres, load: Load) -> dict[str, dict]:
    """Every acknowledged delivery is logged exactly once; nothing unsent is logged."""
    rows = logged(postgres.url)
    counts = Counter(row["dedup_key"] for row in rows)
    acknowledged = [a.index for a in load.answers.values() if a.acknowledged]
    missing = [i for i in acknowledged if counts[dedup(i)] != 1]
    assert missing == [], f"acknowledged but not logged exactly once: {missing[:10]}"
    assert set(counts) <= {dedup(i) for i in range(N)}
    assert max(counts.values(), default=1) == 1
    assert chain_is_intact(rows)
    return {row["dedup_key"]: row for row in rows}


def check_receipt_times(rows: dict[str, dict], load: Load) -> int:
    """Spooled deliveries keep the receipt time they were answered with; how many."""
    spooled = [a for a in load.answers.values() if a.body and a.body["status"] == "spooled"]
    for answer in spooled:
        told = datetime.fromisoformat(answer.body["received_at"])
        assert rows[dedup(answer.index)]["received_at"] == told
    return len(spooled)


def resend_unacknowledged(receiver: Receiver, load: Load) -> None:
    """What a person does in GitLab for failed deliveries: resend them, same key."""
    lost = sorted(set(range(N)) - {a.index for a in load.answers.values() if a.acknowledged})
    assert lost, "the fault did not cut any delivery off; the test proved nothing"
    resend = Load(receiver.base)
    resend.run(lost, lambda _load: None)
    assert all(a.acknowledged for a in resend.answers.values())
    load.answers.update(resend.answers)


def test_database_crash_under_load_loses_no_acknowledged_delivery(
    postgres: Postgres, receiver: Receiver
) -> None:
    load = Load(receiver.base, hold_from=100)
    restarted: list[datetime] = []

    def crash_and_recover(load: Load) -> None:
        wait_until(lambda: load.count() >= 60, 30, "60 answers before the crash")
        postgres.crash()
        load.released.set()
        wait_until(lambda: load.count("spooled") >= 40, 30, "40 spooled answers")
        restarted.append(utcnow())
        postgres.start()

    load.run(range(N), crash_and_recover)
    wait_until(receiver.drained, 30, f"the spool to drain: {receiver.log_tail()}")
    not_acknowledged = [(a.index, a.status) for a in load.answers.values() if not a.acknowledged]
    assert not_acknowledged == []
    assert {a.body["status"] for a in load.answers.values()} <= {"recorded", "spooled"}
    rows = check_log(postgres, load)
    assert len(rows) == N
    assert check_receipt_times(rows, load) >= 40
    before_restart = [r for r in rows.values() if r["received_at"] < restarted[0]]
    assert len(before_restart) >= 100


def test_kill_9_of_the_receiver_under_load_loses_no_acknowledged_delivery(
    postgres: Postgres, receiver: Receiver
) -> None:
    load = Load(receiver.base, hold_from=120)

    def kill(load: Load) -> None:
        wait_until(lambda: load.count() >= 80, 30, "80 answers before the kill")
        receiver.kill9()
        load.released.set()

    load.run(range(N), kill)
    receiver.start()
    check_log(postgres, load)
    resend_unacknowledged(receiver, load)
    assert len(check_log(postgres, load)) == N


def test_kill_9_of_the_receiver_while_spooling_loses_nothing_spooled(
    tmp_path: Path, postgres: Postgres, receiver: Receiver
) -> None:
    load = Load(receiver.base, hold_from=60)

    def crash_both(load: Load) -> None:
        wait_until(lambda: load.count() >= 40, 30, "40 answers before the crash")
        postgres.crash()
        load.released.set()
        wait_until(lambda: load.count("spooled") >= 40, 30, "40 spooled answers")
        receiver.kill9()

    load.run(range(N), crash_both)
    assert len(list((tmp_path / "data" / "spool").glob("*.dlv"))) >= 40
    postgres.start()
    receiver.start()
    wait_until(receiver.drained, 30, f"the spool to drain: {receiver.log_tail()}")
    rows = check_log(postgres, load)
    assert check_receipt_times(rows, load) >= 40
    resend_unacknowledged(receiver, load)
    assert len(check_log(postgres, load)) == N
