"""Notebooks that carry their dependencies (issue 11), through real kernels: jupyter_client starts
the installed kernelspec, the stub reads the notebook and asks the daemon to sync, and the kernel
imports what the notebook declared. A bad declaration reaches the notebook through the fallback
kernel, and the env stays exactly as it was."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import nbformat
import pytest
import tomllib
import uv as uv_package
from helpers import Daemon, Layout, ctl, run_code, running_kernel, wait_until
from test_nbctl import STAMP, env_with, rich_notebook, run_ctl
from test_nbctl import nb_daemon as nb_daemon

from uvkerneld import client, protocol
from uvkerneld.uv import find_uv

UV = uv_package.find_uv_bin()
VERSIONS = (
    "import importlib.metadata as m\n"
    "for name in %r:\n"
    "    try: print(name, m.version(name))\n"
    "    except m.PackageNotFoundError: print(name, '-')\n"
)
PACKAGES = ("iniconfig", "toolz", "tabulate", "more-itertools")


def write_notebook(path: Path, first_code: str = "print(1)", metadata: dict[str, Any] | None = None) -> str:
    notebook = {
        "cells": [
            {"cell_type": "code", "execution_count": None, "id": "c1",
             "metadata": {"jupyter": {"source_hidden": True}}, "outputs": [], "source": first_code},
            {"cell_type": "code", "execution_count": None, "id": "c2", "metadata": {}, "outputs": [],
             "source": "import iniconfig"},
        ],
        "metadata": {"kernelspec": {"name": "uv", "display_name": "uv"}, **(metadata or {})},
        "nbformat": 4, "nbformat_minor": 5,
    }
    path.write_text(json.dumps(notebook, indent=1) + "\n")
    return str(path)


def runt(*dependencies: str, **more: Any) -> dict[str, Any]:
    uv = {"dependencies": list(dependencies), **more}
    return {"runt": {"schema_version": "1", "env_id": "x", "uv": uv}}


def script(*dependencies: str, extra: str = "") -> str:
    listed = ", ".join(map(json.dumps, dependencies))
    return "# /// script\n# dependencies = [%s]\n%s# ///\n" % (listed, extra)


def versions(kernel: Any) -> dict[str, str]:
    return dict(line.split() for line in run_code(kernel, VERSIONS % (PACKAGES,)).splitlines())


def kernel_versions(layout: Layout, notebook: str) -> tuple[dict[str, str], str]:
    with running_kernel(layout, "uv", JPY_SESSION_NAME=notebook) as (_, kernel):
        return versions(kernel), run_code(kernel, "import sys; print(sys.prefix)").strip()


def syncs(layout: Layout, notebook: str) -> list[dict[str, Any]]:
    installs = layout.request("installs", {"key": {"kind": "notebook", "value": notebook}})["installs"]
    return [row for row in installs if row["subcommand"] == "sync"]


def uv_runs(daemon: Daemon, env_id: str) -> int:
    return len(re.findall(r"running \S+ pip \S+ --python \S*/%s/bin/python" % env_id, daemon.log))


def freeze(venv: str) -> str:
    result = subprocess.run([UV, "pip", "freeze", "--python", os.path.join(venv, "bin", "python")],
                            capture_output=True, text=True, timeout=60, check=True)
    return result.stdout


def fallback_error(layout: Layout, notebook: str) -> str:
    """The error a cell gets in a kernel for ``notebook`` (the fallback kernel's message)."""
    errors: list[str] = []

    def hook(message: dict[str, Any]) -> None:
        if message["msg_type"] == "error":
            errors.append(message["content"]["evalue"])

    with running_kernel(layout, "uv", JPY_SESSION_NAME=notebook) as (_, kernel):
        reply = kernel.execute_interactive("import iniconfig", timeout=60, output_hook=hook)
    assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "EnvironmentUnavailable"
    assert errors, "no error output"
    return errors[0]


def test_nteract_notebooks_get_their_packages_and_conflicting_versions_each_their_own(
    daemon: Daemon, layout: Layout, kernelspec: str
) -> None:
    current = write_notebook(layout.notebooks / "runt.ipynb", metadata=runt("iniconfig==1.1.1", "tabulate"))
    legacy = write_notebook(layout.notebooks / "legacy.ipynb",
                            metadata={"uv": {"dependencies": ["iniconfig==2.0.0"]}})
    got, prefix = kernel_versions(layout, current)
    assert got["iniconfig"] == "1.1.1" and got["tabulate"] != "-" and got["toolz"] == "-"
    got_legacy, prefix_legacy = kernel_versions(layout, legacy)
    assert got_legacy["iniconfig"] == "2.0.0" and got_legacy["tabulate"] == "-"
    assert prefix != prefix_legacy
    # What was declared is what the env records (uvkernelctl show/export read it).
    requirements = layout.request("installs", {"key": {"kind": "notebook", "value": current}})["requirements"]
    assert requirements == ["iniconfig==1.1.1", "tabulate"]
    # The env's own record (what rebuilds a lost store) knows what was declared too.
    record = json.loads((layout.venvs_dir / ".records" / (os.path.basename(prefix) + ".json")).read_text())
    assert record["declared"] == ["iniconfig==1.1.1", "tabulate"] and len(record["declared_digest"]) == 64


def test_a_juv_notebook_imports_exactly_the_locked_versions(
    daemon: Daemon, layout: Layout, kernelspec: str, tmp_path: Path
) -> None:
    # A lock made as juv makes it (`uv lock --script`), with an exclude-newer that rules out the
    # newest iniconfig and toolz: the kernel gets the lock's versions, not today's.
    cell = script("iniconfig", "toolz", extra='# [tool.uv]\n# exclude-newer = "2024-06-01T00:00:00Z"\n')
    source = tmp_path / "lockme.py"
    source.write_text(cell)
    env = dict(os.environ, UV_CACHE_DIR=str(layout.cache_dir), UV_PYTHON_DOWNLOADS="never")
    subprocess.run([UV, "lock", "--script", str(source)], check=True, env=env, capture_output=True,
                   timeout=300)
    lock = Path(str(source) + ".lock").read_text()
    pinned = {package["name"]: package["version"] for package in tomllib.loads(lock)["package"]}
    assert pinned["iniconfig"] == "2.0.0" and pinned["toolz"] == "0.12.1"
    notebook = write_notebook(layout.notebooks / "juv.ipynb", cell, {"uv.lock": lock})
    # What a daemon killed during a sync left behind goes when the next daemon starts.
    daemon.stop()
    leftover = layout.state_dir / "sync-scratch" / "sync-killed"
    leftover.mkdir(parents=True)
    (leftover / "notebook.py.lock").write_text(lock)
    daemon.start()
    got, _ = kernel_versions(layout, notebook)
    assert {name: got[name] for name in pinned} == pinned
    assert not leftover.exists() and list((layout.state_dir / "sync-scratch").iterdir()) == []


def test_editing_the_declaration_syncs_at_restart_and_pip_installs_outside_it_survive(
    daemon: Daemon, layout: Layout, kernelspec: str
) -> None:
    path = layout.notebooks / "edited.ipynb"
    notebook = write_notebook(path, metadata=runt("iniconfig==1.1.1", "toolz"))
    with running_kernel(layout, "uv", JPY_SESSION_NAME=notebook) as (manager, kernel):
        got = versions(kernel)
        assert got["iniconfig"] == "1.1.1" and got["toolz"] != "-" and got["tabulate"] == "-"
        run_code(kernel, "%pip install tabulate", timeout=300)
        env_id = os.path.basename(run_code(kernel, "import sys; print(sys.prefix)").strip())
        assert len(syncs(layout, notebook)) == 1
        runs = uv_runs(daemon, env_id)
        # Unchanged since the last start: no sync, no uv run at all.
        manager.restart_kernel(now=False)
        kernel.wait_for_ready(timeout=120)
        assert versions(kernel)["iniconfig"] == "1.1.1"
        assert len(syncs(layout, notebook)) == 1 and uv_runs(daemon, env_id) == runs
        # Changed (iniconfig), removed (toolz), added (more-itertools): synced at the restart.
        write_notebook(path, metadata=runt("iniconfig==2.0.0", "more-itertools"))
        manager.restart_kernel(now=False)
        kernel.wait_for_ready(timeout=180)
        got = versions(kernel)
        assert got["iniconfig"] == "2.0.0" and got["toolz"] == "-" and got["more-itertools"] != "-"
        assert got["tabulate"] != "-"  # %pip's, outside the declaration: kept
    history = layout.request("installs", {"key": {"kind": "notebook", "value": notebook}})
    assert history["requirements"] == ["iniconfig==2.0.0", "more-itertools", "tabulate"]
    assert [row["exit_status"] for row in syncs(layout, notebook)] == [0, 0]


def test_deleting_the_whole_declaration_syncs_its_packages_away_and_pip_installs_stay(
    daemon: Daemon, layout: Layout, kernelspec: str
) -> None:
    path = layout.notebooks / "undeclared.ipynb"
    notebook = write_notebook(path, script("iniconfig==1.1.1"))
    with running_kernel(layout, "uv", JPY_SESSION_NAME=notebook) as (manager, kernel):
        assert versions(kernel)["iniconfig"] == "1.1.1"
        run_code(kernel, "%pip install tabulate", timeout=300)
        env_id = os.path.basename(run_code(kernel, "import sys; print(sys.prefix)").strip())
        # The block cell and every declaration removed: the next start syncs the empty declaration.
        write_notebook(path, "print(1)")
        manager.restart_kernel(now=False)
        kernel.wait_for_ready(timeout=180)
        got = versions(kernel)
        assert got["iniconfig"] == "-" and got["tabulate"] != "-"  # %pip's, outside the declaration: kept
        assert len(syncs(layout, notebook)) == 2
        # Still declaring nothing: no sync, no uv run.
        runs = uv_runs(daemon, env_id)
        manager.restart_kernel(now=False)
        kernel.wait_for_ready(timeout=120)
        assert versions(kernel)["tabulate"] != "-"
        assert len(syncs(layout, notebook)) == 2 and uv_runs(daemon, env_id) == runs
    history = layout.request("installs", {"key": {"kind": "notebook", "value": notebook}})
    assert history["requirements"] == ["tabulate"]


LOCKED_CELL = script("iniconfig==1.1.1")


@pytest.mark.parametrize(("first_code", "metadata", "expected"), [
    ("# /// script\n# dependencies = [\n#   \"iniconfig\" \"toolz\"\n# ]\n# ///\n", {},
     "cell 1 (PEP 723 block): invalid TOML: Unclosed array (line 3 of the cell)"),
    (script("iniconfig>="), {},
     "cell 1 (PEP 723 block): dependencies[0]: 'iniconfig>=' is not a requirement: "),
    ("print(1)", runt("iniconfig==1.1.1", "toolz >"),
     "metadata.runt.uv.dependencies[1]: 'toolz >' is not a requirement: "),
    (script("iniconfig==2.0.0"), "LOCK",
     'metadata "uv.lock" does not match the declaration in cell 1 (PEP 723 block); run `uvkernelctl lock '),
    (script("nonexistent-pkg-uvkerneld-xyz"), {},
     "cell 1 (PEP 723 block): 'nonexistent-pkg-uvkerneld-xyz' does not resolve (with this kernel's own "),
    (script("iniconfig", extra='# requires-python = ">=3.99"\n'), {},
     "cell 1 (PEP 723 block): requires-python '>=3.99' matches no interpreter on this host; it has: 3."),
    (script("iniconfig", extra="# [tool.uv]\n# find-links = [\"https://example.org/wheels\"]\n"), {},
     "cell 1 (PEP 723 block): [tool.uv] find-links is not supported by uvkerneld (supported: "),
], ids=["invalid-toml", "bad-requirement-cell", "bad-requirement-runt", "lock-mismatch", "no-such-package",
        "requires-python", "unsupported-tool-uv"])
def test_a_bad_declaration_shows_in_the_notebook_and_changes_nothing(
    daemon: Daemon, layout: Layout, kernelspec: str, tmp_path: Path, first_code: str, metadata: Any,
    expected: str,
) -> None:
    path = layout.notebooks / "bad.ipynb"
    good = write_notebook(path, metadata=runt("iniconfig==1.1.1"))
    got, prefix = kernel_versions(layout, good)
    assert got["iniconfig"] == "1.1.1"
    before = freeze(prefix)
    rows_before = layout.request("installs", {"key": {"kind": "notebook", "value": good}})
    if metadata == "LOCK":  # a lock of another declaration (iniconfig==1.1.1) under this one
        source = tmp_path / "other.py"
        source.write_text(LOCKED_CELL)
        env = dict(os.environ, UV_CACHE_DIR=str(layout.cache_dir), UV_PYTHON_DOWNLOADS="never")
        subprocess.run([UV, "lock", "--script", str(source)], check=True, env=env, capture_output=True,
                       timeout=300)
        metadata = {"uv.lock": Path(str(source) + ".lock").read_text()}
    write_notebook(path, first_code, metadata)
    message = fallback_error(layout, good)
    assert expected in message
    assert "\n" not in message.strip(), message
    assert freeze(prefix) == before
    after = layout.request("installs", {"key": {"kind": "notebook", "value": good}})
    assert after["requirements"] == rows_before["requirements"]
    assert layout.request("show", {"key": {"kind": "notebook", "value": good}})["state"] == "assigned"
    # Fixed again: the next start syncs it, with no error left behind.
    write_notebook(path, metadata=runt("iniconfig==2.0.0"))
    assert kernel_versions(layout, good)[0]["iniconfig"] == "2.0.0"


def test_the_sync_op_refuses_a_declaration_of_the_wrong_shape(bare_daemon: Daemon, layout: Layout) -> None:
    notebook = str(layout.notebook("shape.ipynb"))
    key = {"kind": "notebook", "value": notebook}
    for declaration, expected in [
        ("text", '"declaration" must be an object'),
        ({"script": 3}, '"declaration.script" must be text or null'),
        ({"script": "# /// script\n# ///\n"}, '"declaration.script_cell" must be the number'),
        ({"uv": {}, "uv_key": "metadata.elsewhere"}, '"declaration.uv_key" must be one of'),
        ({"what": 1}, '"declaration" must be an object with some of'),
    ]:
        with pytest.raises(protocol.BadRequest, match=re.escape(expected)):
            client.request(str(layout.socket), "sync", {"key": key, "declaration": declaration}, 30)
    with pytest.raises(protocol.BadRequest, match="sync needs a notebook key"):
        client.request(
            str(layout.socket), "sync", {"key": {"kind": "env", "value": "x"}, "declaration": {}}, 30)


def test_requires_python_another_interpreter_on_the_host_matches_moves_the_notebook_to_it(
    bare_daemon: Daemon, layout: Layout
) -> None:
    """Changed rule (issue 11, was: a clear error): when the env's Python does not satisfy
    requires-python and another interpreter uv finds on the host does, the notebook moves to a
    new env built on it; the old env, which no kernel uses, is removed."""
    listed = subprocess.run([UV, "python", "list", "--only-installed", "--output-format", "json"],
                            capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, UV_PYTHON_DOWNLOADS="never"))
    key = {"kind": "notebook", "value": str(layout.notebook("rp.ipynb"))}
    acquired = layout.request("acquire", {"key": key}, timeout=300)
    env_version = python_version(acquired["python"])
    host_versions = {entry["version"] for entry in json.loads(listed.stdout.splitlines()[-1])}
    others = sorted(host_versions - {env_version})
    if not others:
        pytest.skip("this host has no interpreter other than the env's Python %s" % env_version)
    declaration = {"uv": {"dependencies": ["iniconfig==1.1.1"], "requires-python": "==" + others[0]},
                   "uv_key": "metadata.runt.uv"}
    synced = layout.request("sync", {"key": acquired["key"], "declaration": declaration}, timeout=600)
    assert synced["synced"] and synced["env_id"] != acquired["env_id"]
    assert python_version(synced["python"]) == others[0]
    # The old env's packages, re-resolved for the new interpreter, were kept where they fit:
    # only the declared package is a change.
    assert synced["changes"] == {"added": ["iniconfig"], "removed": []}
    envs = wait_until(lambda: len(layout.request("list")["envs"]) == 1 and layout.request("list")["envs"],
                      60, "the old env to be removed")
    assert not os.path.exists(acquired["path"])
    assert [env["env_id"] for env in envs] == [synced["env_id"]] and envs[0]["key"] == key
    again = layout.request("sync", {"key": key, "declaration": declaration}, timeout=60)
    assert not again["synced"] and again["env_id"] == synced["env_id"]


