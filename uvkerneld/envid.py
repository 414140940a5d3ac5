"""The env id: ``e-`` and 12 lowercase hex digits (``e-0123456789ab``), also the name of the env's
directory in the venvs dir. The one place its format is written.

Standard library only and cheap to import (no ``re``): protocol.py imports it, and the kernel stub
imports protocol.py on every kernel start.
"""

import os

PREFIX = "e-"
HEX_DIGITS = 12
EXAMPLE = PREFIX + "0123456789ab"
_HEX = frozenset("0123456789abcdef")


def format_env_id(number: int) -> str:
    """The id for ``number`` (0 <= number < 16**12)."""
    if not 0 <= number < 16 ** HEX_DIGITS:
        raise ValueError("an env id number must be from 0 to 16**%d - 1, got %r" % (HEX_DIGITS, number))
    return "%s%0*x" % (PREFIX, HEX_DIGITS, number)


def new_env_id() -> str:
    """A fresh random id (48 random bits)."""
    return format_env_id(int.from_bytes(os.urandom(HEX_DIGITS // 2), "big"))


def is_env_id(text: object) -> bool:
    return (isinstance(text, str) and len(text) == len(PREFIX) + HEX_DIGITS and text.startswith(PREFIX)
            and set(text[len(PREFIX):]) <= _HEX)


def parse_env_id(text: object) -> int:
    """The number ``text`` encodes; ValueError saying what an env id looks like if it is none."""
    if not is_env_id(text):
        shown = text[:40] if isinstance(text, str) else text
        raise ValueError("an env id looks like %s, got %r" % (EXAMPLE, shown))
    assert isinstance(text, str)
    return int(text[len(PREFIX):], 16)
