from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))
# bench/ holds set-up code the tests share (and the benchmark smoke test runs it).
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from helpers import Daemon, Layout, process_alive
from jupyter_rest import JupyterServer


@pytest.fixture(scope="session")
def uv_cache() -> Iterator[Path]:
    """One uv cache for the whole run, as on a real host: packages download once."""
    preset = os.environ.get("UVKERNELD_TEST_CACHE")
    if preset:
        Path(preset).mkdir(parents=True, exist_ok=True)
        yield Path(preset)
        return
    path = Path(tempfile.mkdtemp(prefix="uvk-cache-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def layout(uv_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Layout]:
    # Short paths under /tmp: AF_UNIX socket paths are limited to ~107 bytes.
    root = Path(tempfile.mkdtemp(prefix="uvk-", dir="/tmp"))
    layout = Layout(root, uv_cache)
    for name, value in layout.env.items():
        if name.startswith("UVKERNELD_") or name == "JUPYTER_PATH":
            monkeypatch.setenv(name, value)
    for name in ("UVKERNEL_ENV", "UVKERNEL_NOTEBOOK", "JPY_SESSION_NAME", "UVKERNEL_KERNEL_IDENTITY"):
        monkeypatch.delenv(name, raising=False)
    yield layout
    # Stop any daemon still running on this layout (e.g. one a kernel stub started).
    pid = layout.daemon_pid()
    if pid and process_alive(pid):
        os.kill(pid, signal.SIGTERM)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def kernelspec(layout: Layout) -> str:
    """The real kernelspec, installed by the real `uvkernelctl install-kernelspec`."""
    subprocess.run(
        [sys.executable, "-m", "uvkerneld.ctl", "install-kernelspec", "--prefix", str(layout.kernel_prefix)],
        check=True, env=layout.env, capture_output=True, timeout=60,
    )
    return "uv"


@pytest.fixture
def daemon(layout: Layout) -> Iterator[Daemon]:
    running = Daemon(layout, "--pool-size", "2").start()
    yield running
    running.stop()


@pytest.fixture
def bare_daemon(layout: Layout) -> Iterator[Daemon]:
    """A daemon with no pool: for protocol and status tests that need no venv."""
    running = Daemon(layout, "--pool-size", "0").start()
    yield running
    running.stop()


@pytest.fixture
def server(layout: Layout, kernelspec: str) -> Iterator[JupyterServer]:
    """A real jupyter_server on loopback, root_dir = the layout's notebooks folder."""
    running = JupyterServer(layout, layout.notebooks)
    yield running
    running.stop()
