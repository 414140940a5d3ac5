"""Real kernels launched by jupyter_client from the installed kernelspec, through the stub."""

from __future__ import annotations

import errno
import json
import os
import queue
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from helpers import (
    Daemon,
    Layout,
    process_alive,
    processes_matching,
    read_message,
    run_code,
    running_kernel,
    wait_until,
)
from jupyter_client.manager import KernelManager

from uvkerneld import protocol

PREFIX_CODE = "import sys; print(sys.prefix)"


def kernel_prefix(layout: Layout, kernelspec: str, **extra_env: str) -> str:
    with running_kernel(layout, kernelspec, **extra_env) as (_, kernel):
        return run_code(kernel, PREFIX_CODE).strip()


def test_notebooks_get_their_own_venvs_that_persist(layout: Layout, kernelspec: str) -> None:
    daemon = Daemon(layout, "--pool-size", "2").start()
    try:
        notebook_a = str(layout.notebook("a.ipynb"))
        notebook_b = str(layout.notebook("b.ipynb"))
        with running_kernel(layout, kernelspec, JPY_SESSION_NAME=notebook_a) as (manager, kernel):
            prefix_a = run_code(kernel, PREFIX_CODE).strip()
            # Runs inside a venv under the venvs dir, not the base environment.
            assert prefix_a.startswith(str(layout.venvs_dir) + os.sep)
            assert prefix_a != sys.prefix
            details = run_code(
                kernel, "import os, ipykernel; print(os.environ['VIRTUAL_ENV']); print(ipykernel.__file__)")
            virtual_env, ipykernel_file = details.split()
            assert virtual_env == prefix_a and ipykernel_file.startswith(prefix_a)
            # Restart (as Jupyter's restart button does): same notebook, same venv.
            manager.restart_kernel(now=False)
            kernel.wait_for_ready(timeout=120)
            assert run_code(kernel, PREFIX_CODE).strip() == prefix_a
        prefix_b = kernel_prefix(layout, kernelspec, JPY_SESSION_NAME=notebook_b)
        assert prefix_b.startswith(str(layout.venvs_dir)) and prefix_b != prefix_a
    finally:
        assert daemon.stop() == 0
    # A new daemon process reads the same store: notebook A still gets its venv.
    daemon = Daemon(layout, "--pool-size", "0").start()
    try:
        assert kernel_prefix(layout, kernelspec, JPY_SESSION_NAME=notebook_a) == prefix_a
        started = layout.status()["kernels_started"]
        assert started == {"known": 1, "renamed": 0, "pool": 0, "created": 0, "rebuilt": 0}
    finally:
        daemon.stop()


def test_interrupt_and_shutdown_reach_the_kernel(daemon: Daemon, layout: Layout, kernelspec: str) -> None:
    notebook = str(layout.notebook("interrupt.ipynb"))
    with running_kernel(layout, kernelspec, JPY_SESSION_NAME=notebook) as (manager, kernel):
        pid = manager.provisioner.pid
        # The stub exec'd: the process Jupyter started *is* the kernel.
        assert run_code(kernel, "import os; print(os.getpid())").strip() == str(pid)
        # stop_on_error=False: an interrupted cell otherwise makes ipykernel abort requests that
        # arrive while it unwinds, and on a busy machine the next cell below can be one of them.
        msg_id = kernel.execute("import time; time.sleep(60)", stop_on_error=False)
        wait_until(lambda: _saw_execute_input(kernel, msg_id), 30, "the sleep to start")
        manager.interrupt_kernel()
        reply = kernel.get_shell_msg(timeout=30)
        while reply["parent_header"].get("msg_id") != msg_id:
            reply = kernel.get_shell_msg(timeout=30)
        assert reply["content"]["status"] == "error"
        assert reply["content"]["ename"] == "KeyboardInterrupt"
        # Still alive and usable after the interrupt.
        assert run_code(kernel, "print(6 * 7)").strip() == "42"
        connection_file = manager.connection_file
        assert layout.status()["envs"]["live"] == 1
    assert not process_alive(pid)
    assert processes_matching(connection_file) == []
    wait_until(lambda: layout.status()["envs"]["live"] == 0, 30, "the daemon to see the kernel end")


