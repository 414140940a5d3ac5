"""SQLite state: which envs exist, whose they are, what state they are in.

One connection, used from the daemon's event loop thread only (plus one read-only connection per
worker thread for ``scan``). WAL mode so readers (``scan``, backups) never block the daemon. Every
query here but ``scan`` is a few index lookups, cheap enough to run inline on the event loop: the
hot path (acquire of a known notebook or a pool claim) is one small transaction. The schema and
its upgrades: storeschema.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from . import states
from .protocol import EnvKey, EnvUnavailable
from .storeschema import SCHEMA_VERSION, migrate, version_of
from .venvsdir import write_env_record

log = logging.getLogger("uvkerneld.store")

class EnvRecord:
    __slots__ = (
        "created_at", "declared_digest", "error", "id", "key", "last_used_at", "notebook_file", "owner_uid",
        "path", "python", "spec", "state",
    )

    def __init__(self, row: sqlite3.Row) -> None:
        self.id = row["id"]
        self.path = Path(row["path"])
        self.state = row["state"]
        self.owner_uid = row["owner_uid"]
        self.key = EnvKey(row["key_kind"], row["key_value"]) if row["key_kind"] else None
        self.spec = row["spec"]
        self.python = row["python"]
        self.created_at = row["created_at"]
        self.last_used_at = row["last_used_at"]
        self.error = row["error"]
        self.notebook_file = row["notebook_file"]
        self.declared_digest = row["declared_digest"]

    @property
    def interpreter(self) -> Path:
        return self.path / "bin" / "python"

    def __repr__(self) -> str:
        return "EnvRecord(%s, %s, %r)" % (self.id, self.state, self.key)


class NewerSchema(RuntimeError):
    """The state db was written by a newer uvkerneld."""


class StoreDamaged(RuntimeError):
    """The state db cannot be opened or read; the message says what to do."""


class StoreFull(EnvUnavailable):
    """A write to the state db failed because its filesystem is full."""


_SQLITE_FULL = 13
_DB_FILES = ("", "-wal", "-shm", "-journal")


def make_private(db_path: Path) -> None:
    """The db and its WAL/shared-memory files hold every user's notebook paths: 0600. SQLite
    gives new -wal/-shm files the db file's mode, so the db is created 0600 before sqlite opens
    it; files left by an older uvkerneld are fixed here."""
    fd = os.open(db_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if os.fstat(fd).st_uid == os.geteuid():
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    for suffix in _DB_FILES[1:]:
        make_own_file_private(str(db_path) + suffix)


def make_own_file_private(path: str | Path) -> None:
    """chmod 0600 a file we own, never through a symlink; a missing file is left missing."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return
    try:
        if os.fstat(fd).st_uid == os.geteuid():
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


class _Connection(sqlite3.Connection):
    """Turns "database or disk is full" into StoreFull, which names the folder and reaches the
    client as a clear error instead of "internal error"."""

    db_path = ""  # set right after connecting

    def execute(self, *args: Any, **kwargs: Any) -> sqlite3.Cursor:
        try:
            return super().execute(*args, **kwargs)
        except sqlite3.OperationalError as exc:
            if getattr(exc, "sqlite_errorcode", None) == _SQLITE_FULL or "disk is full" in str(exc):
                raise StoreFull(
                    "the state folder %s is full (%s): free some space there (a few MB are enough)"
                    % (os.path.dirname(self.db_path), exc)
                ) from None
            raise


