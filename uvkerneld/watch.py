"""Follow notebooks across renames and saves while the daemon runs (user mode), with watchfiles.

Why
---
An env belongs to a notebook path. Rename ``a.ipynb`` to ``b.ipynb`` in JupyterLab and, at the
next kernel restart, jupyter_server passes the new path: without help the notebook would get a
fresh env and lose what was installed into it. Every env keyed by a notebook therefore stores the
notebook file's identity (dev, inode, size, mtime_ns; see ``protocol.parse_file_identity``), and a
notebook unknown under its path but carrying a stored identity is the same notebook, moved.

The stub sends the identity at every kernel start, but a notebook is saved many times after
that, and each save changes its size and mtime. This watcher keeps the stored identity current on
every save, and re-keys an env as soon as its notebook is renamed inside a watched folder (a
rename shows up as deleted + added, never as a pair; the identity pairs them). A move to a folder
nobody watches is caught at the next kernel start by the same identity.

It watches, non-recursively, the folders holding notebooks that have an env. A system daemon
cannot read users' folders and runs no watcher; there each kernel reports its own notebook's
saves instead (``notebook_saved``, from kernel_extension.py; README, "Renaming notebooks").
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterable

from watchfiles import Change, awatch

from . import states
from .envs import EnvManager
from .protocol import EnvKey, identity_of
from .store import Store
from .tasks import cancel_and_wait

log = logging.getLogger("uvkerneld.watch")
# watchfiles logs a line per second of quiet at debug level; our --log-level debug should not.
logging.getLogger("watchfiles").setLevel(logging.INFO)

RETRY_DELAY = 5.0  # after the watch failed (a watched folder vanished, inotify limits), doubling
MAX_RETRY_DELAY = 600.0


def _is_notebook(change: Change, path: str) -> bool:
    name = os.path.basename(path)
    # ".~name.ipynb" is jupyter_server's backup copy during a save, not a notebook.
    return name.endswith(".ipynb") and not name.startswith(".~")


def _existing_folders(folders: Iterable[str]) -> list[str]:
    return sorted(folder for folder in folders if os.path.isdir(folder))


def _identity_and_real_path(path: str) -> tuple[str, str] | None:
    try:
        identity = identity_of(os.stat(path))
    except OSError:
        return None
    return identity, os.path.realpath(path)


class NotebookFolders:
    """The folders to watch. Made before EnvManager and the watcher, and given to both: EnvManager
    reports each kernel start's notebook (``notebook_seen``), the watcher watches the folders."""

    def __init__(self) -> None:
        self.paths: set[str] = set()
        self.changed = asyncio.Event()  # set when a folder was added (or the watcher stops)

    def notebook_seen(self, path: str) -> None:
        """A kernel starts for this notebook: watch its folder from now on."""
        folder = os.path.dirname(path)
        if folder not in self.paths:
            self.paths.add(folder)
            self.changed.set()


class NotebookWatcher:
    def __init__(self, envs: EnvManager, store: Store, folders: NotebookFolders, uid: int) -> None:
        self.envs = envs
        self.store = store
        self.uid = uid
        self._folders = folders
        self.renames_followed = 0
        self._task: asyncio.Task[None] | None = None

    @property
    def folders(self) -> set[str]:
        return self._folders.paths

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="notebook-watcher")

    async def stop(self) -> None:
        self._folders.changed.set()
        await cancel_and_wait(self._task)

    async def _add_tracked_folders(self) -> None:
        # Every env's row: read off the loop (Store.scan), which runs this at each new folder.
        for record in await self.store.scan():
            if (record.key and record.key.kind == "notebook"
                    and record.state in states.SETTLED_NOTEBOOK_STATES):
                self._folders.paths.add(os.path.dirname(record.key.value))

    async def _run(self) -> None:
        delay = RETRY_DELAY
        restart = self._folders.changed
        while True:
            await self._add_tracked_folders()
            folders = list(self.folders)
            # Cleared before the check runs off the loop: a folder added meanwhile sets it again.
            restart.clear()
            # A stat per folder, and home folders may be on a network filesystem: not on the loop.
            existing = await asyncio.to_thread(_existing_folders, folders)
            if not existing:
                await restart.wait()
                continue
            log.debug("watching %d notebook folder(s)", len(existing))
            try:
                # rust_timeout: return to check the stop event at least every second.
                async for changes in awatch(
                    *existing, watch_filter=_is_notebook, stop_event=restart, recursive=False,
                    debounce=200, step=50, rust_timeout=1000, ignore_permission_denied=True,
                ):
                    await self.handle(changes)
                    delay = RETRY_DELAY
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a failed watch must not take the daemon down
                log.warning("notebook watch failed (%s); retrying in %.0f s", exc, delay)
                try:
                    await asyncio.wait_for(restart.wait(), delay)
                except asyncio.TimeoutError:
                    pass
                delay = min(delay * 2, MAX_RETRY_DELAY)

    async def handle(self, changes: Iterable[tuple[Change, str]]) -> None:
        """One batch of events: refresh identities of saved notebooks, pair renames."""
        deleted = tuple(sorted(path for change, path in changes if change == Change.deleted))
        for change, path in sorted(changes, key=lambda item: item[1]):
            if change == Change.deleted:
                continue  # the env stays keyed by the old path until its notebook shows up again
            found = await asyncio.to_thread(_identity_and_real_path, path)
            if found is None:
                continue  # gone again already (a temporary file, a quick second rename)
            identity, real_path = found
            key = EnvKey("notebook", real_path)
            record = self.store.find(self.uid, key)
            if record is not None:
                if record.notebook_file != identity:
                    self.store.set_notebook_file(record.id, identity)
                continue
            moved = await self.envs.follow_rename(self.uid, key, identity, deleted)
            if moved is not None:
                self.renames_followed += 1
                self._folders.notebook_seen(key.value)
