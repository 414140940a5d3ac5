"""Garbage collection (uvkerneld/gc.py): its rules on real store records and real files, with no
daemon; then scheduled gc in a real daemon. ``uvkernelctl gc`` runs against one in test_ctl.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import Daemon, Layout, wait_until

from uvkerneld import gc, protocol, states
from uvkerneld.protocol import EnvKey
from uvkerneld.store import EnvRecord, Store

DAY = 86400.0
OWNER, OTHER = 1000, 1001


class Envs:
    """A real store in a temporary folder, with env records made as the daemon makes them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.store = Store(root / "state.db")
        self.count = 0

    def add(self, key: EnvKey | None, owner: int | None = OWNER, state: str = states.ASSIGNED,
            days_unused: float = 0.0) -> EnvRecord:
        self.count += 1
        env_id = "e-%012x" % self.count
        path = self.root / "venvs" / env_id
        (path / "bin").mkdir(parents=True)
        self.store.insert_creating(env_id, path, "spec", sys.executable, owner_uid=owner, key=key)
        for step in {
            states.CREATING: [], states.POOLED: [states.POOLED], states.ASSIGNED: [states.ASSIGNED],
            states.INSTALLING: [states.ASSIGNED, states.INSTALLING], states.BROKEN: [states.BROKEN],
            states.DELETING: [states.DELETING],
        }[state]:
            self.store.transition(env_id, step)
        if days_unused:
            # As if last used that long ago (test_ctl.py ages envs of a running daemon the same way).
            with contextlib.closing(sqlite3.connect(self.root / "state.db")) as db, db:
                db.execute("UPDATE envs SET last_used_at=? WHERE id=?",
                           (time.time() - days_unused * DAY, env_id))
        record = self.store.get(env_id)
        assert record is not None
        return record


@pytest.fixture
def envs(tmp_path: Path) -> Iterator[Envs]:
    made = Envs(tmp_path)
    yield made
    made.store.close()


def reasons(planned: list[gc.Planned]) -> dict[str, tuple[str, bool]]:
    return {entry.record.id: (entry.reason, entry.live) for entry in planned}


def test_old_and_orphaned_envs_are_planned_with_their_reason_and_nothing_else(envs: Envs) -> None:
    old = envs.add(EnvKey("env", "old"), days_unused=40)
    recent = envs.add(EnvKey("env", "recent"), days_unused=2)
    orphan = envs.add(EnvKey("notebook", "/home/u/gone.ipynb"))
    old_orphan = envs.add(EnvKey("dir", "/home/u/gone"), days_unused=90)
    pooled = envs.add(None, owner=None, state=states.POOLED, days_unused=90)
    broken = envs.add(EnvKey("env", "broken"), state=states.BROKEN, days_unused=31)
    records = envs.store.all()
    planned = gc.plan(records, time.time(), gc.Policy(30 * DAY, uid=None), set(), {orphan.id, old_orphan.id})
    assert reasons(planned) == {
        old.id: ("unused for 40d", False),
        orphan.id: (gc.ORPHANED, False),
        old_orphan.id: (gc.ORPHANED, False),  # orphaned says more than old
        broken.id: ("unused for 31d", False),
    }
    assert recent.id not in reasons(planned) and pooled.id not in reasons(planned)
    # In the store's order, as collect goes through them.
    assert [entry.record.id for entry in planned] == [old.id, orphan.id, old_orphan.id, broken.id]


def test_age_is_measured_from_the_last_use_and_the_unit_is_the_largest_that_fits(envs: Envs) -> None:
    env = envs.add(EnvKey("env", "e"))
    now = env.last_used_at
    for unused, text in ((0, "0s"), (59, "59s"), (3600 * 5 + 7, "5h"), (DAY * 3 + 3600, "3d"), (90, "1m")):
        planned = gc.judge(env, now + unused, gc.Policy(0, uid=None), set(), set())
        assert planned is not None and planned.reason == "unused for %s" % text
    # Not yet older than the limit: kept.
    assert gc.judge(env, now + 29 * DAY, gc.Policy(30 * DAY, uid=None), set(), set()) is None
    assert gc.judge(env, now + 30 * DAY, gc.Policy(30 * DAY, uid=None), set(), set()) is not None


def test_without_an_age_limit_only_orphans_are_garbage(envs: Envs) -> None:
    old = envs.add(EnvKey("env", "old"), days_unused=400)
    orphan = envs.add(EnvKey("notebook", "/home/u/gone.ipynb"))
    planned = gc.plan(envs.store.all(), time.time(), gc.Policy(None, uid=None), set(), {orphan.id})
    assert reasons(planned) == {orphan.id: (gc.ORPHANED, False)}
    assert old.id not in reasons(planned)


def test_busy_and_ownerless_envs_are_never_garbage(envs: Envs) -> None:
    busy = [envs.add(EnvKey("env", state), state=state, days_unused=100)
            for state in (states.CREATING, states.INSTALLING, states.DELETING)]
    ownerless = envs.add(None, owner=None, state=states.POOLED, days_unused=100)
    every_id = {record.id for record in busy} | {ownerless.id}
    assert gc.plan(envs.store.all(), time.time(), gc.Policy(0, uid=None), set(), every_id) == []


