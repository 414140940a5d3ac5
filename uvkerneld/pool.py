"""The warm pool: keep ``pool_size`` ready venvs so a new notebook never waits for uv.

The filler is one background task. It builds one venv at a time at low CPU priority, and before
each build waits until no acquire is in flight, so a refill never delays a kernel that is
starting. Failures back off exponentially (an unreachable index must not spin the CPU) and are
reported in status.
"""

from __future__ import annotations

import asyncio
import logging

from .envs import EnvManager
from .protocol import EnvUnavailable

log = logging.getLogger("uvkerneld.pool")

_MAX_BACKOFF = 300.0


class WarmPool:
    def __init__(self, envs: EnvManager, target: int) -> None:
        self.envs = envs
        self.target = target
        self.filling = 0
        self.last_error: str | None = None
        self._wake = asyncio.Event()
        self._wake.set()
        self._task: asyncio.Task[None] | None = None
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
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _run(self) -> None:
        backoff = 1.0
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self.ready < self.target:
                await self.envs.idle.wait()
                self.filling = 1
                try:
                    record = await self.envs.create(low_priority=True)
                except EnvUnavailable as exc:
                    self.last_error = str(exc)
                    log.error("pool refill failed, retrying in %.0f s", backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, _MAX_BACKOFF)
                    continue
                finally:
                    self.filling = 0
                backoff = 1.0
                self.last_error = None
                log.info("pool: %s ready (%d/%d)", record.id, self.ready, self.target)
