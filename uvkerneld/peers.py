"""Who is on the other end of a connection: the kernel's SO_PEERCRED answer, never the message.

Its own module so that the server (which reads it) and the ops (which authorize by it) both
import it without importing each other.
"""

from __future__ import annotations

import socket
import struct
from typing import Any


class PeerCredentials:
    __slots__ = ("gid", "pid", "uid")

    def __init__(self, pid: int, uid: int, gid: int) -> None:
        self.pid, self.uid, self.gid = pid, uid, gid


def peer_credentials(sock: Any) -> PeerCredentials:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return PeerCredentials(*struct.unpack("3i", raw))
