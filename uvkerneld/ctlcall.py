"""How uvkernelctl talks to the daemon and fails: exit codes, CtlError, one request helper, and
what it reads from a venv as the user. Shared by ctl and nbcommands (which must not import ctl:
ctl imports it for its parser).

Exit status: 0 ok; 1 the daemon is not running (or what answers is not the daemon); 2 bad usage or
bad input; 3 not allowed; 4 not found; 5 the daemon failed the request; 6 doctor found a FAIL (or a
notebook's drift).
"""

from __future__ import annotations

from typing import Any

from . import client, protocol, venvfiles

EXIT_OK = 0
EXIT_NOT_RUNNING = 1
EXIT_USAGE = 2
EXIT_NOT_ALLOWED = 3
EXIT_NOT_FOUND = 4
EXIT_DAEMON_ERROR = 5
EXIT_CHECK_FAILED = 6  # doctor: at least one check FAILed; deps --check / doctor NOTEBOOK: drift

_EXIT_BY_CODE = {
    "not_allowed": EXIT_NOT_ALLOWED,
    "not_found": EXIT_NOT_FOUND,
    "bad_request": EXIT_USAGE,
    "bad_declaration": EXIT_USAGE,  # the notebook's declaration: the user's input
}


class CtlError(Exception):
    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def request(socket_path: str, op: str, args: dict[str, Any] | None = None,
            on_event: Any = None, timeout: float | None = 60.0) -> dict[str, Any]:
    try:
        sock = client.connect(socket_path, timeout)
        try:
            return client.call(sock, op, args, timeout, on_event=on_event)
        finally:
            sock.close()
    except client.DaemonNotRunning as exc:
        raise CtlError(str(exc), EXIT_NOT_RUNNING) from None
    except protocol.UvkError as exc:
        raise CtlError(exc.message, _EXIT_BY_CODE.get(exc.code, EXIT_DAEMON_ERROR)) from None
    except client.UntrustedDaemon as exc:
        raise CtlError(str(exc), EXIT_NOT_RUNNING) from None
    except OSError as exc:
        raise CtlError(
            "talking to uvkerneld at %s failed: %s" % (socket_path, exc), EXIT_DAEMON_ERROR) from None


def venv_python_version(venv: str) -> str:
    """The venv's Python version for a table; '?' when the venv is gone or half-made."""
    return venvfiles.pyvenv_version(venv) or "?"
