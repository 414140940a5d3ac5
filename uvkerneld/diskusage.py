"""Disk figures: what the venvs would take as copies vs what they really take with hardlinks.

Counting follows du(1): *real* bytes are ``st_blocks * 512`` of each inode once (so a file
hardlinked from the uv cache into 50 venvs counts once), *apparent* bytes are ``st_size`` of
every link. The scan walks every file, so it runs on a timer and after changes, in a child
process at idle priority, and requests read the last result: ``status`` answers in
microseconds however many envs there are.

A process, not a thread: a thread of the daemon at idle priority that is preempted while it
holds the GIL holds the event loop with it. With the CPUs busy, that stalled the loop for up to
a second (measured: 0.5-1.2 s at SCHED_IDLE or nice 19, under 60 ms at normal priority).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from .children import die_with_parent
from .tasks import cancel_and_wait
from .venvsdir import env_dirs

log = logging.getLogger("uvkerneld.diskusage")


def _idle_child(parent_pid: int) -> None:
    """In the forked scanner before exec: idle CPU time only, and killed with the daemon."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        pass
    die_with_parent(parent_pid)


class TreeUsage:
    __slots__ = ("apparent", "linked", "real", "new", "unshared", "files")

    def __init__(self) -> None:
        self.apparent = 0  # every link's st_size, like `du --apparent-size --count-links`
        self.linked = 0  # every link's blocks, like `du --count-links`: the disk use as copies
        self.real = 0  # each inode of this tree once, like `du`
        self.new = 0  # like real, minus inodes already in ``seen`` (counted in an earlier tree)
        self.unshared = 0  # inodes with no link outside this tree: what deleting it frees
        self.files = 0


def scan_tree(root: Path, seen: set[tuple[int, int]] | None = None) -> TreeUsage:
    """Usage of one tree; ``seen`` (shared across calls) makes ``real`` count inodes once overall."""
    usage = TreeUsage()
    links_here: dict[tuple[int, int], list[int]] = {}
    stack = [str(root)]
    while stack:
        directory = stack.pop()
        try:
            entries = os.scandir(directory)
        except OSError:
            continue
        with entries:
            for entry in entries:
                try:
                    info = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                usage.apparent += info.st_size
                usage.files += 1
                inode = (info.st_dev, info.st_ino)
                blocks = info.st_blocks * 512
                usage.linked += blocks
                counted = links_here.get(inode)
                if counted is None:
                    links_here[inode] = [1, info.st_nlink, blocks]
                    usage.real += blocks
                    if seen is None or inode not in seen:
                        usage.new += blocks
                        if seen is not None:
                            seen.add(inode)
                else:
                    counted[0] += 1
    try:
        root_info = os.lstat(root)
        usage.apparent += root_info.st_size
        usage.linked += root_info.st_blocks * 512
        usage.real += root_info.st_blocks * 512
        usage.new += root_info.st_blocks * 512
    except OSError:
        pass
    usage.unshared = sum(blocks for here, total, blocks in links_here.values() if here >= total)
    return usage


async def unshared_bytes(root: Path) -> int:
    """What deleting ``root`` would free (``TreeUsage.unshared``). The walk stats every file (a
    venv has ~10,000: 0.1-0.3 s), so it runs in a worker thread, never on the event loop."""
    return (await asyncio.to_thread(scan_tree, root)).unshared


