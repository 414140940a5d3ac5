"""``uvkernelctl deps|lock|sync NOTEBOOK`` and ``doctor NOTEBOOK``: a notebook's declared dependencies
against its env. The notebook is read (and written, by ``lock``) here, as the user; the daemon only
sees the declaration over the socket, like the kernel stub sends it (README "Notebooks that carry
their dependencies")."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any

from . import declared, nbdecl, nbdeps, nbedit, protocol
from .ctlcall import (
    EXIT_CHECK_FAILED,
    EXIT_DAEMON_ERROR,
    EXIT_NOT_ALLOWED,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_USAGE,
    CtlError,
    venv_python_version,
)
from .ctlcall import request as _request
from .uv import find_uv

UV_LOCK_TIMEOUT_S = 600.0


def add_parsers(commands: Any) -> None:
    deps = commands.add_parser(
        "deps", help="a notebook's declared, recorded and installed packages, and the drift between them")
    deps.add_argument("notebook", metavar="NOTEBOOK")
    deps.add_argument("--json", action="store_true", help="one JSON object, for machines")
    deps.add_argument("--check", action="store_true", help="exit %d when there is drift" % EXIT_CHECK_FAILED)

    lock = commands.add_parser(
        "lock", help="write the env's packages into the notebook, locked (juv's and nteract's formats)")
    lock.add_argument("notebook", metavar="NOTEBOOK")
    lock.add_argument(
        "--exclude-newer", metavar="TIMESTAMP",
        help="resolve as of this date or RFC 3339 time (default: now, UTC); stored in the notebook")

    sync = commands.add_parser("sync", help="make the notebook's env match what the notebook declares")
    sync.add_argument("notebook", metavar="NOTEBOOK")


# --- reading ---------------------------------------------------------------------------------------

def _notebook_path(text: str) -> str:
    # The file a symlink names: what the stub keys the env by, and what lock writes (not the link).
    path = os.path.realpath(os.path.expanduser(text))
    try:
        os.stat(path)
    except FileNotFoundError:
        raise CtlError("no such notebook: %s" % path, EXIT_NOT_FOUND) from None
    except PermissionError:
        raise CtlError("cannot reach %s: permission denied (a folder on its path is closed to you); "
                       "run this as the notebook's owner" % path, EXIT_NOT_ALLOWED) from None
    except OSError as exc:
        raise CtlError("cannot reach %s: %s" % (path, exc.strerror), EXIT_USAGE) from None
    if os.path.isdir(path):
        raise CtlError("%s is a folder; give the path of a .ipynb notebook" % path, EXIT_USAGE)
    return path


def _key(path: str) -> dict[str, Any]:
    """The notebook key and file identity the kernel stub would send for this notebook."""
    real = os.path.realpath(path)
    return {"key": {"kind": "notebook", "value": real}, "file": protocol.file_identity(os.stat(real))}


def _read_declaration(path: str) -> tuple[nbdecl.Declaration | None, Any, dict[str, str]]:
    """The raw declaration, what it means (declared.Parsed or None) and its lock's pins."""
    try:
        declaration = nbdecl.read_declaration(path)
        return (declaration, *nbdeps.read(declaration))
    except nbdecl.NotebookUnreadable as exc:
        raise CtlError(str(exc), EXIT_USAGE) from None
    except nbdeps.DeclarationError as exc:
        raise CtlError("%s: %s" % (path, exc), EXIT_USAGE) from None


def _show(socket_path: str, path: str) -> dict[str, Any]:
    try:
        return _request(socket_path, "show", {"key": _key(path)["key"]}, timeout=300)
    except CtlError as exc:
        if exc.exit_code == EXIT_NOT_FOUND:
            raise CtlError("%s has no env yet: open it with the uv kernel, or run `uvkernelctl sync %s`"
                           % (path, path), EXIT_NOT_FOUND) from None
        raise


