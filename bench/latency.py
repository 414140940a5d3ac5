"""Kernel-start latency while the daemon removes envs.

A kernel start is one ``acquire`` round trip on a new connection (what the stub does); for a
known notebook it is a store read and a write, well under a millisecond of daemon work. Whatever
else the daemon's event loop runs at that moment adds to it: a file-tree walk, a subprocess
wait or a scan over every env done on the loop stalls every kernel start on the host. This
section samples that round trip over and over, idle, while ``uvkernelctl gc --older-than 0s
--yes`` removes real venvs, and while ``uvkernelctl rm`` removes them one by one.

The venvs are hard-linked copies of one real venv the daemon built (as many files as a uv venv,
linked the way uv links them from its cache). The store also holds ``background`` envs of
another uid, which gc leaves alone but which every scan over all envs still reads.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench.fixtures import register_envs, wait_until
from bench.run import Workspace, percentile, verdict
from uvkerneld import client, protocol
from uvkerneld.diskusage import scan_tree

TARGET_P99_VS_IDLE = 2.0  # p99 under removal at most this many times the idle p99
TARGET_MAX_MS = 50.0
SAMPLE_PAUSE_S = 0.01  # between round trips: a busy host's rate of kernel starts, and then some
OTHER_UID = 61001
# Owner of the background envs: not ours, so gc without --all keeps them.
CHECKOUT = Path(__file__).resolve().parent.parent


class Sampler:
    """Acquire round trips for one notebook, each on a new connection, in a thread of its own."""

    def __init__(self, socket_path: str, args: dict[str, Any]) -> None:
        self.socket_path = socket_path
        self.args = args
        self.samples: list[float] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="acquire-sampler", daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._stop.set()
        self._thread.join(120)
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        try:
            while not self._stop.wait(SAMPLE_PAUSE_S):
                started = time.perf_counter()
                sock = client.connect(self.socket_path, 30)
                try:
                    client.call(sock, "acquire", self.args, 30)
                finally:
                    sock.close()  # the "kernel" ends at once: its lifeline closes
                self.samples.append(time.perf_counter() - started)
        except BaseException as exc:  # re-raised in the main thread
            self.error = exc


def summary(samples: list[float]) -> dict[str, Any]:
    return {"samples": len(samples), "p50_ms": percentile(samples, 0.5) * 1000,
            "p99_ms": percentile(samples, 0.99) * 1000, "max_ms": max(samples) * 1000}


def ctl(ws: Workspace, *argv: str) -> str:
    # From the checkout's folder: `-m` then runs this uvkerneld's ctl, not an installed copy.
    done = subprocess.run([sys.executable, "-m", "uvkerneld.ctl", *argv], env=ws.env, cwd=str(CHECKOUT),
                          capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise SystemExit("bench: uvkernelctl %s failed:\n%s" % (" ".join(argv), done.stderr))
    return done.stdout


def bench_latency(ws: Workspace, background: int, gc_envs: int = 30, rm_envs: int = 8,
                  idle_samples: int = 1000) -> dict[str, Any]:
    # 1000 idle samples: the p99 of 300 is the 3rd-worst one, and one stray stall of a shared host
    # moved it 5x between runs.
    ws.use("latency")
    ws.start_daemon(pool_size=0)
    notebook = ws.notebooks / "latency.ipynb"
    notebook.write_text("{}")
    args = {"key": {"kind": "notebook", "value": str(notebook)},
            "file": protocol.file_identity(os.stat(notebook))}
    template = Path(ws.request("acquire", args)["path"])  # built on demand (no pool): a real venv
    ws.stop_daemon()
    register_envs(ws.state_dir, ws.venvs_dir, background, owner_uid=OTHER_UID, name_prefix="other")
    names = register_envs(ws.state_dir, ws.venvs_dir, gc_envs + rm_envs, template=template,
                          first=background, name_prefix="old")
    ws.start_daemon(pool_size=0)
    # A kernel runs in the known notebook's env for the whole section, so gc keeps that env.
    lifeline = client.connect(str(ws.socket), 30)
    try:
        client.call(lifeline, "acquire", args, 30)
        ws.wait_quiet()  # the start-up disk scan is over
        with Sampler(str(ws.socket), args) as idle:
            wait_until(lambda: len(idle.samples) >= idle_samples, 300, "%d idle samples" % idle_samples)
        with Sampler(str(ws.socket), args) as during_rm:
            for name in names[:rm_envs]:
                ctl(ws, "rm", name)
        ws.wait_quiet()
        with Sampler(str(ws.socket), args) as during_gc:
            last_line = ctl(ws, "gc", "--older-than", "0s", "--yes").strip().splitlines()[-1]
        if not last_line.startswith("removed %d env(s)" % gc_envs):
            raise SystemExit("bench: gc was to remove %d envs; it said: %s" % (gc_envs, last_line))
    finally:
        lifeline.close()
    ws.stop_daemon()
    return {"envs_in_store": background + gc_envs + rm_envs + 1, "files_per_env": scan_tree(template).files,
            "gc_envs": gc_envs, "rm_envs": rm_envs, "idle": summary(idle.samples),
            "gc": summary(during_gc.samples), "rm": summary(during_rm.samples),
            # Other work on the host shows up in every figure here: say how much there was.
            "load_average": os.getloadavg()[0], "cpus": os.cpu_count()}


def format_latency(figures: dict[str, Any]) -> list[str]:
    idle = figures["idle"]
    lines = ["", "kernel-start acquire round trip (new connection, known notebook) while envs are removed;",
             "%d envs in the store, removed venvs have %d files each; host load average %.1f on %d CPUs"
             % (figures["envs_in_store"], figures["files_per_env"], figures["load_average"], figures["cpus"]),
             "  %-40s %7s %9s %9s %9s" % ("", "samples", "p50", "p99", "max")]
    rows = [("idle", "idle"), ("gc", "uvkernelctl gc --older-than 0s (%d envs)" % figures["gc_envs"]),
            ("rm", "uvkernelctl rm, %d envs one after another" % figures["rm_envs"])]
    for case, label in rows:
        data = figures[case]
        note = ""
        if case != "idle":
            ratio = data["p99_ms"] / idle["p99_ms"]
            note = "  p99 %.1fx idle %s, max %s" % (ratio, verdict(ratio, TARGET_P99_VS_IDLE),
                                                     verdict(data["max_ms"], TARGET_MAX_MS))
        lines.append("  %-40s %7d %6.2f ms %6.2f ms %6.1f ms%s" % (
            label, data["samples"], data["p50_ms"], data["p99_ms"], data["max_ms"], note))
    return lines
