"""Kernel stub: work out which env this kernel is for, get it from uvkerneld, exec ipykernel.

How it works
------------
1. Key: ``UVKERNEL_ENV`` (a name) > ``UVKERNEL_NOTEBOOK`` (a path) > ``JPY_SESSION_NAME`` when it
   names an ``.ipynb`` (jupyter_server >= 2.0.7 sets the absolute notebook path) > the current
   folder's scratch env. A kernel started from inside a uv kernel (``!papermill x.ipynb``)
   inherits its parent's variables; the parent left a fingerprint of them in
   ``UVKERNEL_KERNEL_IDENTITY``, and when nothing changed we ignore them instead of silently
   reusing the parent notebook's env.
2. Connect to the daemon's socket. In user mode, if nobody listens, start the daemon ourselves:
   under an exclusive flock beside the socket, so ten stubs racing start exactly one daemon.
3. ``acquire`` -> the venv path. For a notebook, read what the file declares (``nbdecl``: the
   first code cell's PEP 723 block, the metadata's nteract object and ``uv.lock``; the head and
   tail of the file, not all of it); when that differs from what the env was last synced to
   (digests), ask the daemon to ``sync`` it first, its uv output on our stderr.
   Exec ``<venv>/bin/python -m ipykernel_launcher -f <file>``: the kernel keeps our pid, so
   Jupyter's interrupt (SIGINT to the process group), restart and kill reach ipykernel itself.
   The socket stays open across exec as the kernel's lifeline: the daemon
   sees it close when the kernel exits.
4. While we wait for the env (seconds when the pool is empty), hold the kernel's TCP ports from
   the connection file bound, so no other socket takes one of them in the meantime (see
   ``hold_kernel_ports``).
5. Anything fails: exec a minimal fallback kernel that answers every cell with the reason, so
   the notebook shows what went wrong instead of a "kernel died, restarting" loop.
"""

import _socket
import os
import sys
import time

# Not json and socket: their imports cost 15 of the stub's 22 ms (see uvkerneld/fastjson.py).
from uvkerneld import client, envvars, fastjson, locations, nbdecl, protocol

IDENTITY_VARS = (envvars.ENV, envvars.NOTEBOOK, "JPY_SESSION_NAME")
IDENTITY_MARKER = envvars.KERNEL_IDENTITY
DAEMON_START_TIMEOUT = 60.0
DEFAULT_ACQUIRE_TIMEOUT = 600.0
# A day: longer than any build; beyond ~1e9 s the socket timeout itself overflows.
MAX_ACQUIRE_TIMEOUT = 86400.0
# Variables that describe one kernel; a daemon started by this stub must not inherit them.
_KERNEL_ONLY_VARS = (
    *IDENTITY_VARS, IDENTITY_MARKER, "JPY_PARENT_PID", envvars.NOTEBOOK_FILE,
)


class StubError(Exception):
    """Why this kernel cannot get its env; shown in the notebook by the fallback kernel."""


class DaemonGone(StubError):
    """The daemon went away mid-request (it was exiting or restarting); worth one retry."""


def identity_fingerprint(environ):
    return fastjson.dumps([environ.get(name, "") for name in IDENTITY_VARS])


def resolve_key(environ, cwd):
    """(kind, value, note): which env this kernel is for, and a note worth logging, if any."""
    note = None
    inherited = environ.get(IDENTITY_MARKER) == identity_fingerprint(environ)
    if inherited and any(environ.get(name) for name in IDENTITY_VARS):
        note = (
            "this kernel was started from inside another uv kernel and inherited its notebook "
            "identity; using the scratch env of %s instead. Set %s or %s to choose an env."
            % (cwd, envvars.NOTEBOOK, envvars.ENV)
        )
    if not inherited:
        name = environ.get(envvars.ENV, "")
        if name:
            return "env", name, note
        notebook = environ.get(envvars.NOTEBOOK, "")
        if notebook:
            return "notebook", _user_notebook(notebook, environ, cwd), note
        session_name = environ.get("JPY_SESSION_NAME", "")
        if session_name.endswith(".ipynb"):
            return "notebook", _absolute(session_name, cwd, strip_overlap=True), note
    return "dir", os.path.realpath(cwd), note