class Store:
    def __init__(self, path: Path) -> None:
        self.path = path
        # Called with an env's id after a change its own record file mirrors (see venvsdir.py).
        self.on_env_changed: Callable[[str], None] = self._write_env_record
        # The schema steps this open applied (storeschema.py); empty when the db was current.
        self.migrated: list[int] = []
        self._readers = _ReadConnections(path)
        try:
            make_private(path)
            # isolation_level=None: we issue BEGIN/COMMIT ourselves so transactions are explicit.
            self._db = sqlite3.connect(str(path), isolation_level=None, timeout=10.0, factory=_Connection)
            self._db.db_path = str(path)
            self._db.row_factory = sqlite3.Row
            try:
                self._open()
            except BaseException:
                self._db.close()
                raise
        except NewerSchema:
            raise
        except StoreFull as exc:
            raise StoreDamaged("cannot open the state db %s: %s" % (path, exc)) from None
        except (sqlite3.DatabaseError, OSError) as exc:
            raise StoreDamaged(
                "the state db %s cannot be used (%s): move it aside (mv %s %s.damaged) and start again; "
                "uvkerneld then rebuilds its records from the venvs' own record files"
                % (path, exc, path, path)
            ) from None
        make_private(path)  # the -wal and -shm files sqlite just created

    def _open(self) -> None:
        version = version_of(self._db)
        self._refuse_newer_schema(version)
        self._db.execute("PRAGMA quick_check(1)").fetchone()  # a damaged file fails here, not mid-request
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        # Off while migrating: a table rebuild drops tables other rows refer to. Only settable
        # outside a transaction, hence here.
        self._db.execute("PRAGMA foreign_keys=OFF")
        # Nothing to write when the schema is current: a restart on a full disk still opens the store.
        if version != SCHEMA_VERSION:
            with self._transaction():
                version = version_of(self._db)  # again, under the write lock
                self._refuse_newer_schema(version)
                self.migrated = migrate(self._db, version)
            if self.migrated:
                log.info("state db %s upgraded from schema %d to %d", self.path, version, SCHEMA_VERSION)
        self._db.execute("PRAGMA foreign_keys=ON")

    def _meta(self, name: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE name=?", (name,)).fetchone()
        return row["value"] if row else None

    @property
    def store_id(self) -> str:
        value = self._meta("store_id")
        assert value is not None
        return value

    def has_envs(self) -> bool:
        return self._db.execute("SELECT 1 FROM envs LIMIT 1").fetchone() is not None

    def _refuse_newer_schema(self, version: int) -> None:
        """Before changing anything (even the journal mode): a newer uvkerneld's db stays as it is,
        so downgrading and upgrading again loses nothing."""
        if version > SCHEMA_VERSION:
            raise NewerSchema(
                "state db %s has schema %d, newer than this uvkerneld understands (%d): upgrade uvkerneld "
                "to the release that wrote it or a later one (the db was left as it is)"
                % (self.path, version, SCHEMA_VERSION)
            )

    def close(self) -> None:
        self._readers.close()
        self._db.close()

    class _Transaction:
        def __init__(self, db: sqlite3.Connection) -> None:
            self.db = db

        def __enter__(self) -> sqlite3.Connection:
            # IMMEDIATE takes the write lock up front: no upgrade deadlock with another writer.
            self.db.execute("BEGIN IMMEDIATE")
            return self.db

        def __exit__(self, exc_type: Any, *rest: Any) -> None:
            if exc_type is None:
                try:
                    self.db.execute("COMMIT")
                    return
                except BaseException:
                    self._rollback()  # a COMMIT that failed (disk full) must not leave it open
                    raise
            self._rollback()

        def _rollback(self) -> None:
            # SQLite may already have rolled back by itself (SQLITE_FULL, SQLITE_IOERR).
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")

    def _transaction(self) -> Store._Transaction:
        return Store._Transaction(self._db)

    # --- reads ------------------------------------------------------------------------------

    def get(self, env_id: str) -> EnvRecord | None:
        row = self._db.execute("SELECT * FROM envs WHERE id=?", (env_id,)).fetchone()
        return EnvRecord(row) if row else None

    def find(self, owner_uid: int, key: EnvKey) -> EnvRecord | None:
        row = self._db.execute(
            "SELECT * FROM envs WHERE owner_uid=? AND key_kind=? AND key_value=?",
            (owner_uid, key.kind, key.value),
        ).fetchone()
        return EnvRecord(row) if row else None

    def all(self) -> Iterator[EnvRecord]:
        for row in self._db.execute("SELECT * FROM envs ORDER BY created_at"):
            yield EnvRecord(row)

    async def scan(self) -> list[EnvRecord]:
        """What ``all()`` returns, read in a worker thread on a connection of its own: building a
        record per env holds the event loop ~10 ms per 1,000 envs. A snapshot: callers that act
        on an env after an await look at it again with ``get``."""
        return await asyncio.to_thread(self._readers.read_all_envs)

    def requirement_counts(self) -> dict[str, int]:
        """Recorded requirements per env id, in one query (``len(requirements(id))`` for all)."""
        return {row["env_id"]: row["n"] for row in
                self._db.execute("SELECT env_id, COUNT(*) AS n FROM requirements GROUP BY env_id")}

    def count_by_state(self) -> dict[str, int]:
        counts = {state: 0 for state in states.ALL_STATES}
        for row in self._db.execute("SELECT state, COUNT(*) AS n FROM envs GROUP BY state"):
            counts[row["state"]] = row["n"]
        return counts

    def count_creating_owned(self) -> int:
        row = self._db.execute(
            "SELECT COUNT(*) AS n FROM envs WHERE state=? AND owner_uid IS NOT NULL", (states.CREATING,)
        ).fetchone()
        return int(row["n"])

    def oldest_pooled(self, spec: str) -> EnvRecord | None:
        row = self._db.execute(
            "SELECT * FROM envs WHERE state=? AND spec=? ORDER BY created_at LIMIT 1", (states.POOLED, spec)
        ).fetchone()
        return EnvRecord(row) if row else None

    def count_pooled(self, spec: str) -> int:
        row = self._db.execute(
            "SELECT COUNT(*) AS n FROM envs WHERE state=? AND spec=?", (states.POOLED, spec)
        ).fetchone()
        return int(row["n"])

    # --- writes -----------------------------------------------------------------------------

    def insert_creating(
        self, env_id: str, path: Path, spec: str, python: str,
        owner_uid: int | None = None, key: EnvKey | None = None,
    ) -> EnvRecord:
        now = time.time()
        with self._transaction() as db:
            db.execute(
                "INSERT INTO envs (id, path, state, owner_uid, key_kind, key_value, spec, python,"
                " created_at, last_used_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (
                    env_id, str(path), states.CREATING, owner_uid,
                    key.kind if key else None, key.value if key else None, spec, python, now,
                    now if key else None,
                ),
            )
        record = self.get(env_id)
        assert record is not None
        return record

    def transition(self, env_id: str, new_state: str, error: str | None = None) -> EnvRecord:
        """Move an env to ``new_state``, checking the transition table inside the transaction."""
        with self._transaction() as db:
            row = db.execute("SELECT state FROM envs WHERE id=?", (env_id,)).fetchone()
            if row is None:
                raise KeyError(env_id)
            states.check_transition(row["state"], new_state)
            db.execute("UPDATE envs SET state=?, error=? WHERE id=?", (new_state, error, env_id))
        if new_state in (states.POOLED, states.ASSIGNED) and row["state"] == states.CREATING:
            self.on_env_changed(env_id)  # built: from now on the venv carries its own record
        record = self.get(env_id)
        assert record is not None
        return record

    def claim_pooled(
        self, spec: str, owner_uid: int, key: EnvKey, usable: Callable[[Path], bool] = lambda path: True,
    ) -> tuple[EnvRecord | None, list[str]]:
        """Hand the oldest usable pooled venv to (uid, key), atomically. No uv runs here.

        Returns (the claimed env or None, ids of pooled envs found unusable on the way: they are
        now ``broken`` and the caller removes them)."""
        now = time.time()
        damaged: list[str] = []
        with self._transaction() as db:
            rows = db.execute(
                "SELECT id, state, path FROM envs WHERE state=? AND spec=? ORDER BY created_at",
                (states.POOLED, spec),
            ).fetchall()
            claimed = None
            for row in rows:
                if usable(Path(row["path"])):
                    claimed = row
                    break
                states.check_transition(row["state"], states.BROKEN)
                db.execute("UPDATE envs SET state=?, error=? WHERE id=?",
                           (states.BROKEN, "its interpreter was missing when it was to be handed out",
                            row["id"]))
                damaged.append(row["id"])
            if claimed is None:
                return None, damaged
            states.check_transition(claimed["state"], states.ASSIGNED)
            db.execute(
                "UPDATE envs SET state=?, owner_uid=?, key_kind=?, key_value=?, last_used_at=? WHERE id=?",
                (states.ASSIGNED, owner_uid, key.kind, key.value, now, claimed["id"]),
            )
        self.on_env_changed(claimed["id"])
        return self.get(claimed["id"]), damaged

    def find_by_notebook_file(self, owner_uid: int, notebook_file: str) -> list[EnvRecord]:
        """The uid's notebook envs last seen with this file identity (normally none or one)."""
        rows = self._db.execute(
            "SELECT * FROM envs WHERE owner_uid=? AND notebook_file=? AND key_kind='notebook'"
            " AND state IN (?, ?, ?)",  # never one being built or deleted
            (owner_uid, notebook_file, *states.SETTLED_NOTEBOOK_STATES),
        ).fetchall()
        return [EnvRecord(row) for row in rows]

    def set_notebook_file(self, env_id: str, notebook_file: str | None) -> None:
        self._db.execute("UPDATE envs SET notebook_file=? WHERE id=?", (notebook_file, env_id))

    def rekey(self, env_id: str, key: EnvKey) -> EnvRecord | None:
        """Give an assigned env a new key (its notebook was renamed); None if the key is taken."""
        try:
            with self._transaction() as db:
                db.execute("UPDATE envs SET key_kind=?, key_value=? WHERE id=?",
                           (key.kind, key.value, env_id))
        except sqlite3.IntegrityError:
            return None
        self.on_env_changed(env_id)
        return self.get(env_id)

    def find_by_path(self, path: str) -> EnvRecord | None:
        row = self._db.execute("SELECT * FROM envs WHERE path=?", (path,)).fetchone()
        return EnvRecord(row) if row else None

    def insert_adopted(self, fields: dict[str, Any], path: Path, state: str, error: str | None) -> None:
        """Re-create a lost row from the env's own record file (see venvsdir.py)."""
        key = fields.get("key") or None
        with self._transaction() as db:
            db.execute(
                "INSERT INTO envs (id, path, state, owner_uid, key_kind, key_value, spec, python,"
                " created_at, last_used_at, error) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (
                    fields["id"], str(path), state, fields.get("owner_uid"),
                    key[0] if key else None, key[1] if key else None, str(fields.get("spec") or "adopted"),
                    str(fields.get("python") or ""), float(fields.get("created_at") or time.time()),
                    time.time(), error,
                ),
            )
            if fields.get("declared_digest"):
                db.execute("UPDATE envs SET declared_digest=?, declared=? WHERE id=?",
                           (str(fields["declared_digest"]), json.dumps(list(fields.get("declared") or [])),
                            fields["id"]))
            for requirement_name, requirement in (fields.get("requirements") or {}).items():
                db.execute(
                    "INSERT OR REPLACE INTO requirements (env_id, name, requirement) VALUES (?,?,?)",
                    (fields["id"], str(requirement_name), str(requirement)),
                )

    def env_record_fields(self, env_id: str) -> dict[str, Any] | None:
        """What a venv's own record file holds: enough to rebuild its row if the store is lost."""
        record = self.get(env_id)
        if record is None:
            return None
        rows = self._db.execute(
            "SELECT name, requirement FROM requirements WHERE env_id=?", (env_id,)).fetchall()
        return {
            "id": record.id, "owner_uid": record.owner_uid,
            "key": [record.key.kind, record.key.value] if record.key else None,
            "spec": record.spec, "python": record.python, "created_at": record.created_at,
            "requirements": {row["name"]: row["requirement"] for row in rows},
            "declared_digest": record.declared_digest, "declared": self.declared(env_id),
            # Owned and keyless: adopted as retired (never as a pool venv another user would get).
            "retired": record.state == states.RETIRED,
        }

    def _write_env_record(self, env_id: str) -> None:
        fields = self.env_record_fields(env_id)
        if fields is not None:
            record = self.get(env_id)
            assert record is not None
            write_env_record(record.path, fields)

    # --- installs and requirements ----------------------------------------------------------

    def insert_install(self, env_id: str, uid: int, subcommand: str, argv: list[str]) -> int:
        cursor = self._db.execute(
            "INSERT INTO installs (env_id, uid, subcommand, argv, queued_at) VALUES (?,?,?,?,?)",
            (env_id, uid, subcommand, json.dumps(argv), time.time()),
        )
        return int(cursor.lastrowid or 0)

    def install_started(self, install_id: int) -> None:
        self._db.execute("UPDATE installs SET started_at=? WHERE id=?", (time.time(), install_id))

    def install_finished(self, install_id: int, exit_status: int | None) -> None:
        self._db.execute(
            "UPDATE installs SET finished_at=?, exit_status=? WHERE id=?",
            (time.time(), exit_status, install_id),
        )

    def installs(self, env_id: str, limit: int = 1000) -> list[dict[str, Any]]:
        rows = self._db.execute(
            "SELECT * FROM installs WHERE env_id=? ORDER BY id DESC LIMIT ?", (env_id, limit)
        ).fetchall()
        return [
            {key: (json.loads(row[key]) if key == "argv" else row[key]) for key in row.keys()}
            for row in reversed(rows)
        ]

    def record_requirements(self, env_id: str, added: dict[str, str], removed: list[str]) -> None:
        """Keep what the user asked for: ``added`` name -> requirement, ``removed`` names."""
        with self._transaction() as db:
            for name in removed:
                db.execute("DELETE FROM requirements WHERE env_id=? AND name=?", (env_id, name))
            for name, requirement in added.items():
                db.execute(
                    "INSERT INTO requirements (env_id, name, requirement) VALUES (?,?,?)"
                    " ON CONFLICT (env_id, name) DO UPDATE SET requirement=excluded.requirement",
                    (env_id, name, requirement),
                )
        self.on_env_changed(env_id)

    def record_declared(
        self, env_id: str, digest: str, declared: list[str], requirements: dict[str, str]
    ) -> None:
        """A declaration was synced into the env: its digest and requirement list, and the env's
        recorded requirements replaced by ``requirements`` (name -> requirement), in one go."""
        with self._transaction() as db:
            db.execute("UPDATE envs SET declared_digest=?, declared=? WHERE id=?",
                       (digest, json.dumps(declared), env_id))
            db.execute("DELETE FROM requirements WHERE env_id=?", (env_id,))
            for name, requirement in requirements.items():
                db.execute("INSERT INTO requirements (env_id, name, requirement) VALUES (?,?,?)",
                           (env_id, name, requirement))
        self.on_env_changed(env_id)

    def switch_env(
        self, old_id: str, new_id: str, reason: str, digest: str, declared: list[str],
        requirements: dict[str, str],
    ) -> EnvRecord:
        """Move a notebook from its env ``old_id`` to the freshly built ``new_id`` (envswitch.py),
        in one transaction, so (uid, key) never has two envs: the new env takes the key, the
        notebook's file identity, the synced declaration and ``requirements``; the old one loses
        its key and is ``retired`` (``reason`` says by what). Returns the new env's record."""
        with self._transaction() as db:
            old = db.execute("SELECT * FROM envs WHERE id=?", (old_id,)).fetchone()
            new = db.execute("SELECT state FROM envs WHERE id=?", (new_id,)).fetchone()
            if old is None or new is None:
                raise KeyError(old_id if old is None else new_id)
            states.check_transition(old["state"], states.RETIRED)
            states.check_transition(new["state"], states.ASSIGNED)
            db.execute("UPDATE envs SET state=?, error=?, key_kind=NULL, key_value=NULL, notebook_file=NULL"
                       " WHERE id=?", (states.RETIRED, reason, old_id))
            db.execute(
                "UPDATE envs SET state=?, key_kind=?, key_value=?, notebook_file=?, last_used_at=?,"
                " declared_digest=?, declared=? WHERE id=?",
                (states.ASSIGNED, old["key_kind"], old["key_value"], old["notebook_file"], time.time(),
                 digest, json.dumps(declared), new_id))
            db.execute("DELETE FROM requirements WHERE env_id=?", (new_id,))
            for name, requirement in requirements.items():
                db.execute("INSERT INTO requirements (env_id, name, requirement) VALUES (?,?,?)",
                           (new_id, name, requirement))
        # The old env's record file first: a lost store never finds the key in both.
        self.on_env_changed(old_id)
        self.on_env_changed(new_id)
        record = self.get(new_id)
        assert record is not None
        return record

    def declared(self, env_id: str) -> list[str]:
        """The requirement list of the declaration last synced into the env ([] if none was)."""
        row = self._db.execute("SELECT declared FROM envs WHERE id=?", (env_id,)).fetchone()
        return list(json.loads(row["declared"])) if row and row["declared"] else []

    def requirements(self, env_id: str) -> list[str]:
        rows = self._db.execute(
            "SELECT requirement FROM requirements WHERE env_id=? ORDER BY name", (env_id,)
        ).fetchall()
        return [row["requirement"] for row in rows]

    def add_kernel(self, env_id: str, pid: int) -> None:
        try:
            self._db.execute("INSERT OR REPLACE INTO kernels (env_id, pid) VALUES (?,?)", (env_id, pid))
        except StoreFull as exc:  # bookkeeping: the kernel runs anyway, its lifeline still counts
            log.warning("kernel %d of env %s not recorded: %s", pid, env_id, exc)
        except sqlite3.IntegrityError:  # the env's row is gone already: nothing left to protect
            log.warning("kernel %d of env %s not recorded: the env was removed", pid, env_id)

    def remove_kernel(self, env_id: str, pid: int) -> None:
        try:
            self._db.execute("DELETE FROM kernels WHERE env_id=? AND pid=?", (env_id, pid))
        except StoreFull as exc:  # a stale row only means its pid is checked again later
            log.warning("ended kernel %d of env %s not recorded: %s", pid, env_id, exc)

    def kernels(self) -> list[tuple[str, int]]:
        return [(row["env_id"], row["pid"]) for row in self._db.execute("SELECT env_id, pid FROM kernels")]

    def touch(self, env_id: str) -> None:
        self._db.execute("UPDATE envs SET last_used_at=? WHERE id=?", (time.time(), env_id))

    def delete(self, env_id: str) -> None:
        """Remove a row; only legal once the env is in ``deleting`` (its files are gone)."""
        with self._transaction() as db:
            row = db.execute("SELECT state FROM envs WHERE id=?", (env_id,)).fetchone()
            if row is None:
                return
            if row["state"] != states.DELETING:
                raise states.IllegalTransition(
                    "env %s must be in 'deleting' before its row is removed (is %r)" % (env_id, row["state"])
                )
            db.execute("DELETE FROM envs WHERE id=?", (env_id,))  # its other rows go with it (CASCADE)

    # --- the shared-bytecode queue (compilequeue.py) ------------------------------------------

    def bytecode_states(self, entries: list[str]) -> dict[str, str]:
        """entry -> its state, for the entries the queue knows of."""
        found: dict[str, str] = {}
        for start in range(0, len(entries), 500):  # SQLite's bound on query parameters
            chunk = entries[start:start + 500]
            rows = self._db.execute(
                "SELECT entry, state FROM bytecode WHERE entry IN (%s)" % ",".join("?" * len(chunk)), chunk)
            found.update((row["entry"], row["state"]) for row in rows)
        return found

    def bytecode_enqueue(self, env_id: str | None, new: dict[str, str], link: list[str]) -> None:
        """Add entries the queue did not know (``new``: entry -> state) and, for ``env_id``, the
        entries whose bytecode it is to get once they are compiled, in one transaction."""
        now = time.time()
        with self._transaction() as db:
            for entry, state in new.items():
                db.execute("INSERT OR IGNORE INTO bytecode (entry, state, queued_at) VALUES (?,?,?)",
                           (entry, state, now))
            if env_id is not None:
                for entry in link:
                    db.execute("INSERT OR IGNORE INTO bytecode_links (entry, env_id) VALUES (?,?)",
                               (entry, env_id))

    def bytecode_waiting(self) -> list[str]:
        return [row["entry"] for row in self._db.execute(
            "SELECT entry FROM bytecode WHERE state=? ORDER BY queued_at, entry", (BYTECODE_WAITING,))]

    def bytecode_set_state(self, entries: list[str], state: str) -> None:
        with self._transaction() as db:
            db.executemany("UPDATE bytecode SET state=? WHERE entry=?", [(state, entry) for entry in entries])

    def bytecode_interrupted(self) -> list[str]:
        """Entries a stopped or killed daemon was compiling: waiting again (the compile is redone)."""
        entries = [row["entry"] for row in self._db.execute(
            "SELECT entry FROM bytecode WHERE state=?", (BYTECODE_COMPILING,))]
        if entries:
            self.bytecode_set_state(entries, BYTECODE_WAITING)
        return entries

    def bytecode_forget(self, entries: list[str]) -> None:
        """Entries gone from the cache (``uv cache prune``): their rows and links go too."""
        with self._transaction() as db:
            db.executemany("DELETE FROM bytecode WHERE entry=?", [(entry,) for entry in entries])

    def bytecode_entries(self) -> list[str]:
        return [row["entry"] for row in self._db.execute("SELECT entry FROM bytecode")]

    def bytecode_links_ready(self, env_id: str | None = None) -> dict[str, list[str]]:
        """env id -> entries compiled whose bytecode that env still has to get (one env's only,
        with ``env_id``)."""
        ready: dict[str, list[str]] = {}
        query = ("SELECT l.env_id, l.entry FROM bytecode_links l JOIN bytecode b ON b.entry = l.entry"
                 " WHERE b.state=?")
        args: tuple[str, ...] = (BYTECODE_DONE,)
        if env_id is not None:
            query, args = query + " AND l.env_id=?", (BYTECODE_DONE, env_id)
        for row in self._db.execute(query, args):
            ready.setdefault(row["env_id"], []).append(row["entry"])
        return ready

    def bytecode_linked(self, env_id: str, entries: list[str]) -> None:
        with self._transaction() as db:
            db.executemany("DELETE FROM bytecode_links WHERE env_id=? AND entry=?",
                           [(env_id, entry) for entry in entries])

    def bytecode_links_left(self, env_id: str) -> int:
        row = self._db.execute(
            "SELECT COUNT(*) AS n FROM bytecode_links WHERE env_id=?", (env_id,)).fetchone()
        return int(row["n"])

    def bytecode_counts(self) -> dict[str, int]:
        counts = {state: 0 for state in BYTECODE_STATES}
        for row in self._db.execute("SELECT state, COUNT(*) AS n FROM bytecode GROUP BY state"):
            counts[row["state"]] = row["n"]
        row = self._db.execute("SELECT COUNT(DISTINCT env_id) AS n FROM bytecode_links").fetchone()
        counts["envs_to_link"] = int(row["n"])
        return counts