def report(socket_path: str, notebook: str) -> dict[str, Any]:
    """Declared, recorded and installed side by side, and the drift (what deps and doctor print)."""
    path = _notebook_path(notebook)
    declaration, parsed, pins = _read_declaration(path)
    env = _show(socket_path, path)
    installed = nbdeps.installed_versions(env["freeze"])
    drift = nbdeps.drift(parsed, pins, env["requirement_list"], installed)
    # A stale nteract mirror (juv add after uvkernelctl lock) is not used for installing, but it is drift.
    mirror = declared.mirror_disagreement(declaration.to_wire()) if declaration else None
    if mirror:
        drift.append({"kind": "mirror", "package": "", "message": mirror})
    return {
        "notebook": path,
        "env_id": env["env_id"],
        "env_path": env["path"],
        "declared": {"where": parsed.place if parsed else None,
                     "requirements": list(parsed.dependencies) if parsed else [],
                     "requires_python": parsed.requires_python if parsed else None, "locked": pins},
        "recorded": env["requirement_list"],
        "installed": installed,
        "drift": drift,
    }


def format_report(found: dict[str, Any]) -> str:
    declared = found["declared"]
    installed = found["installed"]
    names = sorted({nbdeps.name_of(r) for r in declared["requirements"] + found["recorded"]})
    locked = declared["locked"]
    lines = [
        "notebook   %s" % found["notebook"],
        "env        %s (%s)" % (found["env_id"], found["env_path"]),
        "declared   %s" % ("%s: %s" % (declared["where"], ", ".join(declared["requirements"]) or "(empty)")
                           if declared["where"] else "(nothing: the notebook declares no packages)"),
    ]
    if locked:
        lines.append("locked     %s" % ", ".join(
            "%s %s" % (name, locked[name]) for name in names if name in locked)
            + " (uv.lock in the notebook)")
    lines.append("recorded   %s" % (", ".join(found["recorded"]) or "(nothing asked for)"))
    lines.append("installed  %s" % (", ".join(
        "%s %s" % (name, installed.get(name, "(missing)")) for name in names) or "-"))
    if found["drift"]:
        lines.append("drift:")
        lines.extend("  %s" % item["message"] for item in found["drift"])
    else:
        lines.append("no drift: the env has what the notebook declares")
    return "\n".join(lines)


def cmd_deps(socket_path: str, args: argparse.Namespace) -> int:
    found = report(socket_path, args.notebook)
    print(json.dumps(found, indent=1) if args.json else format_report(found))
    return EXIT_CHECK_FAILED if args.check and found["drift"] else EXIT_OK


def cmd_doctor_notebook(socket_path: str, args: argparse.Namespace) -> int:
    found = report(socket_path, args.notebook)
    print(json.dumps(found, indent=1) if args.json else format_report(found))
    return EXIT_CHECK_FAILED if found["drift"] else EXIT_OK


# --- syncing -------------------------------------------------------------------------------------

def _sync(socket_path: str, path: str, declaration: nbdecl.Declaration) -> dict[str, Any]:
    args = dict(_key(path), declaration=declaration.to_wire(), force=True)
    return _request(socket_path, "sync", args, timeout=None,
                    on_event=lambda name, line: print(line, file=sys.stderr, flush=True))


def _print_synced(result: dict[str, Any]) -> None:
    changes = result.get("changes") or {}
    if not result.get("synced"):
        print("the env already matches the notebook")
        return
    for verb in ("added", "removed"):
        if changes.get(verb):
            print("%s %s" % (verb, ", ".join(changes[verb])))
    print("synced env %s with the notebook" % result.get("env_id", "?"))


def cmd_sync(socket_path: str, args: argparse.Namespace) -> int:
    path = _notebook_path(args.notebook)
    declaration, parsed, _ = _read_declaration(path)
    if declaration is None or parsed is None:
        raise CtlError("%s declares no packages; nothing to sync (`uvkernelctl lock %s` writes what its "
                       "env has into it)" % (path, path), EXIT_USAGE)
    _print_synced(_sync(socket_path, path, declaration))
    return EXIT_OK


