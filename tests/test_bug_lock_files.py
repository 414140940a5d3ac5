"""Review of issue 11 (uvkernelctl lock): files the safe writer gets wrong. Each test fails on 0920afc."""

from __future__ import annotations

import os

import nbformat
import pytest
from helpers import Daemon, Layout
from test_nbctl import STAMP, env_with, nb_daemon, rich_notebook, run_ctl, script_of

__all__ = ["nb_daemon"]


@pytest.mark.slow
def test_bug_lock_through_a_symlink_writes_the_notebook_not_over_the_link(
        nb_daemon: Daemon, layout: Layout) -> None:
    real = layout.notebooks / "real.ipynb"
    rich_notebook(real)
    link = layout.notebooks / "link.ipynb"
    link.symlink_to(real)
    env_with(layout, real, "iniconfig==2.0.0")  # the stub keys a notebook by its real path

    result = run_ctl(layout, "lock", str(link), "--exclude-newer", STAMP)
    assert result.returncode == 0, result.stderr
    # Today: the link is replaced by a regular file holding the lock; the notebook it named is unchanged.
    assert link.is_symlink(), "the symlink was replaced by a copy of the notebook"
    assert "uv.lock" in nbformat.read(str(real), as_version=nbformat.NO_CONVERT).metadata


@pytest.mark.slow
def test_bug_lock_on_a_hard_linked_notebook_does_not_split_it(nb_daemon: Daemon, layout: Layout) -> None:
    notebook = layout.notebooks / "a.ipynb"
    rich_notebook(notebook)
    other_name = layout.notebooks / "b.ipynb"
    os.link(notebook, other_name)
    env_with(layout, notebook, "iniconfig==2.0.0")
    before = notebook.read_bytes()

    result = run_ctl(layout, "lock", str(notebook), "--exclude-newer", STAMP)
    # Either both names see the lock (written in place) or it is refused with nothing written.
    # Today: a.ipynb is a new file with the lock, b.ipynb keeps the old bytes: two notebooks now.
    if result.returncode == 0:
        assert os.path.samefile(notebook, other_name), "the hard link was broken: two diverging notebooks"
    else:
        assert notebook.read_bytes() == before == other_name.read_bytes()


@pytest.mark.slow
def test_bug_lock_keeps_other_tool_tables_and_comments_of_the_block(
        nb_daemon: Daemon, layout: Layout) -> None:
    block = "\n".join([
        "# /// script",
        "# requires-python = \">=3.10\"",
        "# dependencies = [",
        "#     \"iniconfig==2.0.0\",  # pinned: 2.1 changed the API we use",
        "# ]",
        "#",
        "# [tool.marimo]",
        "# width = \"full\"",
        "# ///",
    ])
    notebook = layout.notebooks / "tools.ipynb"
    rich_notebook(notebook, first_cell=block)
    env_with(layout, notebook, "iniconfig==2.0.0")

    result = run_ctl(layout, "lock", str(notebook), "--exclude-newer", STAMP)
    assert result.returncode == 0, result.stderr
    after = nbformat.read(str(notebook), as_version=nbformat.NO_CONVERT)
    # PEP 723 blocks carry other tools' [tool.X] tables; the lock must not delete them silently.
    assert script_of(after).get("tool", {}).get("marimo") == {"width": "full"}, after.cells[0].source



@pytest.mark.slow
def test_bug_lock_never_writes_an_exclude_newer_the_daemon_refuses(nb_daemon: Daemon, layout: Layout) -> None:
    # Two rules for one fact: nbcommands.exclude_newer_stamp (datetime.fromisoformat) accepts it,
    # uv accepts it, declared._EXCLUDE_NEWER (what the daemon and `deps` apply) refuses it.
    notebook = layout.notebooks / "stamp.ipynb"
    rich_notebook(notebook)
    env_with(layout, notebook, "iniconfig==2.0.0")
    before = notebook.read_bytes()

    result = run_ctl(layout, "lock", str(notebook), "--exclude-newer", "2025-06-01 00:00:00Z")
    if result.returncode != 0:  # refused up front: fine, if nothing was written
        assert notebook.read_bytes() == before, "refused only after writing the notebook:\n" + result.stderr
        return
    deps = run_ctl(layout, "deps", str(notebook))
    assert deps.returncode == 0, "lock wrote a declaration uvkerneld itself refuses:\n" + deps.stderr
