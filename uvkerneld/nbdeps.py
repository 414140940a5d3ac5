"""What ``uvkernelctl deps/lock`` need on top of nbdecl: the declared requirements as a list, the
lock's pins, the drift between declared, recorded and installed, and the new declaration ``lock``
writes (juv's PEP 723 cell + ``metadata["uv.lock"]``, mirrored in nteract's ``metadata.runt.uv``).

Runs in uvkernelctl, as the user; the daemon judges the same declaration again when it syncs.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from . import nbdecl

if sys.version_info >= (3, 11):
    import tomllib
else:  # the backport, a dependency on 3.10 (pyproject)
    import tomli as tomllib

# PEP 723's reference regular expression.
BLOCK = re.compile(r"(?m)^# /// (?P<type>[a-zA-Z0-9-]+)$\s(?P<content>(^#(| .*)$\s)+)^# ///$")
# What `uvkernelctl lock` writes into the nteract mirror (nteract reads these keys).
MIRROR_KEYS = ("dependencies", "requires-python")
HIDDEN_CELL_METADATA = {"jupyter": {"source_hidden": True}}  # what juv gives its PEP 723 cell


class DeclarationError(Exception):
    """The notebook's declaration cannot be read; the message names the place and what is wrong."""


@dataclass
class Declared:
    """What a notebook declares: requirement strings, where they were found, the rest of its script
    table (requires-python, [tool.uv]) and the lock's pins (canonical name -> version)."""

    requirements: list[str] = field(default_factory=list)
    where: str = ""
    script: dict[str, Any] | None = None  # the PEP 723 table, when the notebook has the block
    requires_python: str | None = None
    prerelease: str | None = None  # nteract's key, carried into [tool.uv] when lock adds the block
    lock_pins: dict[str, str] = field(default_factory=dict)


def script_table(source: str, cell: int) -> dict[str, Any]:
    """The TOML table of the ``script`` block in a cell's source."""
    blocks = [match for match in BLOCK.finditer(source) if match.group("type") == "script"]
    place = "cell %d (PEP 723 block)" % cell
    if not blocks:
        raise DeclarationError("%s: the `# /// script` block is not closed by a `# ///` line" % place)
    if len(blocks) > 1:
        raise DeclarationError("%s: more than one `# /// script` block; keep one" % place)
    content = "".join(line[2:] if line.startswith("# ") else line[1:]
                      for line in blocks[0].group("content").splitlines(keepends=True))
    try:
        return tomllib.loads(content)
    except tomllib.TOMLDecodeError as exc:
        raise DeclarationError("%s: invalid TOML: %s" % (place, exc)) from None


