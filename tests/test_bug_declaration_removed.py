"""Review of issue 11: a notebook whose env was synced to a declaration, and whose declaration the user
then deleted (the PEP 723 cell and metadata removed), is never synced again: the stub sends `sync`
only when the file declares something, so the declared packages stay in the env and `deps` reports
them as "installed with %pip but not declared". The issue asks a restart after an edit of the
declaration to remove what is no longer declared. Fails on 0920afc."""

from __future__ import annotations

import json
from pathlib import Path

from kernel_stub import stub


def test_bug_a_deleted_declaration_is_synced_away(tmp_path: Path) -> None:
    notebook = tmp_path / "nb.ipynb"
    notebook.write_text(json.dumps({"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    # What acquire returns for an env last synced to some declaration.
    acquired = {"declared_digest": "0" * 64}
    assert stub.declaration_to_sync(str(notebook), acquired) is not None, (
        "the env keeps packages the notebook no longer declares")
