"""systemd: unit files verify, socket activation via systemd-socket-activate, sd_notify, SIGHUP."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import Daemon, Layout, ctl, wait_until

pytestmark = pytest.mark.skipif(
    not shutil.which("systemd-analyze") or not shutil.which("systemd-socket-activate"),
    reason="needs systemd's tools (apt-get install systemd)",
)


def test_system_units_verify_and_report_their_security_score(layout: Layout) -> None:
    result = ctl(layout, "install-systemd", "--prefix", str(layout.root / "sd"))
    assert result.returncode == 0, result.stderr
    units = layout.root / "sd" / "etc" / "systemd" / "system"
    service = (units / "uvkerneld.service").read_text()
    assert "ExecStart=%s -m uvkerneld --mode system" % sys.executable in service
    for directive in ("Type=notify", "User=uvkerneld", "StateDirectory=uvkerneld", "CacheDirectory=uvkerneld",
                      "RuntimeDirectory=uvkerneld", "ProtectSystem=strict", "NoNewPrivileges=yes",
                      "PrivateTmp=yes"):
        assert directive in service.splitlines(), directive
    assert not any(line.startswith("DynamicUser=") for line in service.splitlines())
    assert "SocketMode=0666" in (units / "uvkerneld.socket").read_text()
    assert (layout.root / "sd" / "etc" / "sysusers.d" / "uvkerneld.conf").read_text().startswith("#")
    verify = subprocess.run(["systemd-analyze", "verify", "uvkerneld.socket", "uvkerneld.service"],
                            cwd=units, capture_output=True, text=True, timeout=120)
    print("systemd-analyze verify (system units): rc=%d %s%s"
          % (verify.returncode, verify.stdout, verify.stderr))
    assert verify.returncode == 0 and "uvkerneld" not in verify.stdout + verify.stderr
    security = subprocess.run(["systemd-analyze", "security", "--offline=yes", "uvkerneld.service"],
                              cwd=units, capture_output=True, text=True, timeout=120)
    match = re.search(r"Overall exposure level for uvkerneld.service: ([0-9.]+) (\w+)", security.stdout)
    assert match, security.stdout + security.stderr
    print("systemd-analyze security --offline=yes: exposure %s %s" % (match.group(1), match.group(2)))
    assert float(match.group(1)) <= 2.0  # hardening must not silently regress


def test_user_units_verify(layout: Layout) -> None:
    result = ctl(layout, "install-systemd", "--user", "--prefix", str(layout.root / "cfg"))
    assert result.returncode == 0, result.stderr
    units = layout.root / "cfg" / "systemd" / "user"
    assert "ListenStream=%t/uvkerneld/uvkerneld.sock" in (units / "uvkerneld.socket").read_text()
    verify = subprocess.run(["systemd-analyze", "--user", "verify", "uvkerneld.socket", "uvkerneld.service"],
                            cwd=units, capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, XDG_RUNTIME_DIR=str(layout.root)))
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_system_install_refuses_an_interpreter_users_cannot_reach(layout: Layout) -> None:
    if not sys.executable.startswith(("/root/", "/home/")):
        pytest.skip("this interpreter is already outside /root and /home")
    result = ctl(layout, "install-systemd")
    assert result.returncode == 2
    assert "the system service (ProtectHome=yes) and other users cannot reach it" in result.stderr


# What uv needs to reach the package index from this machine (CA bundle, proxies), the way an
# admin would add them to the service with `systemctl edit uvkerneld.service`.
NETWORK_VARIABLES = ("SSL_CERT_FILE", "SSL_CERT_DIR", "HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY",
                     "https_proxy", "http_proxy", "no_proxy", "UV_INDEX_URL", "UV_DEFAULT_INDEX", "HOME",
                     "PATH")


def socket_activated_daemon(
    layout: Layout, *extra: str, activate: tuple[str, ...] = ()
) -> subprocess.Popen[bytes]:
    log = open(layout.root / "activated.log", "wb")
    # systemd-socket-activate passes only the variables named with -E: settings go as flags.
    passed = [arg for name in NETWORK_VARIABLES if name in os.environ for arg in ("-E", name)]
    process = subprocess.Popen(
        ["systemd-socket-activate", *activate, *passed, "-l", str(layout.socket),
         sys.executable, "-m", "uvkerneld",
         "--state-dir", str(layout.state_dir), "--venvs-dir", str(layout.venvs_dir),
         "--cache-dir", str(layout.cache_dir), "--log-level", "debug", *extra],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )
    log.close()
    wait_until(layout.socket.exists, 30, "systemd-socket-activate to listen")
    return process


def test_socket_activation_answers_the_first_connection(layout: Layout) -> None:
    process = socket_activated_daemon(layout, "--pool-size", "0")
    try:
        # Nothing runs yet: this very connection makes systemd-socket-activate start the daemon.
        assert layout.daemon_pid() is None
        result = layout.request("acquire", {"key": {"kind": "env", "value": "activated"}}, timeout=300)
        assert result["path"].startswith(str(layout.venvs_dir))
        status = ctl(layout, "status", "--json")
        assert status.returncode == 0, status.stderr
        assert '"socket_activated": true' in status.stdout
        assert layout.daemon_pid() == process.pid  # it exec'd: same pid, inherited fd 3
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
        assert layout.socket.exists()  # the socket belongs to systemd: never unlinked by us
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


@pytest.mark.parametrize("activate, message", [
    # A uvkerneld.socket edited to ListenDatagram=:
    (("--datagram",), "systemd passed a AF_UNIX/SOCK_DGRAM socket on fd 3; uvkerneld needs a Unix stream "
                      "socket (ListenStream=/path in uvkerneld.socket)"),
    # ... or to Accept=yes, which hands each connection to a new daemon:
    (("--accept",), "fd 3 is not a listening socket; set Accept=no in uvkerneld.socket"),
])
def test_a_wrong_socket_from_systemd_is_refused_with_the_fix(
    layout: Layout, activate: tuple[str, ...], message: str
) -> None:
    process = socket_activated_daemon(layout, "--pool-size", "0", activate=activate)
    log_path = layout.root / "activated.log"
    try:
        if activate == ("--datagram",):
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
                sender.sendto(b"wake up", str(layout.socket))  # what makes it start the daemon
        else:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client_sock:
                client_sock.connect(str(layout.socket))
                client_sock.settimeout(60)
                assert client_sock.recv(100) == b""  # the daemon refused and exited: closed unanswered
        wait_until(lambda: message in log_path.read_text(), 60, "the daemon to refuse the socket")
        if activate == ("--datagram",):  # exec'd in place: its exit status is the daemon's
            assert process.wait(60) == 1
        log = log_path.read_text()
        assert "Traceback" not in log
        assert not (layout.state_dir / "state.db").exists()  # refused before touching any state
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def test_socket_activated_fd_is_not_inherited_by_uv_or_kernels(layout: Layout) -> None:
    process = socket_activated_daemon(layout, "--pool-size", "0")
    try:
        layout.request("status")
        flags = Path("/proc/%d/fdinfo/3" % process.pid).read_text()
        octal = int(re.search(r"flags:\s+(\d+)", flags).group(1), 8)
        assert octal & 0o2000000, "fd 3 is missing O_CLOEXEC"
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()


def test_sd_notify_ready_status_watchdog_stopping(layout: Layout) -> None:
    notify_path = layout.root / "notify.sock"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(notify_path))
    receiver.settimeout(30)
    try:
        env = dict(layout.env, NOTIFY_SOCKET=str(notify_path), WATCHDOG_USEC="400000")
        daemon = Daemon(layout, "--pool-size", "0", env=env).start()
        messages = []

        def receive_until(token: str) -> None:
            while not any(token in message for message in messages):
                messages.append(receiver.recv(4096).decode())

        receive_until("READY=1")
        ready = next(message for message in messages if "READY=1" in message)
        assert "STATUS=pool 0/0 ready, 0 envs" in ready
        receive_until("WATCHDOG=1")
        daemon.process.send_signal(signal.SIGTERM)
        receive_until("STOPPING=1")
        assert daemon.process.wait(60) == 0
        order = [next(i for i, m in enumerate(messages) if token in m) for token in ("READY=1", "STOPPING=1")]
        assert order[0] < order[1]
    finally:
        receiver.close()


def test_sighup_reloads_the_config_file(layout: Layout) -> None:
    config = layout.root / "config.toml"
    config.write_text("pool_size = 0\n")
    daemon = Daemon(layout, "--config", str(config)).start()
    try:
        assert layout.status()["pool"]["target"] == 0
        config.write_text("pool_size = 1\nlog_level = \"info\"\nlink_mode = \"copy\"\n")
        daemon.process.send_signal(signal.SIGHUP)
        wait_until(lambda: layout.status()["pool"]["target"] == 1, 30, "the new pool size")
        daemon.wait_for_log("restart to apply link_mode")
        config.write_text("pool_size = [broken\n")
        daemon.process.send_signal(signal.SIGHUP)
        daemon.wait_for_log("configuration not reloaded")
        assert layout.status()["pool"]["target"] == 1  # a bad file changes nothing
    finally:
        assert daemon.stop() == 0
