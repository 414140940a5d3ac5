"""systemd integration without a dependency: sd_notify and socket activation (sd_listen_fds).

sd_notify: one datagram per message to ``$NOTIFY_SOCKET`` (a path, or ``@name`` for the
abstract namespace). Socket activation: systemd passes listening sockets from fd 3 on and sets
``LISTEN_PID`` to our pid and ``LISTEN_FDS`` to their count; we take fd 3, check it really is a
listening Unix stream socket, make it non-inheritable (uv and kernels must never get it) and
unset the variables so nothing we start believes it was activated.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger("uvkerneld.notify")

SD_LISTEN_FDS_START = 3


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        environ = dict(os.environ) if environ is None else environ
        address = environ.get("NOTIFY_SOCKET", "")
        self._address: str | None = None
        if address.startswith("@"):
            self._address = "\0" + address[1:]
        elif address.startswith("/"):
            self._address = address
        watchdog_usec = environ.get("WATCHDOG_USEC", "")
        watchdog_pid = environ.get("WATCHDOG_PID", "")
        self.watchdog_interval: float | None = None
        if watchdog_usec.isdigit() and (not watchdog_pid or watchdog_pid == str(os.getpid())):
            # Ping at half the period, as sd_watchdog_enabled(3) recommends.
            self.watchdog_interval = int(watchdog_usec) / 2_000_000
        self._last_status: str | None = None
        # Our children (uv, kernels) must not talk to systemd in our name.
        for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            os.environ.pop(name, None)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def send(self, message: str) -> None:
        if self._address is None:
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            try:
                sock.connect(self._address)
                sock.sendall(message.encode("utf-8"))
            except OSError as exc:
                log.warning("sd_notify(%s) failed: %s", message.split("=", 1)[0], exc)

    def ready(self, status: str) -> None:
        self.send("READY=1\nSTATUS=%s\nMAINPID=%d" % (status, os.getpid()))
        self._last_status = status

    def status(self, status: str) -> None:
        if status != self._last_status:
            self.send("STATUS=" + status)
            self._last_status = status

    def stopping(self) -> None:
        self.send("STOPPING=1\nSTATUS=shutting down")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")


def inherited_listener(environ: Mapping[str, str] | None = None) -> socket.socket | None:
    """The socket systemd passed us, or None when we were not socket-activated."""
    environ = os.environ if environ is None else environ
    if environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    try:
        count = int(environ.get("LISTEN_FDS", "0"))
    except ValueError:
        count = 0
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    if count < 1:
        return None
    if count > 1:
        log.warning("systemd passed %d sockets; using the first, closing the rest", count)
        for fd in range(SD_LISTEN_FDS_START + 1, SD_LISTEN_FDS_START + count):
            try:
                os.close(fd)
            except OSError:
                pass
    try:
        sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    except OSError as exc:
        raise ValueError(
            "systemd passed fd 3, but it is not a socket (%s); start uvkerneld from uvkerneld.socket "
            "(ListenStream=/path) or without LISTEN_FDS/LISTEN_PID set" % exc.strerror
        ) from None
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise ValueError(
            "systemd passed a %s/%s socket on fd 3; uvkerneld needs a Unix stream socket "
            "(ListenStream=/path in uvkerneld.socket)" % (sock.family.name, sock.type.name)
        )
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        raise ValueError("fd 3 is not a listening socket; set Accept=no in uvkerneld.socket")
    sock.set_inheritable(False)
    sock.setblocking(False)
    return sock
