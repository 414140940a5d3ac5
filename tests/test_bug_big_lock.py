"""Review of issue 11: a notebook whose uv.lock is larger than the protocol's 1 MiB frame. Real locks
reach that: `uv lock --script` of 25 common data-science packages (torch, tensorflow, jax, pandas,
jupyterlab, ...) writes 1.25 MB. Fails on 0920afc: the stub and `uvkernelctl sync` cannot send the
declaration ("message of N bytes exceeds the 1048576-byte frame limit"), so such a notebook never gets
its kernel. Here a real small lock is padded with TOML comments to that size (no big download)."""

from __future__ import annotations

import nbformat
import pytest
from helpers import Daemon, Layout
from test_nbctl import STAMP, env_with, nb_daemon, rich_notebook, run_ctl

__all__ = ["nb_daemon"]


@pytest.mark.slow
def test_bug_a_notebook_with_a_real_sized_lock_syncs(nb_daemon: Daemon, layout: Layout) -> None:
    notebook = layout.notebooks / "big-lock.ipynb"
    rich_notebook(notebook)
    env_with(layout, notebook, "iniconfig==2.0.0")
    locked = run_ctl(layout, "lock", str(notebook), "--exclude-newer", STAMP)
    assert locked.returncode == 0, locked.stderr
    parsed = nbformat.read(str(notebook), as_version=nbformat.NO_CONVERT)
    padding = "".join("# wheel entry %06d of a large lock, as long as a real wheel line's URL and hash\n" % n
                      for n in range(16000))
    parsed.metadata["uv.lock"] = parsed.metadata["uv.lock"] + padding  # ~1.3 MB, still a valid lock
    nbformat.write(parsed, str(notebook))

    result = run_ctl(layout, "sync", str(notebook))
    assert "frame limit" not in result.stderr, result.stderr
    assert result.returncode == 0, result.stderr
