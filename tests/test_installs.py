"""Installs from notebooks go through the daemon: isolated, locked per env, streamed, recorded."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from helpers import Daemon, Layout, run_code, running_kernel, wait_until

from uvkerneld import client, protocol


def acquire_env(layout: Layout, name: str) -> str:
    return layout.request("acquire", {"key": {"kind": "env", "value": name}}, timeout=300)["path"]


def shim(env_path: str, program: str, *args: str, layout: Layout, cwd: str | None = None,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [os.path.join(env_path, "bin", program), *args], env=env or layout.env, cwd=cwd or str(layout.root),
        capture_output=True, text=True, timeout=300,
    )


def installed_version(env_path: str, project: str) -> str | None:
    result = subprocess.run(
        [os.path.join(env_path, "bin", "python"), "-c",
         "import importlib.metadata as m, sys\n"
         "try: print(m.version(sys.argv[1]))\n"
         "except m.PackageNotFoundError: print('-')",
         project],
        capture_output=True, text=True, timeout=60, check=True,
    )
    version = result.stdout.strip()
    return None if version == "-" else version


def base_freeze() -> str:
    return subprocess.run(
        [sys.executable, "-m", "pip", "freeze", "--all"],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout


@contextmanager
def notebook_kernel(layout: Layout, notebook: str) -> Iterator[Any]:
    with running_kernel(layout, JPY_SESSION_NAME=str(layout.notebook(notebook))) as (_, kernel):
        yield kernel


@pytest.fixture
def install_daemon(layout: Layout) -> Iterator[Daemon]:
    running = Daemon(layout, "--pool-size", "0").start()
    yield running
    running.stop()


def test_two_notebooks_install_conflicting_versions_in_isolation(
    install_daemon: Daemon, layout: Layout, kernelspec: str
) -> None:
    before = base_freeze()
    with notebook_kernel(layout, "a.ipynb") as kernel_a, notebook_kernel(layout, "b.ipynb") as kernel_b:
        output_a = run_code(kernel_a, "%pip install six==1.16.0", timeout=300)
        output_b = run_code(kernel_b, "%pip install six==1.17.0", timeout=300)
        assert "+ six==1.16.0" in output_a and "+ six==1.17.0" in output_b
        assert run_code(kernel_a, "import six; print(six.__version__)").strip() == "1.16.0"
        assert run_code(kernel_b, "import six; print(six.__version__)").strip() == "1.17.0"
        prefix_a = run_code(kernel_a, "import sys; print(sys.prefix)").strip()
        # Installing again in B does not touch A, and the kernel sees its own env only.
        assert run_code(kernel_a, "import six; print(six.__file__)").strip().startswith(prefix_a)
    assert base_freeze() == before


def test_bang_pip_and_uv_magics_land_in_the_notebook_env(
    install_daemon: Daemon, layout: Layout, kernelspec: str
) -> None:
    before = base_freeze()
    with notebook_kernel(layout, "tools.ipynb") as kernel:
        prefix = run_code(kernel, "import sys; print(sys.prefix)").strip()
        for command, version in (
            ("!pip install six==1.15.0", "1.15.0"),
            ("%uv pip install six==1.16.0", "1.16.0"),
            ("!uv pip install six==1.17.0", "1.17.0"),
            ("import subprocess; subprocess.run(['pip', 'install', 'six==1.14.0'], check=True)", "1.14.0"),
        ):
            run_code(kernel, command, timeout=300)
            assert installed_version(prefix, "six") == version, command
        # `python -m pip` is not what %pip runs: the venv has no pip at all.
        assert "No module named pip" in run_code(kernel, "!{sys.executable} -m pip --version 2>&1")
    assert base_freeze() == before


def test_restart_note_only_when_an_imported_package_changed(
    install_daemon: Daemon, layout: Layout, kernelspec: str
) -> None:
    note = "Note: you may need to restart the kernel to use updated packages."
    with notebook_kernel(layout, "note.ipynb") as kernel:
        assert note not in run_code(kernel, "%pip install six==1.16.0", timeout=300)
        run_code(kernel, "import six")
        assert note in run_code(kernel, "%pip install six==1.17.0", timeout=300)
        assert note not in run_code(kernel, "%pip install idna", timeout=300)


def test_eight_concurrent_installs_into_one_env_run_one_at_a_time(
    install_daemon: Daemon, layout: Layout
) -> None:
    env_path = acquire_env(layout, "busy")
    versions = ["1.10.0", "1.11.0", "1.12.0", "1.13.0", "1.14.0", "1.15.0", "1.16.0", "1.17.0"]
    results: dict[str, dict[str, Any]] = {}

    def install(version: str) -> None:
        results[version] = layout.request("pip", {"env": env_path, "argv": ["install", "six==" + version]},
                                          timeout=300)

    threads = [threading.Thread(target=install, args=(version,)) for version in versions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert sorted(results) == versions
    assert all(result["exit_status"] == 0 for result in results.values())
    history = layout.request("installs", {"env": env_path})["installs"]
    assert len(history) == 8
    intervals = sorted((item["started_at"], item["finished_at"]) for item in history)
    for (_, end), (start, _) in itertools.pairwise(intervals):
        assert start >= end, "two installs into one env overlapped: %s" % intervals
    # FIFO: they ran in the order the daemon queued them.
    by_start = sorted(history, key=lambda item: item["started_at"])
    assert [item["id"] for item in by_start] == sorted(item["id"] for item in history)
    check = subprocess.run(
        [install_daemon_uv(), "pip", "check", "--python", os.path.join(env_path, "bin", "python")],
        capture_output=True, text=True, timeout=60, env={**layout.env, "UV_CACHE_DIR": str(layout.cache_dir)},
    )
    assert check.returncode == 0, check.stdout + check.stderr
    # The record keeps what was asked last for each project: the install that ran last.
    last = max(history, key=lambda item: item["started_at"])
    assert layout.request("installs", {"env": env_path})["requirements"] == [last["argv"][1]]
    assert installed_version(env_path, "six") == last["argv"][1].split("==")[1]


def install_daemon_uv() -> str:
    from uvkerneld.uv import find_uv

    return find_uv(None)


def test_installs_into_different_envs_run_in_parallel(install_daemon: Daemon, layout: Layout) -> None:
    envs = [acquire_env(layout, "parallel-%d" % index) for index in range(4)]
    done = []

    def install(env_path: str, version: str) -> None:
        done.append(layout.request("pip", {"env": env_path, "argv": ["install", "six==" + version]},
                                   timeout=300))

    started = time.monotonic()
    versions = ["1.14.0", "1.15.0", "1.16.0", "1.17.0"]
    threads = [threading.Thread(target=install, args=(env, v)) for env, v in zip(envs, versions, strict=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    wall = time.monotonic() - started
    assert len(done) == 4 and all(result["exit_status"] == 0 for result in done)
    intervals = []
    for env_path in envs:
        (record,) = layout.request("installs", {"env": env_path})["installs"]
        intervals.append((record["started_at"], record["finished_at"]))
    intervals.sort()
    overlapping = any(later[0] < earlier[1] for earlier, later in itertools.pairwise(intervals))
    assert overlapping, "installs into different envs never ran at the same time: %s" % intervals
    serial = sum(end - start for start, end in intervals)
    print("4 envs: wall %.2f s vs sum of install times %.2f s (ratio %.2f)" % (wall, serial, wall / serial))


def test_first_output_line_arrives_before_the_install_finishes(
    install_daemon: Daemon, layout: Layout
) -> None:
    env_path = acquire_env(layout, "stream")
    arrivals: list[tuple[float, str]] = []
    sock = client.connect(str(layout.socket), timeout=300)
    try:
        # docopt ships only an sdist: uv must build it, so the install takes a while.
        result = client.call(
            sock, "pip", {"env": env_path, "argv": ["install", "docopt==0.6.2"]}, timeout=300,
            on_event=lambda name, data: arrivals.append((time.time(), data)),
        )
    finally:
        sock.close()
    assert result["exit_status"] == 0
    (record,) = layout.request("installs", {"env": env_path})["installs"]
    assert arrivals, "no output was streamed"
    first_arrival, first_line = arrivals[0]
    assert first_arrival < record["finished_at"], (first_line, first_arrival, record)
    assert any("docopt" in line for _, line in arrivals)


@pytest.mark.parametrize(
    "program, args, message",
    [
        ("pip", ["install", "--target", "/tmp/x", "six"],
         "pip: error: --target is not allowed: packages always go into this notebook's own environment"),
        ("pip", ["install", "--prefix", "/tmp/x", "six"], "pip: error: --prefix is not allowed"),
        ("pip", ["install", "--python", "/usr/bin/python3", "six"], "pip: error: --python is not allowed"),
        ("pip", ["install", "--system", "six"], "pip: error: --system is not allowed"),
        ("pip", ["install", "--user", "six"], "pip: error: --user is not allowed"),
        ("pip", ["install", "--break-system-packages", "six"],
         "pip: error: --break-system-packages is not allowed"),
        ("pip3", ["download", "six"], "pip3: error: pip download is not supported in a uvkerneld kernel"),
        ("pip", ["wheel", "six"], "pip: error: pip wheel is not supported in a uvkerneld kernel"),
        ("uv", ["pip", "install", "--system", "six"], "uv pip: error: --system is not allowed"),
        ("uv", ["pip", "sync", "req.txt"], "uv pip: error: pip sync is not supported in a uvkerneld kernel"),
        ("uv", ["venv", "/tmp/x"],
         "uv: error: only `uv pip install|uninstall|list|freeze|show` is available"),
    ],
)
def test_refused_flags_and_subcommands(
    install_daemon: Daemon, layout: Layout, program: str, args: list[str], message: str
) -> None:
    env_path = acquire_env(layout, "refusals")
    result = shim(env_path, program, *args, layout=layout)
    assert result.returncode == 2
    assert result.stderr.startswith(message) and len(result.stderr.strip().splitlines()) == 1
    assert layout.request("installs", {"env": env_path})["installs"] == []  # nothing reached uv


def test_daemon_refuses_the_same_commands_from_a_client_that_skips_the_shim(
    install_daemon: Daemon, layout: Layout
) -> None:
    env_path = acquire_env(layout, "direct")
    with pytest.raises(protocol.BadRequest, match="--target is not allowed"):
        layout.request("pip", {"env": env_path, "argv": ["install", "--target", "/tmp/x", "six"]})
    with pytest.raises(protocol.BadRequest, match="option -r is not supported"):
        layout.request("pip", {"env": env_path, "argv": ["install", "-r", "x.txt"],
                               "files": ["-r /root/secret.txt\n"]})
    with pytest.raises(protocol.BadRequest, match="1 requirement file"):
        layout.request("pip", {"env": env_path, "argv": ["install", "-r", "x.txt"], "files": []})


def test_only_the_owner_may_install_and_pooled_or_unknown_envs_are_refused(layout: Layout) -> None:
    daemon = Daemon(layout, "--pool-size", "1").start()
    try:
        daemon.wait_pool_full()
        (pooled,) = [p for p in layout.venvs_dir.glob("e-*")]
        for path in (str(pooled), str(layout.venvs_dir / "e-000000000000"), "/usr"):
            with pytest.raises(protocol.NotFound, match="does not own an env at"):
                layout.request("pip", {"env": path, "argv": ["install", "six"]})
    finally:
        daemon.stop()


def test_a_requirement_that_looks_like_a_shell_command_runs_nothing(
    install_daemon: Daemon, layout: Layout
) -> None:
    victim = layout.root / "victim"
    victim.mkdir()
    (victim / "keep").write_text("x")
    env_path = acquire_env(layout, "shell")
    result = shim(env_path, "pip", "install", "six; rm -rf %s" % victim, layout=layout)
    assert result.returncode != 0
    assert (victim / "keep").exists()
    assert installed_version(env_path, "six") is None


def test_missing_package_shows_uvs_error_and_leaves_the_env_unchanged(
    install_daemon: Daemon, layout: Layout, kernelspec: str
) -> None:
    with notebook_kernel(layout, "missing.ipynb") as kernel:
        run_code(kernel, "%pip install six==1.16.0", timeout=300)
        freeze_before = run_code(kernel, "%pip freeze", timeout=120)
        output = run_code(kernel, "%pip install uvkerneld-no-such-package-4711\nprint('exit', _exit_code)",
                          timeout=300)
        assert "uvkerneld-no-such-package-4711" in output and "not found" in output
        assert "exit 1" in output
        assert run_code(kernel, "%pip freeze", timeout=120) == freeze_before
        assert run_code(kernel, "import six; print(six.__version__)").strip() == "1.16.0"


def test_requirements_files_are_read_by_the_client_and_recorded(
    install_daemon: Daemon, layout: Layout
) -> None:
    env_path = acquire_env(layout, "reqfile")
    project = layout.root / "project"
    project.mkdir()
    (project / "base.txt").write_text("six==1.16.0\n")
    (project / "requirements.txt").write_text("-r base.txt\nidna\n")
    result = shim(env_path, "pip", "install", "-r", "requirements.txt", layout=layout, cwd=str(project))
    assert result.returncode == 0, result.stderr
    assert installed_version(env_path, "six") == "1.16.0" and installed_version(env_path, "idna")
    assert layout.request("installs", {"env": env_path})["requirements"] == ["idna", "six==1.16.0"]
    result = shim(env_path, "pip", "uninstall", "-y", "idna", layout=layout)
    assert result.returncode == 0, result.stderr
    assert installed_version(env_path, "idna") is None
    assert layout.request("installs", {"env": env_path})["requirements"] == ["six==1.16.0"]


def test_local_paths_pass_through_in_user_mode(install_daemon: Daemon, layout: Layout) -> None:
    env_path = acquire_env(layout, "localpkg")
    package = layout.root / "src" / "localpkg"
    (package / "localpkg").mkdir(parents=True)
    (package / "localpkg" / "__init__.py").write_text("VALUE = 7\n")
    (package / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "localpkg"\nversion = "1.0"\n'
    )
    result = shim(env_path, "pip", "install", "./localpkg", layout=layout, cwd=str(package.parent))
    assert result.returncode == 0, result.stdout + result.stderr
    assert installed_version(env_path, "localpkg") == "1.0"


def test_no_daemon_means_nothing_installed_and_a_clear_message(layout: Layout) -> None:
    daemon = Daemon(layout, "--pool-size", "0").start()
    env_path = acquire_env(layout, "orphan")
    daemon.stop()
    before = base_freeze()
    result = shim(env_path, "pip", "install", "six", layout=layout)
    assert result.returncode == 1
    assert "cannot reach uvkerneld, so nothing was installed" in result.stderr
    assert installed_version(env_path, "six") is None
    assert base_freeze() == before


def test_a_damaged_env_is_rebuilt_with_its_recorded_requirements(
    install_daemon: Daemon, layout: Layout, kernelspec: str
) -> None:
    with notebook_kernel(layout, "rebuild.ipynb") as kernel:
        run_code(kernel, "%pip install six==1.16.0", timeout=300)
        old_prefix = run_code(kernel, "import sys; print(sys.prefix)").strip()
    os.unlink(os.path.join(old_prefix, "bin", "python"))
    with notebook_kernel(layout, "rebuild.ipynb") as kernel:
        new_prefix = run_code(kernel, "import sys; print(sys.prefix)").strip()
        assert new_prefix != old_prefix
        assert run_code(kernel, "import six; print(six.__version__)").strip() == "1.16.0"
    assert layout.status()["kernels_started"]["rebuilt"] == 1


def test_sigterm_during_an_install_leaves_the_env_rebuildable(layout: Layout) -> None:
    daemon = Daemon(layout, "--pool-size", "0").start()
    env_path = acquire_env(layout, "interrupted")
    installed = layout.request("pip", {"env": env_path, "argv": ["install", "six==1.16.0"]}, timeout=300)
    assert installed["exit_status"] == 0
    # Start a slow install (an sdist build) and stop the daemon in the middle of it.
    process = subprocess.Popen(
        [os.path.join(env_path, "bin", "pip"), "install", "docopt==0.6.2", "--no-deps"],
        env=layout.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    wait_until(lambda: layout.status()["installs"]["running"] == 1, 60, "the install to start")
    assert daemon.stop(timeout=30) == 0
    process.communicate(timeout=60)
    daemon = Daemon(layout, "--pool-size", "0").start()
    try:
        state = layout.status()["envs"]
        record = layout.request("installs", {"env": env_path})
        docopt = installed_version(env_path, "docopt") if os.path.exists(env_path) else None
        # Either the install completed before the stop, or the env is flagged for repair.
        assert docopt == "0.6.2" or state["broken"] == 1, (state, record)
        rebuilt = acquire_env(layout, "interrupted")
        assert installed_version(rebuilt, "six") == "1.16.0"
    finally:
        daemon.stop()


def test_uv_gets_requirement_files_as_checked_with_their_options_on_its_command_line(tmp_path: Any) -> None:
    """What uv reads is what the daemon checked: options move to argv, the file keeps requirements."""
    from types import SimpleNamespace

    from uvkerneld.installs import InstallManager

    manager = InstallManager(SimpleNamespace(mode="system", max_parallel_installs=1), None, None)  # type: ignore[arg-type]
    files = ["--index-url https://idx/simple\n--pre\nsix==1.16.0 \\\n  --hash=sha256:00ff\n",
             "-i https://idx/simple\n--extra-index-url https://extra/simple\nidna<4\n"]
    validated = manager._validate(["install", "--pre", "-r", "a.txt", "-c", "b.txt"], files)
    flags = manager._materialize_files(validated, str(tmp_path))
    assert flags == ["--prerelease=allow", "-r", str(tmp_path / "requirements-0.txt"), "--default-index",
                     "https://idx/simple", "-c", str(tmp_path / "requirements-1.txt"),
                     "--extra-index-url", "https://extra/simple"]
    assert (tmp_path / "requirements-0.txt").read_text() == "six==1.16.0 --hash=sha256:00ff\n"
    assert (tmp_path / "requirements-1.txt").read_text() == "idna<4\n"
    with pytest.raises(protocol.BadRequest, match="given more than once"):
        manager._validate(["install", "-i", "https://other/simple", "-r", "a.txt"], files[:1])
    with pytest.raises(protocol.NotAllowed, match="installing from a local path"):
        manager._validate(["install", "-r", "a.txt"], ["pkg@file:///home/ub/pkg\n"])
    with pytest.raises(protocol.NotAllowed, match="pkg needs a build"):
        manager._validate(["install", "-c", "a.txt", "six"], ["pkg @ git+https://host/pkg\n"])
