"""Shared bytecode, compiled in the background: `%pip install` returns as soon as uv has installed.

What happens after an install
-----------------------------
``after_install`` runs once uv has installed into an env (a ``%pip``/shim install, a declaration's
sync, a venv build). It finds the uv cache entries that install used (uv's ``+ name==version``
lines, matched to each entry's ``*.dist-info``), queues those without bytecode (``waiting``), and
records, for this env, each entry whose ``.pyc`` it is still to get: uv linked the env's files
before those ``.pyc`` existed. Then it returns: the cell is done. Until the compile finishes, a
first import compiles in memory, as Python always does (correct, only slower once).

The compiler is one task: it compiles every waiting entry in one child process (compilework.py)
at idle priority, in ``max_parallel_compiles`` processes, and as each entry is reported done it
links that entry's ``.pyc`` into every env recorded for it (bytecode.link_bytecode), under the
env's install lock, so no link lands in the middle of a uv run on that env.

Why record entry -> envs (and not walk the venvs when a compile finishes): the install that
used an entry is the one moment the daemon knows, for free, that this env has that entry's
files; a walk would stat every file of every venv (about 10,000 each) to find the few envs that
link an entry. The records are store rows (``bytecode_links``, deleted with their env), so they
survive a crash, as does the queue.

Crash safety: queue and records live in the store. A compile a stop or crash cut short is
``compiling`` at the next start and goes back to ``waiting`` (``recover``); the child first
removes the temp files a kill mid-write left, and ``compileall`` never leaves half a ``.pyc``
under a ``.pyc`` name (compilework.py), the only names ``link_bytecode`` links.

A pool venv is ``pooled`` only once what it ships has bytecode: its build waits for its records
to be linked (``wait_while``). A kernel start never waits: an on-demand build or a rebuild queues
and goes on, and a start that needs the build slot of a pool build waiting for its bytecode
takes that venv at once (its ``.pyc`` are linked when ready, as after an install).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from . import envvars, states
from .bytecode import (
    ARCHIVE_DIR,
    distributions_in,
    has_bytecode,
    interpreter_cache_tag,
    link_bytecode,
    list_entries,
)
from .children import ChildRegistry, stop_group
from .config import Config
from .pipargs import normalize_name
from .store import BYTECODE_COMPILING, BYTECODE_DONE, BYTECODE_WAITING, Store
from .tasks import cancel_and_wait

log = logging.getLogger("uvkerneld.compilequeue")

WORKER = Path(__file__).resolve().with_name("compilework.py")
WAIT_CHECK_S = 0.1  # how often a pool build waiting for its bytecode looks whether a start needs its slot
# uv's line for a distribution it installed: " + six==1.16.0", " ~ pkg==1.0 (from file:///...)".
_INSTALLED = re.compile(r"^ [+~] ([A-Za-z0-9][A-Za-z0-9._-]*)(?:==([^\s]+))?")


def installed_distributions(output: str) -> set[tuple[str, str]]:
    """(normalized name, version or "") of each distribution uv's output says it installed."""
    found = set()
    for line in output.splitlines():
        match = _INSTALLED.match(line)
        if match:
            found.add((normalize_name(match.group(1)), match.group(2) or ""))
    return found


def compile_gate(mode: str, environ: Mapping[str, str]) -> str | None:
    """The test harness's gate file (compilework.py waits for it after the first entry), or None.
    Never on a shared host: there it would let whoever can create or delete that file decide
    when every user's bytecode is compiled, so the daemon ignores it and says so."""
    gate = environ.get(envvars.TEST_COMPILE_GATE)
    if not gate:
        return None
    if mode == "system":
        log.warning("%s is ignored in system mode (a test setting)", envvars.TEST_COMPILE_GATE)
        return None
    return gate


