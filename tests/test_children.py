"""children.stop_group: a child the daemon stops waiting for is stopped with its whole process
group, and a child that ended already is no error (its caller's cancellation stays a cancellation).
Real processes throughout: a Python child in a session of its own that starts a grandchild."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import pytest

from uvkerneld import diskusage
from uvkerneld.children import _group_members, stop_group

# Starts a grandchild in the same process group, prints its pid, then waits; it ignores no signal.
PARENT_OF_SLEEPER = (
    "import subprocess, sys, time\n"
    "sleeper = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
    "print(sleeper.pid, flush=True)\n"
    "time.sleep(120)\n"
)
# Like PARENT_OF_SLEEPER, but SIGTERM does not stop it: only SIGKILL does.
IGNORES_SIGTERM = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print('ready', flush=True)\n"
    "time.sleep(120)\n"
)


async def _gone(pgid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _group_members(pgid):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def _waited_for_then_cancelled(
    argv: list[str], grace_s: float,
) -> tuple[int, int | None, str, list[int]]:
    """Start ``argv`` in its own session, wait for it in a task the way the daemon does, cancel
    that task once the child printed its first line; returns (pgid, returncode, first line, the
    group's pids before the cancel)."""
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, start_new_session=True)
    assert process.stdout is not None
    first_line = (await asyncio.wait_for(process.stdout.readline(), 60)).decode().strip()

    async def wait_for_child() -> None:
        try:
            await process.wait()
        except asyncio.CancelledError:
            await stop_group(process, grace_s=grace_s, what="test child")
            raise

    members = [pid for pid, _ in _group_members(process.pid)]
    task = asyncio.create_task(wait_for_child())
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 30)
    return process.pid, process.returncode, first_line, members


def test_a_cancelled_wait_stops_the_child_and_its_grandchild() -> None:
    async def scenario() -> None:
        pgid, returncode, grandchild, members = await _waited_for_then_cancelled(
            [sys.executable, "-c", PARENT_OF_SLEEPER], 0.0)
        assert returncode == -9
        assert sorted(members) == sorted([pgid, int(grandchild)])
        assert await _gone(pgid, 10), "the group still has %s" % _group_members(pgid)

    asyncio.run(scenario())


def test_with_a_grace_period_sigterm_comes_first_and_sigkill_after_it() -> None:
    async def scenario() -> None:
        pgid, returncode, _, _ = await _waited_for_then_cancelled(
            [sys.executable, "-c", PARENT_OF_SLEEPER], 5.0)
        assert returncode == -15  # it did not ignore SIGTERM: no SIGKILL was needed
        assert await _gone(pgid, 10)
        started = time.monotonic()
        pgid, returncode, _, _ = await _waited_for_then_cancelled(
            [sys.executable, "-c", IGNORES_SIGTERM], 0.5)
        assert returncode == -9
        assert time.monotonic() - started >= 0.5
        assert await _gone(pgid, 10)

    asyncio.run(scenario())


def test_a_child_that_ended_before_the_stop_is_no_error() -> None:
    """The race: the child exited and the child watcher reaped it, but ``returncode`` is still
    None because the loop has not run the watcher's callback yet. killpg then finds no group."""
    async def scenario() -> None:
        process = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass", start_new_session=True)
        # Without yielding to the loop: the watcher thread reaps it, the loop cannot record that
        # (so the blocking exists check and sleep are on purpose).
        deadline = time.monotonic() + 60
        while os.path.exists("/proc/%d" % process.pid) and _group_members(process.pid):  # noqa: ASYNC240
            assert time.monotonic() < deadline, "the child did not end"
            time.sleep(0.01)  # noqa: ASYNC251 - yielding to the loop would let it record the exit
        raced = process.returncode is None
        await asyncio.wait_for(stop_group(process), 30)
        assert process.returncode == 0
        print("returncode unset when stopped (the race): %s" % raced)

    asyncio.run(scenario())


def _tree_workers_of(pid: int) -> list[int]:
    workers = []
    for entry in os.listdir("/proc"):
        try:
            with open("/proc/%s/cmdline" % entry, "rb") as handle:
                argv = handle.read().split(b"\0")
            with open("/proc/%s/stat" % entry) as handle:
                parent = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if parent == pid and b"uvkerneld.treework" in argv:
            workers.append(int(entry))
    return workers


def test_tree_work_runs_in_a_child_that_a_cancel_kills(tmp_path: Path) -> None:
    tree = tmp_path / "venv"
    for index in range(20):
        (tree / str(index)).mkdir(parents=True)
        for name in range(100):
            (tree / str(index) / str(name)).write_bytes(b"x" * 5000)
    os.link(tree / "0" / "0", tmp_path / "linked-from-outside")

    async def scenario() -> None:
        expected = diskusage.scan_tree(tree).unshared
        assert await diskusage.unshared_bytes(tree) == expected
        assert expected < diskusage.scan_tree(tree).real  # the outside link is not freed

        # Cancel while the worker runs; a walk that ends before the poll sees its worker is
        # tried again (a busy machine may not run this test's poll for a while).
        for _ in range(20):
            walk = asyncio.create_task(diskusage.unshared_bytes(tree))
            # Polls /proc for another process (no event to wait on); ends when the walk does.
            while not (workers := _tree_workers_of(os.getpid())) and not walk.done():  # noqa: ASYNC110
                await asyncio.sleep(0.002)
            if workers and not walk.done():
                break
            await walk
        else:
            raise AssertionError("the walk always ended before its worker was seen")
        walk.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(walk, 30)
        assert not [pid for pid in workers if _group_members(pid)]

        await diskusage.remove_tree(tree)
        assert not tree.exists()
        assert (tmp_path / "linked-from-outside").read_bytes() == b"x" * 5000

    asyncio.run(scenario())


def test_a_failed_tree_worker_is_an_os_error_that_says_what_failed(tmp_path: Path) -> None:
    async def scenario() -> None:
        expected = "uvkerneld.treework exited with 2: usage: python -m uvkerneld.treework"
        with pytest.raises(OSError, match=expected):
            await diskusage._python_child("uvkerneld.treework", ["neither", "/"])

    asyncio.run(scenario())


def test_walks_and_removals_still_happen_when_the_tree_worker_cannot_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A real child that fails, as after a package upgrade under the running daemon: the daemon
    # starts `python -m uvkerneld.treework` from _PACKAGE_PARENT, here a folder whose treework exits 1.
    broken = tmp_path / "broken" / "uvkerneld"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("")
    (broken / "treework.py").write_text("import sys\nsys.exit(1)\n")
    monkeypatch.setattr(diskusage, "_PACKAGE_PARENT", str(broken.parent))
    tree = tmp_path / "venv"
    (tree / "lib").mkdir(parents=True)
    (tree / "lib" / "module.py").write_bytes(b"y" * 9000)

    async def scenario() -> None:
        with pytest.raises(OSError):
            await diskusage._python_child("uvkerneld.treework", ["unshared", str(tree)])
        assert await diskusage.unshared_bytes(tree) == diskusage.scan_tree(tree).unshared > 0
        await diskusage.remove_tree(tree)  # before: OSError, and start-up recovery died of it
        assert not tree.exists()

    asyncio.run(scenario())
