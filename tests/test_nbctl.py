"""uvkernelctl deps/lock/sync/doctor NOTEBOOK against a real daemon, real uv and real notebook files:
lock changes only the declaration, refuses a concurrent writer, and deps/doctor report drift."""

from __future__ import annotations

import copy
import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import nbformat
import pytest
import tomllib
from helpers import Daemon, Layout, ctl
from test_system_mode import UID_A, UID_B, Host, write_notebook_as
from test_system_mode import host as host

from uvkerneld import ctl as ctl_module
from uvkerneld import nbdecl, nbedit
from uvkerneld.uv import find_uv

OTHER_UID, OTHER_GID = 61001, 61002
STAMP = "2025-06-01T00:00:00Z"
PNG = (  # 1x1 pixel
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgYGD4DwABBAEAwS2OUAAAAABJRU5ErkJggg==")


def tool_env(layout: Layout) -> dict[str, str]:
    """What a user's shell has: the daemon's socket, uv on PATH, a uv cache (the shared test one)."""
    env = layout.env
    env["PATH"] = os.path.dirname(find_uv(None)) + os.pathsep + env["PATH"]
    env["UV_CACHE_DIR"] = str(layout.cache_dir)
    return env


def run_ctl(layout: Layout, *args: str) -> subprocess.CompletedProcess[str]:
    return ctl(layout, *args, env=tool_env(layout))


def env_with(layout: Layout, notebook: Path, *packages: str) -> str:
    """The notebook's env, with ``packages`` installed the way %pip does (recorded by the daemon)."""
    key = {"kind": "notebook", "value": str(notebook)}
    path: str = layout.request("acquire", {"key": key}, timeout=300)["path"]
    if packages:
        result = layout.request("pip", {"env": path, "argv": ["install", *packages]}, timeout=300)
        assert result["exit_status"] == 0, result
    return path


def script_of(notebook: Any) -> dict[str, Any]:
    """The TOML of the PEP 723 block in the first cell, read as PEP 723 says (not with our code)."""
    match = re.search(r"(?m)^# /// script$\s(?P<content>(^#(| .*)$\s)+)^# ///$", notebook.cells[0].source)
    assert match, notebook.cells[0].source
    return tomllib.loads("".join(line[2:] if line.startswith("# ") else line[1:]
                                 for line in match.group("content").splitlines(keepends=True)))


@pytest.fixture
def nb_daemon(layout: Layout) -> Iterator[Daemon]:
    running = Daemon(layout, "--pool-size", "0").start()
    yield running
    running.stop()


def rich_notebook(path: Path, first_cell: str | None = None) -> None:
    """A notebook with what a lock must not touch: outputs (text, image, error), attachments, a raw
    cell, widget state, unusual and non-ASCII metadata, an nteract env_id."""
    cells = [
        nbformat.v4.new_markdown_cell(
            "![pic](attachment:pic.png) Ünïcödé", id="md-1",
            attachments={"pic.png": {"image/png": PNG}},
        ),
        nbformat.v4.new_code_cell(
            "print('hi')\n1 + 1", id="code-1", execution_count=7,
            metadata={"tags": ["keep"], "collapsed": False, "custom": {"nested": [1, 2.5, None, True]}},
            outputs=[
                nbformat.v4.new_output("stream", name="stdout", text="hi\n"),
                nbformat.v4.new_output("execute_result", data={"text/plain": "2"}, execution_count=7),
                nbformat.v4.new_output("display_data", data={
                    "image/png": PNG,
                    "text/plain": "<Figure>"}, metadata={"image/png": {"width": 1}}),
                nbformat.v4.new_output("error", ename="ZeroDivisionError", evalue="division by zero",
                                       traceback=["\x1b[31mZeroDivisionError\x1b[0m"]),
            ],
        ),
        nbformat.v4.new_raw_cell("raw \t text", id="raw-1", metadata={"format": "text/x-rst"}),
    ]
    if first_cell is not None:
        cells.insert(0, nbformat.v4.new_code_cell(
            first_cell, id="decl-cell", metadata={"jupyter": {"source_hidden": True}, "mine": 1}))
    notebook = nbformat.v4.new_notebook(cells=cells, metadata={
        "kernelspec": {"name": "uv", "display_name": "Python 3 (uv, per notebook)", "language": "python"},
        "language_info": {"name": "python", "version": "3.11.7"},
        "widgets": {"application/vnd.jupyter.widget-state+json": {"state": {}, "version_major": 2}},
        "runt": {"schema_version": "1", "env_id": "e-nteract-1234"},
        "weird key with spaces": {"ä": ["ö", {"ü": None}]},
    })
    nbformat.write(notebook, str(path))


@pytest.mark.slow
def test_lock_changes_only_the_declaration(nb_daemon: Daemon, layout: Layout) -> None:
    notebook = layout.notebooks / "rich.ipynb"
    rich_notebook(notebook)
    os.chown(notebook, OTHER_UID, OTHER_GID)  # root locks a user's notebook: it stays theirs
    notebook.chmod(0o640)
    env_with(layout, notebook, "iniconfig==2.0.0")
    before = nbformat.read(str(notebook), as_version=nbformat.NO_CONVERT)

    result = run_ctl(layout, "lock", str(notebook), "--exclude-newer", STAMP)
    assert result.returncode == 0, result.stderr
    assert "locked %s: iniconfig==2.0.0" % notebook in result.stdout

    after = nbformat.read(str(notebook), as_version=nbformat.NO_CONVERT)
    declaration = after.cells[0]
    assert after.cells[1:] == before.cells  # every other cell, outputs and attachments included
    assert declaration.metadata == {"jupyter": {"source_hidden": True}}
    assert script_of(after) == {
        "requires-python": ">=3.11", "dependencies": ["iniconfig==2.0.0"],
        "tool": {"uv": {"exclude-newer": STAMP}},
    }
    others = {key: value for key, value in after.metadata.items() if key not in ("uv.lock", "runt")}
    assert others == {key: value for key, value in before.metadata.items() if key != "runt"}
    assert after.metadata.runt == {"schema_version": "1", "env_id": "e-nteract-1234", "uv": {
        "dependencies": ["iniconfig==2.0.0"], "requires-python": ">=3.11"}}
    lock = tomllib.loads(after.metadata["uv.lock"])
    assert [(p["name"], p["version"]) for p in lock["package"]] == [("iniconfig", "2.0.0")]
    assert lock["options"]["exclude-newer"].startswith("2025-06-01T00:00:00")
    info = notebook.stat()
    assert (info.st_uid, info.st_gid, info.st_mode & 0o7777) == (OTHER_UID, OTHER_GID, 0o640)
    assert sorted(os.listdir(layout.notebooks)) == ["rich.ipynb"]  # no temp file left behind
    # lock synced the env to what it wrote: the next kernel start has nothing to sync, deps no drift.
    acquired = layout.request("acquire", {"key": {"kind": "notebook", "value": str(notebook)}}, timeout=60)
    assert acquired["declared_digest"] == nbdecl.digest(nbdecl.read_declaration(str(notebook)).to_wire())
    check = run_ctl(layout, "deps", str(notebook), "--check")
    assert check.returncode == 0, check.stdout
    assert "locked     iniconfig 2.0.0 (uv.lock in the notebook)" in check.stdout

    # A notebook that already has a block cell: that cell's source is replaced, its id, metadata and
    # the code after the block kept; its [tool.uv] keys kept; nothing else changes.
    second = layout.notebooks / "block.ipynb"
    rich_notebook(second, first_cell='# /// script\n# dependencies = ["toolz"]\n'
                  '# requires-python = ">=3.10"\n# [tool.uv]\n# prerelease = "allow"\n# ///\n'
                  'import iniconfig')
    env_with(layout, second, "iniconfig==2.0.0")
    before = nbformat.read(str(second), as_version=nbformat.NO_CONVERT)
    result = run_ctl(layout, "lock", str(second), "--exclude-newer", STAMP)
    assert result.returncode == 0, result.stderr
    after = nbformat.read(str(second), as_version=nbformat.NO_CONVERT)
    assert after.cells[1:] == before.cells[1:]
    assert (after.cells[0].id, after.cells[0].metadata) == ("decl-cell", before.cells[0].metadata)
    assert after.cells[0].source.endswith("# ///\nimport iniconfig")
    assert script_of(after) == {
        "requires-python": ">=3.10", "dependencies": ["iniconfig==2.0.0"],
        "tool": {"uv": {"prerelease": "allow", "exclude-newer": STAMP}},
    }


def test_lock_refuses_a_concurrent_writer(nb_daemon: Daemon, layout: Layout,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    notebook = layout.notebooks / "busy.ipynb"
    rich_notebook(notebook)
    env_with(layout, notebook, "iniconfig==2.0.0")
    theirs = copy.deepcopy(nbformat.read(str(notebook), as_version=nbformat.NO_CONVERT))
    theirs.cells[1].source = "print('saved by JupyterLab meanwhile')"
    their_bytes = nbedit.serialize(theirs)

    def other_writer(path: str) -> None:  # JupyterLab saving in place while uvkernelctl worked
        Path(path).write_bytes(their_bytes)

    for name, value in tool_env(layout).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(nbedit, "BEFORE_REPLACE_HOOKS", [other_writer])
    stdout, stderr = io.StringIO(), io.StringIO()
    with redirect_stdout(stdout), redirect_stderr(stderr):
        code = ctl_module.main(["lock", str(notebook), "--exclude-newer", STAMP])
    assert code == ctl_module.EXIT_USAGE
    assert stderr.getvalue() == (
        "uvkernelctl: %s changed on disk while uvkernelctl worked on it (another program saved, moved or "
        "deleted it); nothing was written: run the command again\n" % notebook)
    assert notebook.read_bytes() == their_bytes
    assert sorted(os.listdir(layout.notebooks)) == ["busy.ipynb"]


def test_lock_refuses_read_only_and_foreign_notebooks(layout: Layout) -> None:
    # No daemon: these are refused before anything else happens.
    read_only = layout.notebooks / "ro.ipynb"
    rich_notebook(read_only)
    read_only.chmod(0o444)
    original = read_only.read_bytes()
    result = run_ctl(layout, "lock", str(read_only))
    assert (result.returncode, result.stderr) == (2, "uvkernelctl: %s is read-only (mode 0444); make it "
                                                     "writable (chmod u+w) to change it\n" % read_only)
    assert read_only.read_bytes() == original

    # Another user's notebook in a folder everyone may write (a shared project folder): writing it
    # would make it ours. The ctl runs in a child with the other uid (our interpreter lives under
    # /root, which other uids cannot reach, so no exec).
    layout.root.chmod(0o755)
    shared = layout.notebooks / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o1777)
    foreign = shared / "theirs.ipynb"
    rich_notebook(foreign)
    os.chown(foreign, OTHER_GID, OTHER_GID)
    foreign.chmod(0o666)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.dup2(write_end, 2)
            os.setgroups([])
            os.setgid(OTHER_UID)
            os.setuid(OTHER_UID)
            sys.stderr = os.fdopen(2, "w", buffering=1)
            os._exit(ctl_module.main(["lock", str(foreign)]))
        finally:
            os._exit(99)
    os.close(write_end)
    with os.fdopen(read_end) as reader:
        message = reader.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 2, message
    assert message == (
        "uvkernelctl: %s belongs to uid %d, not to you (uid %d): writing it would change its owner; ask its "
        "owner to run this, or copy the notebook\n" % (foreign, OTHER_GID, OTHER_UID))
    assert foreign.stat().st_uid == OTHER_GID


@pytest.mark.slow
def test_lock_that_cannot_resolve_writes_nothing(nb_daemon: Daemon, layout: Layout) -> None:
    notebook = layout.notebooks / "old.ipynb"
    rich_notebook(notebook)
    env_with(layout, notebook, "iniconfig==2.0.0")  # released 2023
    before = notebook.read_bytes()
    result = run_ctl(layout, "lock", str(notebook), "--exclude-newer", "2020-01-01T00:00:00Z")
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith(
        "uvkernelctl: uv lock cannot lock iniconfig==2.0.0 as of 2020-01-01T00:00:00Z; nothing was written. "
        "uv says: error: No solution found"), result.stderr
    assert "filtered by `exclude-newer`" in result.stderr
    assert notebook.read_bytes() == before


def write_nb(path: Path, metadata: dict[str, Any] | None = None, first_cell: str | None = None) -> Path:
    cells = [nbformat.v4.new_code_cell(first_cell)] if first_cell is not None else []
    nbformat.write(nbformat.v4.new_notebook(cells=cells, metadata=metadata or {}), str(path))
    return path


def test_deps_and_doctor_report_drift(nb_daemon: Daemon, layout: Layout) -> None:
    # nteract declares iniconfig==2.0.0 and toolz; %pip put iniconfig 2.1.0 and tabulate there.
    notebook = write_nb(layout.notebooks / "drift.ipynb", {"runt": {"schema_version": "1", "uv": {
        "dependencies": ["iniconfig==2.0.0", "toolz"]}}})
    env_with(layout, notebook, "iniconfig==2.1.0", "tabulate")
    report = json.loads(run_ctl(layout, "deps", str(notebook), "--json").stdout)
    assert report["declared"] == {"where": "metadata.runt.uv", "requirements": ["iniconfig==2.0.0", "toolz"],
                                  "requires_python": None, "locked": {}}
    assert report["recorded"] == ["iniconfig==2.1.0", "tabulate"]
    assert report["installed"]["iniconfig"] == "2.1.0" and "ipykernel" in report["installed"]
    assert [(item["kind"], item["package"]) for item in report["drift"]] == [
        ("version", "iniconfig"), ("missing", "toolz"), ("undeclared", "tabulate")]
    assert "run `uvkernelctl lock NOTEBOOK`" in report["drift"][2]["message"]
    text = run_ctl(layout, "deps", str(notebook))
    assert text.returncode == 0  # without --check, drift is reported, not failed
    assert "iniconfig 2.1.0 is installed, the notebook asks for iniconfig==2.0.0" in text.stdout
    assert "toolz is declared (toolz) but not installed" in text.stdout
    assert "tabulate was installed with %pip (tabulate) but the notebook does not declare it" in text.stdout
    assert "(missing)" in text.stdout  # toolz in the installed row
    assert "ipykernel" not in text.stdout  # transitive/base packages are not drift and not listed
    check = run_ctl(layout, "deps", str(notebook), "--check")
    assert check.returncode == 6 and check.stdout == text.stdout
    doctor = run_ctl(layout, "doctor", str(notebook))
    assert doctor.returncode == 6 and doctor.stdout == text.stdout

    # The lock pins a version the env does not have: drift even though the declaration has no pin.
    pinned = write_nb(layout.notebooks / "pinned.ipynb", {
        "uv.lock": 'version = 1\n\n[[package]]\nname = "iniconfig"\nversion = "2.0.0"\n'},
        '# /// script\n# dependencies = ["iniconfig"]\n# ///')
    env_with(layout, pinned, "iniconfig==2.1.0")
    report = json.loads(run_ctl(layout, "deps", str(pinned), "--json").stdout)
    assert report["declared"]["locked"] == {"iniconfig": "2.0.0"}
    assert [item["message"] for item in report["drift"]] == [
        "iniconfig 2.1.0 is installed, the lock pins 2.0.0; run `uvkernelctl sync NOTEBOOK`"]

    # No drift: what is declared is installed, and %pip installed nothing undeclared (a package for
    # another platform is not missing).
    clean = write_nb(layout.notebooks / "clean.ipynb", {"uv": {"dependencies": [
        "iniconfig>=2", "pywin32; sys_platform == 'win32'"]}})
    env_with(layout, clean, "iniconfig==2.0.0")
    check = run_ctl(layout, "deps", str(clean), "--check")
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.splitlines()[-1] == "no drift: the env has what the notebook declares"
    assert "declared   metadata.uv: iniconfig>=2" in check.stdout


BAD_INPUTS = ("no such notebook", "a folder", "not a notebook", "no env yet", "bad declaration")


@pytest.mark.parametrize("command", ["deps", "lock", "sync", "doctor"])
def test_each_bad_input_gets_a_clear_message(nb_daemon: Daemon, layout: Layout, command: str) -> None:
    folder = layout.notebooks
    (folder / "notes.txt").write_text("just text, not JSON\n")
    no_env = write_nb(folder / "fresh.ipynb",
                      first_cell='# /// script\n# dependencies = ["iniconfig"]\n# ///')
    bad = write_nb(folder / "bad.ipynb", first_cell='# /// script\n# dependencies = ["iniconfig"\n# ///')
    cases = {
        "no such notebook": (folder / "missing.ipynb", 4, "uvkernelctl: no such notebook: %s\n"
                             % (folder / "missing.ipynb")),
        "a folder": (folder, 2, "uvkernelctl: %s is a folder; give the path of a .ipynb notebook\n" % folder),
        "not a notebook": (folder / "notes.txt", 2, None),
        "no env yet": (no_env, 4, "uvkernelctl: %s has no env yet: open it with the uv kernel, or run "
                       "`uvkernelctl sync %s`\n" % (no_env, no_env)),
        "bad declaration": (bad, 2, None),
    }
    for case in BAD_INPUTS:
        path, code, message = cases[case]
        if command == "sync" and case == "no env yet":
            continue  # sync makes the env: not a bad input for it (test_sync_* covers it)
        result = run_ctl(layout, command, str(path))
        assert result.returncode == code, (case, result.stderr)
        assert len(result.stderr.splitlines()) <= 2 and result.stdout == "", (case, result)
        if message is not None:
            assert result.stderr == message, case
        elif case == "not a notebook":
            assert result.stderr.startswith("uvkernelctl: %s is not a notebook" % path), result.stderr
        else:
            assert result.stderr.startswith(
                "uvkernelctl: %s: cell 1 (PEP 723 block): invalid TOML: " % bad), result.stderr
    if command == "sync":
        empty = write_nb(folder / "empty.ipynb")
        result = run_ctl(layout, "sync", str(empty))
        assert (result.returncode, result.stderr) == (2, (
            "uvkernelctl: %s declares no packages; nothing to sync (`uvkernelctl lock %s` writes what its "
            "env has into it)\n" % (empty, empty)))
        empty.unlink()
    assert sorted(os.listdir(folder)) == ["bad.ipynb", "fresh.ipynb", "notes.txt"]
    assert layout.request("list", {"all": False})["envs"] == []  # none of these made an env


def test_lock_rejects_a_bad_exclude_newer(layout: Layout) -> None:
    # declared.py's rule (what the daemon applies to the notebook) judges --exclude-newer: one validator.
    # ("2025-01-31T00:00:00", a local time, is no longer refused here: uv accepts it.)
    notebook = write_nb(layout.notebooks / "x.ipynb")
    before = notebook.read_bytes()
    for value in ("yesterday", "2025/01/31"):
        result = run_ctl(layout, "lock", str(notebook), "--exclude-newer", value)
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("uvkernelctl: --exclude-newer: ") and repr(value) in result.stderr
        assert result.stderr.endswith("; nothing was written\n") and len(result.stderr.splitlines()) == 1
    assert notebook.read_bytes() == before


def test_sync_makes_the_env_match_the_notebook(nb_daemon: Daemon, layout: Layout) -> None:
    notebook = write_nb(layout.notebooks / "synced.ipynb", {"runt": {"schema_version": "1", "uv": {
        "dependencies": ["iniconfig==2.0.0"]}}})
    first = run_ctl(layout, "sync", str(notebook))  # no env yet: sync makes it
    assert first.returncode == 0, first.stderr
    added, synced = first.stdout.splitlines()[-2:]
    assert added == "added iniconfig" and synced.startswith("synced env e-"), first.stdout
    assert "iniconfig==2.0.0" in first.stderr  # uv's own output, streamed while it ran
    report = json.loads(run_ctl(layout, "deps", str(notebook), "--json").stdout)
    assert report["installed"]["iniconfig"] == "2.0.0"

    write_nb(notebook, {"runt": {"schema_version": "1", "uv": {"dependencies": ["iniconfig==2.1.0"]}}})
    drifted = run_ctl(layout, "deps", str(notebook), "--check")
    assert drifted.returncode == 6 and "iniconfig 2.0.0 is installed, the notebook asks for" in drifted.stdout
    second = run_ctl(layout, "sync", str(notebook))
    assert second.returncode == 0, second.stderr
    report = json.loads(run_ctl(layout, "deps", str(notebook), "--json").stdout)
    assert (report["installed"]["iniconfig"], report["drift"]) == ("2.1.0", [])


# --- a shared host (system mode): the user's own process reads, locks and writes the notebook ----

@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="switching uids needs root")
def test_lock_and_deps_on_a_shared_host_run_as_the_user(host: Host) -> None:
    notebook = write_notebook_as(host, UID_A, "shared-lock.ipynb", "import iniconfig", {
        "runt": {"schema_version": "1", "uv": {"dependencies": ["iniconfig==2.0.0"]}}})
    code = "import importlib.metadata as m, os; print(m.version('iniconfig'), os.getuid())"
    expected = {"status": "ok", "output": "2.0.0 %d\n" % UID_A}
    assert host.kernel_as(UID_A, "shared-lock.ipynb", code) == expected

    # uv lock runs as the user (their own uv cache in their home), the daemon only syncs.
    locked = host.run_as(UID_A, [host.python, "-m", "uvkerneld.ctl", "lock", notebook,
                                 "--exclude-newer", STAMP])
    assert locked.returncode == 0, locked.stdout + locked.stderr
    info = os.stat(notebook)
    assert (info.st_uid, info.st_gid) == (UID_A, UID_A)
    written = nbformat.read(notebook, as_version=nbformat.NO_CONVERT)
    assert script_of(written)["dependencies"] == ["iniconfig==2.0.0"]
    assert tomllib.loads(written.metadata["uv.lock"])["package"][0]["version"] == "2.0.0"
    check = host.run_as(UID_A, [host.python, "-m", "uvkerneld.ctl", "deps", notebook, "--check"])
    assert check.returncode == 0, check.stdout + check.stderr
    assert host.kernel_as(UID_A, "shared-lock.ipynb", code) == expected

    # Another user cannot read it, so cannot lock or sync it either; the file is unchanged.
    before = Path(notebook).read_bytes()
    for command in ("lock", "sync", "deps"):
        other = host.run_as(UID_B, [host.python, "-m", "uvkerneld.ctl", command, notebook])
        assert (other.returncode, other.stderr) == (3, (
            "uvkernelctl: cannot reach %s: permission denied (a folder on its path is closed to you); run "
            "this as the notebook's owner\n" % notebook))
    assert Path(notebook).read_bytes() == before


