"""``uvkernelctl doctor``: checks that explain themselves, each PASS, WARN or FAIL with a fix."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

from . import envvars
from .units import format_bytes
from .venvfiles import site_packages_dirs
from .venvsdir import env_dirs

PASS, WARN, FAIL = "PASS", "WARN", "FAIL"
LOW_DISK_WARN = 5 << 30
LOW_DISK_FAIL = 500 << 20


class Check:
    __slots__ = ("detail", "fix", "name", "verdict")

    def __init__(self, name: str, verdict: str, detail: str, fix: str = "") -> None:
        self.name, self.verdict, self.detail, self.fix = name, verdict, detail, fix

    def to_json(self) -> dict[str, str]:
        return {"check": self.name, "verdict": self.verdict, "detail": self.detail, "fix": self.fix}


def _sample_venv(venvs_dir: Path) -> Path | None:
    """A complete venv to inspect (one with an interpreter), newest first."""
    try:
        candidates = sorted(
            (p for p in env_dirs(venvs_dir) if (p / "bin" / "python").exists()),
            key=lambda p: p.stat().st_mtime, reverse=True,
        )
    except OSError:
        return None
    return candidates[0] if candidates else None


def run_checks(status: dict[str, Any] | None, settings: dict[str, Any], kernel_name: str,
               daemon_error: str | None) -> list[Check]:
    """``status``: the daemon's answer or None; ``settings``: its paths (or the local defaults)."""
    checks = [_check_uv(), _check_daemon(status, daemon_error), _check_kernelspec(kernel_name)]
    cache_dir = Path(settings["cache_dir"])
    venvs_dir = Path(settings["venvs_dir"])
    link_mode = settings.get("link_mode", "hardlink")
    checks.append(_check_same_filesystem(cache_dir, venvs_dir, link_mode))
    sample = _sample_venv(venvs_dir)
    checks.append(_check_link_mode(sample, link_mode))
    checks.append(_check_free_disk(venvs_dir))
    checks.append(_check_bytecode(sample))
    if status is not None and status.get("mode") == "system":
        checks.append(_check_socket_permissions(Path(status["socket"])))
    return checks


def _check_uv() -> Check:
    from .uv import find_uv

    try:
        binary = find_uv(None)
        version = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return Check("uv", FAIL, "uv not found or not runnable: %s" % exc,
                     "pip install uv (into uvkerneld's environment)")
    return Check("uv", PASS, "%s at %s" % (version, binary))


def _check_daemon(status: dict[str, Any] | None, error: str | None) -> Check:
    if status is None:
        return Check("daemon", FAIL, error or "not reachable",
                     "open a notebook with the uv kernel, run `uvkerneld`, "
                     "or `systemctl enable --now uvkerneld.socket`")
    return Check("daemon", PASS, "uvkerneld %s (%s mode) answers on %s, pid %s" % (
        status["version"], status["mode"], status["socket"], status.get("pid")))


def _check_kernelspec(name: str) -> Check:
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    from .kernelspec import stub_entry_point

    try:
        spec = KernelSpecManager().get_kernel_spec(name)
    except NoSuchKernel:
        return Check("kernelspec", FAIL, "no Jupyter kernelspec named %r" % name,
                     "uvkernelctl install-kernelspec --user (or --sys-prefix / --prefix)")
    argv = spec.argv
    stub_main = os.path.join("kernel_stub", "__main__.py")
    runs_stub = any(arg.endswith(stub_main) for arg in argv) or "kernel_stub" in argv
    if not runs_stub:
        return Check("kernelspec", FAIL,
                     "%s does not run the uvkerneld kernel stub: %s" % (spec.resource_dir, argv),
                     "uvkernelctl install-kernelspec --name %s" % name)
    this_install = argv[0] == sys.executable and (stub_entry_point() in argv or "kernel_stub" in argv)
    if not os.access(argv[0], os.X_OK):
        return Check("kernelspec", FAIL, "%s: interpreter %s does not exist" % (spec.resource_dir, argv[0]),
                     "uvkernelctl install-kernelspec --name %s" % name)
    if not this_install:
        return Check("kernelspec", WARN, "%s points at another install (%s)" % (spec.resource_dir, argv[0]),
                     "re-run uvkernelctl install-kernelspec from the install you use")
    return Check("kernelspec", PASS, "%r in %s runs this install (%s)" % (name, spec.resource_dir, argv[0]))


def _existing_parent(path: Path) -> Path:
    while path != path.parent:
        try:
            if path.exists():
                break
        except PermissionError:
            pass  # inside a folder we may not enter (system mode's private cache): ask its parent
        path = path.parent
    return path


