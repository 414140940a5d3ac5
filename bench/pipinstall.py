"""`%pip install <a package with a large tree>` in a uvkerneld kernel, against uv and pip (issue 13).

Each round, paired in the same run, in a shuffled order:
- uvkerneld: ``%pip install PACKAGE`` in a kernel of a new notebook, timed from execute to the
  cell's ``execute_reply``; then the time from the same start until every new package's bytecode
  is linked into the env (the daemon's queue drained), the first ``import`` in the kernel right
  after the cell, and a first import in a fresh interpreter of the env once the compile finished;
- uv: ``uv pip install PACKAGE`` into a fresh venv that holds the kernel's packages, from the
  same cache (what the daemon runs, without the daemon);
- pip: ``%pip install PACKAGE`` in a plain ipykernel venv (``uv venv --seed``) with pip's own
  cache warm, timed like the uvkerneld cell.

The uv cache is warm (every wheel downloaded and unpacked), but to the daemon the package's
entries are new each round: every round runs on a hardlinked copy of the cache in which those
entries have no bytecode (fixtures.cache_with_new_entries), as after uv has just unpacked them.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jupyter_client.manager import KernelManager

from bench.fixtures import cache_with_new_entries, wait_until
from uvkerneld.compilequeue import installed_distributions
from uvkerneld.config import default_kernel_packages
from uvkerneld.kernelspec import kernel_json

if TYPE_CHECKING:
    from bench.run import Workspace

TARGETS = {"vs_uv": 1.2, "vs_pip": 0.5}
IMPORT_TIMER = "import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"


def _median(samples: list[float]) -> float:
    ordered = sorted(samples)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def _cell(kernel: Any, code: str, timeout: float = 900) -> tuple[float, str]:
    """Run ``code``; (seconds from execute to its execute_reply, its stdout)."""
    chunks: list[str] = []

    def hook(message: dict[str, Any]) -> None:
        if message["msg_type"] == "stream":
            chunks.append(message["content"]["text"])

    started = time.perf_counter()
    reply = kernel.execute_interactive(code, timeout=timeout, output_hook=hook)
    elapsed = time.perf_counter() - started
    if reply["content"]["status"] != "ok":
        raise SystemExit("bench: %r failed in the kernel: %s" % (code, "".join(chunks)[-2000:]))
    return elapsed, "".join(chunks)


class _Kernel:
    def __init__(self, name: str, env: dict[str, str], cwd: str) -> None:
        self.manager = KernelManager(kernel_name=name)
        self.manager.start_kernel(env=env, cwd=cwd)
        self.client = self.manager.client()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=300)

    def close(self) -> None:
        self.client.stop_channels()
        self.manager.shutdown_kernel(now=True)


def _new_distributions(ws: Workspace, package: str) -> list[str]:
    """``name==version`` of what installing ``package`` adds to a kernel's venv (warms the cache)."""
    scratch = ws.root / "pip-scratch"
    ws.uv_run("venv", "-q", "--python", sys.executable, str(scratch))
    python = str(scratch / "bin" / "python")
    ws.uv_run("pip", "install", "-q", "--python", python, *default_kernel_packages())
    output = subprocess.run(
        [ws.uv, "pip", "install", "--python", python, package],
        env=dict(ws.env, UV_CACHE_DIR=str(ws.cache_dir)), check=True, capture_output=True, text=True,
        timeout=900).stderr
    return sorted("%s==%s" % pair for pair in installed_distributions(output))


