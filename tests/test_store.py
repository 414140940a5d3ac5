"""The SQLite store across versions: an older state db is upgraded in place, a newer one refused."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from helpers import Daemon, Layout

from uvkerneld import states
from uvkerneld.protocol import EnvKey
from uvkerneld.store import SCHEMA_VERSION, NewerSchema, Store, StoreDamaged

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
    (version,) = db.execute("SELECT value FROM meta WHERE name='schema_version'").fetchone()
    assert version == str(SCHEMA_VERSION)
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
        [sys.executable, "-m", "uvkerneld", "--state-dir", str(tmp_path),
         "--socket", str(tmp_path / "s.sock"), "--cache-dir", str(tmp_path / "cache"),
         "--venvs-dir", str(tmp_path / "venvs"), "--pool-size", "0"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0
    assert ("has schema 99, newer than this uvkerneld understands (%d): upgrade uvkerneld"
            % SCHEMA_VERSION) in result.stderr
    assert "Traceback" not in result.stderr
    assert path.read_bytes() == before


def test_rekey_refuses_a_key_that_is_taken(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    try:
        first = store.insert_creating("e-000000000001", tmp_path / "e1", "spec", "python3", 1000,
                                      EnvKey("notebook", "/a.ipynb"))
        store.insert_creating("e-000000000002", tmp_path / "e2", "spec", "python3", 1000,
                              EnvKey("notebook", "/b.ipynb"))
        assert store.rekey(first.id, EnvKey("notebook", "/b.ipynb")) is None
        assert store.get(first.id).key == EnvKey("notebook", "/a.ipynb")
        moved = store.rekey(first.id, EnvKey("notebook", "/c.ipynb"))
        assert moved is not None and moved.key == EnvKey("notebook", "/c.ipynb")
    finally:
        store.close()


# --- every shape a release before user_version left behind (from `git log -p uvkerneld/store.py`) ---

_META = "CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)"
_ENVS_BY_STATE = "CREATE INDEX envs_by_state ON envs (state, spec)"
_INSTALLS = """CREATE TABLE installs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, env_id TEXT NOT NULL, uid INTEGER NOT NULL,
    subcommand TEXT NOT NULL, argv TEXT NOT NULL, queued_at REAL NOT NULL, started_at REAL,
    finished_at REAL, exit_status INTEGER
)"""
_INSTALLS_BY_ENV = "CREATE INDEX installs_by_env ON installs (env_id, id)"
_REQUIREMENTS = """CREATE TABLE requirements (
    env_id TEXT NOT NULL, name TEXT NOT NULL, requirement TEXT NOT NULL, added_at REAL NOT NULL,
    PRIMARY KEY (env_id, name)
)"""
_KERNELS = """CREATE TABLE kernels (
    env_id TEXT NOT NULL, pid INTEGER NOT NULL, started_at REAL NOT NULL, PRIMARY KEY (env_id, pid)
)"""
_SCHEMA_2_ENVS = SCHEMA_1_ENVS.replace("error TEXT,", "error TEXT, notebook_file TEXT,")
_ENVS_BY_NOTEBOOK_FILE = "CREATE INDEX envs_by_notebook_file ON envs (owner_uid, notebook_file)"

_FIRST = [_META, SCHEMA_1_ENVS, _ENVS_BY_STATE]
_WITH_INSTALLS = [*_FIRST, _INSTALLS, _INSTALLS_BY_ENV, _REQUIREMENTS]
_WITH_KERNELS = [*_WITH_INSTALLS, _KERNELS]
_SCHEMA_2 = [_META, _SCHEMA_2_ENVS, _ENVS_BY_STATE, _INSTALLS, _INSTALLS_BY_ENV, _KERNELS, _REQUIREMENTS,
             _ENVS_BY_NOTEBOOK_FILE]
# The commit that introduced the shape: (its meta schema_version, its statements), oldest first.
LEGACY_SHAPES: dict[str, tuple[int, list[str]]] = {
    "927afdb-first-release": (1, _FIRST),
    "cf5ca74-installs": (1, _WITH_INSTALLS),
    "4a8ca11-kernels": (1, _WITH_KERNELS),
    "af78138-notebook-file": (2, _SCHEMA_2),
    "619b985-store-id": (2, _SCHEMA_2),  # and a store_id row in meta
}
OLD_STORE_ID = "0123456789abcdef"
KEPT, POOLED, REMOVED = "e-00000000000a", "e-00000000000b", "e-00000000000c"  # REMOVED: rows only, no env


def make_legacy_db(path: Path, shape: str) -> None:
    """A db as that release left it, in WAL mode as it ran, with rows in every table it had."""
    version, statements = LEGACY_SHAPES[shape]
    db = sqlite3.connect(str(path), isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    tables = set()
    db.execute("BEGIN")
    for statement in statements:
        db.execute(statement)
        if statement.startswith("CREATE TABLE"):
            tables.add(statement.split()[2])
    db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(version),))
    if shape.endswith("store-id"):
        db.execute("INSERT INTO meta VALUES ('store_id', ?)", (OLD_STORE_ID,))
    db.execute(
        "INSERT INTO envs (id, path, state, owner_uid, key_kind, key_value, spec, python, from_pool,"
        " created_at, assigned_at, last_used_at, error) VALUES (?, '/v/a', 'assigned', 1000, 'notebook',"
        " '/home/u/a.ipynb', 'spec-a', '/usr/bin/python3', 1, 10.0, 11.0, 12.0, NULL)", (KEPT,))
    db.execute("INSERT INTO envs (id, path, state, spec, python, created_at, error) VALUES"
               " (?, '/v/b', 'broken', 'spec-b', 'python3', 20.0, 'its interpreter was missing')", (POOLED,))
    if version == 2:
        db.execute("UPDATE envs SET notebook_file='1:2:3:4' WHERE id=?", (KEPT,))
    if "installs" in tables:
        installs = ((KEPT, ["install", "six"]), (REMOVED, ["install", "attrs"]), (KEPT, ["uninstall", "six"]))
        for env_id, argv in installs:
            db.execute("INSERT INTO installs (env_id, uid, subcommand, argv, queued_at, started_at,"
                       " finished_at, exit_status) VALUES (?, 1000, ?, ?, 30.0, 31.0, 32.0, 0)",
                       (env_id, argv[0], json.dumps(argv)))
        for env_id, name in ((KEPT, "six"), (REMOVED, "attrs")):
            db.execute("INSERT INTO requirements VALUES (?, ?, ?, 33.0)", (env_id, name, name + ">=1"))
    if "kernels" in tables:
        db.execute("INSERT INTO kernels VALUES (?, 4242, 34.0)", (KEPT,))
        db.execute("INSERT INTO kernels VALUES (?, 4343, 34.0)", (REMOVED,))
    db.execute("COMMIT")
    db.close()


def schema_of(path: Path) -> dict[str, Any]:
    """Columns, foreign keys and indexes of each table: what two dbs must share to be the same schema."""
    db = sqlite3.connect(str(path))
    try:
        tables = [row[0] for row in
                  db.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
        return {
            table: {
                "columns": db.execute("PRAGMA table_info(%s)" % table).fetchall(),
                "foreign_keys": db.execute("PRAGMA foreign_key_list(%s)" % table).fetchall(),
                "indexes": sorted(
                    (row[1], row[2], [column[2] for column in db.execute("PRAGMA index_info(%s)" % row[1])])
                    for row in db.execute("PRAGMA index_list(%s)" % table)
                    if not row[1].startswith("sqlite_autoindex")  # named after the table's creation
                ) + sorted((row[2], row[3]) for row in db.execute("PRAGMA index_list(%s)" % table)),
            }
            for table in tables
        }
    finally:
        db.close()


@pytest.mark.parametrize("shape", list(LEGACY_SHAPES))
def test_every_older_store_is_upgraded_once_and_keeps_its_data(tmp_path: Path, shape: str) -> None:
    path = tmp_path / "state.db"
    make_legacy_db(path, shape)
    legacy_version, statements = LEGACY_SHAPES[shape]
    had_installs = _INSTALLS in statements
    store = Store(path)
    try:
        assert store.migrated == list(range(legacy_version + 1, SCHEMA_VERSION + 1))
        kept = store.get(KEPT)
        assert kept is not None
        assert (kept.state, kept.owner_uid, kept.key, kept.spec, kept.python) == (
            states.ASSIGNED, 1000, EnvKey("notebook", "/home/u/a.ipynb"), "spec-a", "/usr/bin/python3")
        assert (kept.created_at, kept.last_used_at, kept.error, str(kept.path)) == (10.0, 12.0, None, "/v/a")
        assert kept.notebook_file == ("1:2:3:4" if legacy_version == 2 else None)
        broken = store.get(POOLED)
        assert broken is not None and broken.owner_uid is None
        assert broken.error == "its interpreter was missing"
        assert store.count_by_state()[states.BROKEN] == 1
        if shape.endswith("store-id"):
            assert store.store_id == OLD_STORE_ID  # the venvs dir's owner file names it: never changed
        assert len(store.store_id) == 16
        # The removed env's rows are dropped; the kept env's are all there.
        assert [(row["argv"], row["exit_status"]) for row in store.installs(KEPT)] == (
            [(["install", "six"], 0), (["uninstall", "six"], 0)] if had_installs else [])
        assert store.installs(REMOVED) == [] and store.requirements(REMOVED) == []
        assert store.requirements(KEPT) == (["six>=1"] if had_installs else [])
        assert store.kernels() == ([(KEPT, 4242)] if _KERNELS in statements else [])
        # Install ids are not reused after the upgrade, not even the removed env's (id 2).
        assert store.insert_install(KEPT, 1000, "install", ["attrs"]) == (4 if had_installs else 1)
    finally:
        store.close()
    reopened = Store(path)
    try:
        assert reopened.migrated == []  # exactly once
        assert [record.id for record in reopened.find_by_notebook_file(1000, "1:2:3:4")] == (
            [KEPT] if legacy_version == 2 else [])
        assert len(reopened.installs(KEPT)) == (3 if had_installs else 1)
    finally:
        reopened.close()
    db = sqlite3.connect(str(path))
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        # What a release before user_version reads: it refuses this db instead of writing to it.
        meta_version = db.execute("SELECT value FROM meta WHERE name='schema_version'").fetchone()[0]
        assert meta_version == str(SCHEMA_VERSION)
    finally:
        db.close()
    fresh = tmp_path / "fresh.db"
    Store(fresh).close()
    assert schema_of(path) == schema_of(fresh)


def test_a_fresh_store_declares_that_rows_belong_to_their_env(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    Store(path).close()
    db = sqlite3.connect(str(path))
    try:
        for table in ("installs", "kernels", "requirements"):
            [foreign_key] = db.execute("PRAGMA foreign_key_list(%s)" % table).fetchall()
            assert foreign_key[2:5] == ("envs", "env_id", "id"), (table, foreign_key)
            assert foreign_key[6] == "CASCADE", (table, foreign_key)
    finally:
        db.close()


def test_deleting_an_env_row_takes_its_installs_requirements_and_kernels_along(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = Store(path)
    try:
        for env_id, name in (("e-000000000001", "/a.ipynb"), ("e-000000000002", "/b.ipynb")):
            store.insert_creating(env_id, tmp_path / env_id, "spec", "python3", 1000,
                                  EnvKey("notebook", name))
            store.transition(env_id, states.ASSIGNED)
            store.insert_install(env_id, 1000, "install", ["six"])
            store.record_requirements(env_id, {"six": "six"}, [])
            store.add_kernel(env_id, 4242)
        store.transition("e-000000000001", states.DELETING)
        store.delete("e-000000000001")
        assert store.installs("e-000000000001") == [] and store.requirements("e-000000000001") == []
        assert store.kernels() == [("e-000000000002", 4242)]
        assert len(store.installs("e-000000000002")) == 1 and store.requirements("e-000000000002") == ["six"]
        # A kernel reported for an env whose row is gone is not recorded (and is no error).
        store.add_kernel("e-000000000001", 4343)
        assert store.kernels() == [("e-000000000002", 4242)]
    finally:
        store.close()
    # The cascade is the schema's, not the store code's: any connection with foreign keys on gets it.
    db = sqlite3.connect(str(path), isolation_level=None)
    try:
        db.execute("PRAGMA foreign_keys=ON")
        db.execute("DELETE FROM envs WHERE id='e-000000000002'")
        assert [db.execute("SELECT COUNT(*) FROM %s" % table).fetchone()[0]
                for table in ("installs", "requirements", "kernels")] == [0, 0, 0]
    finally:
        db.close()


def _dump(path: Path) -> tuple[int, list[str]]:
    db = sqlite3.connect(str(path))
    try:
        return db.execute("PRAGMA user_version").fetchone()[0], list(db.iterdump())
    finally:
        db.close()


def test_an_upgrade_that_fails_half_way_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    make_legacy_db(path, "af78138-notebook-file")
    db = sqlite3.connect(str(path))
    with db:  # makes step 4 fail after step 3 ran: the table name it rebuilds through is taken
        db.execute("CREATE TABLE envs_new (x)")
    db.close()
    before = _dump(path)
    with pytest.raises(StoreDamaged, match="table envs_new already exists"):
        Store(path)
    assert _dump(path) == before


def test_a_store_whose_version_is_not_a_number_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    make_legacy_db(path, "619b985-store-id")
    db = sqlite3.connect(str(path))
    with db:
        db.execute("UPDATE meta SET value='two' WHERE name='schema_version'")
    db.close()
    before = _dump(path)
    refusal = r"cannot be used \(its schema_version 'two' is not a number\): move it aside"
    with pytest.raises(StoreDamaged, match=refusal):
        Store(path)
    assert _dump(path) == before


def test_a_store_with_a_newer_user_version_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    Store(path).close()
    db = sqlite3.connect(str(path))
    db.execute("PRAGMA user_version=%d" % (SCHEMA_VERSION + 1))
    db.close()
    before = path.read_bytes()
    message = ("has schema %d, newer than this uvkerneld understands (%d): upgrade uvkerneld to the "
               "release that wrote it or a later one (the db was left as it is)"
               % (SCHEMA_VERSION + 1, SCHEMA_VERSION))
    with pytest.raises(NewerSchema) as refused:
        Store(path)
    assert message in str(refused.value)
    assert path.read_bytes() == before
    result = subprocess.run(
        [sys.executable, "-m", "uvkerneld", "--state-dir", str(tmp_path), "--socket",
         str(tmp_path / "s.sock"), "--cache-dir", str(tmp_path / "cache"), "--venvs-dir",
         str(tmp_path / "venvs"), "--pool-size", "0"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 1
    assert message in result.stderr and "Traceback" not in result.stderr
    assert path.read_bytes() == before


def _open_db_files(path: Path) -> int:
    """How many file descriptors of this process have ``path`` open (one per SQLite connection)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink("/proc/self/fd/" + fd) == str(path)
        except OSError:
            pass
    return count


