"""Which envs have a live kernel: GC, ``rm`` and idle exit must never act against one.

After a successful ``acquire`` the stub execs ipykernel with its connection still open: that
connection is the kernel's *lifeline*, and it closes when the kernel dies. Each lifeline's
kernel pid is also kept in the store, so that a daemon started while kernels of an earlier one
still run (a restart, an idle exit) knows those envs are in use.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable

from .procs import pid_alive
from .store import Store

log = logging.getLogger("uvkerneld.lifelines")


class Lifelines:
    def __init__(self, store: Store) -> None:
        self._store = store
        # env id -> ids of the connections that are live kernels' lifelines
        self._connections: dict[str, set[int]] = defaultdict(set)
        # Called with an env's id when its last lifeline here closed or moved away (envswitch.py
        # removes a retired env then).
        self.on_released: Callable[[str], None] = lambda env_id: None

    def forget_dead_kernels(self) -> None:
        """At start-up: drop the kernels an earlier daemon recorded whose process is gone."""
        for env_id, pid in self._store.kernels():
            if not pid_alive(pid):
                self._store.remove_kernel(env_id, pid)

    def add(self, env_id: str, connection_id: int, pid: int) -> None:
        """A kernel for ``env_id`` (process ``pid``) now holds connection ``connection_id``."""
        self._connections[env_id].add(connection_id)
        self._store.add_kernel(env_id, pid)

    def remove(self, env_id: str, connection_id: int, pid: int, kernel_ended: bool) -> None:
        """The lifeline closed: the kernel ended, or (``kernel_ended`` false) this daemon is
        stopping, in which case the kernel lives on and keeps its record for the next daemon."""
        self._connections[env_id].discard(connection_id)
        if not self._connections[env_id]:
            del self._connections[env_id]
        if kernel_ended:
            self._store.remove_kernel(env_id, pid)
            log.info("kernel for env %s ended", env_id)
            if env_id not in self._connections:
                self.on_released(env_id)

    def move(self, env_id: str, new_env_id: str, connection_id: int, pid: int) -> None:
        """The kernel holding ``connection_id`` will run in ``new_env_id``, not ``env_id``: a
        ``sync`` moved its notebook to a new env (envswitch.py) before the stub execs."""
        self._connections[env_id].discard(connection_id)
        if not self._connections[env_id]:
            del self._connections[env_id]
        self._store.remove_kernel(env_id, pid)
        self.add(new_env_id, connection_id, pid)
        log.info("kernel %d moved from env %s to env %s", pid, env_id, new_env_id)
        if env_id not in self._connections:
            self.on_released(env_id)

    def live_env_ids(self) -> set[str]:
        """Envs with a running kernel: a lifeline connected now, or a kernel that was running
        when an earlier daemon stopped and whose process still exists."""
        live = set(self._connections)
        for env_id, pid in self._store.kernels():
            if env_id not in live and pid_alive(pid):
                live.add(env_id)
        return live
