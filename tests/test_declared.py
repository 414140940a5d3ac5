"""declared.py: what a notebook's declaration means, and the one-line error for each bad one."""

from __future__ import annotations

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
        '#\n# [[tool.uv.index]]\n# name = "extra"\n# url = "https://example.com/simple"\n# explicit = true\n'
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


def test_the_cell_wins_and_both_places_must_agree() -> None:
    agreeing = wire(JUV_CELL, uv={"dependencies": ["toolz >= 0.12", "iniconfig==1.1.1"]},
                    uv_key=nbdecl.RUNT_UV_KEY)
    parsed = declared.interpret(agreeing, shared_host=False)
    assert parsed is not None and parsed.place == "cell 1 (PEP 723 block)"
    message = bad(wire(JUV_CELL, uv={"dependencies": ["iniconfig==2.0.0"]}, uv_key=nbdecl.RUNT_UV_KEY))
    assert message.startswith("cell 1 (PEP 723 block) and metadata.runt.uv declare different dependencies")
    assert ("only in the cell: iniconfig==1.1.1, toolz>=0.12; only in metadata.runt.uv: iniconfig==2.0.0"
            in message)
    message = bad(wire(JUV_CELL, uv={"dependencies": ["iniconfig==1.1.1", "toolz>=0.12"],
                                     "requires-python": ">=3.12"}, uv_key=nbdecl.LEGACY_UV_KEY))
    assert "requires-python '>=3.11' but metadata.uv says '>=3.12'" in message


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
    declared.check_lock(LOCK, shared_host=True)
    other = LOCK + '\n[[package]]\nname = "localpkg"\nversion = "1.0"\nsource = %s\n' % source
    declared.check_lock(other, shared_host=False)  # a user's own daemon: uv decides
    with pytest.raises(BadDeclaration) as caught:
        declared.check_lock(other, shared_host=True)
    assert caught.value.message.startswith('metadata "uv.lock": ') and expected in caught.value.message


def test_a_lock_that_is_not_toml_says_so() -> None:
    expected = 'metadata "uv.lock" is not a uv lockfile (invalid TOML: '
    with pytest.raises(BadDeclaration, match=re.escape(expected)):
        declared.check_lock("version = \n", shared_host=False)
