"""The warm pool's builds are background work only while nobody waits for them."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from helpers import Daemon, Layout, process_alive, processes_matching, wait_until

from uvkerneld.uv import find_uv

# A stand-in for uv that holds every `uv pip install` until the test opens the gate, then runs
# the real uv: it keeps a pool build in flight for as long as the test needs to look at it.
GATED_UV = """#!/bin/sh
if [ "$1" = pip ] && [ "$2" = install ]; then
    while [ ! -e "$UVK_TEST_GATE" ]; do sleep 0.05; done
fi
exec "$UVK_TEST_REAL_UV" "$@"
"""


def thread_policies(pid: int) -> set[int]:
    policies = set()
    for tid in os.listdir("/proc/%d/task" % pid):
        try:
            policies.add(os.sched_getscheduler(int(tid)))
        except OSError:
            pass
    return policies


def gated_uv(layout: Layout) -> tuple[Path, Path, dict[str, str]]:
    """(gate file, the gated uv, the daemon's environment that uses it)."""
    gate = layout.root / "gate"
    fake_uv = layout.root / "gated-uv"
    fake_uv.write_text(GATED_UV)
    fake_uv.chmod(0o755)
    env = dict(layout.env, UVKERNELD_UV=str(fake_uv), UVK_TEST_GATE=str(gate), UVK_TEST_REAL_UV=find_uv(None))
    return gate, fake_uv, env


def test_a_kernel_start_waiting_for_a_pool_build_raises_its_priority(layout: Layout) -> None:
    gate, fake_uv, env = gated_uv(layout)
    daemon = Daemon(layout, "--pool-size", "1", env=env).start()
    result: dict[str, Any] = {}
    waiter = threading.Thread(target=lambda: result.update(
        layout.request("acquire", {"key": {"kind": "env", "value": "urgent"}}, timeout=180)))
    try:
        pids = wait_until(lambda: processes_matching(str(fake_uv), "pip install"), 60,
                          "the pool build's uv install")
        build = pids[0]
        # Background work: only idle CPU time while nobody waits for it.
        assert thread_policies(build) == {os.SCHED_IDLE}
        waiter.start()
        wait_until(lambda: thread_policies(build) == {os.SCHED_OTHER}, 30,
                   "the waiting start to raise the build's priority")
        gate.touch()
        waiter.join(180)
        assert not waiter.is_alive()
        # The kernel start took the venv whose build it sped up.
        assert result["source"] == "pool" and os.path.isdir(result["path"])
    finally:
        gate.touch()
        if waiter.is_alive():
            waiter.join(180)
        daemon.stop()


def test_where_priority_may_not_be_raised_the_pool_build_is_stopped_instead(layout: Layout) -> None:
    # As an unprivileged daemon: no CAP_SYS_NICE, so its builds cannot leave SCHED_IDLE.
    gate, fake_uv, env = gated_uv(layout)
    daemon = Daemon(layout, "--pool-size", "1", env=env)
    daemon.argv = ["setpriv", "--bounding-set", "-sys_nice", "--", *daemon.argv]
    daemon.start()
    result: dict[str, Any] = {}
    waiter = threading.Thread(target=lambda: result.update(
        layout.request("acquire", {"key": {"kind": "env", "value": "urgent"}}, timeout=180)))
    try:
        pool_build = wait_until(lambda: processes_matching(str(fake_uv), "pip install"), 60,
                                "the pool build's uv install")[0]
        waiter.start()
        wait_until(lambda: not process_alive(pool_build), 60, "the pool build to be stopped")
        # The start's own build runs at normal priority.
        own_build = wait_until(lambda: processes_matching(str(fake_uv), "pip install"), 60,
                               "the start's own build")[0]
        assert thread_policies(own_build) == {os.SCHED_OTHER}
        gate.touch()
        waiter.join(180)
        assert not waiter.is_alive()
        assert result["source"] == "created" and os.path.isdir(result["path"])
        # The stopped build left nothing behind, and the pool refills afterwards.
        daemon.wait_pool_full()
        venvs = sorted(entry.name for entry in layout.venvs_dir.glob("e-*"))
        status = layout.status()
        assert len(venvs) == 2 and status["envs"]["by_state"]["pooled"] == 1 and status["envs"]["total"] == 1
    finally:
        gate.touch()
        if waiter.is_alive():
            waiter.join(180)
        daemon.stop()
