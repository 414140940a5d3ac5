"""Nothing lost: a lost or damaged store, a second daemon, a killed daemon, a damaged pool venv and
private state files. Real daemons, real uv, real other uids."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import Daemon, Layout, ctl, process_alive, processes_matching, register_envs, wait_until

from uvkerneld import protocol
from uvkerneld.uv import find_uv

KEY_A = {"kind": "env", "value": "a"}
OTHER_UID = 61001
OTHER_PYTHON = shutil.which("python3", path="/usr/bin") or "/usr/bin/python3"  # not under /root


def env_dirs(layout: Layout) -> list[str]:
    return sorted(entry.name for entry in layout.venvs_dir.glob("e-*"))


def env_record(layout: Layout, env_id: str) -> Path:
    return layout.venvs_dir / ".records" / (env_id + ".json")


def daemon_argv(layout: Layout, *extra: str) -> list[str]:
    return [sys.executable, "-m", "uvkerneld", "--pool-size", "0", *extra]


def test_a_zero_byte_store_next_to_venvs_deletes_nothing_and_the_records_are_rebuilt(layout: Layout) -> None:
    daemon = Daemon(layout, "--pool-size", "1").start()
    try:
        daemon.wait_pool_full()
        first = layout.request("acquire", {"key": KEY_A})
        installed = layout.request("pip", {"env": first["path"], "argv": ["install", "six==1.16.0"]},
                                   timeout=300)
        assert installed["exit_status"] == 0
        daemon.wait_pool_full()
    finally:
        daemon.stop()
    before = env_dirs(layout)
    assert len(before) == 2
    # A disk hiccup or a user's mistake: the store is now empty.
    for name in ("state.db-wal", "state.db-shm"):
        (layout.state_dir / name).unlink(missing_ok=True)
    (layout.state_dir / "state.db").write_bytes(b"")
    daemon = Daemon(layout, "--pool-size", "1").start()
    try:
        assert env_dirs(layout) == before  # nothing deleted
        again = layout.request("acquire", {"key": KEY_A})
        assert (again["env_id"], again["source"]) == (first["env_id"], "known")
        status = layout.status()
        assert status["pool"]["ready"] == 1 and status["quarantine"] == []
        assert any("rebuilt 2 env record(s)" in error["message"] for error in status["errors"])
        # What the user asked for came back with the env: a damaged env is still rebuilt with it.
        assert layout.request("installs", {"env_id": first["env_id"]})["requirements"] == ["six==1.16.0"]
        record = json.loads(env_record(layout, first["env_id"]).read_text())
        assert record["id"] == first["env_id"] and record["key"] == ["env", "a"]
        assert env_record(layout, first["env_id"]).stat().st_mode & 0o777 == 0o600
        assert (layout.venvs_dir / ".records").stat().st_mode & 0o777 == 0o700
    finally:
        daemon.stop()


def test_a_corrupt_store_is_one_line_and_exit_status_1_and_nothing_is_touched(layout: Layout) -> None:
    layout.state_dir.mkdir(parents=True)
    layout.venvs_dir.mkdir(parents=True)
    (layout.venvs_dir / "e-00000000000a").mkdir()
    (layout.state_dir / "state.db").write_bytes(b"this is not a database" * 100)
    result = subprocess.run(daemon_argv(layout), env=layout.env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if "ERROR" in line]
    state_db = layout.state_dir / "state.db"
    assert "state db %s cannot be used (file is not a database): move it aside" % state_db in line
    assert env_dirs(layout) == ["e-00000000000a"]


def test_a_second_daemon_with_another_store_is_refused_the_venvs_dir(layout: Layout) -> None:
    daemon = Daemon(layout, "--pool-size", "1").start()
    other = ["--state-dir", str(layout.root / "state2"), "--socket", str(layout.root / "d2.sock")]
    try:
        daemon.wait_pool_full()
        assigned = layout.request("acquire", {"key": KEY_A})
        result = subprocess.run(daemon_argv(layout, *other), env=layout.env, capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 1
        assert ("venvs dir %s is in use by another uvkerneld (state dir %s): "
                "each daemon needs its own --venvs-dir"
                % (layout.venvs_dir, layout.state_dir)) in result.stderr
        assert os.path.isfile(assigned["python"])
    finally:
        daemon.stop()
    # Not running is not enough: the venvs dir still belongs to the first store.
    result = subprocess.run(daemon_argv(layout, *other), env=layout.env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1
    assert ("venvs dir %s belongs to the uvkerneld whose state dir is %s"
            % (layout.venvs_dir, layout.state_dir)) in result.stderr
    assert "Traceback" not in result.stderr
    assert os.path.isfile(assigned["python"])


def test_a_directory_the_store_cannot_account_for_is_moved_aside_never_deleted(layout: Layout) -> None:
    stranger = layout.venvs_dir / "e-0123456789ab"
    (stranger / "bin").mkdir(parents=True)
    (stranger / "bin" / "notes.txt").write_text("someone's work")
    # A record that does not describe its own directory is not trusted either (the store is empty:
    # the daemon tries to rebuild records from what the venvs carry).
    forged = layout.venvs_dir / "e-0123456789ac"
    forged.mkdir()
    (forged / ".uvkerneld-env.json").write_text(json.dumps({"id": "e-0123456789ac", "key": "not a key"}))
    daemon = Daemon(layout, "--pool-size", "0").start()
    try:
        status = layout.status()
        quarantined = [Path(path).name.rsplit("-", 1)[0] for path in status["quarantine"]]
        assert quarantined == [stranger.name, forged.name]
        assert status["envs"]["total"] == 0
        moved = status["quarantine"][0]
        assert Path(moved).parent == layout.venvs_dir / ".quarantine"
        assert (Path(moved) / "bin" / "notes.txt").read_text() == "someone's work"
        assert not stranger.exists()
        assert any("moved aside" in error["message"] for error in status["errors"])
        assert "2 unknown dir(s) moved aside, never deleted: %s" % moved in ctl(layout, "status").stdout
    finally:
        daemon.stop()


# Holds `uv venv` (or `uv pip install`) in flight; leaves a grandchild behind, as a build backend
# uv started would be: PR_SET_PDEATHSIG reaches uv itself, not what uv started.
HELD_UV = """#!/bin/sh
if [ "$1" = "$UVK_TEST_HOLD" ] || [ "$1 $2" = "$UVK_TEST_HOLD" ]; then
    sleep 3600 &
    while [ ! -e "$UVK_TEST_GATE" ]; do sleep 0.05; done
