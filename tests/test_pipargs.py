"""What a notebook may ask pip/uv to do: the pure validator shared by the shim and the daemon."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from uvkerneld import pipargs
from uvkerneld.pipargs import PipUsageError, parse_command


def test_install_flags_are_translated_to_uv() -> None:
    command = parse_command(["install", "-U", "--pre", "--no-deps", "-i", "https://idx/simple",
                             "--extra-index-url=https://extra/simple", "-q", "six==1.16.0", "idna"])
    assert command.subcommand == "install"
    assert command.uv_flags == ["--upgrade", "--prerelease=allow", "--no-deps", "--default-index", "https://idx/simple",
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


@pytest.mark.parametrize(
    "flag", ["--target", "--prefix", "--python", "--system", "--user", "--break-system-packages"]
)
def test_flags_that_escape_the_env_are_refused_by_name(flag: str) -> None:
    with pytest.raises(PipUsageError) as caught:
        parse_command(["install", flag, "six"] if flag in ("--system", "--user", "--break-system-packages")
                      else ["install", flag, "/somewhere", "six"])
    assert str(caught.value) == (
        "%s is not allowed: packages always go into this notebook's own environment" % flag)
    assert caught.value.exit_status == 2


@pytest.mark.parametrize(
    "subcommand", ["download", "wheel", "config", "cache", "check", "hash", "inspect", "debug"]
)
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
        (["install", "six\ud800"], "control characters"),
        (["install", "six\ridna"], "control characters"),
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


def test_comments_never_continue_and_includes_may_carry_one(tmp_path: Path) -> None:
    (tmp_path / "base.txt").write_text("six\n")
    (tmp_path / "req.txt").write_text("-r base.txt  # shared pins\n# a comment ending in \\\nidna\n")
    text = pipargs.read_requirements_file(str(tmp_path / "req.txt"))
    assert pipargs.requirement_lines(text) == ["six", "idna"]


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
    assert pipargs.check_requirements_text("six\n./vendored/pkg\n-e /src/lib\n--pre\n") == [
        "./vendored/pkg", "-e /src/lib"]


# --- issue 9: what uv acts on is what was checked --------------------------------------------------

def test_requirement_file_options_become_checked_flags_and_uv_reads_only_requirements() -> None:
    parsed = pipargs.parse_requirements_text(
        "six==1.16.0 \\\n    --hash=sha256:1e61c37477a1626458e36f7b1d82aa5c9b094fa4802892072e49de9c60c4c926\n"
        "-i https://idx/simple\n--extra-index-url=https://extra/simple  # ours\n"
        "--pre\nidna ; python_version > '3'\n"
    )
    assert parsed.options == [("--default-index", "https://idx/simple"), ("--extra-index-url", "https://extra/simple"),
                              ("--prerelease=allow",)]
    assert parsed.render() == (
        "six==1.16.0 --hash=sha256:1e61c37477a1626458e36f7b1d82aa5c9b094fa4802892072e49de9c60c4c926\n"
        "idna ; python_version > '3'\n"
    )


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("--index-url file:///srv/index\nsix\n", "requirements line 1: --index-url must be an http(s) URL"),
        ("-i=file:///srv/index\n", "requirements line 1: -i must be an http(s) URL"),
        ("six\n--extra-index-url /srv/index\n",
         "requirements line 2: --extra-index-url must be an http(s) URL"),
        ("--find-links https://x/links\n", "option --find-links is not supported"),
        ("-f /srv/wheels\n", "option -f is not supported"),
        ("--trusted-host evil.example\n", "option --trusted-host is not supported"),
        ("--no-index\n", "option --no-index is not supported"),
        ("--no-binary :all:\n", "option --no-binary is not supported"),
        ("--config-settings a=b\n", "option --config-settings is not supported"),
        ("-c /etc/pins.txt\n", "option -c is not supported"),
        ("--pre=yes\n", "--pre takes no value"),
        ("six --index-url https://x/simple\n", "only --hash=ALGORITHM:DIGEST may follow a requirement"),
        ("six \\\n--index-url file:///x\n", "only --hash=ALGORITHM:DIGEST may follow a requirement"),
        ("six\r--index-url file:///x\n", "requirements line 2: --index-url must be an http(s) URL"),
        ("six\u2028--index-url file:///x\n", "requirements line 1 has a control character"),
        ("six\x0c-i file:///x\n", "has a control character"),
        ("six\n\ud800\n", "requirements line 2 has a control character"),
        ("pkg @ https://x/${UV_INDEX_TOKEN}/pkg.whl\n", "environment variables are not expanded"),
        ("-i https://${TOKEN}@x/simple\n", "environment variables are not expanded"),
    ],
)
def test_requirement_file_lines_that_escape_the_checks_are_refused(text: str, fragment: str) -> None:
    with pytest.raises(PipUsageError) as caught:
        pipargs.parse_requirements_text(text)
    assert fragment in str(caught.value)


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["install", "pkg @ file://${HOME}/pkg"], "environment variables are not expanded"),
        (["install", "-i", "https://x/simple", "--index-url", "https://y/simple", "six"],
         "given more than once"),
    ],
)
def test_command_line_values_uv_would_expand_or_repeat_are_refused(argv: list[str], fragment: str) -> None:
    with pytest.raises(PipUsageError, match=re.escape(fragment)):
        parse_command(argv)


@pytest.mark.parametrize(
    "requirement, verdict",
    [
        ("six", None),
        ("six==1.16.0", None),
        ('Typing_Extensions[x] >=4 ; python_version >= "3.8"', None),
        ("pkg @ https://host/pkg-1.0-py3-none-any.whl", None),
        ("pkg@https://host/pkg-1.0-py3-none-any.whl#sha256=00", None),
        ("https://host/pkg-1.0-py3-none-any.whl", None),
        ("pkg@file:///home/ub/pkg", "local path"),
        ("pkg @ file:/home/ub/pkg", "local path"),
        ("pkg @ /home/ub/pkg", "local path"),
        ("pkg@./pkg", "local path"),
        ("file:///home/ub/pkg", "local path"),
        ("./pkg", "local path"),
        ("pkg/../../x", "local path"),
        ("dist/pkg-1.0-py3-none-any.whl", "local path"),
        ("pkg @ git+https://host/pkg.git", "pkg needs a build"),
        ("git+https://host/pkg.git", "needs a build"),
        ("pkg @ https://host/pkg-1.0.tar.gz", "pkg needs a build"),
        ("pkg @ https://host/pkg-1.0.zip?x.whl", "pkg needs a build"),
        ("pkg @ ftp://host/pkg-1.0-py3-none-any.whl", "pkg needs a build"),
    ],
)
def test_a_shared_host_takes_wheels_and_index_names_only(requirement: str, verdict: str | None) -> None:
    reason = pipargs.shared_host_refusal(requirement)
    if verdict is None:
        assert reason is None
    else:
        assert reason is not None and verdict in reason


def test_editables_always_need_a_build_on_a_shared_host() -> None:
    assert "needs a build" in pipargs.shared_host_refusal("git+https://host/x.git#egg=x", editable=True)
    assert "local path" in pipargs.shared_host_refusal("/home/ub/src", editable=True)
