"""One owner per fact: the env-id format, whether a pid is alive, where a venv's site-packages is,
how bytes and durations are shown, and the names of environment variables. Each owner's contract,
and checks that no other module writes the fact again."""

from __future__ import annotations

import ast
import json
import os
import re
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import Daemon, Layout, wait_until

from uvkerneld import config, envid, envvars, procs, protocol
from uvkerneld.ctl import target_args

REPO = Path(__file__).resolve().parent.parent
OTHER_UID = 61001  # a uid of nobody in particular (see test_system_mode.py's Host)


# --- env id (envid.py) -------------------------------------------------------------------------


def test_env_id_format_and_parse_round_trip() -> None:
    for number in (0, 1, 0xA00000000000, 16 ** 12 - 1):
        text = envid.format_env_id(number)
        assert len(text) == 14 and text.startswith("e-")
        assert envid.is_env_id(text) and envid.parse_env_id(text) == number
    assert envid.format_env_id(0) == "e-000000000000" and envid.format_env_id(0xAB) == "e-0000000000ab"
    assert envid.is_env_id(envid.EXAMPLE)
    fresh = {envid.new_env_id() for _ in range(100)}
    assert len(fresh) == 100 and all(envid.is_env_id(text) for text in fresh)


@pytest.mark.parametrize("text", [
    "", "e-", "e-0123456789a", "e-0123456789abc", "E-0123456789ab", "e-0123456789AB", "e-0123456789ag",
    "x-0123456789ab", "e_0123456789ab", "../etc/passwd", " e-0123456789ab", "e-0123456789ab\n",
    "e-+123456789ab", "e- 123456789ab", "e-0x23456789ab", None, 12, ["e-0123456789ab"],
])
def test_env_id_rejects(text: object) -> None:
    assert not envid.is_env_id(text)
    with pytest.raises(ValueError, match="an env id looks like e-0123456789ab"):
        envid.parse_env_id(text)


@pytest.mark.parametrize("number", [-1, 16 ** 12])
def test_env_id_format_rejects_numbers_out_of_range(number: int) -> None:
    with pytest.raises(ValueError, match="from 0 to"):
        envid.format_env_id(number)


def test_env_id_users_agree_with_the_owner() -> None:
    # The wire validator and uvkernelctl's target parsing decide by the same rule.
    for text in ("e-0123456789ab", "e-0123456789AB", "e-0123456789a"):
        wire_ok = True
        try:
            protocol.validate_target({"env_id": text})
        except protocol.BadRequest:
            wire_ok = False
        assert wire_ok == envid.is_env_id(text) == ("env_id" in target_args(text)), text


# --- is this pid alive (procs.py) ----------------------------------------------------------------


@pytest.fixture
def zombie() -> Iterator[int]:
    """A child of this test that has exited and that nobody has reaped yet."""
    child = subprocess.Popen(["true"])
    try:
        wait_until(lambda: (procs.stat_fields(child.pid) or ["?"])[0] == "Z", 10,
                   "the child to become a zombie")
        yield child.pid
    finally:
        child.wait(timeout=10)


def test_a_zombie_is_dead_a_running_process_alive(zombie: int) -> None:
    os.kill(zombie, 0)  # what the server's old check relied on: it succeeds on a zombie
    assert not procs.pid_alive(zombie)
    with subprocess.Popen(["sleep", "30"]) as running:
        try:
            assert procs.pid_alive(running.pid)
        finally:
            running.kill()
    assert procs.pid_alive(os.getpid()) and procs.pid_alive(1)


# The main thread ends (pthread_exit, as a C program may do) while another thread runs on.
MAIN_THREAD_EXITS = """
import ctypes, sys, threading, time
threading.Thread(target=time.sleep, args=(120,)).start()
print("started", flush=True)
ctypes.CDLL(None).pthread_exit(None)
"""


def test_a_process_whose_main_thread_exited_is_alive_while_another_thread_runs() -> None:
    with subprocess.Popen([sys.executable, "-c", MAIN_THREAD_EXITS], stdout=subprocess.PIPE) as child:
        try:
            assert child.stdout is not None and child.stdout.readline() == b"started\n"
            # /proc/<pid>/stat shows the main thread: Z once it has exited.
            wait_until(lambda: (procs.stat_fields(child.pid) or ["?"])[0] == "Z", 30,
                       "the main thread to exit")
            assert procs.pid_alive(child.pid)
        finally:
            child.kill()
            child.wait(timeout=30)
    assert not procs.pid_alive(child.pid)