def _saw_execute_input(kernel: Any, msg_id: str) -> bool:
    try:
        message = kernel.get_iopub_msg(timeout=0.2)
    except queue.Empty:
        return False
    return message["msg_type"] == "execute_input" and message["parent_header"].get("msg_id") == msg_id


def test_new_notebook_is_served_from_the_pool_and_the_pool_refills(
    daemon: Daemon, layout: Layout, kernelspec: str
) -> None:
    daemon.wait_pool_full()
    pooled_before = layout.status()["kernels_started"]["pool"]
    built_before = {entry.name for entry in layout.venvs_dir.iterdir()}
    prefix = kernel_prefix(layout, kernelspec, JPY_SESSION_NAME=str(layout.notebook("fresh.ipynb")))
    status = layout.status()
    assert status["kernels_started"]["pool"] == pooled_before + 1
    assert os.path.basename(prefix) in built_before  # one of the venvs the pool had ready
    pool = daemon.wait_pool_full()
    assert pool["ready"] == pool["target"] == 2


def test_empty_pool_creates_on_demand_and_counts_it(layout: Layout, kernelspec: str) -> None:
    daemon = Daemon(layout, "--pool-size", "0").start()
    try:
        prefix = kernel_prefix(layout, kernelspec, UVKERNEL_ENV="scratch-1")
        assert prefix.startswith(str(layout.venvs_dir))
        assert layout.status()["kernels_started"]["created"] == 1
    finally:
        daemon.stop()


def test_explicit_env_name_and_folder_scratch_env(daemon: Daemon, layout: Layout, kernelspec: str) -> None:
    shared_1 = kernel_prefix(layout, kernelspec, UVKERNEL_ENV="shared")
    shared_2 = kernel_prefix(layout, kernelspec, UVKERNEL_ENV="shared",
                             JPY_SESSION_NAME=str(layout.notebook("x.ipynb")))
    assert shared_1 == shared_2
    # nbclient/papermill set no JPY_SESSION_NAME: the folder's scratch env, stable per folder.
    folder_1 = kernel_prefix(layout, kernelspec)
    folder_2 = kernel_prefix(layout, kernelspec)
    assert folder_1 == folder_2 and folder_1 != shared_1


def test_kernel_started_inside_a_uv_kernel_does_not_reuse_its_env(
    daemon: Daemon, layout: Layout, kernelspec: str
) -> None:
    parent_notebook = str(layout.notebook("parent.ipynb"))
    with running_kernel(layout, kernelspec, JPY_SESSION_NAME=parent_notebook) as (_, kernel):
        parent_prefix, marker = run_code(
            kernel, "import os, sys; print(sys.prefix); print(os.environ['UVKERNEL_KERNEL_IDENTITY'])"
        ).splitlines()
    # What `!papermill child.ipynb` inside the parent would pass on: the parent's whole env.
    child_prefix = kernel_prefix(
        layout, kernelspec, JPY_SESSION_NAME=parent_notebook, UVKERNEL_KERNEL_IDENTITY=marker
    )
    assert child_prefix != parent_prefix


def test_unusable_env_name_shows_the_reason_in_the_notebook(
    daemon: Daemon, layout: Layout, kernelspec: str
) -> None:
    with running_kernel(layout, kernelspec, UVKERNEL_ENV="../../etc") as (_, kernel):
        reply = kernel.execute_interactive("print('hello')", timeout=60)
    assert reply["content"]["status"] == "error"
    assert reply["content"]["ename"] == "EnvironmentUnavailable"
    assert "env name '../../etc' is not allowed" in reply["content"]["evalue"]


def test_no_daemon_and_autostart_off_shows_the_reason_in_the_notebook(
    layout: Layout, kernelspec: str
) -> None:
    with running_kernel(layout, kernelspec, UVKERNELD_AUTOSTART="0") as (_, kernel):
        reply = kernel.execute_interactive("1 + 1", timeout=60)
    assert reply["content"]["ename"] == "EnvironmentUnavailable"
    assert "uvkerneld is not running (nothing answers on %s)" % layout.socket in reply["content"]["evalue"]


