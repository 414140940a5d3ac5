"""Kernel start-up benchmark: launch to the first ``kernel_info_reply``, against plain ipykernel.

Every case is measured in the same run, interleaved (one of each per round) so that load from
other work on a shared machine hits all cases alike; the table shows medians and ratios against
plain ipykernel from a venv with compiled bytecode (the 1.00 line).

We send ``kernel_info`` once right after launching and time until its reply: ZMQ queues the
request until the kernel binds, so this is exact, unlike ``wait_for_ready`` which polls.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager

from uvkerneld import client
from uvkerneld.config import default_kernel_packages
from uvkerneld.uv import find_uv


def time_to_kernel_info(kernel_name: str, env: dict[str, str], cwd: str, timeout: float = 120) -> float:
    manager = KernelManager(kernel_name=kernel_name)
    started = time.perf_counter()
    manager.start_kernel(env=env, cwd=cwd)
    kernel = manager.blocking_client()
    kernel.start_channels()
    try:
        msg_id = kernel.kernel_info()
        deadline = started + timeout
        while True:
            reply = kernel.get_shell_msg(timeout=max(0.01, deadline - time.perf_counter()))
            if reply["parent_header"].get("msg_id") == msg_id:
                return time.perf_counter() - started
    finally:
        kernel.stop_channels()
        manager.shutdown_kernel(now=True)


class Bench:
    def __init__(self, root: Path, cache_dir: Path) -> None:
        self.root = root
        self.cache_dir = cache_dir
        self.socket = root / "d.sock"
        self.jupyter_path = root / "share" / "jupyter"
        self.notebooks = root / "nb"
        self.notebooks.mkdir(parents=True)
        self.daemon: subprocess.Popen[bytes] | None = None
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("UVKERNEL", "JPY_"))}
        self.env.update(
            UVKERNELD_SOCKET=str(self.socket),
            UVKERNELD_STATE_DIR=str(root / "state"),
            UVKERNELD_VENVS_DIR=str(root / "venvs"),
            UVKERNELD_CACHE_DIR=str(cache_dir),
            UVKERNELD_AUTOSTART="0",
            JUPYTER_PATH=str(self.jupyter_path),
        )
        os.environ["JUPYTER_PATH"] = str(self.jupyter_path)

    # --- set-up (not timed) ---------------------------------------------------------------------

    def install_kernelspecs(self) -> None:
        subprocess.run(
            [sys.executable, "-m", "uvkerneld.ctl", "install-kernelspec", "--prefix", str(self.root)],
            env=self.env, check=True, capture_output=True,
        )
        # The baseline: plain ipykernel in a venv with compiled bytecode, built by uv from the
        # same cache, so the only difference measured is the stub + daemon round trip.
        plain = self.root / "plain-venv"
        uv = find_uv(None)
        uv_env = dict(self.env, UV_CACHE_DIR=str(self.cache_dir))
        subprocess.run([uv, "venv", "-q", "--python", sys.executable, str(plain)], env=uv_env, check=True)
        subprocess.run(
            [uv, "pip", "install", "-q", "--python", str(plain / "bin" / "python"), "--compile-bytecode",
             *default_kernel_packages()],
            env=uv_env, check=True,
        )
        staging = self.root / "plain-spec"
        staging.mkdir()
        (staging / "kernel.json").write_text(json.dumps({
            "argv": [str(plain / "bin" / "python"), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "plain ipykernel", "language": "python",
        }))
        KernelSpecManager().install_kernel_spec(str(staging), "plain", prefix=str(self.root))

    def start_daemon(self, pool_size: int) -> None:
        self.stop_daemon()
        log = open(self.root / ("daemon-pool%d.log" % pool_size), "ab")
        self.daemon = subprocess.Popen(
            [sys.executable, "-m", "uvkerneld", "--pool-size", str(pool_size)],
            env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        self._wait(lambda: self._status() is not None, 60, "the daemon to answer")

    def stop_daemon(self) -> None:
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.send_signal(signal.SIGTERM)
            self.daemon.wait(60)
        self.daemon = None

    def _status(self) -> dict[str, Any] | None:
        try:
            return client.request(str(self.socket), "status", timeout=10)
        except client.DaemonNotRunning:
            return None

    def wait_pool_full(self) -> None:
        def full() -> bool:
            status = self._status()
            return bool(status) and status["pool"]["ready"] >= status["pool"]["target"] and not status["pool"]["filling"]

        self._wait(full, 300, "the pool to refill")

    @staticmethod
    def _wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise SystemExit("bench: timed out waiting for %s" % what)
            time.sleep(0.1)

    # --- timed cases ------------------------------------------------------------------------------

    def start(self, kernel_name: str, **extra_env: str) -> float:
        return time_to_kernel_info(kernel_name, dict(self.env, **extra_env), str(self.notebooks))

    def notebook(self, name: str) -> str:
        return str(self.notebooks / name)


def acquire_round_trips(socket_path: str, count: int) -> list[float]:
    """Wall time of ``acquire`` for a known notebook over a fresh connection, as the stub does it."""
    args = {"key": {"kind": "env", "value": "bench-known"}}
    client.request(socket_path, "acquire", args, timeout=300)
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        client.request(socket_path, "acquire", args, timeout=30)
        samples.append(time.perf_counter() - started)
    return samples


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def run(runs: int, pool_empty_runs: int, cache_dir: Path | None) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="uvk-bench-", dir="/tmp"))
    cache = cache_dir or root / "cache"
    bench = Bench(root, cache)
    try:
        bench.install_kernelspecs()
        bench.start_daemon(pool_size=2)
        bench.wait_pool_full()
        known = bench.notebook("known.ipynb")
        bench.start("uv", JPY_SESSION_NAME=known)  # assign it once; also warms the OS caches
        bench.start("plain")
        samples: dict[str, list[float]] = {"plain": [], "known": [], "pool": []}
        for index in range(runs):
            bench.wait_pool_full()  # not timed: a pool hit is what this case measures
            samples["plain"].append(bench.start("plain"))
            samples["known"].append(bench.start("uv", JPY_SESSION_NAME=known))
            samples["pool"].append(bench.start("uv", JPY_SESSION_NAME=bench.notebook("new-%d.ipynb" % index)))
        round_trips = acquire_round_trips(str(bench.socket), 200)
        bench.start_daemon(pool_size=0)
        samples["pool_empty"] = []
        samples["plain_2"] = []
        for index in range(pool_empty_runs):
            samples["plain_2"].append(bench.start("plain"))
            samples["pool_empty"].append(bench.start("uv", UVKERNEL_ENV="empty-%d" % index))
    finally:
        bench.stop_daemon()
        shutil.rmtree(root, ignore_errors=True)
    plain = statistics.median(samples["plain"])
    plain_2 = statistics.median(samples["plain_2"]) if samples["plain_2"] else plain
    result: dict[str, Any] = {
        "runs": runs,
        "python": sys.version.split()[0],
        "PYTHONDONTWRITEBYTECODE": os.environ.get("PYTHONDONTWRITEBYTECODE", ""),
        "cases": {
            "plain": {"median_s": plain, "ratio": 1.0, "samples": samples["plain"]},
            "known": {"median_s": statistics.median(samples["known"]),
                      "ratio": statistics.median(samples["known"]) / plain, "samples": samples["known"]},
            "pool": {"median_s": statistics.median(samples["pool"]),
                     "ratio": statistics.median(samples["pool"]) / plain, "samples": samples["pool"]},
        },
        "acquire_round_trip_ms": {
            "p50": percentile(round_trips, 0.5) * 1000, "p99": percentile(round_trips, 0.99) * 1000,
        },
    }
    if samples["pool_empty"]:
        empty = statistics.median(samples["pool_empty"])
        result["cases"]["pool_empty"] = {
            "median_s": empty, "ratio": empty / plain_2, "extra_s": empty - plain_2,
            "samples": samples["pool_empty"],
        }
    return result


LABELS = {
    "plain": "plain ipykernel (venv with bytecode)",
    "known": "uvkerneld, known notebook",
    "pool": "uvkerneld, new notebook (pool hit)",
    "pool_empty": "uvkerneld, new notebook (pool empty)",
}


def format_table(result: dict[str, Any]) -> str:
    lines = [
        "kernel start: launch -> first kernel_info_reply, median of %d runs (Python %s, "
        "PYTHONDONTWRITEBYTECODE=%s)" % (result["runs"], result["python"], result["PYTHONDONTWRITEBYTECODE"] or "unset"),
        "%-40s %10s %10s" % ("case", "median", "vs plain"),
    ]
    for name, case in result["cases"].items():
        extra = " (+%.2f s)" % case["extra_s"] if "extra_s" in case else ""
        lines.append("%-40s %9.3fs %9.2fx%s" % (LABELS[name], case["median_s"], case["ratio"], extra))
    trip = result["acquire_round_trip_ms"]
    lines.append("acquire round trip (known env, new connection): p50 %.2f ms, p99 %.2f ms" % (trip["p50"], trip["p99"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="rounds per case (default 7)")
    parser.add_argument("--pool-empty-runs", type=int, default=None, help="rounds for the pool-empty case (default: --runs)")
    parser.add_argument("--cache-dir", type=Path, help="reuse this uv cache (default: a fresh one, downloaded once)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON ('-' for stdout)")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    result = run(args.runs, args.runs if args.pool_empty_runs is None else args.pool_empty_runs, args.cache_dir)
    print(format_table(result))
    if args.json:
        text = json.dumps(result, indent=1)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    return 0