def python_version(python: str) -> str:
    probe = [python, "-c", "import platform; print(platform.python_version())"]
    return subprocess.run(probe, capture_output=True, text=True, timeout=60, check=True).stdout.strip()


def newer_python() -> Path | None:
    """A CPython newer than the daemon's on this host that uv does not find by itself (pyenv's
    versions are reached only through shims uv cannot query), or None."""
    here = sys.version_info[:2]
    for found in sorted(Path("/root/.pyenv/versions").glob("3.*/bin/python3.*")):
        minor = re.fullmatch(r"python3\.(\d+)", found.name)
        if minor and (3, int(minor.group(1))) > here and os.access(found, os.X_OK):
            return found
    return None


def test_requires_python_runs_the_kernel_on_a_matching_interpreter_and_back(
    layout: Layout, kernelspec: str
) -> None:
    """A notebook asking for a newer Python than the pool's gets a kernel on it: a new env on the
    best interpreter uv finds (here one put first on the daemon's PATH), its declared package in it.
    The old env goes as soon as no kernel runs in it; the running kernel's env is live (gc keeps
    it); a restart pays nothing; and asking for the old Python again moves the notebook back."""
    python = newer_python()
    if python is None:
        pytest.skip("no CPython newer than %d.%d in /root/.pyenv/versions: nothing to move to"
                    % sys.version_info[:2])
    newer = python.name.removeprefix("python")
    here = "%d.%d" % sys.version_info[:2]
    env = dict(layout.env, PATH="%s:%s" % (python.parent, os.environ["PATH"]))
    daemon = Daemon(layout, "--pool-size", "1", env=env).start()
    try:
        daemon.wait_pool_full()
        path = layout.notebooks / "newer.ipynb"
        cell = script("iniconfig==1.1.1", extra='# requires-python = ">=%s"\n' % newer)
        notebook = write_notebook(path, cell)
        key = {"kind": "notebook", "value": notebook}
        probe = ("import sys, iniconfig, importlib.metadata as m; "
                 "print(sys.version.split()[0], m.version('iniconfig'))")
        with running_kernel(layout, "uv", JPY_SESSION_NAME=notebook) as (manager, kernel):
            version, iniconfig = run_code(kernel, probe).split()
            assert version.startswith(newer + ".") and iniconfig == "1.1.1"
            moved = re.search(r"moved from env (\S+) to env (\S+) on Python", daemon.log)
            assert moved, daemon.log
            old_id, new_id = moved.groups()
            # The pool venv the notebook got first is gone, though the stub that moved it had it.
            wait_until(lambda: [row["env_id"] for row in layout.request("list")["envs"]] == [new_id], 60,
                       "only the new env to be left")
            assert not (layout.venvs_dir / old_id).exists()
            status = layout.status()
            assert status["envs"]["live"] == 1 and status["envs"]["by_state"]["retired"] == 0
            listing = ctl(layout, "list").stdout
            row = r"newer\.ipynb\s+\d+\s+%s\.\d+\s.*\byes\s+assigned" % re.escape(newer)
            assert re.search(row, listing), listing
            # The kernel's env is live: gc keeps it whatever the age limit.
            collected = layout.request("gc", {"older_than_s": 0, "dry_run": False}, timeout=120)
            assert [row["env_id"] for row in collected["kept_live"]] == [new_id] and not collected["removed"]
            run_code(kernel, "%pip install tabulate", timeout=300)
            # Unchanged declaration: the restart pays no sync and stays on the newer Python.
            runs = uv_runs(daemon, new_id)
            manager.restart_kernel(now=False)
            kernel.wait_for_ready(timeout=120)
            assert run_code(kernel, probe).split()[0].startswith(newer + ".")
            assert len(syncs(layout, notebook)) == 1 and uv_runs(daemon, new_id) == runs
            # Back to the daemon's Python: moved back, the declared package and %pip's kept.
            write_notebook(path, script("iniconfig==1.1.1", extra='# requires-python = "==%s.*"\n' % here))
            manager.restart_kernel(now=False)
            kernel.wait_for_ready(timeout=300)
            version, iniconfig = run_code(kernel, probe).split()
            assert version.startswith(here + ".") and iniconfig == "1.1.1"
            assert versions(kernel)["tabulate"] != "-"
            back = layout.request("show", {"key": key})
            assert back["env_id"] != new_id and back["live"] and back["requirement_list"] == [
                "iniconfig==1.1.1", "tabulate"]
            wait_until(lambda: not (layout.venvs_dir / new_id).exists(), 60, "the newer Python's env to go")
            assert layout.status()["envs"]["live"] == 1
        wait_until(lambda: layout.status()["envs"]["live"] == 0, 30, "the kernel's lifeline to close")
        assert [row["env_id"] for row in layout.request("list")["envs"]] == [back["env_id"]]
    finally:
        daemon.stop()


