"""Blocking client for the daemon's socket: one request, its events, its final response.

Standard library only: the kernel stub uses it on every kernel start. It uses ``_socket``, the
C module under ``socket``: ``import socket`` builds its enums (it imports ``enum`` and
``selectors``), 9 ms of a stub that otherwise needs 7 ms; a Unix stream socket needs none of it.
"""

import _socket
import os
import sys

from . import envvars, protocol

# The account systemd-sysusers creates for the system daemon (systemd/uvkerneld.sysusers.conf).
DEFAULT_DAEMON_USER = "uvkerneld"


class DaemonNotRunning(Exception):
    """Nothing answers on the socket."""

    def __init__(self, socket_path, reason):
        self.socket_path = socket_path
        super().__init__(
            "uvkerneld is not running (nothing answers on %s: %s). Start it with `uvkerneld`, "
            "`systemctl --user enable --now uvkerneld.socket`, or by opening a notebook with the "
            "uv kernel." % (socket_path, reason)
        )


class UntrustedDaemon(ConnectionError):
    """The process answering on the socket is not the daemon we expect: we send it nothing."""

    def __init__(self, socket_path, peer_uid, expected):
        self.socket_path = socket_path
        self.peer_uid = peer_uid
        super().__init__(
            "refusing to use %s: the process answering there runs as uid %d, but uvkerneld must run "
            "as %s. Another user may have put a fake daemon there: use a socket in a folder only you "
            "or root can write, or, if the system daemon runs as uid %d, set %s=%d (or reinstall the "
            "kernelspec with `uvkernelctl install-kernelspec --daemon-user USER`)."
            % (socket_path, peer_uid, expected, peer_uid, envvars.DAEMON_USER, peer_uid)
        )


class ConnectionLost(ConnectionError):
    """The daemon closed the connection without answering (it is exiting or restarting)."""


def connect(socket_path, timeout=None):
    """A connected socket to the daemon, after checking who answers (see ``check_peer``)."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(socket_path)
        check_peer(sock, socket_path)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        sock.close()
        raise DaemonNotRunning(socket_path, exc.strerror or str(exc)) from None
    except BaseException:
        sock.close()
        raise
    return sock


def peer_uid(sock):
    """The uid of the process that listens on a connected Unix socket, from the kernel."""
    # struct ucred {pid_t pid; uid_t uid; gid_t gid;}: three native 32-bit ints.
    raw = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)
    return int.from_bytes(raw[4:8], sys.byteorder)


def check_peer(sock, socket_path, environ=None):
    """Refuse a peer that is not our own uid, root, or the system daemon's user.

    Anyone can listen on a path in a folder they can write; what the daemon answers decides
    which python a kernel execs. So before we send a byte, the kernel tells us who listens.
    The daemon user's name is looked up only when the peer is neither us nor root, so user mode
    never pays for a passwd lookup.
    """
    uid = peer_uid(sock)
    own = os.getuid()
    if uid == own or uid == 0:
        return uid
    environ = os.environ if environ is None else environ
    daemon_uid, daemon_label = daemon_user(environ)
    if daemon_uid is not None and uid == daemon_uid:
        return uid
    expected = "uid %d (you) or root" % own
    if daemon_label:
        expected += " or the daemon user %s" % daemon_label
    raise UntrustedDaemon(socket_path, uid, expected)


def daemon_user(environ):
    """(uid, label) of the system daemon's user: ``UVKERNELD_DAEMON_USER`` (a name or a uid),
    else the ``uvkerneld`` account if it exists; (None, label or None) when it names nobody."""
    value = environ.get(envvars.DAEMON_USER, "").strip()
    name = value or DEFAULT_DAEMON_USER
    if name.isdigit():
        return int(name), "uid %s" % name
    import pwd

    try:
        uid = pwd.getpwnam(name).pw_uid
    except KeyError:
        if value:
            return None, "%s (no such user; from %s)" % (name, envvars.DAEMON_USER)
        return None, None
    return uid, "%s (uid %d)" % (name, uid)


def call(sock, op, args=None, timeout=None, request_id=1, on_event=None):
    """Send one request on a connected socket; return the result or raise the UvkError it carries.

    ``on_event(name, data)`` receives event frames sent before the final response.
    """
    sock.settimeout(timeout)
    try:
        frame = protocol.encode_frame(protocol.request(request_id, op, args), protocol.frame_limit(op))
    except protocol.FrameTooLarge as exc:
        if op != "sync":
            raise
        raise protocol.FrameTooLarge(
            'the notebook\'s declaration (its metadata "uv.lock" and first code cell) is too large to '
            "send to uvkerneld: %s; declare fewer packages" % exc.message) from None
    sock.sendall(frame)
    decoder = protocol.FrameDecoder()
    while True:
        data = sock.recv(65536)
        if not data:
            decoder.eof()
            raise ConnectionLost("uvkerneld closed the connection before answering; see its log")
        decoder.feed(data)
        while True:
            message = decoder.next_message()
            if message is None:
                break
            result = protocol.parse_response(message, request_id)
            if result is not None:
                return result
            if on_event is not None:
                on_event(message.get("event"), message.get("data"))


def request(socket_path, op, args=None, timeout=30.0):
    """Connect, send one request, close."""
    sock = connect(socket_path, timeout)
    try:
        return call(sock, op, args, timeout)
    finally:
        sock.close()
