"""Review of issue 11: envsync runs `uv export --script --locked` without `--python`, so uv looks for an
interpreter matching requires-python on the daemon's PATH instead of using the env's. On a host whose
configured interpreter (config `python`, e.g. /opt/python3.12) is not what PATH finds (Debian's
/usr/bin/python3 3.11, the PATH of a systemd unit), every locked notebook that asks for the env's
version is refused: 'metadata "uv.lock" cannot be used ... No interpreter found for Python >=3.12'.
`uvkernelctl lock` writes requires-python ">=X.Y" of the env's interpreter, so all its notebooks hit it.
Stand-in here: the env runs this Python, the daemon's PATH holds only /usr/bin's other 3.11.
Fails on 0920afc. It also means uv runs whatever interpreter PATH gives, as the daemon."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import Daemon, Layout

from uvkerneld import protocol
from uvkerneld.uv import find_uv


def test_bug_a_locked_notebook_syncs_when_path_has_no_interpreter_like_the_envs(
        layout: Layout, tmp_path: Path) -> None:
    wanted = "==%s" % platform.python_version()
    path_python = "/usr/bin/python3"
    if not os.path.exists(path_python) or subprocess.run(
            [path_python, "-c", "import platform; print(platform.python_version())"],
            capture_output=True, text=True, timeout=30).stdout.strip() == platform.python_version():
        pytest.skip("needs a /usr/bin/python3 other than the interpreter running the tests")
    script = ('# /// script\n# requires-python = "%s"\n# dependencies = [\n#     "iniconfig==2.0.0",\n'
              '# ]\n# ///' % wanted)
    (tmp_path / "nb.py").write_text(script + "\n")
    env = dict(os.environ, UV_CACHE_DIR=str(layout.cache_dir), UV_PYTHON_DOWNLOADS="never")
    subprocess.run([find_uv(None), "lock", "--script", str(tmp_path / "nb.py"), "--python", sys.executable],
                   check=True, env=env, capture_output=True, timeout=120)
    lock = (tmp_path / "nb.py.lock").read_text()

    daemon = Daemon(layout, "--pool-size", "0", env=dict(layout.env, PATH="/usr/bin:/bin")).start()
    try:
        key = {"kind": "notebook", "value": str(layout.notebook("locked.ipynb"))}
        acquired = layout.request("acquire", {"key": key}, timeout=300)
        assert acquired["python"]  # the env runs sys.executable's version, which requires-python names
        try:
            result = layout.request("sync", {"key": acquired["key"], "declaration": {
                "script": script, "script_cell": 1, "lock": lock}}, timeout=300)
        except protocol.BadDeclaration as exc:
            pytest.fail("a valid lock for the env's own interpreter was refused: %s" % exc.message)
        assert result["synced"] and result["changes"]["added"] == ["iniconfig"], result
    finally:
        daemon.stop()
