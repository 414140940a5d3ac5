"""Compact JSON without importing ``json``, for the kernel stub's start-up.

Why
---
``import json`` imports ``re`` and compiles its regular expressions: 9 ms of the stub's 20 ms on
every kernel start (``python -I -S -c "import json"`` against ``-c pass``, on the test machine).
``_json`` is the C accelerator that ``json`` itself calls for ``dumps``/``loads`` with default
settings, and importing it costs nothing. Where ``_json`` is missing or behaves differently (another
Python implementation or version), a self-check at import fails and this module uses ``json``.
Either way ``dumps(obj)`` is ``json.dumps(obj, separators=(",", ":"), ensure_ascii=False)`` and
``loads`` accepts what ``json.loads`` accepts (tests/test_protocol.py compares them).
``scan(text, index) -> (value, end)`` decodes the one JSON value that starts at ``index`` (nbdecl
reads a notebook's first cells one at a time); it raises ValueError where there is none.

Standard library only, like everything the stub imports.
"""

_JSON_WHITESPACE = " \t\n\r"
_CONSTANTS = {"-Infinity": float("-inf"), "Infinity": float("inf"), "NaN": float("nan")}


class _DecoderSettings:
    """The attributes ``_json.make_scanner`` reads: json.loads's defaults."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = _CONSTANTS.__getitem__


def _unserializable(obj):
    raise TypeError("Object of type %s is not JSON serializable" % type(obj).__name__)


def _c_dumps(obj):
    # A fresh encoder per call, as json does: its circular-reference markers must start empty.
    encoder = _json.make_encoder(
        {}, _unserializable, _json.encode_basestring, None, ":", ",", False, False, True)
    return "".join(encoder(obj, 0))


def _c_loads(text):
    start = len(text) - len(text.lstrip(_JSON_WHITESPACE))
    try:
        # typeshed types the argument as a JSONDecoder; the C scanner reads only these attributes.
        value, end = _json.make_scanner(_DecoderSettings())(text, start)  # type: ignore[arg-type]
    except StopIteration as exc:
        raise ValueError("Expecting value: char %d" % exc.value) from None
    if text[end:].strip(_JSON_WHITESPACE):
        raise ValueError("Extra data: char %d" % end)
    return value


def _c_scan(text, index):
    try:
        return _json.make_scanner(_DecoderSettings())(text, index)  # type: ignore[arg-type]
    except StopIteration as exc:
        raise ValueError("Expecting value: char %d" % exc.value) from None


def _json_dumps(obj):
    import json

    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _json_loads(text):
    import json

    return json.loads(text)


def _json_scan(text, index):
    import json

    return json.JSONDecoder().raw_decode(text, index)


_SAMPLE = {"a": [1, -2.5, None, True, False, "é\n\"\\"], "b": {}}
_SAMPLE_TEXT = '{"a":[1,-2.5,null,true,false,"é\\n\\"\\\\"],"b":{}}'

try:
    import _json

    if _c_dumps(_SAMPLE) != _SAMPLE_TEXT or _c_loads(" " + _SAMPLE_TEXT + "\n") != _SAMPLE:
        raise ValueError("_json does not behave as this module expects")
    dumps, loads, scan = _c_dumps, _c_loads, _c_scan
    ACCELERATED = True
except (ImportError, AttributeError, TypeError, ValueError):
    dumps, loads, scan = _json_dumps, _json_loads, _json_scan
    ACCELERATED = False
