"""The venvs dir belongs to one store, and every venv in it can be accounted for.

- ``.uvkerneld-owner`` in the venvs dir names the store that owns it (the store's id from its
  meta table, and its state dir). The daemon holds an flock on it while running: a second daemon
  with another state dir but the same venvs dir is refused, running or not, instead of deleting
  the first one's envs as "unregistered".
- ``.records/<env id>.json`` is each env's own record (id, key, owner, spec, python, requested
  requirements), written by the daemon whenever the store changes them. Never inside the venv:
  installs write there (a wheel's ``.data/data/`` files land in the venv root), and a record a
  user can forge would hand their env to someone else when the store is rebuilt. Folder 0700,
  files 0600: notebook paths and requirements are private. If the store is lost (0-byte,
  deleted), its rows are rebuilt from these files. A ``.uvkerneld-env.json`` inside a venv (what
  older versions wrote) is never read: with an intact store, the start-up writes the new record
  from the store; with a lost one, such a venv is quarantined like any it cannot account for.
- ``t-<12 hex digits>/`` are template venvs and ``.templates/`` their state files (templates.py).
- ``.quarantine/`` holds what the store cannot account for: moved aside, logged and shown by
  ``status``, never deleted.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import stat
import time
from pathlib import Path
from typing import Any

from . import envid

log = logging.getLogger("uvkerneld.venvsdir")

OWNER_FILE = ".uvkerneld-owner"
RECORDS_DIR = ".records"
QUARANTINED_RECORD_SUFFIX = ".record.json"
QUARANTINE_DIR = ".quarantine"
TEMPLATE_PREFIX = "t-"


class VenvsDirRefused(Exception):
    """This store may not use the venvs dir; the message says why and what to do."""


def write_private(path: Path, text: str) -> None:
    """Replace ``path`` atomically with ``text``, mode 0600 from the start."""
    replace_file(path, text, 0o600)


def replace_file(path: Path, text: str, mode: int) -> None:
    """Replace ``path`` by a new file holding ``text`` (temp + rename, ``mode`` from the start),
    never by writing into the existing one: in a venv a file may be a hardlink shared with the uv
    cache, a template and every other venv (uv links a wheel's scripts and data files; clones link
    what their template has), and writing into it would change it in all of them."""
    temporary = path.with_name("." + path.name + ".uvkerneld-new")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temporary)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            fd = -1
            os.fchmod(handle.fileno(), mode)  # the umask must not change it
            handle.write(text)
        os.replace(temporary, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


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
                    "venvs dir %s belongs to the uvkerneld whose state dir is %s, not to %s: give this "
                    "daemon its own --venvs-dir (or, if that state dir is gone for good, delete %s to adopt "
                    "its venvs)"
                    % (self.venvs_dir, self.previous.get("state_dir", "?"), self.state_dir, self.path)
                )
            if store_has_envs:
                raise VenvsDirRefused(
                    "the state db in %s is not the one that built the venvs in %s (store id %s, "
                    "expected %s): restore the right state.db, or delete %s to let this one adopt them"
                    % (self.state_dir, self.venvs_dir, self.store_id, owner_id, self.path)
                )
        return not store_has_envs and any(env_dirs(self.venvs_dir))

    def record(self) -> None:
        """Write our store's id into the owner file (after any adoption succeeded)."""
        previous = self.previous
        if previous.get("store_id") == self.store_id and previous.get("state_dir") == self.state_dir:
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
        return sorted(entry for entry in venvs_dir.iterdir() if entry.name.startswith(envid.PREFIX))
    except FileNotFoundError:
        return []


def template_dirs(venvs_dir: Path) -> list[Path]:
    """The template venvs (templates.py): ``t-`` and an env id's digits, as long as an env id."""
    try:
        return sorted(entry for entry in venvs_dir.iterdir() if entry.name.startswith(TEMPLATE_PREFIX))
    except FileNotFoundError:
        return []


def env_record_path(venv: Path) -> Path:
    """Where the record of the venv ``<venvs_dir>/<id>`` lives: outside every venv."""
    return venv.parent / RECORDS_DIR / (venv.name + ".json")


def _records_folder(venvs_dir: Path) -> Path:
    """The records folder, made 0700 by us; refused if it is anything but our own directory."""
    folder = venvs_dir / RECORDS_DIR
    try:
        os.mkdir(folder, 0o700)
    except FileExistsError:
        pass
    info = os.lstat(folder)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        raise OSError(errno.EPERM, "not a directory of this daemon's own", str(folder))
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(folder, 0o700)
    return folder


def write_env_record(venv: Path, fields: dict[str, Any]) -> None:
    if not venv.is_dir():
        return  # not built yet, or just removed: nothing to describe
    path = env_record_path(venv)
    try:
        _records_folder(venv.parent)
        write_private(path, json.dumps(fields, sort_keys=True))
    except OSError as exc:
        # A full disk must not fail the request (the store still has the fact), but a missing
        # record means this env cannot be rebuilt if the store is lost: say so loudly.
        log.error("could not write the record of env %s to %s (%s): if the store is lost, this env "
                  "will be moved aside instead of rebuilt", venv.name, path, exc)


def remove_env_record(venv: Path) -> None:
    try:
        os.unlink(env_record_path(venv))
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.error("could not remove the record of deleted env %s (%s)", venv.name, exc)


def write_missing_env_records(described: list[tuple[Path, dict[str, Any] | None]]) -> None:
    for venv, fields in described:
        if fields is not None and venv.is_dir() and not env_record_path(venv).exists():
            write_env_record(venv, fields)


def read_env_record(venv: Path) -> dict[str, Any] | None:
    try:
        fd = os.open(env_record_path(venv), os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as handle:
            value = json.loads(handle.read())
    except (OSError, ValueError):
        return None
    if not isinstance(value, dict) or value.get("id") != venv.name:
        return None
    key, owner = value.get("key"), value.get("owner_uid")
    key_ok = key is None or (
        isinstance(key, list) and len(key) == 2 and all(isinstance(part, str) for part in key))
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
    try:  # its record goes with it: inspected together, and never adopted on its own
        os.rename(env_record_path(entry), folder / (target.name + QUARANTINED_RECORD_SUFFIX))
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.error("could not move the record of %s aside (%s)", entry.name, exc)
    log.warning("moved %s aside to %s (%s); it is not deleted: inspect it, then remove it or move it back",
                entry, target, reason)
    return target


def quarantined(venvs_dir: Path) -> list[str]:
    try:
        return sorted(str(entry) for entry in (venvs_dir / QUARANTINE_DIR).iterdir()
                      if not entry.name.endswith(QUARANTINED_RECORD_SUFFIX))  # shown with its dir
    except FileNotFoundError:
        return []
