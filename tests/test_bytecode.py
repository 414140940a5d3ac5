"""Shared bytecode: compiled once in the uv cache, linked into every venv, correct at import."""

from __future__ import annotations

import json
import marshal
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import Daemon, Layout, ctl, processes_matching, run_code, running_kernel, wait_until

from bench.fixtures import cache_with_new_entries
from uvkerneld import compilequeue, compilework, envvars
from uvkerneld.bytecode import link_bytecode
from uvkerneld.config import default_kernel_packages
from uvkerneld.uv import find_uv

# Counts modules compiled from source during the imports, by wrapping the one function the
# import system calls for that (SourceLoader.source_to_code). Loading a valid .pyc never calls it.
PROBE = r"""
import importlib._bootstrap_external as external, json, sys
compiled = []
original = external.SourceLoader.source_to_code
def source_to_code(self, data, path, *args, **kwargs):
    compiled.append(path)
    return original(self, data, path, *args, **kwargs)
external.SourceLoader.source_to_code = source_to_code
for name in sys.argv[1:]:
    __import__(name)
modules = {name: getattr(sys.modules[name], "__cached__", None) for name in sys.argv[1:]}
print(json.dumps({"compiled": [p for p in compiled if p.startswith(sys.prefix)], "cached": modules,
                  "dont_write": sys.flags.dont_write_bytecode}))
"""


