"""Bounds on what clients can make the daemon hold: file descriptors, connections, buffered
request bytes and log lines.

Why
---
Every connection costs a file descriptor, and a frame being received costs its length in memory.
Without bounds, 300 idle connections under ``ulimit -n 256`` left no descriptor for ``status``, a
kernel start or even ``accept()`` (asyncio then logged the failure once a second, for ever), and 250
connections each sending most of a 1 MiB frame held 266 MB. So:

- at start the soft RLIMIT_NOFILE is raised to the hard limit, and the connection cap is derived
  from it, leaving ``FD_RESERVE`` descriptors for the store, uv runs and accept itself;
- a connection is either *idle* (waiting for a request), *busy* (a frame or request under way)
  or a *lifeline* (a kernel's connection after a successful ``acquire``, idle for the kernel's whole
  life, by design). Idle connections are closed after ``idle_timeout``; lifelines never are, but
  each uid has at most ``max_kernels_per_uid`` of them;
- each uid has at most ``max_connections_per_uid`` connections that are not lifelines, and all
  connections together at most ``max_connections``. At a cap, the oldest idle connection of the
  uid that holds the most is closed to make room (so one user's idle connections never keep
  another user's ``status`` or kernel start out); if none is idle, the new connection is refused;
- a frame body over ``SMALL_FRAME`` bytes is read only once its length is reserved from a budget
  shared by all connections (``frame_buffer_budget``), so partial frames hold a bounded amount;
- every refusal is an ``over_limit`` error that names the limit and what to do, then a close.

The figures are constants; each can be overridden by an environment variable of the daemon
(``UVKERNELD_MAX_CONNECTIONS`` and so on, see ``OVERRIDES``), for tests and unusual hosts.

Logging: ``LogGuard`` rate-limits repeated lines (per message template, asyncio's included) so a
flood cannot fill the disk, and escapes control characters in logged arguments, which carry what
clients sent (a newline in a notebook path must not forge a log line). Message templates and
tracebacks are the daemon's own and stay as they are.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import re
import resource
import time
from collections.abc import Mapping
from typing import Any

from . import envvars, protocol

log = logging.getLogger("uvkerneld.connlimits")

FD_RESERVE = 64  # descriptors kept for the store, uv runs (3 pipes each), inotify, logs
ACCEPT_BATCH = 32  # accepts per turn of the event loop, so a flood cannot starve other work
MAX_CONNECTIONS = 1024  # all connections, lifelines included (lowered to fit the fd limit)
MAX_CONNECTIONS_PER_UID = 64  # connections of one uid that are not kernel lifelines
MAX_KERNELS_PER_UID = 128  # lifelines (running kernels) of one uid
IDLE_TIMEOUT = 10.0  # s a connection may wait before it starts a request (lifelines: no limit)
FRAME_TIMEOUT = 30.0  # s a frame, once its first byte arrived, has to arrive in full
FRAME_BUFFER_BUDGET = 32 << 20  # bytes all partly received large frames may hold together
SMALL_FRAME = 64 << 10  # bodies up to this need no reservation (every real request is smaller)

# setting -> (environment variable, parser, minimum)
OVERRIDES = {
    "max_connections": (envvars.MAX_CONNECTIONS, int, 1),
    "max_connections_per_uid": (envvars.MAX_CONNECTIONS_PER_UID, int, 1),
    "max_kernels_per_uid": (envvars.MAX_KERNELS_PER_UID, int, 1),
    "idle_timeout": (envvars.IDLE_TIMEOUT, float, 0.01),
    "frame_timeout": (envvars.FRAME_TIMEOUT, float, 0.01),
    "frame_buffer_budget": (envvars.FRAME_BUFFER_BUDGET, int, 0),
}


class Limits:
    __slots__ = ("fd_limit", "fd_ceiling", *OVERRIDES)

    def __init__(self, fd_limit: int, environ: Mapping[str, str]) -> None:
        self.fd_limit = fd_limit
        # Descriptors for connections: what the reserve leaves, but at least half of them (a tiny
        # limit still serves someone). The Listener accepts no more than this.
        self.fd_ceiling = max(fd_limit // 2, fd_limit - FD_RESERVE) if fd_limit > 0 else MAX_CONNECTIONS + 64
        # Connections a turn of the loop may be closing beyond the cap still hold a descriptor:
        # keep a quarter of the room (up to 64) for them, so the cap is reached first.
        self.max_connections = min(MAX_CONNECTIONS, self.fd_ceiling - min(64, max(1, self.fd_ceiling // 4)))
        self.max_connections_per_uid = min(MAX_CONNECTIONS_PER_UID, max(1, self.max_connections // 2))
        # Lifelines are never evicted: with a low fd limit, one uid's kernels alone must not be
        # able to fill every connection slot on the host.
        self.max_kernels_per_uid = min(MAX_KERNELS_PER_UID, max(1, self.max_connections // 2))
        self.idle_timeout = IDLE_TIMEOUT
        self.frame_timeout = FRAME_TIMEOUT
        self.frame_buffer_budget = FRAME_BUFFER_BUDGET
        for name, (variable, parse, minimum) in OVERRIDES.items():
            text = environ.get(variable)
            if not text:
                continue
            try:
                value = parse(text)
                if not value >= minimum or value != value or value == float("inf"):
                    raise ValueError
            except ValueError:
                raise ValueError("%s=%r is not valid: use a %s >= %s" % (
                    variable, text, "whole number" if parse is int else "number", minimum)) from None
            setattr(self, name, value)

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, hard, exc)
    if soft == resource.RLIM_INFINITY:
        return -1
    return soft


class Connection:
    __slots__ = ("state", "uid", "writer")

    def __init__(self, uid: int, writer: Any) -> None:
        self.uid = uid
        self.writer = writer
        self.state = "idle"  # idle | busy | lifeline | closed


class Admission:
    """Counts and caps connections per uid and in all, and the bytes of partly received frames."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._open: dict[int, Connection] = {}  # id -> connection, oldest first
        self._requests_by_uid: dict[int, int] = {}  # connections that are not lifelines
        self._kernels_by_uid: dict[int, int] = {}
        self.buffered = 0
        self.refused = {"connections": 0, "frames": 0, "kernels": 0, "idle_closed": 0, "evicted": 0}

    # --- connections ----------------------------------------------------------------------------

    def open(self, uid: int, writer: Any) -> Connection:
        """Register a new connection, closing an idle one to make room; raises OverLimit."""
        limits = self.limits
        if self._requests_by_uid.get(uid, 0) >= limits.max_connections_per_uid:
            reason = "uid %d opened more than %d connections" % (uid, limits.max_connections_per_uid)
            if not self._evict(uid, reason):
                self.refused["connections"] += 1
                raise protocol.OverLimit(
                    "uid %d already has %d connections with requests under way (max_connections_per_uid); "
                    "wait for them to finish, then try again" % (uid, limits.max_connections_per_uid))
        if len(self._open) >= limits.max_connections:
            busiest = max(self._requests_by_uid, key=self._requests_by_uid.__getitem__, default=None)
            if busiest is None or not self._evict(
                    busiest, "the daemon has %d connections open" % len(self._open)):
                self.refused["connections"] += 1
                raise protocol.OverLimit(
                    "uvkerneld has %d connections open, its limit (max_connections, from an open-file "
                    "limit of %d); try again in a moment, or raise LimitNOFILE / ulimit -n for the daemon"
                    % (len(self._open), limits.fd_limit))
        connection = Connection(uid, writer)
        self._open[id(connection)] = connection
        self._requests_by_uid[uid] = self._requests_by_uid.get(uid, 0) + 1
        return connection

    def _evict(self, uid: int, why: str) -> bool:
        """Close the oldest idle connection of ``uid``; False if it has none."""
        for connection in self._open.values():
            if connection.uid == uid and connection.state == "idle":
                self.refused["evicted"] += 1
                self.close(connection, protocol.OverLimit(
                    "closed this idle connection: %s; send a request right after connecting" % why))
                log.warning("closed an idle connection of uid %d: %s", uid, why)
                return True
        return False

    def close(self, connection: Connection, error: protocol.UvkError | None = None) -> None:
        """Forget a connection (idempotent); with ``error``, tell the peer why and close it."""
        if connection.state == "closed":
            return
        if self._open.pop(id(connection), None) is not None:
            counts = self._kernels_by_uid if connection.state == "lifeline" else self._requests_by_uid
            counts[connection.uid] -= 1
            if not counts[connection.uid]:
                del counts[connection.uid]
        connection.state = "closed"
        if error is not None and not connection.writer.is_closing():
            try:
                connection.writer.write(protocol.encode_frame(protocol.error_response(None, error)))
            except (ConnectionError, RuntimeError):
                pass
            connection.writer.close()  # flushes the error first

    def idle_timeout_of(self, connection: Connection) -> float | None:
        return None if connection.state == "lifeline" else self.limits.idle_timeout

    def check_kernel_slot(self, connection: Connection) -> None:
        """Before an ``acquire`` that would make this connection a lifeline."""
        if connection.state == "lifeline":
            return
        running = self._kernels_by_uid.get(connection.uid, 0)
        if running >= self.limits.max_kernels_per_uid:
            self.refused["kernels"] += 1
            log.warning("refused a kernel start for uid %d: %d kernels running (max_kernels_per_uid)",
                        connection.uid, running)
            raise protocol.OverLimit(
                "uid %d has %d kernels running, the limit (max_kernels_per_uid); shut down kernels you "
                "no longer use, then start this one again" % (connection.uid, running))

    def make_lifeline(self, connection: Connection) -> None:
        if connection.state in ("lifeline", "closed"):
            return
        self._requests_by_uid[connection.uid] -= 1
        if not self._requests_by_uid[connection.uid]:
            del self._requests_by_uid[connection.uid]
        self._kernels_by_uid[connection.uid] = self._kernels_by_uid.get(connection.uid, 0) + 1
        connection.state = "lifeline"

    def set_busy(self, connection: Connection, busy: bool) -> None:
        if connection.state in ("idle", "busy"):
            connection.state = "busy" if busy else "idle"

    # --- frame memory ---------------------------------------------------------------------------

    def reserve(self, length: int) -> int:
        """Reserve room for a frame body of ``length`` bytes; returns what to ``release``."""
        if length <= SMALL_FRAME:
            return 0
        if self.buffered + length > self.limits.frame_buffer_budget:
            self.refused["frames"] += 1
            raise protocol.OverLimit(
                "uvkerneld is receiving %d bytes of large requests already (frame_buffer_budget %d); "
                "send this %d-byte request again in a moment"
                % (self.buffered, self.limits.frame_buffer_budget, length))
        self.buffered += length
        return length

    def release(self, reserved: int) -> None:
        self.buffered -= reserved

    def status(self) -> dict[str, Any]:
        return {
            "open": len(self._open),
            "kernels": sum(self._kernels_by_uid.values()),
            "buffered_bytes": self.buffered,
            "refused": dict(self.refused),
            "limits": self.limits.as_dict(),
        }