BYTECODE_WAITING, BYTECODE_COMPILING, BYTECODE_DONE = "waiting", "compiling", "done"
BYTECODE_STATES = (BYTECODE_WAITING, BYTECODE_COMPILING, BYTECODE_DONE)


class _ReadConnections:
    """One read-only connection per worker thread for ``Store.scan`` (opening one costs more than
    the scan of a few envs). Closed by ``Store.close`` from the loop's thread: the executor's
    threads outlive the store, so their end is no time to close them. Each connection has a lock,
    held by a scan and by close, so close never pulls a connection from under a running scan."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._mine = threading.local()
        self._lock = threading.Lock()
        self._open: list[tuple[sqlite3.Connection, threading.Lock]] = []
        self._closed = False

    def read_all_envs(self) -> list[EnvRecord]:
        entry: tuple[sqlite3.Connection, threading.Lock] | None = getattr(self._mine, "entry", None)
        if entry is None:
            entry = self._mine.entry = self._connect()
        db, in_use = entry
        with in_use:
            return [EnvRecord(row) for row in db.execute("SELECT * FROM envs ORDER BY created_at")]

    def _connect(self) -> tuple[sqlite3.Connection, threading.Lock]:
        with self._lock:
            if self._closed:
                raise sqlite3.ProgrammingError("the store %s is closed" % self._path)
            # check_same_thread=False: only so that close() may run on the loop's thread.
            db = sqlite3.connect(str(self._path), timeout=10.0, check_same_thread=False)
            try:
                db.execute("PRAGMA query_only=ON")
            except BaseException:
                db.close()
                raise
            db.row_factory = sqlite3.Row
            entry = (db, threading.Lock())
            self._open.append(entry)
            return entry

    def close(self) -> None:
        with self._lock:
            self._closed = True
            entries, self._open = self._open, []
        for db, in_use in entries:
            with in_use:
                db.close()
