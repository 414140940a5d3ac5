"""No child of the daemon outlives it.

Two halves:
- every uv the daemon starts gets PR_SET_PDEATHSIG=SIGKILL (``die_with_parent``, in the forked
  child before exec), so the kernel kills it when the daemon dies, even by kill -9;
- uv runs in its own session (so its process group can be signalled as a whole) and may have
  started children of its own (an interpreter query, a build backend) that PDEATHSIG does not
  reach. Each group is recorded in ``children`` in the state dir (pgid and the leader's start
  time from /proc, mode 0600); the next daemon kills groups an earlier one left behind
  (``stop_leftovers``). The start time makes sure a reused pid is never signalled.

And while the daemon runs: a child whose caller stops waiting for it (a cancellation at shutdown,
a failure) is stopped with its whole process group (``stop_group``), never left running.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from pathlib import Path

from .childside import die_with_parent  # noqa: F401 - the daemon's side imports it from here
from .procs import is_exited, stat_fields
from .venvsdir import write_private

log = logging.getLogger("uvkerneld.children")

CHILDREN_FILE = "children"
async def stop_group(process: asyncio.subprocess.Process, grace_s: float = 0.0, what: str = "child") -> None:
    """Stop ``process`` and its process group (it was started with ``start_new_session=True``, so
    its pid is the group's id) and reap it. ``grace_s`` > 0: SIGTERM first and that long to
    exit, then SIGKILL. A child that already ended is no error: the asyncio child watcher may
    have reaped it before ``returncode`` shows it, and a ProcessLookupError raised here in place
    of the caller's cancellation would keep a shutdown that waits for that cancellation waiting."""
    if process.returncode is None:
        try:
            if grace_s > 0:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    await asyncio.wait_for(process.wait(), grace_s)
                    return
                except asyncio.TimeoutError:
                    log.warning("%s (pid %d) ignored SIGTERM for %.0f s; killing it",
                                what, process.pid, grace_s)
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    await process.wait()


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/pid/stat)."""
    fields = stat_fields(pid)
    return None if fields is None else int(fields[19])


def _group_members(pgid: int) -> list[tuple[int, int]]:
    """(pid, start time) of live processes in process group ``pgid``."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = stat_fields(int(entry))
        if fields is not None and not is_exited(fields) and int(fields[2]) == pgid:
            members.append((int(entry), int(fields[19])))
    return members


class ChildRegistry:
    """The uv process groups running now, mirrored to a private file in the state dir."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / CHILDREN_FILE
        self._groups: dict[int, int] = {}
        self._write_failed = False

    def add(self, pid: int) -> None:
        started = start_time(pid)
        if started is not None:
            self._groups[pid] = started
            self._write()

    def discard(self, pid: int) -> None:
        if self._groups.pop(pid, None) is not None:
            self._write()

    def _write(self) -> None:
        try:
            write_private(self.path, json.dumps({str(pid): started for pid, started in self._groups.items()}))
            self._write_failed = False
        except OSError as exc:
            # A full state folder must not stop uv from running; PDEATHSIG still kills uv itself.
            if not self._write_failed:
                log.warning("could not record uv's process groups in %s: %s", self.path, exc)
            self._write_failed = True


def stop_leftovers(state_dir: Path, timeout: float = 10.0) -> int:
    """Kill the uv process groups an earlier daemon of this state dir left running; returns how
    many groups were signalled. Runs at start-up, before recovery looks at the venvs."""
    path = state_dir / CHILDREN_FILE
    try:
        recorded = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return 0
    signalled = []
    for pgid_text, leader_started in recorded.items():
        pgid = int(pgid_text)
        members = _group_members(pgid)
        leader_alive = start_time(pgid)
        # The group is ours if its leader is the process we started (same start time), or if the
        # leader is gone and members remain: the kernel never reuses a pid that is still a
        # process group's id, and members started no earlier than the leader did.
        ours = leader_alive == leader_started or (
            leader_alive is None and members and all(started >= leader_started for _, started in members))
        if not ours or not members:
            continue
        try:
            os.killpg(pgid, signal.SIGKILL)
            signalled.append(pgid)
            log.warning("killed uv process group %d left running by an earlier uvkerneld", pgid)
        except ProcessLookupError:
            pass
        except PermissionError as exc:
            log.warning("could not stop uv process group %d left by an earlier uvkerneld: %s", pgid, exc)
    deadline = time.monotonic() + timeout
    while signalled and time.monotonic() < deadline and any(_group_members(pgid) for pgid in signalled):
        time.sleep(0.02)
    try:
        path.unlink()
    except OSError:
        pass
    return len(signalled)