def test_a_user_collects_only_their_own_envs(envs: Envs) -> None:
    mine = envs.add(EnvKey("env", "mine"), owner=OWNER, days_unused=40)
    theirs = envs.add(EnvKey("env", "theirs"), owner=OTHER, days_unused=40)
    theirs_orphan = envs.add(EnvKey("notebook", "/home/o/gone.ipynb"), owner=OTHER)
    orphans = {theirs_orphan.id}
    own = gc.plan(envs.store.all(), time.time(), gc.Policy(30 * DAY, uid=OWNER), set(), orphans)
    assert list(reasons(own)) == [mine.id]
    every = gc.plan(envs.store.all(), time.time(), gc.Policy(30 * DAY, uid=None), set(), orphans)
    assert list(reasons(every)) == [mine.id, theirs.id, theirs_orphan.id]


def test_an_env_with_a_live_kernel_is_planned_as_kept(envs: Envs) -> None:
    live = envs.add(EnvKey("env", "live"), days_unused=40)
    idle = envs.add(EnvKey("env", "idle"), days_unused=40)
    planned = gc.plan(envs.store.all(), time.time(), gc.Policy(30 * DAY, uid=None), {live.id}, set())
    assert reasons(planned) == {live.id: ("unused for 40d", True), idle.id: ("unused for 40d", False)}


def test_judging_an_env_that_is_gone_says_not_garbage() -> None:
    assert gc.judge(None, time.time(), gc.Policy(0, uid=None), set(), set()) is None


def notebook(path: Path) -> str:
    path.write_text('{"cells": []}')
    return protocol.identity_of(path.stat())


def test_missing_notebooks_and_folders_are_orphans_unless_the_notebook_was_renamed(tmp_path: Path) -> None:
    # Every file exists before any is deleted: a new file could reuse a deleted one's inode.
    present = tmp_path / "present.ipynb"
    present_file = notebook(present)
    deleted = tmp_path / "deleted.ipynb"
    deleted_file = notebook(deleted)
    renamed = tmp_path / "old name.ipynb"
    renamed_file = notebook(renamed)
    copied = tmp_path / "copied.ipynb"
    copied_file = notebook(copied)
    (tmp_path / "copy of copied.ipynb").write_bytes(copied.read_bytes())  # another inode
    deleted.unlink()
    renamed.rename(tmp_path / "new name.ipynb")
    copied.unlink()
    folder = tmp_path / "scratch"
    folder.mkdir()
    gone_folder = tmp_path / "gone"
    orphans, moved = gc.find_orphans([
        ("e-000000000001", "notebook", str(present), present_file),
        ("e-000000000002", "notebook", str(deleted), deleted_file),
        ("e-000000000003", "notebook", str(renamed), renamed_file),
        ("e-000000000004", "notebook", str(copied), copied_file),
        ("e-000000000005", "notebook", str(tmp_path / "never saved.ipynb"), None),
        ("e-000000000006", "dir", str(folder), None),
        ("e-000000000007", "dir", str(gone_folder), None),
        ("e-000000000008", "env", "named", None),
    ])
    assert orphans == ["e-000000000002", "e-000000000004", "e-000000000005", "e-000000000007"]
    assert moved == {"e-000000000003": str(tmp_path / "new name.ipynb")}


def test_a_notebook_is_recognised_only_in_its_own_folder_and_only_as_a_notebook(tmp_path: Path) -> None:
    original = tmp_path / "a.ipynb"
    identity = notebook(original)
    elsewhere = tmp_path / "sub"
    elsewhere.mkdir()
    original.rename(elsewhere / "a.ipynb")
    assert gc.renamed_notebook(str(original), identity) is None  # moved to another folder: not followed
    (elsewhere / "a.ipynb").rename(original.with_suffix(".txt"))
    assert gc.renamed_notebook(str(original), identity) is None  # not a notebook any more
    original.with_suffix(".txt").rename(tmp_path / "b.ipynb")
    assert gc.renamed_notebook(str(original), identity) == str(tmp_path / "b.ipynb")
    # Saving changes size and mtime, never the inode: still the same notebook.
    (tmp_path / "b.ipynb").write_text('{"cells": [1]}')
    assert gc.renamed_notebook(str(original), identity) == str(tmp_path / "b.ipynb")
    assert gc.renamed_notebook(str(tmp_path / "missing-folder" / "a.ipynb"), identity) is None
    assert os.path.exists(tmp_path / "b.ipynb")


