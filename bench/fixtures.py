"""Set-up shared by the benchmarks and the tests: a store holding many registered envs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from uvkerneld import envid, states
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


def register_envs(state_dir: Path, venvs_dir: Path, count: int, template: Path | None = None,
                  owner_uid: int | None = None, first: int = 0, name_prefix: str = "registered") -> list[str]:
    """Put ``count`` assigned envs into the store, each a minimal venv-shaped directory (an
    interpreter link), as a long-lived host would have, or with ``template`` a hard-linked copy
    of that real venv (as many files as a uv venv, linked like uv links from its cache).
    ``first`` numbers env ids and names, so several batches can share one store. Returns
    their env names."""
    state_dir.mkdir(parents=True, exist_ok=True)
    venvs_dir.mkdir(parents=True, exist_ok=True)
    store = Store(state_dir / "state.db")
    names = []
    try:
        for index in range(first, first + count):
            env_id = envid.format_env_id(0xA00000000000 + index)
            path = venvs_dir / env_id
            if template is not None:
                subprocess.run(["cp", "-al", str(template), str(path)], check=True)
            else:
                (path / "bin").mkdir(parents=True)
                (path / "bin" / "python").symlink_to(sys.executable)
            name = "%s-%d" % (name_prefix, index)
            owner = os.getuid() if owner_uid is None else owner_uid
            store.insert_creating(env_id, path, "registered", sys.executable, owner_uid=owner,
                                  key=EnvKey("env", name))
            store.transition(env_id, states.ASSIGNED)
            names.append(name)
    finally:
        store.close()
    return names


def cache_with_new_entries(source: Path, target: Path, distributions: list[str]) -> list[Path]:
    """A uv cache at ``target`` whose files are hardlinks of ``source``'s (a second, no extra disk),
    where the archive entries of ``distributions`` (``name==version``) have no bytecode: to a
    daemon on ``target`` they look newly unpacked. The stripped ``__pycache__`` folders are the
    copy's own, so compiling them never writes into ``source``; so is uv's lock file. Returns
    those entries."""
    from uvkerneld.bytecode import distributions_in
    from uvkerneld.pipargs import normalize_name

    try:
        # uv's temp folders (.tmpXXXX) come and go while other runs use ``source``: not copied.
        shutil.copytree(source, target, copy_function=os.link, symlinks=True,
                        ignore=shutil.ignore_patterns(".tmp*", ".lock"))
    except shutil.Error as exc:
        vanished = [error for error in exc.args[0] if not os.path.lexists(error[0])]
        if len(vanished) != len(exc.args[0]):
            raise
    (target / ".lock").touch()
    wanted = {(normalize_name(name), version) for name, version in
              (distribution.split("==", 1) for distribution in distributions)}
    entries = sorted(entry for entry in (target / "archive-v0").iterdir()
                     if entry.is_dir() and distributions_in(entry) & wanted)
    found = set().union(*(distributions_in(entry) for entry in entries)) & wanted
    if found != wanted:
        raise AssertionError("no cache entry holds %s in %s" % (sorted(wanted - found), source))
    for entry in entries:
        for pycache in list(entry.rglob("__pycache__")):
            shutil.rmtree(pycache)
    return entries