def test_scan_keeps_one_connection_per_worker_thread_and_close_closes_them(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = Store(path)
    store.insert_creating("e-000000000001", tmp_path / "e1", "spec", "python3")

    async def main() -> None:
        for _ in range(3):
            scans = await asyncio.gather(*(store.scan() for _ in range(20)))
            assert all([record.id for record in records] == ["e-000000000001"] for records in scans)
        workers = threading.active_count() - 1  # the loop's executor threads
        # The store's own connection and one per worker thread, not one per scan.
        assert 2 <= _open_db_files(path) <= 1 + workers < 60
        store.close()  # on the loop's thread, with the worker threads still alive
        assert _open_db_files(path) == 0
        with pytest.raises(sqlite3.ProgrammingError):
            await store.scan()

    asyncio.run(main())


def rewrite_as_release_619b985(path: Path) -> None:
    """Turn a current state db back into the shape the last release before user_version wrote,
    rows and store id kept (the columns that release had and this one dropped get defaults; the
    ones added since are left out)."""
    db = sqlite3.connect(str(path), isolation_level=None)
    db.row_factory = sqlite3.Row
    try:
        tables = ("meta", "envs", "installs", "kernels", "requirements")
        rows = {table: [dict(row) for row in db.execute("SELECT * FROM %s" % table)] for table in tables}
        db.execute("BEGIN")
        for table in reversed(tables):
            db.execute("DROP TABLE %s" % table)
        for statement in LEGACY_SHAPES["619b985-store-id"][1]:
            db.execute(statement)
        added = {"envs": {"from_pool": 0}, "kernels": {"started_at": 1.0}, "requirements": {"added_at": 1.0}}
        later = {"envs": ("declared_digest", "declared")}  # columns that release did not have yet
        for table in tables:
            for row in rows[table]:
                row.update(added.get(table, {}))
                for column in later.get(table, ()):
                    del row[column]
                columns, marks = ", ".join(row), ", ".join("?" * len(row))
                db.execute("INSERT INTO %s (%s) VALUES (%s)" % (table, columns, marks), list(row.values()))
        db.execute("UPDATE meta SET value='2' WHERE name='schema_version'")
        db.execute("PRAGMA user_version=0")
        db.execute("COMMIT")
    finally:
        db.close()


def test_a_daemon_upgrades_the_store_of_an_older_release_and_keeps_every_env(layout: Layout) -> None:
    daemon = Daemon(layout, "--pool-size", "0").start()
    try:
        kept = layout.request("acquire", {"key": {"kind": "env", "value": "kept"}})
        other = layout.request("acquire", {"key": {"kind": "env", "value": "other"}})
        for env in (kept, other):
            install = {"env": env["path"], "argv": ["install", "six==1.16.0"]}
            assert layout.request("pip", install, timeout=300)["exit_status"] == 0
    finally:
        daemon.stop()
    rewrite_as_release_619b985(layout.state_dir / "state.db")
    daemon = Daemon(layout, "--pool-size", "0").start()  # the venvs dir still knows its store (its id)
    try:
        again = layout.request("acquire", {"key": {"kind": "env", "value": "kept"}})
        assert (again["env_id"], again["path"]) == (kept["env_id"], kept["path"])
        history = layout.request("installs", {"env": kept["path"]})
        assert history["requirements"] == ["six==1.16.0"]
        assert [item["argv"] for item in history["installs"]] == [["install", "six==1.16.0"]]
        listed = {row["env_id"] for row in layout.request("list", {"all": False})["envs"]}
        assert listed == {kept["env_id"], other["env_id"]}
        assert layout.status()["quarantine"] == []
        layout.request("remove", {"env_id": other["env_id"]})
    finally:
        daemon.stop()
    db = sqlite3.connect(str(layout.state_dir / "state.db"))
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        # The removed env's rows went with it, by the schema's cascade.
        for table in ("requirements", "installs"):
            counts = db.execute("SELECT env_id, COUNT(*) FROM %s GROUP BY env_id" % table).fetchall()
            assert counts == [(kept["env_id"], 1)], table
    finally:
        db.close()
