"""``FifoSlots``: a first-in-first-out concurrency limit with a bounded waiting line."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from gen_worker.engine.slots import FifoSlots
from gen_worker.errors import BusyError

T = TypeVar("T")


def run(factory: Callable[[], Awaitable[T]]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(factory(), timeout=10)

    return asyncio.run(bounded())


async def settle(rounds: int = 5) -> None:
    """Let every ready task run until nothing more can happen without outside input."""
    for _ in range(rounds):
        await asyncio.sleep(0)


async def queue_up(
    slots: FifoSlots, n: int, granted: list[int], start: int = 0
) -> list[asyncio.Task[None]]:
    """Start ``n`` acquirers in order; each records its number once it holds a slot."""

    async def acquirer(i: int) -> None:
        await slots.acquire()
        granted.append(i)

    tasks = []
    for i in range(start, start + n):
        tasks.append(asyncio.get_running_loop().create_task(acquirer(i)))
        await asyncio.sleep(0)  # the task reaches the line before the next one starts
    return tasks


# -- construction --------------------------------------------------------------------------------


@pytest.mark.parametrize("limit", [0, -1, -100])
def test_limit_below_one_raises(limit: int) -> None:
    with pytest.raises(ValueError, match=rf"^limit must be >= 1, got {limit}$"):
        FifoSlots(limit)


def test_initial_state() -> None:
    slots = FifoSlots(3, max_waiting=5)
    assert (slots.limit, slots.in_use, slots.waiting) == (3, 0, 0)


# -- acquire and release -------------------------------------------------------------------------


def test_acquire_under_the_limit_is_immediate() -> None:
    async def go() -> list[tuple[int, int]]:
        slots = FifoSlots(3)
        states = []
        for _ in range(3):
            await slots.acquire()
            states.append((slots.in_use, slots.waiting))
        return states

    assert run(go) == [(1, 0), (2, 0), (3, 0)]


def test_acquire_under_the_limit_does_not_yield_to_the_loop() -> None:
    async def go() -> list[str]:
        slots = FifoSlots(1)
        order: list[str] = []

        async def other() -> None:
            order.append("other")

        task = asyncio.get_running_loop().create_task(other())
        await slots.acquire()  # a free slot is taken without suspending
        order.append("acquired")
        await task
        return order

    assert run(go) == ["acquired", "other"]


def test_release_without_waiters_frees_a_slot() -> None:
    async def go() -> tuple[int, int]:
        slots = FifoSlots(2)
        await slots.acquire()
        await slots.acquire()
        slots.release()
        first = slots.in_use
        slots.release()
        return first, slots.in_use

    assert run(go) == (1, 0)


def test_waiters_are_served_strictly_in_arrival_order() -> None:
    async def go() -> tuple[list[list[int]], list[int]]:
        slots = FifoSlots(2)
        granted: list[int] = []
        tasks = await queue_up(slots, 8, granted)
        await settle()
        snapshots = [list(granted)]
        assert (slots.in_use, slots.waiting) == (2, 6)
        for _ in range(6):
            slots.release()
            assert slots.in_use == 2  # the slot moved straight to a waiter
            await settle()
            snapshots.append(list(granted))
        assert slots.waiting == 0
        await asyncio.gather(*tasks)
        return snapshots, granted

    snapshots, granted = run(go)
    assert snapshots == [list(range(n)) for n in range(2, 9)]
    assert granted == list(range(8))


def test_a_newcomer_does_not_jump_the_line_when_a_slot_frees() -> None:
    async def go() -> list[int]:
        slots = FifoSlots(1)
        granted: list[int] = []
        await slots.acquire()
        await queue_up(slots, 1, granted, start=1)
        slots.release()  # handed to waiter 1, which has not run yet
        # Waiter 1 has not run; a newcomer must not take the slot meanwhile.
        newcomer = await queue_up(slots, 1, granted, start=2)
        assert (slots.in_use, slots.waiting) == (1, 1)
        await settle()
        assert granted == [1]
        slots.release()
        await asyncio.gather(*newcomer)
        return granted

    assert run(go) == [1, 2]


# -- the bounded line ------------------------------------------------------------------------------


def test_busy_when_max_waiting_already_wait() -> None:
    async def go() -> tuple[str, int, int]:
        slots = FifoSlots(2, max_waiting=3)
        granted: list[int] = []
        tasks = await queue_up(slots, 5, granted)
        await settle()
        assert (slots.in_use, slots.waiting) == (2, 3)
        with pytest.raises(BusyError) as info:
            await slots.acquire()
        state = (slots.in_use, slots.waiting)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return str(info.value), *state

    message, in_use, waiting = run(go)
    assert message == "all 2 slots are busy and 3 requests are already waiting; retry later"
    assert (in_use, waiting) == (2, 3)


def test_busy_error_is_retryable() -> None:
    async def go() -> BusyError:
        slots = FifoSlots(1, max_waiting=0)
        await slots.acquire()
        with pytest.raises(BusyError) as info:
            await slots.acquire()
        return info.value

    err = run(go)
    assert str(err) == "all 1 slots are busy and 0 requests are already waiting; retry later"
    assert err.error_type == "busy"
    assert err.retryable is True


def test_room_in_the_line_after_a_waiter_is_served() -> None:
    async def go() -> list[int]:
        slots = FifoSlots(1, max_waiting=1)
        granted: list[int] = []
        tasks = await queue_up(slots, 2, granted)
        await settle()
        with pytest.raises(BusyError):
            await slots.acquire()
        slots.release()
        await settle()
        assert slots.waiting == 0
        tasks += await queue_up(slots, 1, granted, start=2)
        assert slots.waiting == 1
        slots.release()
        await asyncio.gather(*tasks)
        return granted

    assert run(go) == [0, 1, 2]


# -- cancellation ---------------------------------------------------------------------------------


def test_cancelled_waiter_leaves_the_line_without_leaking_a_slot() -> None:
    async def go() -> list[int]:
        slots = FifoSlots(1)
        granted: list[int] = []
        tasks = await queue_up(slots, 4, granted)
        await settle()
        assert (slots.in_use, slots.waiting) == (1, 3)
        tasks[2].cancel()
        await settle()
        assert tasks[2].cancelled()
        assert (slots.in_use, slots.waiting) == (1, 2)
        for expected_waiting in (1, 0):
            slots.release()
            await settle()
            assert (slots.in_use, slots.waiting) == (1, expected_waiting)
        slots.release()
        assert (slots.in_use, slots.waiting) == (0, 0)
        return granted

    assert run(go) == [0, 1, 3]


def test_cancelling_every_waiter_empties_the_line() -> None:
    async def go() -> tuple[int, int]:
        slots = FifoSlots(1, max_waiting=2)
        granted: list[int] = []
        tasks = await queue_up(slots, 3, granted)
        for task in tasks[1:]:
            task.cancel()
        await asyncio.gather(*tasks[1:], return_exceptions=True)
        slots.release()
        return slots.in_use, slots.waiting

    assert run(go) == (0, 0)


def test_slot_handed_to_a_waiter_cancelled_at_that_moment_is_passed_on() -> None:
    async def go() -> list[int]:
        slots = FifoSlots(1)
        granted: list[int] = []
        tasks = await queue_up(slots, 3, granted)
        await settle()
        assert granted == [0]
        slots.release()  # the slot goes to waiter 1 ...
        tasks[1].cancel()  # ... which is cancelled before it ever runs again
        assert (slots.in_use, slots.waiting) == (1, 1)
        await settle()
        assert tasks[1].cancelled()
        assert tasks[2].done() and not tasks[2].cancelled()
        assert (slots.in_use, slots.waiting) == (1, 0)
        slots.release()
        assert slots.in_use == 0
        return granted

    assert run(go) == [0, 2]


def test_race_with_no_one_behind_frees_the_slot() -> None:
    async def go() -> tuple[int, int, bool]:
        slots = FifoSlots(1)
        granted: list[int] = []
        tasks = await queue_up(slots, 2, granted)
        await settle()
        slots.release()
        tasks[1].cancel()
        await settle()
        return slots.in_use, slots.waiting, tasks[1].cancelled()

    assert run(go) == (0, 0, True)


def test_two_races_in_a_row_pass_the_slot_down_the_line() -> None:
    async def go() -> list[int]:
        slots = FifoSlots(1)
        granted: list[int] = []
        tasks = await queue_up(slots, 5, granted)
        await settle()
        slots.release()  # to waiter 1
        tasks[1].cancel()
        await settle()  # waiter 1 passes it to waiter 2
        assert (slots.in_use, slots.waiting) == (1, 2)
        assert granted == [0, 2]
        slots.release()  # to waiter 3
        tasks[3].cancel()
        await settle()  # waiter 3 passes it to waiter 4
        assert (slots.in_use, slots.waiting) == (1, 0)
        assert [t.cancelled() for t in tasks] == [False, True, False, True, False]
        slots.release()
        assert slots.in_use == 0
        return granted

    assert run(go) == [0, 2, 4]


# -- randomized: invariants under any interleaving ------------------------------------------------


class SlotsMachine(RuleBasedStateMachine):
    """Random acquire/release/cancel sequences on one event loop, checked against a model."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.slots: FifoSlots | None = None
        self.next_id = 0
        self.pending: dict[int, asyncio.Task[None]] = {}  # started, neither granted nor done
        self.holders: list[int] = []  # hold a slot and have not released it
        self.granted: list[int] = []  # grant order
        self.queued: list[int] = []  # arrival order of those who had to wait
        self.busy = 0

    @initialize(limit=st.integers(1, 3), max_waiting=st.none() | st.integers(0, 4))
    def make(self, limit: int, max_waiting: int | None) -> None:
        self.max_waiting = max_waiting
        self.slots = FifoSlots(limit, max_waiting=max_waiting)

    @property
    def s(self) -> FifoSlots:
        assert self.slots is not None
        return self.slots

    def _settle(self) -> None:
        self.loop.run_until_complete(settle())
        for i, task in list(self.pending.items()):
            if task.done():
                del self.pending[i]

    async def _acquirer(self, i: int) -> None:
        await self.s.acquire()
        self.granted.append(i)
        self.holders.append(i)

    @rule()
    def acquire(self) -> None:
        i = self.next_id
        self.next_id += 1
        waits = self.s.in_use >= self.s.limit or self.s.waiting > 0
        full = self.max_waiting is not None and self.s.waiting >= self.max_waiting
        task = self.loop.create_task(self._acquirer(i))
        self.pending[i] = task
        self._settle()
        if waits and full:
            assert task.done() and isinstance(task.exception(), BusyError)
            self.busy += 1
        elif waits:
            assert not task.done()
            self.queued.append(i)
        else:
            assert task.done() and task.exception() is None
            assert self.holders[-1] == i

    @precondition(lambda self: bool(self.holders))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        i = data.draw(st.sampled_from(self.holders))
        self.holders.remove(i)
        self.s.release()
        self._settle()

    @precondition(lambda self: bool(self.pending))
    @rule(data=st.data())
    def cancel_waiter(self, data: st.DataObject) -> None:
        i = data.draw(st.sampled_from(sorted(self.pending)))
        self.pending[i].cancel()
        self._settle()
        assert i not in self.holders

    @precondition(lambda self: bool(self.holders) and bool(self.pending))
    @rule(data=st.data())
    def release_and_cancel_the_head_at_once(self, data: st.DataObject) -> None:
        i = data.draw(st.sampled_from(self.holders))
        head = min(self.pending)
        self.holders.remove(i)
        self.s.release()  # hands the slot to ``head``
        self.pending[head].cancel()  # before ``head`` runs
        self._settle()
        assert head not in self.holders
        assert self.pending.get(head) is None

    @invariant()
    def counts_match_the_model(self) -> None:
        if self.slots is None:
            return
        assert 0 <= self.s.in_use <= self.s.limit
        assert self.s.in_use == len(self.holders)
        assert self.s.waiting == len(self.pending)
        if self.max_waiting is not None:
            assert self.s.waiting <= self.max_waiting

    @invariant()
    def grants_are_fifo(self) -> None:
        assert self.granted == sorted(self.granted)
        # Nobody waits while a slot is free.
        if self.slots is not None and self.s.waiting:
            assert self.s.in_use == self.s.limit

    def teardown(self) -> None:
        for task in self.pending.values():
            task.cancel()
        self.loop.run_until_complete(settle())
        self.loop.close()


SlotsMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=30, deadline=None)
TestSlotsMachine = SlotsMachine.TestCase


def test_cancelled_waiter_dropped_by_release_still_raises_cancelled() -> None:
    """release() may drop a cancelled waiter's future before its task runs again."""

    async def main() -> None:
        slots = FifoSlots(1)
        await slots.acquire()
        waiter = asyncio.create_task(slots.acquire())
        await asyncio.sleep(0)
        waiter.cancel()
        slots.release()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert (slots.in_use, slots.waiting) == (0, 0)

    asyncio.run(main())
