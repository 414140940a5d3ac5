"""Notebooks run from the command line (nbconvert --execute, jupyter execute, papermill), as a new
user would: the kernel gets the notebook the user named, and a kernel that cannot get its env
shows why as the cell's error in every client."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import Daemon, Layout

BIN = os.path.dirname(sys.executable)
PREFIX_CELL = "import sys; print(sys.prefix)"


def write_notebook(path: Path, *cells: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "cells": [{"cell_type": "code", "execution_count": None, "id": "c%d" % i, "metadata": {},
                   "outputs": [], "source": source} for i, source in enumerate(cells)],
        "metadata": {"kernelspec": {"name": "uv", "display_name": "uv", "language": "python"}},
        "nbformat": 4, "nbformat_minor": 5,
    }))
    return path


def run_in_shell_folder(layout: Layout, argv: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    """A command typed in the notebooks folder: a shell sets PWD to it, as subprocess's cwd= does not."""
    return subprocess.run(argv, cwd=str(layout.notebooks),
                          env=dict(layout.env, PWD=str(layout.notebooks), **env),
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)


def outputs(notebook: Path) -> list[dict[str, Any]]:
    return json.loads(notebook.read_text())["cells"][0]["outputs"]


def test_nbconvert_with_a_relative_notebook_key_gets_the_notebook_the_user_named(
    bare_daemon: Daemon, layout: Layout, kernelspec: str
) -> None:
    report = write_notebook(layout.notebooks / "a" / "report.ipynb", PREFIX_CELL)
    result = run_in_shell_folder(
        layout, [os.path.join(BIN, "jupyter-nbconvert"), "--execute", "--to", "notebook", "--output", "out",
                 "a/report.ipynb"], UVKERNEL_NOTEBOOK="a/report.ipynb")
    assert result.returncode == 0, result.stderr
    [env] = layout.request("list", {"all": False})["envs"]
    assert env["key"] == {"kind": "notebook", "value": str(report)}  # not a/a/report.ipynb
    assert "".join(outputs(layout.notebooks / "a" / "out.ipynb")[0]["text"]).strip() == env["path"]


def test_a_notebook_key_naming_no_file_is_the_cells_error_in_nbconvert_and_jupyter_execute(
    bare_daemon: Daemon, layout: Layout, kernelspec: str
) -> None:
    write_notebook(layout.notebooks / "a" / "report.ipynb", PREFIX_CELL)
    reason = ("UVKERNEL_NOTEBOOK='a/typo.ipynb' names no existing notebook (looked for %s/a/typo.ipynb and "
              "%s/a/a/typo.ipynb)" % (layout.notebooks, layout.notebooks))
    result = run_in_shell_folder(
        layout, [os.path.join(BIN, "jupyter-nbconvert"), "--execute", "--allow-errors", "--to", "notebook",
                 "--output", "out", "a/report.ipynb"], UVKERNEL_NOTEBOOK="a/typo.ipynb")
    assert result.returncode == 0, result.stderr
    [error] = outputs(layout.notebooks / "a" / "out.ipynb")
    assert error["output_type"] == "error" and error["ename"] == "EnvironmentUnavailable"
    assert reason in error["evalue"] and reason in error["traceback"][0]
    result = run_in_shell_folder(layout, [os.path.join(BIN, "jupyter-execute"), "a/report.ipynb"],
                                 UVKERNEL_NOTEBOOK="a/typo.ipynb")
    assert result.returncode != 0
    assert reason in result.stderr
    assert layout.request("list", {"all": False})["envs"] == []


def test_papermill_shows_why_the_kernel_has_no_env(
    bare_daemon: Daemon, layout: Layout, kernelspec: str
) -> None:
    pytest.importorskip("papermill")
    write_notebook(layout.notebooks / "report.ipynb", PREFIX_CELL)
    result = run_in_shell_folder(
        layout, [sys.executable, "-m", "papermill", "report.ipynb", "out.ipynb", "-k", "uv"],
        UVKERNEL_NOTEBOOK="typo.ipynb")
    assert result.returncode != 0
    # papermill's own error: built from the cell's error output (it was empty with a stderr stream).
    _, _, papermill_error = result.stderr.partition("PapermillExecutionError")
    assert "UVKERNEL_NOTEBOOK='typo.ipynb' names no existing notebook" in papermill_error, result.stderr