class CompileQueue:
    def __init__(self, config: Config, store: Store, children: ChildRegistry | None = None) -> None:
        self.archive = config.cache_dir / ARCHIVE_DIR
        self.python = config.python
        self.workers = config.max_parallel_compiles
        self.gate = compile_gate(config.mode, os.environ)
        self.compiling = 0  # entries of the running compile not reported done yet
        self._store = store
        self._children = children
        self._dists: dict[str, frozenset[tuple[str, str]]] = {}  # entry -> what it holds; never changes
        self._done_at: dict[str, float] = {}  # entry -> time.monotonic() this daemon compiled it
        self._cache_tag: str | None = None
        self._wake = asyncio.Event()
        self._linked = asyncio.Condition()  # notified when an env got its links (pool builds wait)
        self._linking: dict[str, asyncio.Task[None]] = {}
        self._env_lock: Callable[[str], asyncio.Lock] = lambda env_id: asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    # --- start and stop -------------------------------------------------------------------------

    async def recover(self) -> None:
        """At start-up: a compile cut short is redone; entries gone from the cache are forgotten."""
        interrupted = self._store.bytecode_interrupted()
        if interrupted:
            log.warning("compiling bytecode for %d cache entr%s was interrupted: compiling again",
                        len(interrupted), "y" if len(interrupted) == 1 else "ies")
        self._cache_tag = await interpreter_cache_tag(self.python)  # here, not in an install's reply
        present = set(await asyncio.to_thread(list_entries, self.archive))
        gone = [entry for entry in self._store.bytecode_entries() if entry not in present]
        if gone:
            self._store.bytecode_forget(gone)

    def start(self, env_lock: Callable[[str], asyncio.Lock]) -> None:
        """``env_lock``: an env's install lock (installs.InstallManager.env_lock)."""
        self._env_lock = env_lock
        self._task = asyncio.create_task(self._run(), name="bytecode-compiler")
        self._wake.set()  # what an earlier run left waiting, and links it still owed

    async def stop(self) -> None:
        """Stop compiling (the child with its workers) and linking; the store keeps what is left."""
        await cancel_and_wait(self._task)
        for task in list(self._linking.values()):
            await cancel_and_wait(task)

    def status(self) -> dict[str, Any]:
        counts = self._store.bytecode_counts()
        return {**counts, "workers": self.workers}

    def links_owed(self, env_id: str) -> bool:
        """Whether ``env_id`` still has bytecode to get (a template is never taken from it then)."""
        return bool(self._store.bytecode_links_left(env_id))

    def busy(self) -> bool:
        counts = self._store.bytecode_counts()
        return bool(counts[BYTECODE_WAITING] or counts[BYTECODE_COMPILING] or counts["envs_to_link"])

    # --- after an install -----------------------------------------------------------------------

    async def after_install(
        self, env_id: str | None, venv: Path, output: str, since: float,
        wait_while: Callable[[], bool] | None = None,
    ) -> int:
        """uv installed into ``venv`` (row ``env_id``; its run began at ``since``, a
        ``time.monotonic()``) and printed ``output``: queue what it used that has no bytecode,
        record what this env is to get. ``wait_while``: return only once the env has it, or once
        this says False (a pool build: a kernel start now waits for its build slot, and a kernel
        start never waits for a compile). Returns how many entries were queued."""
        began = time.monotonic()
        installed = installed_distributions(output)
        if installed:
            used = await asyncio.to_thread(self._entries_holding, installed)
        else:
            # uv said nothing (`pip install -q`): every entry the queue has not seen yet may be
            # one this install unpacked; linking finds no match in an env that lacks it.
            listed = await asyncio.to_thread(list_entries, self.archive)
            seen = self._store.bytecode_states(listed)
            used = sorted(entry for entry in listed if entry not in seen)
            if not used:
                return 0
        known = self._store.bytecode_states(used)
        unknown = [entry for entry in used if entry not in known]
        ready: set[str] = set()
        if unknown:
            if self._cache_tag is None:
                self._cache_tag = await interpreter_cache_tag(self.python)
            tag = self._cache_tag
            # A full walk of a large entry that has no bytecode yet (tens of ms for pandas), in
            # the install's reply: the price of knowing for sure.
            ready = set(await asyncio.to_thread(
                lambda: [entry for entry in unknown if has_bytecode(self.archive / entry, tag)]))
        # Read again with no await before the write: the compiler may have moved on meanwhile.
        known = self._store.bytecode_states(used)
        new = {entry: BYTECODE_DONE if entry in ready else BYTECODE_WAITING
               for entry in unknown if entry not in known}
        state_of = {**known, **new}
        # An entry compiled before this install began had its .pyc linked by uv with its sources.
        link = [entry for entry in used
                if state_of[entry] != BYTECODE_DONE or self._done_at.get(entry, -math.inf) >= since]
        self._store.bytecode_enqueue(env_id, new, link if env_id is not None else [])
        queued = sum(1 for state in new.values() if state == BYTECODE_WAITING)
        log.debug("bytecode: %d cache entr%s used, %d new to the queue, %d to link (%.1f ms)", len(used),
                  "y" if len(used) == 1 else "ies", queued, len(link), (time.monotonic() - began) * 1000)
        if link:
            self._wake.set()
        if wait_while is not None and link and env_id is not None:
            async with self._linked:
                while wait_while() and self._store.bytecode_links_left(env_id):
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._linked.wait(), WAIT_CHECK_S)
        return queued

    def _entries_holding(self, installed: set[tuple[str, str]]) -> list[str]:
        """The cache entries holding these distributions (in a worker thread). A version uv wrote
        differently from the wheel's dist-info falls back to every entry of that project."""
        for entry in list_entries(self.archive):
            if entry not in self._dists:
                self._dists[entry] = distributions_in(self.archive / entry)
        by_name: dict[str, list[str]] = {}
        exact: dict[tuple[str, str], list[str]] = {}
        for entry, held in list(self._dists.items()):
            for name, version in held:
                by_name.setdefault(name, []).append(entry)
                exact.setdefault((name, version), []).append(entry)
        used: set[str] = set()
        for name, version in installed:
            used.update(exact.get((name, version)) or by_name.get(name, []))
        return sorted(used)

    # --- the compiler ---------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            self._link_ready()
            batch = self._store.bytecode_waiting()
            if batch:
                try:
                    await self._compile(batch)
                except OSError as exc:  # the interpreter cannot be run: not retried, no spinning
                    log.error("cannot compile bytecode with %s: %s; modules compile at import instead",
                              self.python, exc)
                    self._finished(batch)
                    self.compiling = 0
                self._wake.set()  # entries queued while this batch compiled

    async def _compile(self, batch: list[str]) -> None:
        self._store.bytecode_set_state(batch, BYTECODE_COMPILING)
        self.compiling = len(batch)
        started = time.monotonic()
        log.info("compiling bytecode for %d cache entr%s in the background (%d worker(s))",
                 len(batch), "y" if len(batch) == 1 else "ies", self.workers)
        argv = [self.python, "-I", "-S", str(WORKER), str(os.getpid()), str(self.workers), self.gate or "-",
                *[str(self.archive / entry) for entry in batch]]
        process = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, cwd="/",
            start_new_session=True,  # so a stop ends its worker processes too
        )
        if self._children is not None:
            self._children.add(process.pid)
        waiting = set(batch)
        other: list[str] = []
        try:
            assert process.stdout is not None
            async for raw in process.stdout:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                entry = line[len("done "):] if line.startswith("done ") else None
                if entry in waiting:
                    assert entry is not None
                    waiting.discard(entry)
                    self._finished([entry])
                else:
                    other = [*other, line][-5:]
            returncode = await process.wait()
        except BaseException:
            await stop_group(process, what="the bytecode compiler")  # its workers too
            raise
        finally:
            self.compiling = 0
            if self._children is not None:
                self._children.discard(process.pid)
        if waiting:
            # Not retried: whatever stopped it would stop it again. Their modules compile at
            # import, as without shared bytecode.
            log.warning("the bytecode compiler exited with status %s before compiling %d entr%s: %s",
                        returncode, len(waiting), "y" if len(waiting) == 1 else "ies", " | ".join(other))
            self._finished(sorted(waiting))
        log.info("compiled bytecode for %d cache entr%s in %.1f s", len(batch),
                 "y" if len(batch) == 1 else "ies", time.monotonic() - started)

    def _finished(self, entries: list[str]) -> None:
        self._store.bytecode_set_state(entries, BYTECODE_DONE)
        now = time.monotonic()
        for entry in entries:
            self._done_at[entry] = now
        self._link_ready()

    # --- linking --------------------------------------------------------------------------------

    def _link_ready(self) -> None:
        for env_id in self._store.bytecode_links_ready():
            if env_id not in self._linking:
                self._linking[env_id] = asyncio.create_task(self._link_env(env_id), name="bytecode-link")

    async def _link_env(self, env_id: str) -> None:
        try:
            async with self._env_lock(env_id):
                while True:
                    entries = self._store.bytecode_links_ready(env_id).get(env_id)
                    if not entries:
                        break
                    record = self._store.get(env_id)
                    if record is not None and record.state != states.DELETING:
                        paths = [self.archive / entry for entry in entries]
                        try:
                            linked = await asyncio.to_thread(link_bytecode, paths, record.path)
                            log.info("linked %d .pyc of %d cache entr%s into %s", linked, len(entries),
                                     "y" if len(entries) == 1 else "ies", record.id)
                        except OSError as exc:  # the env is being removed, or a disk error
                            log.warning("linking bytecode into %s failed: %s", env_id, exc)
                    self._store.bytecode_linked(env_id, entries)
        finally:
            self._linking.pop(env_id, None)
            async with self._linked:
                self._linked.notify_all()