# --- locking -------------------------------------------------------------------------------------

def exclude_newer_stamp(text: str | None) -> str:
    """``--exclude-newer`` as the daemon will judge it in the notebook (declared.py owns the rule), or now
    in UTC with a ``Z``."""
    if text is None:
        return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    try:
        declared.check_exclude_newer(text, "--exclude-newer")
    except protocol.BadDeclaration as exc:
        raise CtlError("%s; nothing was written" % exc.message, EXIT_USAGE) from None
    return text


def uv_lock(script: str, previous_lock: str | None, what: str) -> str:
    """``uv lock --script`` as the calling user, in a private scratch folder; the lockfile's text.
    The notebook's previous lock goes beside the script, so uv keeps its pins where it can."""
    scratch = tempfile.mkdtemp(prefix="uvkernelctl-lock-")
    try:
        script_path = os.path.join(scratch, "notebook.py")
        with open(script_path, "w", encoding="utf-8") as handle:
            handle.write(script + "\n")
        if isinstance(previous_lock, str):
            with open(script_path + ".lock", "w", encoding="utf-8") as handle:
                handle.write(previous_lock)
        try:
            argv = [find_uv(None), "lock", "--script", script_path]
            done = subprocess.run(argv, cwd=scratch, capture_output=True, text=True,
                                  stdin=subprocess.DEVNULL, timeout=UV_LOCK_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise CtlError("running uv lock failed: %s" % exc, EXIT_DAEMON_ERROR) from None
        if done.returncode != 0:
            said = " ".join(line.strip() for line in done.stderr.splitlines()
                            if line.strip() and not line.startswith("warning:"))
            raise CtlError("uv lock cannot lock %s; nothing was written. uv says: %s"
                           % (what, said or "(nothing)"), EXIT_USAGE)
        with open(script_path + ".lock", encoding="utf-8") as handle:
            return handle.read()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def cmd_lock(socket_path: str, args: argparse.Namespace) -> int:
    stamp = exclude_newer_stamp(args.exclude_newer)
    path = _notebook_path(args.notebook)
    try:
        loaded = nbedit.read(path)
        nbedit.check_writable(loaded)
    except nbedit.EditError as exc:
        raise CtlError(str(exc), EXIT_USAGE) from None
    try:
        old = nbdecl.from_notebook(loaded.notebook)
        parsed, _ = nbdeps.read(old)
    except (nbdecl.NotebookUnreadable, nbdeps.DeclarationError) as exc:
        raise CtlError("%s: %s" % (path, exc), EXIT_USAGE) from None
    env = _show(socket_path, path)
    new = nbdeps.new_declaration(parsed, env["requirement_list"], venv_python_version(env["path"]), stamp)
    try:
        cell_source = nbdeps.new_block_source(loaded.notebook, old.script_cell if old else None, new)
    except nbdeps.DeclarationError as exc:
        raise CtlError("%s: %s" % (path, exc), EXIT_USAGE) from None
    lock_text = uv_lock(nbdeps.script_block(new), old.lock if old else None, "%s as of %s" % (
        ", ".join(new.dependencies) or "the kernel's packages", stamp))
    nbdeps.apply(loaded.notebook, old.script_cell if old else None, cell_source, new, lock_text)
    try:
        written = nbedit.write(loaded, loaded.notebook)
    except nbedit.EditError as exc:
        raise CtlError(str(exc), EXIT_USAGE) from None
    print("locked %s: %s (exclude-newer %s)"
          % (path, ", ".join(new.dependencies) or "no packages", stamp))
    print("a notebook open in JupyterLab: File > Reload Notebook from Disk (before saving it there)")
    # What the kernel stub will read from the file we wrote, so its next start finds nothing to sync.
    declaration = nbdecl.from_notebook(json.loads(written))
    if declaration is not None:
        _print_synced(_sync(socket_path, path, declaration))
    return EXIT_OK
