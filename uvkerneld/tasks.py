"""Small asyncio helpers shared by the daemon's background workers."""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger("uvkerneld.tasks")

# A worker's cleanup (a uv it kills: SIGTERM, 5 s, SIGKILL) fits well within this. A worker that
# is still not done after it must not keep the daemon from exiting on SIGTERM: its children die
# with the daemon (PR_SET_PDEATHSIG), and the next start recovers what it left.
STOP_TIMEOUT = 15.0


async def cancel_and_wait(task: asyncio.Task[None] | None, timeout: float = STOP_TIMEOUT) -> None:
    """Stop a background task and wait (at most ``timeout``) until it has run its cleanup."""
    if task is None:
        return
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if not done:
        log.warning("%s did not stop within %.0f s of being cancelled; going on without it",
                    task.get_name(), timeout)
    elif not task.cancelled() and task.exception() is not None:
        log.error("%s failed while stopping: %r", task.get_name(), task.exception())
