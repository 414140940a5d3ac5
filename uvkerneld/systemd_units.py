"""Installing the systemd units shipped in ``systemd/`` with this install's ExecStart."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

# Installed, the unit files are package data (uvkerneld/systemd/, mapped from the repository's
# systemd/ in pyproject.toml); run from a source checkout, they are the repository's own.
UNITS_DIR = Path(__file__).with_name("systemd")
if not UNITS_DIR.is_dir():
    UNITS_DIR = Path(__file__).resolve().parent.parent / "systemd"
SHIPPED_EXEC = "/usr/local/bin/uvkerneld"


class SystemdInstallError(Exception):
    pass


def exec_start_command() -> str:
    return "%s -m uvkerneld" % sys.executable


def render(unit_text: str) -> str:
    return unit_text.replace(SHIPPED_EXEC, exec_start_command())


def install(user: bool, prefix: str | None) -> list[Path]:
    """Write the units (and the sysusers.d file for system mode); returns the files written."""
    if user:
        base = Path(prefix) if prefix else Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
        targets = {UNITS_DIR / "user" / name: base / "systemd" / "user" / name
                   for name in ("uvkerneld.socket", "uvkerneld.service")}
    else:
        root = Path(prefix or "/")
        if not prefix:
            _check_system_interpreter()
        targets = {UNITS_DIR / name: root / "etc" / "systemd" / "system" / name
                   for name in ("uvkerneld.socket", "uvkerneld.service")}
        targets[UNITS_DIR / "uvkerneld.sysusers.conf"] = root / "etc" / "sysusers.d" / "uvkerneld.conf"
    written = []
    for source, target in targets.items():
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(render(source.read_text()))
        written.append(target)
    if not prefix and not user and os.geteuid() == 0 and shutil.which("systemd-sysusers"):
        # Create the static user now, so the first `systemctl start` finds it.
        subprocess.run(["systemd-sysusers", str(targets[UNITS_DIR / "uvkerneld.sysusers.conf"])], check=True)
    if not prefix and os.path.isdir("/run/systemd/system"):
        subprocess.run(["systemctl", *(["--user"] if user else []), "daemon-reload"], check=False)
    return written


def _check_system_interpreter() -> None:
    # ProtectHome=yes hides /home and /root from the service, and notebook users must be able to
    # execute this interpreter (the kernel stub runs on it): refuse a path they cannot reach.
    executable = os.path.abspath(sys.executable)
    for private in ("/home/", "/root/"):
        if executable.startswith(private):
            raise SystemdInstallError(
                "uvkerneld runs from %s, under %s: the system service (ProtectHome=yes) and other "
                "users cannot reach it. Install it system-wide first, e.g. `python3 -m venv "
                "/opt/uvkerneld && /opt/uvkerneld/bin/pip install uvkerneld`, and run "
                "`/opt/uvkerneld/bin/uvkernelctl install-systemd` from there."
                % (executable, private.rstrip("/"))
            )
