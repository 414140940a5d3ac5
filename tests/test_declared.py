"""declared.py: what a notebook's declaration means, and the one-line error for each bad one."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import tomllib

from uvkerneld import declared, nbdecl
from uvkerneld.protocol import BadDeclaration

JUV_CELL = """# /// script
# requires-python = ">=3.11"
# dependencies = [
#     "iniconfig==1.1.1",
#     "Toolz>=0.12",
# ]
#
# [tool.uv]
# exclude-newer = "2025-01-31T00:00:00Z"
# ///
"""


def wire(script: str | None = None, uv: Any = None, uv_key: str | None = None, lock: Any = None,
         cell: int | None = None) -> dict[str, Any]:
    return nbdecl.Declaration(script, cell or (1 if script is not None else None), uv, uv_key, lock).to_wire()


def bad(wire_dict: dict[str, Any], shared_host: bool = False) -> str:
    with pytest.raises(BadDeclaration) as caught:
        declared.interpret(wire_dict, shared_host)
    message = caught.value.message
    assert "\n" not in message, message
    return message


def test_a_juv_cell_is_read_with_its_tool_uv_settings() -> None:
    parsed = declared.interpret(wire(JUV_CELL), shared_host=False)
    assert parsed is not None
    assert parsed.place == "cell 1 (PEP 723 block)"
    assert parsed.dependencies == ("iniconfig==1.1.1", "Toolz>=0.12")
    assert parsed.requires_python == ">=3.11"
    assert parsed.exclude_newer == "2025-01-31T00:00:00Z"
    assert parsed.names() == {"iniconfig", "toolz"}
    assert parsed.uv_flags() == ["--exclude-newer", "2025-01-31T00:00:00Z"]
    assert parsed.uv_flags(with_exclude_newer=False) == []


def test_the_nteract_object_in_both_places() -> None:
    for key in (nbdecl.RUNT_UV_KEY, nbdecl.LEGACY_UV_KEY):
        parsed = declared.interpret(
            wire(uv={"dependencies": ["tabulate"], "requires-python": ">=3.10", "prerelease": "allow",
                     "env_id": "ignored"}, uv_key=key), shared_host=False)
        assert parsed is not None and parsed.place == key
        assert parsed.dependencies == ("tabulate",) and parsed.prerelease == "allow"
        assert parsed.uv_flags() == ["--prerelease", "allow"]


def test_script_text_round_trips_through_toml_and_the_parser() -> None:
    cell = JUV_CELL.replace(
        "# ///\n",
        '# index-url = "https://pypi.org/simple"\n# extra-index-url = ["https://example.org/simple"]\n'
        '#\n# [[tool.uv.index]]\n# name = "extra"\n# url = "https://example.com/simple"\n# default = false\n'
        "# ///\n")
    parsed = declared.interpret(wire(cell), shared_host=False)
    assert parsed is not None
    again = declared.interpret(wire(declared.script_text(parsed)), shared_host=False)
    assert again == parsed
    assert parsed.uv_flags() == [
        "--exclude-newer", "2025-01-31T00:00:00Z", "--default-index", "https://pypi.org/simple",
        "--extra-index-url", "https://example.org/simple", "--index", "extra=https://example.com/simple"]
    body = "".join(line[2:] + "\n" for line in declared.script_text(parsed).splitlines()[1:-1])
    assert tomllib.loads(body)["dependencies"] == ["iniconfig==1.1.1", "Toolz>=0.12"]


def test_the_cell_wins_and_a_mirror_that_disagrees_is_drift_not_an_error() -> None:
    """`uvkernelctl lock` writes metadata.runt.uv as a mirror of the block; `juv add` then changes only
    the block. The block is what gets installed; the mirror's disagreement is a line for `deps`."""
    agreeing = wire(JUV_CELL, uv={"dependencies": ["toolz >= 0.12", "iniconfig==1.1.1"]},
                    uv_key=nbdecl.RUNT_UV_KEY)
    parsed = declared.interpret(agreeing, shared_host=False)
    assert parsed is not None and parsed.place == "cell 1 (PEP 723 block)"
    assert declared.mirror_disagreement(agreeing) is None
    other = wire(JUV_CELL, uv={"dependencies": ["iniconfig==2.0.0"]}, uv_key=nbdecl.RUNT_UV_KEY)
    assert declared.interpret(other, shared_host=False) == parsed
    message = declared.mirror_disagreement(other)
    assert message is not None and message.startswith(
        "metadata.runt.uv lists other dependencies than cell 1 (PEP 723 block) (only in the cell: "
        "iniconfig==1.1.1, toolz>=0.12; only in metadata.runt.uv: iniconfig==2.0.0): it is not used")
    python = wire(JUV_CELL, uv={"dependencies": ["iniconfig==1.1.1", "toolz>=0.12"],
                                "requires-python": ">=3.12"}, uv_key=nbdecl.LEGACY_UV_KEY)
    assert declared.interpret(python, shared_host=False) == parsed
    assert "metadata.uv says requires-python '>=3.12' but cell 1 (PEP 723 block) says '>=3.11'" in str(
        declared.mirror_disagreement(python))
    # An invalid mirror is ignored too (the block is valid): drift, with the mirror's own error.
    broken = wire(JUV_CELL, uv={"dependencies": ["numpy>="]}, uv_key=nbdecl.RUNT_UV_KEY)
    assert declared.interpret(broken, shared_host=True) == parsed
    assert str(declared.mirror_disagreement(broken)).startswith(
        "metadata.runt.uv.dependencies[0]: 'numpy>=' is not a requirement")
    # No mirror, or a block that is itself wrong (interpret says so): nothing to report.
    assert declared.mirror_disagreement(wire(JUV_CELL)) is None
    bad_block = wire("# /// script\n# x = [\n# ///\n", uv={}, uv_key="metadata.uv")
    assert declared.mirror_disagreement(bad_block) is None


