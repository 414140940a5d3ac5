"""Template venvs: a new venv from a warm cache in ~0.2 s of links instead of a uv build.

What a template is
------------------
Right after uv built a venv (envs.py), before anyone can use it, and while no template of that
spec (envs.env_spec) is ready, the venv is copied into ``<venvs_dir>/t-<12 hex digits>``: the
spec's template. Later venvs of that spec are made from it (``clone``): ``cp -a -l`` (every file
hardlinked; directories and symlinks made anew, modes and times kept), then every file that is
the venv's *own* (below) is replaced by a fresh copy in which the template's name is replaced by
the new venv's id, and venvfiles writes the kernel files anew. No uv runs, nothing is unpacked,
so clones need no build slot (buildslots.py serializes uv builds, which may unpack wheels into
the cache) and run in parallel: ``PARALLEL_CLONES`` for the pool, ``PARALLEL_CLONES_WAITED_FOR``
for kernel starts waiting for theirs (in a burst the clones compete for the CPU with the kernels
that already started: more of them at once get the waiting starts their share sooner).

Which files name the venv's path (grep of a venv uv 0.13 built with ipykernel for its own path):
bin/activate, activate.csh, .fish, .nu and .bat, and the shebang of every entry-point script
(bin/ipython, jupyter*, debugpy*, pygmentize); of uvkerneld's files the shims (bin/pip, pip3,
uv) and the .pyc of the kernel extension (its co_filename). pyvenv.cfg names the base
interpreter only, RECORD files name paths relative to site-packages, and nothing names the
venv's bare name. A template's name has the length of an env id and lives in the same folder,
so a clone's path has the same length and needs the same quoting as the template's: the
rewritten files are byte for byte what uv writes for that path (uv picks a ``#!<python>`` or a
``#!/bin/sh`` exec shebang by the path's length).

Which files are shared: the rule for every writer
-------------------------------------------------
A clone hardlinks a file from the template only if that file was already a hardlink in the venv
uv built (link count > 1 when the template was taken: a file uv linked from its cache, or a .pyc
bytecode.py linked from there). Every file uv or uvkerneld wrote for that venv alone (link count
1: scripts, activate*, pyvenv.cfg, RECORD/INSTALLER/REQUESTED, uv's .lock, the kernel files) is
copied. So a clone shares with other venvs exactly the inodes a uv-built venv shares with the
cache, nothing more, and a writer that is safe in a uv-built venv is safe in a clone. The writers,
none of which writes a shared file in place: uv install/uninstall/upgrade (removes a file, then
links or writes a new one), compileall, py_compile and the import system (a temporary file, then
a rename), bytecode.link_bytecode (os.link; over a .pyc a kernel wrote itself, a temporary link
and a rename), startuphooks.strip
(unlinks; pyvenv.cfg through a temporary file and a rename), and venvfiles.write_kernel_files,
which does write in place and so runs on a clone only after its own files were replaced by
copies. Anything new that writes into venvs must replace files too, or copy them first. A
kernel's own code that opened a linked file for writing would change the cache's copy and every
venv's, cloned or built by uv alike; in system mode venvs are read-only to users. Nothing writes
into a template once it is taken, and in system mode it belongs to the daemon like every venv
(readable by users, writable by nobody else; its own files lose uv's group/other write bits,
which each clone gets back).

Crash safety and damage
-----------------------
``<venvs_dir>/.templates/<name>.json`` says ``taking`` before the template's directory is made
and ``ready`` (with its own files and their sizes) once it is complete. Start-up recovery removes
a template that is not ready or belongs to another spec, and moves aside a ``t-*`` directory with
no such file (never deleted unaccounted). Before each clone the template is checked: ready,
interpreter there, every own file present with its recorded size, site-packages holding the same
top-level names. One that fails is retired (removed once no clone reads it) and the next uv build
takes a new one. A clone is an env in ``creating`` like any build: recovery removes it if the
daemon dies half-way.
"""

from __future__ import annotations

import array
import asyncio
import fcntl
import json
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import envid, venvsdir
from .diskusage import remove_tree
from .uv import Uv
from .venvfiles import site_packages, write_kernel_files

log = logging.getLogger("uvkerneld.templates")

