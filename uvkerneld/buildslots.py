"""Build slots: how many venv builds run at once, and how pool builds give way to kernel starts.

A venv build holds one of ``max_parallel_creates`` slots while it runs. Two kinds of build take one:

- a kernel start's own build (``for_start``), when the pool had no venv for it: someone waits;
- a pool build (``for_pool``): background work. The pool filler starts one only in a quiet
  moment (``wait_for_quiet``: no kernel start in flight, none finished within ``quiet_period``
  seconds: the kernel that just got its env is still importing ipykernel then, and on a 2-core
  host a concurrent uv build measurably slowed it, 1.30x instead of ~1.0x plain in bench/), and
  its uv runs go under SCHED_IDLE while no kernel start waits for a slot (``BuildSlot.low_priority``).

When a kernel start has to wait for a slot and every slot is taken, the pool builds stop being
background work: their uv runs are raised to normal priority (on a host whose CPUs are busy with
other users' kernels SCHED_IDLE would leave them, and the start waiting behind them, nearly
stalled). Where the daemon may not raise them (no CAP_SYS_NICE, RLIMIT_NICE below 20) the pool
builds are stopped instead: they end with ``BuildPreempted``, the start builds its own venv at
normal priority, and the pool refills later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable

log = logging.getLogger("uvkerneld.buildslots")

QUIET_PERIOD = 2.0


class BuildPreempted(Exception):
    """A pool build was stopped because a kernel start needed its slot (see the module doc)."""


class BuildSlot:
    """One held build slot."""

    __slots__ = ("_pool_build", "_slots")

    def __init__(self, slots: BuildSlots, pool_build: bool) -> None:
        self._slots = slots
        self._pool_build = pool_build

    @property
    def low_priority(self) -> bool:
        """Whether the build's next uv run may go under SCHED_IDLE: a pool build nobody waits for."""
        return self._pool_build and self._slots.starts_waiting == 0


class BuildSlots:
    def __init__(
        self, count: int, raise_priority: Callable[[], tuple[int, int]], quiet_period: float = QUIET_PERIOD
    ) -> None:
        """``raise_priority`` puts the low-priority uv runs under way back at normal priority and
        returns (raised, refused): ``Uv.raise_priority``."""
        self._slots = asyncio.Semaphore(count)
        self._raise_priority = raise_priority
        self.quiet_period = quiet_period
        # Kernel starts waiting for a slot: a pool build then stops being background work.
        self.starts_waiting = 0
        self._pool_builds: set[asyncio.Task[object]] = set()
        self._preempted: set[asyncio.Task[object]] = set()
        self._starts_in_flight = 0
        self._last_start_ended = 0.0
        self._no_starts = asyncio.Event()
        self._no_starts.set()

    # --- kernel starts (every acquire, the hot path: counting only) -----------------------------

    def start_began(self) -> None:
        self._starts_in_flight += 1
        self._no_starts.clear()

    def start_ended(self) -> None:
        self._starts_in_flight -= 1
        self._last_start_ended = time.monotonic()
        if self._starts_in_flight == 0:
            self._no_starts.set()

    async def wait_for_quiet(self) -> None:
        """Return once no kernel start is in flight and none ended within ``quiet_period``."""
        while True:
            await self._no_starts.wait()
            remaining = self._last_start_ended + self.quiet_period - time.monotonic()
            if remaining <= 0 and self._no_starts.is_set():
                return
            await asyncio.sleep(max(remaining, 0.01))

    # --- holding a slot -------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def for_start(self) -> AsyncIterator[BuildSlot]:
        """A slot for a kernel start's own build; pool builds in the way are hurried or stopped."""
        self.starts_waiting += 1
        try:
            if self._slots.locked():
                self._hurry_pool_builds()
            await self._slots.acquire()
        finally:
            self.starts_waiting -= 1
        try:
            yield BuildSlot(self, pool_build=False)
        finally:
            self._slots.release()

    @contextlib.asynccontextmanager
    async def for_pool(self) -> AsyncIterator[BuildSlot]:
        """A slot for a pool build. Its body must run in a task of its own: a kernel start that
        needs the slot may cancel that task, and the body then ends with ``BuildPreempted``."""
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("a pool build must run in an asyncio task")
        async with self._slots:
            self._pool_builds.add(task)
            try:
                yield BuildSlot(self, pool_build=True)
            except asyncio.CancelledError:
                if task in self._preempted:
                    raise BuildPreempted("a kernel start needed this build's slot") from None
                raise
            finally:
                self._pool_builds.discard(task)
                self._preempted.discard(task)

    def _hurry_pool_builds(self) -> None:
        raised, refused = self._raise_priority()
        if raised:
            log.info(
                "a kernel start waits for a build slot: %d pool build(s) raised to normal priority", raised)
        if refused:
            for task in list(self._pool_builds):
                self._preempted.add(task)
                task.cancel()
            log.info(
                "a kernel start waits for a build slot and pool builds may not leave SCHED_IDLE here "
                "(no CAP_SYS_NICE, RLIMIT_NICE < 20): stopped %d pool build(s)", refused,
            )
