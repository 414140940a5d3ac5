"""What a notebook may ask pip/uv to do: the pure validator shared by the shim and the daemon."""

from __future__ import annotations

from pathlib import Path

import pytest

from uvkerneld import pipargs
from uvkerneld.pipargs import PipUsageError, parse_command


def test_install_flags_are_translated_to_uv() -> None:
    command = parse_command(["install", "-U", "--pre", "--no-deps", "-i", "https://idx/simple",
                             "--extra-index-url=https://extra/simple", "-q", "six==1.16.0", "idna"])
    assert command.subcommand == "install"
    assert command.uv_flags == ["--upgrade", "--prerelease=allow", "--no-deps", "--index-url", "https://idx/simple",
                                "--extra-index-url", "https://extra/simple", "--quiet"]
    assert command.packages == ["six==1.16.0", "idna"]
    assert command.requirements == ["six==1.16.0", "idna"]


def test_requirement_and_constraint_files_become_placeholders() -> None:
    command = parse_command(["install", "-r", "req.txt", "-c", "pins.txt"])
    assert command.uv_flags == ["-r", "@file:0", "-c", "@file:1"]
    assert command.files == [("-r", "req.txt"), ("-c", "pins.txt")]


def test_uninstall_accepts_yes_and_list_formats() -> None:
    assert parse_command(["uninstall", "-y", "six"]).packages == ["six"]
    assert parse_command(["list", "--format", "json"]).uv_flags == ["--format", "json"]
    assert parse_command(["freeze"]).uv_flags == []
    assert parse_command(["show", "six"]).packages == ["six"]


@pytest.mark.parametrize("flag", ["--target", "--prefix", "--python", "--system", "--user", "--break-system-packages"])
def test_flags_that_escape_the_env_are_refused_by_name(flag: str) -> None:
    with pytest.raises(PipUsageError) as caught:
        parse_command(["install", flag, "six"] if flag in ("--system", "--user", "--break-system-packages")
                      else ["install", flag, "/somewhere", "six"])
    assert str(caught.value) == "%s is not allowed: packages always go into this notebook's own environment" % flag
    assert caught.value.exit_status == 2


@pytest.mark.parametrize("subcommand", ["download", "wheel", "config", "cache", "check", "hash", "inspect", "debug"])
def test_other_subcommands_are_refused(subcommand: str) -> None:
    with pytest.raises(PipUsageError, match="pip %s is not supported in a uvkerneld kernel" % subcommand):
        parse_command([subcommand])


@pytest.mark.parametrize(
    "argv, fragment",
    [
        ([], "no command given"),
        (["install"], "needs at least one package"),
        (["show"], "needs at least one package name"),
        (["install", "--force-reinstall", "six"], "--force-reinstall is not supported by pip install"),
        (["install", "-i"], "-i needs a value"),
        (["install", "-i", "ftp://x", "six"], "must be an http(s) URL"),
        (["install", "--", "--target=/x"], "is neither a supported flag nor a requirement"),
        (["list", "six"], "takes no package arguments"),
        (["list", "--format", "xml"], "--format must be one of"),
        (["install", "--pre=yes", "six"], "--pre takes no value"),
        (["install", "six\nidna"], "control characters"),
    ],
)
def test_bad_commands_say_what_is_wrong(argv: list[str], fragment: str) -> None:
    with pytest.raises(PipUsageError) as caught:
        parse_command(argv)
    assert fragment in str(caught.value)


def test_a_shell_looking_requirement_is_just_a_requirement_string() -> None:
    command = parse_command(["install", "six; rm -rf /tmp/x"])
    assert command.packages == ["six; rm -rf /tmp/x"]


def test_local_paths_are_noticed() -> None:
    command = parse_command(["install", "./pkg", "-e", "../lib", "dist/x-1.0-py3-none-any.whl", "six"])
    assert command.local_paths == ["./pkg", "../lib", "dist/x-1.0-py3-none-any.whl"]


def test_requirement_names_are_normalized() -> None:
    assert pipargs.requirement_name("Typing_Extensions>=4") == "typing-extensions"
    assert pipargs.requirement_name("requests[socks] @ https://x/y.whl") == "requests"
    assert pipargs.requirement_name("./pkg") is None


def test_requirements_files_are_read_as_the_user_with_includes_inlined(tmp_path: Path) -> None:
    (tmp_path / "base.txt").write_text("six==1.16.0\n")
    (tmp_path / "req.txt").write_text("# app\n-r base.txt\nidna  # inline comment\n")
    text = pipargs.read_requirements_file(str(tmp_path / "req.txt"))
    assert "six==1.16.0" in text and "-r" not in text
    assert pipargs.requirement_lines(text) == ["six==1.16.0", "idna"]


def test_requirements_file_errors(tmp_path: Path) -> None:
    with pytest.raises(PipUsageError, match="cannot read"):
        pipargs.read_requirements_file(str(tmp_path / "missing.txt"))
    loop = tmp_path / "loop.txt"
    loop.write_text("-r loop.txt\n")
    with pytest.raises(PipUsageError, match="includes itself"):
        pipargs.read_requirements_file(str(loop))
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe")
    with pytest.raises(PipUsageError, match="not UTF-8"):
        pipargs.read_requirements_file(str(binary))


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("-r /root/secret.txt\n", "option -r is not supported"),
        ("--target /x\n", "--target is not allowed"),
        ("--find-links /srv/wheels\n", "option --find-links is not supported"),
    ],
)
def test_daemon_refuses_requirement_file_lines_that_name_paths(text: str, fragment: str) -> None:
    with pytest.raises(PipUsageError, match=fragment):
        pipargs.check_requirements_text(text)


def test_daemon_reports_local_paths_in_requirement_files() -> None:
    assert pipargs.check_requirements_text("six\n./vendored/pkg\n-e /src/lib\n--pre\n") == ["./vendored/pkg", "-e /src/lib"]
