"""How sizes and durations are shown to people (uvkernelctl's tables, gc's reasons, the log): the
one place these formats are written. ``config.parse_duration`` reads durations people type."""

from __future__ import annotations

_BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")
_DURATION_UNITS = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))


def format_bytes(count: float | None) -> str:
    """``512 B``, ``1.5 KiB``, ... ``2.0 TiB`` (binary units, one decimal); ``?`` when unknown."""
    if count is None:
        return "?"
    for unit in _BYTE_UNITS:
        if abs(count) < 1024 or unit == _BYTE_UNITS[-1]:
            return ("%d %s" if unit == "B" else "%.1f %s") % (count, unit)
        count /= 1024
    raise AssertionError("unreachable: the last unit always returns")  # pragma: no cover


def format_duration(seconds: float, largest_unit_only: bool = False) -> str:
    """Whole seconds as ``3d 4h 5m 6s`` (units that are zero left out; ``0s`` for nothing), or as
    its largest unit only (``3d``) where a rough figure reads better, as in gc's "unused for 3d"."""
    if seconds < 0:
        return "-" + format_duration(-seconds, largest_unit_only)
    remaining = int(seconds)
    parts = []
    for unit, size in _DURATION_UNITS:
        count, remaining = divmod(remaining, size)
        if count:
            parts.append("%d%s" % (count, unit))
    if not parts:
        return "0s"
    return parts[0] if largest_unit_only else " ".join(parts)
