"""``uvkernelctl``: see and control the daemon. Only this module prints and exits.

Exit status: 0 ok; 1 the daemon is not running (or what answers is not the daemon); 2 bad usage or
bad input; 3 not allowed; 4 not found; 5 the daemon failed the request; 6 doctor found a FAIL
(or a notebook's drift).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from . import __version__, client, envid, envvars, gc, locations, nbcommands
from .config import LINK_MODES

# The exit codes, CtlError and the request helper live in ctlcall so that nbcommands (the NOTEBOOK
# commands) can use them without importing this module (no import cycle).
from .ctlcall import (  # noqa: F401 - EXIT_* are part of this module's interface (tests, docs)
    EXIT_CHECK_FAILED,
    EXIT_DAEMON_ERROR,
    EXIT_NOT_ALLOWED,
    EXIT_NOT_FOUND,
    EXIT_NOT_RUNNING,
    EXIT_OK,
    EXIT_USAGE,
    CtlError,
    venv_python_version,
)
from .ctlcall import request as _request
from .units import format_bytes, format_duration


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="uvkernelctl",
        description="Inspect and control uvkerneld, the per-notebook venv daemon.",
        epilog="exit status: 0 ok, 1 daemon not running, 2 bad usage or input, 3 not allowed, "
        "4 not found, 5 the daemon failed the request, 6 doctor found a FAIL or deps --check drift",
    )
    parser.add_argument("--version", action="version", version="uvkernelctl " + __version__)
    parser.add_argument(
        "--socket", metavar="PATH",
        help="daemon socket (default: $%s, else the user-mode default)" % envvars.SOCKET,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    status = commands.add_parser("status", help="what the daemon is doing (never starts one)")
    status.add_argument("--json", action="store_true", help="one JSON object, for machines")

    listing = commands.add_parser("list", help="one row per env: notebook, owner, disk, live kernel, state")
    listing.add_argument("--all", action="store_true", help="every user's envs (root / admin group)")
    listing.add_argument("--json", action="store_true")

    show = commands.add_parser("show", help="an env's path, requirements and `uv pip freeze`")
    show.add_argument(
        "target", metavar="NOTEBOOK|KEY", help="notebook path, folder, env name or env id (e-...)")
    show.add_argument("--json", action="store_true")

    export = commands.add_parser("export", help="pinned requirements of a notebook's env (uv pip freeze)")
    export.add_argument("target", metavar="NOTEBOOK|KEY")

    remove = commands.add_parser("rm", help="delete an env (never one with a running kernel)")
    remove.add_argument("target", metavar="NOTEBOOK|KEY")

    gc = commands.add_parser("gc", help="remove unused and orphaned envs, then prune the uv cache")
    gc.add_argument(
        "--older-than", metavar="DURATION",
        help="unused for this long, e.g. 30d, 12h, 0s (default: config gc_older_than, 30d)")
    gc.add_argument(
        "--orphans", action="store_true", help="also envs whose notebook or folder no longer exists")
    gc.add_argument("--dry-run", action="store_true", help="show what would go, remove nothing")
    gc.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    gc.add_argument("--all", action="store_true", help="every user's envs (root / admin group)")
    gc.add_argument("--json", action="store_true")

    pool = commands.add_parser("pool", help="show or resize the warm pool, optionally wait for it to fill")
    pool.add_argument("--size", type=int, metavar="N", help="new target (until the daemon restarts)")
    pool.add_argument("--fill", action="store_true", help="start filling now")
    pool.add_argument("--wait", action="store_true", help="with --fill: show progress until the pool is full")
    pool.add_argument("--timeout", type=float, default=900.0, help="seconds to wait (default 900)")

    doctor = commands.add_parser(
        "doctor", help="check the setup (or, given NOTEBOOK, its drift); exit 0 only when nothing FAILs")
    doctor.add_argument("notebook", metavar="NOTEBOOK", nargs="?",
                        help="report this notebook's drift, as `deps` does")
    doctor.add_argument("--kernel", default="uv", help="kernelspec name to check (default: uv)")
    doctor.add_argument("--json", action="store_true")

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
    spec.add_argument("--daemon-user", metavar="USER",
                      help="user (name or uid) the system daemon runs as; kernels trust no other "
                      "(besides themselves and root). Default: the account uvkerneld, if it exists")

    units = commands.add_parser("install-systemd", help="install the systemd socket and service units")
    units.add_argument("--user", action="store_true", help="user units (systemctl --user), else system units")
    units.add_argument(
        "--prefix", metavar="DIR", help="write under DIR instead of / (or ~/.config with --user)")

    nbcommands.add_parsers(commands)  # deps, lock, sync NOTEBOOK

    try_kernel = commands.add_parser(
        "try", help="start a kernel from the installed kernelspec, run code in it, stop it"
    )
    try_kernel.add_argument("--kernel", default="uv", help="kernelspec name (default: uv)")
    try_kernel.add_argument(
        "--notebook", metavar="PATH", help="run as this notebook (default: scratch env of cwd)")
    try_kernel.add_argument(
        "--code", default="import sys; print('python', sys.version.split()[0], 'in', sys.prefix)",
        help="code to run",
    )
    try_kernel.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for the kernel")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    socket_path = args.socket or locations.socket_path_from_env()
    handlers = {
        "status": lambda: cmd_status(socket_path, args.json),
        "install-kernelspec": lambda: cmd_install_kernelspec(args),
        "install-systemd": lambda: cmd_install_systemd(args),
        "try": lambda: cmd_try(args),
        "list": lambda: cmd_list(socket_path, args),
        "show": lambda: cmd_show(socket_path, args),
        "export": lambda: cmd_export(socket_path, args),
        "rm": lambda: cmd_rm(socket_path, args),
        "gc": lambda: cmd_gc(socket_path, args),
        "pool": lambda: cmd_pool(socket_path, args),
        "doctor": lambda: cmd_doctor(socket_path, args),
        "deps": lambda: nbcommands.cmd_deps(socket_path, args),
        "lock": lambda: nbcommands.cmd_lock(socket_path, args),
        "sync": lambda: nbcommands.cmd_sync(socket_path, args),
    }
    try:
        exit_code = handlers[args.command]()
        sys.stdout.flush()  # a closed pipe shows up here, where it can be handled
        return exit_code
    except CtlError as exc:
        print("uvkernelctl: %s" % exc, file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:
        # `uvkernelctl export x | head`: the reader left. Point stdout at /dev/null so the
        # interpreter's final flush does not raise again, and exit like a SIGPIPE'd tool would.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def cmd_status(socket_path: str, as_json: bool) -> int:
    status = _request(socket_path, "status")
    if as_json:
        print(json.dumps(status, indent=1, sort_keys=True))
        return EXIT_OK
    print(format_status(status))
    return EXIT_OK


def _ago(timestamp: float | None) -> str:
    if not timestamp:
        return "never"
    return format_duration(time.time() - timestamp) + " ago"


def format_status(status: dict[str, Any]) -> str:
    pool = status["pool"]
    envs = status["envs"]
    started = status.get("kernels_started", {})
    paths = status.get("paths", {})
    installs = status.get("installs", {})
    disk = status.get("disk", {})
    rows = [
        ("daemon", "uvkerneld %s, %s mode, pid %s, up %s%s" % (
            status["version"], status["mode"], status.get("pid"), format_duration(status.get("uptime_s", 0)),
            ", exits after %s idle" % format_duration(paths["idle_exit_s"])
            if paths.get("idle_exit_s") else "")),
        ("socket", status["socket"]),
        ("pool", "%d ready / %d target%s%s" % (
            pool["ready"], pool["target"], ", filling %d" % pool["filling"] if pool.get("filling") else "",
            ", +%d kept after a burst" % pool["burst_extra"] if pool.get("burst_extra") else "")),
        ("envs", "%d total, %d with a live kernel, %d broken" % (
            envs["total"], envs["live"], envs["broken"])),
        ("kernels", "%d known, %d from the pool, %d built on demand, %d rebuilt%s" % (
            started.get("known", 0), started.get("pool", 0), started.get("created", 0),
            started.get("rebuilt", 0),
            ", %d after a notebook rename" % started["renamed"] if started.get("renamed") else "")),
        *([("notebooks", "watching %d folder(s) for saves and renames, %d rename(s) followed" % (
            status["notebook_watch"]["folders"], status["notebook_watch"]["renames_followed"]))]
          if status.get("notebook_watch") else []),
        ("installs", "%d running, %d queued (at most %s in parallel)" % (
            installs.get("running", 0), installs.get("queued", 0), installs.get("max_parallel", "?"))),
        *([("bytecode", "%d package(s) waiting, %d compiling, %d done (%s worker(s), idle priority)%s" % (
            status["bytecode"]["waiting"], status["bytecode"]["compiling"], status["bytecode"]["done"],
            status["bytecode"]["workers"], "; %d env(s) to link" % status["bytecode"]["envs_to_link"]
            if status["bytecode"]["envs_to_link"] else ""))] if status.get("bytecode") else []),
        ("venvs", paths.get("venvs_dir", "?")),
        ("uv cache", paths.get("cache_dir", "?")),
    ]
    if disk.get("computed_at"):
        rows.append(("disk", "%s in all: uv cache %s, venvs %s beyond it (measured %s)" % (
            format_bytes(disk["total_real_bytes"]), format_bytes(disk["cache_bytes"]),
            format_bytes(disk["venvs_beyond_cache_bytes"]), _ago(disk["computed_at"]))))
        rows.append(("dedup", "%d venvs: %s as copies (%s apparent size), %s on disk with hardlinks: %sx" % (
            disk.get("envs_scanned", 0), format_bytes(disk["venvs_linked_bytes"]),
            format_bytes(disk["venvs_apparent_bytes"]), format_bytes(disk["venvs_real_bytes"]),
            disk.get("dedup_ratio") or "-")))
    else:
        rows.append(("disk", "not measured yet"))
    if pool.get("last_error"):
        rows.append(("pool error", pool["last_error"].splitlines()[0]))
    if status.get("link_fallback_seen"):
        rows.append((
            "warning", "uv copied files instead of linking: cache and venvs on different filesystems?"))
    for full in status.get("disk_full", []):
        rows.append(("disk full", "%s: %s free, a venv build needs about %s" % (
            full["folder"], format_bytes(full["free_bytes"]), format_bytes(full["needed_bytes"]))))
    if status.get("quarantine"):
        rows.append(("quarantine", "%d unknown dir(s) moved aside, never deleted: %s" % (
            len(status["quarantine"]), ", ".join(status["quarantine"]))))
    for error in status.get("errors", [])[-3:]:
        rows.append(("error", "%s %s" % (
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(error["time"])),
            str(error["message"]).splitlines()[0])))
    width = max(len(label) for label, _ in rows)
    return "\n".join("%-*s  %s" % (width, label, value) for label, value in rows)


def target_args(text: str) -> dict[str, Any]:
    """What NOTEBOOK|KEY names: an env id, a notebook path, a folder, or an env name."""
    if envid.is_env_id(text):
        return {"env_id": text}
    path = os.path.expanduser(text)
    if text.endswith(".ipynb") or os.path.isfile(path):
        return {"key": {"kind": "notebook", "value": os.path.realpath(path)}}
    if os.path.isdir(path) or "/" in text:
        return {"key": {"kind": "dir", "value": os.path.realpath(path)}}
    return {"key": {"kind": "env", "value": text}}


def _key_label(key: dict[str, str] | None) -> str:
    if not key:
        return "-"
    if key["kind"] == "notebook":
        return key["value"]
    return "%s:%s" % (key["kind"], key["value"])


def cmd_list(socket_path: str, args: argparse.Namespace) -> int:
    result = _request(socket_path, "list", {"all": args.all})
    if args.json:
        print(json.dumps(result["envs"], indent=1))
        return EXIT_OK
    rows = [("NOTEBOOK / KEY", "OWNER", "PYTHON", "REQS", "DISK", "LAST USED", "LIVE", "STATE")]
    for env in result["envs"]:
        rows.append((
            _key_label(env["key"]), str(env["owner_uid"]), venv_python_version(env["path"]),
            str(env["requirements"]), format_bytes(env["disk_bytes"]), _ago(env["last_used_at"]),
            "yes" if env["live"] else "no", env["state"],
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    if not result["envs"]:
        print("(no envs yet: open a notebook with the uv kernel)")
    return EXIT_OK


def cmd_show(socket_path: str, args: argparse.Namespace) -> int:
    env = _request(socket_path, "show", target_args(args.target), timeout=300)
    if args.json:
        print(json.dumps(env, indent=1))
        return EXIT_OK
    print("env          %s (%s)" % (env["env_id"], env["state"]))
    print("notebook/key %s" % _key_label(env["key"]))
    print("path         %s" % env["path"])
    print("owner uid    %s, last used %s, live kernel: %s" % (
        env["owner_uid"], _ago(env["last_used_at"]), "yes" if env["live"] else "no"))
    print("disk         %s (%s not shared with other envs or the cache)" % (
        format_bytes(env["disk_bytes"]), format_bytes(env["unshared_bytes"])))
    print("requested    %s" % (", ".join(env["requirement_list"]) or "(nothing beyond the kernel)"))
    print("installed (uv pip freeze):")
    for line in env["freeze"]:
        print("  " + line)
    return EXIT_OK


def cmd_export(socket_path: str, args: argparse.Namespace) -> int:
    env = _request(socket_path, "show", target_args(args.target), timeout=300)
    print("# pinned from %s (env %s) by uvkernelctl export" % (_key_label(env["key"]), env["env_id"]))
    for line in env["freeze"]:
        print(line)
    return EXIT_OK


def cmd_rm(socket_path: str, args: argparse.Namespace) -> int:
    result = _request(socket_path, "remove", target_args(args.target), timeout=300)
    print("removed %s, freed %s" % (result["env_id"], format_bytes(result["freed_bytes"])))
    return EXIT_OK


def cmd_gc(socket_path: str, args: argparse.Namespace) -> int:
    from .config import ConfigError, load_config, parse_duration

    try:
        older_than = parse_duration(args.older_than) if args.older_than else load_config().gc_older_than
    except (ValueError, ConfigError) as exc:
        raise CtlError(str(exc), EXIT_USAGE) from None
    orphans: list[str] = []
    renamed: list[dict[str, Any]] = []
    if args.orphans:
        # We check paths here, as the user: a system daemon never reads users' files.
        envs = [env for env in _request(socket_path, "list", {"all": args.all})["envs"] if env["key"]]
        orphans, renamed_to = gc.find_orphans(
            (env["env_id"], env["key"]["kind"], env["key"]["value"], env.get("notebook_file")) for env in envs
        )
        renamed = [{"env_id": env["env_id"], "key": env["key"], "now_at": renamed_to[env["env_id"]]}
                   for env in envs if env["env_id"] in renamed_to]
    request = {"older_than_s": older_than, "env_ids": orphans, "all": args.all}
    preview = _request(socket_path, "gc", dict(request, dry_run=True), timeout=600)
    preview["kept_renamed"] = renamed
    if args.dry_run:
        _print_gc(preview, args.json)
        return EXIT_OK
    if preview["removed"] and not args.yes:
        if not sys.stdin.isatty():
            raise CtlError("gc would remove %d env(s); add --yes to do it, or --dry-run to list them"
                           % len(preview["removed"]), EXIT_USAGE)
        _print_gc(preview, False)
        answer = input("remove these %d env(s)? [y/N] " % len(preview["removed"]))
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing removed")
            return EXIT_OK
    result = _request(socket_path, "gc", dict(request, dry_run=False), timeout=None,
                      on_event=None if args.json else lambda name, line: print(line, flush=True))
    result["kept_renamed"] = renamed
    _print_gc(result, args.json, already_streamed=not args.json)
    return EXIT_OK


def _print_gc(result: dict[str, Any], as_json: bool, already_streamed: bool = False) -> None:
    if as_json:
        print(json.dumps(result, indent=1))
        return
    verb = "would remove" if result["dry_run"] else "removed"
    if not already_streamed:
        for entry in result["removed"]:
            print("%s %s (%s): %s, %s" % (verb, entry["env_id"], _key_label(entry["key"]), entry["reason"],
                                          format_bytes(entry["freed_bytes"])))
    for entry in result["kept_live"]:
        print("kept %s (%s): a kernel is running in it" % (entry["env_id"], _key_label(entry["key"])))
    for entry in result.get("kept_renamed", []):
        print("kept %s (%s): the notebook was renamed to %s; its env moves there at its next kernel start"
              % (entry["env_id"], _key_label(entry["key"]), entry["now_at"]))
    print("%s %d env(s), %s %s" % (
        verb, len(result["removed"]), "would free" if result["dry_run"] else "freed",
        format_bytes(result["freed_bytes"])))


def cmd_pool(socket_path: str, args: argparse.Namespace) -> int:
    pool = _request(socket_path, "pool", {"size": args.size})
    if args.fill and args.wait:
        deadline = time.monotonic() + args.timeout
        last = None
        while True:
            line = "pool: %d/%d ready%s" % (
                pool["ready"], pool["target"], ", building %d" % pool["filling"] if pool["filling"] else "")
            if line != last:
                print(line, flush=True)
                last = line
            # Exactly: shrinking waits until the extra venvs are gone (a burst may keep some).
            if pool["ready"] == pool["target"] + pool.get("burst_extra", 0) and not pool["filling"]:
                break
            if pool.get("last_error"):
                raise CtlError(
                    "the pool cannot fill: %s" % pool["last_error"].splitlines()[0], EXIT_DAEMON_ERROR)
            if time.monotonic() > deadline:
                raise CtlError("pool not full after %.0f s" % args.timeout, EXIT_DAEMON_ERROR)
            time.sleep(0.5)
            pool = _request(socket_path, "pool", {"size": None})
        return EXIT_OK
    print("pool: %d/%d ready%s" % (
        pool["ready"], pool["target"], ", building %d" % pool["filling"] if pool["filling"] else ""))
    return EXIT_OK


def cmd_doctor(socket_path: str, args: argparse.Namespace) -> int:
    if args.notebook:
        return nbcommands.cmd_doctor_notebook(socket_path, args)
    from .config import ConfigError, load_config
    from .doctor import FAIL, checks_json, format_checks, run_checks

    status = None
    error = None
    try:
        status = _request(socket_path, "status")
    except CtlError as exc:
        error = str(exc)
    if status is not None:
        settings = status["paths"]
    else:
        try:
            settings = load_config().public_summary()
        except ConfigError as exc:
            raise CtlError(str(exc), EXIT_USAGE) from None
    checks = run_checks(status, settings, args.kernel, error)
    print(checks_json(checks) if args.json else format_checks(checks))
    return EXIT_CHECK_FAILED if any(check.verdict == FAIL for check in checks) else EXIT_OK


def cmd_install_kernelspec(args: argparse.Namespace) -> int:
    from .kernelspec import KernelspecError, install

    prefix = sys.prefix if args.sys_prefix else args.prefix
    daemon_user = args.daemon_user
    if daemon_user is not None and client.daemon_user({envvars.DAEMON_USER: daemon_user})[0] is None:
        raise CtlError("--daemon-user %r is neither a uid nor a user on this host; give the name or "
                       "uid the system daemon runs as" % args.daemon_user, EXIT_USAGE)
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
            daemon_user=args.daemon_user,
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
        env[envvars.SOCKET] = args.socket
    if args.notebook:
        env[envvars.NOTEBOOK] = os.path.abspath(args.notebook)
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
