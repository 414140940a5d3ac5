"""Small asyncio helpers shared by the daemon's background workers."""

from __future__ import annotations

import asyncio


async def cancel_and_wait(task: "asyncio.Task[None] | None") -> None:
    """Stop a background task and wait until it has run its cleanup (finally blocks, uv kill)."""
    if task is None:
        return
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
