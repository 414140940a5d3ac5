"""What ``uvkernelctl deps/lock`` need on top of nbdecl: the declared requirements as a list, the
lock's pins, the drift between declared, recorded and installed, and the new declaration ``lock``
writes (juv's PEP 723 cell + ``metadata["uv.lock"]``, mirrored in nteract's ``metadata.runt.uv``).

Runs in uvkernelctl, as the user; the daemon judges the same declaration again when it syncs.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from packaging.requirements import Requirement
from packaging.version import InvalidVersion, Version

from . import declared, nbdecl, pep723edit, pipargs, protocol

HIDDEN_CELL_METADATA = {"jupyter": {"source_hidden": True}}  # what juv gives its PEP 723 cell


class DeclarationError(Exception):
    """The notebook's declaration cannot be read; the message names the place and what is wrong."""


def read(declaration: nbdecl.Declaration | None) -> tuple[declared.Parsed | None, dict[str, str]]:
    """What a raw declaration means (declared.py, as the daemon reads it) and its lock's pins."""
    if declaration is None:
        return None, {}
    try:
        parsed = declared.interpret(declaration.to_wire(), shared_host=False)
    except protocol.BadDeclaration as exc:
        raise DeclarationError(exc.message) from None
    if parsed is None or parsed.lock is None:
        return parsed, {}
    return parsed, lock_pins(parsed.lock)


def lock_pins(lock_text: str) -> dict[str, str]:
    """Canonical package name -> version, from the text of a uv lockfile (declared.py reads it)."""
    try:
        packages = declared.lock_packages(lock_text)
    except protocol.BadDeclaration as exc:
        raise DeclarationError(exc.message) from None
    return {package.name: package.version for package in packages if package.version is not None}


def name_of(requirement: str) -> str:
    """The name the daemon's requirements table keys a requirement by (a URL or path: itself)."""
    return pipargs.requirement_name(requirement) or requirement


def installed_versions(freeze: list[str]) -> dict[str, str]:
    """Canonical name -> version (or the URL for a direct reference) from `uv pip freeze` lines."""
    installed: dict[str, str] = {}
    for line in freeze:
        name, _, version = line.partition("==")
        if not version:
            name, _, version = line.partition(" @ ")
        installed[pipargs.normalize_name(name.strip())] = version.strip()
    return installed


def drift(parsed: declared.Parsed | None, pins: dict[str, str], recorded: list[str],
          installed: dict[str, str]) -> list[dict[str, str]]:
    """What differs between the notebook, the env's record and the env (transitive packages are never
    drift: only names the notebook declares or the record holds are looked at)."""
    found: list[dict[str, str]] = []

    def add(kind: str, name: str, message: str) -> None:
        found.append({"kind": kind, "package": name, "message": message})

    declared_names: set[str] = set()
    for requirement_text in parsed.dependencies if parsed else ():
        requirement = Requirement(requirement_text)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue  # not for this platform (judged with uvkernelctl's interpreter, not the env's)
        name = pipargs.normalize_name(requirement.name)
        declared_names.add(name)
        have = installed.get(name)
        pinned = pins.get(name)
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

def new_declaration(parsed: declared.Parsed | None, requirements: list[str], python_version: str,
                    exclude_newer: str) -> declared.Parsed:
    """What lock writes: the env's requirements, requires-python kept (else >=X.Y of the env's
    interpreter), ``exclude-newer`` stamped, the other [tool.uv] settings kept."""
    base = parsed or declared.Parsed(place=declared.script_place(1))
    return dataclasses.replace(
        base, dependencies=tuple(requirements), exclude_newer=exclude_newer, lock=None,
        requires_python=base.requires_python or ">=%s" % ".".join(python_version.split(".")[:2]))


def script_block(parsed: declared.Parsed) -> str:
    """The PEP 723 block for the cell, laid out as juv writes it (no final newline)."""
    return declared.script_text(parsed).rstrip("\n")


def new_block_source(notebook: Any, script_cell: int | None, parsed: declared.Parsed) -> str:
    """The source of the cell that will hold the new declaration: the block cell with only its
    dependencies, requires-python and [tool.uv] exclude-newer rewritten (other tools' tables, other
    keys and comments kept: pep723edit), or a new block laid out as juv writes it. Raises
    DeclarationError, before anything is written, when the block cannot be rewritten safely."""
    if script_cell is None:
        return script_block(parsed)
    source = nbdecl.cell_source(notebook.cells[script_cell - 1])
    # declared.py's PEP 723 expression: it found the block this replaces (exactly one).
    match = next(m for m in declared.BLOCK.finditer(source) if m.group("type") == "script")
    old_block = match.group(0).rstrip("\n")
    try:
        block = pep723edit.rewrite(old_block, list(parsed.dependencies), parsed.requires_python,
                                   parsed.exclude_newer or "")
    except pep723edit.Unsafe as exc:
        raise DeclarationError(
            "cell %d: cannot rewrite its PEP 723 block without losing what it holds besides dependencies, "
            "requires-python and [tool.uv] exclude-newer (%s); nothing was written: edit it with "
            "`juv add NOTEBOOK` and `juv lock NOTEBOOK`" % (script_cell, exc)) from None
    return source[:match.start()] + block + source[match.start() + len(old_block):]


def apply(notebook: Any, script_cell: int | None, cell_source: str, parsed: declared.Parsed,
          lock_text: str) -> None:
    """Put the new declaration into a parsed notebook: the block cell's source (its id and metadata
    kept; or a new first cell, hidden like juv's), ``uv.lock`` and the ``runt.uv`` mirror."""
    import nbformat

    if script_cell is not None:
        notebook.cells[script_cell - 1].source = cell_source
    else:
        cell = nbformat.v4.new_code_cell(cell_source, metadata=json.loads(json.dumps(HIDDEN_CELL_METADATA)))
        if (notebook.get("nbformat"), notebook.get("nbformat_minor", 0)) < (4, 5):
            del cell["id"]  # cell ids exist from nbformat 4.5 on; an older notebook must not get one
        notebook.cells.insert(0, cell)
    metadata = notebook.metadata
    metadata[nbdecl.LOCK_KEY] = lock_text
    mirror: dict[str, Any] = {"dependencies": list(parsed.dependencies)}
    if parsed.requires_python:
        mirror["requires-python"] = parsed.requires_python
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
