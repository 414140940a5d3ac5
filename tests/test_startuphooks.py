"""What a system daemon removes from an env before it lets uv run that env's Python."""

from __future__ import annotations

from pathlib import Path

from uvkerneld import startuphooks


def test_only_path_entries_inside_the_env_survive(tmp_path: Path) -> None:
    site = tmp_path / "venv" / "lib" / "python3.11" / "site-packages"
    (site / "pkg").mkdir(parents=True)
    (site / "sitecustomize").mkdir()
    (site / "sitecustomize" / "__init__.py").write_text("")
    files = {
        "inside.pth": "# a comment\n\npkg\n",
        "runs.pth": "pkg\nimport os\n",
        "runs-tab.pth": "import\tos\n",
        "outside.pth": "/tmp\n",
        "escapes.pth": "../../../../elsewhere\n",
        "usercustomize.py": "",
        "sitecustomize.cpython-311-x86_64-linux-gnu.so": "",
        "indented.pth": "  import os\n",  # site.py executes only lines that start with "import": a path
    }
    for name, text in files.items():
        (site / name).write_text(text)
    removed = startuphooks.strip(str(tmp_path / "venv"))
    assert removed == sorted(["runs.pth", "runs-tab.pth", "outside.pth", "escapes.pth", "usercustomize.py",
                              "sitecustomize.cpython-311-x86_64-linux-gnu.so", "sitecustomize"])
    assert sorted(path.name for path in site.iterdir()) == ["indented.pth", "inside.pth", "pkg"]
    assert startuphooks.strip(str(tmp_path / "venv")) == []


def test_per_env_bytecode_on_a_shared_host_compiles_without_running_the_env(tmp_path: Path) -> None:
    import asyncio
    import sys

    from uvkerneld.installs import _compile_without_site

    site = tmp_path / "venv" / "lib" / "python3.11" / "site-packages"
    site.mkdir(parents=True)
    marker = tmp_path / "ran"
    (site / "mod.py").write_text("open(%r, 'w').write('imported')\n" % str(marker))
    (site / "hook.pth").write_text("import os; open(%r, 'w').write('hook')\n" % str(marker))
    asyncio.run(_compile_without_site(sys.executable, tmp_path / "venv"))
    assert list((site / "__pycache__").glob("mod.*.pyc"))
    assert not marker.exists()


def _uv_like_venv(tmp_path: Path) -> tuple[Path, Path, bytes]:
    venv = tmp_path / "venv"
    site = venv / "lib" / "python3.11" / "site-packages"
    site.mkdir(parents=True)
    (venv / "bin").mkdir()
    (venv / "bin" / "python").symlink_to("/usr/local/bin/python3")
    cfg = (b"home = /usr/local/bin\nimplementation = CPython\nuv = 0.13.9\nversion_info = 3.11.7\n"
           b"include-system-site-packages = false\n")
    (venv / "pyvenv.cfg").write_bytes(cfg)
    return venv, site, cfg


def test_a_pth_that_adds_a_folder_holding_a_sitecustomize_is_a_startup_hook(tmp_path: Path) -> None:
    venv, site, _ = _uv_like_venv(tmp_path)
    for folder, module in (("evilpth", "sitecustomize.py"), ("evilpkg", "usercustomize"),
                           ("evilso", "sitecustomize.cpython-311-x86_64-linux-gnu.so")):
        (site / folder).mkdir()
        (site / folder / module).write_text("")
        (site / (folder + ".pth")).write_text(folder + "\n")
    (site / "plain").mkdir()
    (site / "plain" / "mod.py").write_text("")
    (site / "plain.pth").write_text("plain\n")
    (site / "dot.pth").write_text(".\n")  # site-packages itself: its customize modules are removed anyway
    assert startuphooks.strip(str(venv)) == ["evilpkg.pth", "evilpth.pth", "evilso.pth"]
    assert sorted(path.name for path in site.glob("*.pth")) == ["dot.pth", "plain.pth"]


def test_a_wheels_pyvenv_cfg_is_replaced_by_what_uv_venv_wrote(tmp_path: Path) -> None:
    venv, _, cfg = _uv_like_venv(tmp_path)
    assert startuphooks.strip(str(venv)) == []
    assert (venv / "pyvenv.cfg").read_bytes() == cfg
    # What evilpkg-1.0.data/data/pyvenv.cfg installs: a home with its own stdlib and sitecustomize.
    (venv / "pyvenv.cfg").write_text("home = /tmp/attacker/fake\nimplementation = CPython\n"
                                     "include-system-site-packages = false\nexecutable = /tmp/attacker/x\n")
    assert startuphooks.strip(str(venv)) == ["pyvenv.cfg"]
    assert (venv / "pyvenv.cfg").read_text() == (
        "home = /usr/local/bin\nimplementation = CPython\ninclude-system-site-packages = false\n")
    assert startuphooks.strip(str(venv)) == []
    (venv / "pyvenv.cfg").unlink()
    (venv / "pyvenv.cfg").symlink_to(tmp_path / "elsewhere.cfg")
    (tmp_path / "elsewhere.cfg").write_text("home = /tmp/attacker/fake\n")
    assert startuphooks.strip(str(venv)) == ["pyvenv.cfg"]
    assert not (venv / "pyvenv.cfg").is_symlink()
    assert (venv / "pyvenv.cfg").read_text() == "home = /usr/local/bin\n"
    assert (tmp_path / "elsewhere.cfg").read_text() == "home = /tmp/attacker/fake\n"


def test_shared_host_compileall_dies_with_the_daemon_and_is_recorded(tmp_path: Path) -> None:
    """compileall ran without PDEATHSIG and unrecorded: it outlived a kill -9'd daemon."""
    import json
    import os
    import signal
    import subprocess
    import sys

    from helpers import wait_until

    (tmp_path / "venv" / "lib" / "python3.11" / "site-packages").mkdir(parents=True)
    slow_python = tmp_path / "slow-python"  # stands in for a compileall that takes a while
    slow_python.write_text("#!/bin/sh\nexec sleep 120\n")
    slow_python.chmod(0o755)
    state = tmp_path / "state"
    state.mkdir()
    daemon = subprocess.Popen([sys.executable, "-c", (
        "import asyncio, pathlib, sys; from uvkerneld.children import ChildRegistry; "
        "from uvkerneld.installs import _compile_without_site; "
        "asyncio.run(_compile_without_site(sys.argv[1], pathlib.Path(sys.argv[2]), "
        "ChildRegistry(pathlib.Path(sys.argv[3]))))"
    ), str(slow_python), str(tmp_path / "venv"), str(state)], cwd=os.getcwd())
    try:
        children = state / "children"
        wait_until(lambda: children.exists() and json.loads(children.read_text()), 20, "compileall recorded")
        (pid,) = [int(each) for each in json.loads(children.read_text())]
        assert "sleep" in Path("/proc/%d/cmdline" % pid).read_text()
        daemon.send_signal(signal.SIGKILL)
        daemon.wait(timeout=10)
        wait_until(lambda: not Path("/proc/%d" % pid).exists()
                   or Path("/proc/%d/stat" % pid).read_text().rsplit(")", 1)[1].split()[0] in "ZX",
                   10, "compileall to die with its daemon")
    finally:
        daemon.kill()
        daemon.wait(timeout=10)
