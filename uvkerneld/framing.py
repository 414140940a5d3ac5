"""Reading frames from an asyncio stream with the bounds a server needs.

The frame format (a 4-byte big-endian length, then that many bytes of JSON; lengths over
``protocol.MAX_FRAME_SIZE`` refused before the body is read) is protocol.py's, which also has
the blocking clients' incremental decoder. This is its reader for the daemon: waiting for a
frame to start is bounded by an idle timeout; once the first byte is in, header and body
together by a frame timeout; and a large body's bytes are reserved from a shared budget before
they are read. Not in protocol.py because the kernel stub imports that on every kernel start,
and asyncio costs it milliseconds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Protocol

from . import protocol

log = logging.getLogger("uvkerneld.framing")


class FrameBudget(Protocol):
    """Memory for frame bodies being received, shared by all connections (connlimits.Admission)."""

    def reserve(self, length: int) -> int:
        """Room for a body of ``length`` bytes; returns what to ``release``, or raises OverLimit."""
        ...

    def release(self, reserved: int) -> None: ...


class IdleTimeout(Exception):
    """No frame started within the idle timeout."""


async def read_frame(
    reader: asyncio.StreamReader, idle_timeout: float | None, frame_timeout: float, budget: FrameBudget,
    started: Callable[[], None] = lambda: None, max_size: int = protocol.MAX_FRAME_SIZE,
) -> bytes | None:
    """The next frame's body, or None when the peer closed the connection between frames.

    ``idle_timeout`` None waits for a frame as long as the peer keeps the connection (a kernel's
    lifeline). ``started`` is called when a frame's first byte is in. Raises IdleTimeout, or
    the UvkError to send the peer when the frame cannot be read (TruncatedFrame, FrameTooLarge,
    OverLimit, BadRequest): the stream cannot be resynchronised then, so close it after that.
    """
    try:
        first = await asyncio.wait_for(reader.readexactly(1), idle_timeout)
    except asyncio.IncompleteReadError:
        return None  # closed between requests: the normal end
    except asyncio.TimeoutError:
        raise IdleTimeout() from None
    started()
    deadline = time.monotonic() + frame_timeout
    try:
        header = first + await asyncio.wait_for(
            reader.readexactly(protocol.HEADER_SIZE - 1), deadline - time.monotonic())
    except asyncio.IncompleteReadError as exc:
        raise protocol.TruncatedFrame("connection closed inside a frame header (%d of %d bytes)"
                                      % (1 + len(exc.partial), protocol.HEADER_SIZE)) from None
    except asyncio.TimeoutError:
        raise protocol.TruncatedFrame(
            "frame header not completed within %.0f s; closing" % frame_timeout) from None
    length = protocol.frame_length(header, max_size)
    try:
        reserved = budget.reserve(length)
    except protocol.OverLimit as exc:
        log.warning("refused a %d-byte request from a connection: %s", length, exc.message)
        raise
    try:
        return await asyncio.wait_for(reader.readexactly(length), max(0.0, deadline - time.monotonic()))
    except asyncio.IncompleteReadError as exc:
        raise protocol.TruncatedFrame(
            "connection closed after %d of %d body bytes" % (len(exc.partial), length)) from None
    except asyncio.TimeoutError:
        raise protocol.BadRequest(
            "frame not received in full within %.0f s; closing" % frame_timeout) from None
    finally:
        budget.release(reserved)
