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
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from . import envid
from .children import stop_group
from .childside import become_background
from .tasks import cancel_and_wait
from .treework import scan_tree
from .venvsdir import env_dirs, template_dirs

log = logging.getLogger("uvkerneld.diskusage")

_PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)


async def _python_child(module: str, args: list[str]) -> bytes:
    """Run ``python -m module <daemon pid> args...`` from this uvkerneld and return its output;
    raise OSError when it fails. The child lowers its own priority and arranges to die with the
    daemon (childside.become_background), so no preexec_fn makes Python fork the whole daemon on
    the event loop. Cancelled, the child is killed (children.stop_group)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", module, str(os.getpid()), *args,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
        # `-m` imports from the working folder first: run from the folder this uvkerneld is
        # in, so the child is this very code and never a `uvkerneld/` beside the daemon's cwd.
        cwd=_PACKAGE_PARENT,
    )
    try:
        output, errors = await process.communicate()
    except BaseException:
        await stop_group(process, what=module)
        raise
    if process.returncode != 0:
        raise OSError("%s exited with %s: %s" % (
            module, process.returncode, errors.decode("utf-8", "replace").strip()[-2000:]))
    return output


async def unshared_bytes(root: Path) -> int:
    """What deleting ``root`` would free (``TreeUsage.unshared``). The walk stats every file (a
    venv has ~10,000: 0.1-0.3 s), so it runs in a child process (treework.py), never in the
    daemon: not on the event loop, and not in a thread that takes the loop's GIL."""
    try:
        output = await _python_child("uvkerneld.treework", ["unshared", str(root)])
        return int(output)
    except (OSError, ValueError) as exc:
        # No child (EMFILE, EAGAIN under TasksMax, a package upgraded under the running daemon):
        # slower for the loop, but a gc or rm must not fail for it.
        log.warning("walking %s in a child process failed (%s); walking it in a thread", root, exc)
        return (await asyncio.to_thread(scan_tree, root)).unshared


async def remove_tree(root: Path) -> None:
    """``shutil.rmtree(root, ignore_errors=True)`` in a child process, for the reason above.
    Cancelled, the child is killed and the tree may be half gone: the caller's store row says
    ``deleting`` by then, and start-up recovery finishes such a removal."""
    try:
        await _python_child("uvkerneld.treework", ["remove", str(root)])
    except OSError as exc:
        # As above: a removal that cannot get its child still happens (start-up recovery and
        # kernel starts wait for a `deleting` env to be gone).
        log.warning("removing %s in a child process failed (%s); removing it in a thread", root, exc)
        await asyncio.to_thread(shutil.rmtree, root, ignore_errors=True)


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
            except Exception:  # a failed scan must not kill the daemon
                log.exception("disk usage scan failed")

    async def _scan_in_child(self) -> tuple[dict[str, Any], dict[str, dict[str, int]]]:
        """``scan`` in ``python -m uvkerneld.diskusage`` at idle priority: a scan walks every file
        of every venv, and must never compete with a kernel that is starting."""
        output = await _python_child("uvkerneld.diskusage", [str(self.cache_dir), str(self.venvs_dir)])
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
    # Templates (templates.py) are venvs too: in the totals, not counted as envs.
    for env_dir in entries + (template_dirs(venvs_dir) if entries else []):
        usage = scan_tree(env_dir, venvs_seen)
        if env_dir.name.startswith(envid.PREFIX):
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
    become_background(int(sys.argv[1]), idle=True)
    _figures, _per_env = scan(Path(sys.argv[2]), Path(sys.argv[3]))
    json.dump({"figures": _figures, "per_env": _per_env}, sys.stdout)
