"""Review of issue 11: after `uvkernelctl lock`, the ordinary juv workflow (`juv add`, `juv lock`) edits
the PEP 723 cell and uv.lock but not lock's metadata.runt.uv mirror, and the notebook no longer opens
("declare different dependencies"). The README says this happens if "you edit one by hand"; juv is
the other tool the issue asks us to round-trip with. Fails on 0920afc."""

from __future__ import annotations

import nbformat
from helpers import Daemon, Layout, ctl
from test_juv import juv, tool_env


def test_bug_juv_add_after_uvkernelctl_lock_keeps_the_notebook_usable(layout: Layout) -> None:
    daemon = Daemon(layout, "--pool-size", "0").start()
    try:
        notebook = layout.notebooks / "shared.ipynb"
        nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import iniconfig")]),
                       str(notebook))
        env = layout.request("acquire", {"key": {"kind": "notebook", "value": str(notebook)}}, timeout=300)
        installed = layout.request("pip", {"env": env["path"], "argv": ["install", "iniconfig==2.0.0"]},
                                   timeout=300)
        assert installed["exit_status"] == 0
        locked = ctl(layout, "lock", str(notebook), "--exclude-newer", "2025-06-01T00:00:00Z",
                     env=tool_env(layout))
        assert locked.returncode == 0, locked.stderr
        # A colleague who uses juv adds a package, as juv's README says.
        juv(layout, "add", "shared.ipynb", "tabulate==0.9.0")
        juv(layout, "lock", "shared.ipynb")

        synced = ctl(layout, "sync", str(notebook), env=tool_env(layout))
        assert synced.returncode == 0, synced.stderr
        assert "tabulate" in synced.stdout
    finally:
        daemon.stop()
