"""The ``pip``/``pip3``/``uv`` commands inside a notebook's venv. Standard library only.

The shim validates the command (refusing flags that would escape the env), reads any -r/-c
files as the user, sends the command to uvkerneld, prints uv's output as it streams back, and
exits with uv's exit status. If the daemon cannot be reached it says so and installs nothing:
there is no fallback to another environment.
"""

import json
import os
import sys

from . import client, envvars, locations, pipargs, protocol

EXIT_USAGE = 2
EXIT_NO_DAEMON = 1


def _error(program, message, status):
    sys.stderr.write("%s: error: %s\n" % (program, message))
    sys.stderr.flush()
    return status


def _absolute_local_paths(argv, command, cwd):
    """The daemon runs elsewhere: local paths (./pkg, -e .) become absolute, as the user meant."""
    local = set(command.local_paths)
    resolved = []
    for arg in argv:
        if arg in local and not arg.startswith("file:") and "://" not in arg:
            arg = os.path.abspath(os.path.join(cwd, os.path.expanduser(arg)))
        resolved.append(arg)
    return resolved


def main(program, venv, argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if program == "uv":
        if argv[:1] in (["--version"], ["-V"], ["version"]):
            sys.stdout.write("uv, managed by uvkerneld for this env (only `uv pip ...` is available here)\n")
            return 0
        if argv[:1] != ["pip"]:
            return _error(
                "uv", "only `uv pip install|uninstall|list|freeze|show` is available in a uvkerneld "
                "kernel; this notebook's env is managed by uvkerneld", EXIT_USAGE,
            )
        argv = argv[1:]
        program = "uv pip"
    try:
        command = pipargs.parse_command(argv)
        files = [pipargs.read_requirements_file(name) for _, name in command.files]
        for text in files:
            pipargs.parse_requirements_text(text)  # the daemon checks again; this says it sooner
        argv = _absolute_local_paths(argv, command, os.getcwd())
    except pipargs.PipUsageError as exc:
        return _error(program, str(exc), EXIT_USAGE)
    socket_path = locations.socket_path_from_env()
    try:
        sock = client.connect(socket_path)
    except client.DaemonNotRunning as exc:
        return _error(
            program, "cannot reach uvkerneld, so nothing was installed: %s Restart the kernel "
            "(it starts the daemon) or run `uvkernelctl status` to check." % exc, EXIT_NO_DAEMON,
        )
    except client.UntrustedDaemon as exc:
        return _error(program, "nothing was installed: %s" % exc, EXIT_NO_DAEMON)

    def print_line(name, data):
        if name == "output":
            sys.stdout.write("%s\n" % data)
            sys.stdout.flush()

    try:
        result = client.call(sock, "pip", {"env": venv, "argv": argv, "files": files}, on_event=print_line)
    except protocol.ClientFault as exc:
        return _error(program, exc.message, EXIT_USAGE)
    except protocol.UvkError as exc:
        return _error(program, exc.message, EXIT_NO_DAEMON)
    except OSError as exc:
        return _error(program, "lost the connection to uvkerneld: %s" % exc, EXIT_NO_DAEMON)
    finally:
        sock.close()
    report = os.environ.get(envvars.CHANGES_FILE)
    if report:
        try:
            with open(report, "w") as handle:
                json.dump(result.get("changed", {}), handle)
        except OSError:
            pass
    return int(result.get("exit_status", 1))