@pytest.mark.parametrize("value", ["soon", "1e10"])  # 1e10: the socket timeout overflowed, the kernel died
def test_a_bad_acquire_timeout_shows_the_reason_in_the_notebook(
    bare_daemon: Daemon, layout: Layout, kernelspec: str, value: str
) -> None:
    with running_kernel(layout, kernelspec, UVKERNEL_ACQUIRE_TIMEOUT=value) as (_, kernel):
        reply = kernel.execute_interactive("1 + 1", timeout=60)
    assert reply["content"]["ename"] == "EnvironmentUnavailable"
    assert ("UVKERNEL_ACQUIRE_TIMEOUT=%r is not a number of seconds > 0 and <= 86400; unset it to wait up to "
            "600 s" % value in reply["content"]["evalue"])


def test_a_damaged_env_is_replaced_instead_of_failing_the_kernel(
    daemon: Daemon, layout: Layout, kernelspec: str
) -> None:
    notebook = str(layout.notebook("damaged.ipynb"))
    first = kernel_prefix(layout, kernelspec, JPY_SESSION_NAME=notebook)
    os.unlink(os.path.join(first, "bin", "python"))  # someone broke it by hand
    second = kernel_prefix(layout, kernelspec, JPY_SESSION_NAME=notebook)
    assert second != first and second.startswith(str(layout.venvs_dir))
    assert not os.path.exists(first)
    assert layout.status()["kernels_started"]["rebuilt"] == 1


@pytest.mark.slow
def test_ten_stubs_racing_start_exactly_one_daemon(layout: Layout, kernelspec: str) -> None:
    assert layout.daemon_pid() is None and not layout.socket.exists()
    managers = []
    try:
        for index in range(10):
            env = layout.env
            env["JPY_SESSION_NAME"] = str(layout.notebook("race-%d.ipynb" % index))
            manager = KernelManager(kernel_name=kernelspec)
            manager.start_kernel(env=env, cwd=str(layout.notebooks))
            managers.append(manager)
        prefixes = []
        for manager in managers:
            kernel = manager.client()
            kernel.start_channels()
            try:
                kernel.wait_for_ready(timeout=240)
                prefixes.append(run_code(kernel, PREFIX_CODE, timeout=60).strip())
            finally:
                kernel.stop_channels()
        daemons = processes_matching("-m uvkerneld", str(layout.socket))
        assert len(daemons) == 1, daemons
        assert daemons == [layout.daemon_pid()]
        assert len(set(prefixes)) == 10
        assert all(prefix.startswith(str(layout.venvs_dir)) for prefix in prefixes)
        assert layout.status()["envs"]["total"] == 10
    finally:
        for manager in managers:
            if manager.has_kernel:
                manager.shutdown_kernel(now=True)


def test_kernelspec_runs_the_stub_from_an_absolute_interpreter(layout: Layout, kernelspec: str) -> None:
    spec_file = layout.kernel_prefix / "share" / "jupyter" / "kernels" / kernelspec / "kernel.json"
    spec = json.loads(spec_file.read_text())
    argv = spec["argv"]
    # jupyter_client swaps a bare "python"/"python3" for its own interpreter; an absolute path is kept.
    assert os.path.isabs(argv[0]) and os.access(argv[0], os.X_OK)
    assert argv[1:3] == ["-I", "-S"] and argv[3].endswith(os.path.join("kernel_stub", "__main__.py"))
    assert argv[-2:] == ["-f", "{connection_file}"]
    assert spec["display_name"] == "Python 3 (uv, per notebook)" and spec["interrupt_mode"] == "signal"


def test_stub_also_runs_as_python_m_kernel_stub(daemon: Daemon, layout: Layout) -> None:
    spec_dir = layout.kernel_prefix / "share" / "jupyter" / "kernels" / "uv-m"
    spec_dir.mkdir(parents=True)
    spec_dir.joinpath("kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "kernel_stub", "-f", "{connection_file}"],
        "display_name": "uv (-m)", "language": "python",
    }))
    prefix = kernel_prefix(layout, "uv-m", UVKERNEL_ENV="via-m")
    assert prefix.startswith(str(layout.venvs_dir))


def test_shrinking_the_pool_gives_venvs_back(daemon: Daemon, layout: Layout) -> None:
    daemon.wait_pool_full()
    assert len(list(layout.venvs_dir.glob("e-*"))) == 2
    layout.request("pool", {"size": 0})
    wait_until(lambda: not list(layout.venvs_dir.glob("e-*")), 60, "the pooled venvs to be deleted")
    # The files go first (a child process removes them), the row when that child has exited.
    def no_row_deleting() -> dict[str, Any] | None:
        status = layout.status()
        return status if status["envs"]["by_state"]["deleting"] == 0 else None

    status = wait_until(no_row_deleting, 30, "the deleted venvs' rows to go")
    assert status["pool"]["ready"] == 0


