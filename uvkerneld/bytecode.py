"""Shared bytecode: compile each package version once, where uv's cache keeps it unpacked.

How it works
------------
uv unpacks every wheel once into ``<cache>/archive-v0/<id>/`` and installs by hardlinking (or
cloning) *every file of that tree* into a venv's site-packages. So ``.pyc`` files we compile
inside an archive entry reach every later venv through the same links, at no extra disk and no
time. Python accepts them there: a timestamp ``.pyc`` records the source's mtime and size, which
the hardlinked ``.py`` shares (same inode), and the import system rewrites ``co_filename`` to the
path it imported from, so tracebacks name the venv, not the cache.

After each uv install the daemon queues the entries the install used that have no bytecode yet
and returns; compilequeue.py compiles them in the background and then links each entry's
``.pyc`` into every env that got the entry's files before they existed (``link_bytecode``). A
``.pyc`` is only ever linked under its final name, which ``compileall`` writes atomically
(compilework.py); ``uv cache prune`` deletes whole entries, which venvs keep alive through their
own links.

The cache belongs to the daemon (system mode: its own user), so no user can write a ``.pyc`` that
another user's kernel then runs.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import sys
from pathlib import Path

from .children import die_with_parent
from .pipargs import normalize_name
from .venvfiles import site_packages

log = logging.getLogger("uvkerneld.bytecode")

ARCHIVE_DIR = "archive-v0"


def list_entries(archive: Path) -> list[str]:
    """The names of the unpacked wheels in the cache's ``archive-v0`` (uv renames each into
    place once unpacked, so a listed entry is complete)."""
    try:
        with os.scandir(archive) as entries:
            return [entry.name for entry in entries if entry.is_dir() and not entry.name.startswith(".")]
    except FileNotFoundError:
        return []


def distributions_in(entry: Path) -> frozenset[tuple[str, str]]:
    """(normalized project name, version) of each ``*.dist-info`` at the top of a cache entry."""
    found = set()
    try:
        names = os.listdir(entry)
    except OSError:
        return frozenset()
    for name in names:
        if name.endswith(".dist-info") and "-" in name:
            project, version = name[: -len(".dist-info")].rsplit("-", 1)
            found.add((normalize_name(project), version))
    return frozenset(found)


def has_bytecode(entry: Path, tag: str) -> bool:
    """Whether ``entry`` needs no compile: it holds bytecode for ``tag`` (an earlier daemon, or an
    earlier release that compiled synchronously, made it) or no Python source at all. One walk,
    which stops at the first bytecode it finds."""
    sources = False
    for directory, _, files in os.walk(entry):
        if os.path.basename(directory) == "__pycache__":
            if any(name.endswith(".pyc") and tag in name for name in files):
                return True
        elif not sources:
            sources = any(name.endswith(".py") for name in files)
    return not sources


async def interpreter_cache_tag(python: str) -> str:
    """The cache tag (``cpython-311``) of the venvs' interpreter, whose .pyc names kernels look for
    (the daemon's own if that interpreter cannot be run: uv then reports the error that matters)."""
    try:
        process = await asyncio.create_subprocess_exec(
            python, "-I", "-S", "-c", "import sys; print(sys.implementation.cache_tag)",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
            preexec_fn=functools.partial(die_with_parent, os.getpid()),  # never outlives the daemon
        )
    except OSError:
        return sys.implementation.cache_tag
    output, _ = await process.communicate()
    return output.decode().strip() or sys.implementation.cache_tag


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
                linked += _link_one(compiled, target_dir / compiled.name)
            except OSError:
                break  # another filesystem: the venv keeps compiling at import, as before
    return linked


def _link_one(compiled: Path, target: Path) -> int:
    """Link ``compiled`` at ``target``; 1 if a link was made. A ``.pyc`` Python wrote there itself
    (a kernel imported the package before the compile finished, in a venv it may write) is
    replaced by the shared one, atomically: a temp link renamed over it."""
    try:
        os.link(compiled, target)
        return 1
    except FileExistsError:
        if os.path.samefile(compiled, target):
            return 0
    temp = target.with_name(".%s.uvkerneld-link" % target.name)  # never a name Python imports
    temp.unlink(missing_ok=True)
    os.link(compiled, temp)
    os.replace(temp, target)
    return 1


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
