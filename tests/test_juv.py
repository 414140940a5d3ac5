"""Round trips with juv itself (installed by `pip install '.[test]'`): juv's notebooks open through a
real jupyter_server with exactly their locked versions, juv reads back what `uvkernelctl lock`
wrote, and a locked notebook opens on a fresh host (new state dir, new empty uv cache)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import nbformat
import pytest
import tomllib
from helpers import Daemon, Layout, ctl, run_code, running_kernel
from jupyter_rest import JupyterServer, run_in_kernel

from uvkerneld.uv import find_uv

VERSIONS_CODE = (
    "import importlib.metadata as m, json, iniconfig; "
    "print(json.dumps({d.metadata['Name'].lower(): d.version for d in m.distributions()}))"
)


def tool_env(layout: Layout) -> dict[str, str]:
    """A user's shell: the daemon's socket, uv on PATH (juv runs `uv`), the shared test uv cache."""
    env = layout.env
    env["PATH"] = os.path.dirname(find_uv(None)) + os.pathsep + env["PATH"]
    env["UV_CACHE_DIR"] = str(layout.cache_dir)
    return env


def juv(layout: Layout, *args: str) -> str:
    binary = shutil.which("juv") or str(Path(sys.executable).parent / "juv")
    if not os.path.exists(binary):
        pytest.fail("juv is not installed: pip install '.[test]'")
    result = subprocess.run([binary, *args], env=tool_env(layout), cwd=str(layout.notebooks),
                            capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, "juv %s failed:\n%s%s" % (" ".join(args), result.stdout, result.stderr)
    return result.stdout


def lock_versions(notebook: Path) -> dict[str, str]:
    lock = tomllib.loads(json.loads(notebook.read_text())["metadata"]["uv.lock"])
    return {package["name"]: package["version"] for package in lock["package"]}


def open_session(server: JupyterServer, name: str) -> dict[str, Any]:
    """What JupyterLab does when the user opens the notebook with the uv kernel."""
    session = server.api("POST", "/api/sessions", {
        "path": name, "name": name, "type": "notebook", "kernel": {"name": "uv"}})
    return json.loads(run_in_kernel(server, session["kernel"]["id"], VERSIONS_CODE, timeout=300))


@pytest.mark.slow
def test_a_juv_notebook_opens_with_exactly_its_locked_versions(
    daemon: Daemon, layout: Layout, server: JupyterServer
) -> None:
    # Stamped before iniconfig 2.1.0 existed: the declaration says "iniconfig", the lock says 2.0.0.
    juv(layout, "init", "juv-made.ipynb")
    juv(layout, "stamp", "juv-made.ipynb", "--timestamp", "2024-06-01T00:00:00Z")
    juv(layout, "add", "juv-made.ipynb", "iniconfig")
    juv(layout, "lock", "juv-made.ipynb")
    notebook = layout.notebooks / "juv-made.ipynb"
    locked = lock_versions(notebook)
    assert locked == {"iniconfig": "2.0.0"}

    installed = open_session(server, "juv-made.ipynb")
    assert {name: installed.get(name) for name in locked} == locked
    # The notebook file is as juv left it: opening it wrote nothing into it.
    assert lock_versions(notebook) == locked


def juv_view(notebook: Path) -> tuple[str, str]:
    """What juv hands to uv for a notebook (juv/_export.py): the PEP 723 cell's source, stripped,
    and the "uv.lock" text."""
    data = json.loads(notebook.read_text())
    cell = next(cell for cell in data["cells"] if cell["cell_type"] == "code"
                and "# /// script" in "".join(cell["source"]))
    return "".join(cell["source"]).strip(), data["metadata"]["uv.lock"]


def notebook_with_pip_installs(layout: Layout, name: str, packages: list[str]) -> Path:
    """A new notebook whose env got ``packages`` through `%pip install` (recorded, not declared)."""
    notebook = layout.notebooks / name
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import iniconfig")]),
                   str(notebook))
    env = layout.request("acquire", {"key": {"kind": "notebook", "value": str(notebook)}}, timeout=300)
    installed = layout.request("pip", {"env": env["path"], "argv": ["install", *packages]}, timeout=300)
    assert installed["exit_status"] == 0
    return notebook


@pytest.mark.slow
def test_juv_reads_back_what_uvkernelctl_lock_wrote(layout: Layout) -> None:
    daemon = Daemon(layout, "--pool-size", "0").start()
    try:
        notebook = notebook_with_pip_installs(layout, "ours.ipynb", ["iniconfig==2.0.0", "tabulate==0.9.0"])
        result = ctl(layout, "lock", str(notebook), env=tool_env(layout))
        assert result.returncode == 0, result.stderr
    finally:
        daemon.stop()
    script, lock_text = juv_view(notebook)

    # juv cat shows the same dependencies (its first fenced cell is our block).
    shown = juv(layout, "cat", "ours.ipynb")
    block = re.search(r"```python[^\n]*\n(# /// script\n.*?# ///)\n```", shown, re.S)
    assert block is not None, shown
    assert '#     "iniconfig==2.0.0",\n#     "tabulate==0.9.0",' in block.group(1)
    # juv tree resolves through the lock: the same versions.
    tree = juv(layout, "tree", "ours.ipynb").splitlines()
    assert sorted(tree) == ["iniconfig v2.0.0", "tabulate v0.9.0"], tree
    # juv export accepts the lock: it writes uv's lock back, and uv had nothing to change in it.
    exported = juv(layout, "export", "ours.ipynb")
    assert [line.split()[0] for line in exported.splitlines() if "==" in line] == [
        "iniconfig==2.0.0", "tabulate==0.9.0"]
    assert juv_view(notebook) == (script, lock_text)
    # uv itself, on juv's view of the notebook, finds the lock up to date.
    scratch = Path(tempfile.mkdtemp(dir=layout.root))
    (scratch / "nb.py").write_text(script)
    (scratch / "nb.py.lock").write_text(lock_text)
    checked = subprocess.run([find_uv(None), "export", "--script", str(scratch / "nb.py"), "--locked"],
                             env=tool_env(layout), capture_output=True, text=True, timeout=120)
    assert checked.returncode == 0, checked.stderr


@pytest.mark.slow
def test_a_locked_notebook_opens_on_a_fresh_host_with_the_same_versions(
    layout: Layout, kernelspec: str
) -> None:
    # Host A: %pip installs an older iniconfig, uvkernelctl lock writes it into the notebook.
    daemon = Daemon(layout, "--pool-size", "0").start()
    try:
        notebook = layout.notebooks / "travels.ipynb"
        nbformat.write(nbformat.v4.new_notebook(), str(notebook))
        env = layout.request("acquire", {"key": {"kind": "notebook", "value": str(notebook)}}, timeout=300)
        assert layout.request("pip", {"env": env["path"], "argv": ["install", "iniconfig==2.0.0"]},
                              timeout=300)["exit_status"] == 0
        result = ctl(layout, "lock", str(notebook), env=tool_env(layout))
        assert result.returncode == 0, result.stderr
        with running_kernel(layout, kernelspec, JPY_SESSION_NAME=str(notebook)) as (_, kernel):
            on_a = json.loads(run_code(kernel, VERSIONS_CODE))
    finally:
        daemon.stop()

    # Host B: nothing shared with A but the notebook file: new state dir, new empty uv cache.
    root_b = Path(tempfile.mkdtemp(prefix="uvk-b-", dir="/tmp"))
    try:
        host_b = Layout(root_b, root_b / "cache")
        copied = host_b.notebooks / "travels.ipynb"
        shutil.copy2(notebook, copied)
        subprocess.run([sys.executable, "-m", "uvkerneld.ctl", "install-kernelspec", "--prefix",
                        str(host_b.kernel_prefix)],
                       check=True, env=host_b.env, capture_output=True, timeout=60)
        daemon_b = Daemon(host_b, "--pool-size", "0").start()
        try:
            with running_kernel(host_b, "uv", JPY_SESSION_NAME=str(copied)) as (_, kernel):
                on_b = json.loads(run_code(kernel, VERSIONS_CODE))
            assert not str(host_b.venvs_dir).startswith(str(layout.root))
        finally:
            daemon_b.stop()
        locked = lock_versions(copied)
        assert locked == {"iniconfig": "2.0.0"}
        assert {name: on_a.get(name) for name in locked} == locked
        assert {name: on_b.get(name) for name in locked} == locked
        assert any((root_b / "cache").iterdir())  # B really downloaded into its own cache
    finally:
        shutil.rmtree(root_b, ignore_errors=True)


def test_juv_add_after_uvkernelctl_lock_keeps_the_notebook_usable(layout: Layout) -> None:
    """`juv add` + `juv lock` change the PEP 723 cell and uv.lock but not the metadata.runt.uv mirror
    `uvkernelctl lock` wrote: the block wins, the stale mirror is drift, not a refused kernel (the
    old code refused every start: "declare different dependencies")."""
    daemon = Daemon(layout, "--pool-size", "0").start()
    try:
        notebook = notebook_with_pip_installs(layout, "shared.ipynb", ["iniconfig==2.0.0"])
        locked = ctl(layout, "lock", str(notebook), "--exclude-newer", "2025-06-01T00:00:00Z",
                     env=tool_env(layout))
        assert locked.returncode == 0, locked.stderr
        # A colleague who uses juv adds a package, as juv's README says.
        juv(layout, "add", "shared.ipynb", "tabulate==0.9.0")
        juv(layout, "lock", "shared.ipynb")

        synced = ctl(layout, "sync", str(notebook), env=tool_env(layout))
        assert synced.returncode == 0, synced.stderr
        assert "tabulate" in synced.stdout
        # The block wins; the stale runt.uv mirror lock wrote is drift in deps, not a start error.
        deps = ctl(layout, "deps", str(notebook), "--check", env=tool_env(layout))
        assert deps.returncode == 6, deps.stdout + deps.stderr
        assert ("  metadata.runt.uv lists other dependencies than cell 1 (PEP 723 block) (only in the cell: "
                "tabulate==0.9.0; only in metadata.runt.uv: -): it is not used (the block wins); run "
                "`uvkernelctl lock NOTEBOOK` to rewrite it, or remove it") in deps.stdout.splitlines()
    finally:
        daemon.stop()