@pytest.mark.slow
def test_lock_through_a_symlink_writes_the_notebook_and_keeps_the_link(
        nb_daemon: Daemon, layout: Layout) -> None:
    real = layout.notebooks / "real.ipynb"
    rich_notebook(real)
    link = layout.notebooks / "link.ipynb"
    link.symlink_to(real)
    env_with(layout, real, "iniconfig==2.0.0")  # the stub keys a notebook by its real path

    result = run_ctl(layout, "lock", str(link), "--exclude-newer", STAMP)
    assert result.returncode == 0, result.stderr
    # (It was: the link replaced by a regular file holding the lock; the notebook it named unchanged.)
    assert link.is_symlink(), "the symlink was replaced by a copy of the notebook"
    assert "uv.lock" in nbformat.read(str(real), as_version=nbformat.NO_CONVERT).metadata


@pytest.mark.slow
def test_lock_writes_a_hard_linked_notebook_in_place(nb_daemon: Daemon, layout: Layout) -> None:
    notebook = layout.notebooks / "a.ipynb"
    rich_notebook(notebook)
    other_name = layout.notebooks / "b.ipynb"
    os.link(notebook, other_name)
    env_with(layout, notebook, "iniconfig==2.0.0")
    before = notebook.read_bytes()

    result = run_ctl(layout, "lock", str(notebook), "--exclude-newer", STAMP)
    # Written in place, as jupyter_server writes notebooks: both names see the lock (a rename would have
    # left b.ipynb with the old bytes: two diverging notebooks). No backup file is left behind.
    assert result.returncode == 0, result.stderr
    assert os.path.samefile(notebook, other_name), "the hard link was broken: two diverging notebooks"
    assert notebook.read_bytes() != before and "uv.lock" in json.loads(other_name.read_text())["metadata"]
    assert sorted(os.listdir(layout.notebooks)) == ["a.ipynb", "b.ipynb"]


