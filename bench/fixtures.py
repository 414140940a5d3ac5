"""Set-up shared by the benchmarks and the tests: a store holding many registered envs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from uvkerneld import states
from uvkerneld.protocol import EnvKey
from uvkerneld.store import Store


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