def test_scheduled_gc_keeps_a_notebook_renamed_while_no_daemon_watched(layout: Layout) -> None:
    kept, gone = layout.notebook("kept.ipynb"), layout.notebook("gone.ipynb")
    first = Daemon(layout, "--pool-size", "0").start()
    try:
        envs = {notebook: layout.request("acquire", {
            "key": {"kind": "notebook", "value": str(notebook)},
            "file": protocol.file_identity(notebook.stat()),
        }, timeout=300)["path"] for notebook in (kept, gone)}
        # Each acquire's connection counted as a kernel until the daemon saw it close; one still
        # open at shutdown would be recorded as a kernel that outlives the daemon.
        wait_until(lambda: layout.status()["envs"]["live"] == 0, 30, "the acquire connections to close")
    finally:
        assert first.stop() == 0
    kept.rename(layout.notebooks / "renamed.ipynb")  # no daemon saw this: only the file's inode tells
    gone.unlink()
    second = Daemon(layout, "--pool-size", "0", env=dict(layout.env, UVKERNELD_GC_INTERVAL="1s")).start()
    try:
        wait_until(lambda: not os.path.exists(envs[gone]), 120, "scheduled gc to remove the orphan's env")
        second.wait_for_log("scheduled gc removed")  # the run that removed it has judged every env
        rows = {row["path"]: row for row in layout.request("list", {"all": False})["envs"]}
        assert set(rows) == {envs[kept]} and os.path.isdir(envs[kept])
        assert rows[envs[kept]]["key"] == {"kind": "notebook", "value": str(kept)}  # moves at its next start
    finally:
        assert second.stop() == 0


def test_an_env_a_kernel_start_took_while_removal_waited_for_its_lock_is_kept(envs: Envs) -> None:
    """gc and rm judge an env, then wait for its key's lock, which a kernel start may hold; the
    start hands the env out and makes it live before the removal gets the lock."""
    from uvkerneld.buildslots import BuildSlots
    from uvkerneld.config import load_config
    from uvkerneld.envs import EnvManager
    from uvkerneld.uv import Uv

    key = EnvKey("notebook", "/home/u/old.ipynb")
    record = envs.add(key, days_unused=40)
    policy = gc.Policy(30 * DAY, uid=None)
    config = load_config({"state_dir": str(envs.root), "venvs_dir": str(envs.root / "venvs"),
                          "cache_dir": str(envs.root / "cache")}, {})
    live: set[str] = set()

    async def scenario() -> tuple[bool, bool]:
        manager = EnvManager(config, envs.store, Uv("uv", str(config.cache_dir), "hardlink", sys.executable),
                             BuildSlots(1, lambda: (0, 0)), refill_pool=lambda: None)
        assert gc.judge(envs.store.get(record.id), time.time(), policy, live, set()) is not None
        lock = manager._key_locks[(OWNER, key)]
        await lock.acquire()  # a kernel start for this notebook is under way
        removal = asyncio.create_task(manager.remove(record, lambda current: gc._still_garbage(
            current, time.time(), policy, live, set())))
        await asyncio.sleep(0)  # the removal now waits for the lock
        live.add(record.id)  # the start handed the env out: its lifeline is registered
        lock.release()
        kept = not await removal
        # Without a start in the way, the same call removes it.
        live.clear()
        removed = await manager.remove(record, lambda current: gc._still_garbage(
            current, time.time(), policy, live, set()))
        return kept, removed

    kept, removed = asyncio.run(scenario())
    assert kept and removed
    assert envs.store.get(record.id) is None and not record.path.exists()


def test_a_moved_notebooks_old_env_is_retired_in_one_step_and_garbage_once_no_kernel_runs_in_it(
    envs: Envs,
) -> None:
    """Store.switch_env (envswitch.py): the key, file identity and records go to the new env and
    the old one is retired, keyless, with the why; gc then takes it at any age, unless live."""
    key = EnvKey("notebook", "/home/u/nb.ipynb")
    old = envs.add(key)
    envs.store.set_notebook_file(old.id, "1:2:3:4")
    new = envs.add(None, state=states.CREATING)
    with pytest.raises(states.IllegalTransition):  # only a built env takes the notebook over
        envs.store.switch_env(new.id, old.id, "x", "d" * 64, [], {})
    assert envs.store.find(OWNER, key).id == old.id
    moved = envs.store.switch_env(old.id, new.id, "replaced by env %s" % new.id, "d" * 64, ["toolz"],
                                  {"toolz": "toolz", "tabulate": "tabulate"})
    retired = envs.store.get(old.id)
    assert (moved.id, moved.key, moved.state) == (new.id, key, states.ASSIGNED)
    assert moved.notebook_file == "1:2:3:4" and envs.store.requirements(new.id) == ["tabulate", "toolz"]
    assert envs.store.find(OWNER, key).id == new.id
    assert (retired.key, retired.state, retired.owner_uid) == (None, states.RETIRED, OWNER)
    records = envs.root / "venvs" / ".records"
    assert json.loads((records / (old.id + ".json")).read_text())["retired"] is True
    assert json.loads((records / (new.id + ".json")).read_text())["key"] == [key.kind, key.value]
    planned = gc.plan(envs.store.all(), time.time(), gc.Policy(None, uid=None), set(), set())
    assert reasons(planned) == {old.id: ("replaced by env %s" % new.id, False)}
    assert reasons(gc.plan(envs.store.all(), time.time(), gc.Policy(None, uid=None), {old.id}, set())) == {
        old.id: ("replaced by env %s" % new.id, True)}
