"""A class opens its notebooks at once: N kernel launches for N new notebooks at the same moment
(pool at its default size), time until the last one answers ``kernel_info``, next to N plain
ipykernel launches at once in the same run; and what one new venv costs, cloned from the
template against built by ``uv venv`` + ``uv pip install``.

Each round uses a fresh daemon (its own dirs, so the pool is at its default and has not grown
from an earlier burst) whose pool is full; the plain and the uvkerneld bursts of a round run
one right after the other, in alternating order, so drifting load hits both alike.
"""

from __future__ import annotations

import queue
import shutil
import statistics
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from jupyter_client.manager import KernelManager

from uvkerneld.config import default_kernel_packages

if TYPE_CHECKING:
    from bench.run import Workspace

TARGET_RATIO = 1.5


def launch_at_once(
    ws: Workspace, kernel_name: str, envs: list[dict[str, str]], timeout: float = 600
) -> tuple[float, int]:
    """Launch one kernel per env at the same moment: (seconds until the last kernel_info_reply,
    kernels restarted). Every kernel stays up until the last one answered (as a class's would)."""
    count = len(envs)
    go = threading.Barrier(count + 1)
    answered: list[float] = []
    failures: list[BaseException] = []
    managers: list[KernelManager] = []
    restarts: list[str] = []
    lock = threading.Lock()
    started = [0.0]
    output = open(ws.root / "kernels-output.log", "ab")  # closed below

    def one(env: dict[str, str]) -> None:
        try:
            go.wait(timeout)
            deadline = started[0] + timeout
            while True:
                # A kernel that dies before it answers (another process took one of the ports
                # jupyter_client picked for it) is started again, as Jupyter's restarter would.
                manager = KernelManager(kernel_name=kernel_name)
                with lock:
                    managers.append(manager)
                manager.start_kernel(env=env, cwd=str(ws.notebooks), stdout=output, stderr=output)
                if _answers(manager, deadline):
                    with lock:
                        answered.append(time.perf_counter() - started[0])
                    return
                with lock:
                    restarts.append(kernel_name)
        except BaseException as exc:  # reported by the caller
            with lock:
                failures.append(exc)

    threads = [threading.Thread(target=one, args=(env,), daemon=True) for env in envs]
    try:
        for thread in threads:
            thread.start()
        started[0] = time.perf_counter()
        go.wait(timeout)
        for thread in threads:
            thread.join(timeout)
    finally:
        for manager in managers:
            if manager.has_kernel:
                manager.shutdown_kernel(now=True)
        output.close()
    if failures or len(answered) != count:
        raise SystemExit("bench: %d of %d %s kernels did not answer: %r"
                         % (count - len(answered), count, kernel_name, failures[:3]))
    return max(answered), len(restarts)


def _answers(manager: KernelManager, deadline: float) -> bool:
    """Send kernel_info and wait for its reply: True, or False if the kernel died first."""
    kernel = manager.blocking_client()
    kernel.start_channels()
    try:
        msg_id = kernel.kernel_info()
        while time.perf_counter() < deadline:
            try:
                reply = kernel.get_shell_msg(timeout=1.0)
            except queue.Empty:
                if not manager.is_alive():
                    return False
                continue
            if reply["parent_header"].get("msg_id") == msg_id:
                return True
        raise TimeoutError("no kernel_info_reply from a %s kernel in time" % manager.kernel_name)
    finally:
        kernel.stop_channels()


def _uv_build_seconds(ws: Workspace, index: int) -> float:
    """``uv venv`` + ``uv pip install`` of the kernel packages from the warm cache (what a pool
    build without a template runs), in seconds."""
    # In the daemon's venvs dir, where its clones were made: the same filesystem and allocator.
    venv = ws.venvs_dir / ("uv-build-%d" % index)
    started = time.perf_counter()
    ws.uv_run("venv", "-q", "--no-project", "--python", sys.executable, str(venv))
    ws.uv_run("pip", "install", "-q", "--python", str(venv / "bin" / "python"), *default_kernel_packages())
    elapsed = time.perf_counter() - started
    shutil.rmtree(venv)
    return elapsed


