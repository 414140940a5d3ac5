"""Review of issue 11: pyproject says requires-python >= 3.10, but declared.py imports tomllib (3.11+)
without the tomli fallback config.py and nbdeps.py use, so on 3.10 the daemon dies at start-up
(ops -> envsync -> declared) and every `uvkernelctl deps/lock/sync` fails. Fails on 0920afc."""

from __future__ import annotations

import glob
import os
import subprocess
from pathlib import Path

import pytest

from uvkerneld.uv import find_uv

REPO = Path(__file__).resolve().parent.parent


def test_bug_the_daemon_and_the_notebook_commands_import_on_python_310(tmp_path: Path) -> None:
    uv = find_uv(None)
    env = dict(os.environ, UV_PYTHON_DOWNLOADS="never")
    if os.environ.get("UVKERNELD_TEST_CACHE"):
        env["UV_CACHE_DIR"] = os.environ["UVKERNELD_TEST_CACHE"]
    found = subprocess.run([uv, "python", "find", "3.10"], capture_output=True, text=True, env=env,
                           timeout=60)
    # pyenv's versions are not on uv's search path unless selected: look there too.
    candidates = ([found.stdout.strip()] if found.returncode == 0 else []) + sorted(
        glob.glob(os.path.expanduser("~/.pyenv/versions/3.10*/bin/python3.10")))
    if not candidates:
        pytest.skip("no Python 3.10 on this host")
    venv = tmp_path / "py310"
    subprocess.run([uv, "venv", "--quiet", "--python", candidates[0], str(venv)],
                   check=True, env=env, timeout=120)
    # The pure-Python dependencies these modules import on 3.10 (pyproject's list for < 3.11).
    subprocess.run([uv, "pip", "install", "--quiet", "--python", str(venv / "bin" / "python"),
                    "packaging>=23", "tomli>=2.0"], check=True, env=env, timeout=300)
    result = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import uvkerneld.ops, uvkerneld.nbcommands"],
        capture_output=True, text=True, cwd=str(REPO), env=dict(env, PYTHONPATH=str(REPO)), timeout=60)
    assert result.returncode == 0, result.stderr
