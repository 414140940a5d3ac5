"""What a notebook's declaration means: pure functions, no I/O (issue 11).

nbdecl.py finds the raw declaration in a notebook file (as the user, in the stub or uvkernelctl);
this module turns it into a ``Parsed`` declaration or a ``protocol.BadDeclaration`` whose message
names the place (``cell 1 (PEP 723 block)``, ``metadata.runt.uv``), what is wrong and what to do.

- The PEP 723 block (juv) wins over the nteract object (``metadata.runt.uv`` / ``metadata.uv``):
  when a notebook has both, the object is not used at all. ``juv add`` updates the block and the lock
  but not the mirror ``uvkernelctl lock`` writes, so a mirror that disagrees is drift that
  ``uvkernelctl deps`` reports (``mirror_disagreement``), never a reason to refuse a kernel.
- A declaration is bounded (``MAX_*``): far above real notebooks, low enough that one user's sync
  cannot take the daemon's CPU for seconds. Callers run ``interpret`` off the event loop.
- Of ``[tool.uv]`` only the keys in ``TOOL_UV_KEYS`` are understood; any other is refused rather
  than silently ignored, because it could change what gets installed.
- Requirement strings must parse as PEP 508; on a shared host the same refusals as ``%pip``
  (pipargs owns those rules: no local paths, no file:// or VCS URLs, http(s) indexes only).
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import InvalidSpecifier, SpecifierSet

from . import pipargs, tomlcompat
from .protocol import BadDeclaration

# PEP 723's reference regular expression.
BLOCK = re.compile(r"(?m)^# /// (?P<type>[a-zA-Z0-9-]+)$\s(?P<content>(^#(| .*)$\s)+)^# ///$")
_TOML_LINE = re.compile(r"\(at line (\d+), column (\d+)\)")
TOOL_UV_KEYS = ("exclude-newer", "prerelease", "index-url", "extra-index-url", "index")
INDEX_KEYS = ("url", "name", "default", "explicit")
PRERELEASE_VALUES = ("disallow", "allow", "if-necessary", "explicit", "if-necessary-or-explicit")
_EXCLUDE_NEWER = re.compile(r"^\d{4}-\d{2}-\d{2}(T\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:\d{2})?)?$")
LOCK_HINT = "run `uvkernelctl lock NOTEBOOK` or `juv lock NOTEBOOK`"
PYPI = "https://pypi.org/simple"
MAX_DEPENDENCIES = 1000  # requirements in one place; a real notebook declares tens
MAX_INDEXES = 16  # index-url + extra-index-url + [[tool.uv.index]] together
MAX_SCRIPT_CHARS = 256 << 10  # the first code cell's whole source (juv's block cell is < 1 KB)
MAX_LOCK_CHARS = 8 << 20  # `uv lock` of 25 data-science packages (torch, jax, tensorflow...) is 1.25 MB


@dataclasses.dataclass(frozen=True)
class Parsed:
    """A declaration as the daemon acts on it. ``place`` names where it came from, for messages."""

    place: str
    dependencies: tuple[str, ...] = ()
    requires_python: str | None = None
    prerelease: str | None = None
    exclude_newer: str | None = None
    index_url: str | None = None
    extra_index_urls: tuple[str, ...] = ()
    indexes: tuple[dict[str, Any], ...] = ()  # [[tool.uv.index]] tables, keys from INDEX_KEYS
    lock: str | None = None

    def names(self) -> set[str]:
        """The normalized project names declared."""
        return {pipargs.normalize_name(Requirement(text).name) for text in self.dependencies}

    def uv_flags(self, with_exclude_newer: bool = True) -> list[str]:
        """The resolver options for ``uv pip compile`` (the requirements go in a file)."""
        flags: list[str] = []
        if self.prerelease:
            flags += ["--prerelease", self.prerelease]
        if self.exclude_newer and with_exclude_newer:
            flags += ["--exclude-newer", self.exclude_newer]
        if self.index_url:
            flags += [pipargs.INDEX_FLAG, self.index_url]
        for url in self.extra_index_urls:
            flags += ["--extra-index-url", url]
        for index in self.indexes:
            if index.get("default"):  # replaces PyPI, as in uv: not a fallback to it
                flags += [pipargs.INDEX_FLAG, index["url"]]
            else:
                flags += ["--index", index["url"]] if "name" not in index else [
                    "--index", "%s=%s" % (index["name"], index["url"])]
        return flags

    def index_urls(self) -> set[str]:
        """The indexes packages may come from: the declared ones, PyPI unless a default replaces it."""
        urls = {self.index_url, *self.extra_index_urls, *(index["url"] for index in self.indexes)}
        if not self.index_url and not any(index.get("default") for index in self.indexes):
            urls.add(PYPI)
        return {_index_key(url) for url in urls if url}


def _index_key(url: str) -> str:
    return url.rstrip("/")


def script_place(cell: int | None) -> str:
    return "cell %s (PEP 723 block)" % cell


def interpret(wire: dict[str, Any], shared_host: bool) -> Parsed | None:
    """The declaration a client sent (nbdecl's wire dict) as the daemon acts on it; None when it
    declares no packages at all. Raises BadDeclaration. Takes up to ~0.5 s for the largest
    declaration allowed: call it off the event loop."""
    script, cell, uv_object, uv_key, lock = (
        wire.get("script"), wire.get("script_cell"), wire.get("uv"), wire.get("uv_key"), wire.get("lock"))
    if lock is not None and not isinstance(lock, str):
        raise BadDeclaration('metadata "uv.lock" must be the text of a uv lockfile; %s' % LOCK_HINT)
    if lock is not None and len(lock) > MAX_LOCK_CHARS:
        raise BadDeclaration(
            'metadata "uv.lock" is %d characters; uvkerneld reads locks of up to %d (MAX_LOCK_CHARS): '
            "declare fewer packages" % (len(lock), MAX_LOCK_CHARS))
    if script is not None:  # the block wins: the nteract object is only a mirror then
        return _from_script(script, cell, shared_host, lock)
    chosen = _from_object(uv_object, uv_key, shared_host, lock) if uv_key is not None else None
    if chosen is None:
        if lock is not None:
            raise BadDeclaration(
                'metadata "uv.lock" holds a lock but the notebook declares no dependencies to go with it '
                "(no PEP 723 block in its first code cell, no metadata.runt.uv); %s" % LOCK_HINT)
        return None
    return chosen


def mirror_disagreement(wire: dict[str, Any]) -> str | None:
    """When a notebook has both a PEP 723 block and an nteract object (``uvkernelctl lock`` writes
    the object as a mirror; ``juv add`` then changes only the block), what the ignored object says
    differently, as one drift line for ``uvkernelctl deps``; None when they agree or there is no
    mirror (or the block itself is bad: interpret reports that)."""
    script, uv_key = wire.get("script"), wire.get("uv_key")
    if script is None or uv_key is None:
        return None
    try:
        block = _from_script(script, wire.get("script_cell"), False, None)
    except BadDeclaration:
        return None
    hint = "it is not used (the block wins); run `uvkernelctl lock NOTEBOOK` to rewrite it, or remove it"
    try:
        mirror = _from_object(wire.get("uv"), uv_key, False, None)
    except BadDeclaration as exc:
        return "%s; %s" % (exc.message, hint)

    def normalized(parsed: Parsed) -> set[str]:
        return {_normal_requirement(text) for text in parsed.dependencies}

    if normalized(block) != normalized(mirror):
        return "%s lists other dependencies than %s (only in the cell: %s; only in %s: %s): %s" % (
            uv_key, block.place, ", ".join(sorted(normalized(block) - normalized(mirror))) or "-",
            uv_key, ", ".join(sorted(normalized(mirror) - normalized(block))) or "-", hint)
    if block.requires_python and mirror.requires_python and (
            SpecifierSet(block.requires_python) != SpecifierSet(mirror.requires_python)):
        return "%s says requires-python %r but %s says %r: %s" % (
            uv_key, mirror.requires_python, block.place, block.requires_python, hint)
    return None


def _from_script(source: str, cell: int | None, shared_host: bool, lock: str | None) -> Parsed:
    place = script_place(cell)
    if len(source) > MAX_SCRIPT_CHARS:
        raise BadDeclaration(
            "%s: the cell holding the block is %d characters; uvkerneld reads up to %d (MAX_SCRIPT_CHARS): "
            "declare fewer packages, or put the block in a cell of its own, as juv does"
            % (place, len(source), MAX_SCRIPT_CHARS))
    blocks = [match for match in BLOCK.finditer(source) if match.group("type") == "script"]
    if not blocks:
        raise BadDeclaration(
            "%s: '# /// script' opens no complete block: every line up to a closing '# ///' line must "
            "be '#' or start with '# '" % place)
    if len(blocks) > 1:
        raise BadDeclaration("%s: more than one '# /// script' block; keep one" % place)
    block = blocks[0]
    content = "".join(
        line[2:] if line.startswith("# ") else line[1:]
        for line in block.group("content").splitlines(keepends=True))
    try:
        table = tomlcompat.loads(content)
    except tomlcompat.TOMLDecodeError as exc:
        first_line = source.count("\n", 0, block.start()) + 2  # the line after '# /// script'
        message = _TOML_LINE.sub(
            lambda m: "(line %d of the cell)" % (first_line + int(m.group(1)) - 1), str(exc))
        raise BadDeclaration("%s: invalid TOML: %s" % (place, message)) from None
    dependencies = table.get("dependencies", [])
    if not isinstance(dependencies, list):
        raise BadDeclaration("%s: dependencies must be a list of requirement strings" % place)
    requires_python = table.get("requires-python")
    tool = table.get("tool", {})
    tool_uv = tool.get("uv", {}) if isinstance(tool, dict) else {}
    if not isinstance(tool_uv, dict):
        raise BadDeclaration("%s: [tool.uv] must be a table" % place)
    unknown = sorted(set(tool_uv) - set(TOOL_UV_KEYS))
    if unknown:
        raise BadDeclaration(
            "%s: [tool.uv] %s %s not supported by uvkerneld (supported: %s); remove %s"
            % (place, ", ".join(unknown), "is" if len(unknown) == 1 else "are", ", ".join(TOOL_UV_KEYS),
               "it" if len(unknown) == 1 else "them"))
    extra = tool_uv.get("extra-index-url", [])
    if isinstance(extra, str):
        extra = [extra]
    if not isinstance(extra, list) or not all(isinstance(url, str) for url in extra):
        raise BadDeclaration("%s: [tool.uv] extra-index-url must be a list of URLs" % place)
    indexes = tool_uv.get("index", [])
    if not isinstance(indexes, list) or not all(isinstance(index, dict) for index in indexes):
        raise BadDeclaration("%s: [tool.uv] index must be a list of tables ([[tool.uv.index]])" % place)
    named = len(extra) + len(indexes) + ("index-url" in tool_uv)
    if named > MAX_INDEXES:
        raise BadDeclaration("%s: [tool.uv] names %d indexes; uvkerneld uses up to %d (MAX_INDEXES)"
                             % (place, named, MAX_INDEXES))
    defaults = [index for index in indexes if index.get("default") is True]
    if len(defaults) + ("index-url" in tool_uv) > 1:
        raise BadDeclaration("%s: [tool.uv] names more than one default index (index-url, or "
                             "[[tool.uv.index]] with default = true); keep one" % place)
    return Parsed(
        place=place,
        dependencies=_requirements(dependencies, place + ": dependencies", shared_host),
        requires_python=_requires_python(requires_python, place),
        prerelease=_prerelease(tool_uv.get("prerelease"), place + ": [tool.uv] prerelease"),
        exclude_newer=check_exclude_newer(tool_uv.get("exclude-newer"), place),
        index_url=_url(tool_uv.get("index-url"), place + ": [tool.uv] index-url"),
        extra_index_urls=tuple(_url(url, place + ": [tool.uv] extra-index-url") or "" for url in extra),
        indexes=tuple(_index(index, "%s: [[tool.uv.index]] %d" % (place, number))
                      for number, index in enumerate(indexes, 1)),
        lock=lock,
    )


def _from_object(uv_object: Any, place: str, shared_host: bool, lock: str | None) -> Parsed:
    if not isinstance(uv_object, dict):
        raise BadDeclaration(
            '%s must be an object such as {"dependencies": ["pandas"]}, got %s' % (place, _type(uv_object)))
    dependencies = uv_object.get("dependencies", [])
    if not isinstance(dependencies, list):
        raise BadDeclaration("%s.dependencies must be a list of requirement strings" % place)
    return Parsed(
        place=place,
        dependencies=_requirements(dependencies, place + ".dependencies", shared_host),
        requires_python=_requires_python(uv_object.get("requires-python"), place),
        prerelease=_prerelease(uv_object.get("prerelease"), place + ".prerelease"),
        lock=lock,
    )


def _requirements(values: list[Any], where: str, shared_host: bool) -> tuple[str, ...]:
    if len(values) > MAX_DEPENDENCIES:
        raise BadDeclaration("%s: %d requirements; uvkerneld installs up to %d per notebook "
                             "(MAX_DEPENDENCIES)" % (where, len(values), MAX_DEPENDENCIES))
    checked = []
    for number, value in enumerate(values):
        at = "%s[%d]" % (where, number)
        if not isinstance(value, str):
            raise BadDeclaration("%s: %s is not a requirement string" % (at, _type(value)))
        try:
            pipargs.check_text(value, "requirement")
        except pipargs.PipUsageError as exc:
            raise BadDeclaration("%s: %s" % (at, exc)) from None
        try:
            url = Requirement(value).url
        except InvalidRequirement as exc:
            reason = str(exc).splitlines()[0]
            raise BadDeclaration(
                "%s: %r is not a requirement: %s; write it as NAME or NAME SPECIFIER, such as 'numpy>=1.26'"
                % (at, value, reason)) from None
        if url and not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", url) and not url.startswith("/"):
            # Relative to what? The daemon reads the declaration far from the notebook's folder.
            raise BadDeclaration("%s: the path in %r must be absolute (or a file:// URL)" % (at, value))
        if shared_host:
            refusal = pipargs.shared_host_refusal(value)
            if refusal:
                raise BadDeclaration("%s: %s" % (at, refusal))
        checked.append(value.strip())
    return tuple(checked)


def _requires_python(value: Any, place: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadDeclaration("%s: requires-python must be a version specifier such as \">=3.10\"" % place)
    try:
        SpecifierSet(value)
    except InvalidSpecifier:
        raise BadDeclaration(
            "%s: requires-python %r is not a version specifier; write one such as \">=3.10\"" % (place, value)
        ) from None
    return value


def _prerelease(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if value not in PRERELEASE_VALUES:
        raise BadDeclaration(
            "%s must be one of %s, got %s" % (where, ", ".join(PRERELEASE_VALUES), _short(value)))
    return str(value)


def check_exclude_newer(value: Any, place: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _EXCLUDE_NEWER.match(value):
        raise BadDeclaration(
            "%s: [tool.uv] exclude-newer must be an RFC 3339 timestamp such as \"2025-01-31T00:00:00Z\", "
            "got %s" % (place, _short(value)))
    return value


def _url(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadDeclaration("%s must be an http(s) URL, got %s" % (where, _type(value)))
    try:
        pipargs.check_text(value, "URL")
        pipargs.check_url(value, "URL")
    except pipargs.PipUsageError as exc:
        raise BadDeclaration("%s: %s" % (where, exc)) from None
    return value


def _index(table: dict[str, Any], where: str) -> dict[str, Any]:
    unknown = sorted(set(table) - set(INDEX_KEYS))
    if unknown:
        raise BadDeclaration("%s: %s not supported by uvkerneld (supported: %s)"
                             % (where, ", ".join(unknown), ", ".join(INDEX_KEYS)))
    index: dict[str, Any] = {"url": _url(table.get("url"), where + " url")}
    if index["url"] is None:
        raise BadDeclaration("%s needs a url" % where)
    name = table.get("name")
    if name is not None:
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            raise BadDeclaration("%s: name must be letters, digits, '.', '_' or '-'" % where)
        index["name"] = name
    for flag in ("default", "explicit"):
        if flag in table:
            if not isinstance(table[flag], bool):
                raise BadDeclaration("%s: %s must be true or false" % (where, flag))
            index[flag] = table[flag]
    if index.get("explicit"):
        # An explicit index serves only packages pinned to it in [tool.uv.sources], which uvkerneld
        # does not support: used for everything instead, it would shadow PyPI's names.
        raise BadDeclaration("%s: explicit = true is not supported by uvkerneld (it needs "
                             "[tool.uv.sources]); remove explicit to search this index for every package, "
                             "or remove the index" % where)
    return index


def _normal_requirement(text: str) -> str:
    requirement = Requirement(text)
    requirement.name = pipargs.normalize_name(requirement.name)
    return str(requirement)


def requirement_names(requirements: list[str] | tuple[str, ...]) -> dict[str, str]:
    """name -> requirement, as the requirements table keys them (a URL or path keys itself)."""
    return {pipargs.requirement_name(text) or text: text for text in requirements}


@dataclasses.dataclass(frozen=True)
class LockPackage:
    """One ``[[package]]`` table of a uv lockfile."""

    name: str  # normalized
    version: str | None
    source_kind: str  # "registry", "url", "git", "path", "directory", "editable", "virtual"; "?" if none
    source: str


def lock_packages(text: str) -> tuple[LockPackage, ...]:
    """The packages of a ``"uv.lock"`` text (the one reader of its [[package]] tables). Parses the
    whole lock (~0.3 s per MB): call it off the event loop. Raises BadDeclaration."""
    try:
        lock = tomlcompat.loads(text)
    except tomlcompat.TOMLDecodeError as exc:
        raise BadDeclaration('metadata "uv.lock" is not a uv lockfile (invalid TOML: %s); %s'
                             % (exc, LOCK_HINT)) from None
    tables = lock.get("package", [])
    if not isinstance(tables, list) or not all(isinstance(table, dict) for table in tables):
        raise BadDeclaration('metadata "uv.lock" is not a uv lockfile ([[package]] tables); %s' % LOCK_HINT)
    packages = []
    for table in tables:
        source = table.get("source")
        kind, value = next(iter(source.items())) if isinstance(source, dict) and source else ("?", "")
        version = table.get("version")
        packages.append(LockPackage(
            name=pipargs.normalize_name(str(table.get("name", "?"))),
            version=None if version is None else str(version), source_kind=str(kind), source=str(value)))
    return tuple(packages)


def check_lock(parsed: Parsed, shared_host: bool) -> None:
    """``parsed.lock`` before uv reads it: a uv lockfile whose registry packages come from PyPI or an
    index the declaration names (its pins are installed by name from those indexes: a lock made
    against another index would get a same-named package from PyPI), and on a shared host nothing
    but registry packages over http(s) (uv checking a lock would otherwise look at the paths and
    repositories it names, as the daemon). Raises BadDeclaration; call it off the event loop."""
    allowed = parsed.index_urls()
    for package in lock_packages(parsed.lock or ""):
        kind, value, name = package.source_kind, package.source, package.name
        web = value.lower().startswith(("https://", "http://"))
        if kind == "registry" and (web or not shared_host):
            if _index_key(value) not in allowed:
                raise BadDeclaration(
                    'metadata "uv.lock": %s comes from the index %s, which %s does not name (it names: %s); '
                    "declare that index in [[tool.uv.index]], or %s"
                    % (name, _short(value), parsed.place, ", ".join(sorted(allowed)), LOCK_HINT))
            continue
        if not shared_host:
            continue
        if kind == "url":
            refusal = pipargs.shared_host_refusal("%s @ %s" % (name, value))
        elif kind == "git":
            refusal = pipargs.BUILD_REFUSED % name
        else:
            refusal = pipargs.LOCAL_PATH_REFUSED % ("%s from %s %s" % (name, kind, value))
        if refusal:
            raise BadDeclaration('metadata "uv.lock": %s' % refusal)


def script_text(parsed: Parsed) -> str:
    """A PEP 723 script holding ``parsed`` for uv (``uv lock --script``, ``uv export --script``)."""
    lines = ["# /// script"]
    if parsed.requires_python:
        lines.append("# requires-python = %s" % _toml_string(parsed.requires_python))
    lines.append("# dependencies = [")
    lines.extend("#     %s," % _toml_string(text) for text in parsed.dependencies)
    lines.append("# ]")
    tool = [
        (key, value) for key, value in (
            ("exclude-newer", parsed.exclude_newer), ("prerelease", parsed.prerelease),
            ("index-url", parsed.index_url),
        ) if value
    ]
    if tool or parsed.extra_index_urls:
        lines += ["#", "# [tool.uv]"]
        lines.extend("# %s = %s" % (key, _toml_string(value)) for key, value in tool)
        if parsed.extra_index_urls:
            lines.append("# extra-index-url = [%s]" % ", ".join(map(_toml_string, parsed.extra_index_urls)))
    for index in parsed.indexes:
        lines += ["#", "# [[tool.uv.index]]"]
        lines.extend("# %s = %s" % (key, "true" if value is True else "false" if value is False
                                    else _toml_string(value)) for key, value in index.items())
    lines.append("# ///")
    return "\n".join(lines) + "\n"


def _toml_string(text: str) -> str:
    # A JSON string is a TOML basic string (same escapes), ASCII-only so nothing needs care.
    return json.dumps(text)


def _type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    return "null" if value is None else names.get(type(value), "a number")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:80] + "..."