PREFIX = venvsdir.TEMPLATE_PREFIX  # as long as envid.PREFIX: a clone's path has the template path's length
STATE_DIR = ".templates"
PARALLEL_CLONES = max(2, os.cpu_count() or 1)
PARALLEL_CLONES_WAITED_FOR = 4 * PARALLEL_CLONES
_NEW_SUFFIX = ".uvkerneld-new"
# ext2/3/4's "top of a directory hierarchy" flag (chattr +T) and the ioctls that read and set it.
_FS_IOC_GETFLAGS, _FS_IOC_SETFLAGS, _FS_TOPDIR_FL = 0x80086601, 0x40086602, 0x00020000


class TemplateDamaged(Exception):
    """The template is missing files or changed: it is retired, not used."""


class Template:
    __slots__ = ("own", "path", "readers", "retired", "spec", "top_level")

    def __init__(self, path: Path, spec: str, own: list[tuple[str, int, int]], top_level: list[str]) -> None:
        self.path = path
        self.spec = spec
        self.own = own  # (path relative to the venv, size, mode): the files each clone gets a copy of
        self.top_level = top_level  # site-packages' names when taken
        self.readers = 0  # clones reading it now
        self.retired = False


class Templates:
    def __init__(self, venvs_dir: Path, uv: Uv, enabled: bool) -> None:
        """``enabled``: uv hardlinks from its cache (link_mode "hardlink"). With copies or reflinks
        every file of a venv is its own, and a clone would copy them all: no gain."""
        self.venvs_dir = venvs_dir
        self.state_dir = venvs_dir / STATE_DIR
        self.uv = uv
        self.enabled = enabled
        self._ready: dict[str, Template] = {}  # spec -> its template
        self._taking: set[str] = set()
        self._parallel = asyncio.Semaphore(PARALLEL_CLONES)
        self._parallel_waited_for = asyncio.Semaphore(PARALLEL_CLONES_WAITED_FOR)
        self._removals: set[asyncio.Task[None]] = set()

    def status(self, spec: str) -> dict[str, Any]:
        template = self._ready.get(spec)
        return {"template": template.path.name if template else None, "taking": spec in self._taking}

    def usable(self, spec: str) -> Template | None:
        """The spec's ready template (still checked in full by ``clone`` before it is read)."""
        return self._ready.get(spec) if self.enabled else None

    def wanted(self, spec: str) -> bool:
        """Whether a venv uv just built for ``spec`` should be taken as its template."""
        return self.enabled and spec not in self._ready and spec not in self._taking

    # --- start-up ---------------------------------------------------------------------------------

    async def recover(self, spec: str) -> None:
        """Keep the ready template of ``spec``; remove half-taken and outdated ones; move aside a
        ``t-*`` directory nobody took (it is not ours to delete)."""
        await asyncio.to_thread(spread_venvs, self.venvs_dir)
        described: set[str] = set()
        for state_file in await asyncio.to_thread(self._state_files):
            name = state_file.stem
            described.add(name)
            fields = await asyncio.to_thread(_read_state, state_file)
            path = self.venvs_dir / name
            if (self.enabled and fields is not None and fields.get("state") == "ready"
                    and fields.get("spec") == spec and spec not in self._ready and path.is_dir()):
                own = [(str(relative), int(size), int(mode)) for relative, size, mode in fields["own"]]
                self._ready[spec] = Template(path, spec, own, list(fields["top_level"]))
                continue
            why = "half-taken" if fields is None or fields.get("state") != "ready" else "outdated"
            log.info("removing %s template %s", why, name)
            await self._remove(path, state_file)
        for entry in await asyncio.to_thread(venvsdir.template_dirs, self.venvs_dir):
            if entry.name not in described:
                target = await asyncio.to_thread(
                    venvsdir.quarantine, self.venvs_dir, entry, "a template directory with no state file")
                log.warning("template directory %s has no state file: moved aside to %s", entry, target)

    def _state_files(self) -> list[Path]:
        try:
            return sorted(self.state_dir.glob(PREFIX + "*.json"))
        except OSError:
            return []

    # --- taking a template from a venv uv built ---------------------------------------------------

    async def take(self, source: Path, spec: str) -> None:
        """Make ``source`` (a venv uv just built for ``spec``, not handed out yet) the spec's
        template. Failure is logged, never raised: builds go on with uv."""
        if not self.wanted(spec):
            return
        self._taking.add(spec)
        name = PREFIX + envid.new_env_id()[len(envid.PREFIX):]
        path = self.venvs_dir / name
        state_file = self.state_dir / (name + ".json")
        try:
            await asyncio.to_thread(self._write_state, state_file, {"state": "taking", "spec": spec})
            own = await asyncio.to_thread(_own_files, source)
            await self._copy_tree(source, path, low_priority=True)
            await asyncio.to_thread(_replace_own_files, source, path, own)
            await asyncio.to_thread(_seal, path, own)
            top_level = await asyncio.to_thread(_top_level, path)
            await asyncio.to_thread(self._write_state, state_file, {
                "state": "ready", "spec": spec, "own": own, "top_level": top_level})
        except asyncio.CancelledError:
            await asyncio.shield(self._remove(path, state_file))
            raise
        except (OSError, TemplateDamaged) as exc:
            log.warning("could not take a template from %s (%s); venvs are built by uv meanwhile",
                        source, exc)
            await self._remove(path, state_file)
            return
        finally:
            self._taking.discard(spec)
        self._ready[spec] = Template(path, spec, own, top_level)
        log.info("template %s taken from %s: new venvs of this spec are cloned from it", name, source.name)

    def _write_state(self, state_file: Path, fields: dict[str, Any]) -> None:
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        venvsdir.write_private(state_file, json.dumps(fields))

    # --- cloning --------------------------------------------------------------------------------

    async def clone(self, template: Template, target: Path, low_priority: bool) -> None:
        """Make ``target`` a venv like the template (see the module doc). Raises TemplateDamaged
        (the template is retired) or OSError; the caller removes what was made."""
        # A reader from before the wait for a slot: the template cannot be removed under a clone
        # that waits for one (removal starts only when no reader is left).
        template.readers += 1
        try:
            async with self._parallel if low_priority else self._parallel_waited_for:
                if template.retired:
                    raise TemplateDamaged(
                        "template %s was retired while this clone waited" % template.path.name)
                await asyncio.to_thread(_check, template)
                await self._copy_tree(template.path, target, low_priority)
                await asyncio.to_thread(_replace_own_files, template.path, target, template.own)
        except TemplateDamaged as exc:
            self.retire(template, str(exc))
            raise
        finally:
            template.readers -= 1
            if template.retired and template.readers == 0:
                self._remove_later(template)

    def retire(self, template: Template, reason: str) -> None:
        """Never clone from ``template`` again; it is removed once no clone reads it."""
        if template.retired:
            return
        template.retired = True
        if self._ready.get(template.spec) is template:
            del self._ready[template.spec]
        log.error("template %s is not used any more: %s; the next uv build takes a new one",
                  template.path.name, reason)
        if template.readers == 0:
            self._remove_later(template)

    def _remove_later(self, template: Template) -> None:
        state_file = self.state_dir / (template.path.name + ".json")
        task = asyncio.create_task(self._remove(template.path, state_file), name="remove-template")
        self._removals.add(task)
        task.add_done_callback(self._removals.discard)

    async def _copy_tree(self, source: Path, target: Path, low_priority: bool) -> None:
        # cp is a build child like uv: it dies with the daemon, runs under SCHED_IDLE for the pool
        # and is raised with uv's runs when a kernel start waits (Uv.run_unchecked does all that).
        returncode, output = await self.uv.run_unchecked(
            ["cp", "-a", "-l", str(source), str(target)], low_priority=low_priority)
        if returncode != 0:
            error = output.strip().splitlines()[-1:] or ["exit status %d" % returncode]
            if "No space left" in output or "Disk quota" in output:
                raise OSError(28, "no space left on the venvs' disk", error[0])
            raise OSError("cp -a -l %s %s failed: %s" % (source, target, error[0]))

    async def _remove(self, path: Path, state_file: Path) -> None:
        """The state file says "removing" first, then the files go, then the state file: a crash
        in between leaves a state file that recovery finishes the removal from, and never a
        half-deleted tree whose state still says "ready" (recovery would clone from it)."""
        if await asyncio.to_thread(state_file.exists):
            await asyncio.to_thread(self._write_state, state_file, {"state": "removing"})
        await remove_tree(path)
        await asyncio.to_thread(_unlink, state_file)