def test_a_reaped_pid_and_impossible_pids_are_dead() -> None:
    child = subprocess.Popen(["true"])
    child.wait(timeout=10)
    assert not procs.pid_alive(child.pid)
    # os.kill(0 or -1, 0) would signal a process group or everything: never "alive".
    assert not procs.pid_alive(0) and not procs.pid_alive(-1)


_AS_OTHER_USER = """
import ctypes, json, os, sys
sys.path.insert(0, sys.argv[1])
zombie, hide = int(sys.argv[2]), sys.argv[3] == "hidepid"
if hide:
    # A private mount namespace with a /proc that shows each user only their own processes.
    libc = ctypes.CDLL(None, use_errno=True)
    CLONE_NEWNS, MS_REC, MS_PRIVATE = 0x20000, 0x4000, 1 << 18
    assert libc.unshare(CLONE_NEWNS) == 0, os.strerror(ctypes.get_errno())
    assert libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) == 0, os.strerror(ctypes.get_errno())
    assert libc.mount(b"proc", b"/proc", b"proc", 0, b"hidepid=2") == 0, os.strerror(ctypes.get_errno())
os.setgroups([])
os.setgid(%(uid)d)
os.setuid(%(uid)d)
from uvkerneld import procs
print(json.dumps({"pid1_visible": os.path.exists("/proc/1/stat"), "pid1": procs.pid_alive(1),
                  "self": procs.pid_alive(os.getpid()), "zombie": procs.pid_alive(zombie)}))
""" % {"uid": OTHER_UID}


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another uid")
@pytest.mark.parametrize("proc_mount", ["plain", "hidepid"])
def test_another_users_process_is_alive(zombie: int, proc_mount: str) -> None:
    argv = [sys.executable, "-I", "-S", "-c", _AS_OTHER_USER, str(REPO), str(zombie), proc_mount]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd="/")
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["pid1"] and seen["self"], seen  # root's pid 1: signalling it is refused, it exists
    if proc_mount == "plain":
        assert not seen["zombie"], seen  # root's zombie, read from /proc: dead
    else:
        # /proc hides other users' processes: the kill(pid, 0) fallback still finds pid 1.
        assert not seen["pid1_visible"], seen


def test_a_zombie_kernel_from_an_earlier_daemon_does_not_keep_its_env(layout: Layout, zombie: int) -> None:
    """A kernel an earlier daemon recorded, now a zombie (its parent has not reaped it): it runs
    nothing, so the daemon drops it at start-up and gc may remove its env."""
    daemon = Daemon(layout, "--pool-size", "0").start()
    try:
        env = layout.request("acquire", {"key": {"kind": "env", "value": "haunted"}}, timeout=300)
        # The acquiring connection counts as the env's kernel until the daemon sees it close.
        wait_until(lambda: layout.status()["envs"]["live"] == 0, 30, "the acquiring connection to close")
        assert daemon.stop() == 0
        with sqlite3.connect(layout.state_dir / "state.db") as db:
            db.execute("INSERT INTO kernels (env_id, pid) VALUES (?, ?)", (env["env_id"], zombie))
        daemon = Daemon(layout, "--pool-size", "0").start()
        assert layout.status()["envs"]["live"] == 0
        removed = layout.request("gc", {"older_than_s": 0}, timeout=120)["removed"]
        assert [entry["env_id"] for entry in removed] == [env["env_id"]]
    finally:
        daemon.stop()


# --- where a venv keeps its packages (venvfiles.py) ---------------------------------------------


def test_site_packages_is_found_in_one_place(tmp_path: Path) -> None:
    from uvkerneld.venvfiles import site_packages, site_packages_dirs, write_kernel_files

    venv = tmp_path / "v[1]*"  # glob characters in the venv's own path are not a pattern
    (venv / "bin").mkdir(parents=True)
    assert site_packages(venv) is None and site_packages_dirs(venv) == []
    with pytest.raises(FileNotFoundError, match="no lib/python"):
        write_kernel_files(venv)
    (venv / "lib" / "python3.12" / "site-packages").mkdir(parents=True)
    (venv / "lib" / "python3.11" / "site-packages").mkdir(parents=True)
    (venv / "lib" / "python3.11" / "dist-packages").mkdir()
    assert site_packages_dirs(venv) == [venv / "lib" / "python3.11" / "site-packages",
                                        venv / "lib" / "python3.12" / "site-packages"]
    assert site_packages(venv) == venv / "lib" / "python3.11" / "site-packages"


