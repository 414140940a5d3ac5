"""The kernel stub's use of nbdecl: when it asks the daemon to ``sync`` a notebook, and what a
notebook that declares nothing costs it (no hashing, no json/re imports)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from kernel_stub import stub
from uvkerneld import nbdecl

REPO = Path(__file__).resolve().parent.parent
SCRIPT = "# /// script\n# dependencies = [\"iniconfig\"]\n# ///\n"


def write_notebook(path: Path, first_code: str = "print(1)", metadata: dict[str, Any] | None = None,
                   outputs: tuple[str, ...] | list[str] = ()) -> Path:
    notebook = {
        "cells": [
            {"cell_type": "markdown", "id": "m1", "metadata": {}, "source": ["# Title"]},
            {"cell_type": "code", "execution_count": None, "id": "c1", "metadata": {}, "source": first_code,
             "outputs": [{"name": "stdout", "output_type": "stream", "text": text} for text in outputs]},
        ],
        "metadata": metadata or {"kernelspec": {"name": "uv", "display_name": "uv"}},
        "nbformat": 4, "nbformat_minor": 5,
    }
    path.write_text(json.dumps(notebook, sort_keys=True, indent=1, ensure_ascii=False) + "\n")
    return path


def test_a_notebook_that_declares_nothing_is_not_synced(tmp_path: Path) -> None:
    path = write_notebook(tmp_path / "plain.ipynb")
    assert stub.declaration_to_sync(str(path), {"declared_digest": None}) is None


def test_a_declaration_never_synced_or_changed_is_synced_and_an_unchanged_one_is_not(tmp_path: Path) -> None:
    path = write_notebook(tmp_path / "juv.ipynb", SCRIPT, {"uv.lock": "version = 1\n"})
    wire = stub.declaration_to_sync(str(path), {"declared_digest": None})
    assert wire is not None and wire["script"] == SCRIPT and wire["script_cell"] == 2
    assert wire["lock"] == "version = 1\n"
    assert stub.declaration_to_sync(str(path), {"declared_digest": "0" * 64}) == wire
    # The digest the daemon recorded at the last sync: nothing to do, no sync call.
    assert stub.declaration_to_sync(str(path), {"declared_digest": nbdecl.digest(wire)}) is None
    write_notebook(path, SCRIPT.replace("iniconfig", "toolz"), {"uv.lock": "version = 1\n"})
    assert stub.declaration_to_sync(str(path), {"declared_digest": nbdecl.digest(wire)}) is not None


def test_a_notebook_whose_declaration_was_deleted_is_synced_to_the_empty_declaration(tmp_path: Path) -> None:
    # Its env was synced to some declaration: syncing nothing takes the declared packages away.
    path = write_notebook(tmp_path / "plain.ipynb")
    wire = stub.declaration_to_sync(str(path), {"declared_digest": "0" * 64})
    assert wire == nbdecl.Declaration().to_wire()
    # Once synced to nothing, later starts sync nothing again (and hash nothing: a constant).
    assert nbdecl.NOTHING_DIGEST == nbdecl.digest(wire)
    assert stub.declaration_to_sync(str(path), {"declared_digest": nbdecl.NOTHING_DIGEST}) is None


def test_an_unreadable_notebook_never_syncs_its_packages_away(tmp_path: Path) -> None:
    path = tmp_path / "bad.ipynb"
    path.write_text("{not json")
    assert stub.declaration_to_sync(str(path), {"declared_digest": "0" * 64}) is None


def test_nteract_metadata_alone_is_a_declaration(tmp_path: Path) -> None:
    path = write_notebook(tmp_path / "nteract.ipynb", metadata={"runt": {"schema_version": "1", "uv": {
        "dependencies": ["toolz"]}}})
    wire = stub.declaration_to_sync(str(path), {})
    assert wire is not None and wire["uv"] == {"dependencies": ["toolz"]}
    assert wire["uv_key"] == "metadata.runt.uv"


@pytest.mark.parametrize("content", [b"{not json", b"", b"\xff\xfe{}", b"[1, 2]"])
def test_an_unreadable_notebook_is_one_line_on_stderr_and_declares_nothing(
    tmp_path: Path, content: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.ipynb"
    path.write_bytes(content)
    assert stub.declaration_to_sync(str(path), {"declared_digest": None}) is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("uvkerneld: not reading declared dependencies: ")
    assert str(path) in err or "not a notebook" in err


def test_a_2_gb_file_is_one_line_on_stderr_within_a_second(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "huge.ipynb"
    with open(path, "wb") as handle:
        handle.truncate(2 * 1024 ** 3)  # sparse
    started = time.monotonic()
    assert stub.declaration_to_sync(str(path), {"declared_digest": "0" * 64}) is None  # env kept as it is
    assert time.monotonic() - started < 1
    err = capsys.readouterr().err
    prefix = "uvkerneld: not reading declared dependencies: %s is 2147.5 MB" % path
    assert err.count("\n") == 1 and err.startswith(prefix)
    assert "declares nothing here" in err


def test_a_missing_notebook_declares_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert stub.declaration_to_sync(str(tmp_path / "unsaved.ipynb"), {"declared_digest": None}) is None
    assert "No such file or directory" in capsys.readouterr().err


@pytest.mark.parametrize("output_bytes", [0, 2 * nbdecl.SMALL_FILE])  # whole parse, fast path
def test_reading_a_plain_notebook_imports_no_json_re_or_hashlib(tmp_path: Path, output_bytes: int) -> None:
    # What every kernel start of a notebook that declares nothing pays: as kernel.json runs the
    # stub (-I -S), reading the declaration must not pull in json, re or hashlib.
    path = write_notebook(tmp_path / "plain.ipynb", outputs=["x" * 1000] * (output_bytes // 1000))
    assert path.stat().st_size > output_bytes
    code = (
        "import sys; sys.path.insert(0, %r); from kernel_stub import stub; "
        "assert stub.declaration_to_sync(%r, {'declared_digest': None}) is None; "
        "print(' '.join(sorted(sys.modules)))" % (str(REPO), str(path))
    )
    result = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True,
                            timeout=30, cwd="/")
    assert result.returncode == 0, result.stderr
    loaded = set(result.stdout.split())
    assert "uvkerneld.nbdecl" in loaded
    assert not {"json", "re", "hashlib"} & loaded, loaded


def test_digest_is_sha256_of_the_ordered_wire_text() -> None:
    # The stub's digest and the daemon's must agree whichever sha256 implementation each imports.
    import hashlib

    wire = {"lock": "x", "script": "# /// script\n# ///", "script_cell": 1, "uv": {"a": [1]}, "uv_key": None}
    text = json.dumps({name: wire[name] for name in ("script", "script_cell", "uv", "uv_key", "lock")},
                      separators=(",", ":"), ensure_ascii=False)
    assert nbdecl.digest(wire) == hashlib.sha256(text.encode()).hexdigest()
