"""Test helpers: a real daemon process, waits with timeouts, kernel round trips."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.fixtures import wait_until  # one poll loop for bench/ and the tests
from uvkerneld import client, procs, protocol


class Layout:
    """The directories and environment of one isolated uvkerneld installation."""

    def __init__(self, root: Path, cache_dir: Path) -> None:
        self.root = root
        self.socket = root / "d.sock"
        self.state_dir = root / "state"
        self.venvs_dir = root / "venvs"
        self.cache_dir = cache_dir
        self.kernel_prefix = root / "prefix"
        self.notebooks = root / "nb"
        self.notebooks.mkdir(parents=True, exist_ok=True)

    @property
    def env(self) -> dict[str, str]:
        """Client + daemon environment: what a kernel launched by Jupyter would carry."""
        env = dict(os.environ)
        for name in list(env):
            if name.startswith(("UVKERNEL_", "UVKERNELD_")) or name == "JPY_SESSION_NAME":
                del env[name]
        env.update(
            UVKERNELD_SOCKET=str(self.socket),
            UVKERNELD_STATE_DIR=str(self.state_dir),
            UVKERNELD_VENVS_DIR=str(self.venvs_dir),
            UVKERNELD_CACHE_DIR=str(self.cache_dir),
            JUPYTER_PATH=str(self.kernel_prefix / "share" / "jupyter"),
        )
        return env

    def notebook(self, name: str) -> Path:
        path = self.notebooks / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            path.write_text(json.dumps({"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
        return path

    def daemon_pid(self) -> int | None:
        try:
            text = (self.state_dir / "uvkerneld.pid").read_text().strip()
        except FileNotFoundError:
            return None
        return int(text.split()[0]) if text else None  # line 1: the pid; line 2: its socket

    def request(self, op: str, args: dict[str, Any] | None = None, timeout: float = 30.0) -> dict[str, Any]:
        return client.request(str(self.socket), op, args, timeout)

    def status(self) -> dict[str, Any]:
        return self.request("status")


class Daemon:
    """``uvkerneld`` as a real child process with its own log file."""

    def __init__(self, layout: Layout, *extra_args: str, env: dict[str, str] | None = None) -> None:
        self.layout = layout
        self.log_path = layout.root / ("daemon-%d.log" % time.monotonic_ns())
        self.argv = [sys.executable, "-m", "uvkerneld", "--log-level", "debug", *extra_args]
        self.env = env if env is not None else layout.env
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, wait: bool = True) -> Daemon:
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.argv, env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        if wait:
            wait_until(self._answers, 30, "uvkerneld to answer on %s\n%s" % (self.layout.socket, self.log))
        return self

    def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError("uvkerneld exited with %s:\n%s" % (self.process.returncode, self.log))
        try:
            self.layout.status()
            return True
        except (client.DaemonNotRunning, protocol.UvkError, OSError):
            return False

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for_log(self, text: str, timeout: float = 60) -> None:
        wait_until(lambda: text in self.log, timeout, "%r in the daemon log" % text)

    def stop(self, timeout: float = 30) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
                raise AssertionError(
                    "uvkerneld ignored SIGTERM for %d s:\n%s" % (timeout, self.log)) from None
        return self.process.returncode

    def wait_pool_full(self, timeout: float = 180) -> dict[str, Any]:
        def full() -> dict[str, Any] | None:
            pool = self.layout.status()["pool"]
            return pool if pool["ready"] >= pool["target"] and not pool["filling"] else None

        return wait_until(full, timeout, "the warm pool to fill", interval=0.2)


def process_alive(pid: int) -> bool:
    return procs.pid_alive(pid)


def processes_matching(*needles: str) -> list[int]:
    """Pids whose command line contains every needle."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/cmdline" % entry, "rb") as handle:
                cmdline = handle.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if all(needle in cmdline for needle in needles) and process_alive(int(entry)):
            found.append(int(entry))
    return found


def run_code(kernel_client: Any, code: str, timeout: float = 60) -> str:
    """Execute code in a kernel, return its stdout; fail on an error reply."""
    chunks: list[str] = []
    errors: list[str] = []

    def hook(message: dict[str, Any]) -> None:
        if message["msg_type"] == "stream":
            chunks.append(message["content"]["text"])
        elif message["msg_type"] == "error":
            errors.append("\n".join(message["content"]["traceback"]))

    reply = kernel_client.execute_interactive(code, timeout=timeout, output_hook=hook)
    if reply["content"]["status"] != "ok":
        raise AssertionError("code failed in the kernel: %s\n%s" % (reply["content"], "\n".join(errors)))
    return "".join(chunks)



def read_message(sock: Any) -> dict[str, Any] | None:
    """The next framed message on a connected socket, or None if the peer closed it."""
    decoder = protocol.FrameDecoder()
    while True:
        message = decoder.next_message()
        if message is not None:
            return message
        data = sock.recv(65536)
        if not data:
            return None
        decoder.feed(data)


def ctl(layout: Layout, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``uvkernelctl ARGS`` as the user would run it, against this layout's daemon."""
    return subprocess.run([sys.executable, "-m", "uvkerneld.ctl", *args], env=env or layout.env,
                          capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)


def register_envs(layout: Layout, count: int) -> list[str]:
    from bench.fixtures import register_envs as register

    return register(layout.state_dir, layout.venvs_dir, count)


@contextmanager
def running_kernel(
    layout: Layout, kernel_name: str = "uv", cwd: str | None = None, wait: bool = True, **extra_env: str
) -> Iterator[Any]:
    """A kernel launched by jupyter_client from the installed kernelspec; yields (manager, client),
    once the kernel answers (``wait``) or right after the launch."""
    from jupyter_client.manager import KernelManager

    env = layout.env
    env.update(extra_env)
    manager = KernelManager(kernel_name=kernel_name)
    manager.start_kernel(env=env, cwd=cwd or str(layout.notebooks))
    kernel = manager.client()
    kernel.start_channels()
    try:
        if wait:
            kernel.wait_for_ready(timeout=180)
        yield manager, kernel
    finally:
        kernel.stop_channels()
        if manager.has_kernel:
            manager.shutdown_kernel(now=True)
