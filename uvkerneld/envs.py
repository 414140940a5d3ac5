"""Env lifecycle: create venvs with uv, hand them to notebooks, repair or remove them.

How acquire works
-----------------
``acquire(uid, key)`` is the hot path of every kernel start. Under a per-(uid, key) asyncio lock
(so two kernels of one notebook never get two envs) it:
1. returns the env already assigned to (uid, key) if its interpreter is there (no uv, one read);
2. else claims the oldest pooled venv in one store transaction (no uv) and wakes the pool filler;
3. else (pool empty) makes a venv on demand, saying so in the log: a clone of the spec's template
   (templates.py: links, no uv, in parallel with other clones) when one is ready, else a uv
   build, which takes a build slot first (buildslots.py: a pool build holding it is hurried or
   stopped). The first uv build of a spec is taken as its template before it is handed out.
A notebook key comes with the notebook file's identity (dev, inode, size, mtime) as the client
saw it. It is stored with the env, so a renamed or moved notebook, unknown under its new path, is
recognised by that identity and its env follows it (``follow_rename``; see watch.py).

Crash safety: a row is inserted in ``creating`` *before* ``uv venv`` runs, and only moves to
``pooled``/``assigned`` after uv succeeded, so a daemon killed at any moment leaves at most
``creating`` rows, whose directories ``recover()`` deletes at the next start. A directory the
store cannot account for is never deleted: it is moved into the venvs dir's quarantine folder
(see venvsdir.py). Venvs are never moved after creation: uv writes absolute paths into their
scripts.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import shutil
import sqlite3
import time
from collections import defaultdict, deque
from collections.abc import Callable
from pathlib import Path

from . import envid, states, venvsdir
from .buildslots import BuildSlot, BuildSlots
from .compilequeue import CompileQueue
from .config import Config
from .diskusage import remove_tree, scan_tree
from .pipargs import requirement_name
from .protocol import EnvKey, EnvUnavailable, identity_of, same_inode
from .store import EnvRecord, Store, StoreFull
from .templates import TemplateDamaged, Templates
from .uv import Uv, UvFailed
from .venvfiles import write_kernel_files

log = logging.getLogger("uvkerneld.envs")

# What a failed build is assumed to need when no build has succeeded yet to measure.
DEFAULT_VENV_BYTES = 64 * 1024 * 1024
_ENOSPC_MARKERS = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")


def env_spec(config: Config) -> str:
    """Fingerprint of what a pool venv is built from; pooled venvs of another spec are replaced."""
    python = shutil.which(config.python) or config.python
    description = {
        "python": os.path.realpath(python),
        "packages": list(config.kernel_packages),
        "bytecode": config.bytecode,
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]


class EnvManager:
    def __init__(
        self, config: Config, store: Store, uv: Uv, slots: BuildSlots, bytecode: CompileQueue | None = None,
        *, refill_pool: Callable[[], None], watch_notebook: Callable[[str], None] | None = None,
    ) -> None:
        """``refill_pool`` is called when a pooled venv was taken (the pool filler's wake-up);
        ``watch_notebook`` with a notebook's path at each kernel start for it (the watcher's)."""
        self.config = config
        self.store = store
        self.uv = uv
        self.bytecode = bytecode
        self.spec = env_spec(config)
        self.venvs_dir = config.venvs_dir
        self._key_locks: dict[tuple[int, EnvKey], asyncio.Lock] = defaultdict(asyncio.Lock)
        self._slots = slots
        self._refill_pool = refill_pool
        self._watch_notebook = watch_notebook
        self.creating = 0  # uv venv builds running now (gc must not prune the cache under them)
        self._cleanups: set[asyncio.Task[None]] = set()
        self.last_errors: list[dict[str, object]] = []
        self.venv_bytes = DEFAULT_VENV_BYTES  # the last build's own disk use: what a build needs
        self.templates = Templates(self.venvs_dir, uv, enabled=config.link_mode == "hardlink")
        # When acquires found the pool empty (time.monotonic()): the pool's burst figure.
        self.pool_misses: deque[float] = deque(maxlen=256)

    # --- start-up -------------------------------------------------------------------------------

    async def recover(self, adopt: bool = False) -> None:
        """Bring disk and store back in line after any crash. ``adopt``: the store lost its
        records (see venvsdir.VenvsDirClaim.check): rebuild them from the venvs' record files."""
        self.venvs_dir.mkdir(parents=True, exist_ok=True)
        await self.templates.recover(self.spec)
        if adopt:
            await self._adopt()
        known = set()
        for record in list(self.store.all()):
            known.add(record.path.name)
            try:
                await self._recover_one(record)
            except StoreFull as exc:
                # The next start finishes the job; the files of a half-made venv are gone already.
                self.record_error("recovery of env %s postponed: %s" % (record.id, exc))
        # Envs built by an older uvkerneld carry no record of their own yet: write the missing ones.
        described = [
            (record.path, self.store.env_record_fields(record.id)) for record in self.store.all()
            if record.state in (states.POOLED, states.ASSIGNED, states.BROKEN)
        ]
        await asyncio.to_thread(venvsdir.write_missing_env_records, described)
        for entry in venvsdir.env_dirs(self.venvs_dir):
            if entry.name not in known:
                # Never delete what the store cannot account for (another store's env, a lost row).
                target = await asyncio.to_thread(
                    venvsdir.quarantine, self.venvs_dir, entry, "no record of it in %s" % self.store.path)
                self.record_error(
                    "venv directory %s is not in the store: moved aside to %s" % (entry, target))

    async def _recover_one(self, record: EnvRecord) -> None:
        if record.state == states.CREATING:
            log.info("removing env %s left half-made by an earlier run", record.id)
            await self.delete_files_and_row(record)
        elif record.state == states.DELETING:
            await self.delete_files_and_row(record)
        elif record.state == states.POOLED and record.spec != self.spec:
            log.info("removing pooled env %s built from an older configuration", record.id)
            await self.delete_files_and_row(record)
        elif record.state == states.INSTALLING:
            log.warning("env %s was interrupted during a package install; it will be rebuilt "
                        "from its recorded requirements at the next kernel start", record.id)
            self.store.transition(record.id, states.BROKEN, "a package install was interrupted")
        elif record.state in (states.POOLED, states.ASSIGNED) and not _interpreter_ok(record):
            if record.state == states.POOLED:
                log.warning("pooled env %s is damaged (no interpreter); removing it", record.id)
                await self.delete_files_and_row(record)
            else:
                self.store.transition(record.id, states.BROKEN, "interpreter missing at start-up")
        elif record.state == states.BROKEN and record.owner_uid is None:
            await self.delete_files_and_row(record)  # a damaged pool venv found at claim time

    async def _adopt(self) -> None:
        """Rebuild lost rows from each venv's own record file. A venv without one stays where it
        is and is then quarantined by ``recover``: nothing is deleted."""
        adopted = 0
        for entry in venvsdir.env_dirs(self.venvs_dir):
            fields = await asyncio.to_thread(venvsdir.read_env_record, entry)
            if fields is None:
                continue
            owned = fields.get("owner_uid") is not None and fields.get("key")
            state = states.ASSIGNED if owned else states.POOLED
            if fields.get("retired"):
                state = states.RETIRED  # replaced for its notebook: removed once no kernel runs in it
            # An assigned env we cannot vouch for (an install may have been under way when the
            # store was lost) is rebuilt from its requirements at its next kernel start.
            error = None
            if state != states.RETIRED and not os.access(entry / "bin" / "python", os.X_OK):
                state, error = states.BROKEN, "interpreter missing when the store was rebuilt"
            try:
                self.store.insert_adopted(fields, entry, state, error)
            except (sqlite3.IntegrityError, ValueError, TypeError) as exc:
                log.warning(
                    "the record in %s cannot be adopted (%s); the directory is moved aside", entry, exc)
                continue
            adopted += 1
        self.record_error(
            "the store %s had no records of the venvs in %s: rebuilt %d env record(s) from the venvs' own "
            "record files" % (self.store.path, self.venvs_dir, adopted)
        )

    # --- acquire (the hot path) -----------------------------------------------------------------

    async def acquire(self, uid: int, key: EnvKey, notebook_file: str | None = None) -> tuple[EnvRecord, str]:
        """The env for (uid, key) and where it came from: 'known', 'renamed', 'pool', 'created'
        or 'rebuilt'. ``notebook_file`` is the notebook's file identity as the client saw it."""
        self._slots.start_began()  # the pool filler starts no build while a kernel start is under way
        try:
            if key.kind == "notebook" and self._watch_notebook is not None:
                self._watch_notebook(key.value)
            async with self._key_locks[(uid, key)]:
                return await self._acquire_locked(uid, key, notebook_file)
        finally:
            self._slots.start_ended()

    async def _acquire_locked(
        self, uid: int, key: EnvKey, notebook_file: str | None
    ) -> tuple[EnvRecord, str]:
        record = self.store.find(uid, key)
        source = "known"
        if record is None and notebook_file is not None:
            record = self._follow_rename_locked(uid, key, notebook_file)
            source = "renamed"
        if record is not None:
            if record.state in (states.ASSIGNED, states.INSTALLING) and _interpreter_ok(record):
                try:
                    if notebook_file is not None and record.notebook_file != notebook_file:
                        self.store.set_notebook_file(record.id, notebook_file)
                    self.store.touch(record.id)
                except StoreFull as exc:
                    # Bookkeeping only: a full state folder must not keep a known notebook's kernel
                    # from starting.
                    self.record_error(str(exc))
                return record, source
            if notebook_file is not None and record.notebook_file != notebook_file:
                self.store.set_notebook_file(record.id, notebook_file)
            return await self._rebuild(uid, key, record), "rebuilt"
        record, source = await self._new_env(uid, key)
        if notebook_file is not None:
            self.store.set_notebook_file(record.id, notebook_file)
        return record, source

    # --- notebooks that were renamed or moved ---------------------------------------------------

    async def follow_rename(
        self, uid: int, key: EnvKey, notebook_file: str, deleted_with_it: tuple[str, ...] = ()
    ) -> EnvRecord | None:
        """The notebook now at ``key`` has the identity ``notebook_file``: if it is a notebook we
        knew under another path, re-key that env to the new path and return it.

        ``deleted_with_it``: notebook paths that disappeared at the same moment (one batch of
        file events). One of them with the same device and inode is this file renamed, even if
        it was saved (new size and mtime) in the same instant.
        """
        async with self._key_locks[(uid, key)]:
            if self.store.find(uid, key) is not None:
                return None
            renamed_in_place = [
                record
                for record in (self.store.find(uid, EnvKey("notebook", path)) for path in deleted_with_it)
                if record is not None and record.notebook_file
                and same_inode(record.notebook_file, notebook_file)
                and record.state in states.SETTLED_NOTEBOOK_STATES
            ]
            return self._follow_rename_locked(uid, key, notebook_file, renamed_in_place)

    def _follow_rename_locked(
        self, uid: int, key: EnvKey, notebook_file: str, also: list[EnvRecord] | None = None
    ) -> EnvRecord | None:
        for candidate in self.store.find_by_notebook_file(uid, notebook_file) + (also or []):
            old_path = candidate.key.value if candidate.key else ""
            if old_path == key.value or _same_file_still_at(old_path, notebook_file):
                continue  # a hard link: both names exist, each keeps (or gets) its own env
            moved = self.store.rekey(candidate.id, key)
            if moved is not None:
                log.info(
                    "notebook %s was renamed to %s: env %s follows it", old_path, key.value, candidate.id)
                return moved
        return None

    def _claim_pooled(self, uid: int, key: EnvKey) -> EnvRecord | None:
        """Claim the oldest pooled venv whose interpreter is there; remove damaged ones found."""
        claimed, damaged = self.store.claim_pooled(self.spec, uid, key, usable=_interpreter_usable)
        for env_id in damaged:
            self.record_error(
                "pooled env %s had lost its interpreter; removing it, not handing it out" % env_id)
            task = asyncio.create_task(
                self.delete_files_and_row(self.store.get(env_id)), name="remove-damaged")
            self._cleanups.add(task)
            task.add_done_callback(self._cleanups.discard)
        if damaged:
            self._refill_pool()
        return claimed

    async def _new_env(self, uid: int, key: EnvKey) -> tuple[EnvRecord, str]:
        claimed = self._claim_pooled(uid, key)
        if claimed is not None:
            self._refill_pool()
            return claimed, "pool"
        self.pool_misses.append(time.monotonic())
        self._refill_pool()
        cloned = await self._clone(owner_uid=uid, key=key)
        if cloned is not None:
            log.info("pool empty: cloned env %s for uid %d %r on demand", cloned.id, uid, key)
            return cloned, "created"
        log.warning("pool empty: creating env for uid %d %r on demand", uid, key)
        async with self._slots.for_start() as slot:
            return await self._new_env_holding_slot(uid, key, slot)

    async def _new_env_holding_slot(self, uid: int, key: EnvKey, slot: BuildSlot) -> tuple[EnvRecord, str]:
        # The build we waited for may have been a pool venv (a daemon's first minutes): take it.
        claimed = self._claim_pooled(uid, key)
        if claimed is not None:
            log.info("a pool venv finished while uid %d %r waited; using it", uid, key)
            self._refill_pool()
            return claimed, "pool"
        self._refill_pool()
        return await self._create_holding_slot(slot, owner_uid=uid, key=key), "created"

    async def _rebuild(self, uid: int, key: EnvKey, record: EnvRecord) -> EnvRecord:
        """Replace an unusable env by a fresh one holding the same recorded requirements."""
        reason = record.error or "its interpreter is missing"
        requirements = self.store.requirements(record.id)
        log.warning(
            "env %s for %r is unusable (%s); rebuilding it with %d recorded requirement(s)",
            record.id, key, reason, len(requirements),
        )
        if record.state != states.BROKEN:
            self.store.transition(record.id, states.BROKEN, reason)
        await self.delete_files_and_row(self.store.get(record.id))
        fresh, _ = await self._new_env(uid, key)
        if requirements:
            argv = self.uv.pip_argv(
                str(fresh.path), "install", [], requirements,
                compile_bytecode=self.config.bytecode == "per-env",
            )
            try:
                install_started = time.monotonic()
                output = await self.uv.run(argv)
                if self.bytecode is not None:  # compiled in the background: the kernel start goes on
                    await self.bytecode.after_install(fresh.id, fresh.path, output, install_started)
            except UvFailed as exc:
                self.store.transition(fresh.id, states.BROKEN, "rebuild failed: %s" % exc)
                self.record_error("rebuilding env %s for %r failed: %s" % (fresh.id, key, exc))
                raise EnvUnavailable(
                    "this notebook's env was damaged (%s) and rebuilding it from its recorded "
                    "requirements failed:\n%s" % (reason, exc)
                ) from None
            self.store.record_requirements(
                fresh.id, {_requirement_key(r): r for r in requirements}, []
            )
        return fresh

    # --- a notebook moving to another interpreter (envswitch.py) -------------------------------

    def key_lock(self, uid: int, key: EnvKey) -> asyncio.Lock:
        """The lock every kernel start for (uid, key) takes: held, no start gets that notebook's env."""
        return self._key_locks[(uid, key)]

    async def build_on(self, uid: int, python: str) -> EnvRecord:
        """A bare venv on the interpreter ``python`` for one of ``uid``'s notebooks: ``creating``
        and keyless (the notebook's key stays with its old env until the switch, so a daemon killed
        meanwhile leaves only a ``creating`` row, which recovery removes). Only ``uv venv`` and the
        kernel files: the sync that follows installs the kernel's packages with the declared ones,
        resolved for this interpreter. The caller holds a build slot; ``discard`` undoes it."""
        env_id = envid.new_env_id()
        path = self.venvs_dir / env_id
        spec = env_spec(dataclasses.replace(self.config, python=python))
        record = self.store.insert_creating(env_id, path, spec, python, owner_uid=uid)
        self.creating += 1
        try:
            await self.uv.run(self.uv.venv_argv(str(path), python))
            await asyncio.to_thread(write_kernel_files, path)
        except (UvFailed, OSError) as exc:
            half_made = await self._discard_failed_build(record)
            if _is_disk_full(exc):
                raise self._disk_full(path, half_made, exc) from None
            self.record_error("creating a venv on %s failed: %s" % (python, exc))
            raise EnvUnavailable("could not build a Python environment on %s: %s" % (python, exc)) from None
        except BaseException:
            await asyncio.shield(self._discard_failed_build(record))
            raise
        finally:
            self.creating -= 1
        return record

    def build_slot(self) -> contextlib.AbstractAsyncContextManager[BuildSlot]:
        """A build slot for a build a kernel start waits for (pool builds give way)."""
        return self._slots.for_start()

    async def discard(self, record: EnvRecord) -> None:
        """Remove an env ``build_on`` made that was never switched to."""
        await self._discard_failed_build(record)

    def remove_retired_soon(
        self, env_id: str, live_env_ids: Callable[[], set[str]], removed: Callable[[], None]
    ) -> None:
        """Remove the env in the background if it is ``retired`` and no kernel runs in it."""
        record = self.store.get(env_id)
        if record is None or record.state != states.RETIRED or env_id in live_env_ids():
            return

        async def remove() -> None:
            try:
                if await self.remove(record, lambda current: current.state == states.RETIRED
                                     and current.id not in live_env_ids()):
                    log.info("removed env %s: its notebook moved to another env and no kernel runs in it",
                             env_id)
                    removed()
            except Exception as exc:  # the next start (or gc) tries again
                self.record_error("removing retired env %s failed: %s" % (env_id, exc))

        task = asyncio.create_task(remove(), name="remove-retired")
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    # --- create / remove ------------------------------------------------------------------------

    async def create_pooled(self) -> EnvRecord:
        """Make one pool venv as background work: a clone of the template, else a uv build. Run
        it in a task of its own: a kernel start that needs its build slot may stop a uv build,
        which then raises ``BuildPreempted``."""
        cloned = await self._clone(low_priority=True)
        if cloned is not None:
            return cloned
        async with self._slots.for_pool() as slot:
            return await self._create_holding_slot(slot)

    async def _clone(
        self, owner_uid: int | None = None, key: EnvKey | None = None, low_priority: bool = False
    ) -> EnvRecord | None:
        """A new venv cloned from the spec's template, or None when there is none or it failed
        (the caller then builds with uv). Crash-safe like a build: the row is ``creating`` first."""
        template = self.templates.usable(self.spec)
        if template is None:
            return None
        env_id = envid.new_env_id()
        path = self.venvs_dir / env_id
        record = self.store.insert_creating(
            env_id, path, self.spec, self.config.python, owner_uid=owner_uid, key=key)
        started = time.monotonic()
        try:
            await self.templates.clone(template, path, low_priority)
        except (OSError, TemplateDamaged) as exc:
            half_made = await self._discard_failed_build(record)
            if _is_disk_full(exc):
                raise self._disk_full(path, half_made, exc) from None
            if not isinstance(exc, TemplateDamaged):
                self.templates.retire(template, "cloning from it failed: %s" % exc)
            return None
        except BaseException:
            await asyncio.shield(self._discard_failed_build(record))
            raise
        target = states.ASSIGNED if owner_uid is not None else states.POOLED
        record = self.store.transition(env_id, target)
        log.info("cloned %s env %s from template %s in %.2f s", target, env_id, template.path.name,
                 time.monotonic() - started)
        return record

    async def _create_holding_slot(
        self, slot: BuildSlot, owner_uid: int | None = None, key: EnvKey | None = None
    ) -> EnvRecord:
        env_id = envid.new_env_id()
        path = self.venvs_dir / env_id
        record = self.store.insert_creating(
            env_id, path, self.spec, self.config.python, owner_uid=owner_uid, key=key
        )
        started = time.monotonic()
        self.creating += 1
        try:
            install_started = time.monotonic()
            await self.uv.run(self.uv.venv_argv(str(path)), low_priority=slot.low_priority)
            write_kernel_files(path)
            output = await self.uv.run(
                self.uv.pip_argv(
                    str(path), "install", [], self.config.kernel_packages, self.config.bytecode == "per-env"),
                low_priority=slot.low_priority,
            )
            if self.bytecode is not None:
                # A pool venv is ready once what it ships has bytecode, unless a kernel start
                # needs this slot meanwhile: a kernel start never waits for a compile.
                await self.bytecode.after_install(
                    env_id, path, output, install_started,
                    wait_while=(lambda: slot.low_priority) if owner_uid is None else None)
            # Before anyone can use it: a kernel's writes must never reach the template. Only from
            # a venv whose bytecode is all linked: clones get no bytecode records of their own.
            if self.bytecode is None or not self.bytecode.links_owed(env_id):
                await self.templates.take(path, self.spec)
        except (UvFailed, OSError) as exc:
            half_made = await self._discard_failed_build(record)
            if _is_disk_full(exc):
                raise self._disk_full(path, half_made, exc) from None
            if isinstance(exc, OSError):
                raise
            self.record_error("creating a venv failed: %s" % exc)
            raise EnvUnavailable(
                "could not build a Python environment: %s\nCheck that the package index is "
                "reachable and the kernel_packages setting is valid." % exc
            ) from None
        except BaseException:
            # Cancelled (shutdown) or an unexpected error: never leave a half-made venv behind.
            await asyncio.shield(self._discard_failed_build(record))
            raise
        finally:
            self.creating -= 1
        try:
            self.venv_bytes = max(await asyncio.to_thread(lambda: scan_tree(path).unshared), 1 << 20)
        except OSError:
            pass
        target = states.ASSIGNED if owner_uid is not None else states.POOLED
        record = self.store.transition(env_id, target)
        log.info(
            "built %s env %s in %.1f s%s", target, env_id, time.monotonic() - started,
            " for %r" % (key,) if key else "",
        )
        return record

    async def _discard_failed_build(self, record: EnvRecord) -> int:
        """Remove what a failed build made; returns its size. The files go first: if the store
        cannot be written (its disk is full too) the row stays ``creating`` and the next start's
        recovery removes it."""
        size = await asyncio.to_thread(_tree_size, record.path)
        await asyncio.to_thread(shutil.rmtree, record.path, True)
        try:
            current = self.store.get(record.id)
            if current is not None:
                await self.delete_files_and_row(current)
        except StoreFull as exc:
            self.record_error(
                "env %s stays 'creating' in the store until the next start: %s" % (record.id, exc))
        return size

    def _disk_full(self, path: Path, half_made: int, exc: BaseException) -> EnvUnavailable:
        """The clear error for a build that ran out of space: which folder, how much it needs."""
        folders = [self.venvs_dir, self.config.cache_dir]
        free = {folder: _free_bytes(folder) for folder in folders}
        fullest = min(folders, key=lambda folder: free[folder])
        needed = max(self.venv_bytes, half_made)
        message = (
            "no space left on the disk of %s (%s free; a new venv needs about %s): free some space there, "
            "or remove unused envs with `uvkernelctl gc`" % (fullest, _mib(free[fullest]), _mib(needed))
        )
        self.record_error("creating a venv failed: %s" % message)
        log.debug("the build's failure: %s", exc)
        return EnvUnavailable(message)

    def disk_full(self, state_dir: Path) -> list[dict[str, object]]:
        """Folders with less free space than one venv build needs (shown by ``status``)."""
        report = []
        for folder in (state_dir, self.venvs_dir, self.config.cache_dir):
            free = _free_bytes(folder)
            needed = 4 << 20 if folder == state_dir else self.venv_bytes
            if free < needed:
                report.append({"folder": str(folder), "free_bytes": free, "needed_bytes": needed})
        return report

    async def remove(
        self, record: EnvRecord, still_removable: Callable[[EnvRecord], bool] = lambda current: True
    ) -> bool:
        """Delete an env on request; False when it is gone or no longer removable. Callers check
        ownership first. A kernel start for the same key may hold the key's lock while we wait
        for it: ``still_removable`` judges the env again once we hold it (a start that just
        got this env has made it live by then), and may raise to say why not."""
        lock = self._key_locks[(record.owner_uid, record.key)] if record.key else contextlib.nullcontext()
        async with lock:
            current = self.store.get(record.id)
            if current is None or not still_removable(current):
                return False
            await self.delete_files_and_row(current)
            return True

    async def delete_files_and_row(self, record: EnvRecord | None) -> None:
        if record is None:
            return
        if record.state != states.DELETING:
            self.store.transition(record.id, states.DELETING)
        await remove_tree(record.path)
        await asyncio.to_thread(venvsdir.remove_env_record, record.path)
        self.store.delete(record.id)

    def record_error(self, message: str) -> None:
        self.last_errors.append({"time": time.time(), "message": message})
        del self.last_errors[:-10]
        log.error("%s", message)


