"""Clients believe only the daemon they expect, and the daemon and the stub never take over folders
other users control. The attacker is a real second uid (the tests run as root)."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Iterator

import pytest
from helpers import Daemon, Layout, ctl, running_kernel, wait_until

ATTACKER = 61002
SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin")

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="switching uids needs root"),
    pytest.mark.skipif(SYSTEM_PYTHON is None, reason="needs a Python in /usr/bin"),
]

# A fake uvkerneld: answers every request as a daemon would, hands out a "python" that records who
# ran it, and keeps every byte it receives.
FAKE_DAEMON = r'''
import json, os, socket, struct, sys
path, folder = sys.argv[1], os.path.dirname(sys.argv[1])
evil = os.path.join(folder, "evil-python")
with open(evil, "w") as handle:
    handle.write("#!/bin/sh\nid -u > %s\n" % os.path.join(folder, "evil-ran"))
os.chmod(evil, 0o755)
received = open(os.path.join(folder, "received"), "ab", buffering=0)
server = socket.socket(socket.AF_UNIX)
server.bind(path)
os.chmod(path, 0o666)
server.listen(16)
while True:
    conn, _ = server.accept()
    data = b""
    while len(data) < 4 or len(data) < 4 + struct.unpack(">I", data[:4])[0]:
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    received.write(data)
    if len(data) < 4:
        conn.close()
        continue
    request = json.loads(data[4:])
    result = {"path": folder, "python": evil, "env_id": "e-000000000001", "key": request["args"].get("key"),
              "source": "pool"}
    body = json.dumps({"v": 1, "id": request["id"], "ok": True, "result": result}).encode()
    conn.sendall(struct.pack(">I", len(body)) + body)
'''


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A world-writable sticky folder, like /tmp."""
    folder = Path(tempfile.mkdtemp(prefix="uvk-shared-", dir="/tmp"))
    folder.chmod(0o1777)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def fake_daemon(shared_tmp: Path) -> Iterator[Path]:
    """The attacker's fake daemon listening in the shared folder; yields its socket path."""
    script = shared_tmp / "fake.py"
    script.write_text(FAKE_DAEMON)
    script.chmod(0o644)
    socket_path = shared_tmp / "uvkerneld.sock"
    process = subprocess.Popen([SYSTEM_PYTHON, str(script), str(socket_path)], user=ATTACKER, group=ATTACKER,
                               extra_groups=[], cwd="/", stdin=subprocess.DEVNULL, env={"PATH": "/usr/bin:/bin"})
    try:
        wait_until(socket_path.exists, 30, "the fake daemon's socket")
        assert socket_path.lstat().st_uid == ATTACKER
        yield socket_path
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)


def test_a_root_kernel_refuses_a_fake_daemon_and_shows_why(layout: Layout, kernelspec: str, fake_daemon: Path) -> None:
    folder = fake_daemon.parent
    with running_kernel(layout, kernelspec, UVKERNELD_SOCKET=str(fake_daemon), wait=False) as (_, kernel):
        try:
            kernel.wait_for_ready(timeout=60)
        finally:
            assert not (folder / "evil-ran").exists(), "the stub ran the fake daemon's python as root"
        reply = kernel.execute_interactive("1 + 1", timeout=60)
    assert reply["content"]["ename"] == "EnvironmentUnavailable"
    assert ("refusing to use %s: the process answering there runs as uid %d, but uvkerneld must run as uid 0 "
            "(you) or root" % (fake_daemon, ATTACKER)) in reply["content"]["evalue"]
    assert (folder / "received").read_bytes() == b"", "the stub told the fake daemon something"


def test_uvkernelctl_the_shim_and_the_kernel_extension_refuse_a_fake_daemon(layout: Layout, fake_daemon: Path) -> None:
    env = dict(layout.env, UVKERNELD_SOCKET=str(fake_daemon))
    for command in (["status"], ["list"], ["rm", "e-000000000001"]):
        result = ctl(layout, *command, env=env)
        assert result.returncode == 1, result
        assert "uvkernelctl: refusing to use %s: the process answering there runs as uid %d" % (
            fake_daemon, ATTACKER) in result.stderr
    shim = subprocess.run(
        [sys.executable, "-c", "import sys; from uvkerneld import shim; sys.exit(shim.main('pip', sys.argv[1], sys.argv[2:]))",
         str(layout.venvs_dir / "e-1"), "install", "six"],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert shim.returncode == 1
    assert "pip: error: nothing was installed: refusing to use %s" % fake_daemon in shim.stderr
    # The kernel extension's own copy of the check (the venv has no uvkerneld to import).
    from uvkerneld import kernel_extension

    with pytest.raises(kernel_extension.UntrustedDaemon, match="runs as uid %d" % ATTACKER):
        kernel_extension._tell_daemon(str(fake_daemon), "notebook_saved", {"env": "x", "file": {}})
    assert (fake_daemon.parent / "received").read_bytes() == b""
    # Trusted once named as the daemon's user: the check is the peer's uid, nothing else.
    trusted = ctl(layout, "status", env=dict(env, UVKERNELD_DAEMON_USER=str(ATTACKER)))
    assert "refusing" not in trusted.stderr
    assert (fake_daemon.parent / "received").read_bytes() != b""


def test_install_kernelspec_writes_the_daemon_user_and_refuses_an_unknown_one(layout: Layout) -> None:
    import json

    result = ctl(layout, "install-kernelspec", "--prefix", str(layout.kernel_prefix), "--daemon-user", "61000")
    assert result.returncode == 0, result.stderr
    spec = json.loads((layout.kernel_prefix / "share" / "jupyter" / "kernels" / "uv" / "kernel.json").read_text())
    assert spec["env"]["UVKERNELD_DAEMON_USER"] == "61000"
    result = ctl(layout, "install-kernelspec", "--prefix", str(layout.kernel_prefix), "--daemon-user", "no-such-user-x")
    assert result.returncode == 2
    assert "--daemon-user 'no-such-user-x' is neither a uid nor a user on this host" in result.stderr