def newer_python_daemon(layout: Layout, pool_size: str = "1") -> tuple[Daemon, str]:
    """A daemon that finds a newer CPython first on its PATH, and that Python's X.Y (or a skip)."""
    python = newer_python()
    if python is None:
        pytest.skip("no CPython newer than %d.%d in /root/.pyenv/versions: nothing to move to"
                    % sys.version_info[:2])
    env = dict(layout.env, PATH="%s:%s" % (python.parent, os.environ["PATH"]))
    return Daemon(layout, "--pool-size", pool_size, env=env), python.name.removeprefix("python")


def test_the_old_env_stays_while_another_kernel_runs_in_it(layout: Layout, kernelspec: str) -> None:
    """Two kernels of one notebook: the second moves the notebook to a newer Python; the first
    keeps running in the old env, which is retired (no key, live, kept by gc, no installs) and
    removed when that kernel ends."""
    daemon, newer = newer_python_daemon(layout)
    daemon.start()
    try:
        path = layout.notebooks / "two.ipynb"
        notebook = write_notebook(path)
        with running_kernel(layout, "uv", JPY_SESSION_NAME=notebook) as (first_manager, first):
            old = run_code(first, "import sys; print(sys.prefix)").strip()
            write_notebook(path, script("iniconfig==1.1.1", extra='# requires-python = ">=%s"\n' % newer))
            with running_kernel(layout, "uv", JPY_SESSION_NAME=notebook) as (_, second):
                assert run_code(second, "import sys; print(sys.version)").startswith(newer + ".")
                new = run_code(second, "import sys; print(sys.prefix)").strip()
                rows = {row["env_id"]: row for row in layout.request("list")["envs"]}
                retired = rows[os.path.basename(old)]
                assert retired["state"] == "retired" and retired["key"] is None and retired["live"]
                assert "replaced by env %s on Python %s." % (os.path.basename(new), newer) in retired["error"]
                assert rows[os.path.basename(new)]["key"] == {"kind": "notebook", "value": notebook}
                assert layout.status()["envs"]["live"] == 2
                collected = layout.request("gc", {"older_than_s": 0, "dry_run": False}, timeout=120)
                assert not collected["removed"] and len(collected["kept_live"]) == 2
                refused = run_code(first, "%pip install tabulate", timeout=120)
                why = "is retired (replaced by env %s on Python %s." % (os.path.basename(new), newer)
                assert why in refused, refused
                assert "restart the kernel to run in the notebook's env" in refused, refused
                first_manager.shutdown_kernel(now=True)
                wait_until(lambda: [row["env_id"] for row in layout.request("list")["envs"]]
                           == [os.path.basename(new)], 60, "the retired env to be removed")
                assert not os.path.exists(old) and layout.status()["envs"]["live"] == 1
    finally:
        daemon.stop()