def bench_burst(ws: Workspace, count: int, rounds: int, builds: int) -> dict[str, Any]:
    plain = ws.root / "plain-venv"
    if not plain.exists():  # made by the starts section unless it was skipped
        ws.uv_run("venv", "-q", "--python", sys.executable, str(plain))
        ws.uv_run("pip", "install", "-q", "--python", str(plain / "bin" / "python"), "--compile-bytecode",
                  *default_kernel_packages())
        argv = [str(plain / "bin" / "python"), "-m", "ipykernel_launcher", "-f", "{connection_file}"]
        ws.install_spec("plain", {"argv": argv, "display_name": "plain", "language": "python"})
    if not (ws.jupyter / "kernels" / "uv").exists():
        from uvkerneld.kernelspec import kernel_json

        ws.install_spec("uv", kernel_json())
    plain_s: list[float] = []
    uvk_s: list[float] = []
    sources: dict[str, int] = {}
    restarted = {"plain": 0, "uv": 0}
    for index in range(rounds):
        ws.use("burst-%d" % index)
        ws.start_daemon(pool_size=2)
        ws.wait_quiet()
        notebooks = [dict(ws.env, JPY_SESSION_NAME=str(ws.notebooks / ("class-%d-%d.ipynb" % (index, n))))
                     for n in range(count)]
        order = ["plain", "uv"] if index % 2 == 0 else ["uv", "plain"]
        for kernel in order:
            if kernel == "plain":
                seconds, again = launch_at_once(ws, "plain", [dict(ws.env) for _ in range(count)])
                plain_s.append(seconds)
            else:
                seconds, again = launch_at_once(ws, "uv", notebooks)
                uvk_s.append(seconds)
            restarted[kernel] += again
            # Let the burst's aftermath (kernel exits, the pool's refill) pass before the next one.
            time.sleep(ws.settle_s)
        status = ws.status() or {}
        for source, number in status.get("kernels_started", {}).items():
            sources[source] = sources.get(source, 0) + number
        ws.stop_daemon()
    # One new venv: the acquire round trip of a daemon with no pool (a clone from its template)
    # against the uv commands a template-less build runs.
    ws.use("burst-builds")
    ws.start_daemon(pool_size=0)
    ws.request("acquire", {"key": {"kind": "env", "value": "takes-the-template"}})
    clone_s = []
    for index in range(builds):
        started = time.perf_counter()
        ws.request("acquire", {"key": {"kind": "env", "value": "clone-%d" % index}})
        clone_s.append(time.perf_counter() - started)
    ws.stop_daemon()
    uv_s = [_uv_build_seconds(ws, index) for index in range(builds)]
    subprocess.run(["sync"], check=False)
    ratios = [u / p for u, p in zip(uvk_s, plain_s, strict=True)]
    return {
        "kernels": count, "rounds": rounds, "plain_s": plain_s, "uvkerneld_s": uvk_s,
        "plain_median_s": statistics.median(plain_s), "uvkerneld_median_s": statistics.median(uvk_s),
        "ratio": statistics.median(ratios), "sources": sources, "restarted": restarted,
        "clone_s": clone_s, "uv_build_s": uv_s,
        "clone_median_s": statistics.median(clone_s), "uv_build_median_s": statistics.median(uv_s),
    }


def format_burst(burst: dict[str, Any]) -> list[str]:
    ratio = burst["ratio"]
    verdict = "ok" if ratio <= TARGET_RATIO else "MISSED (target %s)" % TARGET_RATIO
    sources = ", ".join("%s %d" % item for item in sorted(burst["sources"].items()) if item[1])
    return [
        "",
        "burst: %d kernels for %d new notebooks launched at once (pool of 2), "
        "until the last kernel_info_reply" % (burst["kernels"], burst["kernels"]),
        "  plain ipykernel %.2f s, uvkerneld %.2f s (medians of %d rounds), ratio %.2f  %s"
        % (burst["plain_median_s"], burst["uvkerneld_median_s"], burst["rounds"], ratio, verdict),
        "  where the envs came from: %s; kernels that died before answering and were started again "
        "(a port taken by another process): plain %d, uvkerneld %d"
        % (sources, burst["restarted"]["plain"], burst["restarted"]["uv"]),
        "  one new venv: cloned from the template %.2f s (acquire round trip), "
        "uv venv + uv pip install %.2f s" % (burst["clone_median_s"], burst["uv_build_median_s"]),
    ]