def _is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    if isinstance(exc, UvFailed):
        return any(marker in exc.output for marker in _ENOSPC_MARKERS)
    return False


def _free_bytes(folder: Path) -> int:
    try:
        stat = os.statvfs(folder)
    except OSError:
        return 0
    return stat.f_bavail * stat.f_frsize


def _tree_size(path: Path) -> int:
    try:
        return scan_tree(path).unshared
    except OSError:
        return 0


def _mib(count: int) -> str:
    return "%.0f MB" % (count / 1e6) if count >= 1e6 else "%.1f MB" % (count / 1e6)


def _requirement_key(requirement: str) -> str:
    return requirement_name(requirement) or requirement


def _same_file_still_at(path: str, notebook_file: str) -> bool:
    """Whether ``path`` still holds the file with this identity. A daemon that may not look
    (system mode, another user's private folder) gets False: the identity match alone decides,
    and dev, inode, size and nanosecond mtime together do not match a different file."""
    try:
        return identity_of(os.stat(path)) == notebook_file
    except OSError:
        return False


def _interpreter_ok(record: EnvRecord) -> bool:
    return _interpreter_usable(record.path)


def _interpreter_usable(venv: Path) -> bool:
    # os.access follows the bin/python symlink: a removed base interpreter fails here too.
    return os.access(venv / "bin" / "python", os.X_OK)
