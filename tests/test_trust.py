"""Clients believe only the daemon they expect, and the daemon and the stub never take over folders
other users control. The attacker is a real second uid (the tests run as root)."""

from __future__ import annotations

import copy
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import Daemon, Layout, ctl, process_alive, processes_matching, running_kernel, wait_until

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
                               extra_groups=[], cwd="/", stdin=subprocess.DEVNULL,
                               env={"PATH": "/usr/bin:/bin"})
    try:
        wait_until(socket_path.exists, 30, "the fake daemon's socket")
        assert socket_path.lstat().st_uid == ATTACKER
        yield socket_path
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)


def test_a_root_kernel_refuses_a_fake_daemon_and_shows_why(
    layout: Layout, kernelspec: str, fake_daemon: Path
) -> None:
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


def test_uvkernelctl_the_shim_and_the_kernel_extension_refuse_a_fake_daemon(
    layout: Layout, fake_daemon: Path
) -> None:
    env = dict(layout.env, UVKERNELD_SOCKET=str(fake_daemon))
    for command in (["status"], ["list"], ["rm", "e-000000000001"]):
        result = ctl(layout, *command, env=env)
        assert result.returncode == 1, result
        assert "uvkernelctl: refusing to use %s: the process answering there runs as uid %d" % (
            fake_daemon, ATTACKER) in result.stderr
    shim = subprocess.run(
        [sys.executable, "-c",
         "import sys; from uvkerneld import shim; sys.exit(shim.main('pip', sys.argv[1], sys.argv[2:]))",
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

    prefix = str(layout.kernel_prefix)
    result = ctl(layout, "install-kernelspec", "--prefix", prefix, "--daemon-user", "61000")
    assert result.returncode == 0, result.stderr
    spec_file = layout.kernel_prefix / "share" / "jupyter" / "kernels" / "uv" / "kernel.json"
    spec = json.loads(spec_file.read_text())
    assert spec["env"]["UVKERNELD_DAEMON_USER"] == "61000"
    result = ctl(layout, "install-kernelspec", "--prefix", prefix, "--daemon-user", "no-such-user-x")
    assert result.returncode == 2
    assert "--daemon-user 'no-such-user-x' is neither a uid nor a user on this host" in result.stderr


# --- folders and files another user controls -------------------------------------------------------


def daemon_refuses(layout: Layout, *flags: str) -> str:
    """Run the daemon, expect it to refuse to start at once; return what it said."""
    try:
        result = subprocess.run([sys.executable, "-m", "uvkerneld", "--pool-size", "0", *flags],
                                env=layout.env, capture_output=True, text=True, timeout=30,
                                stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise AssertionError("the daemon started instead of refusing") from None
    assert result.returncode == 1, result.stderr
    return result.stderr


def owned_by_attacker(path: Path, mode: int = 0o755) -> Path:
    path.mkdir(parents=True)
    os.chown(path, ATTACKER, ATTACKER)
    path.chmod(mode)
    return path


def attackers_symlink(link: Path, target: Path) -> Path:
    link.symlink_to(target)
    os.lchown(link, ATTACKER, ATTACKER)
    return link


def with_socket(layout: Layout, socket_path: Path) -> Layout:
    other = copy.copy(layout)
    other.socket = socket_path
    return other


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_sticky_shared_socket_folder_is_used_as_it_is(layout: Layout, shared_tmp: Path) -> None:
    socket_path = shared_tmp / "mine.sock"
    daemon = Daemon(with_socket(layout, socket_path), "--pool-size", "0",
                    "--socket", str(socket_path)).start()
    try:
        assert mode_of(shared_tmp) == 0o1777, "the daemon changed the mode of a folder it did not make"
        assert socket_path.lstat().st_uid == 0
    finally:
        daemon.stop()
    # The same folder, where the socket's name already belongs to another user: refused.
    taken = shared_tmp / "taken.sock"
    taken.write_text("")
    os.chown(taken, ATTACKER, ATTACKER)
    said = daemon_refuses(layout, "--socket", str(taken))
    assert ("refusing to use %s as the socket folder: "
            "it is writable by everyone and %s there belongs to uid %d"
            % (shared_tmp, taken, ATTACKER)) in said
    assert taken.lstat().st_uid == ATTACKER and mode_of(shared_tmp) == 0o1777


def test_a_socket_folder_another_user_owns_or_links_is_refused(layout: Layout) -> None:
    theirs = owned_by_attacker(layout.root / "theirs")
    said = daemon_refuses(layout, "--socket", str(theirs / "d.sock"))
    assert ("refusing to use %s as the socket folder: other users can write to it (owner uid %d, mode 0755)"
            % (theirs, ATTACKER)) in said
    assert mode_of(theirs) == 0o755 and not (theirs / "d.sock").exists()
    # A symlink another user planted, pointing at a folder of root's: not followed, nothing chmodded.
    target = layout.root / "roots-folder"
    target.mkdir(mode=0o755)
    target.chmod(0o755)
    link = attackers_symlink(layout.root / "linked", target)
    said = daemon_refuses(layout, "--socket", str(link / "d.sock"))
    assert ("refusing to use %s as the socket folder: %s is a symlink owned by uid %d"
            % (link, link, ATTACKER)) in said
    assert mode_of(target) == 0o755 and os.listdir(target) == []
    # Below a folder another user owns, even a folder of ours is not safe (they can rename it).
    ours = layout.root / "theirs-too"
    owned_by_attacker(ours)
    (ours / "sub").mkdir()
    said = daemon_refuses(layout, "--socket", str(ours / "sub" / "d.sock"))
    assert "%s above it can be changed by other users (owner uid %d" % (ours, ATTACKER) in said


def test_a_state_folder_or_database_another_user_controls_is_refused(layout: Layout) -> None:
    theirs = owned_by_attacker(layout.root / "their-state", 0o777)
    said = daemon_refuses(layout, "--state-dir", str(theirs))
    assert "refusing to use %s as the state folder: other users can write to it" % theirs in said
    assert os.listdir(theirs) == [] and mode_of(theirs) == 0o777
    link = attackers_symlink(layout.root / "state-link", layout.root / "elsewhere")
    said = daemon_refuses(layout, "--state-dir", str(link))
    assert "%s is a symlink owned by uid %d" % (link, ATTACKER) in said
    assert not (layout.root / "elsewhere").exists()
    # The state folder is ours, but state.db is the other user's symlink: never opened through it.
    layout.state_dir.mkdir(mode=0o700)
    victim = layout.root / "victim.db"
    attackers_symlink(layout.state_dir / "state.db", victim)
    said = daemon_refuses(layout)
    assert ("refusing to use %s as the state database: it is a symlink owned by uid %d"
            % (layout.state_dir / "state.db", ATTACKER)) in said
    assert not victim.exists()


def test_a_fresh_daemon_makes_its_folders_private(layout: Layout) -> None:
    socket_path = layout.root / "run" / "uvkerneld" / "d.sock"
    daemon = Daemon(with_socket(layout, socket_path), "--pool-size", "0",
                    "--socket", str(socket_path)).start()
    try:
        for made in (layout.state_dir, socket_path.parent, socket_path.parent.parent):
            assert mode_of(made) == 0o700, made
    finally:
        daemon.stop()


def test_the_stub_does_not_start_a_daemon_in_a_folder_another_user_owns(
    layout: Layout, kernelspec: str
) -> None:
    theirs = owned_by_attacker(layout.root / "their-run")
    socket_path = theirs / "uvkerneld.sock"
    with running_kernel(layout, kernelspec, UVKERNELD_SOCKET=str(socket_path)) as (_, kernel):
        reply = kernel.execute_interactive("1 + 1", timeout=60)
    assert reply["content"]["ename"] == "EnvironmentUnavailable"
    assert ("refusing to use %s as the socket folder: other users can write to it (owner uid %d, mode 0755)"
            % (theirs, ATTACKER)) in reply["content"]["evalue"]
    assert os.listdir(theirs) == [], "the stub made a lock, a log or a socket there"
    assert mode_of(theirs) == 0o755


# --- a stub never starts another daemon in place of one started by hand ----------------------------


def test_a_stub_that_loses_a_hand_started_daemon_starts_none_with_other_settings(
    layout: Layout, kernelspec: str
) -> None:
    from test_pool import gated_uv

    _gate, fake_uv, env = gated_uv(layout)
    # The daemon the user started by hand, with directories of their own; the kernelspec names only
    # the socket, so a daemon a kernel started would use other ones (here: the layout's).
    hand_flags = ("--pool-size", "0", "--state-dir", str(layout.root / "hand-state"),
                  "--venvs-dir", str(layout.root / "hand-venvs"))
    hand = Daemon(layout, *hand_flags, env=env).start()
    with running_kernel(layout, kernelspec, UVKERNEL_ENV="mid-acquire", wait=False) as (_, kernel):
        # The acquire is building the env (uv held at the gate): now the daemon dies.
        builds = wait_until(lambda: processes_matching(str(fake_uv), "pip install"), 60,
                            "the env build of the acquire")
        assert hand.process is not None
        hand.process.kill()
        hand.process.wait(30)
        # uv dies with its daemon (PR_SET_PDEATHSIG, tests/test_nothing_lost.py): nothing is left
        # to release the gate, so the stub's retry is what this test sees.
        wait_until(lambda: not any(process_alive(pid) for pid in builds), 30,
                   "the gated uv to die with its daemon")
        kernel.wait_for_ready(timeout=120)
        reply = kernel.execute_interactive("1 + 1", timeout=60)
    assert reply["content"]["ename"] == "EnvironmentUnavailable"
    evalue = reply["content"]["evalue"]
    assert "the uvkerneld that serves %s (pid %d, not started by a kernel) is not running" % (
        layout.socket, hand.process.pid) in evalue
    assert "state dir %s (this one: %s)" % (layout.root / "hand-state", layout.state_dir) in evalue
    assert "Start that daemon again (it was started as `" in evalue
    # No daemon took the socket, and none made the other directories: the real one starts again.
    assert not layout.state_dir.exists() and not layout.venvs_dir.exists()
    again = Daemon(layout, *hand_flags).start()
    try:
        assert layout.status()["paths"]["state_dir"] == str(layout.root / "hand-state")
    finally:
        again.stop()


def test_a_kernel_still_starts_a_daemon_with_the_same_settings(layout: Layout, kernelspec: str) -> None:
    # A daemon once started by hand with the settings kernels use too: auto-start works as before.
    assert Daemon(layout, "--pool-size", "0").start().stop() == 0
    assert (layout.root / "d.sock.daemon").stat().st_mode & 0o777 == 0o600
    with running_kernel(layout, kernelspec, UVKERNEL_ENV="auto") as (_, kernel):
        reply = kernel.execute_interactive("import sys; print(sys.prefix)", timeout=60)
    assert reply["content"]["status"] == "ok"
    assert layout.status()["paths"]["idle_exit_s"] == 3600.0  # this one a kernel started

