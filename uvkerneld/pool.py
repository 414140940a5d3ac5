"""The warm pool: keep ``pool_size`` ready venvs so a new notebook never waits for uv.

The filler is one background task. It fills as background work: it waits for a quiet moment,
builds under SCHED_IDLE and gives way to kernel starts (buildslots.py says how). A uv build runs
one at a time; once the spec has a template (templates.py) venvs are clones, and up to
``PARALLEL_CLONES`` are made at once. Failures back off exponentially (an unreachable index must
not spin the CPU) and are reported in status.

Bursts: when demand outruns the pool (at least ``BURST_MIN_MISSES`` acquires found it empty within
``BURST_WINDOW_S``), the pool keeps that many extra venvs (at most ``BURST_MAX_EXTRA``) until the
window has passed without such a miss, then gives them back. A pool of 0 stays 0. For a known
peak (a class at 9:00) an admin sets a larger target ahead: ``uvkernelctl pool --size 60 --fill``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from . import states
from .buildslots import BuildPreempted, BuildSlots
from .envs import EnvManager
from .protocol import EnvUnavailable
from .store import EnvRecord, Store
from .tasks import cancel_and_wait
from .templates import PARALLEL_CLONES

log = logging.getLogger("uvkerneld.pool")

_MAX_BACKOFF = 300.0
BURST_WINDOW_S = 600.0
BURST_MIN_MISSES = 2
BURST_MAX_EXTRA = 16


class WarmPool:
    def __init__(
        self, envs: EnvManager, store: Store, slots: BuildSlots, target: int, wake: asyncio.Event,
        disk_changed: Callable[[], None] = lambda: None,
    ) -> None:
        """``wake`` is set whenever the pool may be short: by ``wake()``, and by ``envs`` when a
        pooled venv was taken (its ``refill_pool``). ``disk_changed`` is called after each venv
        the pool built or removed, so `status` does not show disk figures from before it."""
        self.envs = envs
        self.store = store
        self.slots = slots
        self.target = target
        self.filling = 0
        self.last_error: str | None = None
        self._wake = wake
        self._wake.set()
        self._disk_changed = disk_changed
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def ready(self) -> int:
        return self.store.count_pooled(self.envs.spec)

    def burst_extra(self) -> int:
        """Extra venvs kept while demand outruns the pool (see the module doc)."""
        if self.target == 0:
            return 0
        recent = self.envs.pool_misses
        horizon = time.monotonic() - BURST_WINDOW_S
        while recent and recent[0] < horizon:
            recent.popleft()
        return min(len(recent), BURST_MAX_EXTRA) if len(recent) >= BURST_MIN_MISSES else 0

    @property
    def wanted(self) -> int:
        return self.target + self.burst_extra()

    def status(self) -> dict[str, object]:
        return {
            "ready": self.ready, "target": self.target, "filling": self.filling,
            "last_error": self.last_error, "burst_extra": self.burst_extra(),
        }

    def wake(self) -> None:
        self._wake.set()

    def resize(self, target: int) -> None:
        """A new target (``uvkernelctl pool --size``, SIGHUP): the filler builds or removes to it."""
        self.target = target
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="pool-filler")

    async def stop(self) -> None:
        self._stopping = True
        await cancel_and_wait(self._task)

    async def _trim(self) -> None:
        """Give back pooled venvs beyond the target (after `pool --size` or a config reload)."""
        while self.ready > self.wanted:
            record = self.store.oldest_pooled(self.envs.spec)
            if record is None:
                return
            # Read and state change with no await in between: an acquire (which claims pooled
            # venvs synchronously too) can never be handed this venv once it is 'deleting'.
            record = self.store.transition(record.id, states.DELETING)
            log.info("pool: removing %s (%d ready, target %d)", record.id, self.ready, self.wanted)
            await self.envs.delete_files_and_row(record)
            self._disk_changed()

    async def _run(self) -> None:
        backoff = 1.0
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                # While a burst's extra venvs are kept, look again later to give them back.
                await asyncio.wait_for(self._wake.wait(), 60.0 if self.burst_extra() else None)
            self._wake.clear()
            await self._trim()
            while self.ready < self.wanted:
                await self.slots.wait_for_quiet()
                # Clones are links from the template (no uv, nothing unpacked): several at once.
                parallel = self.envs.templates.usable(self.envs.spec) is not None
                count = max(1, min(self.wanted - self.ready, PARALLEL_CLONES if parallel else 1))
                self.filling = count
                # Tasks of their own: a kernel start may stop a build, never the filler.
                builds = [
                    asyncio.create_task(self.envs.create_pooled(), name="pool-build") for _ in range(count)]
                try:
                    results = await asyncio.gather(*builds, return_exceptions=True)
                finally:
                    self.filling = 0
                failure = self._outcome(results)
                if failure is None:
                    backoff = 1.0
                    continue
                if isinstance(failure, BuildPreempted):
                    # A kernel start needed the build slot and we could not raise our priority:
                    # it builds its own venv; refill once it is done.
                    continue
                self.last_error = str(failure)
                log.error("pool refill failed, retrying in %.0f s", backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF)

    def _outcome(self, results: list[EnvRecord | BaseException]) -> BaseException | None:
        """Log each build's result; the first failure (None if all succeeded)."""
        failure: BaseException | None = None
        for result in results:
            if isinstance(result, EnvRecord):
                self.last_error = None
                self._disk_changed()
                log.info("pool: %s ready (%d/%d)", result.id, self.ready, self.wanted)
                continue
            if isinstance(result, (BuildPreempted, asyncio.CancelledError)) and self._stopping:
                # Stopped at the same moment: our cancel reached the build, which reported the
                # preemption instead.
                raise asyncio.CancelledError()
            if isinstance(result, asyncio.CancelledError):
                result = BuildPreempted("the build was cancelled")
            elif not isinstance(result, (BuildPreempted, EnvUnavailable)):
                log.error("unexpected error while refilling the pool", exc_info=result)
            failure = failure or result
        return failure
