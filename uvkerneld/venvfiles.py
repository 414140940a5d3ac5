"""Files uvkerneld writes into every venv it builds, so package commands reach the daemon.

- ``bin/pip``, ``bin/pip3``, ``bin/uv``: shims, first on the kernel's PATH (the stub puts
  ``<venv>/bin`` first), for ``!pip install`` and any subprocess of the kernel. They run the
  daemon's own interpreter with ``-IS`` (no site, no cwd on sys.path) and only this
  distribution's directory added, so the venv's packages can never break them.
- ``etc/ipython/ipython_kernel_config.py``: IPython reads ``<sys.prefix>/etc/ipython`` at kernel
  start; it loads the ``_uvkerneld_kernel`` extension that replaces ``%pip`` and adds ``%uv``.
- ``_uvkerneld_kernel.py`` in site-packages: that extension (standalone: the venv does not have
  uvkerneld installed).
"""

from __future__ import annotations

import os
import py_compile
import sys
from pathlib import Path

from .venvsdir import replace_file

SHIM_PROGRAMS = ("pip", "pip3", "uv")
EXTENSION_MODULE = "_uvkerneld_kernel"
_EXTENSION_SOURCE = Path(__file__).with_name("kernel_extension.py")
_DISTRIBUTION_DIR = str(Path(__file__).resolve().parent.parent)

_SHIM = """#!{python} -IS
# Written by uvkerneld: package commands in this notebook's env go through the daemon, which
# queues them per env and runs uv with the shared cache. See `uvkernelctl status`.
import sys
sys.path.append({distribution_dir!r})
from uvkerneld.shim import main
sys.exit(main({program!r}, {venv!r}))
"""

_KERNEL_CONFIG = (
    "# Written by uvkerneld: %pip and %uv install into this notebook's own env through the daemon.\n"
    "c = get_config()  # noqa: F821\n"
    "c.InteractiveShellApp.extensions.append({module!r})\n"
)


def site_packages_dirs(venv: Path) -> list[Path]:
    """Every ``lib/python*/site-packages`` of ``venv`` (a venv has one; sorted, so the first is stable).
    Where a venv keeps its packages is written here only."""
    return sorted(venv.glob("lib/python*/site-packages"))


def site_packages(venv: Path) -> Path | None:
    """The venv's site-packages, or None when it has none (a half-made or damaged venv)."""
    found = site_packages_dirs(venv)
    return found[0] if found else None


def pyvenv_version(venv: str | Path) -> str | None:
    """A venv's Python version as its pyvenv.cfg records it (nothing runs; read by the daemon and
    by uvkernelctl as the user: venvs are readable); None when the venv is gone or half-made."""
    try:
        with open(os.path.join(venv, "pyvenv.cfg"), encoding="utf-8", errors="replace") as handle:
            lines = handle.read(65536).splitlines()
    except OSError:
        return None
    values = dict(line.split("=", 1) for line in lines if "=" in line)
    values = {key.strip(): value.strip() for key, value in values.items()}
    # uv writes version_info; the standard library's venv writes version.
    return values.get("version_info") or values.get("version") or None


def _make_uv_lock_private(venv: Path) -> None:
    """uv's lock of a venv (``<venv>/.lock``) is made 0666 by ``uv pip``, and whoever can open it
    can flock it and stall every install into that env (a shared host: another user). uv keeps
    the mode of a lock that exists, so it is made here, before any install, owner-only: only the
    daemon runs uv in its venvs."""
    fd = os.open(venv / ".lock", os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def write_kernel_files(venv: Path, python: str | None = None) -> None:
    interpreter = os.path.abspath(python or sys.executable)
    _make_uv_lock_private(venv)
    for program in SHIM_PROGRAMS:
        replace_file(venv / "bin" / program, _SHIM.format(
            python=interpreter, distribution_dir=_DISTRIBUTION_DIR, program=program, venv=str(venv)
        ), 0o755)
    config_dir = venv / "etc" / "ipython"
    config_dir.mkdir(parents=True, exist_ok=True)
    replace_file(config_dir / "ipython_kernel_config.py",
                 _KERNEL_CONFIG.format(module=EXTENSION_MODULE), 0o644)
    site = site_packages(venv)
    if site is None:
        raise FileNotFoundError("no lib/python*/site-packages in %s" % venv)
    extension = site / (EXTENSION_MODULE + ".py")
    with open(_EXTENSION_SOURCE, encoding="utf-8") as source:
        replace_file(extension, source.read(), 0o644)
    # Every kernel start imports it; with PYTHONDONTWRITEBYTECODE nothing would cache it. The
    # .pyc is tagged for this interpreter: a venv of another Python version just ignores it.
    py_compile.compile(str(extension), doraise=False, quiet=1)
