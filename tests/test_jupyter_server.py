"""A real jupyter_server on loopback: sessions made through its REST API get their own venvs.

This is the check that JPY_SESSION_NAME is used the way the server really sets it.
"""

from __future__ import annotations

import json
import os
import queue
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
from helpers import Daemon, Layout, run_code, wait_until
from jupyter_client.blocking import BlockingKernelClient

TOKEN = "uvk-test-token"


class JupyterServer:
    def __init__(self, layout: Layout, root_dir: Path) -> None:
        self.runtime_dir = layout.root / "runtime"
        self.root_dir = root_dir
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        env = layout.env
        env.update(
            JUPYTER_RUNTIME_DIR=str(self.runtime_dir),
            JUPYTER_CONFIG_DIR=str(layout.root / "jupyter-config"),
            JUPYTER_DATA_DIR=str(layout.root / "jupyter-data"),
        )
        self.log_path = layout.root / "jupyter-server.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable, "-m", "jupyter_server", "--ip=127.0.0.1", "--port=%d" % self.port,
                    "--port-retries=0", "--no-browser", "--ServerApp.root_dir=%s" % root_dir,
                    "--IdentityProvider.token=%s" % TOKEN, "--allow-root",
                ],
                env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )
        wait_until(self._up, 60, "jupyter_server to answer")

    def _up(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError("jupyter_server exited:\n%s" % self.log_path.read_text())
        try:
            self.api("GET", "/api/status")
            return True
        except (urllib.error.URLError, ConnectionError):
            return False

    def api(self, method: str, path: str, body: Any = None) -> Any:
        request = urllib.request.Request(
            "http://127.0.0.1:%d%s" % (self.port, path),
            method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={"Authorization": "token " + TOKEN, "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            text = response.read()
        return json.loads(text) if text else None

    def stop(self) -> None:
        try:
            self.api("POST", "/api/shutdown")
        except (urllib.error.URLError, ConnectionError):
            pass
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


def _kernel_info(kernel: BlockingKernelClient) -> bool:
    msg_id = kernel.kernel_info()
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        try:
            reply = kernel.get_shell_msg(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            return False
        if reply["parent_header"].get("msg_id") == msg_id:
            # Drain iopub so later output hooks see only their own messages.
            while True:
                try:
                    kernel.get_iopub_msg(timeout=0.2)
                except queue.Empty:
                    return True
    return False


@pytest.fixture
def server(layout: Layout, kernelspec: str) -> Iterator[JupyterServer]:
    running = JupyterServer(layout, layout.notebooks)
    yield running
    running.stop()


def kernel_facts(server: JupyterServer, kernel_id: str) -> dict[str, str]:
    connection_file = server.runtime_dir / ("kernel-%s.json" % kernel_id)
    wait_until(connection_file.exists, 60, "the kernel's connection file")
    kernel = BlockingKernelClient()
    kernel.load_connection_file(str(connection_file))
    kernel.start_channels()
    try:
        # Not wait_for_ready: without a manager it reads a not-yet-beating heartbeat as death.
        wait_until(lambda: _kernel_info(kernel), 180, "a kernel_info_reply", interval=0)
        output = run_code(
            kernel,
            "import json, os, sys; print(json.dumps({'prefix': sys.prefix, "
            "'session': os.environ.get('JPY_SESSION_NAME'), 'cwd': os.getcwd()}))",
        )
    finally:
        kernel.stop_channels()
    return json.loads(output)


def test_sessions_for_two_notebooks_run_in_their_own_venvs(daemon: Daemon, layout: Layout, server: JupyterServer) -> None:
    layout.notebook("project/analysis.ipynb")
    layout.notebook("other/analysis.ipynb")  # same file name, another folder: another env
    facts = {}
    for path in ("project/analysis.ipynb", "other/analysis.ipynb"):
        session = server.api("POST", "/api/sessions", {
            "path": path, "name": os.path.basename(path), "type": "notebook", "kernel": {"name": "uv"},
        })
        facts[path] = kernel_facts(server, session["kernel"]["id"])
    for path, fact in facts.items():
        absolute = str(layout.notebooks / path)
        assert fact["session"] == absolute  # what jupyter_server really sets
        assert fact["cwd"] == os.path.dirname(absolute)
        assert fact["prefix"].startswith(str(layout.venvs_dir) + os.sep)
    assert facts["project/analysis.ipynb"]["prefix"] != facts["other/analysis.ipynb"]["prefix"]
    for path in facts:
        assert "key=notebook:%s" % (layout.notebooks / path) in daemon.log
    # Restarting through the server keeps each notebook's venv.
    sessions = server.api("GET", "/api/sessions")
    target = next(s for s in sessions if s["path"] == "project/analysis.ipynb")
    server.api("POST", "/api/kernels/%s/restart" % target["kernel"]["id"])
    again = kernel_facts(server, target["kernel"]["id"])
    assert again["prefix"] == facts["project/analysis.ipynb"]["prefix"]
