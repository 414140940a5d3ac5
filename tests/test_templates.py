"""Venvs cloned from a template (templates.py) are indistinguishable from venvs uv built, share
nothing more than those do, survive crashes and damage, and serve a burst of new notebooks."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
from helpers import Daemon, Layout, wait_until

from uvkerneld.uv import find_uv


def acquire(layout: Layout, name: str, kind: str = "env", timeout: float = 300) -> Path:
    return Path(layout.request("acquire", {"key": {"kind": kind, "value": name}}, timeout=timeout)["path"])


def templates(layout: Layout) -> list[Path]:
    return sorted(layout.venvs_dir.glob("t-*"))


def tree(root: Path) -> dict[str, tuple[str, Any]]:
    """relative path -> (kind, detail): a symlink's target, a file's (mode, inode, links), a dir's mode."""
    found: dict[str, tuple[str, Any]] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            relative = os.path.relpath(path, root)
            info = os.lstat(path)
            if os.path.islink(path):
                found[relative] = ("link", os.readlink(path))
            elif name in dirs:
                found[relative] = ("dir", info.st_mode)
            else:
                found[relative] = ("file", (info.st_mode, info.st_ino, info.st_nlink))
    return found


def contents(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every regular file's bytes."""
    digests = {}
    for relative, (kind, _) in tree(root).items():
        if kind == "file":
            digests[relative] = hashlib.sha256((root / relative).read_bytes()).hexdigest()
    return digests


def uv(*args: str, layout: Layout) -> str:
    env = dict(layout.env, UV_CACHE_DIR=str(layout.cache_dir))
    env.pop("VIRTUAL_ENV", None)
    result = subprocess.run([find_uv(None), *args], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout + result.stderr


def pip(layout: Layout, env: Path, *argv: str) -> dict[str, Any]:
    result = layout.request("pip", {"env": str(env), "argv": list(argv)}, timeout=300)
    assert result["exit_status"] == 0, result
    return result


def test_a_cloned_venv_is_indistinguishable_from_the_uv_built_one(layout: Layout) -> None:
    daemon = Daemon(layout, "--pool-size", "0").start()
    try:
        built = acquire(layout, "built-by-uv")
        assert len(templates(layout)) == 1  # taken from that first uv build
        template = templates(layout)[0]
        clone = acquire(layout, "cloned")
        assert "cloned assigned env %s from template %s" % (clone.name, template.name) in daemon.log
    finally:
        daemon.stop()
    built_tree, clone_tree, template_tree = tree(built), tree(clone), tree(template)
    # The same files, directories and symlinks, with the same modes and symlink targets.
    assert sorted(built_tree) == sorted(clone_tree)
    for relative, (kind, detail) in built_tree.items():
        other_kind, other = clone_tree[relative]
        assert kind == other_kind, relative
        if kind in ("link", "dir"):
            assert detail == other, relative
            continue
        assert detail[0] == other[0], relative  # mode
        built_bytes, clone_bytes = (built / relative).read_bytes(), (clone / relative).read_bytes()
        if relative.endswith(".pyc") and detail[2] == 1:
            # The kernel extension's own .pyc: its header holds its source's mtime, written anew.
            built_bytes, clone_bytes = built_bytes[16:], clone_bytes[16:]
        # The same bytes, except that the venv's path names the clone.
        assert built_bytes.replace(built.name.encode(), clone.name.encode()) == clone_bytes, relative
        # Shared exactly where uv shared: a file uv linked from its cache (or a shared .pyc) is a
        # link of the template's, every file of the venv's own is the clone's alone.
        own_in_built = template_tree[relative][1][1] != detail[1]
        if own_in_built:
            assert other[2] == 1, relative
        else:
            assert other[1] == template_tree[relative][1][1], relative
    # Nobody else may write the template (uv makes a venv's .lock 0666; the clone gets that back).
    assert all(os.lstat(path).st_mode & 0o022 == 0 for path in template.rglob("*") if not path.is_symlink())
    # The files that name the venv's path were rewritten (what a grep of a uv venv finds).
    activate = (clone / "bin" / "activate").read_text()
    assert str(clone) in activate and template.name not in activate
    assert (clone / "bin" / "ipython").read_text().startswith("#!%s/bin/python" % clone)
    assert "'%s'" % clone in (clone / "bin" / "pip").read_text()
    # uv sees the same packages and a consistent env; the env works.
    listed = uv("pip", "list", "--python", str(built / "bin" / "python"), layout=layout)
    assert uv("pip", "list", "--python", str(clone / "bin" / "python"), layout=layout) == listed.replace(
        built.name, clone.name)
    assert "All installed packages are compatible" in uv(
        "pip", "check", "--python", str(clone / "bin" / "python"), layout=layout)
    run = subprocess.run([str(clone / "bin" / "python"), "-c", "import ipykernel, sys; print(sys.prefix)"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.strip() == str(clone), run.stderr


def test_installs_and_writes_in_a_clone_change_neither_the_template_nor_other_venvs(layout: Layout) -> None:
    daemon = Daemon(layout, "--pool-size", "0").start()
    try:
        acquire(layout, "first")  # uv-built; the template is taken from it
        template = templates(layout)[0]
        changed, bystander = acquire(layout, "changed"), acquire(layout, "bystander")
        before = {"template": contents(template), "bystander": contents(bystander)}
        # Install, upgrade and downgrade, uninstall a package the template ships, through the shim's op.
        pip(layout, changed, "install", "six==1.16.0")
        pip(layout, changed, "install", "six==1.17.0")
        pip(layout, changed, "install", "packaging==24.1")
        pip(layout, changed, "uninstall", "wcwidth")
        pip(layout, changed, "install", "--upgrade", "traitlets<5.14")  # a downgrade of a shipped one
        # What a kernel writes: bytecode (every .pyc rewritten), and its own files.
        subprocess.run([str(changed / "bin" / "python"), "-m", "compileall", "-q", "-f",
                        str(next(changed.glob("lib/python*/site-packages")))],
                       check=False, timeout=600, env=dict(os.environ, PYTHONDONTWRITEBYTECODE=""))
        assert "Would uninstall" not in uv("pip", "list", "--python", str(changed / "bin" / "python"),
                                            layout=layout)
    finally:
        daemon.stop()
    assert contents(template) == before["template"]
    assert contents(bystander) == before["bystander"]
    listed = uv("pip", "list", "--python", str(changed / "bin" / "python"), layout=layout)
    assert "six" in listed and "wcwidth" not in listed and "24.1" in listed
    assert "wcwidth" in uv("pip", "list", "--python", str(bystander / "bin" / "python"), layout=layout)


def test_a_burst_of_new_notebooks_gets_distinct_working_envs(layout: Layout) -> None:
    daemon = Daemon(layout, "--pool-size", "2").start()
    try:
        daemon.wait_pool_full()
        wait_until(lambda: templates(layout), 60, "the template")
        results: dict[int, Any] = {}

        def open_notebook(index: int) -> None:
            try:
                results[index] = acquire(layout, str(layout.notebook("class-%d.ipynb" % index)), "notebook")
            except Exception as exc:  # reported below
                results[index] = exc

        threads = [threading.Thread(target=open_notebook, args=(index,)) for index in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        assert not any(thread.is_alive() for thread in threads)
        paths = list(results.values())
        assert all(isinstance(path, Path) for path in paths), paths
        assert len(set(paths)) == 12
        for path in paths:
            run = subprocess.run(
                [str(path / "bin" / "python"), "-c", "import ipykernel, sys; print(sys.prefix)"],
                capture_output=True, text=True, timeout=120)
            assert run.returncode == 0 and run.stdout.strip() == str(path), run.stderr
        status = layout.status()
        assert status["kernels_started"]["pool"] + status["kernels_started"]["created"] == 12
        assert status["kernels_started"]["created"] >= 2 and daemon.log.count("cloned assigned env") >= 2
        assert "creating env for uid" not in daemon.log  # no uv build on demand: clones
        # Demand outran the pool: it keeps extra venvs for a while, filled in parallel.
        pool = status["pool"]
        assert pool["burst_extra"] >= 2
        wait_until(lambda: layout.status()["pool"]["ready"] >= 2 + pool["burst_extra"], 180,
                   "the pool to fill its burst extra")
    finally:
        daemon.stop()


def test_a_damaged_template_is_rebuilt_not_used(layout: Layout) -> None:
    daemon = Daemon(layout, "--pool-size", "0").start()
    try:
        acquire(layout, "first")
        damaged = templates(layout)[0]
        site = next(damaged.glob("lib/python*/site-packages"))
        subprocess.run(["rm", "-rf", str(site / "ipykernel")], check=True)
        env = acquire(layout, "after-damage")
        assert "template %s is not used any more" % damaged.name in daemon.log
        run = subprocess.run([str(env / "bin" / "python"), "-c", "import ipykernel"], capture_output=True,
                             timeout=120)
        assert run.returncode == 0, run.stderr
        # The uv build that replaced the clone gave a new template; the damaged one is removed.
        wait_until(lambda: [t.name for t in templates(layout)] not in ([], [damaged.name]), 60,
                   "a new template")
        wait_until(lambda: not damaged.exists(), 60, "the damaged template to be removed")
        clone = acquire(layout, "from-the-new-template")
        assert "cloned assigned env %s" % clone.name in daemon.log
    finally:
        daemon.stop()


# A stand-in for cp that waits at a gate: a template being taken or a clone being made stays
# half-done for as long as the test needs.
GATED_CP = """#!/bin/sh
touch "$UVK_TEST_GATE.reached"
while [ ! -e "$UVK_TEST_GATE" ]; do sleep 0.05; done
exec /bin/cp "$@"
"""


@pytest.mark.parametrize("stage", ["taking", "cloning"])
def test_a_daemon_killed_mid_take_or_mid_clone_leaves_nothing_half_made(layout: Layout, stage: str) -> None:
    bin_dir = layout.root / "gated-bin"
    bin_dir.mkdir()
    (bin_dir / "cp").write_text(GATED_CP)
    (bin_dir / "cp").chmod(0o755)
    gate = layout.root / "gate"
    gated_env = dict(layout.env, PATH="%s:%s" % (bin_dir, os.environ["PATH"]), UVK_TEST_GATE=str(gate))
    if stage == "cloning":
        ready = Daemon(layout, "--pool-size", "0").start()
        acquire(layout, "first")
        ready.stop()
        ready_template = templates(layout)
    daemon = Daemon(layout, "--pool-size", "0", env=gated_env).start()
    failures: list[BaseException] = []

    def half() -> None:
        try:
            acquire(layout, "half")
        except Exception as exc:  # the daemon is killed under it: expected
            failures.append(exc)

    waiter = threading.Thread(target=half, daemon=True)
    waiter.start()
    wait_until(lambda: Path(str(gate) + ".reached").exists(), 300, "cp to start")
    state_files = list((layout.venvs_dir / ".templates").glob("*.json"))
    if stage == "taking":
        assert any(json.loads(path.read_text())["state"] == "taking" for path in state_files)
    assert daemon.process is not None
    daemon.process.send_signal(signal.SIGKILL)
    daemon.process.wait(30)
    gate.touch()
    waiter.join(60)
    assert failures and not waiter.is_alive()
    restarted = Daemon(layout, "--pool-size", "0").start()
    try:
        status = layout.status()
        if stage == "taking":
            # The uv-built venv was still 'creating' and the template half-taken: both removed.
            wait_until(lambda: not templates(layout), 60, "the half-taken template to be removed")
            assert not list((layout.venvs_dir / ".templates").glob("*.json"))
            assert status["envs"]["total"] == 0 and not list(layout.venvs_dir.glob("e-*"))
        else:
            # The half-made clone was removed; the ready template is kept and used.
            assert templates(layout) == ready_template
            assert status["envs"]["total"] == 1 and len(list(layout.venvs_dir.glob("e-*"))) == 1
            clone = acquire(layout, "after-restart")
            assert "cloned assigned env %s" % clone.name in restarted.log
        assert not list(layout.venvs_dir.glob(".quarantine/*"))
    finally:
        restarted.stop()


def test_a_template_directory_nobody_took_is_moved_aside_not_deleted(layout: Layout) -> None:
    stray = layout.venvs_dir / "t-0123456789ab"
    (stray / "bin").mkdir(parents=True)
    (stray / "keep-me").write_text("not ours")
    daemon = Daemon(layout, "--pool-size", "0").start()
    try:
        moved = list(layout.venvs_dir.glob(".quarantine/t-0123456789ab-*"))
        assert len(moved) == 1 and (moved[0] / "keep-me").read_text() == "not ours"
        assert "template directory %s has no state file" % stray in daemon.log
    finally:
        daemon.stop()


def test_pool_size_for_a_known_peak_fills_with_clones_in_parallel(layout: Layout) -> None:
    from helpers import ctl

    daemon = Daemon(layout, "--pool-size", "1").start()
    try:
        daemon.wait_pool_full()
        wait_until(lambda: templates(layout), 60, "the template")
        result = ctl(layout, "pool", "--size", "6", "--fill", "--wait", "--timeout", "300")
        assert result.returncode == 0, result.stderr
        pool = layout.status()["pool"]
        assert pool["ready"] == 6 and pool["target"] == 6
        log = daemon.log
        cloned = log.count("cloned pooled env")
        assert cloned == 5 and "creating env" not in log
        # Clones are not serialized like uv builds: a second copy started before the first ended.
        first_done = log.index("cloned pooled env")
        assert log[:first_done].count("running cp -a -l") >= 2
        assert ctl(layout, "pool", "--size", "1").returncode == 0
        wait_until(lambda: layout.status()["pool"]["ready"] == 1, 60, "the pool to give back 5 venvs")
    finally:
        daemon.stop()


def test_the_venvs_dir_spreads_new_venvs_over_block_groups(layout: Layout) -> None:
    filesystem = subprocess.run(["stat", "-f", "-c", "%T", "/tmp"], capture_output=True, text=True, timeout=9)
    if filesystem.stdout.strip() != "ext2/ext3":
        pytest.skip("the top-directory flag is ext2/3/4's")
    daemon = Daemon(layout, "--pool-size", "0").start()
    try:
        flags = subprocess.run(
            ["lsattr", "-d", str(layout.venvs_dir)], capture_output=True, text=True, timeout=30)
        assert "T" in flags.stdout.split()[0], flags.stdout
    finally:
        daemon.stop()


def test_kernel_files_never_write_into_a_file_shared_with_other_venvs(tmp_path: Path) -> None:
    # uv links a wheel's scripts (a `uv` dependency ships bin/uv) from its cache, and a clone
    # links what its template has: writing the shim into that inode would change the cache's
    # file and every venv's. The kernel files are new files put in place by rename.
    from uvkerneld import venvfiles

    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "lib" / "python3.11" / "site-packages").mkdir(parents=True)
    (venv / "etc" / "ipython").mkdir(parents=True)
    shared = {}
    for relative in ("bin/uv", "bin/pip", "etc/ipython/ipython_kernel_config.py",
                     "lib/python3.11/site-packages/%s.py" % venvfiles.EXTENSION_MODULE):
        cache_copy = tmp_path / "cache" / relative
        cache_copy.parent.mkdir(parents=True, exist_ok=True)
        cache_copy.write_bytes(b"the cache's file")
        os.link(cache_copy, venv / relative)
        shared[relative] = cache_copy
    venvfiles.write_kernel_files(venv)
    for relative, cache_copy in shared.items():
        assert cache_copy.read_bytes() == b"the cache's file", relative
        assert (venv / relative).stat().st_ino != cache_copy.stat().st_ino, relative
        assert (venv / relative).read_bytes() != b"the cache's file", relative
    assert os.access(venv / "bin" / "uv", os.X_OK)
    assert not [path for path in venv.rglob("*.uvkerneld-new")]


def test_a_template_being_removed_is_never_taken_for_ready_again(tmp_path: Path, monkeypatch: Any) -> None:
    # The daemon is killed while a retired template's files are being deleted: the state file must
    # no longer say "ready", or the next start would clone from a half-deleted tree.
    import asyncio

    from uvkerneld import templates as templates_module

    venvs_dir = tmp_path / "venvs"
    path = venvs_dir / "t-0123456789ab"
    (path / "lib").mkdir(parents=True)
    templates = templates_module.Templates(venvs_dir, None, enabled=True)  # type: ignore[arg-type]
    state_file = templates.state_dir / (path.name + ".json")
    templates._write_state(state_file, {"state": "ready", "spec": "s", "own": [], "top_level": []})

    async def killed_mid_removal(_path: Path) -> None:
        raise KeyboardInterrupt("the daemon was killed here")

    monkeypatch.setattr(templates_module, "remove_tree", killed_mid_removal)
    with pytest.raises(KeyboardInterrupt):
        asyncio.run(templates._remove(path, state_file))
    assert json.loads(state_file.read_text())["state"] == "removing"
