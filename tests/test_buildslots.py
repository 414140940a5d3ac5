"""BuildSlots on its own, with real asyncio tasks: slot counting, pool builds giving way to kernel
starts (priority raised, or the build preempted), and the quiet period before a pool build.
tests/test_pool.py shows the same through a real daemon and real uv runs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest

from uvkerneld.buildslots import BuildPreempted, BuildSlot, BuildSlots

T = TypeVar("T")
TIMEOUT = 10.0


def run(test: Callable[[], Awaitable[T]]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(test(), TIMEOUT)
    return asyncio.run(bounded())


class PriorityRaiser:
    """Stands in for Uv.raise_priority: answers (raised, refused) as a host would."""

    def __init__(self, may_raise: bool) -> None:
        self.may_raise = may_raise
        self.calls = 0

    def __call__(self) -> tuple[int, int]:
        self.calls += 1
        return (1, 0) if self.may_raise else (0, 1)


async def until(condition: Callable[[], bool]) -> None:
    # A counter of the code under test, not an event; run()'s wait_for bounds this poll.
    while not condition():  # noqa: ASYNC110
        await asyncio.sleep(0.005)


class PoolBuild:
    """A pool build in a task of its own that holds its slot until ``finish`` is set."""

    def __init__(self, slots: BuildSlots) -> None:
        self.slots = slots
        self.holding = asyncio.Event()
        self.finish = asyncio.Event()
        self.cleaned_up = False
        self.slot: BuildSlot | None = None
        self.task = asyncio.create_task(self._build())

    async def _build(self) -> str:
        async with self.slots.for_pool() as slot:
            self.slot = slot
            self.holding.set()
            try:
                await self.finish.wait()
            finally:
                self.cleaned_up = True  # what a build removes when it is stopped
            return "built"


def test_builds_beyond_the_slot_count_wait_for_a_free_one() -> None:
    async def scenario() -> None:
        slots = BuildSlots(1, PriorityRaiser(may_raise=True))
        first, second = PoolBuild(slots), PoolBuild(slots)
        await first.holding.wait()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(second.holding.wait()), 0.2)
        first.finish.set()
        await second.holding.wait()
        second.finish.set()
        assert await first.task == await second.task == "built"
    run(scenario)


def test_a_start_with_a_free_slot_neither_waits_nor_disturbs_pool_builds() -> None:
    async def scenario() -> None:
        raiser = PriorityRaiser(may_raise=False)
        slots = BuildSlots(2, raiser)
        pool = PoolBuild(slots)
        await pool.holding.wait()
        async with slots.for_start() as slot:
            assert not slot.low_priority
        assert raiser.calls == 0 and not pool.task.done()
        assert pool.slot is not None and pool.slot.low_priority
        pool.finish.set()
        assert await pool.task == "built"
    run(scenario)


def test_a_start_waiting_behind_a_pool_build_raises_its_priority() -> None:
    async def scenario() -> None:
        raiser = PriorityRaiser(may_raise=True)
        slots = BuildSlots(1, raiser)
        pool = PoolBuild(slots)
        await pool.holding.wait()
        assert pool.slot is not None and pool.slot.low_priority  # background work while nobody waits
        got_slot = asyncio.Event()

        async def start() -> None:
            async with slots.for_start() as slot:
                assert not slot.low_priority
                got_slot.set()
        waiting = asyncio.create_task(start())
        await until(lambda: slots.starts_waiting == 1)
        # Someone waits for it now: its remaining uv runs go at normal priority; it is not stopped.
        assert raiser.calls == 1 and not pool.slot.low_priority and not pool.task.done()
        pool.finish.set()
        assert await pool.task == "built"
        await waiting
        assert got_slot.is_set() and slots.starts_waiting == 0
    run(scenario)


def test_where_priority_may_not_be_raised_the_pool_build_is_preempted() -> None:
    async def scenario() -> None:
        slots = BuildSlots(1, PriorityRaiser(may_raise=False))
        pool = PoolBuild(slots)
        await pool.holding.wait()
        async with slots.for_start() as slot:
            assert not slot.low_priority
            # The start got the slot because the pool build was stopped, and cleaned up.
            with pytest.raises(BuildPreempted):
                await pool.task
            assert pool.cleaned_up
        # The slot is free again for the pool's next build.
        again = PoolBuild(slots)
        await again.holding.wait()
        again.finish.set()
        assert await again.task == "built"
    run(scenario)


def test_a_pool_build_stopped_by_its_owner_stays_cancelled() -> None:
    async def scenario() -> None:
        slots = BuildSlots(1, PriorityRaiser(may_raise=False))
        pool = PoolBuild(slots)
        await pool.holding.wait()
        pool.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pool.task
        assert pool.cleaned_up
        async with slots.for_start():
            pass
    run(scenario)


def test_a_start_that_gives_up_waiting_leaves_pool_builds_in_the_background() -> None:
    async def scenario() -> None:
        slots = BuildSlots(1, PriorityRaiser(may_raise=True))
        pool = PoolBuild(slots)
        await pool.holding.wait()

        async def start() -> None:
            async with slots.for_start():
                pass
        waiting = asyncio.create_task(start())
        await until(lambda: slots.starts_waiting == 1)
        waiting.cancel()  # its client went away
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert slots.starts_waiting == 0 and pool.slot is not None and pool.slot.low_priority
        pool.finish.set()
        assert await pool.task == "built"
    run(scenario)


def test_pool_builds_wait_for_a_quiet_moment_after_kernel_starts() -> None:
    async def scenario() -> None:
        quiet = 0.3
        slots = BuildSlots(1, PriorityRaiser(may_raise=True), quiet_period=quiet)
        await asyncio.wait_for(slots.wait_for_quiet(), 1)  # no start yet: quiet already
        slots.start_began()
        quiet_now = asyncio.create_task(slots.wait_for_quiet())
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(quiet_now), quiet * 2)  # in flight: never quiet
        slots.start_began()
        slots.start_ended()
        await asyncio.sleep(0)
        assert not quiet_now.done()  # one start is still in flight
        slots.start_ended()
        ended = time.monotonic()
        await quiet_now
        assert time.monotonic() - ended >= quiet - 0.02
    run(scenario)