class Listener:
    """Accepts connections on the daemon's socket, never more than ``fd_ceiling`` open at once.

    Why not ``asyncio.start_unix_server``: it accepts up to 100 connections per turn of the loop
    whatever the open-file limit, before the daemon can refuse or close any, and at the limit
    ``accept()`` fails with EMFILE, which asyncio logs once a second for as long as the flood
    lasts. Counting descriptors from ``accept`` to the close of the transport, this listener stops
    reading the socket at the ceiling and resumes when a connection has closed; pending clients
    wait in the listen backlog meanwhile.
    """

    def __init__(self, sock: Any, handler: Any, limits: Limits) -> None:
        self._loop = asyncio.get_running_loop()
        self._sock = sock
        self._handler = handler  # async (reader, writer), as for start_unix_server
        self._ceiling = limits.fd_ceiling
        self._reading = False
        self._closed = False
        self.open_fds = 0
        sock.setblocking(False)
        self._resume()

    def _resume(self) -> None:
        if not self._reading and not self._closed:
            self._loop.add_reader(self._sock.fileno(), self._accept_ready)
            self._reading = True

    def _pause(self) -> None:
        if self._reading:
            self._loop.remove_reader(self._sock.fileno())
            self._reading = False

    def _accept_ready(self) -> None:
        for _ in range(ACCEPT_BATCH):
            if self.open_fds >= self._ceiling:
                self._pause()
                return
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    raise
                # Descriptors taken by something else (uv runs): wait for some to come free.
                log.warning("cannot accept connections now (%s); trying again in 1 s", exc.strerror)
                self._pause()
                self._loop.call_later(1.0, self._resume)
                return
            self.open_fds += 1
            self._loop.create_task(self._serve(conn))

    async def _serve(self, conn: Any) -> None:
        try:
            conn.setblocking(False)
            reader, writer = await asyncio.open_unix_connection(sock=conn)
        except BaseException:
            conn.close()
            self._released()
            raise
        try:
            await self._handler(reader, writer)
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, asyncio.CancelledError):
                pass
            self._released()

    def _released(self) -> None:
        self.open_fds -= 1
        if self.open_fds < self._ceiling:
            self._resume()

    def close(self) -> None:
        """Stop accepting (connections already open are the daemon's to end)."""
        self._closed = True
        self._pause()
        self._sock.close()


