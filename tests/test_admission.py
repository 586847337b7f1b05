"""Admission: a count and a byte budget for deliveries in progress, first come first served."""

from __future__ import annotations

import asyncio

import pytest

from secledger.admission import Admission
from secledger.errors import Saturated

MIB = 1024 * 1024


def test_a_body_larger_than_the_budget_is_admitted_when_alone() -> None:
    async def scenario() -> None:
        gate = Admission(count=8, budget=MIB, wait=0)
        await gate.enter(25 * MIB)
        with pytest.raises(Saturated):
            await gate.enter(10)  # nothing else fits beside it
        gate.leave(25 * MIB)
        await gate.enter(10)

    asyncio.run(scenario())


def test_small_deliveries_share_the_budget_up_to_the_count() -> None:
    async def scenario() -> None:
        gate = Admission(count=3, budget=MIB, wait=0)
        for _ in range(3):
            await gate.enter(10 * 1024)
        with pytest.raises(Saturated, match="3 deliveries"):
            await gate.enter(10 * 1024)

    asyncio.run(scenario())


def test_a_waiting_large_delivery_is_not_overtaken_by_later_small_ones() -> None:
    async def scenario() -> list[str]:
        gate = Admission(count=8, budget=MIB, wait=5)
        order: list[str] = []
        await gate.enter(MIB // 2)

        async def deliver(name: str, size: int) -> None:
            await gate.enter(size)
            order.append(name)

        large = asyncio.create_task(deliver("large", MIB))
        await asyncio.sleep(0)
        small = asyncio.create_task(deliver("small", 10))
        await asyncio.sleep(0)
        assert order == []  # the small one would fit, but the large one came first
        gate.leave(MIB // 2)
        await large
        assert order == ["large"]
        gate.leave(MIB)
        await small
        return order

    assert asyncio.run(scenario()) == ["large", "small"]


def test_a_sender_that_goes_away_while_waiting_gives_nothing_back_it_did_not_take() -> None:
    async def scenario() -> tuple[int, int]:
        gate = Admission(count=1, budget=MIB, wait=5)
        await gate.enter(10)
        waiting = asyncio.create_task(gate.enter(10))
        await asyncio.sleep(0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        gate.leave(10)
        return gate.active, gate.held

    assert asyncio.run(scenario()) == (0, 0)


def test_when_the_first_in_line_gives_up_those_behind_it_who_fit_go_in() -> None:
    """Only a delivery leaving used to admit waiters: a small one behind a large one that
    timed out went on waiting for a slow delivery to end, and could be refused."""

    async def scenario() -> None:
        gate = Admission(count=8, budget=1000, wait=0.2)
        await gate.enter(600)  # a slow delivery in progress
        large = asyncio.create_task(gate.enter(500))
        await asyncio.sleep(0.1)
        # Its own wait far longer than the large one's: a stalled loop cannot time out
        # both in one turn.
        gate.wait = 30
        small = asyncio.create_task(gate.enter(10))
        with pytest.raises(Saturated):
            await large
        await asyncio.sleep(0)  # one turn of the loop: no time for its own wait to end
        assert small.done()
        await small  # admitted, not refused
        assert (gate.active, gate.held) == (2, 610)

    asyncio.run(scenario())


def test_past_its_waiting_cap_a_request_is_refused_at_once() -> None:
    """Requests nothing has proved yet queued without a cap for the unverified pool: each
    waiting one is a request uvicorn holds, and enough of them filled its limit on
    requests in progress, so every request, a token's too, was answered 503 unread."""

    async def scenario() -> float:
        gate = Admission(count=1, budget=MIB, wait=5, max_waiting=2)
        await gate.enter(10)
        waiting = [asyncio.create_task(gate.enter(10)) for _ in range(2)]
        await asyncio.sleep(0)
        started = asyncio.get_running_loop().time()
        with pytest.raises(Saturated, match="2 waiting"):
            await gate.enter(10)
        refused_after = asyncio.get_running_loop().time() - started
        gate.leave(10)  # the first waiter goes in; the other still waits
        await waiting[0]
        waiting[1].cancel()
        return refused_after

    assert asyncio.run(scenario()) < 1.0  # not after the 5 s wait
