"""The warm pool: keep ``pool_size`` ready venvs so a new notebook never waits for uv.

The filler is one background task. It builds one venv at a time as background work: it waits
for a quiet moment, builds under SCHED_IDLE and gives way to kernel starts (buildslots.py says
how). Failures back off exponentially (an unreachable index must not spin the CPU) and are
reported in status.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from . import states
from .buildslots import BuildPreempted, BuildSlots
from .envs import EnvManager
from .protocol import EnvUnavailable
from .store import Store
from .tasks import cancel_and_wait

log = logging.getLogger("uvkerneld.pool")

_MAX_BACKOFF = 300.0


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

    def status(self) -> dict[str, object]:
        return {
            "ready": self.ready, "target": self.target, "filling": self.filling,
            "last_error": self.last_error,
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
        while self.ready > self.target:
            record = self.store.oldest_pooled(self.envs.spec)
            if record is None:
                return
            # Read and state change with no await in between: an acquire (which claims pooled
            # venvs synchronously too) can never be handed this venv once it is 'deleting'.
            record = self.store.transition(record.id, states.DELETING)
            log.info("pool: removing %s (%d ready, target %d)", record.id, self.ready, self.target)
            await self.envs.delete_files_and_row(record)
            self._disk_changed()

    async def _run(self) -> None:
        backoff = 1.0
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._trim()
            while self.ready < self.target:
                await self.slots.wait_for_quiet()
                self.filling = 1
                # A task of its own: a kernel start may stop the build, never the filler.
                build = asyncio.create_task(self.envs.create_pooled(), name="pool-build")
                try:
                    record = await build
                except BuildPreempted:
                    if self._stopping:
                        # Stopped at the same moment: our cancel reached the build, which
                        # reported the preemption instead.
                        raise asyncio.CancelledError() from None
                    # A kernel start needed the build slot and we could not raise our priority:
                    # it builds its own venv; refill once it is done.
                    continue
                except Exception as exc:  # the filler must survive any failure
                    self.last_error = str(exc)
                    if not isinstance(exc, EnvUnavailable):
                        log.exception("unexpected error while refilling the pool")
                    log.error("pool refill failed, retrying in %.0f s", backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, _MAX_BACKOFF)
                    continue
                finally:
                    self.filling = 0
                backoff = 1.0
                self.last_error = None
                self._disk_changed()
                log.info("pool: %s ready (%d/%d)", record.id, self.ready, self.target)