def test_index_default_replaces_pypi_and_explicit_is_refused() -> None:
    def cell(index: str) -> dict[str, Any]:
        return wire("# /// script\n# dependencies = [\"iniconfig\"]\n#\n# [[tool.uv.index]]\n"
                    '# url = "https://example.com/simple"\n%s# ///\n' % index)

    parsed = declared.interpret(cell("# default = true\n"), shared_host=False)
    assert parsed is not None
    # --index would leave PyPI as a fallback for what the index lacks; default = true means "not PyPI".
    assert parsed.uv_flags() == ["--default-index", "https://example.com/simple"]
    assert parsed.index_urls() == {"https://example.com/simple"}
    plain = declared.interpret(cell(""), shared_host=False)
    assert plain is not None and plain.index_urls() == {"https://example.com/simple", declared.PYPI}
    explicit = bad(cell("# explicit = true\n"))
    assert "[[tool.uv.index]] 1: explicit = true is not supported by uvkerneld" in explicit
    two = cell('# default = true\n#\n# [tool.uv]\n# index-url = "https://example.org/simple"\n')
    assert "more than one default index" in bad(two)


@pytest.mark.parametrize(("declaration", "expected"), [
    (wire("# /// script\n# dependencies = [\n#   \"a\" \"b\"\n# ]\n# ///\n", cell=3),
     "cell 3 (PEP 723 block): invalid TOML: Unclosed array (line 3 of the cell)"),
    (wire("x = 1\n# /// script\n# dependencies = [\"a\"]\n# [tool.uv]\n# foo\n# ///\n"),
     "cell 1 (PEP 723 block): invalid TOML: Expected '=' after a key in a key/value pair "
     "(line 5 of the cell)"),
    (wire("# /// script\n# dependencies = [\"a\"]\n"),
     "cell 1 (PEP 723 block): '# /// script' opens no complete block"),
    (wire("# /// script\n# dependencies = [\"numpy>=\"]\n# ///\n"),
     "cell 1 (PEP 723 block): dependencies[0]: 'numpy>=' is not a requirement: "),
    (wire(uv={"dependencies": ["ok", "numpy>="]}, uv_key=nbdecl.RUNT_UV_KEY),
     "metadata.runt.uv.dependencies[1]: 'numpy>=' is not a requirement: "),
    (wire(uv={"dependencies": [3]}, uv_key=nbdecl.LEGACY_UV_KEY),
     "metadata.uv.dependencies[0]: a number is not a requirement string"),
    (wire(uv=["pandas"], uv_key=nbdecl.RUNT_UV_KEY),
     'metadata.runt.uv must be an object such as {"dependencies": ["pandas"]}, got a list'),
    (wire("# /// script\n# dependencies = []\n# [tool.uv]\n# sources = {x = {path = \"/x\"}}\n# ///\n"),
     "cell 1 (PEP 723 block): [tool.uv] sources is not supported by uvkerneld (supported: exclude-newer, "),
    (wire("# /// script\n# dependencies = []\n# [tool.uv]\n# index-url = \"file:///srv/wheels\"\n# ///\n"),
     "cell 1 (PEP 723 block): [tool.uv] index-url: URL must be an http(s) URL, got 'file:///srv/wheels'"),
    (wire("# /// script\n# requires-python = \"3.11+\"\n# ///\n"),
     "cell 1 (PEP 723 block): requires-python '3.11+' is not a version specifier"),
    (wire("# /// script\n# dependencies = []\n# [tool.uv]\n# exclude-newer = \"last week\"\n# ///\n"),
     "cell 1 (PEP 723 block): [tool.uv] exclude-newer must be an RFC 3339 timestamp"),
    (wire(uv={"dependencies": [], "prerelease": "sometimes"}, uv_key=nbdecl.RUNT_UV_KEY),
     "metadata.runt.uv.prerelease must be one of disallow, allow,"),
    (wire(uv={"dependencies": ["x @ ${HOME}/x.whl"]}, uv_key=nbdecl.RUNT_UV_KEY),
     "metadata.runt.uv.dependencies[0]: requirement 'x @ ${HOME}/x.whl' uses ${...}"),
    (wire(uv={"dependencies": ["pkg @ ./pkg"]}, uv_key=nbdecl.RUNT_UV_KEY),
     "metadata.runt.uv.dependencies[0]: the path in 'pkg @ ./pkg' must be absolute (or a file:// URL)"),
    (wire(lock="version = 1\n"),
     'metadata "uv.lock" holds a lock but the notebook declares no dependencies to go with it'),
    (wire(JUV_CELL, lock={"not": "text"}), 'metadata "uv.lock" must be the text of a uv lockfile'),
])
def test_each_bad_declaration_gets_one_line_naming_its_place(
    declaration: dict[str, Any], expected: str
) -> None:
    assert expected in bad(declaration)


