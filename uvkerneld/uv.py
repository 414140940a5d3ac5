"""Running uv: argv lists only (never a shell), the shared cache, the configured link mode.

uv is found through the ``uv`` PyPI package (``uv.find_uv_bin()``) unless the config names one.
Every run logs its argv, never its environment (it may carry index credentials or tokens).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import shutil
from collections.abc import Callable, Sequence

from . import startuphooks
from .children import ChildRegistry, die_with_parent, stop_group

log = logging.getLogger("uvkerneld.uv")

# uv prints this when the cache and the target are on different filesystems (or the filesystem
# refuses links): every file is then copied and the disk savings silently disappear.
_LINK_FALLBACK_MARKERS = ("falling back to", "Failed to hardlink", "Failed to clone")


class UvFailed(Exception):
    def __init__(self, argv: Sequence[str], returncode: int, output: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.output = output
        tail = "\n".join(output.strip().splitlines()[-15:])
        super().__init__(
            "uv %s exited with status %d:\n%s" % (argv[1] if len(argv) > 1 else "", returncode, tail))


def find_uv(configured: str | None) -> str:
    if configured:
        resolved = shutil.which(configured)
        if not resolved:
            raise FileNotFoundError("uv binary %r (from config 'uv') not found" % configured)
        return resolved
    try:
        import uv as uv_package

        return uv_package.find_uv_bin()
    except (ImportError, FileNotFoundError):
        resolved = shutil.which("uv")
        if resolved:
            return resolved
        raise FileNotFoundError("uv not found: `pip install uv` into the daemon's environment") from None


class Uv:
    def __init__(
        self, binary: str, cache_dir: str, link_mode: str, python: str, shared_host: bool = False,
        children: ChildRegistry | None = None,
    ) -> None:
        self.binary = binary
        self.cache_dir = cache_dir
        self.link_mode = link_mode
        self.python = python
        self.link_fallback_seen = False
        # System mode: no user code may run with the daemon's rights, which write the shared cache
        # and every venv. So uv never builds (a build backend is code from whoever serves the
        # sdist) and never runs an env's Python with a user's startup hooks in it.
        self.shared_host = shared_host
        self._low_priority_pids: set[int] = set()
        # The daemon's registry of the uv process groups running now, so a successor can stop
        # them; None where no daemon keeps one (bench and tests that run uv alone).
        self.children = children

    def raise_priority(self) -> tuple[int, int]:
        """Put the low-priority uv runs under way back at normal priority: (raised, refused).

        A pool build runs under SCHED_IDLE and holds a build slot. When a kernel start needs that
        slot, the build is no longer background work: on a host whose CPUs are busy with other
        users' kernels, SCHED_IDLE would leave it (and the kernel waiting for it) nearly stalled.
        The policy is per thread, so every thread is switched. Leaving SCHED_IDLE needs
        CAP_SYS_NICE or an RLIMIT_NICE of at least 20 (the system unit sets ``LimitNICE=+0``);
        without them the run is counted as refused and the caller stops it instead.
        """
        raised = refused = 0
        for pid in list(self._low_priority_pids):
            try:
                threads = [int(tid) for tid in os.listdir("/proc/%d/task" % pid)]
            except OSError:
                continue  # it just ended
            denied = False
            for tid in threads:
                try:
                    os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
                except PermissionError:
                    denied = True
                except OSError:
                    pass  # the thread just ended
            if denied:
                refused += 1
            else:
                raised += 1
        return raised, refused

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        # The daemon's own venv (if any) must never leak into the venvs it builds.
        for name in ("VIRTUAL_ENV", "CONDA_PREFIX", "PYTHONHOME", "PYTHONPATH", "UV_PROJECT_ENVIRONMENT"):
            env.pop(name, None)
        env["UV_CACHE_DIR"] = self.cache_dir
        env["UV_LINK_MODE"] = self.link_mode
        # Only reachable registries: a venv must use the given interpreter, never a download.
        env["UV_PYTHON_DOWNLOADS"] = "never"
        env["UV_NO_PROGRESS"] = "1"
        return env

    def venv_argv(self, path: str, python: str | None = None) -> list[str]:
        return [self.binary, "venv", "--quiet", "--no-project", "--python", python or self.python, path]

    def pip_argv(self, venv: str, subcommand: str, flags: Sequence[str], packages: Sequence[str],
                 compile_bytecode: bool) -> list[str]:
        """uv's argv for one pip command on ``venv``. In system mode it first removes the
        startup hooks a user's package may have left there (see startuphooks.py), because uv
        may run that env's Python as the daemon."""
        if self.shared_host:
            startuphooks.strip(venv)
        argv = [self.binary, "pip", subcommand, "--python", os.path.join(venv, "bin", "python"), *flags]
        # uv compiles with the env's own Python, after linking what it just installed: in system
        # mode that Python would run a user's startup hooks as the daemon (installs.py compiles
        # user installs with the daemon's Python -S instead).
        if compile_bytecode and subcommand in ("install", "sync") and not self.shared_host:
            argv.append("--compile-bytecode")
        if self.shared_host and subcommand in ("install", "sync", "compile"):
            argv.append("--no-build")
        if packages:
            argv.append("--")  # requirement strings can never be read as uv flags
            argv.extend(packages)
        return argv

    async def run(
        self,
        argv: Sequence[str],
        *,
        low_priority: bool = False,
        on_line: Callable[[str], None] | None = None,
    ) -> str:
        """Run uv, return its combined output; raise UvFailed on a non-zero exit."""
        returncode, output = await self.run_unchecked(argv, low_priority=low_priority, on_line=on_line)
        if returncode != 0:
            raise UvFailed(argv, returncode, output)
        return output

    async def run_unchecked(
        self,
        argv: Sequence[str],
        *,
        low_priority: bool = False,
        on_line: Callable[[str], None] | None = None,
    ) -> tuple[int, str]:
        """Run uv, streaming each output line to ``on_line``; return (exit status, output)."""
        log.debug("running %s", " ".join(argv))
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=self._env(),
            cwd="/",
            # Dies with the daemon (PDEATHSIG); pool refills must not steal CPU from a kernel
            # that is starting right now.
            preexec_fn=functools.partial(_in_child, os.getpid(), low_priority),
            start_new_session=True,
        )
        if self.children is not None:
            self.children.add(process.pid)
        if low_priority:
            self._low_priority_pids.add(process.pid)
        lines: list[str] = []
        try:
            assert process.stdout is not None
            async for raw in process.stdout:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                lines.append(line)
                if any(marker in line for marker in _LINK_FALLBACK_MARKERS):
                    self.link_fallback_seen = True
                    log.warning(
                        "uv could not %s from the cache and copied files instead: put the cache "
                        "(%s) and the venvs on the same filesystem to share disk (%s)",
                        self.link_mode, self.cache_dir, line.strip(),
                    )
                if on_line is not None:
                    on_line(line)
            returncode = await process.wait()
        except asyncio.CancelledError:
            # Politely first: uv cleans up its temporary files on SIGTERM.
            await stop_group(process, grace_s=5.0, what="uv")
            raise
        finally:
            self._low_priority_pids.discard(process.pid)
            if self.children is not None:
                self.children.discard(process.pid)
        return returncode, "\n".join(lines)


def _in_child(parent_pid: int, low_priority: bool) -> None:
    die_with_parent(parent_pid)
    if low_priority:
        _lowest_cpu_priority()


def _lowest_cpu_priority() -> None:
    """In the forked child before exec: SCHED_IDLE runs uv only on otherwise idle CPU time."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        try:
            os.nice(19)
        except OSError:
            pass  # a seccomp filter may forbid both; a slower refill beats a failed one
