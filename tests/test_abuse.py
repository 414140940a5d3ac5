"""Load and abuse against a real daemon: connection floods under a low open-file limit, partial
frames, memory held by half-sent requests, log floods and forged log lines, and input that used to
reach code ``internal``. Second users are real uids (61001/61002) running /usr/bin/python3 with the
standard-library client below, so they need nothing of this checkout."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import socket
import struct
import subprocess
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import Daemon, Layout, ctl, read_message, wait_until

from uvkerneld import connlimits

SYSTEM_PYTHON = "/usr/bin/python3"
UID_A, UID_B = 61001, 61002
FD_LIMIT = 256

# A client with nothing but the standard library, run as another uid.
#   hold N: open N connections, say how many connected, wait for stdin to close, then say how
#           many were closed by the daemon with an error;
#   call OP ARGS: one request, print the reply and how long it took.
PEER = textwrap.dedent("""
    import json, socket, struct, sys, time

    def connect(path, timeout):
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(path)
                return sock
            except BlockingIOError:  # the listen backlog is full: the daemon has yet to accept
                sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def read_reply(sock):
        data = b""
        while len(data) < 4 or len(data) < 4 + struct.unpack(">I", data[:4])[0]:
            chunk = sock.recv(65536)
            if not chunk:
                return None
            data += chunk
        return json.loads(data[4:4 + struct.unpack(">I", data[:4])[0]])

    path, command = sys.argv[1], sys.argv[2]
    if command == "hold":
        held = []
        for _ in range(int(sys.argv[3])):
            try:
                held.append(connect(path, 2))
            except OSError:
                break  # the daemon stopped accepting
        print(json.dumps({"connected": len(held)}), flush=True)
        sys.stdin.read()
        codes = {}
        for sock in held:
            sock.settimeout(0.01)
            try:
                reply = read_reply(sock)
            except OSError:
                reply = None
            code = reply["error"]["code"] if reply else None
            codes[str(code)] = codes.get(str(code), 0) + 1
        print(json.dumps(codes), flush=True)
    else:
        started = time.monotonic()
        sock = connect(path, float(sys.argv[5]))
        body = json.dumps({"v": 1, "id": 1, "op": sys.argv[3], "args": json.loads(sys.argv[4])}).encode()
        sock.sendall(struct.pack(">I", len(body)) + body)
        reply = read_reply(sock)
        print(json.dumps({"reply": reply, "seconds": time.monotonic() - started}), flush=True)
