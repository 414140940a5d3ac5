"""A real jupyter_server on loopback: sessions made through its REST API get their own venvs.

This is the check that JPY_SESSION_NAME is used the way the server really sets it.
"""

from __future__ import annotations

import os

import pytest
from helpers import Daemon, Layout
from jupyter_rest import JupyterServer, kernel_facts


@pytest.mark.slow
def test_sessions_for_two_notebooks_run_in_their_own_venvs(
    daemon: Daemon, layout: Layout, server: JupyterServer
) -> None:
    layout.notebook("project/analysis.ipynb")
    layout.notebook("other/analysis.ipynb")  # same file name, another folder: another env
    facts = {}
    for path in ("project/analysis.ipynb", "other/analysis.ipynb"):
        session = server.api("POST", "/api/sessions", {
            "path": path, "name": os.path.basename(path), "type": "notebook", "kernel": {"name": "uv"},
        })
        facts[path] = kernel_facts(server, session["kernel"]["id"])
    for path, fact in facts.items():
        absolute = str(layout.notebooks / path)
        assert fact["session"] == absolute  # what jupyter_server really sets
        assert fact["cwd"] == os.path.dirname(absolute)
        assert fact["prefix"].startswith(str(layout.venvs_dir) + os.sep)
    assert facts["project/analysis.ipynb"]["prefix"] != facts["other/analysis.ipynb"]["prefix"]
    envs = layout.request("list", {"all": True})["envs"]
    for path, fact in facts.items():
        key = {"kind": "notebook", "value": str(layout.notebooks / path)}
        assert [env["path"] for env in envs if env["key"] == key] == [fact["prefix"]]
    # Restarting through the server keeps each notebook's venv.
    sessions = server.api("GET", "/api/sessions")
    target = next(s for s in sessions if s["path"] == "project/analysis.ipynb")
    server.api("POST", "/api/kernels/%s/restart" % target["kernel"]["id"])
    again = kernel_facts(server, target["kernel"]["id"])
    assert again["prefix"] == facts["project/analysis.ipynb"]["prefix"]
