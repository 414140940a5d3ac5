"""Rewrite three settings of a PEP 723 block's text and keep the rest of it, byte for byte.

``uvkernelctl lock`` changes ``dependencies``, ``requires-python`` and ``[tool.uv] exclude-newer``; the
block also holds other tools' tables (``[tool.marimo]``, ``[tool.ruff]``), other ``[tool.uv]`` keys and
comments, which are not ours to drop. The block is cut into TOML statements with tomllib itself (a
statement ends at the first line where the text from its start parses: multi-line arrays and strings
holding ``]`` or ``#`` need no tokenizer of our own), only the three statements are replaced, and the
result is parsed again: it must equal the old table with exactly those three values changed, else
``Unsafe`` (the caller refuses and names what would be lost) - never a silently different block.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from .tomlcompat import TOMLDecodeError, loads

_CLOSERS = ("]", "}", '"""', "'''")


class Unsafe(Exception):
    """The block cannot be rewritten without changing more than the three settings."""


def rewrite(block: str, dependencies: list[str], requires_python: str | None, exclude_newer: str) -> str:
    """``block`` (``# /// script`` ... ``# ///``, as declared.BLOCK matches it) with the three settings
    replaced or added, everything else kept."""
    lines = block.split("\n")
    if len(lines) < 2 or lines[0] != "# /// script" or lines[-1] != "# ///":
        raise Unsafe("not a '# /// script' block")
    raw = lines[1:-1]
    toml = [line[2:] if line.startswith("# ") else line[1:] for line in raw]
    try:
        old = loads("\n".join(toml))
    except TOMLDecodeError as exc:
        raise Unsafe("invalid TOML: %s" % exc) from None
    statements, headers = _statements(toml)
    top = [s for s in statements if s[0] == ()]
    edits: dict[int, tuple[int, list[str]]] = {}  # first line -> (last line, new lines)
    inserts: dict[int, list[str]] = {}  # before this line -> new lines

    deps = _render_dependencies(dependencies, _item_comments(toml, _find(top, "dependencies")))
    found = _find(top, "dependencies")
    if found:
        edits[found[0]] = (found[1], deps)
    else:
        inserts.setdefault(_after_last(top, 0), []).extend(deps)
    if requires_python is not None and old.get("requires-python") != requires_python:
        line = ["requires-python = %s" % json.dumps(requires_python)]
        present = _find(top, "requires-python")
        if present:
            edits[present[0]] = (present[1], line)
        else:
            at = found[0] if found else _after_last(top, 0)
            inserts[at] = line + inserts.get(at, [])
    stamp = ["exclude-newer = %s" % json.dumps(exclude_newer)]
    tool_uv = [number for number, path, is_array in headers if path == ("tool", "uv") and not is_array]
    if tool_uv:
        present = _find([s for s in statements if s[0] == ("tool", "uv")], "exclude-newer")
        if present:
            edits[present[0]] = (present[1], stamp)
        else:
            inserts[tool_uv[0] + 1] = stamp + inserts.get(tool_uv[0] + 1, [])
    else:
        inserts.setdefault(len(toml), []).extend(["", "[tool.uv]", *stamp])

    out: list[str] = []
    number = 0
    while number <= len(toml):
        out.extend(_comment(line) for line in inserts.get(number, []))
        if number == len(toml):
            break
        if number in edits:
            last, new = edits[number]
            comment = _trailing_comment(toml, number, last)
            out.extend(_comment(line) for line in new[:-1])
            out.append(_comment(new[-1] + ("  " + comment if comment else "")))
            number = last + 1
            continue
        out.append(raw[number])
        number += 1
    result = "\n".join(["# /// script", *out, "# ///"])

    expected = copy.deepcopy(old)
    expected["dependencies"] = list(dependencies)
    if requires_python is not None:
        expected["requires-python"] = requires_python
    tool = expected.setdefault("tool", {})
    if not isinstance(tool, dict) or not isinstance(tool.setdefault("uv", {}), dict):
        raise Unsafe("tool or tool.uv is not a table")
    tool["uv"]["exclude-newer"] = exclude_newer
    try:
        again = loads("\n".join(line[2:] if line.startswith("# ") else line[1:] for line in out))
    except TOMLDecodeError:
        raise Unsafe("the rewritten block would not be valid TOML") from None
    if again != expected:
        raise Unsafe("the rewritten block would say more than the new dependencies and exclude-newer")
    return result