def test_a_daemon_killed_during_the_move_leaves_the_notebook_in_its_old_env(layout: Layout) -> None:
    """SIGKILL while the new env is being built: the next start removes the half-made env
    (``creating``, keyless), the notebook still has its old env and exactly one, and a sync
    moves it then."""
    daemon, newer = newer_python_daemon(layout, pool_size="0")
    daemon.start()
    key = {"kind": "notebook", "value": str(layout.notebook("killed.ipynb"))}
    old = layout.request("acquire", {"key": key}, timeout=300)
    declaration = {"uv": {"dependencies": ["iniconfig==1.1.1"], "requires-python": ">=" + newer},
                   "uv_key": "metadata.runt.uv"}
    outcome: list[BaseException] = []

    def ask() -> None:
        try:
            layout.request("sync", {"key": key, "declaration": declaration}, timeout=600)
        except BaseException as exc:
            outcome.append(exc)

    asking = threading.Thread(target=ask)
    asking.start()
    try:
        building = wait_until(
            lambda: [row for row in layout.request("list")["envs"] if row["state"] == "creating"], 120,
            "the new env to be building", interval=0.05)
    finally:
        assert daemon.process is not None
        daemon.process.kill()
        daemon.process.wait(30)
        asking.join(60)
    assert outcome and not asking.is_alive()
    [half_made] = building
    assert half_made["key"] is None and half_made["env_id"] != old["env_id"]
    daemon = Daemon(layout, "--pool-size", "0", env=daemon.env).start()
    try:
        rows = layout.request("list")["envs"]
        assert [(row["env_id"], row["key"], row["state"]) for row in rows] == [
            (old["env_id"], key, "assigned")]
        assert not os.path.exists(half_made["path"])
        records = layout.venvs_dir / ".records"
        assert sorted(entry.name for entry in records.iterdir()) == [old["env_id"] + ".json"]
        moved = layout.request("sync", {"key": key, "declaration": declaration}, timeout=600)
        assert moved["env_id"] != old["env_id"] and python_version(moved["python"]).startswith(newer + ".")
    finally:
        daemon.stop()