# --- logging ------------------------------------------------------------------------------------

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape_control(text: str) -> str:
    """``text`` with control characters, line separators and lone surrogates as escapes."""
    return _CONTROL.sub(_escape_one, text)


def _escape_one(match: Any) -> str:
    char = match.group()
    code = ord(char)
    return _NAMED.get(char) or ("\\x%02x" % code if code < 0x100 else "\\u%04x" % code)


def _escaped_arg(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float)):
        return value  # numbers keep %d/%.1f working
    text = value if isinstance(value, str) else str(value)
    return escape_control(text) if _CONTROL.search(text) else value


class LogGuard(logging.Filter):
    """A handler filter: escapes control characters in log arguments, and passes at most
    ``BURST`` lines of one message template at once, then ``RATE`` a second; a line that passes
    after some were dropped says how many."""

    BURST = 100.0
    RATE = 0.5

    def __init__(self, clock: Any = time.monotonic) -> None:
        super().__init__()
        self._clock = clock
        self._buckets: dict[tuple[str, int, str], list[float]] = {}  # key -> [tokens, time, dropped]

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_uvk_guarded", None) is not None:
            return record._uvk_guarded  # type: ignore[attr-defined]
        key = (record.name, record.levelno, str(record.msg)[:200])
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) > 10000:  # templates are few; a flood of distinct ones is not
                self._buckets.clear()
            bucket = self._buckets[key] = [self.BURST, now, 0]
        bucket[0] = min(self.BURST, bucket[0] + (now - bucket[1]) * self.RATE)
        bucket[1] = now
        passes = bucket[0] >= 1
        if passes:
            bucket[0] -= 1
            if isinstance(record.args, tuple):
                record.args = tuple(_escaped_arg(arg) for arg in record.args)
            elif isinstance(record.args, dict):
                record.args = {name: _escaped_arg(arg) for name, arg in record.args.items()}
            if bucket[2]:
                record.msg = "%s [%d similar line(s) dropped]" % (record.msg, bucket[2])
                bucket[2] = 0
        else:
            bucket[2] += 1
        record._uvk_guarded = passes
        return passes


def install_log_guard() -> None:
    """Put one LogGuard on every handler of the root logger (asyncio's lines go there too)."""
    guard = LogGuard()
    for handler in logging.getLogger().handlers:
        if not any(isinstance(existing, LogGuard) for existing in handler.filters):
            handler.addFilter(guard)