Statement = tuple[tuple[str, ...], str, int, int]  # table, key (first part), first line, last line


def _statements(toml: list[str]) -> tuple[list[Statement], list[tuple[int, tuple[str, ...], bool]]]:
    statements: list[Statement] = []
    headers: list[tuple[int, tuple[str, ...], bool]] = []
    table: tuple[str, ...] = ()
    number = 0
    while number < len(toml):
        text = toml[number].strip()
        if not text or text.startswith("#"):
            number += 1
            continue
        if text.startswith("["):  # at a statement's start, a '[' opens a table header
            is_array = text.startswith("[[")
            table = _header_path(toml[number], is_array)
            headers.append((number, table, is_array))
            number += 1
            continue
        last = _statement_end(toml, number)
        key = next(iter(loads("\n".join(toml[number:last + 1]))))
        statements.append((table, key, number, last))
        number = last + 1
    return statements, headers


def _header_path(line: str, is_array: bool) -> tuple[str, ...]:
    try:
        node: Any = loads(line)
    except TOMLDecodeError:
        raise Unsafe("a table header tomllib cannot read alone: %r" % line) from None
    path: list[str] = []
    while isinstance(node, (dict, list)) and node:
        if isinstance(node, list):
            node = node[-1]
            continue
        key = next(iter(node))
        path.append(key)
        node = node[key]
    return tuple(path)


def _statement_end(toml: list[str], first: int) -> int:
    for last in range(first, len(toml)):
        if last > first and not any(closer in toml[last] for closer in _CLOSERS):
            continue  # a value spanning lines ends on a line holding its closing bracket or quotes
        try:
            loads("\n".join(toml[first:last + 1]))
        except TOMLDecodeError:
            continue
        return last
    raise Unsafe("a statement that never ends (line %d of the block)" % (first + 1))


def _find(statements: list[Statement], key: str) -> tuple[int, int] | None:
    spans = [(first, last) for _, name, first, last in statements if name == key]
    if len(spans) > 1:
        raise Unsafe("%s is set by more than one statement (dotted keys)" % key)
    return spans[0] if spans else None


def _after_last(statements: list[Statement], default: int) -> int:
    return statements[-1][3] + 1 if statements else default


def _trailing_comment(toml: list[str], first: int, last: int) -> str:
    """The comment after a statement's value (``exclude-newer = "..."  # why``), kept when it is rewritten."""
    for at in (index for index, char in enumerate(toml[last]) if char == "#"):
        try:
            loads("\n".join([*toml[first:last], toml[last][:at]]))
        except TOMLDecodeError:
            continue
        return toml[last][at:].rstrip()
    return ""


def _item_comments(toml: list[str], span: tuple[int, int] | None) -> dict[str, str]:
    """Requirement text -> the comment after it, for the old array's one-item lines, so that
    ``"iniconfig==2.0.0",  # 2.1 changed the API`` keeps its reason when the requirement stays."""
    comments: dict[str, str] = {}
    if span is None:
        return comments
    for line in toml[span[0] + 1:span[1] + 1]:
        for at in (index for index, char in enumerate(line) if char == "#"):
            try:
                items = loads("x = [\n%s\n]" % line[:at])["x"]
            except TOMLDecodeError:
                continue
            if len(items) == 1 and isinstance(items[0], str):
                comments[items[0]] = line[at:].rstrip()
            break
    return comments


def _render_dependencies(dependencies: list[str], comments: dict[str, str]) -> list[str]:
    lines = ["dependencies = ["]
    for text in dependencies:
        comment = comments.get(text)
        lines.append("    %s,%s" % (json.dumps(text), "  " + comment if comment else ""))
    return [*lines, "]"]


def _comment(line: str) -> str:
    return "# " + line if line else "#"
