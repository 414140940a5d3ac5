"""Writing the kernelspec that makes Jupyter launch the kernel stub."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from . import envvars

DEFAULT_NAME = "uv"
DEFAULT_DISPLAY_NAME = "Python 3 (uv, per notebook)"
_VALID_NAME = re.compile(r"^[a-z0-9._-]+$", re.IGNORECASE)


class KernelspecError(Exception):
    pass


def stub_entry_point() -> str:
    """The stub's ``__main__.py``, run as a path with ``-I -S`` (see kernel_stub/__main__.py for why)."""
    import kernel_stub

    return os.path.join(os.path.dirname(os.path.abspath(kernel_stub.__file__)), "__main__.py")


def kernel_json(
    display_name: str = DEFAULT_DISPLAY_NAME,
    socket: str | None = None,
    cache_dir: str | None = None,
    venvs_dir: str | None = None,
    link_mode: str | None = None,
    python: str | None = None,
    daemon_user: str | None = None,
) -> dict[str, object]:
    # argv[0] must be an absolute path: jupyter_client swaps a bare "python"/"python3" for its own
    # interpreter, which may not be the one uvkerneld is installed in. Not realpath: if we are in a
    # venv, its bin/python symlink is what keeps that venv's site-packages.
    interpreter = os.path.abspath(python or sys.executable)
    env: dict[str, str] = {}
    for variable, value in (
        (envvars.SOCKET, socket),
        (envvars.CACHE_DIR, cache_dir),
        (envvars.VENVS_DIR, venvs_dir),
        (envvars.LINK_MODE, link_mode),
        (envvars.DAEMON_USER, daemon_user),
    ):
        if value:
            env[variable] = os.path.abspath(value) if variable.endswith(("_SOCKET", "_DIR")) else value
    spec: dict[str, object] = {
        "argv": [interpreter, "-I", "-S", stub_entry_point(), "-f", "{connection_file}"],
        "display_name": display_name,
        "language": "python",
        "interrupt_mode": "signal",
        "metadata": {"debugger": True, "uvkerneld": {"per_notebook_env": True}},
    }
    if env:
        spec["env"] = env
    return spec


def install(
    name: str = DEFAULT_NAME,
    user: bool = False,
    prefix: str | None = None,
    display_name: str = DEFAULT_DISPLAY_NAME,
    **spec_options: str | None,
) -> str:
    """Install the kernelspec; returns the directory it was written to."""
    if not _VALID_NAME.match(name):
        raise KernelspecError(
            "kernel name %r is not valid: use letters, digits, '.', '_' and '-' only" % name
        )
    from jupyter_client.kernelspec import KernelSpecManager

    spec = kernel_json(display_name, **spec_options)
    with tempfile.TemporaryDirectory() as staging:
        with open(os.path.join(staging, "kernel.json"), "w") as handle:
            json.dump(spec, handle, indent=1)
            handle.write("\n")
        _copy_logos(Path(staging))
        return KernelSpecManager().install_kernel_spec(
            staging, kernel_name=name, user=user, prefix=prefix, replace=True
        )


def _copy_logos(target: Path) -> None:
    try:
        from ipykernel.kernelspec import RESOURCES
    except ImportError:  # pragma: no cover
        return
    for entry in Path(RESOURCES).iterdir():
        if entry.name.startswith("logo"):
            shutil.copy(entry, target / entry.name)
