"""The daemon under abuse: connections held under a low open-file limit while ``status`` and
``acquire`` still answer, and the memory 250 half-sent 1 MiB frames can make it hold.

Run with the other sections (``python -m bench``; ``--skip abuse`` leaves it out). The daemon runs
with its default limits (uvkerneld/connlimits.py); only its open-file limit is lowered, as
``ulimit -n`` would.
"""

from __future__ import annotations

import resource
import socket
import struct
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

from bench.fixtures import wait_until
from uvkerneld import client

if TYPE_CHECKING:
    from bench.run import Workspace

FD_LIMIT = 256
IDLE_CONNECTIONS = 300
PARTIAL_FRAMES = 250
FRAME = 1 << 20  # the protocol's largest frame
SAMPLES = 20
TARGET_LATENCY_MS = 1000.0  # status and a known env's acquire while the flood is held


def bench_abuse(ws: Workspace) -> dict[str, Any]:
    from bench.run import median, rss_mb  # run.py imports this module

    ws.use("abuse")
    _start_limited(ws, FD_LIMIT)
    known = {"key": {"kind": "env", "value": "abuse-known"}}
    ws.request("acquire", known)  # built now, before the flood: the timed acquires find it
    held = [_connect(ws) for _ in range(IDLE_CONNECTIONS)]
    try:
        status_ms, acquire_ms = [], []
        for _ in range(SAMPLES):
            started = time.perf_counter()
            status = client.request(str(ws.socket), "status", timeout=30)
            status_ms.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            client.request(str(ws.socket), "acquire", known, timeout=30)
            acquire_ms.append((time.perf_counter() - started) * 1000)
        connections = status["connections"]
    finally:
        for sock in held:
            sock.close()
    assert ws.daemon is not None
    wait_until(lambda: (ws.status() or {}).get("connections", {}).get("open") == 1, 30,
               "the held connections to close")
    rss_idle = rss_mb(ws.daemon.pid)
    partial, refused = [], 0
    for _ in range(PARTIAL_FRAMES):
        sock = _connect(ws)
        try:
            sock.sendall(struct.pack(">I", FRAME) + b"x" * (FRAME - 4096))
            partial.append(sock)
        except OSError:  # refused (over_limit) while sending
            sock.close()
            refused += 1
    rss_partial = rss_mb(ws.daemon.pid)
    for sock in partial:
        sock.close()
    ws.stop_daemon()
    return {
        "fd_limit": FD_LIMIT, "idle_connections": IDLE_CONNECTIONS, "held_open": connections["open"],
        "evicted": connections["refused"]["evicted"], "limits": connections["limits"],
        "status_p50_ms": median(status_ms), "status_max_ms": max(status_ms),
        "acquire_p50_ms": median(acquire_ms), "acquire_max_ms": max(acquire_ms),
        "partial_frames": PARTIAL_FRAMES, "partial_refused": refused,
        "rss_idle_mb": rss_idle, "rss_partial_frames_mb": rss_partial,
    }


def format_abuse(abuse: dict[str, Any]) -> list[str]:
    limits = abuse["limits"]
    slowest = max(abuse["status_max_ms"], abuse["acquire_max_ms"])
    return [
        "",
        "abuse: daemon under ulimit -n %d, %d idle connections from one uid"
        % (abuse["fd_limit"], abuse["idle_connections"]),
        "  held open %d (max %d per uid, %d in all), %d closed with over_limit"
        % (abuse["held_open"], limits["max_connections_per_uid"], limits["max_connections"],
           abuse["evicted"]),
        "  meanwhile status p50 %.1f ms (max %.1f), acquire of a known env p50 %.1f ms (max %.1f)  %s"
        % (abuse["status_p50_ms"], abuse["status_max_ms"], abuse["acquire_p50_ms"], abuse["acquire_max_ms"],
           "ok" if slowest < TARGET_LATENCY_MS else "SLOW (target %.0f ms)" % TARGET_LATENCY_MS),
        "  RSS idle %.1f MB, with %d partial 1 MiB frames %.1f MB (%d refused; frame budget %d MiB)"
        % (abuse["rss_idle_mb"], abuse["partial_frames"], abuse["rss_partial_frames_mb"],
           abuse["partial_refused"], limits["frame_buffer_budget"] >> 20),
    ]


def _start_limited(ws: Workspace, fd_limit: int) -> None:
    """Like ``ws.start_daemon(0)``, under a soft and hard open-file limit."""
    ws.stop_daemon()
    ws.state_dir.mkdir(parents=True, exist_ok=True)
    with open(ws.state_dir.parent / "daemon.log", "ab") as log:
        ws.daemon = subprocess.Popen(
            [sys.executable, "-m", "uvkerneld", "--pool-size", "0"], env=ws.env, stdin=subprocess.DEVNULL,
            stdout=log, stderr=subprocess.STDOUT,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (fd_limit, fd_limit)),
        )
    wait_until(lambda: ws.status() is not None, 60, "the daemon to answer")


def _connect(ws: Workspace) -> socket.socket:
    """A raw connection; waits while the listen backlog is full (the daemon accepts in turns)."""
    deadline = time.monotonic() + 30
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(30)
        try:
            sock.connect(str(ws.socket))
            return sock
        except BlockingIOError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


