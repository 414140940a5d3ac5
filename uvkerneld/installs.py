"""Package commands from notebooks: authorized, validated, queued per env, run by uv, streamed.

How the locking works
---------------------
Each env has one asyncio.Lock. asyncio.Lock wakes waiters in arrival order, so commands into
one env run strictly one at a time, first come first served, and never interleave. A global
semaphore (``max_parallel``, default: the number of cores) bounds how many envs install at
once; an install takes its env's lock first, then a slot, so a long queue for one env never
holds slots that other envs could use.

Every command is recorded in the store (queued, started, finished, exit status). A mutating
command moves the env ``assigned -> installing -> assigned``; a daemon killed in between leaves
``installing`` behind, which start-up recovery reports and the next acquire repairs by
rebuilding the env from its recorded requirements.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import re
import tempfile
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from . import pipargs, protocol, startuphooks, states
from .bytecode import sweep_orphaned_bytecode
from .children import ChildRegistry, die_with_parent, stop_group
from .compilequeue import CompileQueue
from .config import Config
from .store import EnvRecord, Store
from .uv import Uv
from .venvfiles import site_packages_dirs

log = logging.getLogger("uvkerneld.installs")

_CHANGE_LINE = re.compile(r"^ ([+\-~]) ([A-Za-z0-9][A-Za-z0-9._-]*)")
MUTATING = ("install", "uninstall")
# uv's words when --no-build stopped it (a resolver hint, or the build step itself).
_BUILD_DISABLED = re.compile(r"Building source distributions.* is disabled|building from source is disabled")


def changed_distributions(output: str) -> dict[str, list[str]]:
    """Parse uv's ``+ name==1.0`` / ``- name==0.9`` lines into added/removed project names."""
    added: list[str] = []
    removed: list[str] = []
    for line in output.splitlines():
        match = _CHANGE_LINE.match(line)
        if match:
            name = pipargs.normalize_name(match.group(2))
            (removed if match.group(1) == "-" else added).append(name)
    return {"added": sorted(set(added)), "removed": sorted(set(removed))}


async def _compile_without_site(python: str, venv: Path, children: ChildRegistry | None = None) -> None:
    """Per-env bytecode for a shared host: the daemon's Python with -S compiles (never runs) the
    env's files, so no startup hook of a user's package runs as the daemon. Like uv, it dies with
    the daemon (PDEATHSIG) and its process group (compileall's -j 0 workers) is recorded in
    ``children`` for the next daemon to stop."""
    sites = [str(site) for site in site_packages_dirs(venv)]
    process = await asyncio.create_subprocess_exec(
        python, "-I", "-S", "-m", "compileall", "-q", "-j", "0", *sites,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        cwd="/", start_new_session=True, preexec_fn=functools.partial(die_with_parent, os.getpid()),
    )
    if children is not None:
        children.add(process.pid)
    try:
        await process.wait()  # files that are not valid Python compile at import, as always
    except asyncio.CancelledError:
        await stop_group(process, what="compileall")  # the workers too
        raise
    finally:
        if children is not None:
            children.discard(process.pid)


def check_changeable(record: EnvRecord) -> None:
    """Packages change only in an env that is ``assigned`` (not broken, not being built)."""
    if record.state == states.RETIRED:  # a kernel that still runs where its notebook no longer is
        raise protocol.EnvUnavailable(
            "env %s is retired (%s): restart the kernel to run in the notebook's env, then install "
            "there" % (record.id, record.error or "its notebook moved to another env"))
    if record.state != states.ASSIGNED:
        raise protocol.EnvUnavailable(
            "env %s is %s%s; restart the kernel to repair it"
            % (record.id, record.state, ": " + record.error if record.error else "")
        )


class Validated:
    """A pip command and its requirement files, each checked, as uv will get them."""

    __slots__ = ("command", "files")

    def __init__(self, command: pipargs.PipCommand, files: list[pipargs.RequirementsText]) -> None:
        self.command = command
        self.files = files


