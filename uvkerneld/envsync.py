"""Make a notebook's env match what the notebook declares (issue 11; the ``sync`` op).

The pipeline, run under the env's install lock (installs.py: ``%pip`` and a sync never interleave),
with the env ``assigned -> installing -> assigned`` and an installs row (subcommand ``sync``):

1. ``declared.interpret`` gives the declaration's meaning, or BadDeclaration before anything runs.
2. requires-python: the env's interpreter must satisfy it. If it does not, the best interpreter
   uv finds on the host that does (none: the error lists the host's) gets a new env for the
   notebook, and steps 3-6 run into that env (envswitch.py).
3. A lock (``metadata["uv.lock"]``): ``uv export --script --locked`` in a private scratch folder
   gives its pins; ``--locked`` fails when the lock does not match the declaration.
4. ``uv pip compile`` with the env's interpreter over the pool venvs' packages (ipykernel, ...) +
   the pins (or the declared requirements) + what ``%pip`` added outside the declaration, with
   the env's current ``uv pip freeze`` as preferences, so nothing moves needlessly. A failure is
   the declaration's fault (does not resolve) and nothing in the env changed.
5. ``uv pip sync`` of that target into the env, then what follows every install (installs.py:
   startup-hook stripping on a shared host, shared bytecode).
6. The store records the declaration's digest and requirement list; the env's requirements become
   the new declaration's plus those ``%pip`` added that neither declaration names.

An unchanged digest costs nothing: no uv run at all.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from . import declared, envswitch, nbdecl, pipargs, protocol, startuphooks, states
from .declared import Parsed
from .installs import changed_distributions, check_changeable
from .services import Services
from .store import EnvRecord
from .venvfiles import pyvenv_version

log = logging.getLogger("uvkerneld.envsync")

NO_CHANGES: dict[str, list[str]] = {"added": [], "removed": []}
_UV_NOISE = re.compile(r"^(Using Python|Resolved|Prepared|Installed|Uninstalled|Audited|Checked) ")


async def sync(
    services: Services, record: EnvRecord, uid: int, wire: dict[str, Any], force: bool,
    send_line: Callable[[str], None],
) -> tuple[EnvRecord, dict[str, Any]]:
    """Sync the declaration ``wire`` (nbdecl's wire form) into ``record``'s env, owned by ``uid``.
    Returns (the notebook's env now: ``record``, or a new one on another interpreter; {"synced": uv
    ran, "changes": {"added", "removed"}}); raises BadDeclaration."""
    # Hashing a declaration's JSON takes ~15 ms per MB, and a sync's frame may hold 16 MiB of it
    # (protocol.MAX_SYNC_FRAME_SIZE, in any field): off the loop. A sync is rare (the stub sends
    # one only when the digest acquire returned differs), so the thread's cost does not matter.
    digest = await asyncio.to_thread(nbdecl.digest, wire)
    if not force and record.declared_digest == digest:
        return record, {"synced": False, "changes": NO_CHANGES}
    # Up to ~0.5 s for the largest declaration allowed (declared.MAX_*): off the loop.
    parsed = await asyncio.to_thread(declared.interpret, wire, services.uv.shared_host)
    parsed = parsed or Parsed(place="the notebook")
    if parsed.requires_python:
        python = await _interpreter_for(services, parsed, record)
        if python is not None:
            return await _switch(services, record, uid, wire, force, parsed, digest, python, send_line)
    installs = services.installs
    store = services.store
    async with installs.turn(record.id):
        current = store.get(record.id)
        if current is None:
            raise protocol.NotFound("env %s was removed meanwhile" % record.id)
        check_changeable(current)
        if not force and current.declared_digest == digest:
            return current, {"synced": False, "changes": NO_CHANGES}  # a sync just before ours did it
        install_id = store.insert_install(record.id, uid, "sync", ["sync", *parsed.dependencies])
        store.transition(record.id, states.INSTALLING)
        store.install_started(install_id)
        log.info("sync in env %s (install #%d) from %s: %s", record.id, install_id, parsed.place,
                 _short_list(parsed.dependencies))
        try:
            requirements, changes = await _sync_locked(services, current, parsed, send_line)
        except protocol.BadDeclaration:
            store.install_finished(install_id, 1)
            store.transition(record.id, states.ASSIGNED)  # nothing in the env was changed
            raise
        except BaseException:
            # Cancelled (shutdown) or uv could not run: uv may have stopped half-way.
            store.install_finished(install_id, None)
            store.transition(record.id, states.BROKEN, "a sync of the notebook's declaration was interrupted")
            raise
        store.install_finished(install_id, 0 if requirements is not None else 1)
        store.transition(record.id, states.ASSIGNED)
    if requirements is None:
        raise protocol.EnvUnavailable(
            "uv pip sync failed in env %s (its output is above); the env is as uv left it, and the "
            "next kernel start tries again" % record.id)
    store.record_declared(record.id, digest, list(parsed.dependencies), requirements)
    services.disk.mark_dirty()
    log.info("sync in env %s finished: +%s -%s", record.id, ",".join(changes["added"]) or "-",
             ",".join(changes["removed"]) or "-")
    return store.get(record.id) or record, {"synced": True, "changes": changes}


async def _switch(
    services: Services, record: EnvRecord, uid: int, wire: dict[str, Any], force: bool, parsed: Parsed,
    digest: str, python: tuple[str, str], send_line: Callable[[str], None],
) -> tuple[EnvRecord, dict[str, Any]]:
    """Move the notebook to a new env on ``python`` (path, version): envswitch.py. No kernel start
    for this notebook gets an env meanwhile (its key's lock)."""
    assert record.key is not None
    async with services.envs.key_lock(uid, record.key):
        current = services.store.find(uid, record.key)
        if current is None:
            raise protocol.NotFound("env %s was removed meanwhile" % record.id)
        if current.id == record.id:
            return await envswitch.switch(
                services, current, uid, parsed, digest, python, force, send_line, _sync_locked)
    # Another sync moved the notebook meanwhile: judge its env now.
    return await sync(services, current, uid, wire, force, send_line)


async def _sync_locked(
    services: Services, record: EnvRecord, parsed: Parsed, send_line: Callable[[str], None],
    into: EnvRecord | None = None,
) -> tuple[dict[str, str] | None, dict[str, list[str]]]:
    """Steps 3-5 (the caller holds the env's turn). ``into``: a new env the notebook moves to
    (envswitch.py), synced instead of ``record``'s, whose requirements and pins still guide it.
    Returns (the env's requirements to record, or None when ``uv pip sync`` failed; the changes,
    for ``into`` from ``record``'s packages to its)."""
    uv = services.uv
    config = services.config()
    venv = str((into or record).path)
    # What %pip added outside the declaration survives an edit of the declaration.
    recorded = declared.requirement_names(services.store.requirements(record.id))
    declared_before = set(declared.requirement_names(services.store.declared(record.id)))
    declared_now = declared.requirement_names(parsed.dependencies)
    kept = {name: text for name, text in recorded.items()
            if name not in declared_before and name not in declared_now}
    root = os.path.join(config.state_dir, _SCRATCH)
    await asyncio.to_thread(os.makedirs, root, 0o700, True)
    with tempfile.TemporaryDirectory(prefix="sync-", dir=root) as scratch:
        pins = list(parsed.dependencies)
        if parsed.lock:
            pins = await _locked_pins(services, parsed, venv, scratch)
        returncode, output = await uv.run_unchecked(uv.pip_argv(str(record.path), "freeze", [], [], False))
        # The env's current pins as preferences (the -o file's contents): uv keeps what still fits.
        current = [line for line in output.splitlines() if "==" in line] if returncode == 0 else []
        wanted, target = os.path.join(scratch, "wanted.txt"), os.path.join(scratch, "target.txt")
        await asyncio.to_thread(_write_files, {
            wanted: [*config.kernel_packages, *pins, *kept.values()], target: current})
        # A lock's pins are exact: its exclude-newer would only hold the kernel's own packages back.
        flags = ["--quiet", "--no-header", "-o", target, *parsed.uv_flags(with_exclude_newer=not parsed.lock)]
        returncode, output = await uv.run_unchecked(uv.pip_argv(venv, "compile", flags, [wanted], False))
        if returncode != 0:
            asked = [*parsed.dependencies, *kept.values()]
            raise protocol.BadDeclaration(
                "%s: %s %s not resolve (with this kernel's own %s): %s"
                % (parsed.place, ", ".join(map(repr, asked)) or "the declaration",
                   "do" if len(asked) > 1 else "does",
                   " ".join(config.kernel_packages), _uv_lines(output, uv.shared_host)))
        pinned = await asyncio.to_thread(_read, target)
        started = time.monotonic()
        argv = uv.pip_argv(venv, "sync", [], [target], compile_bytecode=config.bytecode == "per-env")
        returncode, output = await uv.run_unchecked(argv, on_line=send_line)
    await services.installs.after_change(Path(venv), returncode, output, True, started, send_line)
    if returncode != 0:
        return None, NO_CHANGES
    changes = changed_distributions(output) if into is None else _pin_changes(current, pinned.splitlines())
    return {**declared_now, **kept}, changes


def _pin_changes(before: list[str], after: list[str]) -> dict[str, list[str]]:
    """What ``uv pip sync`` would have reported had it moved ``before``'s pins to ``after``'s: a
    project whose version changed is both removed and added."""
    def pins(lines: list[str]) -> set[tuple[str, str]]:
        found = set()
        for line in lines:
            name, separator, version = line.split("#")[0].strip().partition("==")
            if separator:
                found.add((pipargs.normalize_name(name.strip()), version.split(";")[0].strip()))
        return found

    old, new = pins(before), pins(after)
    return {"added": sorted({name for name, _ in new - old}),
            "removed": sorted({name for name, _ in old - new})}


_SCRATCH = "sync-scratch"  # in the state dir, private: each sync's files in a folder of their own
_LOGGED_REQUIREMENTS = 400  # characters of the declared list in the log line of a sync


def sweep_scratch(state_dir: Path) -> None:
    """Remove what syncs of a killed daemon left in ``<state_dir>/sync-scratch`` (the declaration as
    a script, its lock, uv's pins). Called at start-up, under the state dir's instance lock."""
    root = os.path.join(state_dir, _SCRATCH)
    try:
        entries = os.listdir(root)
    except FileNotFoundError:
        return
    for entry in entries:
        if entry.startswith("sync-"):
            shutil.rmtree(os.path.join(root, entry), ignore_errors=True)


def _short_list(requirements: tuple[str, ...]) -> str:
    text = " ".join(requirements) or "(no dependencies)"
    if len(text) <= _LOGGED_REQUIREMENTS:
        return text
    return "%s... (%d requirements)" % (text[:_LOGGED_REQUIREMENTS], len(requirements))


def _write_files(files: dict[str, list[str]]) -> None:
    for path, lines in files.items():
        with open(path, "w", encoding="utf-8") as handle:
            handle.write("".join(line + "\n" for line in lines))


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as handle:
        return handle.read()


async def _locked_pins(services: Services, parsed: Parsed, venv: str, scratch: str) -> list[str]:
    """The lock's pins, checked against the declaration by uv itself (``--locked``)."""
    uv = services.uv
    await asyncio.to_thread(declared.check_lock, parsed, uv.shared_host)
    script = os.path.join(scratch, "notebook.py")
    await asyncio.to_thread(_write_files, {
        script: declared.script_text(parsed).splitlines(), script + ".lock": [parsed.lock or ""]})
    pins_file = os.path.join(scratch, "pins.txt")  # uv's warnings go to the output, not in here
    # The env's interpreter: without --python uv would look for one matching requires-python on the
    # daemon's PATH (another Python than the env's, or none) and run it.
    if uv.shared_host:
        await asyncio.to_thread(startuphooks.strip, venv)  # uv runs that Python, as the daemon (uv.pip_argv)
    argv = [uv.binary, "export", "--script", script, "--python", os.path.join(venv, "bin", "python"),
            "--locked", "--no-hashes", "--no-header", "--no-annotate", "--format", "requirements-txt",
            "--quiet", "-o", pins_file]
    if uv.shared_host:
        argv.append("--no-build")
    returncode, output = await uv.run_unchecked(argv)
    if returncode != 0:
        if "needs to be updated" in output or "--locked" in output:
            raise protocol.BadDeclaration(
                'metadata "uv.lock" does not match the declaration in %s; %s'
                % (parsed.place, declared.LOCK_HINT))
        raise protocol.BadDeclaration(
            'metadata "uv.lock" cannot be used with the declaration in %s: %s; %s'
            % (parsed.place, _uv_lines(output, uv.shared_host), declared.LOCK_HINT))
    try:
        pins = pipargs.parse_requirements_text(await asyncio.to_thread(_read, pins_file))
    except pipargs.PipUsageError as exc:
        raise protocol.BadDeclaration('metadata "uv.lock": %s; %s' % (exc, declared.LOCK_HINT)) from None
    lines = [requirement for requirement, _ in pins.requirements]
    if pins.editables or pins.options:
        raise protocol.BadDeclaration(
            'metadata "uv.lock" holds editable or index entries uvkerneld does not install; %s'
            % declared.LOCK_HINT)
    if uv.shared_host:
        for requirement in lines:
            refusal = pipargs.shared_host_refusal(requirement)
            if refusal:
                raise protocol.BadDeclaration('metadata "uv.lock": %s' % refusal)
    return lines


def _uv_lines(output: str, shared_host: bool) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip() and not _UV_NOISE.match(line)]
    text = " ".join(lines[-12:]) or "(uv said nothing)"
    if shared_host and "is disabled" in text:
        text += " (%s)" % (pipargs.BUILD_REFUSED % "a declared package")
    return text


