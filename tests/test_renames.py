"""A renamed or moved notebook keeps its env: packages installed before the rename are there after
the next kernel restart. Driven through a real jupyter_server the way JupyterLab does it (rename
the file, PATCH the session, restart the kernel), and through the stub for the daemon-down case.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import pytest
from helpers import Daemon, Layout, ctl, run_code, running_kernel, wait_until
from jupyter_rest import JupyterServer, kernel_facts, run_in_kernel

from uvkerneld import protocol

EMPTY_NOTEBOOK = {"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}


def save_notebook(server: JupyterServer, path: str, cells: int = 0) -> None:
    """Save through the contents API, as JupyterLab's save (and autosave) does."""
    content = dict(EMPTY_NOTEBOOK, cells=[
        {"cell_type": "code", "source": "x = %d" % index, "metadata": {}, "outputs": [],
         "execution_count": None, "id": "cell-%d" % index}
        for index in range(cells)
    ])
    server.api("PUT", "/api/contents/" + path, {"type": "notebook", "format": "json", "content": content})


def env_keyed(layout: Layout, path: str) -> dict[str, Any] | None:
    for env in layout.request("list", {"all": True})["envs"]:
        if env["key"] == {"kind": "notebook", "value": path}:
            return env
    return None


def rename_in_jupyterlab(server: JupyterServer, session: dict[str, Any], new_path: str) -> None:
    """What JupyterLab does on a rename: move the file, then point the session at it."""
    server.api("PATCH", "/api/contents/" + session["path"], {"path": new_path})
    server.api("PATCH", "/api/sessions/" + session["id"],
               {"path": new_path, "name": os.path.basename(new_path)})
    session["path"] = new_path


@pytest.mark.slow
def test_renamed_and_moved_notebooks_keep_their_env_through_jupyter_server(
    daemon: Daemon, layout: Layout, server: JupyterServer
) -> None:
    (layout.notebooks / "proj").mkdir()
    (layout.notebooks / "elsewhere").mkdir()
    save_notebook(server, "proj/a.ipynb")
    session = server.api("POST", "/api/sessions", {
        "path": "proj/a.ipynb", "name": "a.ipynb", "type": "notebook", "kernel": {"name": "uv"},
    })
    kernel_id = session["kernel"]["id"]
    before = kernel_facts(server, kernel_id)
    installed = run_in_kernel(server, kernel_id,
                              "%pip install -q six==1.16.0\nimport six; print(six.__version__)", timeout=240)
    assert installed.strip().splitlines()[-1] == "1.16.0"
    # Saves after the kernel started change the file's size and mtime: the watcher keeps up.
    save_notebook(server, "proj/a.ipynb", cells=3)
    save_notebook(server, "proj/a.ipynb", cells=5)

    # 1. Renamed in its folder: the watcher re-keys the env right away, before any restart.
    rename_in_jupyterlab(server, session, "proj/b.ipynb")
    renamed = str(layout.notebooks / "proj" / "b.ipynb")
    try:
        env = wait_until(lambda: env_keyed(layout, renamed), 30, "the env to follow the rename")
    except AssertionError:
        print(daemon.log)
        raise
    assert env["path"] == before["prefix"]
    assert env_keyed(layout, str(layout.notebooks / "proj" / "a.ipynb")) is None
    assert layout.status()["notebook_watch"]["renames_followed"] == 1
    server.api("POST", "/api/kernels/%s/restart" % kernel_id)
    after = kernel_facts(server, kernel_id)
    assert after["session"] == renamed  # jupyter_server passes the new path at restart
    assert after["prefix"] == before["prefix"]
    assert run_in_kernel(server, kernel_id, "import six; print(six.__version__)").strip() == "1.16.0"

    # 2. Saved, then moved to a folder nobody watches: recognised at the restart by its identity.
    save_notebook(server, "proj/b.ipynb", cells=2)
    wait_until(lambda: _identity_recorded(layout, renamed), 30, "the save to be seen")
    rename_in_jupyterlab(server, session, "elsewhere/c.ipynb")
    server.api("POST", "/api/kernels/%s/restart" % kernel_id)
    moved = kernel_facts(server, kernel_id)
    assert moved["session"] == str(layout.notebooks / "elsewhere" / "c.ipynb")
    assert moved["prefix"] == before["prefix"]
    assert layout.status()["kernels_started"]["renamed"] == 1  # followed at the start, by its identity

    # 3. A copy (JupyterLab's "Duplicate") is another notebook: it gets its own env.
    copy = server.api("POST", "/api/contents/elsewhere", {"copy_from": "elsewhere/c.ipynb"})
    copy_session = server.api("POST", "/api/sessions", {
        "path": copy["path"], "name": copy["name"], "type": "notebook", "kernel": {"name": "uv"},
    })
    copy_facts = kernel_facts(server, copy_session["kernel"]["id"])
    assert copy_facts["prefix"] != before["prefix"]
    assert env_keyed(layout, moved["session"])["path"] == before["prefix"]


def _identity_recorded(layout: Layout, path: str) -> bool:
    """Whether the daemon's stored identity of this notebook matches the file as it is now."""
    current = protocol.identity_of(os.stat(path))
    return layout.request("show", {"key": {"kind": "notebook", "value": path}})["notebook_file"] == current