def _check_same_filesystem(cache_dir: Path, venvs_dir: Path, link_mode: str) -> Check:
    cache_dev = os.stat(_existing_parent(cache_dir)).st_dev
    venvs_dev = os.stat(_existing_parent(venvs_dir)).st_dev
    if cache_dev == venvs_dev:
        return Check("same filesystem", PASS,
                     "cache %s and venvs %s share a filesystem" % (cache_dir, venvs_dir))
    verdict = FAIL if link_mode in ("hardlink", "clone") else WARN
    return Check("same filesystem", verdict,
                 "cache %s and venvs %s are on different filesystems: uv cannot %s and silently copies every "
                 "file into every venv" % (cache_dir, venvs_dir, link_mode),
                 "set cache_dir and venvs_dir (config file or %s/%s) to one filesystem"
                 % (envvars.CACHE_DIR, envvars.VENVS_DIR))


def _check_link_mode(sample: Path | None, link_mode: str) -> Check:
    if sample is None:
        return Check("link mode", WARN, "no venv exists yet to inspect",
                     "open a notebook, then run doctor again")
    files = [path for site in site_packages_dirs(sample) for path in site.glob("ipykernel/*.py")][:20]
    if not files:
        return Check("link mode", WARN, "%s has no ipykernel files to inspect" % sample)
    if link_mode == "symlink":
        linked = sum(1 for path in files if path.is_symlink())
    elif link_mode == "copy":
        return Check("link mode", WARN, "link_mode is copy: every venv holds full copies",
                     "link_mode = \"hardlink\"")
    else:
        linked = sum(1 for path in files if os.lstat(path).st_nlink > 1)
    if linked == 0 and link_mode != "clone":
        return Check("link mode", FAIL,
                     "%s: files are plain copies (link count 1), not %ss of the cache" % (sample, link_mode),
                     "put cache and venvs on one filesystem; check the daemon log for uv's fallback warning")
    return Check("link mode", PASS, "%d of %d sampled files in %s are %ss of the cache" % (
        linked, len(files), sample.name, link_mode))


def _check_free_disk(venvs_dir: Path) -> Check:
    free = shutil.disk_usage(_existing_parent(venvs_dir)).free
    text = "%s free under %s" % (format_bytes(free), venvs_dir)
    if free < LOW_DISK_FAIL:
        return Check("free disk", FAIL, text, "free space, or run `uvkernelctl gc`")
    if free < LOW_DISK_WARN:
        return Check("free disk", WARN, text, "run `uvkernelctl gc --dry-run` to see what could go")
    return Check("free disk", PASS, text)


def _check_bytecode(sample: Path | None) -> Check:
    if sample is None:
        return Check("bytecode", WARN, "no venv exists yet to inspect")
    packages = [site / "ipykernel" for site in site_packages_dirs(sample) if (site / "ipykernel").exists()]
    if not packages:
        return Check("bytecode", WARN, "%s has no ipykernel" % sample)
    compiled = list((packages[0] / "__pycache__").glob("kernelapp.*.pyc"))
    if not compiled:
        return Check("bytecode", FAIL,
                     "%s has no compiled bytecode: with PYTHONDONTWRITEBYTECODE or a read-only venv "
                     "every kernel start compiles ipykernel again (~0.5 s)" % sample.name,
                     "set bytecode = \"per-env\"")
    return Check("bytecode", PASS, "ipykernel in %s is compiled (%s)" % (sample.name, compiled[0].name))


def _check_socket_permissions(socket_path: Path) -> Check:
    mode = stat.S_IMODE(os.stat(socket_path).st_mode)
    if mode & 0o006 == 0o006:
        return Check("socket permissions", PASS,
                     "%s is mode %o: every user can connect" % (socket_path, mode))
    if mode & 0o060 == 0o060:
        return Check("socket permissions", WARN,
                     "%s is mode %o: only its group can connect" % (socket_path, mode),
                     "intended? users outside the group get 'permission denied' at kernel start")
    return Check("socket permissions", FAIL,
                 "%s is mode %o: notebook users cannot connect" % (socket_path, mode),
                 "SocketMode=0666 in uvkerneld.socket (systemctl edit uvkerneld.socket)")


def format_checks(checks: list[Check]) -> str:
    lines = []
    for check in checks:
        lines.append("%-4s  %-18s %s" % (check.verdict, check.name, check.detail))
        if check.fix and check.verdict != PASS:
            lines.append("      %-18s fix: %s" % ("", check.fix))
    return "\n".join(lines)


def checks_json(checks: list[Check]) -> str:
    return json.dumps([check.to_json() for check in checks], indent=1)
