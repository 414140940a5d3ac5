"""The venvs dir belongs to one store, and every venv in it can be accounted for.

- ``.uvkerneld-owner`` in the venvs dir names the store that owns it (the store's id from its
  meta table, and its state dir). The daemon holds an flock on it while running: a second daemon
  with another state dir but the same venvs dir is refused, running or not, instead of deleting
  the first one's envs as "unregistered".
- ``.uvkerneld-env.json`` in each venv is the env's own record (id, key, owner, spec, python,
  requested requirements), written by the daemon whenever the store changes them. Mode 0600: in
  system mode the venv is world-readable, but notebook paths and requirements are private. If
  the store is lost (0-byte, deleted), the records are rebuilt from these files.
- ``.quarantine/`` holds what the store cannot account for: moved aside, logged and shown by
  ``status``, never deleted.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("uvkerneld.venvsdir")

OWNER_FILE = ".uvkerneld-owner"
ENV_RECORD_FILE = ".uvkerneld-env.json"
QUARANTINE_DIR = ".quarantine"
ENV_DIR_PREFIX = "e-"


class VenvsDirRefused(Exception):
    """This store may not use the venvs dir; the message says why and what to do."""


def write_private(path: Path, text: str) -> None:
    """Replace ``path`` atomically with ``text``, mode 0600 from the start."""
    temporary = path.with_name(path.name + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    os.replace(temporary, path)


class VenvsDirClaim:
    """The flock on the venvs dir's owner file, held for the daemon's lifetime."""

    def __init__(self, venvs_dir: Path, store_id: str, state_dir: Path) -> None:
        self.venvs_dir = venvs_dir
        self.path = venvs_dir / OWNER_FILE
        self.store_id = store_id
        self.state_dir = str(state_dir)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        os.fchmod(fd, 0o600)  # an flock-able file others could open would let them stall us
        self._fd = fd
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            owner = self._read_owner(self.path)
            raise VenvsDirRefused(
                "venvs dir %s is in use by another uvkerneld (state dir %s): each daemon needs its own "
                "--venvs-dir" % (venvs_dir, owner.get("state_dir", "?"))
            ) from None
        self.previous = self._read_owner(self.path)

    @staticmethod
    def _read_owner(path: Path) -> dict[str, Any]:
        try:
            value = json.loads(path.read_text() or "{}")
            return value if isinstance(value, dict) else {}
        except (OSError, ValueError):
            return {}

    def check(self, store_has_envs: bool) -> bool:
        """Refuse a venvs dir owned by another store; True if the store's records must be rebuilt
        from the venvs on disk (our store was lost: empty, and the dir was ours or unclaimed)."""
        owner_id = self.previous.get("store_id")
        if owner_id and owner_id != self.store_id:
            if self.previous.get("state_dir") != self.state_dir:
                raise VenvsDirRefused(
                    "venvs dir %s belongs to the uvkerneld whose state dir is %s, not to %s: give this daemon "
                    "its own --venvs-dir (or, if that state dir is gone for good, delete %s to adopt its venvs)"
                    % (self.venvs_dir, self.previous.get("state_dir", "?"), self.state_dir, self.path)
                )
            if store_has_envs:
                raise VenvsDirRefused(
                    "the state db in %s is not the one that built the venvs in %s (store id %s, expected %s): "
                    "restore the right state.db, or delete %s to let this one adopt them"
                    % (self.state_dir, self.venvs_dir, self.store_id, owner_id, self.path)
                )
        return not store_has_envs and any(env_dirs(self.venvs_dir))

    def record(self) -> None:
        """Write our store's id into the owner file (after any adoption succeeded)."""
        if self.previous.get("store_id") == self.store_id and self.previous.get("state_dir") == self.state_dir:
            return  # unchanged: nothing to write (a full disk must not stop a restart)
        text = json.dumps({"store_id": self.store_id, "state_dir": self.state_dir})
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, text.encode(), 0)
        os.fsync(self._fd)

    def close(self) -> None:
        os.close(self._fd)


def env_dirs(venvs_dir: Path) -> list[Path]:
    """Our venv directories (only our naming pattern: a misconfigured venvs_dir holds user files)."""
    try:
        return sorted(entry for entry in venvs_dir.iterdir() if entry.name.startswith(ENV_DIR_PREFIX))
    except FileNotFoundError:
        return []


def write_env_record(venv: Path, fields: dict[str, Any]) -> None:
    try:
        write_private(venv / ENV_RECORD_FILE, json.dumps(fields, sort_keys=True))
    except FileNotFoundError:
        pass  # the venv is being built or was just removed: nothing to describe
    except OSError as exc:
        # A full disk must not fail the request; the store still has the fact.
        log.warning("could not write %s: %s", venv / ENV_RECORD_FILE, exc)


def write_missing_env_records(described: list[tuple[Path, dict[str, Any] | None]]) -> None:
    for venv, fields in described:
        if fields is not None and venv.is_dir() and not (venv / ENV_RECORD_FILE).exists():
            write_env_record(venv, fields)


def read_env_record(venv: Path) -> dict[str, Any] | None:
    try:
        value = json.loads((venv / ENV_RECORD_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(value, dict) or value.get("id") != venv.name:
        return None
    key, owner = value.get("key"), value.get("owner_uid")
    key_ok = key is None or (isinstance(key, list) and len(key) == 2 and all(isinstance(part, str) for part in key))
    owner_ok = owner is None or (isinstance(owner, int) and not isinstance(owner, bool))
    requirements = value.get("requirements") or {}
    if not (key_ok and owner_ok and isinstance(requirements, dict)):
        return None  # not ours to trust: the directory is quarantined instead
    return value


def quarantine(venvs_dir: Path, entry: Path, reason: str) -> Path:
    """Move ``entry`` aside into the quarantine folder (same filesystem: a rename, no copy)."""
    folder = venvs_dir / QUARANTINE_DIR
    folder.mkdir(mode=0o700, exist_ok=True)
    target = folder / ("%s-%d" % (entry.name, int(time.time())))
    os.rename(entry, target)
    log.warning("moved %s aside to %s (%s); it is not deleted: inspect it, then remove it or move it back",
                entry, target, reason)
    return target


def quarantined(venvs_dir: Path) -> list[str]:
    try:
        return sorted(str(entry) for entry in (venvs_dir / QUARANTINE_DIR).iterdir())
    except FileNotFoundError:
        return []