@pytest.mark.parametrize("requirement", [
    "pkg @ file:///srv/pkg", "pkg @ git+https://example.com/pkg.git", "pkg @ https://example.com/pkg-1.0.tar.gz",
])
def test_a_shared_host_refuses_what_pip_refuses(requirement: str) -> None:
    declaration = wire(uv={"dependencies": [requirement]}, uv_key=nbdecl.RUNT_UV_KEY)
    assert declared.interpret(declaration, shared_host=False) is not None  # a user's own daemon may
    message = bad(declaration, shared_host=True)
    assert message.startswith("metadata.runt.uv.dependencies[0]: ")
    assert "shared host" in message


def test_a_declaration_of_nothing_means_nothing() -> None:
    assert declared.interpret(wire(), shared_host=False) is None
    parsed = declared.interpret(wire(uv={}, uv_key=nbdecl.RUNT_UV_KEY), shared_host=False)
    assert parsed is not None and parsed.dependencies == ()


LOCK = """version = 1
requires-python = ">=3.11"

[[package]]
name = "iniconfig"
version = "1.1.1"
source = { registry = "https://pypi.org/simple" }
"""


@pytest.mark.parametrize(("source", "expected"), [
    ('{ path = "/home/a/localpkg-1.0-py3-none-any.whl" }',
     "installing from a local path (localpkg from path "),
    ('{ directory = "/home/a/src" }', "installing from a local path (localpkg from directory /home/a/src)"),
    ('{ editable = "/home/a/src" }', "installing from a local path (localpkg from editable"),
    ('{ git = "https://example.com/x.git?rev=1#abc" }', "localpkg needs a build"),
    ('{ url = "https://example.com/localpkg-1.0.tar.gz" }', "localpkg needs a build"),
    ('{ registry = "file:///srv/index" }', "installing from a local path (localpkg from registry file:"),
])
def test_a_shared_host_refuses_a_lock_with_packages_from_elsewhere(source: str, expected: str) -> None:
    declared.check_lock(locked(LOCK), shared_host=True)
    other = LOCK + '\n[[package]]\nname = "localpkg"\nversion = "1.0"\nsource = %s\n' % source
    if "registry" not in source:
        declared.check_lock(locked(other), shared_host=False)  # a user's own daemon: uv decides
    with pytest.raises(BadDeclaration) as caught:
        declared.check_lock(locked(other), shared_host=True)
    assert caught.value.message.startswith('metadata "uv.lock": ') and expected in caught.value.message


def locked(lock: str, tool_uv: str = "") -> declared.Parsed:
    parsed = declared.interpret(wire(JUV_CELL.replace("# ///\n", tool_uv + "# ///\n"), lock=lock), False)
    assert parsed is not None
    return parsed


