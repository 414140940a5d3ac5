"""``uvkernelctl``: see and control the daemon. Only this module prints and exits.

Exit status: 0 ok; 1 the daemon is not running; 2 bad usage or bad input; 3 not allowed;
4 not found; 5 the daemon failed the request.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Sequence

from . import __version__, client, locations, protocol
from .config import LINK_MODES

EXIT_OK = 0
EXIT_NOT_RUNNING = 1
EXIT_USAGE = 2
EXIT_NOT_ALLOWED = 3
EXIT_NOT_FOUND = 4
EXIT_DAEMON_ERROR = 5

_EXIT_BY_CODE = {
    "not_allowed": EXIT_NOT_ALLOWED,
    "not_found": EXIT_NOT_FOUND,
    "bad_request": EXIT_USAGE,
}


class CtlError(Exception):
    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="uvkernelctl",
        description="Inspect and control uvkerneld, the per-notebook venv daemon.",
        epilog="exit status: 0 ok, 1 daemon not running, 2 bad usage or input, 3 not allowed, "
        "4 not found, 5 the daemon failed the request",
    )
    parser.add_argument("--version", action="version", version="uvkernelctl " + __version__)
    parser.add_argument(
        "--socket", metavar="PATH",
        help="daemon socket (default: $UVKERNELD_SOCKET, else the user-mode default)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    status = commands.add_parser("status", help="what the daemon is doing (never starts one)")
    status.add_argument("--json", action="store_true", help="one JSON object, for machines")

    spec = commands.add_parser("install-kernelspec", help="register the uv kernel with Jupyter")
    where = spec.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true", help="for this user (the default)")
    where.add_argument("--sys-prefix", action="store_true", help="into sys.prefix (this venv/conda env)")
    where.add_argument("--prefix", metavar="P", help="under prefix P (P/share/jupyter/kernels)")
    spec.add_argument("--name", default="uv", help="kernelspec name (default: uv)")
    spec.add_argument("--display-name", default="Python 3 (uv, per notebook)", help="name shown in Jupyter")
    spec.add_argument("--socket", dest="spec_socket", metavar="PATH", help="daemon socket the kernel uses")
    spec.add_argument("--cache-dir", metavar="DIR", help="uv cache for a daemon this kernel starts")
    spec.add_argument("--venvs-dir", metavar="DIR", help="venvs dir for a daemon this kernel starts")
    spec.add_argument("--link-mode", choices=LINK_MODES, help="uv link mode for a daemon this kernel starts")

    units = commands.add_parser("install-systemd", help="install the systemd socket and service units")
    units.add_argument("--user", action="store_true", help="user units (systemctl --user), else system units")
    units.add_argument("--prefix", metavar="DIR", help="write under DIR instead of / (or ~/.config with --user)")

    try_kernel = commands.add_parser(
        "try", help="start a kernel from the installed kernelspec, run code in it, stop it"
    )
    try_kernel.add_argument("--kernel", default="uv", help="kernelspec name (default: uv)")
    try_kernel.add_argument("--notebook", metavar="PATH", help="run as this notebook (default: scratch env of cwd)")
    try_kernel.add_argument(
        "--code", default="import sys; print('python', sys.version.split()[0], 'in', sys.prefix)",
        help="code to run",
    )
    try_kernel.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for the kernel")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    socket_path = args.socket or locations.socket_path_from_env()
    try:
        if args.command == "status":
            return cmd_status(socket_path, args.json)
        if args.command == "install-kernelspec":
            return cmd_install_kernelspec(args)
        if args.command == "try":
            return cmd_try(args)
        if args.command == "install-systemd":
            return cmd_install_systemd(args)
    except CtlError as exc:
        print("uvkernelctl: %s" % exc, file=sys.stderr)
        return exc.exit_code
    raise AssertionError(args.command)  # pragma: no cover - argparse enforces the choices


def _request(socket_path: str, op: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
    try:
        return client.request(socket_path, op, args)
    except client.DaemonNotRunning as exc:
        raise CtlError(str(exc), EXIT_NOT_RUNNING) from None
    except protocol.UvkError as exc:
        raise CtlError(exc.message, _EXIT_BY_CODE.get(exc.code, EXIT_DAEMON_ERROR)) from None
    except OSError as exc:
        raise CtlError("talking to uvkerneld at %s failed: %s" % (socket_path, exc), EXIT_DAEMON_ERROR) from None


def cmd_status(socket_path: str, as_json: bool) -> int:
    status = _request(socket_path, "status")
    if as_json:
        print(json.dumps(status, indent=1, sort_keys=True))
        return EXIT_OK
    print(format_status(status))
    return EXIT_OK


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, seconds = divmod(seconds, 86400)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    parts = [(days, "d"), (hours, "h"), (minutes, "m"), (seconds, "s")]
    text = " ".join("%d%s" % (n, unit) for n, unit in parts if n)
    return text or "0s"


def format_status(status: dict[str, Any]) -> str:
    pool = status["pool"]
    envs = status["envs"]
    started = status.get("kernels_started", {})
    paths = status.get("paths", {})
    rows = [
        ("daemon", "uvkerneld %s, %s mode, pid %s, up %s" % (
            status["version"], status["mode"], status.get("pid"), _duration(status.get("uptime_s", 0)))),
        ("socket", status["socket"]),
        ("pool", "%d ready / %d target%s" % (
            pool["ready"], pool["target"], ", filling %d" % pool["filling"] if pool.get("filling") else "")),
        ("envs", "%d total, %d with a live kernel, %d broken" % (envs["total"], envs["live"], envs["broken"])),
        ("kernels", "%d known, %d from the pool, %d built on demand" % (
            started.get("known", 0), started.get("pool", 0), started.get("created", 0))),
        ("venvs", paths.get("venvs_dir", "?")),
        ("uv cache", paths.get("cache_dir", "?")),
    ]
    if pool.get("last_error"):
        rows.append(("pool error", pool["last_error"].splitlines()[0]))
    if status.get("link_fallback_seen"):
        rows.append(("warning", "uv copied files instead of linking: cache and venvs on different filesystems?"))
    for error in status.get("errors", [])[-3:]:
        rows.append(("error", "%s %s" % (
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(error["time"])),
            str(error["message"]).splitlines()[0])))
    width = max(len(label) for label, _ in rows)
    return "\n".join("%-*s  %s" % (width, label, value) for label, value in rows)


def cmd_install_kernelspec(args: argparse.Namespace) -> int:
    from .kernelspec import KernelspecError, install

    prefix = sys.prefix if args.sys_prefix else args.prefix
    try:
        destination = install(
            name=args.name,
            user=not prefix,
            prefix=prefix,
            display_name=args.display_name,
            socket=args.spec_socket or args.socket,
            cache_dir=args.cache_dir,
            venvs_dir=args.venvs_dir,
            link_mode=args.link_mode,
        )
    except KernelspecError as exc:
        raise CtlError(str(exc), EXIT_USAGE) from None
    except OSError as exc:
        raise CtlError("cannot write the kernelspec: %s" % exc, EXIT_USAGE) from None
    print("installed kernelspec %r (%s) in %s" % (args.name, args.display_name, destination))
    return EXIT_OK


def cmd_install_systemd(args: argparse.Namespace) -> int:
    from .systemd_units import SystemdInstallError, install

    try:
        written = install(user=args.user, prefix=args.prefix)
    except SystemdInstallError as exc:
        raise CtlError(str(exc), EXIT_USAGE) from None
    except OSError as exc:
        raise CtlError("cannot write the units: %s" % exc, EXIT_USAGE) from None
    for path in written:
        print("wrote %s" % path)
    if args.user:
        print("next: systemctl --user enable --now uvkerneld.socket")
    else:
        print("next: systemctl enable --now uvkerneld.socket")
    return EXIT_OK


def cmd_try(args: argparse.Namespace) -> int:
    """Start a kernel exactly as Jupyter would (jupyter_client, installed kernelspec), run code."""
    from jupyter_client.kernelspec import NoSuchKernel
    from jupyter_client.manager import KernelManager

    env = dict(os.environ)
    if args.socket:
        env[locations.SOCKET_ENV] = args.socket
    if args.notebook:
        env["UVKERNEL_NOTEBOOK"] = os.path.abspath(args.notebook)
    manager = KernelManager(kernel_name=args.kernel)
    try:
        manager.kernel_spec  # noqa: B018 - resolves the spec so a missing one fails here
    except NoSuchKernel:
        raise CtlError(
            "no kernelspec named %r: run `uvkernelctl install-kernelspec` first" % args.kernel, EXIT_NOT_FOUND
        ) from None
    started = time.monotonic()
    manager.start_kernel(env=env)
    kernel = manager.client()
    kernel.start_channels()
    try:
        kernel.wait_for_ready(timeout=args.timeout)
        print("kernel %r ready in %.2f s" % (args.kernel, time.monotonic() - started), file=sys.stderr)
        outputs: list[str] = []
        failed: list[str] = []

        def on_output(message: dict[str, Any]) -> None:
            content = message["content"]
            if message["msg_type"] == "stream":
                outputs.append(content["text"])
            elif message["msg_type"] in ("execute_result", "display_data"):
                outputs.append(content["data"].get("text/plain", "") + "\n")
            elif message["msg_type"] == "error":
                failed.append("\n".join(content["traceback"]))

        reply = kernel.execute_interactive(args.code, timeout=args.timeout, output_hook=on_output)
        sys.stdout.write("".join(outputs))
        if reply["content"]["status"] != "ok":
            raise CtlError("the code failed in the kernel:\n%s" % "\n".join(failed), EXIT_DAEMON_ERROR)
    finally:
        kernel.stop_channels()
        manager.shutdown_kernel(now=False)
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