def _user_notebook(value, environ, cwd):
    """The notebook ``UVKERNEL_NOTEBOOK`` names, as the user meant it; it must exist.

    The user typed it relative to the folder they ran the command in, but nbconvert, `jupyter
    execute` and papermill start the kernel in the notebook's folder: `a/report.ipynb` from the
    shell's folder would become `a/a/report.ipynb`. The shell's folder is still in $PWD (a
    subprocess's cwd= does not change it), so a relative path is looked up there first.
    """
    path = os.path.expanduser(value)
    if os.path.isabs(path):
        candidates = [path]
    else:
        shell_dir = environ.get("PWD", "")
        bases = [shell_dir] if os.path.isabs(shell_dir) and shell_dir != cwd else []
        candidates = [os.path.join(base, path) for base in [*bases, cwd]]
    for candidate in candidates:
        if os.path.isfile(candidate):
            return os.path.realpath(candidate)
    raise StubError(
        "%s=%r names no existing notebook (looked for %s). Set it to the notebook "
        "this kernel runs (papermill: the input notebook, not the output), absolute or relative to "
        "the folder you run the command in." % (envvars.NOTEBOOK, value, " and ".join(candidates))
    )


def _absolute(path, cwd, strip_overlap=False):
    path = os.path.expanduser(path)
    if not os.path.isabs(path):
        base = cwd
        folder = os.path.dirname(path)
        # Old jupyter_server set JPY_SESSION_NAME relative to its root while the kernel's cwd is
        # the notebook's folder: "sub/a.ipynb" in cwd "/root/sub" means "/root/sub/a.ipynb".
        if strip_overlap and folder and (cwd == folder or cwd.endswith(os.sep + folder)):
            base = cwd[: len(cwd) - len(folder)] or os.sep
        path = os.path.join(base, path)
    return os.path.realpath(path)


def parse_argv(argv):
    """The connection file (``-f FILE``) and the arguments passed through to ipykernel."""
    connection_file = None
    passthrough = []
    index = 0
    while index < len(argv):
        arg = argv[index]
        if arg in ("-f", "--f") and index + 1 < len(argv):
            connection_file = argv[index + 1]
            index += 2
            continue
        if arg.startswith(("-f=", "--f=")):
            connection_file = arg.split("=", 1)[1]
        else:
            passthrough.append(arg)
        index += 1
    if not connection_file:
        raise SystemExit("usage: python -m kernel_stub -f CONNECTION_FILE [ipykernel args...]")
    return connection_file, passthrough


def hold_kernel_ports(connection_file):
    """Bind the kernel's TCP ports until exec; return the sockets (close-on-exec).

    Jupyter picks free ports, writes them into the connection file and starts us; its client
    connects right away and keeps reconnecting until the kernel binds. Every reconnect takes an
    ephemeral local port from the same range, and so does any other connection on the host.
    Plain ipykernel binds within ~0.2 s; we may wait seconds for a venv, and a kernel whose port
    was taken meanwhile dies with "Address already in use". Linux never hands out a port that a
    socket has bound (bind(0) and connect() both skip it), so holding them closes that window.
    The sockets are close-on-exec: the ports come free at the exec, when ipykernel binds them.
    Best effort: a port we cannot bind is left for ipykernel to report.
    """
    try:
        with open(connection_file, "rb") as handle:
            info = fastjson.loads(handle.read().decode("utf-8"))
    except (OSError, ValueError):
        return []  # ipykernel reports an unreadable connection file itself
    if not isinstance(info, dict) or info.get("transport", "tcp") != "tcp":
        return []
    ip = info.get("ip") or "127.0.0.1"
    if ip in ("*", ""):
        ip = "0.0.0.0"
    family = _socket.AF_INET6 if ":" in ip else _socket.AF_INET
    held = []
    for name in ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port"):
        port = info.get(name)
        if not isinstance(port, int) or not 0 < port < 65536:
            continue
        sock = _socket.socket(family, _socket.SOCK_STREAM)
        try:
            sock.bind((ip, port))
        except OSError:
            sock.close()
            continue
        held.append(sock)
    return held


