"""Shared bytecode: compile each package version once, where uv's cache keeps it unpacked.

How it works
------------
uv unpacks every wheel once into ``<cache>/archive-v0/<id>/`` and installs by hardlinking (or
cloning) *every file of that tree* into a venv's site-packages. So ``.pyc`` files we compile
inside an archive entry reach every later venv through the same links, at no extra disk and no
time. Python accepts them there: a timestamp ``.pyc`` records the source's mtime and size, which
the hardlinked ``.py`` shares (same inode), and the import system rewrites ``co_filename`` to the
path it imported from, so tracebacks name the venv, not the cache.

After each uv install, ``share(venv, since)`` compiles the archive entries that are new since
the last time (with the venvs' interpreter, so the cache tag matches), then links into the venv
that was just installed the ``.pyc`` of every entry compiled since its install began: uv linked
its files before those ``.pyc`` existed, whether this call compiled them or a concurrent install
into another venv did. ``compileall`` writes each file atomically, so two compiles of one entry are harmless;
``uv cache prune`` deletes whole entries, which venvs keep alive through their own links.

The cache belongs to the daemon (system mode: its own user), so no user can write a ``.pyc`` that
another user's kernel then runs.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from .children import die_with_parent, stop_group
from .venvfiles import site_packages

log = logging.getLogger("uvkerneld.bytecode")

ARCHIVE_DIR = "archive-v0"


class SharedBytecode:
    def __init__(self, cache_dir: Path, python: str) -> None:
        self.archive = cache_dir / ARCHIVE_DIR
        self.python = python
        self._compiled: dict[str, float] = {}  # entry name -> time.monotonic() it was compiled
        self._lock = asyncio.Lock()
        self._seeded = False
        self._cache_tag: str | None = None

    def _entries(self) -> list[Path]:
        try:
            return [
                entry for entry in self.archive.iterdir() if entry.is_dir() and not entry.name.startswith(".")
            ]
        except FileNotFoundError:
            return []

    async def share(
        self, venv: Path, since: float, progress: Callable[[str], None] = lambda line: None
    ) -> int:
        """Compile new cache entries, link bytecode compiled at or after ``since`` (a
        ``time.monotonic()`` taken before the venv's uv install) into ``venv``; returns entries compiled."""
        async with self._lock:
            if not self._seeded:
                self._cache_tag = await self._interpreter_cache_tag()
                # Entries compiled by an earlier daemon run already hold bytecode; compileall
                # would skip them file by file anyway, but not walking them saves the time.
                for name in await asyncio.to_thread(_already_compiled, self._entries(), self._cache_tag):
                    self._compiled[name] = 0.0
                self._seeded = True
            entries = self._entries()
            new = [entry for entry in entries if entry.name not in self._compiled]
            if new:
                progress("Compiling bytecode for %d new package(s), shared by every env" % len(new))
                await self._compile(new)
                now = time.monotonic()
                for entry in new:
                    self._compiled[entry.name] = now
            fresh = [entry for entry in entries if self._compiled.get(entry.name, 0.0) >= since]
            linked = await asyncio.to_thread(link_bytecode, fresh, venv)
            if new:
                log.info("compiled %d cache entr%s, linked %d .pyc into %s",
                         len(new), "y" if len(new) == 1 else "ies", linked, venv.name)
            return len(new)

    async def _interpreter_cache_tag(self) -> str:
        process = await asyncio.create_subprocess_exec(
            self.python, "-I", "-S", "-c", "import sys; print(sys.implementation.cache_tag)",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
            preexec_fn=functools.partial(die_with_parent, os.getpid()),  # never outlives the daemon
        )
        output, _ = await process.communicate()
        return output.decode().strip() or sys.implementation.cache_tag

    async def _compile(self, entries: list[Path]) -> None:
        argv = [self.python, "-m", "compileall", "-q", "-j", "0", *[str(entry) for entry in entries]]
        process = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, cwd="/",
            env={**os.environ, "PYTHONDONTWRITEBYTECODE": ""},  # irrelevant to compileall; explicit
            preexec_fn=functools.partial(die_with_parent, os.getpid()),  # never outlives the daemon
            start_new_session=True,  # so a cancel stops compileall's -j 0 workers too
        )
        try:
            output, _ = await process.communicate()
        except BaseException:
            await stop_group(process, what="compileall")
            raise
        if process.returncode != 0:
            # Some wheels ship files that are not valid Python for this version (templates,
            # py2 examples). Their modules compile at import as they always did; the rest share.
            log.info("compileall reported files it could not compile (status %d): %s",
                     process.returncode, output.decode(errors="replace").strip().splitlines()[-1:])


def _already_compiled(entries: list[Path], tag: str) -> list[str]:
    done = []
    for entry in entries:
        for pycache in entry.glob("**/__pycache__"):
            if any(name.endswith(".pyc") and tag in name for name in os.listdir(pycache)):
                done.append(entry.name)
                break
        else:
            if not any(entry.glob("**/*.py")):
                done.append(entry.name)  # nothing to compile (data-only or extension-only)
    return done


def link_bytecode(entries: list[Path], venv: Path) -> int:
    """Hardlink the .pyc of ``entries`` next to the matching (same inode) .py files of ``venv``."""
    if not entries:
        return 0
    sources: dict[tuple[int, int], tuple[Path, Path]] = {}
    for entry in entries:
        for source in entry.rglob("*.py"):
            info = source.stat()
            sources[(info.st_dev, info.st_ino)] = (entry, source.relative_to(entry))
    site = site_packages(venv)
    if site is None:
        return 0
    linked = 0
    for path in site.rglob("*.py"):
        info = path.stat()
        match = sources.get((info.st_dev, info.st_ino))
        if match is None:
            continue  # not from these entries (or copied, not linked)
        entry, relative = match
        cache_dir = entry / relative.parent / "__pycache__"
        if not cache_dir.is_dir():
            continue
        target_dir = path.parent / "__pycache__"
        for compiled in cache_dir.glob(relative.stem + ".*.pyc"):
            target_dir.mkdir(exist_ok=True)
            try:
                os.link(compiled, target_dir / compiled.name)
                linked += 1
            except FileExistsError:
                pass
            except OSError:
                break  # another filesystem: the venv keeps compiling at import, as before
    return linked


def sweep_orphaned_bytecode(venv: Path) -> int:
    """Remove top-level ``__pycache__/x.*.pyc`` whose ``x.py`` an uninstall removed.

    uv removes a package's files (RECORD) and its directories, but not a single-module
    distribution's .pyc in the shared top-level ``__pycache__``, which RECORD does not list.
    """
    site = site_packages(venv)
    if site is None or not (site / "__pycache__").is_dir():
        return 0
    removed = 0
    for compiled in (site / "__pycache__").glob("*.pyc"):
        module = compiled.name.split(".", 1)[0]
        if not (site / (module + ".py")).exists():
            compiled.unlink(missing_ok=True)
            removed += 1
    return removed