def _string_list(value: Any, place: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise DeclarationError("%s must be a list of requirement strings" % place)
    for number, item in enumerate(value):
        try:
            Requirement(item)
        except InvalidRequirement as exc:
            raise DeclarationError(
                "%s[%d]: %r is not a requirement: %s" % (place, number, item, exc)) from None
    return list(value)


def read(declaration: nbdecl.Declaration | None) -> Declared:
    """The meaning of a raw declaration, as far as deps and lock need it."""
    found = Declared()
    if declaration is None:
        return found
    if declaration.script is not None:
        place = "cell %d (PEP 723 block)" % declaration.script_cell
        found.script = script_table(declaration.script, declaration.script_cell or 1)
        found.requirements = _string_list(found.script.get("dependencies", []), place + " dependencies")
        found.where = "cell %d (PEP 723 block)" % declaration.script_cell
        requires = found.script.get("requires-python")
        found.requires_python = requires if isinstance(requires, str) else None
    if declaration.uv is not None:
        if not isinstance(declaration.uv, dict):
            raise DeclarationError("%s must be an object with \"dependencies\"" % declaration.uv_key)
        if declaration.script is None:
            found.requirements = _string_list(
                declaration.uv.get("dependencies", []), "%s.dependencies" % declaration.uv_key)
            found.where = declaration.uv_key or ""
            requires = declaration.uv.get("requires-python")
            found.requires_python = requires if isinstance(requires, str) else None
            prerelease = declaration.uv.get("prerelease")
            found.prerelease = prerelease if isinstance(prerelease, str) else None
    if declaration.lock is not None:
        found.lock_pins = lock_pins(declaration.lock)
    return found


def lock_pins(lock_text: Any) -> dict[str, str]:
    """Canonical package name -> version, from the text of a uv lockfile."""
    if not isinstance(lock_text, str):
        raise DeclarationError('metadata "uv.lock" must be the text of a uv lockfile (a string)')
    try:
        lock = tomllib.loads(lock_text)
    except tomllib.TOMLDecodeError as exc:
        raise DeclarationError('metadata "uv.lock": invalid TOML: %s' % exc) from None
    pins: dict[str, str] = {}
    for package in lock.get("package", []):
        if isinstance(package, dict) and isinstance(package.get("name"), str) and "version" in package:
            pins[canonicalize_name(package["name"])] = str(package["version"])
    return pins


def name_of(requirement: str) -> str:
    try:
        return canonicalize_name(Requirement(requirement).name)
    except InvalidRequirement:
        return canonicalize_name(re.split(r"[\s<>=!~;@\[]", requirement.strip(), maxsplit=1)[0])


def installed_versions(freeze: list[str]) -> dict[str, str]:
    """Canonical name -> version (or the URL for a direct reference) from `uv pip freeze` lines."""
    installed: dict[str, str] = {}
    for line in freeze:
        name, _, version = line.partition("==")
        if not version:
            name, _, version = line.partition(" @ ")
        installed[canonicalize_name(name.strip())] = version.strip()
    return installed


def drift(declared: Declared, recorded: list[str], installed: dict[str, str]) -> list[dict[str, str]]:
    """What differs between the notebook, the env's record and the env (transitive packages are never
    drift: only names the notebook declares or the record holds are looked at)."""
    found: list[dict[str, str]] = []

    def add(kind: str, name: str, message: str) -> None:
        found.append({"kind": kind, "package": name, "message": message})

    declared_names: set[str] = set()
    for requirement_text in declared.requirements:
        requirement = Requirement(requirement_text)
        name = canonicalize_name(requirement.name)
        declared_names.add(name)
        have = installed.get(name)
        pinned = declared.lock_pins.get(name)
        if have is None:
            add("missing", name, "%s is declared (%s) but not installed; run `uvkernelctl sync NOTEBOOK`"
                % (name, requirement_text))
        elif pinned is not None and have != pinned:
            add("version", name, "%s %s is installed, the lock pins %s; run `uvkernelctl sync NOTEBOOK`"
                % (name, have, pinned))
        elif requirement.specifier and not _satisfies(requirement, have):
            add("version", name, "%s %s is installed, the notebook asks for %s; "
                "run `uvkernelctl sync NOTEBOOK`" % (name, have, requirement_text))
    for requirement_text in recorded:
        recorded_name = name_of(requirement_text)
        if recorded_name not in declared_names:
            add("undeclared", recorded_name, "%s was installed with %%pip (%s) but the notebook does not "
                "declare it; run `uvkernelctl lock NOTEBOOK`" % (recorded_name, requirement_text))
    return found


def _satisfies(requirement: Requirement, version: str) -> bool:
    try:
        return requirement.specifier.contains(Version(version), prereleases=True)
    except InvalidVersion:
        return False  # a direct URL where a version range was asked for


# --- what `uvkernelctl lock` writes -------------------------------------------------------------

def new_script_table(declared: Declared, requirements: list[str], python_version: str,
                     exclude_newer: str) -> dict[str, Any]:
    """The PEP 723 table lock writes: the env's requirements, requires-python kept (else >=X.Y of the
    env's interpreter), ``[tool.uv] exclude-newer`` stamped, every other key kept."""
    table = dict(declared.script or {})
    table["requires-python"] = declared.requires_python or ">=%s" % ".".join(python_version.split(".")[:2])
    table["dependencies"] = list(requirements)
    tool = dict(table.get("tool") or {})
    uv = dict(tool.get("uv") or {})
    if declared.prerelease and "prerelease" not in uv:
        uv["prerelease"] = declared.prerelease
    uv["exclude-newer"] = exclude_newer
    tool["uv"] = uv
    table["tool"] = tool
    return table


def render_script(table: dict[str, Any]) -> str:
    """A PEP 723 ``script`` block for a TOML table, laid out as juv writes it (no final newline)."""
    first = [key for key in ("requires-python", "dependencies") if key in table]
    lines = []
    for key in first + [key for key in table if key not in first and not _is_table(table[key])]:
        lines.extend(_assignment(key, table[key]))
    for key, value in table.items():
        if key not in first and _is_table(value):
            _table_lines([key], value, lines)
    body = "".join("# %s\n" % line if line else "#\n" for line in lines)
    return "# /// script\n%s# ///" % body


def _is_table(value: Any) -> bool:
    return isinstance(value, dict) or (
        isinstance(value, list) and bool(value) and all(isinstance(item, dict) for item in value))


def _table_lines(path: list[str], table: dict[str, Any], lines: list[str]) -> None:
    plain = {key: value for key, value in table.items() if not _is_table(value)}
    if plain or not table:
        lines.append("")
        lines.append("[%s]" % ".".join(_key(part) for part in path))
        for key, value in plain.items():
            lines.extend(_assignment(key, value))
    for key, value in table.items():
        if isinstance(value, dict):
            _table_lines([*path, key], value, lines)
        elif _is_table(value):
            for item in value:
                lines.append("")
                lines.append("[[%s]]" % ".".join(_key(part) for part in [*path, key]))
                for item_key, item_value in item.items():
                    lines.extend(_assignment(item_key, item_value))


def _assignment(key: str, value: Any) -> list[str]:
    if isinstance(value, list) and value and all(isinstance(item, str) for item in value):
        return ["%s = [" % _key(key), *("    %s," % _value(item) for item in value), "]"]
    return ["%s = %s" % (_key(key), _value(value))]


def _key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[%s]" % ", ".join(_value(item) for item in value)
    if isinstance(value, dict):
        return "{%s}" % ", ".join("%s = %s" % (_key(k), _value(v)) for k, v in value.items())
    if hasattr(value, "isoformat"):  # TOML dates and times come back from tomllib as datetime objects
        return value.isoformat()
    raise DeclarationError("cannot write the value %r back into the PEP 723 block" % (value,))


def apply(notebook: Any, script_cell: int | None, block: str, table: dict[str, Any], lock_text: str) -> None:
    """Put the new declaration into a parsed notebook: the block cell (replaced in place, its id and
    metadata kept; or a new first cell, hidden like juv's), ``uv.lock`` and the ``runt.uv`` mirror."""
    import nbformat

    if script_cell is not None:
        cell = notebook.cells[script_cell - 1]
        source = nbdecl.cell_source(cell)
        match = next(m for m in BLOCK.finditer(source) if m.group("type") == "script")
        cell.source = source[:match.start()] + block + source[match.end():]
    else:
        cell = nbformat.v4.new_code_cell(block, metadata=json.loads(json.dumps(HIDDEN_CELL_METADATA)))
        if (notebook.get("nbformat"), notebook.get("nbformat_minor", 0)) < (4, 5):
            del cell["id"]  # cell ids exist from nbformat 4.5 on; an older notebook must not get one
        notebook.cells.insert(0, cell)
    metadata = notebook.metadata
    metadata[nbdecl.LOCK_KEY] = lock_text
    mirror = {key: table[key] for key in MIRROR_KEYS if key in table}
    runt = metadata.get("runt")
    if not isinstance(runt, dict):
        runt = metadata["runt"] = nbformat.from_dict({"schema_version": "1"})
    uv = runt.get("uv")
    if isinstance(uv, dict):
        uv.update(mirror)  # other keys nteract keeps there (prerelease) stay
    else:
        runt["uv"] = nbformat.from_dict(mirror)
    if isinstance(metadata.get("uv"), dict):
        metadata["uv"].update(mirror)  # a legacy copy must not contradict the new one