class InstallManager:
    def __init__(self, config: Config, store: Store, uv: Uv, bytecode: CompileQueue | None = None) -> None:
        self.config = config
        self.store = store
        self.uv = uv
        self.bytecode = bytecode
        self._env_locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._slots = asyncio.Semaphore(config.max_parallel_installs)
        self.running = 0
        self.queued = 0

    def status(self) -> dict[str, int]:
        return {
            "running": self.running, "queued": self.queued, "max_parallel": self.config.max_parallel_installs,
        }

    async def run(
        self, record: EnvRecord, uid: int, argv: list[str], files: list[str], send_line: Callable[[str], None]
    ) -> dict[str, Any]:
        """Run one pip command in ``record`` (the caller checked that ``uid`` owns it)."""
        validated = self._validate(argv, files)
        command = validated.command
        install_id = self.store.insert_install(record.id, uid, command.subcommand, argv)
        async with self.turn(record.id):
            return await self._run_locked(record, validated, install_id, send_line)

    def env_lock(self, env_id: str) -> asyncio.Lock:
        """The lock every change to this env holds (``turn``); the bytecode compiler links under it."""
        return self._env_locks[env_id]

    @contextlib.asynccontextmanager
    async def turn(self, env_id: str) -> AsyncIterator[None]:
        """Wait for this env's turn (its lock, first come first served), then for a slot: every
        change to an env (``%pip``, a declaration's sync) runs inside one."""
        self.queued += 1
        dequeued = False
        try:
            async with self._env_locks[env_id]:
                async with self._slots:
                    self.queued -= 1
                    dequeued = True
                    self.running += 1
                    try:
                        yield
                    finally:
                        self.running -= 1
        finally:
            if not dequeued:
                self.queued -= 1

    def _validate(self, argv: list[str], files: list[str]) -> Validated:
        """Check everything uv will act on: the command line and every requirement file."""
        try:
            command = pipargs.parse_command(argv)
            if len(files) != len(command.files):
                raise pipargs.PipUsageError(
                    "%d requirement file(s) named but %d sent" % (len(command.files), len(files))
                )
            parsed = [pipargs.parse_requirements_text(text) for text in files]
            flags = command.uv_flags
            indexes = {flags[i + 1] for i, flag in enumerate(flags) if flag == pipargs.INDEX_FLAG}
            indexes.update(
                option[1] for each in parsed for option in each.options if option[0] == pipargs.INDEX_FLAG)
            if command.subcommand == "install" and len(indexes) > 1:
                raise pipargs.PipUsageError(pipargs.TWO_INDEXES)
        except pipargs.PipUsageError as exc:
            raise protocol.BadRequest(str(exc)) from None
        local_paths = list(command.local_paths)
        for each in parsed:
            local_paths.extend(each.local_paths)
        if self.config.mode == "system":
            self._refuse_on_a_shared_host(command, parsed)
        for path in local_paths:
            candidate = path.split(None, 1)[-1] if path.startswith("-") else path
            if not (candidate.startswith(("/", "file:")) or "://" in candidate):
                raise protocol.BadRequest(
                    "local path %r must be absolute (the pip shim resolves it against your cwd)" % candidate
                )
        return Validated(command, parsed)

    @staticmethod
    def _refuse_on_a_shared_host(command: pipargs.PipCommand, parsed: list[pipargs.RequirementsText]) -> None:
        """System mode: no local paths, nothing that needs a build (see pipargs.shared_host_refusal)."""
        checks = [(requirement, False) for requirement in command.packages]
        checks.extend((asked[3:], True) for asked in command.requirements if asked.startswith("-e "))
        for each in parsed:
            checks.extend((requirement, False) for requirement, _ in each.requirements)
            checks.extend((target, True) for target in each.editables)
        for requirement, editable in checks:
            reason = pipargs.shared_host_refusal(requirement, editable)
            if reason:
                raise protocol.NotAllowed(reason)

    async def _run_locked(
        self, record: EnvRecord, validated: Validated, install_id: int, send_line: Callable[[str], None],
    ) -> dict[str, Any]:
        command = validated.command
        record = self.store.get(record.id) or record
        mutating = command.subcommand in MUTATING
        check_changeable(record)
        if mutating:
            self.store.transition(record.id, states.INSTALLING)
        self.store.install_started(install_id)
        log.info("pip %s in env %s (install #%d): %s", command.subcommand, record.id, install_id,
                 " ".join(command.uv_flags + command.packages))
        returncode: int | None = None
        try:
            with tempfile.TemporaryDirectory(prefix="uvkerneld-req-") as scratch:
                flags = self._materialize_files(validated, scratch)
                per_env_bytecode = self.config.bytecode == "per-env"
                argv = self.uv.pip_argv(
                    str(record.path), command.subcommand, flags, command.packages,
                    compile_bytecode=per_env_bytecode,  # not in system mode: see Uv.pip_argv
                )
                install_started = time.monotonic()
                returncode, output = await self.uv.run_unchecked(argv, on_line=send_line)
                if mutating:
                    await self.after_change(
                        record.path, returncode, output, command.subcommand == "install", install_started,
                        send_line)
        except BaseException:
            # Cancelled (daemon shutdown) or failed to run uv: uv may have stopped half-way, so
            # the env is not trusted until rebuilt from its recorded requirements.
            self.store.install_finished(install_id, None)
            if mutating:
                self.store.transition(record.id, states.BROKEN, "pip %s was interrupted" % command.subcommand)
            raise
        self.store.install_finished(install_id, returncode)
        if mutating:
            # Success or a clean uv failure both leave a consistent env: uv resolves before it
            # changes anything and replaces each package as a unit.
            self.store.transition(record.id, states.ASSIGNED)
        changes = changed_distributions(output)
        if returncode == 0 and mutating:
            self._record(record.id, validated, changes)
        log.info("pip %s in env %s finished with status %d", command.subcommand, record.id, returncode)
        return {"exit_status": returncode, "changed": changes, "install_id": install_id}

    async def after_change(
        self, venv: Path, returncode: int, output: str, installed: bool, install_started: float,
        send_line: Callable[[str], None],
    ) -> None:
        """What follows a uv run that changed ``venv`` (``installed``: it may have added files):
        on a shared host, say why a build was refused and strip startup hooks; then queue the new
        packages' bytecode (compiled in the background: this does not wait for it)."""
        if returncode != 0 and self.uv.shared_host and _BUILD_DISABLED.search(output):
            send_line("uvkerneld: " + pipargs.BUILD_REFUSED % "the package named above")
        if self.uv.shared_host:
            removed = startuphooks.strip(str(venv))
            if removed:
                send_line("uvkerneld: removed %s from this env: code that runs at every Python "
                          "start is not allowed on a shared host (the daemon runs this env's "
                          "Python too)" % ", ".join(removed))
        if returncode == 0 and installed and self.config.bytecode == "per-env" and self.uv.shared_host:
            await _compile_without_site(self.config.python, venv, self.uv.children)
        if returncode == 0:
            if self.bytecode is not None and installed:
                record = self.store.find_by_path(str(venv))
                queued = await self.bytecode.after_install(
                    record.id if record else None, venv, output, install_started)
                if queued:
                    # Not waited for: the packages import now, compiling in memory until then.
                    send_line("uvkerneld: compiling bytecode for %d new package(s) in the background, "
                              "shared by every env (`uvkernelctl status` shows it)" % queued)
            sweep_orphaned_bytecode(venv)

    @staticmethod
    def _materialize_files(validated: Validated, scratch: str) -> list[str]:
        """uv's flags, each requirement file written as checked: its options become flags."""
        flags = []
        for flag in validated.command.uv_flags:
            if flag.startswith("@file:"):
                index = int(flag.split(":", 1)[1])
                parsed = validated.files[index]
                path = os.path.join(scratch, "requirements-%d.txt" % index)
                with open(path, "w", encoding="utf-8") as handle:
                    handle.write(parsed.render())
                flags.append(path)
                if validated.command.subcommand == "install":  # pip ignores them in uninstall -r files
                    for option in parsed.options:
                        if option[0] in flags and option[0] != "--extra-index-url":
                            continue  # the same --pre or -i (checked above) twice: uv refuses a repeat
                        flags.extend(option)
            else:
                flags.append(flag)
        return flags

    def _record(self, env_id: str, validated: Validated, changes: dict[str, list[str]]) -> None:
        command = validated.command
        asked = list(command.requirements)
        # _validate made sure every named file was sent.
        for (flag, _), parsed in zip(command.files, validated.files, strict=True):
            if flag == "-r":
                asked.extend(requirement for requirement, _ in parsed.requirements)
        by_name = {}
        for requirement in asked:
            by_name[pipargs.requirement_name(requirement) or requirement] = requirement
        if command.subcommand == "install":
            self.store.record_requirements(env_id, by_name, [])
        else:
            self.store.record_requirements(env_id, {}, list(by_name))
