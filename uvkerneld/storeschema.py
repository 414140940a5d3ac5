"""The state db's schema as an ordered list of steps; ``PRAGMA user_version`` counts those applied.

Step N brings a db from version N-1 to N. A step is never changed once released (dbs out there
were shaped by it): a new schema is a new step at the end. A fresh db runs every step, so there
is one description of the schema, and an old db ends up exactly like a fresh one (tested).

Releases before user_version kept the version in ``meta.schema_version`` only ("1" or "2", with
user_version 0). Those numbers are the same as the step numbers here, so such a db continues at
the step after its meta version. The migration still writes ``meta.schema_version`` too: an
older uvkerneld reads only that, and refuses a db it does not understand instead of writing
rows the newer schema no longer has.
"""

from __future__ import annotations

import logging
import secrets
import sqlite3
from collections.abc import Callable

log = logging.getLogger("uvkerneld.store")


def _step_1_first_release(db: sqlite3.Connection) -> None:
    """The first release's tables."""
    db.execute("CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
    db.execute("""CREATE TABLE envs (
        id            TEXT PRIMARY KEY,          -- also the venv's directory name
        path          TEXT NOT NULL UNIQUE,
        state         TEXT NOT NULL,
        owner_uid     INTEGER,                   -- NULL while pooled
        key_kind      TEXT,
        key_value     TEXT,
        spec          TEXT NOT NULL,             -- hash of what the venv was built from
        python        TEXT NOT NULL,
        from_pool     INTEGER NOT NULL DEFAULT 0,
        created_at    REAL NOT NULL,
        assigned_at   REAL,
        last_used_at  REAL,
        error         TEXT,
        UNIQUE (owner_uid, key_kind, key_value)
    )""")
    db.execute("CREATE INDEX envs_by_state ON envs (state, spec)")


def _step_2_installs_kernels_renames(db: sqlite3.Connection) -> None:
    """Install history, recorded requirements, running kernels; the notebook's file identity so an
    env follows its notebook across renames. The three tables are IF NOT EXISTS: later releases
    of version 1 had added them without changing the version."""
    db.execute("""CREATE TABLE IF NOT EXISTS installs (
        id            INTEGER PRIMARY KEY AUTOINCREMENT,
        env_id        TEXT NOT NULL,
        uid           INTEGER NOT NULL,
        subcommand    TEXT NOT NULL,
        argv          TEXT NOT NULL,
        queued_at     REAL NOT NULL,
        started_at    REAL,
        finished_at   REAL,
        exit_status   INTEGER
    )""")
    db.execute("CREATE INDEX IF NOT EXISTS installs_by_env ON installs (env_id, id)")
    db.execute("""CREATE TABLE IF NOT EXISTS kernels (
        env_id        TEXT NOT NULL,
        pid           INTEGER NOT NULL,
        started_at    REAL NOT NULL,
        PRIMARY KEY (env_id, pid)
    )""")
    db.execute("""CREATE TABLE IF NOT EXISTS requirements (
        env_id        TEXT NOT NULL,
        name          TEXT NOT NULL,
        requirement   TEXT NOT NULL,
        added_at      REAL NOT NULL,
        PRIMARY KEY (env_id, name)
    )""")
    db.execute("ALTER TABLE envs ADD COLUMN notebook_file TEXT")
    db.execute("CREATE INDEX envs_by_notebook_file ON envs (owner_uid, notebook_file)")


def _step_3_store_id(db: sqlite3.Connection) -> None:
    """The store's id, which names it in the venvs dir it owns (venvsdir.OWNER_FILE). OR IGNORE:
    later releases of version 2 had added it without changing the version."""
    db.execute("INSERT OR IGNORE INTO meta (name, value) VALUES ('store_id', ?)", (secrets.token_hex(8),))


def _step_4_foreign_keys(db: sqlite3.Connection) -> None:
    """Rows that belong to an env are declared so, ON DELETE CASCADE: deleting an env's row takes
    its install history, requirements and kernels along. Columns nothing ever read are dropped
    (envs.from_pool, envs.assigned_at, kernels.started_at, requirements.added_at). SQLite adds
    neither a foreign key nor (before 3.35) a dropped column in place: each table is rebuilt."""
    _rebuild(db, "envs", """(
        id            TEXT PRIMARY KEY,          -- also the venv's directory name
        path          TEXT NOT NULL UNIQUE,
        state         TEXT NOT NULL,             -- see states.py
        owner_uid     INTEGER,                   -- NULL while pooled
        key_kind      TEXT,
        key_value     TEXT,
        spec          TEXT NOT NULL,             -- hash of what the venv was built from
        python        TEXT NOT NULL,
        created_at    REAL NOT NULL,
        last_used_at  REAL,
        error         TEXT,                      -- why it is broken
        notebook_file TEXT,                      -- "dev:ino:size:mtime_ns" of the notebook, last seen
        UNIQUE (owner_uid, key_kind, key_value)
    )""", ("id", "path", "state", "owner_uid", "key_kind", "key_value", "spec", "python", "created_at",
           "last_used_at", "error", "notebook_file"))
    db.execute("CREATE INDEX envs_by_state ON envs (state, spec)")
    db.execute("CREATE INDEX envs_by_notebook_file ON envs (owner_uid, notebook_file)")
    _rebuild(db, "installs", """(
        id            INTEGER PRIMARY KEY AUTOINCREMENT,
        env_id        TEXT NOT NULL REFERENCES envs (id) ON DELETE CASCADE,
        uid           INTEGER NOT NULL,
        subcommand    TEXT NOT NULL,
        argv          TEXT NOT NULL,             -- JSON list, as the user typed it
        queued_at     REAL NOT NULL,
        started_at    REAL,
        finished_at   REAL,
        exit_status   INTEGER
    )""", ("id", "env_id", "uid", "subcommand", "argv", "queued_at", "started_at", "finished_at",
           "exit_status"))
    db.execute("CREATE INDEX installs_by_env ON installs (env_id, id)")
    _rebuild(db, "kernels", """(                 -- running kernels, so a restarted daemon knows them
        env_id        TEXT NOT NULL REFERENCES envs (id) ON DELETE CASCADE,
        pid           INTEGER NOT NULL,
        PRIMARY KEY (env_id, pid)
    )""", ("env_id", "pid"))
    _rebuild(db, "requirements", """(
        env_id        TEXT NOT NULL REFERENCES envs (id) ON DELETE CASCADE,
        name          TEXT NOT NULL,             -- normalized project name, or the path/URL itself
        requirement   TEXT NOT NULL,             -- as the user asked for it
        PRIMARY KEY (env_id, name)
    )""", ("env_id", "name", "requirement"))


def _step_5_declared(db: sqlite3.Connection) -> None:
    """What a notebook declared (issue 11), as last synced into its env: the declaration's digest
    (nbdecl.digest; an unchanged one means no sync at the next start) and its requirement list
    (JSON), which tells a declared requirement from one `%pip` added (those survive an edit)."""
    db.execute("ALTER TABLE envs ADD COLUMN declared_digest TEXT")
    db.execute("ALTER TABLE envs ADD COLUMN declared TEXT")


def _rebuild(db: sqlite3.Connection, table: str, definition: str, columns: tuple[str, ...]) -> None:
    """Re-create ``table`` as ``definition`` keeping ``columns`` of its rows (SQLite's documented
    way: new table, copy, drop, rename; foreign keys are off meanwhile). Rows of a table with an
    ``env_id`` whose env is gone are not kept: the foreign key forbids them, and they only ever
    described a removed env (releases before step 4 kept removed envs' install history)."""
    names = ", ".join(columns)
    kept = " WHERE env_id IN (SELECT id FROM envs)" if "env_id" in columns else ""
    sequence = _sequence(db, table)
    db.execute("CREATE TABLE %s_new %s" % (table, definition))
    copy = "INSERT INTO %s_new (%s) SELECT %s FROM %s%s" % (table, names, names, table, kept)
    copied = db.execute(copy).rowcount
    dropped = db.execute("SELECT COUNT(*) FROM %s" % table).fetchone()[0] - copied
    if dropped:
        log.info("state db upgrade: %d row(s) of %s described removed envs and were dropped", dropped, table)
    db.execute("DROP TABLE %s" % table)
    db.execute("ALTER TABLE %s_new RENAME TO %s" % (table, table))
    # Install ids are never reused: the new table goes on from the old one's last id.
    if sequence is not None and sequence != _sequence(db, table) and not db.execute(
        "UPDATE sqlite_sequence SET seq=? WHERE name=?", (sequence, table)
    ).rowcount:
        db.execute("INSERT INTO sqlite_sequence (name, seq) VALUES (?, ?)", (table, sequence))


def _sequence(db: sqlite3.Connection, table: str) -> int | None:
    """The last id an AUTOINCREMENT table handed out (None: it never handed one out)."""
    if not db.execute("SELECT 1 FROM sqlite_master WHERE name='sqlite_sequence'").fetchone():
        return None
    row = db.execute("SELECT seq FROM sqlite_sequence WHERE name=?", (table,)).fetchone()
    return int(row[0]) if row else None


MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (
    _step_1_first_release,
    _step_2_installs_kernels_renames,
    _step_3_store_id,
    _step_4_foreign_keys,
    _step_5_declared,
)
SCHEMA_VERSION = len(MIGRATIONS)


def version_of(db: sqlite3.Connection) -> int:
    """The schema version of an open db, read without writing anything (0: a new, empty db)."""
    user_version = int(db.execute("PRAGMA user_version").fetchone()[0])
    if user_version:
        return user_version
    if not db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'").fetchone():
        return 0
    row = db.execute("SELECT value FROM meta WHERE name='schema_version'").fetchone()
    if row is None:
        return 0
    try:
        return int(row[0])
    except ValueError:
        raise sqlite3.DatabaseError("its schema_version %r is not a number" % (row[0],)) from None


def migrate(db: sqlite3.Connection, version: int) -> list[int]:
    """Apply the steps after ``version``, inside the caller's transaction, with foreign keys off
    (a rebuilt parent table must not cascade-delete its children). Returns the steps applied."""
    applied = []
    for number, step in enumerate(MIGRATIONS[version:], start=version + 1):
        step(db)
        applied.append(number)
    problems = db.execute("PRAGMA foreign_key_check").fetchall()
    if problems:
        raise sqlite3.DatabaseError("rows that refer to missing envs after the upgrade: %r" % (problems[:3],))
    db.execute("PRAGMA user_version=%d" % SCHEMA_VERSION)
    db.execute(
        "INSERT INTO meta (name, value) VALUES ('schema_version', ?)"
        " ON CONFLICT (name) DO UPDATE SET value=excluded.value", (str(SCHEMA_VERSION),)
    )
    return applied
