"""uvkernelctl against a real daemon with real envs: the values, not only that it ran."""

from __future__ import annotations

import json
import os
import platform
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import Daemon, Layout, ctl, register_envs, run_code, running_kernel, wait_until


def ctl_json(layout: Layout, *args: str) -> Any:
    result = ctl(layout, *args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def acquire(layout: Layout, kind: str, value: str) -> str:
    return layout.request("acquire", {"key": {"kind": kind, "value": value}}, timeout=300)["path"]


def age(layout: Layout, env_path: str, days: float) -> None:
    """Pretend an env was last used ``days`` ago (the store is real SQLite, shared in WAL mode)."""
    with sqlite3.connect(layout.state_dir / "state.db") as db:
        db.execute("UPDATE envs SET last_used_at=? WHERE path=?", (time.time() - days * 86400, env_path))


@pytest.fixture
def ctl_daemon(layout: Layout) -> Iterator[Daemon]:
    running = Daemon(layout, "--pool-size", "0").start()
    yield running
    running.stop()


def wait_disk_fresh(layout: Layout, after: float) -> dict[str, Any]:
    return wait_until(
        lambda: (lambda disk: disk if (disk.get("computed_at") or 0) > after else None)(
            layout.status()["disk"]),
        120, "a disk usage scan", interval=0.2,
    )


def du(path: Path, *flags: str) -> int:
    return int(subprocess.run(["du", "-s", "-B1", *flags, str(path)], capture_output=True, text=True,
                              check=True, timeout=120).stdout.split()[0])


@pytest.mark.slow
def test_list_and_status_count_envs_and_live_kernels(
    ctl_daemon: Daemon, layout: Layout, kernelspec: str
) -> None:
    notebook = layout.notebook("live.ipynb")
    acquire(layout, "env", "first")
    acquire(layout, "env", "second")
    with running_kernel(layout, kernelspec, JPY_SESSION_NAME=str(notebook)) as (_, kernel):
        prefix = run_code(kernel, "import sys; print(sys.prefix)").strip()
        rows = {row["path"]: row for row in ctl_json(layout, "list")}
        assert len(rows) == 3
        assert rows[prefix]["live"] is True
        assert rows[prefix]["key"] == {"kind": "notebook", "value": str(notebook)}
        assert [row["live"] for path, row in rows.items() if path != prefix] == [False, False]
        assert all(row["owner_uid"] == os.getuid() and row["state"] == "assigned" for row in rows.values())
        status = ctl_json(layout, "status")
        assert status["envs"]["total"] == 3 and status["envs"]["live"] == 1
        table = ctl(layout, "list").stdout
        assert str(notebook) in table and "env:first" in table and "yes" in table
        # The PYTHON column: each venv's version (the daemon builds them with this interpreter).
        assert table.splitlines()[0].split()[4] == "PYTHON"  # after "NOTEBOOK / KEY" and "OWNER"
        assert [line.split()[2] for line in table.splitlines()[1:]] == [platform.python_version()] * 3
    wait_until(lambda: ctl_json(layout, "status")["envs"]["live"] == 0, 30, "the kernel to be seen gone")
    assert all(row["live"] is False for row in ctl_json(layout, "list"))


def test_live_kernel_is_remembered_across_a_daemon_restart(layout: Layout, kernelspec: str) -> None:
    daemon = Daemon(layout, "--pool-size", "0").start()
    try:
        with running_kernel(layout, kernelspec, UVKERNEL_ENV="survivor"):
            assert daemon.stop() == 0
            daemon = Daemon(layout, "--pool-size", "0").start()
            # The lifeline died with the old daemon, but the kernel still runs: gc must keep its env.
            assert layout.status()["envs"]["live"] == 1
            result = ctl(layout, "gc", "--older-than", "0s", "--yes")
            assert result.returncode == 0, result.stderr
            assert "kept" in result.stdout and "a kernel is running in it" in result.stdout
            assert [row["key"]["value"] for row in ctl_json(layout, "list")] == ["survivor"]
    finally:
        daemon.stop()


def test_gc_removes_exactly_the_old_and_orphaned_envs(ctl_daemon: Daemon, layout: Layout) -> None:
    old = acquire(layout, "env", "old")
    recent = acquire(layout, "env", "recent")
    gone_notebook = layout.notebook("deleted.ipynb")
    orphan = acquire(layout, "notebook", str(gone_notebook))
    gone_notebook.unlink()
    age(layout, old, 40)
    before = {row["path"] for row in ctl_json(layout, "list")}
    assert before == {old, recent, orphan}

    dry = ctl(layout, "gc", "--older-than", "30d", "--orphans", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would remove 2 env(s)" in dry.stdout
    assert "unused for 40d" in dry.stdout and "its notebook no longer exists" in dry.stdout
    assert {row["path"] for row in ctl_json(layout, "list")} == before  # --dry-run removed nothing
    assert all(os.path.isdir(path) for path in before)

    refused = ctl(layout, "gc", "--older-than", "30d", "--orphans")
    assert refused.returncode == 2 and "add --yes" in refused.stderr  # no terminal to confirm on

    done = ctl(layout, "gc", "--older-than", "30d", "--orphans", "--yes")
    assert done.returncode == 0, done.stderr
    assert "removed 2 env(s), freed" in done.stdout and "uv cache prune" in done.stdout
    assert {row["path"] for row in ctl_json(layout, "list")} == {recent}
    assert not os.path.exists(old) and not os.path.exists(orphan) and os.path.isdir(recent)


def test_gc_rejects_a_bad_duration(ctl_daemon: Daemon, layout: Layout) -> None:
    result = ctl(layout, "gc", "--older-than", "a fortnight")
    assert result.returncode == 2
    assert "duration 'a fortnight' is not valid: use a number with s, m, h, d or w" in result.stderr


def test_show_export_and_rm(ctl_daemon: Daemon, layout: Layout) -> None:
    notebook = layout.notebook("pinned.ipynb")
    env_path = acquire(layout, "notebook", str(notebook))
    result = layout.request("pip", {"env": env_path, "argv": ["install", "six==1.16.0"]}, timeout=300)
    assert result["exit_status"] == 0
    shown = ctl_json(layout, "show", str(notebook))
    assert shown["path"] == env_path and shown["requirement_list"] == ["six==1.16.0"]
    assert "six==1.16.0" in shown["freeze"]
    assert any(line.startswith("ipykernel==") for line in shown["freeze"])
    exported = ctl(layout, "export", str(notebook))
    assert exported.returncode == 0
    pins = [line for line in exported.stdout.splitlines() if not line.startswith("#")]
    assert "six==1.16.0" in pins and all("==" in line for line in pins)
    # The same env by id and by a relative notebook path.
    assert ctl_json(layout, "show", shown["env_id"])["path"] == env_path
    relative = subprocess.run([sys.executable, "-m", "uvkerneld.ctl", "show", "pinned.ipynb", "--json"],
                              env=layout.env, cwd=str(layout.notebooks), capture_output=True, text=True,
                              timeout=300)
    assert json.loads(relative.stdout)["path"] == env_path
    removed = ctl(layout, "rm", str(notebook))
    assert removed.returncode == 0 and "removed %s, freed" % shown["env_id"] in removed.stdout
    assert not os.path.exists(env_path)
    missing = ctl(layout, "rm", str(notebook))
    assert missing.returncode == 4 and "has no env for notebook:%s" % notebook in missing.stderr
    assert ctl(layout, "show", "e-000000000000").returncode == 4  # not found, as for rm


def test_rm_refuses_an_env_with_a_running_kernel(ctl_daemon: Daemon, layout: Layout, kernelspec: str) -> None:
    with running_kernel(layout, kernelspec, UVKERNEL_ENV="busy"):
        result = ctl(layout, "rm", "busy")
        assert result.returncode == 3 and "has a running kernel; shut the kernel down first" in result.stderr


def test_disk_figures_match_du_with_hardlinks_counted_once(ctl_daemon: Daemon, layout: Layout) -> None:
    started = time.time()
    envs = [acquire(layout, "env", "disk-%d" % index) for index in range(3)]
    disk = wait_disk_fresh(layout, after=max(started, time.time()))
    real = du(layout.venvs_dir)
    apparent = du(layout.venvs_dir, "--apparent-size", "--count-links")
    linked = du(layout.venvs_dir, "--count-links")
    cache = du(layout.cache_dir)
    print("venvs real %d (du %d), apparent %d (du %d), cache %d (du %d), dedup %s" % (
        disk["venvs_real_bytes"], real, disk["venvs_apparent_bytes"], apparent, disk["cache_bytes"], cache,
        disk["dedup_ratio"]))
    assert abs(disk["venvs_real_bytes"] - real) <= 0.05 * real
    assert abs(disk["venvs_apparent_bytes"] - apparent) <= 0.05 * apparent
    assert abs(disk["venvs_linked_bytes"] - linked) <= 0.05 * linked
    assert abs(disk["cache_bytes"] - cache) <= 0.05 * cache
    assert disk["venvs_linked_bytes"] > 2 * disk["venvs_real_bytes"]  # 3 venvs shared their files
    assert disk["dedup_ratio"] > 2
    # Beyond the cache a venv holds only its own directories (4 KiB each, never shared), scripts,
    # RECORD files and config: issue 6's target is <= 10 MB per env.
    assert disk["venvs_beyond_cache_bytes"] / len(envs) < 10 * 1024 * 1024
    rows = {row["path"]: row for row in ctl_json(layout, "list")}
    for env_path in envs:
        assert abs(rows[env_path]["disk_bytes"] - du(Path(env_path))) <= 0.05 * du(Path(env_path))


def test_status_with_a_thousand_envs(layout: Layout) -> None:
    register_envs(layout, 1000)
    daemon = Daemon(layout, "--pool-size", "0").start()
    try:
        started = time.perf_counter()
        status = layout.status()
        elapsed = time.perf_counter() - started
        print("status with 1000 envs answered in %.1f ms" % (elapsed * 1000))
        assert status["envs"]["total"] == 1000
        assert elapsed < 1.0  # a sanity bound; bench/ reports the real figure
        assert len(ctl_json(layout, "list")) == 1000
    finally:
        daemon.stop()


def test_pool_resize_and_fill_with_progress(ctl_daemon: Daemon, layout: Layout) -> None:
    result = ctl(layout, "pool", "--size", "2", "--fill", "--wait")
    filled_at = time.time()
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == "pool: 2/2 ready"
    assert any("building" in line or "0/2" in line for line in lines[:-1])
    # `status` counts the pool's venvs in its disk figures soon after they were built, not at the
    # next periodic scan (5 min): a pool build marks the figures stale.
    disk = wait_until(lambda: (lambda d: d if (d.get("computed_at") or 0) > filled_at else None)(
        layout.status()["disk"]), 30, "a disk scan after the pool filled", interval=0.2)
    assert disk["envs_scanned"] == 2
    # Shrinking waits until the extra venv is really gone.
    result = ctl(layout, "pool", "--size", "1", "--fill", "--wait")
    assert result.stdout.strip().splitlines()[-1] == "pool: 1/1 ready"
    assert layout.status()["pool"]["ready"] == 1
    wait_until(lambda: len(list(layout.venvs_dir.glob("e-*"))) == 1, 30, "the extra venv's files to go")
    trimmed_at = time.time()
    disk = wait_until(lambda: (lambda d: d if (d.get("computed_at") or 0) > trimmed_at else None)(
        layout.status()["disk"]), 30, "a disk scan after the pool shrank", interval=0.2)
    assert disk["envs_scanned"] == 1


def test_output_into_a_closed_pipe_is_not_a_traceback(ctl_daemon: Daemon, layout: Layout) -> None:
    # `uvkernelctl list --json | head -c 10` with more output than a pipe holds (64 KiB): head
    # leaves after 10 bytes and uvkernelctl's next write fails with EPIPE.
    register_envs(layout, 400)
    result = subprocess.run(
        "%s -m uvkerneld.ctl list --json | head -c 10 >/dev/null; exit ${PIPESTATUS[0]}" % sys.executable,
        shell=True, executable="/bin/bash", env=layout.env, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 141, result.stderr
    assert result.stderr == ""


def test_doctor_passes_on_a_good_setup(ctl_daemon: Daemon, layout: Layout, kernelspec: str) -> None:
    acquire(layout, "env", "sample")
    result = ctl(layout, "doctor")
    assert result.returncode == 0, result.stdout
    verdicts = {line.split()[1]: line.split()[0] for line in result.stdout.splitlines()
                if line[:4] in ("PASS", "WARN", "FAIL")}
    assert verdicts["uv"] == verdicts["daemon"] == verdicts["kernelspec"] == "PASS"
    assert verdicts["same"] == verdicts["link"] == verdicts["bytecode"] == "PASS"


def test_doctor_fails_without_a_kernelspec_or_a_daemon(layout: Layout) -> None:
    result = ctl(layout, "doctor", "--kernel", "no-such-kernel", "--json")
    assert result.returncode == 6
    checks = {check["check"]: check for check in json.loads(result.stdout)}
    assert checks["kernelspec"]["verdict"] == "FAIL"
    assert "uvkernelctl install-kernelspec" in checks["kernelspec"]["fix"]
    assert checks["daemon"]["verdict"] == "FAIL" and "not running" in checks["daemon"]["detail"]


def test_doctor_fails_when_cache_and_venvs_are_on_different_filesystems(
    layout: Layout, kernelspec: str
) -> None:
    other = Path("/dev/shm")
    if not other.is_dir() or os.stat(other).st_dev == os.stat(layout.root).st_dev:
        pytest.skip("no second filesystem (tmpfs /dev/shm) on this machine")
    venvs = Path(__import__("tempfile").mkdtemp(prefix="uvk-venvs-", dir=str(other)))
    env = dict(layout.env, UVKERNELD_VENVS_DIR=str(venvs))
    daemon = Daemon(layout, "--pool-size", "0", env=env).start()
    try:
        acquire(layout, "env", "copied")
        result = ctl(layout, "doctor", "--json", env=env)
        assert result.returncode == 6
        checks = {check["check"]: check for check in json.loads(result.stdout)}
        assert checks["same filesystem"]["verdict"] == "FAIL"
        assert "different filesystems" in checks["same filesystem"]["detail"]
        assert checks["link mode"]["verdict"] == "FAIL"  # uv really did copy
        assert layout.status()["link_fallback_seen"] is True
    finally:
        daemon.stop()
        __import__("shutil").rmtree(venvs, ignore_errors=True)
