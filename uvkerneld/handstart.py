"""A daemon someone started themselves keeps its socket: kernels never start another one over it.

A kernel stub that finds nobody on its socket starts a daemon with the settings it has (the
kernelspec's and the daemon's own configuration). When the daemon that served that socket was
started by hand or by a service with other directories (``--state-dir``, ``--venvs-dir``), the
stub's daemon would be a different one: a new empty store, new venvs, and it then holds the
socket so the real daemon cannot start. So a daemon not started by a kernel leaves a small
private record beside its socket (kept after it stops), and a daemon started by a kernel refuses
to start when its directories differ from the record's, saying which daemon to start instead.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
import time
from typing import Any

from . import fsafety
from .config import Config

log = logging.getLogger("uvkerneld.handstart")

_DIRS = (("state_dir", "state dir"), ("venvs_dir", "venvs dir"), ("cache_dir", "uv cache"))


class OtherDaemonsSocket(Exception):
    """The socket belongs to a daemon with other settings; the message says how to start it."""


def record_path(config: Config) -> str:
    return str(config.socket) + ".daemon"


def _same(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def check(config: Config, started_by_kernel: bool) -> None:
    """For a daemon a kernel started: refuse if the socket's record names other directories."""
    if not started_by_kernel:
        return
    path = record_path(config)
    try:
        fsafety.check_file(path, "record of the daemon that owns this socket")
        with open(path, encoding="utf-8") as handle:
            record = json.load(handle)
    except FileNotFoundError:
        return
    except (OSError, ValueError) as exc:
        raise OtherDaemonsSocket(
            "cannot read %s, the record of the daemon that owns %s (%s); start that daemon yourself, or "
            "delete the record to let kernels start one" % (path, config.socket, exc)
        ) from None
    if not isinstance(record, dict):
        return
    differences = [
        "%s %s (this one: %s)" % (label, record.get(key), getattr(config, key))
        for key, label in _DIRS
        if isinstance(record.get(key), str) and not _same(record[key], str(getattr(config, key)))
    ]
    if not differences:
        return
    command = record.get("command")
    raise OtherDaemonsSocket(
        "the uvkerneld that serves %s (pid %s, not started by a kernel) is not running, and it used "
        "%s; a kernel starts no daemon with other settings in its place. Start that daemon again%s, "
        "then restart the kernel. To let kernels start their own daemon on this socket instead, "
        "delete %s." % (
            config.socket, record.get("pid", "?"), ", ".join(differences),
            " (it was started as `%s`)" % shlex.join(command) if isinstance(command, list) else "", path,
        )
    )


def write_record(config: Config, started_by_kernel: bool) -> None:
    """For a daemon not started by a kernel, once it holds its socket: record who it is."""
    if started_by_kernel:
        return
    record: dict[str, Any] = {
        "pid": os.getpid(),
        "started_at": time.time(),
        "command": [sys.executable, "-m", "uvkerneld", *sys.argv[1:]],
        **{key: str(getattr(config, key)) for key, _ in _DIRS},
    }
    path = record_path(config)
    temporary = "%s.%d.tmp" % (path, os.getpid())
    # Private: it names the daemon's directories. Created fresh (never through a planted file)
    # and renamed into place, so a reader never sees half a record.
    try:
        fd = fsafety.open_own(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600, "daemon record")
    except (OSError, fsafety.UnsafePath) as exc:
        log.warning("cannot write %s (%s): a kernel may start another daemon on %s while this one is down",
                    path, exc, config.socket)
        return
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(record, handle)
        os.replace(temporary, path)
    except OSError as exc:
        log.warning("cannot write %s (%s): a kernel may start another daemon on %s while this one is down",
                    path, exc, config.socket)
        try:
            os.unlink(temporary)
        except OSError:
            pass
