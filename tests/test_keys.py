"""Which env a kernel is for: the stub's key resolution, as a pure function."""

from __future__ import annotations

import os

import pytest

from kernel_stub.stub import IDENTITY_MARKER, StubError, identity_fingerprint, parse_argv, resolve_key


def test_explicit_env_name_wins_over_everything() -> None:
    environ = {"UVKERNEL_ENV": "ml", "UVKERNEL_NOTEBOOK": "/n/a.ipynb", "JPY_SESSION_NAME": "/n/b.ipynb"}
    assert resolve_key(environ, "/n")[:2] == ("env", "ml")


def test_explicit_notebook_beats_session_name_and_resolves_against_cwd(tmp_path: os.PathLike) -> None:
    open(os.path.join(str(tmp_path), "report.ipynb"), "w").close()
    environ = {"UVKERNEL_NOTEBOOK": "report.ipynb", "JPY_SESSION_NAME": "/elsewhere/b.ipynb"}
    assert resolve_key(environ, str(tmp_path))[:2] == (
        "notebook", os.path.join(str(tmp_path), "report.ipynb"))


def test_a_relative_notebook_is_looked_up_in_the_shells_folder_first(tmp_path: os.PathLike) -> None:
    # `UVKERNEL_NOTEBOOK=a/report.ipynb jupyter execute a/report.ipynb`: the kernel's cwd is a/.
    shell_dir = str(tmp_path)
    os.mkdir(os.path.join(shell_dir, "a"))
    open(os.path.join(shell_dir, "a", "report.ipynb"), "w").close()
    environ = {"UVKERNEL_NOTEBOOK": "a/report.ipynb", "PWD": shell_dir}
    expected = os.path.join(shell_dir, "a", "report.ipynb")
    assert resolve_key(environ, os.path.join(shell_dir, "a"))[:2] == ("notebook", expected)
    # No such file from the shell's folder (a stale $PWD): the kernel's cwd, as before.
    environ = {"UVKERNEL_NOTEBOOK": "report.ipynb", "PWD": shell_dir}
    assert resolve_key(environ, os.path.join(shell_dir, "a"))[:2] == ("notebook", expected)


def test_a_notebook_key_that_names_no_file_is_refused(tmp_path: os.PathLike) -> None:
    environ = {"UVKERNEL_NOTEBOOK": "a/missing.ipynb", "PWD": "/srv"}
    with pytest.raises(StubError, match=r"UVKERNEL_NOTEBOOK='a/missing.ipynb' names no existing notebook "
                       r"\(looked for /srv/a/missing.ipynb and %s/a/missing.ipynb\)" % tmp_path):
        resolve_key(environ, str(tmp_path))


def test_session_name_absolute_path_as_jupyter_server_sets_it() -> None:
    assert resolve_key({"JPY_SESSION_NAME": "/srv/nb/a.ipynb"}, "/srv/nb")[:2] == (
        "notebook", "/srv/nb/a.ipynb")


def test_relative_session_name_resolves_against_cwd() -> None:
    assert resolve_key({"JPY_SESSION_NAME": "a.ipynb"}, "/srv/nb")[:2] == ("notebook", "/srv/nb/a.ipynb")


def test_relative_session_name_from_an_old_server_does_not_double_the_folder() -> None:
    # Old servers: JPY_SESSION_NAME relative to the server root, cwd = the notebook's folder.
    assert resolve_key({"JPY_SESSION_NAME": "sub/a.ipynb"}, "/root/sub")[:2] == (
        "notebook", "/root/sub/a.ipynb")


@pytest.mark.parametrize("value", ["Console 1", "/srv/nb/script.py", "untitled", ""])
def test_session_names_that_are_not_notebooks_fall_back_to_the_folder(value: str) -> None:
    assert resolve_key({"JPY_SESSION_NAME": value}, "/srv/nb")[:2] == ("dir", "/srv/nb")


def test_no_hints_at_all_gives_the_folder_scratch_env() -> None:
    # nbclient, papermill, nbconvert --execute, voila, jupyter console, VS Code.
    kind, value, note = resolve_key({}, "/srv/nb")
    assert (kind, value, note) == ("dir", "/srv/nb", None)


def test_kernel_started_inside_a_uv_kernel_does_not_reuse_the_parents_env() -> None:
    parent = {"JPY_SESSION_NAME": "/srv/nb/parent.ipynb"}
    child = dict(parent, **{IDENTITY_MARKER: identity_fingerprint(parent)})  # what the parent exported
    kind, value, note = resolve_key(child, "/srv/nb")
    assert (kind, value) == ("dir", "/srv/nb")
    assert note is not None and "inherited" in note and "UVKERNEL_NOTEBOOK" in note


def test_child_kernel_with_a_new_explicit_notebook_gets_that_notebook(tmp_path: os.PathLike) -> None:
    child_notebook = os.path.join(str(tmp_path), "child.ipynb")
    open(child_notebook, "w").close()
    parent = {"JPY_SESSION_NAME": "/srv/nb/parent.ipynb"}
    child = dict(parent, UVKERNEL_NOTEBOOK=child_notebook, **{IDENTITY_MARKER: identity_fingerprint(parent)})
    assert resolve_key(child, "/srv/nb")[:2] == ("notebook", child_notebook)


def test_kernel_restarted_by_the_server_keeps_its_notebook() -> None:
    # jupyter_server builds the env from its own, which carries no marker.
    assert resolve_key({"JPY_SESSION_NAME": "/srv/nb/a.ipynb"}, "/srv/nb")[:2] == (
        "notebook", "/srv/nb/a.ipynb")


def test_symlinked_folders_resolve_to_one_key(tmp_path: os.PathLike) -> None:
    real = os.path.join(str(tmp_path), "real")
    os.mkdir(real)
    link = os.path.join(str(tmp_path), "link")
    os.symlink(real, link)
    assert resolve_key({}, link)[1] == resolve_key({}, real)[1] == real
    assert resolve_key({"JPY_SESSION_NAME": link + "/a.ipynb"}, link)[1] == real + "/a.ipynb"


def test_argv_parsing_keeps_extra_ipykernel_arguments() -> None:
    assert parse_argv(["-f", "/r/k.json", "--debug"]) == ("/r/k.json", ["--debug"])
    assert parse_argv(["--f=/r/k.json"]) == ("/r/k.json", [])
    with pytest.raises(SystemExit, match="usage"):
        parse_argv(["--debug"])