def env_python_version(venv: Path) -> Version | None:
    """The version of a venv's interpreter, from its pyvenv.cfg (nothing runs)."""
    recorded = pyvenv_version(venv)
    try:
        return Version(recorded) if recorded else None
    except InvalidVersion:
        return None


async def _interpreter_for(services: Services, parsed: Parsed, record: EnvRecord) -> tuple[str, str] | None:
    """None when the env's interpreter satisfies requires-python; else (path, version) of the
    highest-versioned interpreter uv finds on the host that does. None does: BadDeclaration.

    Only interpreters uv finds as the daemon, on the daemon's PATH and in its own uv-managed
    folder (never downloaded), are candidates: a notebook names a version, never a path. In
    system mode that keeps the daemon from running (as its own uid, in ``uv venv`` and ``uv
    pip``) an interpreter some user put somewhere and named."""
    assert parsed.requires_python is not None
    wanted = SpecifierSet(parsed.requires_python)
    version = env_python_version(record.path)
    if version is not None and wanted.contains(version, prereleases=True):
        return None
    uv = services.uv
    returncode, output = await uv.run_unchecked(
        [uv.binary, "python", "list", "--only-installed", "--output-format", "json", "--no-python-downloads"])
    found = _interpreters(output) if returncode == 0 else {}
    matching = [path for path, each in found.items() if _contains(wanted, each)]
    if not matching:
        has = ", ".join("%s (%s)" % (each, path) for path, each in sorted(found.items())) or "none found"
        raise protocol.BadDeclaration(
            "%s: requires-python %r matches no interpreter on this host; it has: %s. Change requires-python, "
            "or ask for a matching Python to be installed" % (parsed.place, parsed.requires_python, has))
    # max() keeps the first of equal versions: uv's own order of preference among them.
    best = max(matching, key=lambda path: Version(found[path]))
    log.info("env %s has Python %s; %s asks for requires-python %r: the best match uv finds is %s (%s)",
             record.id, version, parsed.place, parsed.requires_python, found[best], best)
    return best, found[best]


def _interpreters(output: str) -> dict[str, str]:
    """path -> version of the interpreters ``uv python list --output-format json`` found."""
    found: dict[str, str] = {}
    for line in output.splitlines():  # uv's warnings may come before the JSON line
        if not line.startswith("[{"):
            continue
        try:
            entries = json.loads(line)
        except ValueError:
            continue
        for entry in entries:
            if isinstance(entry, dict) and isinstance(entry.get("path"), str):
                found.setdefault(os.path.realpath(entry["path"]), str(entry.get("version")))
    return found


def _contains(wanted: SpecifierSet, version: str) -> bool:
    try:
        return wanted.contains(Version(version), prereleases=True)
    except InvalidVersion:
        return False