fi
exec "$UVK_TEST_REAL_UV" "$@"
"""


def _group_leader(pid: int) -> bool:
    try:
        return os.getpgid(pid) == pid
    except ProcessLookupError:
        return False


@pytest.mark.parametrize("held", ["venv", "pip install"])
def test_after_kill_9_no_uv_outlives_the_daemon_and_the_restart_is_consistent(
    layout: Layout, held: str
) -> None:
    fake_uv = layout.root / "held-uv"
    fake_uv.write_text(HELD_UV)
    fake_uv.chmod(0o755)
    gate = layout.root / "gate"
    env = dict(layout.env, UVKERNELD_UV=str(fake_uv), UVK_TEST_GATE=str(gate), UVK_TEST_REAL_UV=find_uv(None),
               UVK_TEST_HOLD=held)
    daemon = Daemon(layout, "--pool-size", "1", env=env).start()
    grandchild: list[int] = []
    try:
        # The daemon starts each uv as the leader of its own process group; the script's forks
        # (for `sleep`) briefly share its command line, so match the leader only.
        (uv_pid,) = wait_until(lambda: [pid for pid in processes_matching(str(fake_uv), held)
                                        if _group_leader(pid)], 60, "uv %s in flight" % held)
        grandchild = wait_until(lambda: [pid for pid in processes_matching("sleep 3600")
                                         if os.getpgid(pid) == uv_pid], 30, "uv's own child")
        assert daemon.process is not None
        daemon.process.send_signal(signal.SIGKILL)
        daemon.process.wait(30)
        wait_until(lambda: not process_alive(uv_pid), 10, "uv to die with the daemon")
        restarted = Daemon(layout, "--pool-size", "0").start()
        try:
            # What uv had started is gone too, before recovery looked at the venvs dir.
            # Only the restarted daemon kills it: its parent uv had died, and it ignores the daemon's death.
            wait_until(lambda: not process_alive(grandchild[0]), 30, "uv's child to be stopped")
            status = layout.status()
            assert status["envs"]["by_state"]["creating"] == 0
            assert env_dirs(layout) == [] and status["quarantine"] == []
            gate.touch()  # had uv survived, it would now finish and re-create the venv
            children = layout.state_dir / "children"
            assert not children.exists() or json.loads(children.read_text()) == {}
        finally:
            restarted.stop()
        assert env_dirs(layout) == []
    finally:
        gate.touch()
        for pid in grandchild:
            if process_alive(pid):
                os.kill(pid, signal.SIGKILL)
        daemon.stop()


def pooled_ids(layout: Layout) -> list[str]:
    db = sqlite3.connect(str(layout.state_dir / "state.db"))
    try:
        return [row[0] for row in db.execute("SELECT id FROM envs WHERE state='pooled' ORDER BY created_at")]
    finally:
        db.close()


def test_a_pool_venv_that_lost_its_interpreter_is_never_handed_out(layout: Layout) -> None:
    daemon = Daemon(layout, "--pool-size", "2").start()
    try:
        daemon.wait_pool_full()
        oldest, newest = pooled_ids(layout)
        (layout.venvs_dir / oldest / "bin" / "python").unlink()
        result = layout.request("acquire", {"key": KEY_A})
        assert result["env_id"] == newest and result["source"] == "pool"
        wait_until(lambda: not (layout.venvs_dir / oldest).exists(), 30,
                   "the damaged pool venv to be removed")
        status = layout.status()
        assert any("pooled env %s had lost its interpreter" % oldest in error["message"]
                   for error in status["errors"])
        daemon.wait_pool_full()
    finally:
        daemon.stop()


def test_no_file_in_the_state_dir_or_an_env_record_is_readable_by_another_user(layout: Layout) -> None:
    daemon = Daemon(layout, "--pool-size", "1").start()
    try:
        daemon.wait_pool_full()
        secret = str(layout.notebook("secret.ipynb"))
        acquired = layout.request("acquire", {"key": {"kind": "notebook", "value": secret}})
        # As on a host where the folders are traversable (system mode's venvs are world-readable).
        for folder in (layout.root, layout.state_dir, layout.venvs_dir):
            folder.chmod(0o755)
        files = sorted(str(path) for path in layout.state_dir.iterdir())
        assert {"state.db", "state.db-wal", "state.db-shm", "uvkerneld.pid"} <= {Path(f).name for f in files}
        files += [str(env_record(layout, acquired["env_id"])), str(layout.venvs_dir / ".uvkerneld-owner")]
        probe = (
            "import sys\n"
            "opened, missing = [], []\n"
            "for path in sys.argv[1:]:\n"
            "    try:\n"
            "        open(path, 'rb').close(); opened.append(path)\n"
            "    except PermissionError:\n"
            "        pass\n"
            "    except FileNotFoundError:\n"
            "        missing.append(path)\n"
            "print(opened); print(missing)\n"
        )
        result = subprocess.run([OTHER_PYTHON, "-I", "-c", probe, *files], user=OTHER_UID, group=OTHER_UID,
                                extra_groups=[], capture_output=True, text=True, timeout=60, cwd="/")
        assert result.returncode == 0, result.stderr
        readable, missing = result.stdout.splitlines()
        assert readable == "[]"
        assert missing == "[]"
        assert os.path.isfile(acquired["python"])  # the venv itself stays readable
    finally:
        daemon.stop()


# --- a full disk ------------------------------------------------------------------------------

@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A real tiny filesystem at ``path`` (root can mount tmpfs here)."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=%s,mode=0700" % size, "tmpfs", str(path)],
                   check=True, timeout=30)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True, timeout=30)


def fill(folder: Path) -> Path:
    """Take every free byte of ``folder``'s filesystem."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as handle:
        for size in (1 << 20, 4096, 1):
            try:
                while True:
                    handle.write(b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    return filler


def test_a_build_on_a_full_venvs_disk_gets_a_clear_error_leaves_nothing_and_a_restart_works(
    layout: Layout
) -> None:
    with tmpfs(layout.venvs_dir, "8m"):
        daemon = Daemon(layout, "--pool-size", "0").start()
        try:
            with pytest.raises(protocol.UvkError) as raised:
                layout.request("acquire", {"key": KEY_A}, timeout=300)
            assert raised.value.code == "env_unavailable"
            assert "no space left on the disk of %s (" % layout.venvs_dir in raised.value.message
            assert "a new venv needs about" in raised.value.message
            assert env_dirs(layout) == []  # the half-made venv is gone
            status = layout.status()  # still serving
            assert [entry["folder"] for entry in status["disk_full"]] == [str(layout.venvs_dir)]
            assert any("no space left" in error["message"] for error in status["errors"])
            assert any(line.startswith("disk full") and "%s: " % layout.venvs_dir in line
                       for line in ctl(layout, "status").stdout.splitlines())
        finally:
            daemon.stop()
        fill(layout.venvs_dir)
        daemon = Daemon(layout, "--pool-size", "0").start()
        try:
            assert layout.status()["envs"]["by_state"]["creating"] == 0
        finally:
            daemon.stop()


def test_a_full_state_folder_keeps_known_notebooks_starting_and_says_so(layout: Layout) -> None:
    with tmpfs(layout.state_dir, "2m"):
        daemon = Daemon(layout, "--pool-size", "1").start()
        try:
            daemon.wait_pool_full()
            first = layout.request("acquire", {"key": KEY_A})
            daemon.wait_pool_full()
            filler = fill(layout.state_dir)
            again = layout.request("acquire", {"key": KEY_A})
            assert (again["env_id"], again["source"]) == (first["env_id"], "known")
            with pytest.raises(protocol.UvkError) as raised:
                layout.request("acquire", {"key": {"kind": "env", "value": "b"}})
            assert raised.value.code == "env_unavailable"
            assert "the state folder %s is full" % layout.state_dir in raised.value.message
            status = layout.status()
            assert str(layout.state_dir) in [entry["folder"] for entry in status["disk_full"]]
        finally:
            daemon.stop()
        # A restart on the full disk works and still knows the notebook.
        daemon = Daemon(layout, "--pool-size", "1").start()
        try:
            again = layout.request("acquire", {"key": KEY_A})
            assert (again["env_id"], again["source"]) == (first["env_id"], "known")
            filler.unlink()
            second = layout.request("acquire", {"key": {"kind": "env", "value": "b"}}, timeout=300)
            assert second["source"] in ("pool", "created")
        finally:
            daemon.stop()


def test_a_build_failing_on_a_full_disk_while_the_state_folder_is_full_too_is_cleaned_up(
    layout: Layout
) -> None:
    fake_uv = layout.root / "held-uv"
    fake_uv.write_text(HELD_UV.replace("    sleep 3600 &\n", ""))
    fake_uv.chmod(0o755)
    gate = layout.root / "gate"
    env = dict(layout.env, UVKERNELD_UV=str(fake_uv), UVK_TEST_GATE=str(gate), UVK_TEST_REAL_UV=find_uv(None),
               UVK_TEST_HOLD="pip install")
    with tmpfs(layout.state_dir, "2m"), tmpfs(layout.venvs_dir, "16m"):
        daemon = Daemon(layout, "--pool-size", "1", env=env).start()
        try:
            wait_until(lambda: processes_matching(str(fake_uv), "pip install"), 60,
                       "the pool build's install")
            (half_made,) = env_dirs(layout)
            state_filler, venvs_filler = fill(layout.state_dir), fill(layout.venvs_dir)
            gate.touch()
            last_error = wait_until(lambda: layout.status()["pool"]["last_error"], 120, "the build to fail")
            assert "no space left on the disk of %s" % layout.venvs_dir in last_error
            errors = [error["message"] for error in layout.status()["errors"]]
            assert any("stays 'creating' in the store until the next start" in e for e in errors), errors
            assert half_made not in env_dirs(layout)  # removed although the store could not be written
        finally:
            daemon.stop()
        # The row is still 'creating' (the store was full); a restart on the full disks works.
        daemon = Daemon(layout, "--pool-size", "0").start()
        try:
            assert layout.status()["envs"]["by_state"]["creating"] == 1
        finally:
            daemon.stop()
        state_filler.unlink()
        venvs_filler.unlink()
        daemon = Daemon(layout, "--pool-size", "0").start()
        try:
            assert layout.status()["envs"]["by_state"]["creating"] == 0
            assert env_dirs(layout) == []
        finally:
            daemon.stop()


def test_envs_from_before_records_existed_get_one_at_start_and_survive_a_lost_store(layout: Layout) -> None:
    names = register_envs(layout, 2)  # as an older uvkerneld left them: rows, no record files
    daemon = Daemon(layout, "--pool-size", "0").start()
    try:
        wait_until(lambda: all(env_record(layout, name).exists() for name in env_dirs(layout)),
                   10, "record files for the existing envs")
    finally:
        daemon.stop()
    (layout.state_dir / "state.db").unlink()
    for name in ("state.db-wal", "state.db-shm"):
        (layout.state_dir / name).unlink(missing_ok=True)
    daemon = Daemon(layout, "--pool-size", "0").start()
    try:
        for name in names:
            assert layout.request("acquire", {"key": {"kind": "env", "value": name}})["source"] == "known"
        assert layout.status()["quarantine"] == []
    finally:
        daemon.stop()


def test_a_record_forged_by_an_installed_wheel_is_never_trusted_when_the_store_is_rebuilt(
        layout: Layout, tmp_path: Path) -> None:
    # A wheel's .data/data/ files land in the venv root: where older versions kept the env's record.
    # One entry forges it (another owner, another key), the other blocks the daemon's rewrite of it.
    from test_system_mode import make_wheel
    daemon = Daemon(layout, "--pool-size", "0").start()
    try:
        mine = layout.request("acquire", {"key": KEY_A})
        forged = json.dumps({"id": mine["env_id"], "owner_uid": OTHER_UID, "key": ["env", "forged"],
                             "spec": "x", "python": "3", "requirements": {}})
        wheel = make_wheel(tmp_path, "forger", "1.0", "", extra={
            "forger-1.0.data/data/.uvkerneld-env.json": forged,
            "forger-1.0.data/data/.uvkerneld-env.json.tmp/keep": "",
        })
        installed = layout.request("pip", {"env": mine["path"], "argv": ["install", str(wheel)]}, timeout=300)
        assert installed["exit_status"] == 0, installed
        assert (Path(mine["path"]) / ".uvkerneld-env.json").read_text() == forged  # the wheel did write it
    finally:
        daemon.stop()
    for name in ("state.db-wal", "state.db-shm"):
        (layout.state_dir / name).unlink(missing_ok=True)
    (layout.state_dir / "state.db").write_bytes(b"")
    daemon = Daemon(layout, "--pool-size", "0").start()
    try:
        db = sqlite3.connect(str(layout.state_dir / "state.db"))
        try:
            rows = db.execute("SELECT owner_uid, key_kind, key_value FROM envs WHERE id=?",
                              (mine["env_id"],)).fetchall()
        finally:
            db.close()
        assert rows == [(os.getuid(), "env", "a")]
        again = layout.request("acquire", {"key": KEY_A})
        assert (again["env_id"], again["source"]) == (mine["env_id"], "known")
        assert layout.status()["quarantine"] == []
    finally:
        daemon.stop()


def test_a_removed_env_takes_its_record_along_and_a_quarantined_one_moves_it_aside(layout: Layout) -> None:
    daemon = Daemon(layout, "--pool-size", "0").start()
    try:
        kept, removed, lost = (layout.request("acquire", {"key": {"kind": "env", "value": name}})
                               for name in ("kept", "removed", "lost"))
        assert all(env_record(layout, env["env_id"]).exists() for env in (kept, removed, lost))
        layout.request("remove", {"env_id": removed["env_id"]})
        assert not Path(removed["path"]).exists() and not env_record(layout, removed["env_id"]).exists()
    finally:
        daemon.stop()
    db = sqlite3.connect(str(layout.state_dir / "state.db"))
    try:
        with db:
            db.execute("DELETE FROM envs WHERE id=?", (lost["env_id"],))  # a row lost, the store not empty
    finally:
        db.close()
    daemon = Daemon(layout, "--pool-size", "0").start()
    try:
        [moved] = layout.status()["quarantine"]
        assert Path(moved).name.startswith(lost["env_id"] + "-")
        assert not env_record(layout, lost["env_id"]).exists()
        assert json.loads(Path(moved + ".record.json").read_text())["id"] == lost["env_id"]
        records = sorted(path.name for path in (layout.venvs_dir / ".records").iterdir())
        assert records == [kept["env_id"] + ".json"]
    finally:
        daemon.stop()


def test_a_record_that_cannot_be_written_is_logged_as_an_error(layout: Layout) -> None:
    layout.venvs_dir.mkdir(parents=True, exist_ok=True)
    (layout.venvs_dir / ".records").write_text("not a folder")  # where the records folder should be
    daemon = Daemon(layout, "--pool-size", "0").start()
    try:
        acquired = layout.request("acquire", {"key": KEY_A})  # the request itself still succeeds
        assert os.path.isfile(acquired["python"])
        daemon.wait_for_log("could not write the record of env %s" % acquired["env_id"], 10)
        said = next(line for line in daemon.log.splitlines() if "could not write the record" in line)
        assert "ERROR" in said
    finally:
        daemon.stop()