@pytest.mark.parametrize("shared_host", [False, True])
def test_a_lock_from_an_index_the_declaration_does_not_name_is_refused(shared_host: bool) -> None:
    """Its pins are installed by name from the declared indexes (or PyPI): a lock made against a
    private index would otherwise install PyPI's package of the same name."""
    private = LOCK.replace("https://pypi.org/simple", "https://pkgs.example.com/simple/")
    with pytest.raises(BadDeclaration) as caught:
        declared.check_lock(locked(private), shared_host)
    assert caught.value.message == (
        'metadata "uv.lock": iniconfig comes from the index \'https://pkgs.example.com/simple/\', '
        "which cell 1 (PEP 723 block) does not name (it names: https://pypi.org/simple); declare that "
        "index in [[tool.uv.index]], or %s" % declared.LOCK_HINT)
    declared.check_lock(locked(private, '# extra-index-url = ["https://pkgs.example.com/simple"]\n'),
                        shared_host)
    # A default index replaces PyPI: a PyPI package in the lock is then from elsewhere too.
    with pytest.raises(BadDeclaration, match=re.escape("iniconfig comes from the index 'https://pypi.org/simple'")):
        declared.check_lock(locked(LOCK, '# index-url = "https://pkgs.example.com/simple"\n'), shared_host)


def test_the_locks_packages_are_read_in_one_place() -> None:
    packages = declared.lock_packages(LOCK + '\n[[package]]\nname = "Local_Pkg"\nversion = "1.0"\n'
                                      'source = { git = "https://example.com/x.git" }\n')
    assert packages == (
        declared.LockPackage("iniconfig", "1.1.1", "registry", "https://pypi.org/simple"),
        declared.LockPackage("local-pkg", "1.0", "git", "https://example.com/x.git"))
    with pytest.raises(BadDeclaration, match="is not a uv lockfile"):
        declared.lock_packages("package = [1, 2]\n")


def test_a_deeply_nested_block_or_lock_is_a_bad_declaration() -> None:
    deep = "[" * 3000 + "]" * 3000
    message = bad(wire("# /// script\n# dependencies = []\n# x = %s\n# ///\n" % deep))
    assert message.startswith("cell 1 (PEP 723 block): invalid TOML: arrays or tables nested too deeply")
    expected = "not a uv lockfile (invalid TOML: arrays or tables nested too deeply"
    with pytest.raises(BadDeclaration, match=re.escape(expected)):
        declared.lock_packages("x = %s\n" % deep)


def test_a_declaration_is_bounded() -> None:
    """Each bound, with one more than it allows: the daemon parses declarations users send."""
    many = ["p%d" % number for number in range(declared.MAX_DEPENDENCIES + 1)]
    assert "dependencies: 1001 requirements; uvkerneld installs up to 1000 per notebook" in bad(
        wire(uv={"dependencies": many}, uv_key=nbdecl.RUNT_UV_KEY))
    assert declared.interpret(wire(uv={"dependencies": many[:-1]}, uv_key=nbdecl.RUNT_UV_KEY), False)
    lines = "".join("#   %s,\n" % json.dumps(name) for name in many)
    assert "cell 1 (PEP 723 block): dependencies: 1001 requirements" in bad(
        wire("# /// script\n# dependencies = [\n%s# ]\n# ///\n" % lines))
    big_cell = JUV_CELL + "x = 1\n" * (declared.MAX_SCRIPT_CHARS // 6)
    assert "cell 1 (PEP 723 block): the cell holding the block is %d characters; uvkerneld reads up to %d" % (
        len(big_cell), declared.MAX_SCRIPT_CHARS) in bad(wire(big_cell))
    big_lock = LOCK + "#" * declared.MAX_LOCK_CHARS
    assert 'metadata "uv.lock" is %d characters; uvkerneld reads locks of up to' % len(big_lock) in bad(
        wire(JUV_CELL, lock=big_lock))
    urls = "".join('#   "https://example.com/%d/simple",\n' % number
                   for number in range(declared.MAX_INDEXES + 1))
    assert "[tool.uv] names 17 indexes; uvkerneld uses up to 16" in bad(
        wire("# /// script\n# [tool.uv]\n# extra-index-url = [\n%s# ]\n# ///\n" % urls))


def test_a_lock_that_is_not_toml_says_so() -> None:
    expected = 'metadata "uv.lock" is not a uv lockfile (invalid TOML: '
    with pytest.raises(BadDeclaration, match=re.escape(expected)):
        declared.check_lock(locked("version = \n"), shared_host=False)


def test_a_syncs_log_line_holds_a_bounded_part_of_the_requirements() -> None:
    from uvkerneld import envsync

    assert envsync._short_list(("iniconfig==2.0.0", "toolz")) == "iniconfig==2.0.0 toolz"
    line = envsync._short_list(tuple("p%d>=1" % number for number in range(declared.MAX_DEPENDENCIES)))
    assert len(line) < 450 and line.endswith("... (1000 requirements)")
