"""Set-up shared by the benchmarks and the tests: a store holding many registered envs."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

from uvkerneld import states
from uvkerneld.protocol import EnvKey
from uvkerneld.store import Store


class TimedOut(AssertionError):
    """A condition did not come true in time (a failed test; the benchmark exits with it)."""


def wait_until(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimedOut("timed out after %.0f s waiting for %s" % (timeout, what))
        time.sleep(interval)


def register_envs(state_dir: Path, venvs_dir: Path, count: int) -> list[str]:
    """Put ``count`` assigned envs into the store, each a minimal venv-shaped directory (an
    interpreter link), as a long-lived host would have. Returns their env names."""
    state_dir.mkdir(parents=True, exist_ok=True)
    venvs_dir.mkdir(parents=True, exist_ok=True)
    store = Store(state_dir / "state.db")
    names = []
    try:
        for index in range(count):
            env_id = "e-%012x" % (0xA00000000000 + index)
            path = venvs_dir / env_id
            (path / "bin").mkdir(parents=True)
            (path / "bin" / "python").symlink_to(sys.executable)
            name = "registered-%d" % index
            store.insert_creating(env_id, path, "registered", sys.executable, owner_uid=os.getuid(), key=EnvKey("env", name))
            store.transition(env_id, states.ASSIGNED)
            names.append(name)
    finally:
        store.close()
    return names
