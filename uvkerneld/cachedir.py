"""A system daemon's uv cache is private to the daemon's user.

Venv files are hardlinks of cache files, so users read them through the venv: what counts is each
inode's mode, never the cache's directories. Anything in the cache a user can open, that user
can also lock: uv creates its cache lock file mode 0666, and one `flock -x` on it held every
install and every pool build on the host. So the cache root is 0700, enforced at every start.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger("uvkerneld.cachedir")


class CacheDirError(Exception):
    """The cache cannot be made private; the message says why and what to do."""


def make_private(cache_dir: Path, link_mode: str) -> None:
    if link_mode == "symlink":
        raise CacheDirError(
            "link_mode = symlink does not work in system mode: venv files would be symlinks into "
            "the cache, which no notebook user may enter. Use hardlink (the default) or clone."
        )
    info = os.stat(cache_dir)
    if info.st_uid != os.geteuid():
        raise CacheDirError(
            "the uv cache %s belongs to uid %d, not to the daemon's uid %d: chown it to the "
            "daemon's user (or choose another cache_dir)" % (cache_dir, info.st_uid, os.geteuid())
        )
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(cache_dir, 0o700)
        log.info("made the uv cache %s private (mode 0700, was %04o)", cache_dir, stat.S_IMODE(info.st_mode))
