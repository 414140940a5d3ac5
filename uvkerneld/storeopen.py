"""Start-up of the store: private state files, leftover uv processes, the store and its venvs dir.

Kept apart from server.py so start-up order stays readable there: ``private_state_files`` before
the instance lock, ``open_store`` before recovery. Every refusal is one line saying what is wrong
and what to do (``StoreRefused``; the daemon exits with status 1).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .children import CHILDREN_FILE, stop_leftovers
from .config import Config
from .store import NewerSchema, Store, StoreDamaged, make_own_file_private
from .venvsdir import VenvsDirClaim, VenvsDirRefused

log = logging.getLogger("uvkerneld.storeopen")

PID_FILE = "uvkerneld.pid"


class StoreRefused(Exception):
    """The store or the venvs dir cannot be used; the message says why and what to do."""


def private_state_files(state_dir: Path) -> None:
    """Every file the daemon writes in its state dir holds something private (notebook paths,
    requirements, pids): create the pid file 0600 before it is opened, and fix files an older
    uvkerneld left world-readable."""
    try:
        os.close(os.open(state_dir / PID_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600))
    except OSError as exc:
        log.warning("could not create %s private: %s", state_dir / PID_FILE, exc)
    for name in (PID_FILE, CHILDREN_FILE):  # the db's own files: store.make_private
        make_own_file_private(state_dir / name)


def open_store(config: Config) -> tuple[Store, VenvsDirClaim, bool]:
    """(the store, our claim on the venvs dir, whether recovery must rebuild lost records)."""
    stopped = stop_leftovers(config.state_dir)
    if stopped:
        log.warning("stopped %d uv process group(s) an earlier uvkerneld left running", stopped)
    try:
        store = Store(config.store_path)
    except (NewerSchema, StoreDamaged) as exc:
        raise StoreRefused(str(exc)) from None
    try:
        claim = VenvsDirClaim(config.venvs_dir, store.store_id, config.state_dir)
        try:
            adopt = claim.check(store.has_envs())
            claim.record()
        except BaseException:
            claim.close()
            raise
    except VenvsDirRefused as exc:
        store.close()
        raise StoreRefused(str(exc)) from None
    return store, claim, adopt