def import_probe(env_path: str, *modules: str) -> dict:
    result = subprocess.run(
        [os.path.join(env_path, "bin", "python"), "-c", PROBE, *modules],
        env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"), capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture
def pooled(layout: Layout) -> Iterator[Daemon]:
    daemon = Daemon(layout, "--pool-size", "2").start()
    daemon.wait_pool_full()
    yield daemon
    daemon.stop()


def acquire(layout: Layout, name: str) -> str:
    return layout.request("acquire", {"key": {"kind": "env", "value": name}}, timeout=300)["path"]


def compiled_and_linked(layout: Layout, timeout: float = 300) -> dict[str, Any]:
    """Wait until the background compiler has nothing left to compile or link; its status."""
    def drained() -> dict[str, Any] | None:
        queue = layout.status()["bytecode"]
        left = queue["waiting"] + queue["compiling"] + queue["envs_to_link"]
        return None if left else queue

    return wait_until(drained, timeout, "the bytecode queue to drain", interval=0.1)


def test_pool_venvs_import_ipykernel_without_compiling_anything(pooled: Daemon, layout: Layout) -> None:
    env_path = acquire(layout, "fast")
    probe = import_probe(env_path, "ipykernel.kernelapp", "IPython", "zmq", "tornado.ioloop")
    assert probe["dont_write"] == 1
    assert probe["compiled"] == [], "compiled from source at import: %s" % probe["compiled"][:5]
    cached = probe["cached"]["ipykernel.kernelapp"]
    assert cached.startswith(env_path) and os.path.exists(cached)
    # The .pyc is the cache's file, shared: cache + both pool venvs (+ any later venv).
    assert os.stat(cached).st_nlink >= 3


def test_tracebacks_name_the_venv_not_the_cache(pooled: Daemon, layout: Layout) -> None:
    env_path = acquire(layout, "traces")
    result = layout.request("pip", {"env": env_path, "argv": ["install", "six==1.16.0"]}, timeout=300)
    assert result["exit_status"] == 0
    code = (
        "import traceback, six, ipykernel.kernelapp as k\n"
        "print(k.IPKernelApp.initialize.__code__.co_filename)\n"
        "try:\n    six.reraise(ValueError, ValueError('boom'))\n"
        "except ValueError:\n    print(traceback.extract_tb(__import__('sys').exc_info()[2])[-1].filename)\n"
    )
    output = subprocess.run([os.path.join(env_path, "bin", "python"), "-c", code],
                            capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
    kernelapp_file, six_file = output.stdout.split()
    assert kernelapp_file.startswith(env_path + "/") and six_file.startswith(env_path + "/")
    assert str(layout.cache_dir) not in output.stdout
    compiled_and_linked(layout)
    assert import_probe(env_path, "six")["compiled"] == []  # six's bytecode is shared


def test_uninstall_and_cache_prune_leave_nothing_broken(pooled: Daemon, layout: Layout) -> None:
    env_path = acquire(layout, "prune")
    installed = layout.request("pip", {"env": env_path, "argv": ["install", "six==1.16.0"]}, timeout=300)
    assert installed["exit_status"] == 0
    compiled_and_linked(layout)
    site = next(Path(env_path).glob("lib/python*/site-packages"))
    assert list((site / "__pycache__").glob("six.*.pyc"))
    uninstalled = layout.request("pip", {"env": env_path, "argv": ["uninstall", "six"]}, timeout=300)
    assert uninstalled["exit_status"] == 0
    assert not list((site / "__pycache__").glob("six.*.pyc"))  # no orphaned bytecode left behind
    pooled.wait_pool_full()  # gc skips the prune while a venv is being built
    result = subprocess.run([sys.executable, "-m", "uvkerneld.ctl", "gc", "--older-than", "1000d", "--yes"],
                            env=layout.env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "uv cache prune: " in result.stdout and "skipped" not in result.stdout, result.stdout
    assert import_probe(env_path, "ipykernel.kernelapp")["compiled"] == []
    # A venv built after the prune still gets working, shared bytecode.
    later = acquire(layout, "after-prune")
    assert import_probe(later, "ipykernel.kernelapp")["compiled"] == []


@pytest.mark.slow
def test_per_env_fallback_compiles_inside_each_venv(layout: Layout) -> None:
    # A cache of its own: the shared one already holds compiled entries, which uv would link.
    env = dict(layout.env, UVKERNELD_BYTECODE="per-env", UVKERNELD_CACHE_DIR=str(layout.root / "own-cache"))
    daemon = Daemon(layout, "--pool-size", "0", env=env).start()
    try:
        env_path = acquire(layout, "per-env")
        probe = import_probe(env_path, "ipykernel.kernelapp")
        assert probe["compiled"] == []
        assert os.stat(probe["cached"]["ipykernel.kernelapp"]).st_nlink == 1  # its own copy
    finally:
        daemon.stop()


def test_two_compiles_of_the_same_cache_entries_at_once(layout: Layout) -> None:
    uv = find_uv(None)
    cache = layout.root / "cache"
    uv_env = dict(os.environ, UV_CACHE_DIR=str(cache))
    venvs = [layout.root / "a", layout.root / "b"]
    for venv in venvs:
        subprocess.run([uv, "venv", "-q", "--python", sys.executable, str(venv)],
                       env=uv_env, check=True, timeout=120)
        subprocess.run([uv, "pip", "install", "-q", "--python", str(venv / "bin" / "python"),
                        "six==1.16.0", "idna==3.10"],
                       env=uv_env, check=True, timeout=300)
    entries = [str(entry) for entry in (cache / "archive-v0").iterdir()]
    # Two compilers (as two daemons on one cache would be) racing on the same entries, each with
    # two workers: every .pyc is written atomically, so both finish and every .pyc is whole.
    compilers = [subprocess.Popen(
        [sys.executable, "-I", "-S", compilework.__file__, str(os.getpid()), "2", "-", *entries],
        stdout=subprocess.PIPE, text=True) for _ in range(2)]
    for compiler in compilers:
        output, _ = compiler.communicate(timeout=300)
        assert compiler.returncode == 0
        assert sorted(output.split()) == sorted(["done"] * len(entries) + [Path(e).name for e in entries])
    for venv in venvs:
        assert link_bytecode([Path(entry) for entry in entries], venv) > 0
        assert import_probe(str(venv), "six", "idna")["compiled"] == []


@pytest.mark.slow
def test_concurrent_installs_into_two_envs_both_get_bytecode(layout: Layout) -> None:
    # A cache of its own, so the packages are new to it; both installs run at once, so one env's
    # files are linked before the other's install compiles them.
    env = dict(layout.env, UVKERNELD_CACHE_DIR=str(layout.root / "own-cache"))
    daemon = Daemon(layout, "--pool-size", "0", env=env).start()
    try:
        envs = [acquire(layout, "concurrent-%d" % index) for index in range(2)]
        import threading

        results = []
        threads = [threading.Thread(target=lambda path=path: results.append(layout.request(
            "pip", {"env": path, "argv": ["install", "six==1.16.0", "idna==3.10"]}, timeout=300)))
            for path in envs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        assert [result["exit_status"] for result in results] == [0, 0]
        compiled_and_linked(layout)  # since issue 13 the install returns before the compile
        for path in envs:
            assert import_probe(path, "six", "idna", "ipykernel.kernelapp")["compiled"] == []
    finally:
        daemon.stop()


# --- issue 13: compiled in the background, after the install returned ---------------------------

NEW = ["six==1.16.0", "idna==3.10"]


@pytest.fixture
def new_entries(layout: Layout) -> list[Path]:
    """A cache of the test's own in which six and idna were just unpacked (no bytecode yet)."""
    install_into_scratch_venv(layout, NEW)
    return cache_with_new_entries(layout.cache_dir, layout.root / "own-cache", NEW)


def install_into_scratch_venv(layout: Layout, packages: list[str]) -> str:
    """uv installs ``packages`` into a scratch venv from the test's cache (so they are unpacked
    there); returns uv's report (its ``+ name==version`` lines)."""
    uv = find_uv(None)
    scratch = layout.root / "scratch-venv"
    uv_env = dict(os.environ, UV_CACHE_DIR=str(layout.cache_dir))
    subprocess.run([uv, "venv", "-q", "--python", sys.executable, str(scratch)], env=uv_env, check=True,
                   timeout=120)
    return subprocess.run([uv, "pip", "install", "--python", str(scratch / "bin" / "python"), *packages],
                          env=uv_env, check=True, timeout=300, capture_output=True, text=True).stderr


def gated_env(layout: Layout) -> dict[str, str]:
    """The daemon's environment: the test's own cache, and a compiler held at the gate file."""
    return dict(layout.env, UVKERNELD_CACHE_DIR=str(layout.root / "own-cache"),
                UVKERNELD_TEST_COMPILE_GATE=str(layout.root / "gate"))


def site_of(env_path: str | Path) -> Path:
    return next(Path(env_path).glob("lib/python*/site-packages"))


def linked_into(env_path: str | Path, entry: Path) -> bool:
    """Whether every .pyc of the cache entry is in the env as a hardlink of the same file."""
    compiled = sorted(entry.rglob("*.pyc"))
    site = site_of(env_path)
    return bool(compiled) and all(
        (site / pyc.relative_to(entry)).exists() and os.path.samefile(site / pyc.relative_to(entry), pyc)
        for pyc in compiled)


def written_by_the_kernel(env_path: str | Path, entry: Path) -> bool:
    """Whether the env has a .pyc of its own (not from the cache) for a module of ``entry``."""
    site = site_of(env_path)
    for source in entry.rglob("*.py"):
        relative = source.relative_to(entry)
        if list((site / relative.parent / "__pycache__").glob(relative.stem + ".*.pyc")):
            return True
    return False


def test_pip_install_returns_before_the_compile_and_the_env_then_gets_the_shared_pyc(
    layout: Layout, kernelspec: str, new_entries: list[Path]
) -> None:
    env = gated_env(layout)
    daemon = Daemon(layout, "--pool-size", "0", env=env).start()
    try:
        # A kernel that writes bytecode (PYTHONDONTWRITEBYTECODE empty): its own .pyc of what it
        # imports before the compile finished are replaced by the shared ones.
        with running_kernel(layout, JPY_SESSION_NAME=str(layout.notebook("compile.ipynb")),
                            UVKERNELD_CACHE_DIR=env["UVKERNELD_CACHE_DIR"],
                            PYTHONDONTWRITEBYTECODE="") as (_, kernel):
            output = run_code(kernel, "%pip install six==1.16.0 idna==3.10", timeout=300)
            # The cell is done while the compiler is held at the gate, with at most one entry compiled.
            queue = layout.status()["bytecode"]
            assert queue["waiting"] + queue["compiling"] >= 1, queue
            assert "compiling bytecode for 2 new package(s) in the background" in output
            prefix = run_code(kernel, "import sys; print(sys.prefix)").strip()
            assert run_code(kernel, "import six, idna; print(six.__version__, idna.__version__)").split() == [
                "1.16.0", "3.10"]
            assert not all(linked_into(prefix, entry) for entry in new_entries)
            held = [entry for entry in new_entries if not list(entry.rglob("*.pyc"))]
            assert held and all(written_by_the_kernel(prefix, entry) for entry in held)
            shown = ctl(layout, "status")
            assert shown.returncode == 0 and "bytecode" in shown.stdout and "compiling" in shown.stdout
            as_json = json.loads(ctl(layout, "status", "--json").stdout)["bytecode"]
            assert set(as_json) >= {"waiting", "compiling", "done", "envs_to_link", "workers"}
            (layout.root / "gate").touch()
            done = compiled_and_linked(layout)
            assert done["done"] >= 2
            for entry in new_entries:
                assert linked_into(prefix, entry), entry  # the cache's own .pyc, same inode
            assert import_probe(prefix, "six", "idna")["compiled"] == []
            assert run_code(kernel, "import six; print(six.__version__)").strip() == "1.16.0"
    finally:
        daemon.stop()


def test_kill_9_mid_compile_leaves_no_partial_pyc_and_the_next_start_finishes(
    layout: Layout, new_entries: list[Path]
) -> None:
    env = gated_env(layout)
    own_cache = env["UVKERNELD_CACHE_DIR"]
    daemon = Daemon(layout, "--pool-size", "0", env=env).start()
    env_path = acquire(layout, "killed")
    result = layout.request("pip", {"env": env_path, "argv": ["install", "six==1.16.0", "idna==3.10"]},
                            timeout=300)
    assert result["exit_status"] == 0
    wait_until(lambda: layout.status()["bytecode"]["compiling"] == 1, 120,
               "the compiler to stop at the gate after its first entry")
    held = [entry for entry in new_entries if not list(entry.rglob("*.pyc"))]
    assert len(held) == 1
    # What a kill in the middle of writing a .pyc leaves: importlib's temp file beside it.
    source = sorted(held[0].rglob("*.py"))[0]
    tag = sys.implementation.cache_tag
    partial = source.parent / "__pycache__" / ("%s.%s.pyc.140000" % (source.stem, tag))
    partial.parent.mkdir(exist_ok=True)
    partial.write_bytes(b"half a .pyc")
    assert processes_matching("compilework.py", own_cache)
    assert daemon.process is not None
    daemon.process.send_signal(signal.SIGKILL)
    daemon.process.wait(30)
    wait_until(lambda: not processes_matching("compilework.py", own_cache), 30,
               "the compiler and its workers to die with the daemon")
    site = site_of(env_path)
    assert [path for path in site.rglob("*") if ".pyc." in path.name] == []
    for pyc in site.rglob("*.pyc"):
        marshal.loads(pyc.read_bytes()[16:])  # each one whole
    assert not linked_into(env_path, held[0])

    (layout.root / "gate").touch()
    daemon = Daemon(layout, "--pool-size", "0", env=env).start()
    try:
        compiled_and_linked(layout)
        assert "was interrupted: compiling again" in daemon.log
        assert not partial.exists()
        for entry in new_entries:
            assert linked_into(env_path, entry), entry
        assert import_probe(env_path, "six", "idna")["compiled"] == []
    finally:
        daemon.stop()


def test_the_compile_gate_is_a_test_setting_never_honoured_on_a_shared_host() -> None:
    environ = {envvars.TEST_COMPILE_GATE: "/tmp/gate"}
    assert compilequeue.compile_gate("user", environ) == "/tmp/gate"
    assert compilequeue.compile_gate("system", environ) is None
    assert compilequeue.compile_gate("user", {}) is None


def test_what_uv_said_it_installed() -> None:
    output = ("Resolved 2 packages in 3ms\nInstalled 2 packages in 4ms\n + Six==1.16.0\n - idna==3.9\n"
              " + idna==3.10\n ~ localpkg==1.0 (from file:///tmp/localpkg)\n + thing @ https://x/y.whl\n")
    assert compilequeue.installed_distributions(output) == {
        ("six", "1.16.0"), ("idna", "3.10"), ("localpkg", "1.0"), ("thing", "")}


# Of what a pool venv ships (ipykernel and its dependencies), these are new to the test's cache.
KERNEL_PART = ["ipykernel", "comm", "traitlets"]


@pytest.fixture
def new_kernel_entries(layout: Layout) -> list[Path]:
    output = install_into_scratch_venv(layout, default_kernel_packages())
    wanted = ["%s==%s" % (name, version) for name, version in compilequeue.installed_distributions(output)
              if name in KERNEL_PART]
    assert len(wanted) == len(KERNEL_PART), output
    return cache_with_new_entries(layout.cache_dir, layout.root / "own-cache", wanted)


def test_a_pool_venv_is_pooled_only_once_what_it_ships_has_bytecode(
    layout: Layout, new_kernel_entries: list[Path]
) -> None:
    daemon = Daemon(layout, "--pool-size", "1", env=gated_env(layout)).start()
    try:
        wait_until(lambda: layout.status()["bytecode"]["compiling"], 120, "the pool build's compile")
        status = layout.status()
        assert status["pool"]["ready"] == 0 and status["pool"]["filling"] == 1  # held at the gate
        # A kernel start that needs the build's slot gets the venv at once: it never waits for a
        # compile (the venv gets its .pyc later, like an install's).
        hurried = layout.request("acquire", {"key": {"kind": "env", "value": "hurried"}}, timeout=60)
        assert hurried["source"] == "pool" and layout.status()["bytecode"]["compiling"]
        (layout.root / "gate").touch()
        daemon.wait_pool_full()
        assert layout.status()["bytecode"]["envs_to_link"] == 0
        env_path = acquire(layout, "from-the-pool")
        for path in (env_path, hurried["path"]):
            for entry in new_kernel_entries:
                assert linked_into(path, entry), entry
            assert import_probe(path, "ipykernel.kernelapp")["compiled"] == []
    finally:
        daemon.stop()


def test_a_kernel_start_never_waits_for_a_compile(layout: Layout, new_kernel_entries: list[Path]) -> None:
    daemon = Daemon(layout, "--pool-size", "0", env=gated_env(layout)).start()
    try:
        env_path = acquire(layout, "built-on-demand")  # the compile of its new entries is held
        queue = layout.status()["bytecode"]
        assert queue["waiting"] + queue["compiling"] >= 2 and queue["envs_to_link"] == 1, queue
        assert not all(linked_into(env_path, entry) for entry in new_kernel_entries)
        # It imports now, compiling in memory what the held compile has not done yet.
        assert import_probe(env_path, "ipykernel.kernelapp", "comm", "traitlets")["compiled"]
        (layout.root / "gate").touch()
        compiled_and_linked(layout)
        assert import_probe(env_path, "ipykernel.kernelapp")["compiled"] == []
    finally:
        daemon.stop()


def test_a_declarations_sync_returns_before_the_compile_too(layout: Layout, new_entries: list[Path]) -> None:
    daemon = Daemon(layout, "--pool-size", "0", env=gated_env(layout)).start()
    try:
        key = {"kind": "notebook", "value": str(layout.notebook("declared.ipynb"))}
        acquired = layout.request("acquire", {"key": key}, timeout=300)
        declaration = {"uv": {"dependencies": NEW}, "uv_key": "metadata.runt.uv"}
        synced = layout.request("sync", {"key": key, "declaration": declaration}, timeout=300)
        assert synced["synced"] is True
        queue = layout.status()["bytecode"]
        assert queue["waiting"] + queue["compiling"] >= 1 and queue["envs_to_link"] == 1, queue
        (layout.root / "gate").touch()
        compiled_and_linked(layout)
        for entry in new_entries:
            assert linked_into(acquired["path"], entry), entry
    finally:
        daemon.stop()


def test_a_quiet_install_gets_its_bytecode_too(layout: Layout, new_entries: list[Path]) -> None:
    # uv prints no "+ name==version" lines with -q: the entries new to the queue are what it used.
    env = dict(layout.env, UVKERNELD_CACHE_DIR=str(layout.root / "own-cache"))
    daemon = Daemon(layout, "--pool-size", "0", env=env).start()
    try:
        env_path = acquire(layout, "quiet")
        result = layout.request("pip", {"env": env_path, "argv": ["install", "-q", *NEW]}, timeout=300)
        assert result["exit_status"] == 0
        compiled_and_linked(layout)
        for entry in new_entries:
            assert linked_into(env_path, entry), entry
    finally:
        daemon.stop()
