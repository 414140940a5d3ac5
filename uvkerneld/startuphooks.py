"""Startup hooks a user's package may not leave in an env that a system daemon runs Python in.

uv runs an env's own interpreter to learn its layout (``python -I -B``: isolated, but with
site-packages), whenever its interpreter cache has no fresh entry for the env: after a uv
upgrade, a Python upgrade or a cache clean. That interpreter runs, *as the daemon*, every
``import`` line of every ``.pth`` file in site-packages and imports ``sitecustomize`` from it;
a ``.pth`` may also put a folder outside the env on ``sys.path``, where a ``sitecustomize``
can wait. A wheel may ship all of these, and a user may install any wheel into their env. So in
system mode the daemon removes them from an env before every uv run on it and after every
install (it unlinks the env's link; the cache's file, shared with other envs, stays), and tells
the user. Kernels lose what those hooks did (for example setuptools' distutils shim).
"""

from __future__ import annotations

import glob
import logging
import os
import shutil

log = logging.getLogger("uvkerneld.startuphooks")

_CUSTOMIZE = ("sitecustomize", "usercustomize")
_MAX_PTH_BYTES = 256 * 1024


def strip(venv: str) -> list[str]:
    """Remove the startup hooks from ``venv``'s site-packages; return the names removed."""
    removed = []
    root = os.path.realpath(venv) + os.sep
    for site in glob.glob(os.path.join(glob.escape(venv), "lib", "python*", "site-packages")):
        try:
            names = os.listdir(site)
        except OSError:
            continue
        for name in names:
            path = os.path.join(site, name)
            if name.split(".", 1)[0] in _CUSTOMIZE:
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    os.unlink(path)
                removed.append(name)
            elif name.endswith(".pth") and not _harmless_pth(path, site, root):
                os.unlink(path)
                removed.append(name)
    if removed:
        log.warning("removed startup hooks from %s: %s", venv, ", ".join(sorted(removed)))
    return sorted(removed)


def _harmless_pth(path: str, site: str, root: str) -> bool:
    """Only paths inside the env; no line that site.py would execute."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(_MAX_PTH_BYTES + 1)
    except OSError:
        return False
    if len(data) > _MAX_PTH_BYTES:
        return False
    for line in data.decode("utf-8", "replace").splitlines():
        if line.startswith(("import ", "import\t")):
            return False
        entry = line.rstrip()
        if not entry or entry.startswith("#"):
            continue
        if not (os.path.realpath(os.path.join(site, entry)) + os.sep).startswith(root):
            return False
    return True
