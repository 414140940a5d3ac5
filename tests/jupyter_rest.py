"""A real jupyter_server on loopback, driven through its REST API, for the tests that need the
server's own handling of notebook paths (JPY_SESSION_NAME, renames, restarts)."""

from __future__ import annotations

import json
import queue
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from helpers import Layout, run_code, wait_until
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


def run_in_kernel(server: JupyterServer, kernel_id: str, code: str, timeout: float = 60) -> str:
    """Run code in a kernel the server started (connecting to it as JupyterLab does); its stdout."""
    connection_file = server.runtime_dir / ("kernel-%s.json" % kernel_id)
    wait_until(connection_file.exists, 60, "the kernel's connection file")
    kernel = BlockingKernelClient()
    kernel.load_connection_file(str(connection_file))
    kernel.start_channels()
    try:
        # Not wait_for_ready: without a manager it reads a not-yet-beating heartbeat as death.
        wait_until(lambda: _kernel_info(kernel), 180, "a kernel_info_reply", interval=0)
        return run_code(kernel, code, timeout=timeout)
    finally:
        kernel.stop_channels()


def kernel_facts(server: JupyterServer, kernel_id: str) -> dict[str, str]:
    output = run_in_kernel(
        server, kernel_id,
        "import json, os, sys; print(json.dumps({'prefix': sys.prefix, "
        "'session': os.environ.get('JPY_SESSION_NAME'), 'cwd': os.getcwd()}))",
    )
    return json.loads(output)