def test_install_kernelspec_refuses_a_bad_name(layout: Layout) -> None:
    import subprocess

    result = subprocess.run(
        [sys.executable, "-m", "uvkerneld.ctl", "install-kernelspec", "--prefix", str(layout.kernel_prefix),
         "--name", "uv kernel/../x"], env=layout.env, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert ("kernel name 'uv kernel/../x' is not valid: use letters, digits, '.', '_' and '-' only"
            in result.stderr)
    assert not (layout.kernel_prefix / "share").exists()  # nothing half-written


def _read_frame(conn: socket.socket) -> dict[str, Any]:
    message = read_message(conn)
    assert message is not None, "the stub closed the connection before sending a request"
    return message


def _refuse(conn: socket.socket, request: dict[str, Any], message: str) -> None:
    refusal = protocol.error_response(request["id"], protocol.EnvUnavailable(message))
    conn.sendall(protocol.encode_frame(refusal))


@contextmanager
def stand_in_daemon(layout: Layout) -> Iterator[socket.socket]:
    """A listening socket where the daemon's would be, which the test answers by hand."""
    layout.socket.parent.mkdir(parents=True, exist_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(layout.socket))
    listener.listen(2)
    listener.settimeout(60)
    try:
        yield listener
    finally:
        listener.close()


@contextmanager
def launched_kernel(layout: Layout, kernelspec: str, **extra_env: str) -> Iterator[KernelManager]:
    manager = KernelManager(kernel_name=kernelspec)
    manager.start_kernel(env=dict(layout.env, **extra_env), cwd=str(layout.notebooks))
    try:
        yield manager
    finally:
        if manager.has_kernel:
            manager.shutdown_kernel(now=True)


def execute_once(manager: KernelManager, code: str) -> dict[str, Any]:
    kernel = manager.client()
    kernel.start_channels()
    try:
        kernel.wait_for_ready(timeout=60)
        return kernel.execute_interactive(code, timeout=60)
    finally:
        kernel.stop_channels()


def test_stub_holds_the_kernel_ports_while_it_waits_for_its_env(layout: Layout, kernelspec: str) -> None:
    # The stand-in takes the stub's acquire and answers only when told, like a daemon building a
    # venv on a cold pool.
    notebook = str(layout.notebook("slow.ipynb"))
    with stand_in_daemon(layout) as listener, \
            launched_kernel(layout, kernelspec, JPY_SESSION_NAME=notebook) as manager:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(60)
            request = _read_frame(conn)
            assert request["op"] == "acquire"
            ports = [manager.shell_port, manager.iopub_port, manager.stdin_port, manager.control_port,
                     manager.hb_port]
            for port in ports:
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                    try:
                        probe.bind(("127.0.0.1", port))
                    except OSError as exc:
                        assert exc.errno == errno.EADDRINUSE
                    else:
                        raise AssertionError("port %d was free while the stub waited for its env" % port)
            _refuse(conn, request, "the test's daemon says no")
        # The ports come free at exec, and the kernel that follows (here the fallback) binds them.
        reply = execute_once(manager, "1 + 1")
    assert reply["content"]["ename"] == "EnvironmentUnavailable"
    assert "the test's daemon says no" in reply["content"]["evalue"]


def test_stub_retries_once_when_the_daemon_goes_away_mid_request(layout: Layout, kernelspec: str) -> None:
    # The stand-in drops the first acquire without answering (as a daemon does that is exiting
    # when the request arrives), then answers the retry.
    with stand_in_daemon(layout) as listener, launched_kernel(layout, kernelspec) as manager:
        first, _ = listener.accept()
        with first:
            first.settimeout(60)
            assert _read_frame(first)["op"] == "acquire"
        second, _ = listener.accept()
        with second:
            second.settimeout(60)
            _refuse(second, _read_frame(second), "answered on the second attempt")
        reply = execute_once(manager, "1 + 1")
    assert "answered on the second attempt" in reply["content"]["evalue"]
