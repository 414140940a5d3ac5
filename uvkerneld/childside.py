"""What a child of the daemon does to itself: die with the daemon, run at a lower priority.

Standard library only and cheap to import: the tree worker (treework.py) imports it at every
start. children.py re-exports ``die_with_parent`` for the daemon's side.
"""

from __future__ import annotations

import ctypes
import os
import signal

_PR_SET_PDEATHSIG = 1

# Looked up once in the daemon: the forked child only calls it.
_prctl = ctypes.CDLL(None, use_errno=True).prctl


def die_with_parent(parent_pid: int) -> None:
    """In the child (in the forked child before exec, or first thing after exec): be killed
    when the daemon dies."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    # The daemon may have died before prctl: then nobody would kill us.
    if os.getppid() != parent_pid:
        os._exit(1)


def become_background(parent_pid: int, idle: bool) -> None:
    """First thing in a Python child the daemon started without a preexec_fn (so that the
    daemon's event loop never waits for a full fork of itself: with a preexec_fn, Python forks
    instead of vforking, measured 8-20 ms on the loop per child against 1-7 ms without).
    ``idle``: SCHED_IDLE, CPU time nobody else wants (background scans); else nice 10 (work
    someone waits for, which must still progress on a host whose CPUs are busy)."""
    die_with_parent(parent_pid)
    try:
        if idle:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        else:
            os.nice(10)
    except (AttributeError, OSError):
        pass