@pytest.mark.slow
def test_lock_keeps_other_tool_tables_and_comments_of_the_block(
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
    assert "#     \"iniconfig==2.0.0\",  # pinned: 2.1 changed the API we use" in after.cells[0].source
    assert script_of(after)["tool"]["uv"] == {"exclude-newer": STAMP}



@pytest.mark.slow
def test_lock_never_writes_an_exclude_newer_the_daemon_refuses(nb_daemon: Daemon, layout: Layout) -> None:
    # It was two rules for one fact: uvkernelctl accepted it, declared.py (what the daemon applies) refused
    # it after lock had written it. Now declared.py's rule judges --exclude-newer too.
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


def block(*lines: str) -> str:
    return "\n".join(["# /// script", *("# " + line if line else "#" for line in lines), "# ///"])


REWRITE_SHAPES = {
    "multi-line array, item comments, other tool's table": (
        block('requires-python = ">=3.10"', "dependencies = [", '    "iniconfig==2.0.0",  # 2.1 broke us',
              '    "old-pkg",', "]  # end", "", "[tool.marimo]", 'width = "full"'),
        ['"iniconfig==2.0.0",  # 2.1 broke us', "]  # end", "[tool.marimo]"]),
    "inline array, strings holding ] and #": (
        block('dependencies = ["x ; python_version > \'3\' # ]", "y"]  # why', "# note", "[tool.ruff]",
              "line-length = 100"),
        ['"tabulate",', "]  # why", "# # note", "# [tool.ruff]", "# line-length = 100"]),
    "missing keys": (block("# only a comment"), ["# # only a comment", "# [tool.uv]"]),
    "existing [tool.uv] with other keys": (
        block("dependencies = []", "", "[tool.uv]", 'prerelease = "allow"',
              'exclude-newer = "2020-01-01T00:00:00Z"  # reproducible', "", "[[tool.uv.index]]",
              'url = "https://example.org/simple"', "", "[tool.black]", "line-length = 99"),
        ['# prerelease = "allow"', '# exclude-newer = "%s"  # reproducible' % STAMP, "# [tool.black]"]),
    "multi-line string in the array": (
        block("dependencies = [", '  """tabulate', ' ]""",', "]", "[tool.x]", "a = '#]'"),
        ["# [tool.x]", "# a = '#]'"]),
}


@pytest.mark.parametrize("shape", sorted(REWRITE_SHAPES))
def test_lock_rewrites_only_its_three_settings_of_a_block(shape: str) -> None:
    from uvkerneld import pep723edit

    old, kept = REWRITE_SHAPES[shape]
    new = pep723edit.rewrite(old, ["iniconfig==2.0.0", "tabulate"], ">=3.10", STAMP)
    for text in kept:
        assert text in new, (text, new)
    read = tomllib.loads("".join(line[2:] if line.startswith("# ") else line[1:]
                                 for line in new.splitlines(keepends=True)[1:-1]))
    before = tomllib.loads("".join(line[2:] if line.startswith("# ") else line[1:]
                                   for line in old.splitlines(keepends=True)[1:-1]))
    assert read["dependencies"] == ["iniconfig==2.0.0", "tabulate"]
    assert read["requires-python"] == before.get("requires-python", ">=3.10")
    assert read["tool"]["uv"]["exclude-newer"] == STAMP
    before.pop("dependencies", None)
    before.pop("requires-python", None)
    before.setdefault("tool", {}).setdefault("uv", {}).pop("exclude-newer", None)
    read["tool"]["uv"].pop("exclude-newer")
    assert {k: v for k, v in read.items() if k not in ("dependencies", "requires-python")} == before


def test_lock_refuses_a_block_it_cannot_rewrite_safely() -> None:
    # [tool.uv] given as dotted keys at the top: adding a [tool.uv] table would be invalid TOML. Refused
    # before uv runs and before anything is written, naming what is kept out and pointing to juv.
    from uvkerneld import nbdeps

    source = block("dependencies = []", 'tool.uv.prerelease = "allow"')
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source)])
    parsed = nbdeps.new_declaration(None, ["tabulate"], "3.11.7", STAMP)
    with pytest.raises(nbdeps.DeclarationError) as raised:
        nbdeps.new_block_source(notebook, 1, parsed)
    assert str(raised.value) == (
        "cell 1: cannot rewrite its PEP 723 block without losing what it holds besides dependencies, "
        "requires-python and [tool.uv] exclude-newer (the rewritten block would not be valid TOML); nothing "
        "was written: edit it with `juv add NOTEBOOK` and `juv lock NOTEBOOK`")


def test_lock_adds_no_cell_ids_and_refuses_nbformat_3(layout: Layout, tmp_path: Path) -> None:
    # nbformat.reads/writes validate, and validating a 4.5 notebook without ids gave every cell a new id
    # with a MissingIDFieldWarning (an error under pytest's warning filter).
    old = {"nbformat": 4, "nbformat_minor": 5, "metadata": {}, "cells": [
        {"cell_type": "code", "source": ["x = 1"], "metadata": {}, "outputs": [], "execution_count": None}]}
    path = tmp_path / "no-ids.ipynb"
    path.write_text(json.dumps(old, indent=1, sort_keys=True) + "\n")
    loaded = nbedit.read(str(path))
    assert nbedit.serialize(loaded.notebook) == path.read_bytes()

    v3 = write_nb(layout.notebooks / "v3.ipynb")
    v3.write_text(json.dumps({"nbformat": 3, "nbformat_minor": 0, "metadata": {}, "worksheets": []}))
    result = run_ctl(layout, "lock", str(v3), "--exclude-newer", STAMP)
    assert (result.returncode, result.stderr) == (2, (
        "uvkernelctl: %s is nbformat 3: open and save it in Jupyter first (that makes it nbformat 4)\n" % v3))
