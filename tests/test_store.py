"""The SQLite store across versions: an older state db is upgraded in place, a newer one refused."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from uvkerneld import states
from uvkerneld.protocol import EnvKey
from uvkerneld.store import SCHEMA_VERSION, NewerSchema, Store

# The envs table as the first release (schema 1) created it.
SCHEMA_1_ENVS = """
CREATE TABLE envs (
    id TEXT PRIMARY KEY, path TEXT NOT NULL UNIQUE, state TEXT NOT NULL, owner_uid INTEGER,
    key_kind TEXT, key_value TEXT, spec TEXT NOT NULL, python TEXT NOT NULL,
    from_pool INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL, assigned_at REAL,
    last_used_at REAL, error TEXT, UNIQUE (owner_uid, key_kind, key_value)
)
"""


def make_schema_1_db(path: Path) -> None:
    db = sqlite3.connect(str(path))
    with db:
        db.execute("CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
        db.execute("INSERT INTO meta VALUES ('schema_version', '1')")
        db.execute(SCHEMA_1_ENVS)
        db.execute(
            "INSERT INTO envs (id, path, state, owner_uid, key_kind, key_value, spec, python, created_at)"
            " VALUES ('e-000000000001', '/v/e-000000000001', 'assigned', 1000, 'notebook', '/home/u/a.ipynb',"
            " 'spec', 'python3', 1.0)"
        )
    db.close()


def test_a_schema_1_store_is_upgraded_in_place_and_keeps_its_envs(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    make_schema_1_db(path)
    store = Store(path)
    try:
        record = store.find(1000, EnvKey("notebook", "/home/u/a.ipynb"))
        assert record is not None and record.state == states.ASSIGNED and record.notebook_file is None
        store.set_notebook_file(record.id, "1:2:3:4")
        assert [r.id for r in store.find_by_notebook_file(1000, "1:2:3:4")] == [record.id]
        assert store.find_by_notebook_file(1001, "1:2:3:4") == []  # another user's notebook: never
    finally:
        store.close()
    db = sqlite3.connect(str(path))
    assert db.execute("SELECT value FROM meta WHERE name='schema_version'").fetchone()[0] == str(SCHEMA_VERSION)
    db.close()


def test_a_store_from_a_newer_uvkerneld_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    make_schema_1_db(path)
    db = sqlite3.connect(str(path))
    with db:
        db.execute("UPDATE meta SET value='99' WHERE name='schema_version'")
    db.close()
    before = path.read_bytes()
    with pytest.raises(NewerSchema, match="has schema 99, newer than this uvkerneld understands"):
        Store(path)
    assert path.read_bytes() == before
    # The daemon says so in one line and exits; the db is still untouched.
    result = subprocess.run(
        [sys.executable, "-m", "uvkerneld", "--state-dir", str(tmp_path), "--socket", str(tmp_path / "s.sock"),
         "--cache-dir", str(tmp_path / "cache"), "--venvs-dir", str(tmp_path / "venvs"), "--pool-size", "0"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0
    assert "has schema 99, newer than this uvkerneld understands (%d): upgrade uvkerneld" % SCHEMA_VERSION in result.stderr
    assert "Traceback" not in result.stderr
    assert path.read_bytes() == before


def test_rekey_refuses_a_key_that_is_taken(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    try:
        first = store.insert_creating("e-000000000001", tmp_path / "e1", "spec", "python3", 1000, EnvKey("notebook", "/a.ipynb"))
        store.insert_creating("e-000000000002", tmp_path / "e2", "spec", "python3", 1000, EnvKey("notebook", "/b.ipynb"))
        assert store.rekey(first.id, EnvKey("notebook", "/b.ipynb")) is None
        assert store.get(first.id).key == EnvKey("notebook", "/a.ipynb")
        moved = store.rekey(first.id, EnvKey("notebook", "/c.ipynb"))
        assert moved is not None and moved.key == EnvKey("notebook", "/c.ipynb")
    finally:
        store.close()