def test_a_notebook_renamed_while_the_daemon_was_down_keeps_its_env(layout: Layout, kernelspec: str) -> None:
    old = layout.notebook("draft.ipynb")
    old.write_text(json.dumps(EMPTY_NOTEBOOK))
    daemon = Daemon(layout, "--pool-size", "1").start()
    try:
        with running_kernel(layout, kernelspec, JPY_SESSION_NAME=str(old)) as (_, kernel):
            prefix = run_code(kernel, "import sys; print(sys.prefix)").strip()
    finally:
        assert daemon.stop() == 0
    new = layout.notebooks / "final.ipynb"
    os.rename(old, new)
    daemon = Daemon(layout, "--pool-size", "1").start()
    try:
        with running_kernel(layout, kernelspec, JPY_SESSION_NAME=str(new)) as (_, kernel):
            assert run_code(kernel, "import sys; print(sys.prefix)").strip() == prefix
        assert layout.status()["kernels_started"]["renamed"] == 1
    finally:
        daemon.stop()


def test_a_hard_link_to_a_notebook_gets_its_own_env(daemon: Daemon, layout: Layout, kernelspec: str) -> None:
    original = layout.notebook("original.ipynb")
    original.write_text(json.dumps(EMPTY_NOTEBOOK))
    with running_kernel(layout, kernelspec, JPY_SESSION_NAME=str(original)) as (_, kernel):
        original_prefix = run_code(kernel, "import sys; print(sys.prefix)").strip()
    link = layout.notebooks / "linked.ipynb"
    os.link(original, link)  # same inode, size and mtime, but the original name still exists
    with running_kernel(layout, kernelspec, JPY_SESSION_NAME=str(link)) as (_, kernel):
        assert run_code(kernel, "import sys; print(sys.prefix)").strip() != original_prefix
    assert env_keyed(layout, str(original))["path"] == original_prefix


def acquire_notebook(layout: Layout, path: str) -> dict[str, Any]:
    """What the stub sends for a notebook: its path and its file identity."""
    identity = protocol.file_identity(os.stat(path))
    return layout.request("acquire", {"key": {"kind": "notebook", "value": path}, "file": identity},
                          timeout=300)


def test_renames_are_still_followed_after_a_watched_folder_is_deleted(
    bare_daemon: Daemon, layout: Layout
) -> None:
    doomed = layout.notebook("doomed/x.ipynb")
    doomed.write_text(json.dumps(EMPTY_NOTEBOOK))
    acquire_notebook(layout, str(doomed))
    kept = layout.notebook("kept/y.ipynb")
    kept.write_text(json.dumps(EMPTY_NOTEBOOK))
    env = acquire_notebook(layout, str(kept))
    wait_until(lambda: layout.status()["notebook_watch"]["folders"] == 2, 30, "both folders to be watched")
    shutil.rmtree(doomed.parent)
    os.rename(kept, kept.with_name("z.ipynb"))
    moved = wait_until(lambda: env_keyed(layout, str(kept.with_name("z.ipynb"))), 60,
                       "the rename to be followed")
    assert moved["env_id"] == env["env_id"]
    assert bare_daemon.process is not None and bare_daemon.process.poll() is None


def test_saves_reported_by_a_kernel_are_checked_and_recorded(bare_daemon: Daemon, layout: Layout) -> None:
    notebook = layout.notebook("reported.ipynb")
    notebook.write_text(json.dumps(EMPTY_NOTEBOOK))
    env = acquire_notebook(layout, str(notebook))
    # This daemon watches folders itself: its kernels need not report saves.
    assert env["report_notebook_saves"] is False
    saved = {"dev": 1, "ino": 2, "size": 3, "mtime_ns": 4}
    assert layout.request("notebook_saved", {"env": env["path"], "file": saved})["updated"] is True
    assert layout.request("show", {"key": env["key"]})["notebook_file"] == "1:2:3:4"
    assert layout.request("notebook_saved", {"env": env["path"], "file": saved})["updated"] is False
    named = layout.request("acquire", {"key": {"kind": "env", "value": "named"}}, timeout=300)
    with pytest.raises(protocol.BadRequest, match="belongs to env:named, not to a notebook"):
        layout.request("notebook_saved", {"env": named["path"], "file": saved})
    with pytest.raises(protocol.NotFound, match="does not own an env at /nowhere/e-000000000000"):
        layout.request("notebook_saved", {"env": "/nowhere/e-000000000000", "file": saved})


def test_gc_orphans_keeps_the_env_of_a_notebook_renamed_while_nobody_watched(layout: Layout) -> None:
    before = layout.notebook("before.ipynb")
    before.write_text(json.dumps(EMPTY_NOTEBOOK))
    gone = layout.notebook("gone.ipynb")
    gone.write_text(json.dumps(EMPTY_NOTEBOOK))
    daemon = Daemon(layout, "--pool-size", "0").start()
    try:
        kept = acquire_notebook(layout, str(before))
        orphan = acquire_notebook(layout, str(gone))
        # Our acquire connections count as kernels until the daemon sees them close.
        wait_until(lambda: layout.status()["envs"]["live"] == 0, 30, "the acquire connections to close")
    finally:
        assert daemon.stop() == 0
    # With no daemon watching (as under a system daemon, which never watches): renamed, deleted.
    after = layout.notebooks / "after.ipynb"
    os.rename(before, after)
    gone.unlink()
    daemon = Daemon(layout, "--pool-size", "0").start()
    try:
        result = ctl(layout, "gc", "--older-than", "30d", "--orphans", "--yes")
        assert result.returncode == 0, result.stderr
        assert ("kept %s (%s): the notebook was renamed to %s; its env moves there at its next kernel start"
                % (kept["env_id"], before, after)) in result.stdout
        assert ("removing %s (notebook:%s): its notebook no longer exists"
                % (orphan["env_id"], gone)) in result.stdout
        remaining = {env["env_id"] for env in layout.request("list")["envs"]}
        assert remaining == {kept["env_id"]}
        # ... and it does move there at the next start.
        assert acquire_notebook(layout, str(after))["env_id"] == kept["env_id"]
    finally:
        daemon.stop()
