"""The warm pool: keep ``pool_size`` ready venvs so a new notebook never waits for uv.

The filler is one background task. It builds one venv at a time under SCHED_IDLE, and before
each build waits until no acquire is in flight and none finished within ``quiet_period``
seconds: the kernel that just got its env is still importing ipykernel then, and on a 2-core
host a concurrent uv build measurably slowed it (1.30x instead of ~1.0x plain in bench/). Failures back off exponentially (an unreachable index must not spin the CPU) and are
reported in status.
"""

from __future__ import annotations

import asyncio
import logging
import time

from . import states
from .envs import EnvManager
from .tasks import cancel_and_wait
from .protocol import EnvUnavailable

log = logging.getLogger("uvkerneld.pool")

_MAX_BACKOFF = 300.0

QUIET_PERIOD = 2.0


class WarmPool:
    def __init__(self, envs: EnvManager, target: int, quiet_period: float = QUIET_PERIOD) -> None:
        self.envs = envs
        self.target = target
        self.quiet_period = quiet_period
        self.filling = 0
        self.last_error: str | None = None
        self._wake = asyncio.Event()
        self._wake.set()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        envs.on_pool_claimed = self.wake

    @property
    def ready(self) -> int:
        return self.envs.store.count_pooled(self.envs.spec)

    def status(self) -> dict[str, object]:
        return {"ready": self.ready, "target": self.target, "filling": self.filling, "last_error": self.last_error}

    def wake(self) -> None:
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="pool-filler")

    async def stop(self) -> None:
        self._stopping = True
        await cancel_and_wait(self._task)

    async def _wait_for_quiet(self) -> None:
        while True:
            await self.envs.idle.wait()
            remaining = self.envs.last_acquire_at + self.quiet_period - time.monotonic()
            if remaining <= 0 and self.envs.idle.is_set():
                return
            await asyncio.sleep(max(remaining, 0.01))

    async def _trim(self) -> None:
        """Give back pooled venvs beyond the target (after `pool --size` or a config reload)."""
        while self.ready > self.target:
            record = self.envs.store.oldest_pooled(self.envs.spec)
            if record is None:
                return
            # Read and state change with no await in between: an acquire (which claims pooled
            # venvs synchronously too) can never be handed this venv once it is 'deleting'.
            record = self.envs.store.transition(record.id, states.DELETING)
            log.info("pool: removing %s (%d ready, target %d)", record.id, self.ready, self.target)
            await self.envs.delete_files_and_row(record)

    async def _run(self) -> None:
        backoff = 1.0
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._trim()
            while self.ready < self.target:
                await self._wait_for_quiet()
                self.filling = 1
                build = asyncio.create_task(self.envs.create(low_priority=True), name="pool-build")
                try:
                    record = await build
                except asyncio.CancelledError:
                    if self._stopping or build not in self.envs.preempted_builds:
                        raise  # we are being stopped (the build was cancelled with us)
                    # A kernel start needed the build slot and we could not raise our priority:
                    # it builds its own venv; refill once it is done.
                    continue
                except Exception as exc:  # noqa: BLE001 - the filler must survive any failure
                    self.last_error = str(exc)
                    if not isinstance(exc, EnvUnavailable):
                        log.exception("unexpected error while refilling the pool")
                    log.error("pool refill failed, retrying in %.0f s", backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, _MAX_BACKOFF)
                    continue
                finally:
                    self.filling = 0
                    self.envs.preempted_builds.discard(build)
                backoff = 1.0
                self.last_error = None
                log.info("pool: %s ready (%d/%d)", record.id, self.ready, self.target)