# --- talking to the daemon ----------------------------------------------------------------------


def connect_or_start(socket_path, environ):
    try:
        return _connect_or_start(socket_path, environ)
    except client.UntrustedDaemon as exc:
        # Never retried, never auto-started over: someone else's process holds our socket.
        raise StubError(str(exc)) from None


def _connect_or_start(socket_path, environ):
    try:
        return client.connect(socket_path)
    except client.DaemonNotRunning:
        pass
    if socket_path == locations.SYSTEM_SOCKET or environ.get(envvars.AUTOSTART, "1") == "0":
        raise StubError(
            "uvkerneld is not running (nothing answers on %s). Ask your administrator to run "
            "`systemctl enable --now uvkerneld.socket`, or start it yourself with `uvkerneld`."
            % socket_path
        )
    return _start_daemon_and_connect(socket_path, environ)


def _start_daemon_and_connect(socket_path, environ):
    import fcntl

    from uvkerneld import fsafety, procs

    # The same rules as the daemon's own start: never a folder, lock or log another user controls.
    try:
        fsafety.secure_dir(os.path.dirname(socket_path), 0o700, "socket folder",
                           sticky_leaf=os.path.basename(socket_path))
        lock_fd = fsafety.open_own(socket_path + ".lock", os.O_RDWR | os.O_CREAT, 0o600, "daemon start lock")
    except fsafety.UnsafePath as exc:
        raise StubError(str(exc)) from None
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        # Another stub may have started the daemon while we waited for the lock.
        try:
            return client.connect(socket_path)
        except client.DaemonNotRunning:
            pass
        log_path = locations.daemon_log_path(socket_path)
        try:
            log_fd = fsafety.open_own(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600, "daemon log")
        except fsafety.UnsafePath as exc:
            raise StubError(str(exc)) from None
        try:
            pid = _spawn_daemon(socket_path, log_fd, environ)
        finally:
            os.close(log_fd)
        deadline = time.monotonic() + DAEMON_START_TIMEOUT
        while True:
            try:
                return client.connect(socket_path)
            except client.DaemonNotRunning:
                pass
            if not procs.pid_alive(pid):
                raise StubError(
                    "uvkerneld exited while starting; its log %s ends with:\n%s"
                    % (log_path, _tail(log_path))
                )
            if time.monotonic() > deadline:
                raise StubError(
                    "uvkerneld (pid %d) did not open %s within %.0f s; see %s"
                    % (pid, socket_path, DAEMON_START_TIMEOUT, log_path)
                )
            time.sleep(0.02)
    finally:
        os.close(lock_fd)


def _spawn_daemon(socket_path, log_fd, environ):
    """Start ``uvkerneld`` fully detached (double fork, own session); return its pid."""
    env = {k: v for k, v in environ.items() if k not in _KERNEL_ONLY_VARS}
    argv = [sys.executable, "-m", "uvkerneld", "--socket", socket_path, "--started-by-kernel"]
    distribution_dir = _distribution_dir()
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the forked children
        try:
            os.close(read_end)
            os.setsid()
            grandchild = os.fork()
            if grandchild:
                os.write(write_end, str(grandchild).encode())
                os._exit(0)
            os.close(write_end)
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.dup2(log_fd, 1)
            os.dup2(log_fd, 2)
            os.chdir(distribution_dir)
            os.execve(argv[0], argv, env)
        finally:
            os._exit(127)
    os.close(write_end)
    data = os.read(read_end, 32)
    os.close(read_end)
    os.waitpid(child, 0)
    if not data:
        raise StubError("could not start uvkerneld (fork failed)")
    return int(data)