def test_a_deeply_nested_pep723_block_is_a_bad_declaration_not_an_internal_error(
        bare_daemon: Daemon, layout: Layout) -> None:
    key = {"kind": "notebook", "value": str(layout.notebook("deep.ipynb"))}
    script = "# /// script\n# dependencies = []\n# x = %s%s\n# ///\n" % ("[" * 3000, "]" * 3000)
    with pytest.raises(protocol.UvkError) as caught:
        client.request(str(layout.socket), "sync", {
            "key": key, "declaration": {"script": script, "script_cell": 1}}, 300)
    # The old code: RecursionError in tomllib -> "internal error in uvkerneld" and a traceback in the log.
    assert isinstance(caught.value, protocol.BadDeclaration), caught.value
    assert "cell 1 (PEP 723 block)" in caught.value.message
    assert "internal error" not in bare_daemon.log


def test_a_locked_notebook_syncs_when_path_has_no_interpreter_like_the_envs(
        layout: Layout, tmp_path: Path) -> None:
    """`uv export --script --locked` runs with the env's interpreter (--python): uv otherwise looks on the
    daemon's PATH for one matching requires-python (with config python=/opt/python3.12 and PATH's
    /usr/bin/python3 3.11, every notebook `uvkernelctl lock` wrote was refused) and runs it as the
    daemon. Stand-in: the env runs this Python, the daemon's PATH holds only /usr/bin's other one."""
    wanted = "==%s" % platform.python_version()
    path_python = "/usr/bin/python3"
    if not os.path.exists(path_python) or subprocess.run(
            [path_python, "-c", "import platform; print(platform.python_version())"],
            capture_output=True, text=True, timeout=30).stdout.strip() == platform.python_version():
        pytest.skip("needs a /usr/bin/python3 other than the interpreter running the tests")
    script = ('# /// script\n# requires-python = "%s"\n# dependencies = [\n#     "iniconfig==2.0.0",\n'
              '# ]\n# ///' % wanted)
    (tmp_path / "nb.py").write_text(script + "\n")
    env = dict(os.environ, UV_CACHE_DIR=str(layout.cache_dir), UV_PYTHON_DOWNLOADS="never")
    subprocess.run([find_uv(None), "lock", "--script", str(tmp_path / "nb.py"), "--python", sys.executable],
                   check=True, env=env, capture_output=True, timeout=120)
    lock = (tmp_path / "nb.py.lock").read_text()

    daemon = Daemon(layout, "--pool-size", "0", env=dict(layout.env, PATH="/usr/bin:/bin")).start()
    try:
        key = {"kind": "notebook", "value": str(layout.notebook("locked.ipynb"))}
        acquired = layout.request("acquire", {"key": key}, timeout=300)
        assert acquired["python"]  # the env runs sys.executable's version, which requires-python names
        try:
            result = layout.request("sync", {"key": acquired["key"], "declaration": {
                "script": script, "script_cell": 1, "lock": lock}}, timeout=300)
        except protocol.BadDeclaration as exc:
            pytest.fail("a valid lock for the env's own interpreter was refused: %s" % exc.message)
        assert result["synced"] and result["changes"]["added"] == ["iniconfig"], result
    finally:
        daemon.stop()