def spread_venvs(venvs_dir: Path) -> bool:
    """Mark the venvs dir as the top of directory hierarchies for ext4's allocator (chattr +T).

    A venv is ~1300 directories. ext4 puts a new directory in its parent's block group unless
    that group already holds many directories, and then scans the groups one by one for each
    mkdir: with every venv under one parent that scan made mkdir ~0.4 ms here, over half of a
    clone's or uv build's time. With the flag each venv starts in a group of its own and its
    directories stay there: ``cp -a -l`` of a venv took 0.2 s of system time instead of 0.4-0.7 s.
    Other filesystems have no such flag: False, nothing changed."""
    try:
        fd = os.open(venvs_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        flags = array.array("i", [0])
        fcntl.ioctl(fd, _FS_IOC_GETFLAGS, flags, True)
        if not flags[0] & _FS_TOPDIR_FL:
            flags[0] |= _FS_TOPDIR_FL
            fcntl.ioctl(fd, _FS_IOC_SETFLAGS, flags, True)
        return True
    except OSError as exc:
        log.debug("cannot mark %s as a top directory (%s): its filesystem has no such flag", venvs_dir, exc)
        return False
    finally:
        os.close(fd)


def _read_state(state_file: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(state_file.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(value, dict):
        return None
    if value.get("state") == "ready":
        own, top = value.get("own"), value.get("top_level")
        if not (isinstance(own, list) and isinstance(top, list)
                and all(isinstance(item, list) and len(item) == 3 for item in own)):
            return None
    return value


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _walk_files(root: Path) -> Iterator[tuple[str, os.stat_result]]:
    """(relative path, lstat) of every regular file under ``root``; symlinks are not followed."""
    for folder, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            info = os.lstat(path)
            if stat.S_ISREG(info.st_mode):
                yield os.path.relpath(path, root), info


def _own_files(venv: Path) -> list[tuple[str, int, int]]:
    """The files uv or uvkerneld wrote for ``venv`` alone (link count 1), with sizes and modes."""
    return sorted((relative, info.st_size, stat.S_IMODE(info.st_mode))
                  for relative, info in _walk_files(venv) if info.st_nlink == 1)


def _seal(template: Path, own: list[tuple[str, int, int]]) -> None:
    """Nobody but the daemon may write a template's own files (uv makes its .lock 0666): each
    clone gets the recorded mode back."""
    for relative, _size, mode in own:
        os.chmod(template / relative, mode & ~0o022)


def _top_level(venv: Path) -> list[str]:
    site = site_packages(venv)
    if site is None:
        raise TemplateDamaged("no packages folder in %s" % venv)
    return sorted(os.listdir(site))


def _check(template: Template) -> None:
    """Everything a clone reads is there as taken (the cheap part of it: ~100 stats)."""
    path = template.path
    if not os.access(path / "bin" / "python", os.X_OK):
        raise TemplateDamaged("its interpreter %s is missing" % (path / "bin" / "python"))
    for relative, size, _mode in template.own:
        try:
            info = os.lstat(path / relative)
        except OSError:
            raise TemplateDamaged("%s is missing" % relative) from None
        if not stat.S_ISREG(info.st_mode) or info.st_size != size:
            raise TemplateDamaged("%s changed since it was taken" % relative)
    try:
        top_level = _top_level(path)
    except OSError:
        raise TemplateDamaged("its packages folder cannot be read") from None
    if top_level != template.top_level:
        changed = sorted(set(top_level) ^ set(template.top_level))
        raise TemplateDamaged("its packages changed since it was taken (%s)" % ", ".join(changed[:5]))


def _replace_own_files(source: Path, target: Path, own: list[tuple[str, int, int]]) -> None:
    """After ``cp -a -l source target``: give ``target`` its own copy of each of ``own``, with
    ``source``'s name replaced by ``target``'s (same length), then its kernel files."""
    old, new = source.name.encode(), target.name.encode()
    if len(old) != len(new):
        raise ValueError("names of unequal length: %s, %s" % (source.name, target.name))
    for relative, size, mode in own:
        original = source / relative
        fd = os.open(original, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as handle:
            info = os.fstat(handle.fileno())
            data = handle.read(size + 1)
        if len(data) != size:
            raise TemplateDamaged("%s changed since it was taken" % relative)
        copy = target / relative
        temporary = copy.with_name(copy.name + _NEW_SUFFIX)
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
        with os.fdopen(fd, "wb") as out:
            out.write(data.replace(old, new))
            os.fchmod(out.fileno(), mode)  # the umask must not change what uv made
        os.utime(temporary, ns=(info.st_atime_ns, info.st_mtime_ns))
        # The link to the template's file goes; the template keeps it.
        os.replace(temporary, copy)
    # Anew, not copied: a daemon upgraded since the template was taken writes its current ones.
    write_kernel_files(target)