def bench_pip_install(ws: Workspace, runs: int, package: str, module: str) -> dict[str, Any]:
    added = _new_distributions(ws, package)
    ws.install_spec("uvpip", kernel_json())
    # pip's own cache warmed once, not timed: every pip round then installs from it.
    warm = ws.root / "pip-warm"
    ws.uv_run("venv", "-q", "--seed", "--python", sys.executable, str(warm))
    subprocess.run([str(warm / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    package], check=True, timeout=1800, stdout=subprocess.DEVNULL)
    rounds: list[dict[str, float]] = []
    for number in range(runs):
        cache = ws.root / ("pip-cache-%d" % number)
        cache_with_new_entries(ws.cache_dir, cache, added)
        figures: dict[str, float] = {}
        cases = [_time_uv, _time_uvkerneld, _time_pip]
        random.shuffle(cases)
        for case in cases:
            figures.update(case(ws, number, cache, package, module))
        rounds.append(figures)
        ws.stop_daemon()
        subprocess.run(["rm", "-rf", str(cache)], check=True, timeout=300)
    result: dict[str, Any] = {"package": package, "runs": runs, "new_distributions": len(added),
                              "rounds": rounds, "load_average": os.getloadavg()[0]}
    for name in rounds[0]:
        result[name] = _median([figures[name] for figures in rounds])
    result["vs_uv"] = _median([figures["uvkerneld_s"] / figures["uv_s"] for figures in rounds])
    result["vs_pip"] = _median([figures["uvkerneld_s"] / figures["pip_s"] for figures in rounds])
    return result


def _time_uv(ws: Workspace, number: int, cache: Path, package: str, module: str) -> dict[str, float]:
    venv = ws.root / ("uv-venv-%d" % number)
    env = dict(ws.env, UV_CACHE_DIR=str(cache))
    subprocess.run([ws.uv, "venv", "-q", "--python", sys.executable, str(venv)], env=env, check=True,
                   timeout=300)
    python = str(venv / "bin" / "python")
    subprocess.run([ws.uv, "pip", "install", "-q", "--python", python, *default_kernel_packages()], env=env,
                   check=True, timeout=900)
    started = time.perf_counter()
    subprocess.run([ws.uv, "pip", "install", "-q", "--python", python, package], env=env, check=True,
                   timeout=900)
    return {"uv_s": time.perf_counter() - started}


def _time_uvkerneld(ws: Workspace, number: int, cache: Path, package: str, module: str) -> dict[str, float]:
    ws.use("pip-%d" % number, cache_dir=cache)
    ws.start_daemon(pool_size=1)
    ws.wait_quiet()
    notebook = ws.notebooks / ("pip-%d.ipynb" % number)
    notebook.write_text('{"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}')
    env = dict(ws.env, JPY_SESSION_NAME=str(notebook))
    kernel = _Kernel("uvpip", env, str(ws.notebooks))
    try:
        started = time.perf_counter()
        cell_s, _ = _cell(kernel.client, "%pip install " + package)
        import_s = float(_cell(kernel.client, IMPORT_TIMER.format(module=module))[1].split()[-1])
        prefix = _cell(kernel.client, "import sys; print(sys.prefix)")[1].strip()
    finally:
        kernel.close()

    def drained() -> bool:
        queue = (ws.status() or {}).get("bytecode") or {}
        return bool(queue) and not (queue["waiting"] or queue["compiling"] or queue["envs_to_link"])

    wait_until(drained, 1800, "the bytecode of %s to be linked" % package, interval=0.05)
    linked_s = time.perf_counter() - started
    fresh = subprocess.run([os.path.join(prefix, "bin", "python"), "-c", IMPORT_TIMER.format(module=module)],
                           capture_output=True, text=True, check=True, timeout=300,
                           env=dict(ws.env, PYTHONDONTWRITEBYTECODE="1"))
    return {"uvkerneld_s": cell_s, "linked_s": linked_s, "import_right_after_s": import_s,
            "import_after_compile_s": float(fresh.stdout.split()[-1])}


def _time_pip(ws: Workspace, number: int, cache: Path, package: str, module: str) -> dict[str, float]:
    venv = ws.root / ("pip-venv-%d" % number)
    ws.uv_run("venv", "-q", "--seed", "--python", sys.executable, str(venv))
    ws.uv_run("pip", "install", "-q", "--compile-bytecode", "--python", str(venv / "bin" / "python"),
              *default_kernel_packages())
    name = "pipplain%d" % number
    ws.install_spec(name, {"argv": [str(venv / "bin" / "python"), "-m", "ipykernel_launcher", "-f",
                                    "{connection_file}"], "display_name": name, "language": "python"})
    kernel = _Kernel(name, dict(ws.env), str(ws.notebooks))
    try:
        cell_s, _ = _cell(kernel.client, "%pip install --disable-pip-version-check " + package)
    finally:
        kernel.close()
    return {"pip_s": cell_s}


def format_pip_install(figures: dict[str, Any]) -> list[str]:
    def verdict(value: float, target: float) -> str:
        return "ok" if value <= target else "MISSED (target %s)" % target

    return [
        "",
        "%%pip install %s (%d new distributions, warm uv cache, entries new to the daemon), medians of %d"
        % (figures["package"], figures["new_distributions"], figures["runs"]),
        "  (load average at the end: %.1f; per-round figures in the JSON)" % figures["load_average"],
        "  uvkerneld kernel, execute -> execute_reply:   %6.2f s" % figures["uvkerneld_s"],
        "  uv pip install into a fresh venv, same cache:  %6.2f s   uvkerneld/uv  %.2fx  %s"
        % (figures["uv_s"], figures["vs_uv"], verdict(figures["vs_uv"], TARGETS["vs_uv"])),
        "  pip install in a plain venv kernel:           %6.2f s   uvkerneld/pip %.2fx  %s"
        % (figures["pip_s"], figures["vs_pip"], verdict(figures["vs_pip"], TARGETS["vs_pip"])),
        "  until every new package's bytecode is linked: %6.2f s (from execute; background, idle priority)"
        % figures["linked_s"],
        "  first import of it, in the kernel right after the cell: %.2f s; "
        "in a fresh interpreter after the compile: %.2f s"
        % (figures["import_right_after_s"], figures["import_after_compile_s"]),
    ]
