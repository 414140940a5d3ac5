"""IPython extension loaded in every uvkerneld kernel (copied into the venv as _uvkerneld_kernel).

``%pip ...`` and ``%uv pip ...`` run the env's ``bin/pip`` / ``bin/uv`` shims, which send the
command to uvkerneld; never ``sys.executable -m pip`` (uv venvs have no pip) and never another
environment. Output streams into the cell line by line. Afterwards, if a package that changed
was already imported, print IPython's usual restart note. The exit status is left in
``_exit_code``, as ``!cmd`` does.

Under a system daemon (which may not look into users' folders), a thread also reports the
notebook file's identity after each save, so the daemon recognises the notebook after a rename.

Standalone on purpose: the venv does not have uvkerneld installed.
"""

import json
import os
import shlex
import subprocess
import sys
import tempfile


def _imported_top_level_names(distributions):
    """Top-level modules of these distributions that are already imported in this kernel. Reads
    only these distributions' metadata: packages_distributions() reads every installed one's,
    about 0.1 s with pandas installed, on every %pip cell."""
    if not distributions:
        return []
    try:
        from importlib.metadata import distribution
    except ImportError:  # pragma: no cover - Python < 3.8
        return []
    modules = set()
    for name in distributions:
        try:
            dist = distribution(name)
            declared = dist.read_text("top_level.txt")
            if declared:
                modules.update(declared.split())
            else:
                modules.update(path.parts[0] if len(path.parts) > 1 else path.stem
                               for path in dist.files or () if path.suffix == ".py")
        except Exception:  # removed (its metadata went with it), or metadata problems: never break %pip
            continue
    return sorted(module for module in modules if module in sys.modules)


def _run_shim(shell, program, line):
    shim = os.path.join(sys.prefix, "bin", program)
    try:
        args = shlex.split(line)
    except ValueError as exc:
        print("%s: error: cannot parse the command line: %s" % (program, exc), file=sys.stderr)
        shell.user_ns["_exit_code"] = 2
        return
    imported_before = set(sys.modules)
    with tempfile.NamedTemporaryFile(prefix="uvkerneld-changes-", suffix=".json", delete=False) as report:
        report_path = report.name
    try:
        env = dict(os.environ, UVKERNEL_CHANGES_FILE=report_path, PYTHONUNBUFFERED="1")
        process = subprocess.Popen(
            [shim, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
            stdin=subprocess.DEVNULL,
        )
        assert process.stdout is not None  # stdout=PIPE
        for raw in process.stdout:
            sys.stdout.write(raw.decode("utf-8", "replace"))
            sys.stdout.flush()
        exit_status = process.wait()
        try:
            with open(report_path) as handle:
                changed = json.load(handle)
        except (OSError, ValueError):
            changed = {}
    finally:
        try:
            os.unlink(report_path)
        except OSError:
            pass
    shell.user_ns["_exit_code"] = exit_status
    touched = list(changed.get("added", [])) + list(changed.get("removed", []))
    stale = [name for name in _imported_top_level_names(touched) if name in imported_before]
    if stale:
        print("Note: you may need to restart the kernel to use updated packages.")


# How often a kernel looks at its notebook file for saves (one stat; a request only on change).
NOTEBOOK_POLL_SECONDS = 2.0


def _identity(path):
    st = os.stat(path)
    return {"dev": st.st_dev, "ino": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


class UntrustedDaemon(PermissionError):
    """What answers on the socket is not uvkerneld's uid; we tell it nothing."""


def _trusted_daemon_uids():
    """Our uid, root, and the system daemon's user (the same rule as uvkerneld.client)."""
    uids = {os.getuid(), 0}
    name = os.environ.get("UVKERNELD_DAEMON_USER", "").strip() or "uvkerneld"
    if name.isdigit():
        uids.add(int(name))
    else:
        import pwd

        try:
            uids.add(pwd.getpwnam(name).pw_uid)
        except KeyError:
            pass
    return uids


# uvkerneld's frame format, a copy of uvkerneld/protocol.py's: this module runs in the notebook's
# venv, whose Python (perhaps another version) cannot import uvkerneld. Sending is all it needs.
# tests/test_protocol.py checks these frames against protocol.py's decoder and limit.
_MAX_FRAME_SIZE = 1 << 20


def _encode_frame(message):
    """One message as a frame: a 4-byte big-endian length, then that many bytes of JSON."""
    import struct

    body = json.dumps(message).encode()
    if len(body) > _MAX_FRAME_SIZE:
        raise ValueError("message of %d bytes exceeds uvkerneld's %d-byte frame limit"
                         % (len(body), _MAX_FRAME_SIZE))
    return struct.pack(">I", len(body)) + body


def _request_frame(op, args):
    return _encode_frame({"v": 1, "id": 1, "op": op, "args": args})


def _tell_daemon(socket_path, op, args):
    """One request to uvkerneld, its reply ignored."""
    import socket
    import struct

    frame = _request_frame(op, args)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(socket_path)
        # A notebook's path and file identity go to the daemon only, never to whoever listens.
        _, uid, _ = struct.unpack("iII", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        if uid not in _trusted_daemon_uids():
            raise UntrustedDaemon(
                "refusing to use %s: the process answering there runs as uid %d, not uvkerneld's "
                "user (set UVKERNELD_DAEMON_USER if the system daemon runs as that uid)" % (socket_path, uid)
            )
        sock.sendall(frame)
        sock.recv(65536)


def _report_notebook_saves(notebook, venv, socket_path):
    """Thread: tell the daemon the notebook file's identity after each save.

    Only when the daemon cannot watch the notebook's folder itself (system mode: it may not read
    users' folders). It then knows the file as it was at the last save, and recognises it after a
    rename. The stub already sent the identity at kernel start.
    """
    import time

    try:
        last = _identity(notebook)
    except OSError:
        last = None
    while True:
        time.sleep(NOTEBOOK_POLL_SECONDS)
        try:
            current = _identity(notebook)
        except OSError:
            continue  # renamed or deleted: the last identity we reported is the one to match
        if current != last:
            try:
                _tell_daemon(socket_path, "notebook_saved", {"env": venv, "file": current})
                last = current
            except UntrustedDaemon as exc:
                print("uvkerneld: notebook saves are no longer reported: %s" % exc, file=sys.__stderr__)
                return
            except OSError:
                pass  # the daemon is restarting: try again at the next look


def load_ipython_extension(shell):
    def pip(line):
        """Install packages into this notebook's own env, through uvkerneld (uv, shared cache).

        Usage: %pip install [-U] [-r FILE] [--pre] [--no-deps] PACKAGE...
               %pip uninstall [-y] PACKAGE... | %pip list | %pip freeze | %pip show PACKAGE
        """
        _run_shim(shell, "pip", line)

    def uv(line):
        """Run ``uv pip ...`` in this notebook's own env, through uvkerneld."""
        _run_shim(shell, "uv", line)

    shell.register_magic_function(pip, "line", "pip")
    shell.register_magic_function(uv, "line", "uv")
    notebook = os.environ.get("UVKERNEL_NOTEBOOK_FILE")
    socket_path = os.environ.get("UVKERNELD_SOCKET")
    if notebook and socket_path:
        import threading

        threading.Thread(
            target=_report_notebook_saves, args=(notebook, sys.prefix, socket_path),
            name="uvkerneld-notebook-saves", daemon=True,
        ).start()
