"""Blocking client for the daemon's socket: one request, its events, its final response.

Standard library only: the kernel stub uses it on every kernel start. It uses ``_socket``, the
C module under ``socket``: ``import socket`` builds its enums (it imports ``enum`` and
``selectors``), 9 ms of a stub that otherwise needs 7 ms; a Unix stream socket needs none of it.
"""

import _socket

from . import protocol


class DaemonNotRunning(Exception):
    """Nothing answers on the socket."""

    def __init__(self, socket_path, reason):
        self.socket_path = socket_path
        super().__init__(
            "uvkerneld is not running (nothing answers on %s: %s). Start it with `uvkerneld`, "
            "`systemctl --user enable --now uvkerneld.socket`, or by opening a notebook with the "
            "uv kernel." % (socket_path, reason)
        )


class ConnectionLost(ConnectionError):
    """The daemon closed the connection without answering (it is exiting or restarting)."""


def connect(socket_path, timeout=None):
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(socket_path)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        sock.close()
        raise DaemonNotRunning(socket_path, exc.strerror or str(exc)) from None
    except BaseException:
        sock.close()
        raise
    return sock


def call(sock, op, args=None, timeout=None, request_id=1, on_event=None):
    """Send one request on a connected socket; return the result or raise the UvkError it carries.

    ``on_event(name, data)`` receives event frames sent before the final response.
    """
    sock.settimeout(timeout)
    sock.sendall(protocol.encode_frame(protocol.request(request_id, op, args)))
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
