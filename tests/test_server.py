"""The daemon over its real Unix socket: bad input, single instance, status, uvkernelctl status."""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import time

from helpers import Daemon, Layout, read_message, wait_until

from uvkerneld import protocol


def raw_connection(layout: Layout) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(layout.socket))
    return sock


def send_body(sock: socket.socket, body: bytes) -> None:
    sock.sendall(struct.pack(">I", len(body)) + body)


def assert_still_serving(layout: Layout) -> None:
    assert layout.status()["version"]


def test_not_json_gets_an_error_and_the_connection_stays_usable(bare_daemon: Daemon) -> None:
    with raw_connection(bare_daemon.layout) as sock:
        send_body(sock, b"hello daemon")
        reply = read_message(sock)
        assert reply is not None and reply["ok"] is False and reply["error"]["code"] == "not_json"
        sock.sendall(protocol.encode_frame(protocol.request(2, "status")))
        reply = read_message(sock)
        assert reply is not None and reply["ok"] is True and reply["id"] == 2


def test_wrong_types_and_unknown_op_keep_the_request_id(bare_daemon: Daemon) -> None:
    with raw_connection(bare_daemon.layout) as sock:
        send_body(sock, json.dumps({"v": 1, "id": 41, "op": "format_disk"}).encode())
        reply = read_message(sock)
        assert reply is not None and reply["id"] == 41 and reply["error"]["code"] == "unknown_op"
        send_body(sock, json.dumps({"v": 1, "id": 42, "op": "acquire",
                                    "args": {"key": {"kind": "env", "value": "../../etc"}}}).encode())
        reply = read_message(sock)
        assert reply is not None and reply["id"] == 42 and reply["error"]["code"] == "bad_request"
        assert "not allowed" in reply["error"]["message"]
        send_body(sock, json.dumps({"v": 3, "id": 43, "op": "status"}).encode())
        reply = read_message(sock)
        assert reply is not None and reply["error"]["code"] == "unsupported_version"
    assert not list(bare_daemon.layout.venvs_dir.glob("e-*"))  # nothing was created for bad requests


def test_too_large_frame_is_refused_and_the_connection_closed(bare_daemon: Daemon) -> None:
    with raw_connection(bare_daemon.layout) as sock:
        sock.sendall(struct.pack(">I", 1 << 30) + b"{")
        reply = read_message(sock)
        assert reply is not None and reply["error"]["code"] == "frame_too_large"
        assert read_message(sock) is None  # closed
    assert_still_serving(bare_daemon.layout)


def test_truncated_frame_gets_an_error(bare_daemon: Daemon) -> None:
    with raw_connection(bare_daemon.layout) as sock:
        frame = protocol.encode_frame(protocol.request(1, "status"))
        sock.sendall(frame[:-4])
        sock.shutdown(socket.SHUT_WR)
        reply = read_message(sock)
        assert reply is not None and reply["error"]["code"] == "truncated_frame"
    with raw_connection(bare_daemon.layout) as sock:
        sock.sendall(b"\x00\x00")
        sock.shutdown(socket.SHUT_WR)
        reply = read_message(sock)
        assert reply is not None and reply["error"]["code"] == "truncated_frame"


def test_slow_and_silent_clients_do_not_block_others(bare_daemon: Daemon) -> None:
    stalled = [raw_connection(bare_daemon.layout) for _ in range(20)]
    try:
        for index, sock in enumerate(stalled):
            # Half a header, half a body, or nothing at all: all of them just sit there.
            if index % 3 == 0:
                sock.sendall(b"\x00\x00")
            elif index % 3 == 1:
                sock.sendall(struct.pack(">I", 100) + b'{"v": 1')
        assert_still_serving(bare_daemon.layout)
    finally:
        for sock in stalled:
            sock.close()
    assert_still_serving(bare_daemon.layout)


def test_status_reports_pool_and_envs(bare_daemon: Daemon) -> None:
    status = bare_daemon.layout.status()
    assert status["version"] == __import__("uvkerneld").__version__
    assert status["socket"] == str(bare_daemon.layout.socket)
    assert status["mode"] == "user"
    assert status["pool"]["target"] == 0 and status["pool"]["ready"] == 0
    assert status["envs"]["total"] == 0 and status["envs"]["live"] == 0