""")


def peer_env() -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "HOME": "/"}


def call_as(
    uid: int, socket_path: Path, op: str, args: dict[str, Any] | None = None, timeout: float = 60
) -> dict[str, Any]:
    result = subprocess.run(
        [SYSTEM_PYTHON, "-c", PEER, str(socket_path), "call", op, json.dumps(args or {}), str(timeout)],
        user=uid, group=uid, extra_groups=[], env=peer_env(), cwd="/", capture_output=True, text=True,
        timeout=timeout + 30,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


class Holder:
    """Another uid holding many idle connections."""

    def __init__(self, uid: int, socket_path: Path, count: int) -> None:
        self.process = subprocess.Popen(
            [SYSTEM_PYTHON, "-c", PEER, str(socket_path), "hold", str(count)], user=uid, group=uid,
            extra_groups=[], env=peer_env(), cwd="/", stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        self.connected = json.loads(self.process.stdout.readline())["connected"]

    def release(self) -> dict[str, int]:
        out, _ = self.process.communicate("", timeout=60)
        return json.loads(out)


def raw_connection(socket_path: Path, timeout: float = 10) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(str(socket_path))
            return sock
        except BlockingIOError:  # the listen backlog is full: the daemon has yet to accept
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def send_body(sock: socket.socket, body: bytes) -> None:
    sock.sendall(struct.pack(">I", len(body)) + body)


def ask(sock: socket.socket, body: bytes) -> dict[str, Any]:
    send_body(sock, body)
    reply = read_message(sock)
    assert reply is not None, "the daemon closed the connection without answering"
    return reply


def rss_bytes(pid: int) -> int:
    with open("/proc/%d/status" % pid) as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS for pid %d" % pid)


def limited(daemon: Daemon, fd_limit: int) -> Daemon:
    """Run the daemon under a soft and hard open-file limit (as `ulimit -n` would)."""
    daemon.argv = ["prlimit", "--nofile=%d:%d" % (fd_limit, fd_limit), *daemon.argv]
    return daemon


@pytest.fixture
def system_daemon(layout: Layout) -> Iterator[Daemon]:
    """A system-mode daemon (run as root: the uids here are about its clients) under
    `ulimit -n 256`, with one pool venv, reachable by other uids."""
    if os.geteuid() != 0 or not os.path.exists(SYSTEM_PYTHON):
        pytest.skip("switching uids needs root, and the other uids need %s" % SYSTEM_PYTHON)
    layout.root.chmod(0o755)
    daemon = limited(Daemon(layout, "--mode", "system", "--pool-size", "1"), FD_LIMIT).start()
    daemon.wait_pool_full()
    yield daemon
    daemon.stop()


def test_idle_connections_of_two_uids_leave_room_for_status_and_kernel_starts(system_daemon: Daemon) -> None:
    layout = system_daemon.layout
    # 300 idle connections from root (this process) and 300 from uid A: more than the 256
    # descriptors the daemon has.
    held = []
    for _ in range(300):
        try:
            held.append(raw_connection(layout.socket, timeout=2))
        except OSError:
            break
    holder = Holder(UID_A, layout.socket, 300)
    try:
        # Another uid still gets its status and its kernel's env, at once.
        status = call_as(UID_B, layout.socket, "status", timeout=10)
        assert status["reply"]["ok"] is True and status["seconds"] < 5, status
        acquired = call_as(UID_B, layout.socket, "acquire", {"key": {"kind": "env", "value": "busy-host"}},
                           timeout=60)
        assert acquired["reply"]["ok"] is True and acquired["seconds"] < 30, acquired
        assert acquired["reply"]["result"]["source"] == "pool"
        assert len(held) == 300 and holder.connected == 300
        connections = status["reply"]["result"]["connections"]
        limits = connections["limits"]
        assert limits["fd_limit"] == FD_LIMIT
        assert limits["max_connections"] <= FD_LIMIT - connlimits.FD_RESERVE
        assert connections["open"] <= limits["max_connections"]
        assert connections["refused"]["evicted"] >= 2 * (300 - limits["max_connections_per_uid"])
    finally:
        codes = holder.release()
        for sock in held:
            sock.close()
    # uid A's surplus connections were told why they were closed.
    assert codes.get("over_limit", 0) >= 300 - 64, codes
    assert "out of system resource" not in system_daemon.log
    assert "closed an idle connection of uid 0: uid 0 opened more than 64 connections" in system_daemon.log


def test_a_stranger_and_a_missing_env_get_the_same_not_found(system_daemon: Daemon) -> None:
    layout = system_daemon.layout
    mine = call_as(UID_A, layout.socket, "acquire", {"key": {"kind": "env", "value": "private"}}, timeout=120)
    env_id = mine["reply"]["result"]["env_id"]
    for op in ("remove", "show", "installs"):
        stranger = call_as(UID_B, layout.socket, op, {"env_id": env_id})["reply"]["error"]
        missing = call_as(UID_B, layout.socket, op, {"env_id": "e-000000000000"})["reply"]["error"]
        assert stranger["code"] == missing["code"] == "not_found"
        assert stranger["message"].replace(env_id, "ID") == missing["message"].replace("e-000000000000", "ID")
    assert Path(mine["reply"]["result"]["path"]).is_dir()


def test_uvkernelctl_rm_of_an_unknown_env_says_not_found(bare_daemon: Daemon) -> None:
    result = ctl(bare_daemon.layout, "rm", "e-000000000000")
    assert result.returncode == 4, result
    assert "has no env e-000000000000" in result.stderr and "not allowed" not in result.stderr


def test_kernel_lifelines_are_capped_per_uid_and_never_idle_closed(layout: Layout) -> None:
    env = dict(layout.env, UVKERNELD_MAX_KERNELS_PER_UID="2", UVKERNELD_IDLE_TIMEOUT="1")
    daemon = Daemon(layout, "--pool-size", "0", env=env).start()
    request = json.dumps(
        {"v": 1, "id": 1, "op": "acquire", "args": {"key": {"kind": "env", "value": "k"}}}
    ).encode()
    lifelines: list[socket.socket] = []
    try:
        for _ in range(3):
            lifelines.append(raw_connection(layout.socket, timeout=300))
            reply = ask(lifelines[-1], request)
        third = reply
        assert third["ok"] is False and third["error"]["code"] == "over_limit"
        assert "uid %d has 2 kernels running" % os.getuid() in third["error"]["message"]
        assert layout.status()["connections"]["kernels"] == 2
        # A plain idle connection is closed after the idle timeout, with the reason...
        with raw_connection(layout.socket) as idle:
            reply = read_message(idle)
            assert reply is not None and reply["error"]["code"] == "over_limit"
            assert "idle_timeout" in reply["error"]["message"]
            assert read_message(idle) is None
        # ...the kernels' lifelines, idle for longer than that, are not.
        assert layout.status()["connections"]["kernels"] == 2
        lifelines[0].settimeout(0.2)
        with pytest.raises(socket.timeout):
            lifelines[0].recv(1)
        # A kernel that ends frees its slot.
        lifelines.pop(0).close()
        wait_until(lambda: layout.status()["connections"]["kernels"] == 1, 10,
                   "the ended kernel's slot to free")
        lifelines.append(raw_connection(layout.socket, timeout=300))
        assert ask(lifelines[-1], request)["ok"] is True
    finally:
        for sock in lifelines:
            sock.close()
        daemon.stop()


def test_a_partial_header_is_timed_out(layout: Layout) -> None:
    env = dict(layout.env, UVKERNELD_FRAME_TIMEOUT="1", UVKERNELD_IDLE_TIMEOUT="30")
    daemon = Daemon(layout, "--pool-size", "0", env=env).start()
    try:
        with raw_connection(layout.socket) as sock:
            sock.sendall(b"\x00\x00")
            started = time.monotonic()
            reply = read_message(sock)
            assert reply is not None and reply["error"]["code"] == "truncated_frame"
            assert "frame header not completed within 1 s" in reply["error"]["message"]
            assert read_message(sock) is None and time.monotonic() - started < 5
    finally:
        daemon.stop()


def test_250_partial_1mib_frames_hold_a_bounded_amount_of_memory(layout: Layout) -> None:
    # Per-uid caps off: what bounds memory here is the shared frame budget.
    env = dict(layout.env, UVKERNELD_MAX_CONNECTIONS_PER_UID="1000")
    daemon = Daemon(layout, "--pool-size", "0", env=env).start()
    assert daemon.process is not None
    try:
        idle_rss = rss_bytes(daemon.process.pid)
        length = 1 << 20  # the largest frame the protocol allows
        held, refused = [], 0
        for _ in range(250):
            sock = raw_connection(layout.socket)
            try:
                sock.sendall(struct.pack(">I", length) + b"x" * (length - 4096))
                held.append(sock)
            except OSError:  # told over_limit and closed while sending
                refused += 1
                sock.close()
        loaded_rss = rss_bytes(daemon.process.pid)
        print("daemon RSS idle %.0f MB, with 250 partial 1 MiB frames %.0f MB"
              % (idle_rss / 1e6, loaded_rss / 1e6))
        assert loaded_rss - idle_rss < 80 << 20, (idle_rss, loaded_rss)
        status = daemon.layout.status()["connections"]
        assert status["buffered_bytes"] <= connlimits.FRAME_BUFFER_BUDGET
        assert status["refused"]["frames"] >= 200 and refused + len(held) == 250
        for sock in held:
            sock.close()
        wait_until(lambda: daemon.layout.status()["connections"]["buffered_bytes"] == 0, 10,
                   "the budget to be released")
    finally:
        daemon.stop()


def test_a_flood_of_bad_requests_leaves_a_small_log(bare_daemon: Daemon) -> None:
    before = bare_daemon.log_path.stat().st_size
    with raw_connection(bare_daemon.layout.socket) as sock:
        for _ in range(3000):
            assert ask(sock, b"not json")["error"]["code"] == "not_json"
    logged = bare_daemon.log_path.stat().st_size - before
    assert logged < 40_000, "the log grew by %d bytes for 3000 bad requests" % logged
    # The first line let through after the flood says how many were dropped.
    with raw_connection(bare_daemon.layout.socket) as sock:
        def dropped_lines_counted() -> bool:
            ask(sock, b"still not json")
            return "similar line(s) dropped]" in bare_daemon.log

        wait_until(dropped_lines_counted, 10, "a line that counts the dropped ones", interval=0.5)


def test_the_log_guard_limits_asyncio_accept_errors_and_keeps_tracebacks() -> None:
    now = [0.0]
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(connlimits.LogGuard(clock=lambda: now[0]))
    logger = logging.getLogger("asyncio")
    logger.addHandler(handler)
    try:
        for _ in range(5000):  # what asyncio logs while accept() fails with EMFILE
            try:
                raise OSError(24, "Too many open files")
            except OSError:
                logger.error("socket.accept() out of system resource\nsocket: <socket fd=6>", exc_info=True)
        now[0] += 60
        try:
            raise OSError(24, "Too many open files")
        except OSError:
            logger.error("socket.accept() out of system resource\nsocket: <socket fd=6>", exc_info=True)
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert text.count("out of system resource") == connlimits.LogGuard.BURST + 1
    assert "[%d similar line(s) dropped]" % (5000 - connlimits.LogGuard.BURST) in text
    assert "Traceback (most recent call last):\n" in text and "OSError: [Errno 24]" in text


def test_client_text_cannot_forge_log_lines_and_bad_strings_are_bad_requests(layout: Layout) -> None:
    daemon = Daemon(layout, "--pool-size", "1").start()
    try:
        daemon.wait_pool_full()
        forged = "2026-01-01 00:00:00,000 INFO uvkerneld.server: FORGED"
        notebook = layout.notebook("a\n%s.ipynb" % forged)
        env = layout.request("acquire", {"key": {"kind": "notebook", "value": str(notebook)}}, timeout=120)
        daemon.wait_for_log("FORGED")
        assert not [line for line in daemon.log.splitlines() if line.startswith(forged)], daemon.log
        assert "a\\n%s.ipynb" % forged in daemon.log
        with raw_connection(layout.socket) as sock:
            bad = {
                # JSON nested 100,000 deep
                b"[" * 100_000: ("not_json", "nested too deeply"),
                # a lone surrogate in a notebook path
                b'{"v":1,"id":1,"op":"acquire","args":{"key":{"kind":"notebook","value":"/tmp/a\\ud800.ipynb"}}}':
                    ("bad_request", "not valid Unicode"),
                # ...and in the arguments of %pip, and a NUL there
                json.dumps({"v": 1, "id": 2, "op": "pip",
                            "args": {"env": env["path"], "argv": ["install", "\ud800"]}}).encode():
                    ("bad_request", '"argv" must be valid Unicode text without NUL'),
                json.dumps({"v": 1, "id": 3, "op": "pip",
                            "args": {"env": env["path"], "argv": ["install", "six\x00"]}}).encode():
                    ("bad_request", '"argv" must be valid Unicode text without NUL'),
                # a request id, an op name with a lone surrogate
                b'{"v":1,"id":"\\ud800","op":"status"}': ("bad_request", '"id" must be'),
                b'{"v":1,"id":4,"op":"st\\ud800tus"}': ("unknown_op", "unknown op"),
                # an id nested almost as deep as the decoder allows
                b'{"v":1,"op":"status","id":' + b"[" * 900 + b"]" * 900 + b"}": ("", ""),
                # a number of seconds no float holds
                json.dumps({"v": 1, "id": 5, "op": "gc",
                            "args": {"older_than_s": 10 ** 400, "dry_run": True}}).encode():
                    ("bad_request", '"older_than_s" must be a number of seconds >= 0'),
            }
            for body, (code, fragment) in bad.items():
                reply = ask(sock, body)
                assert reply["ok"] is False and reply["error"]["code"] != "internal", (body[:80], reply)
                assert code in ("", reply["error"]["code"]), (body[:80], reply)
                assert fragment in reply["error"]["message"], (body[:80], reply)
            assert ask(sock, b'{"v":1,"id":9,"op":"status"}')["ok"] is True
        assert "internal error" not in daemon.log and "Traceback" not in daemon.log
    finally:
        daemon.stop()


def test_one_uids_kernels_cannot_fill_every_slot_under_a_low_fd_limit() -> None:
    """Lifelines are never evicted, so under ``ulimit -n 256`` (144 connection slots) the kernels
    of one uid may take at most half of them; other users keep room for status and kernels."""
    from uvkerneld.connlimits import Limits

    low = Limits(256, {})
    assert low.max_kernels_per_uid <= low.max_connections // 2 < low.max_connections
    assert Limits(20000, {}).max_kernels_per_uid == 128


def test_only_sync_may_send_a_large_frame_and_each_limit_holds(bare_daemon: Daemon, layout: Layout) -> None:
    """A sync carries the notebook's uv.lock (1.25 MB for 25 data-science packages), so its frames may
    reach protocol.MAX_SYNC_FRAME_SIZE; every other op keeps MAX_FRAME_SIZE. Each limit is sent one
    more than it allows, and the lock's own bound (declared.MAX_LOCK_CHARS) inside a frame that fits."""
    from uvkerneld import client, declared, protocol

    padding = "x" * (protocol.MAX_FRAME_SIZE + 1)
    with raw_connection(layout.socket) as sock:
        body = json.dumps({"v": 1, "id": 1, "op": "status", "args": {"pad": padding}}).encode()
        reply = ask(sock, body)
        assert reply["error"]["code"] == "frame_too_large", reply
        assert "a request of %d bytes (op 'status') exceeds its 1048576-byte limit" % len(body) in (
            reply["error"]["message"]), reply
    with raw_connection(layout.socket) as sock:  # refused from the header alone: no body is read
        sock.sendall(struct.pack(">I", protocol.MAX_SYNC_FRAME_SIZE + 1) + b"{")
        reply = read_message(sock)
        assert reply is not None and reply["error"]["code"] == "frame_too_large"
        assert "exceeds the %d-byte limit" % protocol.MAX_SYNC_FRAME_SIZE in reply["error"]["message"]
    key = {"kind": "notebook", "value": str(layout.notebook("huge-lock.ipynb"))}
    script = '# /// script\n# dependencies = ["iniconfig"]\n# ///\n'
    over = {"script": script, "script_cell": 1, "lock": "#" * (declared.MAX_LOCK_CHARS + 1)}
    with pytest.raises(protocol.BadDeclaration, match=r'metadata "uv.lock" is 8388609 characters; uvkerneld '
                                                      r"reads locks of up to 8388608 \(MAX_LOCK_CHARS\)"):
        client.request(str(layout.socket), "sync", {"key": key, "declaration": over}, 120)
    # Too large to send at all: the client says so, naming the lock, before anything is sent.
    over["lock"] = "#" * protocol.MAX_SYNC_FRAME_SIZE
    expected = 'the notebook\'s declaration (its metadata "uv.lock" and first code cell) is too large to send'
    with pytest.raises(protocol.FrameTooLarge, match=re.escape(expected)):
        client.request(str(layout.socket), "sync", {"key": key, "declaration": over}, 120)
    assert layout.request("status")["connections"]["buffered_bytes"] == 0
    assert "internal error" not in bare_daemon.log