def _distribution_dir():
    """The folder holding the uvkerneld this stub imported. ``python -m`` looks in its cwd first:
    run from here, the daemon and the fallback kernel are the same code as this stub (not another
    copy in site-packages, nor a same-named file in the notebook's folder)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(client.__file__)))


def _tail(path, lines=10):
    try:
        with open(path, "rb") as handle:
            handle.seek(0, 2)
            handle.seek(max(0, handle.tell() - 4096))
            return b"\n".join(handle.read().splitlines()[-lines:]).decode("utf-8", "replace")
    except OSError:
        return "(no log)"


def key_args(kind, value):
    """The ``key`` (and for a notebook the ``file``) arguments of acquire and sync."""
    args = {"key": {"kind": kind, "value": value}}
    if kind == "notebook":
        # Stat as the user (a system daemon may not see the file): after a rename, the daemon
        # recognises the notebook by this and its env follows it.
        try:
            args["file"] = protocol.file_identity(os.stat(value))
        except OSError:
            pass  # not saved yet (papermill output, a new UVKERNEL_NOTEBOOK): nothing to follow
    return args


def acquire(sock, kind, value, timeout):
    """Ask the daemon for the env of this key; returns the acquire result."""
    args = key_args(kind, value)
    try:
        return client.call(sock, "acquire", args, timeout)
    except TimeoutError:
        raise StubError("uvkerneld did not provide an env within %.0f s" % timeout) from None
    except protocol.ShuttingDown as exc:
        raise DaemonGone(exc.message) from None
    except protocol.UvkError as exc:
        raise StubError(exc.message) from None
    except OSError as exc:
        raise DaemonGone("lost the connection to uvkerneld: %s" % exc) from None


def declaration_to_sync(path, result):
    """The notebook's declaration (wire dict) when the env must be synced to it, else None.

    None when the env was last synced to this very declaration, or when the notebook declares
    nothing and its env was never synced to a declaration (then nothing is hashed: hashlib costs
    start-up time). A notebook that no longer declares anything its env was synced to gets the
    empty declaration: the packages it declared go, what %pip added outside it stays. An
    unreadable notebook changes nothing, with one line on stderr (the kernel's log): the kernel
    starts.
    """
    try:
        declaration = nbdecl.read_declaration(path)
    except nbdecl.NotebookUnreadable as exc:
        sys.stderr.write("uvkerneld: not reading declared dependencies: %s\n" % exc)
        return None
    if declaration is None:
        if result.get("declared_digest") in (None, nbdecl.NOTHING_DIGEST):
            return None
        return nbdecl.Declaration().to_wire()
    wire = declaration.to_wire()
    if nbdecl.digest(wire) == result.get("declared_digest"):
        return None
    return wire


def _write_output(name, data):
    if name == "output":
        sys.stderr.write("%s\n" % data)
        sys.stderr.flush()


def sync(sock, kind, value, wire, timeout):
    """Ask the daemon to make the notebook's env match ``wire``; returns the sync result (an
    acquire result plus what changed). uv's output goes to our stderr, i.e. the kernel's log."""
    args = dict(key_args(kind, value), declaration=wire)
    try:
        return client.call(sock, "sync", args, timeout, request_id=2, on_event=_write_output)
    except TimeoutError:
        raise StubError("uvkerneld did not sync the notebook's declared dependencies within %.0f s"
                        % timeout) from None
    except protocol.UvkError as exc:
        raise StubError(exc.message) from None
    except OSError as exc:
        raise StubError("lost the connection to uvkerneld while it synced the notebook's declared "
                        "dependencies: %s" % exc) from None


def acquire_timeout(environ):
    value = environ.get(envvars.ACQUIRE_TIMEOUT) or ""
    if not value:
        return DEFAULT_ACQUIRE_TIMEOUT
    try:
        timeout = float(value)
    except ValueError:
        timeout = -1.0
    if not 0 < timeout <= MAX_ACQUIRE_TIMEOUT:
        raise StubError(
            "%s=%r is not a number of seconds > 0 and <= %.0f; unset it to wait "
            "up to %.0f s" % (envvars.ACQUIRE_TIMEOUT, value, MAX_ACQUIRE_TIMEOUT, DEFAULT_ACQUIRE_TIMEOUT)
        )
    return timeout


def connect_and_acquire(socket_path, environ, kind, value, timeout):
    """(socket, acquire result). A daemon that goes away while we ask (an idle exit, a restart)
    gets one retry: the next connect reaches its successor, or starts one."""
    try:
        sock = connect_or_start(socket_path, environ)
        return sock, acquire(sock, kind, value, timeout)
    except DaemonGone as exc:
        sys.stderr.write("uvkerneld: %s; retrying once\n" % exc)
        sock.close()
    time.sleep(0.2)
    sock = connect_or_start(socket_path, environ)
    return sock, acquire(sock, kind, value, timeout)


# --- exec -----------------------------------------------------------------------------------------


def kernel_environment(environ, result, socket_path):
    env = dict(environ)
    venv = result["path"]
    env["VIRTUAL_ENV"] = venv
    env["PATH"] = os.path.join(venv, "bin") + os.pathsep + environ.get("PATH", os.defpath)
    env.pop("PYTHONHOME", None)
    env[IDENTITY_MARKER] = identity_fingerprint(environ)
    env[envvars.SOCKET] = socket_path
    # The kernel extension reports this notebook's saves when the daemon cannot watch for them.
    env.pop(envvars.NOTEBOOK_FILE, None)
    if result.get("report_notebook_saves"):
        env[envvars.NOTEBOOK_FILE] = result["key"]["value"]
    return env


def exec_fallback(message, connection_file, passthrough):
    """Replace this process with a kernel that shows ``message`` for every cell."""
    sys.stderr.write("uvkerneld: %s\n" % message)
    sys.stderr.flush()
    env = dict(os.environ)
    env[envvars.ERROR] = message
    argv = [
        sys.executable, "-m", "uvkerneld.fallback_kernel", "-f", os.path.abspath(connection_file),
        *passthrough,
    ]
    os.chdir(_distribution_dir())
    os.execve(sys.executable, argv, env)


def main(argv=None):
    connection_file, passthrough = parse_argv(sys.argv[1:] if argv is None else argv)
    environ = os.environ
    socket_path = locations.socket_path_from_env()
    held_ports = hold_kernel_ports(connection_file)  # noqa: F841 - kept open until exec closes them
    try:
        cwd = os.getcwd()
        kind, value, note = resolve_key(environ, cwd)
        if note:
            sys.stderr.write("uvkerneld: %s\n" % note)
        try:
            protocol.parse_env_key(kind, value)
        except protocol.UvkError as exc:
            raise StubError(exc.message) from None
        timeout = acquire_timeout(environ)
        sock, result = connect_and_acquire(socket_path, environ, kind, value, timeout)
        if kind == "notebook":
            wire = declaration_to_sync(value, result)
            if wire is not None:
                result = sync(sock, kind, value, wire, timeout)
    except StubError as exc:
        exec_fallback(str(exc), connection_file, passthrough)
        return
    except (OSError, ValueError) as exc:
        exec_fallback("kernel stub failed: %s" % exc, connection_file, passthrough)
        return
    sock.setblocking(True)
    os.set_inheritable(sock.fileno(), True)
    python = result["python"]
    env = kernel_environment(environ, result, socket_path)
    os.execve(python, [python, "-m", "ipykernel_launcher", "-f", connection_file, *passthrough], env)
