"""Shared bytecode: compiled once in the uv cache, linked into every venv, correct at import."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import Daemon, Layout

from uvkerneld.bytecode import SharedBytecode
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
    assert import_probe(env_path, "six")["compiled"] == []  # six's bytecode was shared at install


def test_uninstall_and_cache_prune_leave_nothing_broken(pooled: Daemon, layout: Layout) -> None:
    env_path = acquire(layout, "prune")
    installed = layout.request("pip", {"env": env_path, "argv": ["install", "six==1.16.0"]}, timeout=300)
    assert installed["exit_status"] == 0
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

    async def both() -> list[int]:
        # Two independent compilers (as two daemons would be) racing on the same entries.
        return await asyncio.gather(
            *(SharedBytecode(cache, sys.executable).share(venv, 0.0) for venv in venvs))

    assert asyncio.run(both()) == [2, 2]
    for venv in venvs:
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
        for path in envs:
            assert import_probe(path, "six", "idna", "ipykernel.kernelapp")["compiled"] == []
    finally:
        daemon.stop()
