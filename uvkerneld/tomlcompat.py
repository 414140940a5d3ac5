"""The one owner of the TOML reader: ``tomllib`` (Python 3.11+) or its backport ``tomli`` on 3.10
(a dependency there, see pyproject), plus ``loads`` for text a client sent."""

from __future__ import annotations

import sys
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on 3.10
    import tomli as tomllib

__all__ = ["TOMLDecodeError", "loads", "tomllib"]

TOMLDecodeError = tomllib.TOMLDecodeError


def loads(text: str) -> dict[str, Any]:
    """``tomllib.loads``; too-deep nesting is a TOMLDecodeError too (tomllib recurses once per
    level of arrays or inline tables, so 3000 levels raise RecursionError)."""
    try:
        return tomllib.loads(text)
    except RecursionError:
        raise TOMLDecodeError("arrays or tables nested too deeply") from None