@pytest.mark.slow
def test_a_notebook_with_a_real_sized_lock_syncs(nb_daemon: Daemon, layout: Layout) -> None:
    """`uv lock --script` of 25 data-science packages (torch, tensorflow, jax, pandas, ...) writes
    1.25 MB, over the 1 MiB of other requests (the old limit of sync too: no kernel for such a
    notebook). Here a real small lock is padded with TOML comments to that size (no big download)."""
    notebook = layout.notebooks / "big-lock.ipynb"
    rich_notebook(notebook)
    env_with(layout, notebook, "iniconfig==2.0.0")
    locked = run_ctl(layout, "lock", str(notebook), "--exclude-newer", STAMP)
    assert locked.returncode == 0, locked.stderr
    parsed = nbformat.read(str(notebook), as_version=nbformat.NO_CONVERT)
    padding = "".join("# wheel entry %06d of a large lock, as long as a real wheel line's URL and hash\n" % n
                      for n in range(16000))
    parsed.metadata["uv.lock"] = parsed.metadata["uv.lock"] + padding  # ~1.3 MB, still a valid lock
    nbformat.write(parsed, str(notebook))

    result = run_ctl(layout, "sync", str(notebook))
    assert "frame limit" not in result.stderr, result.stderr
    assert result.returncode == 0, result.stderr
