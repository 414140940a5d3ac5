"""A minimal kernel that answers every cell with why the real env could not be provided.

The stub execs this (from the daemon's own environment, which has ipykernel) when the daemon is
unreachable or cannot build the notebook's env. Without it Jupyter would see the kernel die and
restart it in a loop, and the user would never see the reason.
"""

from __future__ import annotations

import os
from typing import Any

from ipykernel.ipkernel import IPythonKernel
from ipykernel.kernelapp import IPKernelApp

from . import envvars


class EnvUnavailableKernel(IPythonKernel):
    implementation = "uvkerneld-fallback"
    banner = "uvkerneld could not provide this notebook's environment."

    @property
    def reason(self) -> str:
        return os.environ.get(envvars.ERROR, "unknown error")

    async def do_execute(self, code: str, silent: bool, *args: Any, **kwargs: Any) -> dict[str, Any]:
        text = (
            "uvkerneld could not provide this notebook's Python environment:\n\n%s\n\n"
            "Fix the cause, then restart the kernel. `uvkernelctl status` shows the daemon's state."
            % self.reason
        )
        error = {"ename": "EnvironmentUnavailable", "evalue": self.reason, "traceback": [text]}
        if not silent:
            # The cell's error output, as a failed cell's: JupyterLab, nbclient and papermill all
            # read the reason from it (a stderr stream alone left papermill's message empty).
            self.send_response(self.iopub_socket, "error", error)
        return {"status": "error", "execution_count": self.execution_count, **error}


def main() -> None:
    IPKernelApp.launch_instance(kernel_class=EnvUnavailableKernel)


if __name__ == "__main__":
    main()