def test_a_second_daemon_refuses_to_steal_a_live_socket(bare_daemon: Daemon, layout: Layout) -> None:
    other_state = layout.root / "other-state"
    second = subprocess.run(
        [sys.executable, "-m", "uvkerneld", "--state-dir", str(other_state), "--pool-size", "0",
         "--venvs-dir", str(layout.root / "other-venvs")],  # its own venvs dir: only the socket is shared
        env=layout.env, capture_output=True, text=True, timeout=60,
    )
    assert second.returncode == 1
    assert "another daemon already answers on %s" % layout.socket in second.stderr
    assert_still_serving(layout)


def test_a_second_daemon_on_the_same_state_dir_is_refused(bare_daemon: Daemon, layout: Layout) -> None:
    # Another --socket, the same state dir: the running daemon answers on ITS socket (recorded in
    # the lock file), so the second one is refused at once, not after the 15 s an exiting one gets.
    started = time.monotonic()
    second = subprocess.run(
        [sys.executable, "-m", "uvkerneld", "--socket", str(layout.root / "s2.sock"), "--pool-size", "0"],
        env=layout.env, capture_output=True, text=True, timeout=60,
    )
    took = time.monotonic() - started
    assert second.returncode == 1
    assert "another uvkerneld (pid %d) is already using" % bare_daemon.process.pid in second.stderr
    assert "it answers on %s" % layout.socket in second.stderr
    assert took < 5, "refused after %.1f s" % took  # loose: a Python start-up on a busy machine
    assert not (layout.root / "s2.sock").exists()
    assert_still_serving(layout)


def test_a_stale_socket_file_is_replaced(layout: Layout) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(layout.socket))
    stale.close()  # the file stays, nobody listens: what a crashed daemon leaves
    daemon = Daemon(layout, "--pool-size", "0").start()
    try:
        assert_still_serving(layout)
    finally:
        assert daemon.stop() == 0
    assert not layout.socket.exists()  # removed on clean shutdown


def test_uvkernelctl_status_without_a_daemon_exits_1_and_says_how_to_start(layout: Layout) -> None:
    for extra in ([], ["--json"]):
        result = subprocess.run(
            [sys.executable, "-m", "uvkerneld.ctl", "status", *extra],
            env=layout.env, capture_output=True, text=True, timeout=30,
        )
        assert result.returncode == 1
        assert result.stdout == ""
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1
        assert "uvkerneld is not running" in lines[0] and "Start it with `uvkerneld`" in lines[0]
    assert not layout.socket.exists()  # status never starts a daemon


def test_uvkernelctl_status_json_and_table(bare_daemon: Daemon) -> None:
    env = bare_daemon.layout.env
    result = subprocess.run(
        [sys.executable, "-m", "uvkerneld.ctl", "--socket", str(bare_daemon.layout.socket),
         "status", "--json"],
        env={k: v for k, v in env.items() if k != "UVKERNELD_SOCKET"},
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert isinstance(status["pool"]["ready"], int) and isinstance(status["pool"]["target"], int)
    assert status["socket"] == str(bare_daemon.layout.socket) and "envs" in status and status["version"]
    table = subprocess.run(
        [sys.executable, "-m", "uvkerneld.ctl", "status"],
        env=env, capture_output=True, text=True, timeout=30,
    )
    assert table.returncode == 0
    assert "0 ready / 0 target" in table.stdout and str(bare_daemon.layout.socket) in table.stdout


def test_sigterm_exits_0_and_removes_the_socket(layout: Layout) -> None:
    daemon = Daemon(layout, "--pool-size", "1").start()
    wait_until(lambda: layout.status()["pool"]["filling"], 30, "the pool filler to start a uv run")
    assert daemon.stop() == 0  # mid `uv` run
    assert not layout.socket.exists()
    # The half-made pool venv is gone after the next start, never handed out.
    daemon = Daemon(layout, "--pool-size", "0").start()
    try:
        status = layout.status()
        assert status["envs"]["by_state"]["creating"] == 0
        venvs = sorted(layout.venvs_dir.glob("e-*"))
        assert len(venvs) == status["pool"]["ready"]  # only complete, registered venvs remain
        assert all((venv / "bin" / "python").exists() for venv in venvs)
    finally:
        daemon.stop()
