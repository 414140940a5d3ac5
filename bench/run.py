"""uvkerneld benchmarks: kernel start-up against plain ipykernel, stub cost, the daemon with many
envs, parallel installs, and disk use against pip-made venvs.

Every kernel-start case is measured in the same run, one of each per round in a shuffled order,
and each start is paired with a start of plain ipykernel (a venv with compiled bytecode, the 1.00
line) right before or after it, so load from other work on a shared machine hits both alike; the
table shows medians and the median of those paired ratios. A start is timed from
launch to the first ``kernel_info_reply``: we send ``kernel_info`` once right after launching
(ZMQ queues it until the kernel binds), rather than timing ``wait_for_ready``, which polls.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager

from bench.abuse import bench_abuse, format_abuse
from bench.burst import bench_burst, format_burst
from bench.fixtures import TimedOut, register_envs, wait_until
from uvkerneld import client
from uvkerneld.config import default_kernel_packages
from uvkerneld.diskusage import scan_tree
from uvkerneld.kernelspec import kernel_json
from uvkerneld.uv import find_uv

QUIET_SETTLE_S = 2.5
TARGETS = {
    "known": 1.10, "pool": 1.15, "known_nowrite": 1.10, "pool_nowrite": 1.15,
    "pool_empty_extra_s": 1.5, "stub_ms": 40.0, "acquire_p50_ms": 5.0, "rss_many_mb": 80.0,
    "status_many_ms": 1000.0, "per_env_unshared_mb": 10.0, "disk_ratio": 0.25,
}


def median(samples: list[float]) -> float:
    return statistics.median(samples) if samples else float("nan")


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def cpu_seconds(pid: int) -> float:
    """CPU time the process has used so far, all its threads (from /proc/PID/task/*/schedstat,
    in ns). Exec keeps the pid and its accounting: for uvkerneld this includes the stub."""
    total = 0
    for tid in os.listdir("/proc/%d/task" % pid):
        try:
            with open("/proc/%d/task/%s/schedstat" % (pid, tid)) as handle:
                total += int(handle.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total / 1e9


def time_to_kernel_info(kernel_name: str, env: dict[str, str], cwd: str, timeout: float = 300,
                        output: Any = None) -> tuple[float, float]:
    """(wall seconds, kernel CPU seconds) from launch to the first kernel_info_reply. The CPU
    figure does not count time spent waiting for a CPU, which on a shared machine is most of
    the noise in the wall figure."""
    manager = KernelManager(kernel_name=kernel_name)
    started = time.perf_counter()
    manager.start_kernel(env=env, cwd=cwd, stdout=output, stderr=output)
    kernel = manager.blocking_client()
    kernel.start_channels()
    try:
        msg_id = kernel.kernel_info()
        while True:
            reply = kernel.get_shell_msg(timeout=max(0.01, started + timeout - time.perf_counter()))
            if reply["parent_header"].get("msg_id") == msg_id:
                wall = time.perf_counter() - started
                return wall, cpu_seconds(manager.provisioner.pid)  # type: ignore[union-attr]
    finally:
        kernel.stop_channels()
        manager.shutdown_kernel(now=True)


def rss_mb(pid: int) -> float:
    for line in Path("/proc/%d/status" % pid).read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Workspace:
    """A private uvkerneld installation under /tmp: dirs, kernelspecs, daemons."""

    def __init__(self, root: Path, cache_dir: Path, settle_s: float = QUIET_SETTLE_S) -> None:
        self.root = root
        self.cache_dir = cache_dir
        self.settle_s = settle_s
        self.uv = find_uv(None)
        self.jupyter = root / "share" / "jupyter"
        self.notebooks = root / "nb"
        self.notebooks.mkdir(parents=True)
        self.daemon: subprocess.Popen[bytes] | None = None
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("UVKERNEL", "JPY_"))}
        self.env["JUPYTER_PATH"] = str(self.jupyter)
        os.environ["JUPYTER_PATH"] = str(self.jupyter)
        self.use("main")

    def use(self, name: str, cache_dir: Path | None = None) -> None:
        """Point clients and the next daemon at the installation called ``name``."""
        base = self.root / name
        self.socket = base / "d.sock"
        self.state_dir = base / "state"
        self.venvs_dir = base / "venvs"
        self.env.update(
            UVKERNELD_SOCKET=str(self.socket), UVKERNELD_STATE_DIR=str(self.state_dir),
            UVKERNELD_VENVS_DIR=str(self.venvs_dir), UVKERNELD_CACHE_DIR=str(cache_dir or self.cache_dir),
            UVKERNELD_AUTOSTART="0",
        )

    def uv_run(self, *args: str) -> None:
        subprocess.run([self.uv, *args], env=dict(self.env, UV_CACHE_DIR=str(self.cache_dir)), check=True,
                       stdout=subprocess.DEVNULL)

    def install_spec(self, name: str, spec: dict[str, Any]) -> None:
        staging = self.root / ("spec-" + name)
        staging.mkdir()
        (staging / "kernel.json").write_text(json.dumps(spec))
        KernelSpecManager().install_kernel_spec(str(staging), name, prefix=str(self.root))

    def start_daemon(self, pool_size: int, *extra: str) -> subprocess.Popen[bytes]:
        self.stop_daemon()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.state_dir.parent / "daemon.log", "ab")
        self.daemon = subprocess.Popen(
            [sys.executable, "-m", "uvkerneld", "--pool-size", str(pool_size), *extra],
            env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        wait_until(lambda: self.status() is not None, 60, "the daemon to answer")
        return self.daemon

    def stop_daemon(self) -> None:
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.send_signal(signal.SIGTERM)
            self.daemon.wait(120)
        self.daemon = None

    def status(self) -> dict[str, Any] | None:
        try:
            return client.request(str(self.socket), "status", timeout=30)
        except client.DaemonNotRunning:
            return None

    def request(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        return client.request(str(self.socket), op, args, timeout=900)

    def wait_pool_full(self) -> None:
        def full() -> bool:
            pool = (self.status() or {}).get("pool", {})
            return bool(pool) and pool["ready"] >= pool["target"] and not pool["filling"]

        wait_until(full, 600, "the pool to fill")

    def wait_quiet(self) -> None:
        """Pool full, no disk scan running: each start is timed alone, not against the
        background work the previous start triggered (refill builds, disk scans)."""
        def quiet() -> bool:
            status = self.status() or {}
            pool, disk = status.get("pool", {}), status.get("disk", {})
            return (bool(pool) and pool["ready"] >= pool["target"] and not pool["filling"]
                    and not disk.get("scanning"))

        wait_until(quiet, 600, "the daemon to be idle")
        # A refill that just ended leaves work behind it (the kernel's writeback of the new venv,
        # the daemon's disk scan that starts 2 s after a change): let that pass too.
        time.sleep(self.settle_s)
        if not quiet():
            wait_until(quiet, 600, "the daemon to be idle")

    def start(self, kernel_name: str, **extra_env: str | None) -> tuple[float, float]:
        env = dict(self.env)
        for name, value in extra_env.items():
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value
        # Kernels' output (ipykernel's TCP warning at every start, the seed's messages) goes to a
        # file, not the table.
        with open(self.root / "kernels-output.log", "ab") as output:
            return time_to_kernel_info(kernel_name, env, str(self.notebooks), output=output)


# --- sections -----------------------------------------------------------------------------------


def install_uv_kernel(ws: Workspace) -> None:
    if not (ws.jupyter / "kernels" / "uv").exists():
        ws.install_spec("uv", kernel_json())


def install_plain_kernel(ws: Workspace) -> None:
    """The 1.00 line: plain ipykernel in a venv with compiled bytecode (kernelspec "plain")."""
    if (ws.jupyter / "kernels" / "plain").exists():
        return
    plain = ws.root / "plain-venv"
    ws.uv_run("venv", "-q", "--python", sys.executable, str(plain))
    ws.uv_run("pip", "install", "-q", "--python", str(plain / "bin" / "python"), "--compile-bytecode",
              *default_kernel_packages())
    ws.install_spec("plain", {"argv": [str(plain / "bin" / "python"), "-m", "ipykernel_launcher", "-f",
                                       "{connection_file}"], "display_name": "plain", "language": "python"})


def bench_kernel_starts(ws: Workspace, runs: int, with_seed: bool) -> dict[str, Any]:
    install_uv_kernel(ws)
    install_plain_kernel(ws)
    # The honest cold case: the same venv with no bytecode at all (read-only venv, or
    # PYTHONDONTWRITEBYTECODE): every start compiles ipykernel and its dependencies.
    cold = ws.root / "cold-venv"
    ws.uv_run("venv", "-q", "--python", sys.executable, str(cold))
    ws.uv_run("pip", "install", "-q", "--python", str(cold / "bin" / "python"), *default_kernel_packages())
    for pycache in list(cold.rglob("__pycache__")):
        shutil.rmtree(pycache)
    ws.install_spec("cold", {"argv": [str(cold / "bin" / "python"), "-m", "ipykernel_launcher", "-f",
                                      "{connection_file}"], "display_name": "cold", "language": "python"})
    if with_seed:
        seed = ws.root / "seed-venv"
        ws.uv_run("venv", "-q", "--python", sys.executable, str(seed))
        ws.uv_run("pip", "install", "-q", "--python", str(seed / "bin" / "python"), "--compile-bytecode",
                  "jupyter-uv-venv==0.1.4", *default_kernel_packages())
        # Its kernel.json names a module that does not exist; this is how it really runs.
        ws.install_spec("seed", {
            "argv": [str(seed / "bin" / "python"), "-m", "jupyter-uv-venv.kernel", "-f", "{connection_file}"],
            "display_name": "seed", "language": "python",
            "env": {"UV_VENV_DIR": str(ws.root / "seed-venvs"), "UV_CACHE_DIR": str(ws.cache_dir),
                    "PATH": os.path.dirname(ws.uv) + os.pathsep + os.environ.get("PATH", "")},
        })
    ws.start_daemon(pool_size=2)
    ws.wait_pool_full()
    known = str(ws.notebooks / "known.ipynb")
    seed_known = str(ws.notebooks / "seed-known.ipynb")
    # Warm-up, not timed: assigns the known notebooks and brings every file into the page cache.
    ws.start("uv", JPY_SESSION_NAME=known)
    ws.start("plain")
    ws.start("cold", PYTHONDONTWRITEBYTECODE="1")
    if with_seed:
        ws.start("seed", JPY_SESSION_NAME=seed_known)
    samples: dict[str, list[float]] = {}
    baselines: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    cpu_baselines: dict[str, list[float]] = {}
    coin = random.Random(0)

    def timed(kernel: str, env: dict[str, str | None]) -> tuple[float, float]:
        ws.wait_quiet()
        return ws.start(kernel, **env)

    def measure(case: str, kernel: str, env: dict[str, str | None], paired: bool = True,
                base_env: dict[str, str | None] | None = None) -> None:
        """One start of ``case`` and, right before or after it (a coin decides), one of plain
        ipykernel under the same PYTHONDONTWRITEBYTECODE: its baseline, measured as close in
        time as possible, since load on this shared machine drifts from minute to minute."""
        if not paired:
            value = timed(kernel, env)
            samples.setdefault(case, []).append(value[0])
            cpu.setdefault(case, []).append(value[1])
            return
        if base_env is None:
            base_env = {key: env[key] for key in ("PYTHONDONTWRITEBYTECODE",) if key in env}
        if coin.random() < 0.5:
            base, value = timed("plain", base_env), timed(kernel, env)
        else:
            value, base = timed(kernel, env), timed("plain", base_env)
        samples.setdefault(case, []).append(value[0])
        baselines.setdefault(case, []).append(base[0])
        cpu.setdefault(case, []).append(value[1])
        cpu_baselines.setdefault(case, []).append(base[1])

    for index in range(runs):
        # The order is shuffled each round (fixed seed, so runs are comparable): in a fixed order
        # the case right after a pool refill was always the same one, and the refill's aftermath
        # showed up as that case being slower.
        cases: list[tuple[str, str, dict[str, str | None]]] = [
            ("plain_nowrite", "plain", {"PYTHONDONTWRITEBYTECODE": "1"}),
            ("plain_cold", "cold", {"PYTHONDONTWRITEBYTECODE": "1"}),
            ("known", "uv", {"JPY_SESSION_NAME": known, "PYTHONDONTWRITEBYTECODE": None}),
            ("known_nowrite", "uv", {"JPY_SESSION_NAME": known, "PYTHONDONTWRITEBYTECODE": "1"}),
            ("pool", "uv", {"JPY_SESSION_NAME": str(ws.notebooks / ("new-%d.ipynb" % index)),
                            "PYTHONDONTWRITEBYTECODE": None}),
            ("pool_nowrite", "uv", {"JPY_SESSION_NAME": str(ws.notebooks / ("new-nw-%d.ipynb" % index)),
                                    "PYTHONDONTWRITEBYTECODE": "1"}),
        ]
        if with_seed:
            seed_new = str(ws.notebooks / ("seed-new-%d.ipynb" % index))
            cases.append(("seed_new", "seed", {"JPY_SESSION_NAME": seed_new}))
            cases.append(("seed_known", "seed", {"JPY_SESSION_NAME": seed_known}))
        coin.shuffle(cases)
        measure("plain", "plain", {"PYTHONDONTWRITEBYTECODE": None}, paired=False)
        for case, kernel, env in cases:
            # plain_nowrite's baseline is plain with the variable unset: its row shows what the
            # variable alone does.
            unset: dict[str, str | None] = {"PYTHONDONTWRITEBYTECODE": None}
            measure(case, kernel, env, base_env=unset if case == "plain_nowrite" else None)
    # Pool empty: a daemon with no pool (and no venvs left from the pool above) builds the venv
    # while the kernel waits, from the warm uv cache.
    ws.use("empty")
    ws.start_daemon(pool_size=0)
    for index in range(runs):
        measure("pool_empty", "uv", {"UVKERNEL_ENV": "empty-%d" % index, "PYTHONDONTWRITEBYTECODE": "1"})
    ws.stop_daemon()
    cases_out: dict[str, Any] = {}
    for case, values in samples.items():
        base = baselines.get(case, values)
        # Ratio = median over rounds of (this start / its adjacent plain start): pairing cancels
        # the drift (independent medians moved by +-10% between runs here).
        paired_ratios = [value / plain_value for value, plain_value in zip(values, base, strict=False)]
        cpu_values = cpu[case]
        cpu_base = cpu_baselines.get(case, cpu_values)
        cases_out[case] = {"median_s": median(values), "ratio": median(paired_ratios), "samples": values,
                           "baseline_samples": base, "ratio_of_medians": median(values) / median(base),
                           "cpu_median_s": median(cpu_values),
                           "cpu_ratio": median([c / b for c, b in zip(cpu_values, cpu_base, strict=False)]),
                           "cpu_samples": cpu_values, "cpu_baseline_samples": cpu_base}
    cases_out["pool_empty"]["extra_s"] = cases_out["pool_empty"]["median_s"] - median(baselines["pool_empty"])
    return cases_out


def bench_stub(ws: Workspace, runs: int) -> dict[str, Any]:
    """The stub's own cost, launch to exec: the env's interpreter is replaced by /bin/true, so
    what remains is process start + stub + acquire round trip + exec."""
    ws.use("stub")
    ws.start_daemon(pool_size=0)
    env_path = Path(ws.request("acquire", {"key": {"kind": "env", "value": "stub-cost"}})["path"])
    interpreter = env_path / "bin" / "python"
    interpreter.unlink()
    interpreter.symlink_to("/bin/true")
    argv = kernel_json()["argv"]
    argv = [arg.replace("{connection_file}", str(ws.root / "unused.json")) for arg in argv]  # type: ignore[union-attr]
    env = dict(ws.env, UVKERNEL_ENV="stub-cost")
    stub, bare = [], []
    for _ in range(max(runs * 3, 3)):
        started = time.perf_counter()
        subprocess.run(argv, env=env, check=True)
        stub.append(time.perf_counter() - started)
        started = time.perf_counter()
        subprocess.run(["/bin/true"], env=env, check=True)
        bare.append(time.perf_counter() - started)
    ws.stop_daemon()
    return {"total_ms": median(stub) * 1000, "bin_true_ms": median(bare) * 1000,
            "stub_ms": (median(stub) - median(bare)) * 1000}


def bench_many_envs(ws: Workspace, count: int, rounds: int) -> dict[str, Any]:
    ws.use("many")
    idle = ws.start_daemon(pool_size=0)
    time.sleep(1.0)  # let start-up allocations settle before reading RSS (a reading, not a wait for work)
    rss_idle = rss_mb(idle.pid)
    ws.stop_daemon()
    names = register_envs(ws.state_dir, ws.venvs_dir, count)
    daemon = ws.start_daemon(pool_size=0)
    trips = []
    for index in range(rounds):
        args = {"key": {"kind": "env", "value": names[(index * 7919) % len(names)]}}
        started = time.perf_counter()
        client.request(str(ws.socket), "acquire", args, timeout=30)
        trips.append(time.perf_counter() - started)
    status_times, list_times = [], []
    for _ in range(20):
        started = time.perf_counter()
        status = ws.status()
        status_times.append(time.perf_counter() - started)
        started = time.perf_counter()
        ws.request("list", {"all": False})
        list_times.append(time.perf_counter() - started)
    assert status is not None and status["envs"]["total"] == count
    result = {
        "envs": count,
        "acquire_p50_ms": percentile(trips, 0.5) * 1000, "acquire_p99_ms": percentile(trips, 0.99) * 1000,
        "status_ms": median(status_times) * 1000, "list_ms": median(list_times) * 1000,
        "rss_idle_mb": rss_idle, "rss_many_mb": rss_mb(daemon.pid),
    }
    ws.stop_daemon()
    return result


def bench_parallel_installs(ws: Workspace) -> dict[str, Any]:
    ws.use("parallel")
    ws.start_daemon(pool_size=0)
    packages = ["six==1.16.0", "idna==3.10", "attrs==24.2.0", "pyparsing==3.2.0"]
    envs = [ws.request("acquire", {"key": {"kind": "env", "value": "p-%d" % i}})["path"] for i in range(9)]
    ws.request("pip", {"env": envs[8], "argv": ["install", *packages]})  # warm the cache: not timed

    def install(env: str, package: str) -> None:
        assert ws.request("pip", {"env": env, "argv": ["install", package]})["exit_status"] == 0

    started = time.perf_counter()
    for env, package in zip(envs[:4], packages, strict=False):
        install(env, package)
    serial = time.perf_counter() - started
    threads = [threading.Thread(target=install, args=(env, package))
               for env, package in zip(envs[4:8], packages, strict=False)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    parallel = time.perf_counter() - started
    ws.stop_daemon()
    return {"serial_s": serial, "parallel_s": parallel, "ratio": parallel / serial}


def bench_disk(ws: Workspace, notebooks: int, quick: bool = False) -> dict[str, Any]:
    """N notebooks that each install numpy: uvkerneld (shared cache, hardlinks, shared bytecode)
    against the same N venvs made by `python -m venv` + pip.

    ``quick`` (the smoke run) makes the same figures faster: no pool (pooled venvs are not
    counted anyway), and pip venvs after the first are copies of it, the same bytes on inodes
    of their own, as a second pip install would make (about 40 s each under load)."""
    cache = ws.root / "disk-cache"
    ws.use("disk", cache_dir=cache)
    ws.start_daemon(pool_size=0 if quick else 2)
    envs = []
    for index in range(notebooks):
        notebook = str(ws.notebooks / ("numpy-%d.ipynb" % index))
        env = ws.request("acquire", {"key": {"kind": "notebook", "value": notebook}})["path"]
        result = ws.request("pip", {"env": env, "argv": ["install", "numpy"]})
        assert result["exit_status"] == 0
        envs.append(Path(env))
    ws.stop_daemon()
    seen: set[tuple[int, int]] = set()
    total = scan_tree(cache, seen).new + sum(scan_tree(env, seen).new for env in envs)
    unshared = [scan_tree(env).unshared for env in envs]
    pip_envs = []
    for index in range(notebooks):
        venv = ws.root / ("pip-venv-%d" % index)
        if quick and pip_envs:
            shutil.copytree(pip_envs[0], venv, symlinks=True)
            pip_envs.append(venv)
            continue
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        installed = subprocess.run(
            [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
             *default_kernel_packages(), "numpy"], capture_output=True, text=True,
        )
        if installed.returncode != 0:
            raise SystemExit("bench: pip install failed:\n%s" % installed.stderr)
        pip_envs.append(venv)
    pip_seen: set[tuple[int, int]] = set()
    pip_total = sum(scan_tree(venv, pip_seen).new for venv in pip_envs)
    return {
        "notebooks": notebooks, "uvkerneld_total_bytes": total, "pip_total_bytes": pip_total,
        "ratio": total / pip_total, "per_env_unshared_bytes": median([float(u) for u in unshared]),
    }


# --- report -------------------------------------------------------------------------------------

LABELS = {
    "plain": "plain ipykernel (venv with bytecode)",
    "plain_nowrite": "  same, PYTHONDONTWRITEBYTECODE=1",
    "plain_cold": "  same, venv without bytecode (=1)",
    "known": "uvkerneld, known notebook",
    "pool": "uvkerneld, new notebook (pool hit)",
    "known_nowrite": "  same, PYTHONDONTWRITEBYTECODE=1",
    "pool_nowrite": "  same (pool hit), PYTHONDONTWRITEBYTECODE=1",
    "pool_empty": "uvkerneld, new notebook (pool empty)",
    "seed_new": "jupyter-uv-venv 0.1.4, new notebook",
    "seed_known": "jupyter-uv-venv 0.1.4, known notebook",
}


def verdict(value: float, target: float) -> str:
    return "ok" if value <= target else "MISSED (target %s)" % target


def format_report(result: dict[str, Any]) -> str:
    lines = ["uvkerneld bench: Python %s, %d runs per case, medians; "
             "PYTHONDONTWRITEBYTECODE in this shell: %s"
             % (result["python"], result["runs"], result["PYTHONDONTWRITEBYTECODE"] or "unset")]
    starts = result.get("kernel_start")
    if starts:
        lines += ["",
                  "kernel start, launch -> first kernel_info_reply; "
                  "vs plain = median of the ratios to a plain",
                  "ipykernel start under the same PYTHONDONTWRITEBYTECODE, "
                  "measured right before or after each start",
                  "%-46s %9s %9s  %-20s %s" % ("case", "median", "vs plain", "", "CPU    vs plain")]
        order = ["plain", "plain_nowrite", "plain_cold", "known", "known_nowrite", "pool", "pool_nowrite",
                 "pool_empty", "seed_new", "seed_known"]
        for case in [c for c in order if c in starts]:
            data = starts[case]
            note = ""
            if case in TARGETS:
                note = verdict(data["ratio"], TARGETS[case])
            if case == "pool_empty":
                extra = data["extra_s"]
                note = "+%.2f s, %s" % (extra, verdict(extra, TARGETS["pool_empty_extra_s"]))
            lines.append("%-46s %8.3fs %8.2fx  %-20s %.3fs %5.2fx" % (
                LABELS[case], data["median_s"], data["ratio"], note, data["cpu_median_s"], data["cpu_ratio"]))
    stub = result.get("stub")
    if stub:
        lines += ["",
                  "kernel stub, launch to exec: %.1f ms (%.1f ms total minus %.1f ms for /bin/true alone)  %s"
                  % (stub["stub_ms"], stub["total_ms"], stub["bin_true_ms"],
                     verdict(stub["stub_ms"], TARGETS["stub_ms"]))]
    many = result.get("many_envs")
    if many:
        lines += ["", "daemon with %d envs in the store" % many["envs"],
                  "  acquire round trip (new connection, like the stub): p50 %.2f ms, p99 %.2f ms  %s"
                  % (many["acquire_p50_ms"], many["acquire_p99_ms"],
                     verdict(many["acquire_p50_ms"], TARGETS["acquire_p50_ms"])),
                  "  status %.1f ms, list %.1f ms  %s"
                  % (many["status_ms"], many["list_ms"],
                     verdict(many["status_ms"], TARGETS["status_many_ms"])),
                  "  RSS idle %.1f MB, with %d envs %.1f MB  %s"
                  % (many["rss_idle_mb"], many["envs"], many["rss_many_mb"],
                     verdict(many["rss_many_mb"], TARGETS["rss_many_mb"]))]
    parallel = result.get("parallel_installs")
    if parallel:
        lines += ["",
                  "4 installs into 4 envs (warm cache): one after another %.2f s, at once %.2f s, ratio %.2f"
                  % (parallel["serial_s"], parallel["parallel_s"], parallel["ratio"])]
    disk = result.get("disk")
    if disk:
        mb = 1024 * 1024
        lines += ["",
                  "disk, %d notebooks that each install numpy (hardlinks counted once)" % disk["notebooks"],
                  "  uvkerneld (uv cache + venvs): %.1f MB; python -m venv + pip: %.1f MB; ratio %.3f  %s"
                  % (disk["uvkerneld_total_bytes"] / mb, disk["pip_total_bytes"] / mb, disk["ratio"],
                     verdict(disk["ratio"], TARGETS["disk_ratio"])),
                  "  per-env bytes beyond the shared files (median): %.1f MB  %s"
                  % (disk["per_env_unshared_bytes"] / mb,
                     verdict(disk["per_env_unshared_bytes"] / mb, TARGETS["per_env_unshared_mb"]))]
    if result.get("abuse"):
        lines += format_abuse(result["abuse"])
    if result.get("burst"):
        lines += format_burst(result["burst"])
    if result.get("latency"):
        from bench.latency import format_latency

        lines += format_latency(result["latency"])
    if result.get("notebooks"):
        from bench.notebooks import format_notebooks

        lines += format_notebooks(result["notebooks"])
    if result.get("pip_install"):
        from bench.pipinstall import format_pip_install

        lines += format_pip_install(result["pip_install"])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench",
                                     description="uvkerneld benchmarks (see bench/run.py)")
    parser.add_argument("--runs", type=int, default=9, help="rounds per kernel-start case (default 9)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 round, 50 envs, 2 disk notebooks (the second pip venv copied), "
                        "no seed")
    parser.add_argument("--envs", type=int, default=1000,
                        help="envs in the store for the daemon figures (default 1000)")
    parser.add_argument("--notebooks", type=int, default=10,
                        help="numpy notebooks for the disk figures (default 10)")
    parser.add_argument("--burst", type=int, default=50,
                        help="kernels launched at once for the burst figures (default 50)")
    parser.add_argument("--skip", action="append", default=[],
                        choices=["starts", "stub", "many", "parallel", "disk", "seed", "abuse", "latency",
                                 "notebooks", "burst", "pip"],
                        help="leave a section out (repeatable)")
    parser.add_argument("--cache-dir", type=Path,
                        help="reuse this uv cache (default: a fresh one, downloaded once)")
    parser.add_argument("--notebook-mb", type=float, default=20.0,
                        help="size of the big notebook of the notebooks section (default 20)")
    parser.add_argument("--baseline-stub", type=Path, metavar="FILE",
                        help="another checkout's kernel_stub/__main__.py, timed back to back with this one "
                        "in the notebooks section")
    parser.add_argument("--pip-package", default="pandas", metavar="REQ",
                        help="what the `pip` section installs (default pandas; --quick: tabulate)")
    parser.add_argument("--json", metavar="FILE", help="also write every figure as JSON ('-' for stdout)")
    args = parser.parse_args(argv)
    if args.quick:
        args.runs, args.envs, args.notebooks, args.notebook_mb, args.burst = 1, 50, 2, 2.0, 6
        if args.pip_package == "pandas":
            args.pip_package = "tabulate==0.9.0"
        args.skip.append("seed")
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    root = Path(tempfile.mkdtemp(prefix="uvk-bench-", dir="/tmp"))
    result: dict[str, Any] = {"runs": args.runs, "python": sys.version.split()[0],
                              "PYTHONDONTWRITEBYTECODE": os.environ.get("PYTHONDONTWRITEBYTECODE", ""),
                              "targets": TARGETS}
    # --quick is a smoke run whose figures nobody reads: no settling between starts.
    ws = Workspace(root, args.cache_dir or root / "cache", settle_s=0.0 if args.quick else QUIET_SETTLE_S)
    try:
        if "starts" not in args.skip:
            result["kernel_start"] = bench_kernel_starts(ws, args.runs, with_seed="seed" not in args.skip)
        if "stub" not in args.skip:
            result["stub"] = bench_stub(ws, args.runs)
        if "many" not in args.skip:
            result["many_envs"] = bench_many_envs(ws, args.envs, rounds=max(100, args.envs // 2))
        if "parallel" not in args.skip:
            result["parallel_installs"] = bench_parallel_installs(ws)
        if "disk" not in args.skip:
            result["disk"] = bench_disk(ws, args.notebooks, quick=args.quick)
        if "abuse" not in args.skip:
            result["abuse"] = bench_abuse(ws)
        if "burst" not in args.skip:
            result["burst"] = bench_burst(
                ws, args.burst, rounds=1 if args.quick else 3, builds=2 if args.quick else 5)
        if "latency" not in args.skip:
            from bench.latency import bench_latency  # it builds on this module's Workspace

            result["latency"] = bench_latency(ws, args.envs, *((3, 2, 50) if args.quick else ()))
        if "notebooks" not in args.skip:
            from bench.notebooks import bench_notebooks

            result["notebooks"] = bench_notebooks(ws, args.runs, args.notebook_mb, args.baseline_stub)
        if "pip" not in args.skip:
            from bench.pipinstall import bench_pip_install

            module = args.pip_package.split("==")[0].split("[")[0].replace("-", "_")
            result["pip_install"] = bench_pip_install(ws, args.runs, args.pip_package, module)
    except TimedOut as exc:
        raise SystemExit("bench: %s" % exc) from None
    finally:
        ws.stop_daemon()
        shutil.rmtree(root, ignore_errors=True)
    print(format_report(result))
    if args.json:
        text = json.dumps(result, indent=1)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    return 0