# --- sizes and durations for people (units.py) --------------------------------------------------


@pytest.mark.parametrize("count, shown", [
    (None, "?"), (0, "0 B"), (1, "1 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"),
    (5 * 1024 ** 2 + 200 * 1024, "5.2 MiB"), (3 * 1024 ** 3, "3.0 GiB"), (2 * 1024 ** 4, "2.0 TiB"),
    (5000 * 1024 ** 4, "5000.0 TiB"), (-2048, "-2.0 KiB"),
])
def test_format_bytes(count: float | None, shown: str) -> None:
    from uvkerneld.units import format_bytes

    assert format_bytes(count) == shown


@pytest.mark.parametrize("seconds, full, rough", [
    (0, "0s", "0s"), (0.9, "0s", "0s"), (59.9, "59s", "59s"), (60, "1m", "1m"), (90, "1m 30s", "1m"),
    (3600, "1h", "1h"), (3661, "1h 1m 1s", "1h"), (86400 * 40 + 5, "40d 5s", "40d"),
    (86400 * 3 + 3600 * 4 + 60 * 5 + 6, "3d 4h 5m 6s", "3d"), (-90, "-1m 30s", "-1m"),
])
def test_format_duration(seconds: float, full: str, rough: str) -> None:
    from uvkerneld.units import format_duration

    assert format_duration(seconds) == full
    assert format_duration(seconds, largest_unit_only=True) == rough


# --- nobody else writes these facts -----------------------------------------------------------

OUR_CODE = sorted((REPO / "uvkerneld").glob("*.py")) + sorted((REPO / "kernel_stub").glob("*.py"))
# Runs inside a venv that cannot import uvkerneld: keeps its own copies, checked below.
IN_VENV = REPO / "uvkerneld" / "kernel_extension.py"
VARIABLE = re.compile(r"UVKERNELD?_[A-Z][A-Z_]*[A-Z]")
# fact -> (its owner, how a copy of it looks in a string literal)
OWNED = {
    "environment variable names": ("envvars.py", re.compile(r"UVKERNELD?_")),
    "env id format": ("envid.py", re.compile(r"^e-|\be-[0-9a-f%]")),
    "site-packages location": ("venvfiles.py", re.compile(r"(?<!system-)site-packages")),
    "/proc/<pid>/stat": ("procs.py", re.compile(r"/proc/.*/stat$")),
}


def string_literals(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every string constant in ``path`` except docstrings (prose may name things)."""
    tree = ast.parse(path.read_text(), str(path))
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def test_each_fact_is_written_only_by_its_owner() -> None:
    copies = []
    for path in OUR_CODE:
        if path == IN_VENV:
            continue
        for line, text in string_literals(path):
            for fact, (owner, pattern) in OWNED.items():
                if path.name != owner and pattern.search(text):
                    where = "%s:%d" % (path.relative_to(REPO), line)
                    copies.append("%s writes the %s (%r): use %s" % (where, fact, text, owner))
    assert copies == []


def known_variables() -> set[str]:
    constants = {value for name, value in vars(envvars).items() if name.isupper() and isinstance(value, str)}
    return (constants - {envvars.SETTING_PREFIX}) | {envvars.setting_var(key) for key in config._KEYS}


def test_the_in_venv_copies_of_variable_names_match_the_owner() -> None:
    copied = {name for _, text in string_literals(IN_VENV) for name in VARIABLE.findall(text)}
    assert copied and copied <= known_variables(), copied - known_variables()


def test_every_variable_that_tests_docs_and_units_name_is_one_the_code_knows() -> None:
    """A variable renamed in envvars.py but not in the README or a test would silently do nothing."""
    places = [REPO / "README.md", *REPO.glob("docs/**/*.md"), *REPO.glob("systemd/**/*"),
              *REPO.glob("tests/*.py"), *REPO.glob("bench/*.py")]
    named = {name for path in places if path.is_file() for name in VARIABLE.findall(path.read_text())}
    test_only = {"UVKERNELD_TEST_CACHE"}  # the tests' shared uv cache (conftest.py), not uvkerneld's
    assert named - test_only <= known_variables(), (named - test_only) - known_variables()
    # The settings' variables are the settings' names, as config.py reads them.
    assert envvars.SOCKET == envvars.setting_var("socket") and envvars.MODE == envvars.setting_var("mode")
    assert {envvars.CACHE_DIR, envvars.VENVS_DIR, envvars.LINK_MODE} == {
        envvars.setting_var(key) for key in ("cache_dir", "venvs_dir", "link_mode")}
