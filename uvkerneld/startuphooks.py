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

Two less obvious hooks: a ``.pth`` line that only adds a folder inside the env is harmless
unless that folder holds a ``sitecustomize``/``usercustomize`` (site.py imports the first one on
``sys.path``), so such a ``.pth`` is removed; and a wheel's ``data`` scheme is the env root, so a
wheel can overwrite ``pyvenv.cfg`` and point ``home`` at a folder holding its own stdlib and
``sitecustomize``. ``pyvenv.cfg`` is therefore rewritten whenever its ``home`` is not the folder
of the interpreter ``bin/python`` links to (what ``uv venv`` writes), or it has keys uv never
writes.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from .venvfiles import site_packages_dirs

log = logging.getLogger("uvkerneld.startuphooks")

_CUSTOMIZE = ("sitecustomize", "usercustomize")
_MAX_PTH_BYTES = 256 * 1024


def strip(venv: str) -> list[str]:
    """Remove the startup hooks from ``venv``'s site-packages; return the names removed."""
    removed = []
    root = os.path.realpath(venv) + os.sep
    for site in map(str, site_packages_dirs(Path(venv))):
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
    if _repair_pyvenv_cfg(venv):
        removed.append("pyvenv.cfg")
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
        folder = os.path.realpath(os.path.join(site, entry))
        if not (folder + os.sep).startswith(root):
            return False
        if folder != os.path.realpath(site) and _holds_customize(folder):
            return False
    return True


def _holds_customize(folder: str) -> bool:
    """Whether site.py would import a sitecustomize/usercustomize from ``folder`` on sys.path."""
    try:
        names = os.listdir(folder)
    except OSError:
        return False
    return any(name.split(".", 1)[0] in _CUSTOMIZE for name in names)


# What uv venv writes to pyvenv.cfg; any other key is not ours.
_PYVENV_KEYS = ("home", "implementation", "uv", "version_info", "include-system-site-packages", "prompt")


def _repair_pyvenv_cfg(venv: str) -> bool:
    """Make ``home`` the folder of the interpreter bin/python links to and drop unknown keys;
    return whether the file had to change. Python finds its stdlib (and site-packages and
    sitecustomize) through ``home``, so a wheel's pyvenv.cfg must never stay."""
    cfg = os.path.join(venv, "pyvenv.cfg")
    try:
        target = os.readlink(os.path.join(venv, "bin", "python"))
    except OSError:
        return False  # not a venv uv made (or half-made): nothing to compare with
    if not os.path.isabs(target):
        return False
    home = os.path.dirname(target)
    try:
        with open(cfg, "rb") as handle:
            data = handle.read(_MAX_PTH_BYTES + 1)
    except FileNotFoundError:
        data = b""
    lines = ["home = %s" % home]
    for line in data[:_MAX_PTH_BYTES].decode("utf-8", "replace").splitlines():
        key, sep, value = line.partition("=")
        key = key.strip()
        if sep and key in _PYVENV_KEYS and key != "home":
            lines.append("%s = %s" % (key, value.strip()))
    expected = ("\n".join(lines) + "\n").encode("utf-8")
    linked = os.path.islink(cfg)  # even to good content: whatever it points to may change
    if data == expected and not linked:
        return False

    def pairs(text: str) -> list[tuple[str, str]]:
        return [(key.strip(), value.strip()) for key, sep, value in
                (line.partition("=") for line in text.splitlines()) if sep or key.strip()]
    if (not linked and len(data) <= _MAX_PTH_BYTES
            and pairs(data.decode("utf-8", "replace")) == pairs("\n".join(lines))):
        return False  # the same keys and values in the same order; only spacing differs
    if os.path.isdir(cfg) and not os.path.islink(cfg):
        shutil.rmtree(cfg)
    # A fresh file, never one a wheel put in the way (a symlink would make the daemon write elsewhere).
    tmp = cfg + ".uvkerneld-tmp"
    if os.path.lexists(tmp):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "wb") as out:
        out.write(expected)
    os.replace(tmp, cfg)
    return True