class DiskUsage:
    """The last scan of the cache and of every venv, refreshed in the background."""

    def __init__(self, cache_dir: Path, venvs_dir: Path, interval: float = 300.0) -> None:
        self.cache_dir = cache_dir
        self.venvs_dir = venvs_dir
        self.interval = interval
        self.figures: dict[str, Any] = {"computed_at": None}
        self.scanning = False
        self.per_env: dict[str, dict[str, int]] = {}
        self._dirty = asyncio.Event()
        self._dirty.set()
        self._task: asyncio.Task[None] | None = None

    def mark_dirty(self) -> None:
        self._dirty.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="disk-usage")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    async def refresh(self) -> dict[str, Any]:
        self.scanning = True
        try:
            figures, per_env = await self._scan_in_child()
        finally:
            self.scanning = False
        self.figures, self.per_env = figures, per_env
        return figures

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._dirty.wait(), self.interval)
            except asyncio.TimeoutError:
                pass
            self._dirty.clear()
            # Changes come in bursts (a pool refill, an install): let them settle first.
            await asyncio.sleep(2.0)
            try:
                await self.refresh()
            except Exception:  # noqa: BLE001 - a failed scan must not kill the daemon
                log.exception("disk usage scan failed")

    async def _scan_in_child(self) -> tuple[dict[str, Any], dict[str, dict[str, int]]]:
        """``scan`` in ``python -m uvkerneld.diskusage`` at idle priority: a scan walks every file
        of every venv, and must never compete with a kernel that is starting."""
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "uvkerneld.diskusage", str(self.cache_dir), str(self.venvs_dir),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            preexec_fn=functools.partial(_idle_child, os.getpid()),
            # `-m` imports from the working folder first: run from the folder this uvkerneld is
            # in, so the scanner is this very code and never a `uvkerneld/` beside the daemon's cwd.
            cwd=str(Path(__file__).resolve().parent.parent),
        )
        try:
            output, errors = await process.communicate()
        except asyncio.CancelledError:
            # The scanner may have ended already: kill() would then raise ProcessLookupError in
            # place of the cancellation, and a shutdown waiting for this task would wait forever.
            try:
                process.kill()
            except ProcessLookupError:
                pass
            await process.wait()
            raise
        if process.returncode != 0:
            raise RuntimeError("the scanner exited with %s: %s" % (
                process.returncode, errors.decode("utf-8", "replace").strip()[-2000:]))
        result = json.loads(output)
        return result["figures"], result["per_env"]


def scan(cache_dir: Path, venvs_dir: Path) -> tuple[dict[str, Any], dict[str, dict[str, int]]]:
    """(figures, per-env usage) of the cache and every venv; runs in the scanner process."""
    started = time.monotonic()
    # "computed_at" is when the walk began: a change made while it ran may be missing, so a
    # reader waiting for figures that include a change must not take this scan for one.
    started_at = time.time()
    everything: set[tuple[int, int]] = set()
    cache = scan_tree(cache_dir, everything)
    venvs_seen: set[tuple[int, int]] = set()
    per_env = {}
    apparent = linked = real = beyond_cache = 0
    try:
        # Envs only: the quarantine folder (venvsdir.py) holds no env of ours.
        entries = [p for p in env_dirs(venvs_dir) if p.is_dir()]
    except OSError:
        entries = []
    for env_dir in entries:
        usage = scan_tree(env_dir, venvs_seen)
        per_env[env_dir.name] = {"disk_bytes": usage.real, "unshared_bytes": usage.unshared,
                                 "apparent_bytes": usage.apparent}
        apparent += usage.apparent
        linked += usage.linked
        real += usage.new
        beyond_cache += scan_tree(env_dir, everything).new
    figures = {
        "computed_at": started_at,
        "scan_seconds": round(time.monotonic() - started, 3),
        "envs_scanned": len(entries),
        "cache_bytes": cache.real,
        "venvs_apparent_bytes": apparent,
        "venvs_linked_bytes": linked,
        "venvs_real_bytes": real,
        "venvs_beyond_cache_bytes": beyond_cache,
        "total_real_bytes": cache.real + beyond_cache,
        # Like for like: the venvs' blocks if every link were a copy, over their real blocks.
        "dedup_ratio": round(linked / real, 2) if real else None,
    }
    return figures, per_env


if __name__ == "__main__":
    _figures, _per_env = scan(Path(sys.argv[1]), Path(sys.argv[2]))
    json.dump({"figures": _figures, "per_env": _per_env}, sys.stdout)
