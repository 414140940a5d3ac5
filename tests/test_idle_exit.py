"""A daemon that a kernel started goes away when nothing uses it, and comes back on demand."""

from __future__ import annotations

import fcntl
import subprocess
import sys

from helpers import Daemon, Layout, processes_matching, run_code, running_kernel, wait_until

PREFIX = "import sys; print(sys.prefix)"


def test_an_idle_daemon_exits_cleanly_and_never_while_a_kernel_runs(layout: Layout, kernelspec: str) -> None:
    # 5 s: long enough that a slow CI machine still reaches the kernel start before it.
    daemon = Daemon(layout, "--pool-size", "0", "--idle-exit", "5s").start()
    try:
        assert layout.status()["paths"]["idle_exit_s"] == 5.0
        busy = str(layout.notebook("busy.ipynb"))
        with running_kernel(layout, kernelspec, JPY_SESSION_NAME=busy) as (_, kernel):
            # Longer than idle_exit, with only the kernel's lifeline open: the daemon stays.
            run_code(kernel, "import time; time.sleep(7)")
            assert daemon.process is not None and daemon.process.poll() is None
            assert "idle for" not in daemon.log
        # The kernel is gone: now it is idle, and exits by itself, cleanly.
        assert daemon.process is not None
        wait_until(lambda: daemon.process.poll() is not None, 30, "the idle daemon to exit")
        assert daemon.process.returncode == 0
        assert "idle_exit): exiting" in daemon.log
        assert not layout.socket.exists()
    finally:
        daemon.stop()


def test_a_kernel_started_while_the_daemon_exits_waits_for_its_successor(
    layout: Layout, kernelspec: str
) -> None:
    # The moment of an idle exit: the old daemon's socket is closed, but it still holds the
    # state-dir lock for a few moments. The test plays that daemon by holding the lock itself.
    first = Daemon(layout, "--pool-size", "0").start()
    assert first.stop() == 0
    layout.state_dir.mkdir(parents=True, exist_ok=True)
    with open(layout.state_dir / "uvkerneld.pid", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with running_kernel(layout, kernelspec, JPY_SESSION_NAME=str(layout.notebook("late.ipynb")),
                            wait=False) as (_, kernel):
            # The kernel stub started a successor, which waits for the lock instead of failing.
            log = layout.socket.parent / "uvkerneld.log"
            wait_until(lambda: log.exists() and "waiting up to" in log.read_text(), 60,
                       "the successor to wait")
            assert len(processes_matching("-m uvkerneld", str(layout.socket), "--started-by-kernel")) == 1
            fcntl.flock(lock, fcntl.LOCK_UN)
            kernel.wait_for_ready(timeout=180)
            assert run_code(kernel, PREFIX).strip().startswith(str(layout.venvs_dir))
    status = layout.status()
    assert status["paths"]["idle_exit_s"] == 3600.0  # started by a kernel: exits after an idle hour
    assert sum(status["kernels_started"].values()) == 1
    table = subprocess.run([sys.executable, "-m", "uvkerneld.ctl", "status"], env=layout.env,
                           capture_output=True, text=True, timeout=60).stdout
    assert ", exits after 1h idle" in table.splitlines()[0]
    assert "notebooks  watching 1 folder(s) for saves and renames, 0 rename(s) followed" in table


def test_bad_idle_exit_values_are_refused_with_the_setting_named(layout: Layout) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "uvkerneld", "--idle-exit", "soon"],
        env=layout.env, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "idle_exit (from --idle-exit)" in result.stderr
    assert not layout.socket.exists()
