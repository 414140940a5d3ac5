"""What each request does. The server turns frames into ``Request`` objects and calls ``dispatch``.

Authorization lives here, in one place: every op names the envs it touches through
``_resolve``, which checks that the peer (uid from SO_PEERCRED) owns the env, or for read-only
and cleanup ops, is root or in the configured admin group.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import time
from typing import TYPE_CHECKING, Any, Callable

from . import __version__, protocol, states
from .diskusage import unshared_bytes
from .store import EnvRecord
from .units import format_bytes, format_duration
from .venvsdir import quarantined

if TYPE_CHECKING:
    from .server import Daemon, PeerCredentials

log = logging.getLogger("uvkerneld.ops")


class Operations:
    def __init__(self, daemon: "Daemon") -> None:
        self.daemon = daemon
        self.kernels_started = {"known": 0, "renamed": 0, "pool": 0, "created": 0, "rebuilt": 0}
        self._admin_gid = self._resolve_admin_group(daemon.config.admin_group)

    # --- plumbing -------------------------------------------------------------------------------

    @property
    def store(self):  # type: ignore[no-untyped-def]
        return self.daemon.store

    async def dispatch(
        self, request: protocol.Request, peer: "PeerCredentials", send_event: Callable[[str, Any], None]
    ) -> dict[str, Any]:
        handler = getattr(self, "op_" + request.op)
        return await handler(request.args, peer, send_event)

    @staticmethod
    def _resolve_admin_group(group: str | None) -> int | None:
        if not group:
            return None
        try:
            return int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            log.warning("admin_group %r does not exist; only root can see every env", group)
            return None

    def is_admin(self, peer: "PeerCredentials") -> bool:
        if peer.uid == 0 or (self.daemon.config.mode == "user" and peer.uid == os.getuid()):
            return True
        if self._admin_gid is None:
            return False
        if peer.gid == self._admin_gid:
            return True
        try:
            name = pwd.getpwuid(peer.uid).pw_name
            return self._admin_gid in os.getgrouplist(name, peer.gid)
        except KeyError:
            return False

    def _resolve(self, args: dict[str, Any], peer: "PeerCredentials", admin_may: bool) -> EnvRecord:
        """The env an op names, if the peer may touch it. Strangers learn nothing about others' envs."""
        record: EnvRecord | None
        if "key" in args:
            record = self.store.find(peer.uid, args["key"])
            label = "%s" % (args["key"],)
        elif "env_id" in args:
            record = self.store.get(args["env_id"])
            label = args["env_id"]
        else:
            record = self.store.find_by_path(args["env"])
            label = args["env"]
        if record is not None and record.owner_uid is not None:
            if record.owner_uid == peer.uid or (admin_may and self.is_admin(peer)):
                return record
        # One answer whether the env does not exist or is someone else's: not found.
        if "key" in args:
            raise protocol.NotFound("uid %d has no env for %s" % (peer.uid, label))
        if "env_id" in args:
            raise protocol.NotFound("uid %d has no env %s; `uvkernelctl list` shows yours" % (peer.uid, label))
        raise protocol.NotFound(
            "uid %d does not own an env at %s: packages can only be changed in your own "
            "notebook's env" % (peer.uid, label)
        )

    def _not_stopping(self, what: str) -> None:
        if self.daemon.stopping:
            raise protocol.ShuttingDown("uvkerneld is shutting down; %s again in a moment" % what)

    # --- kernels --------------------------------------------------------------------------------

    async def op_acquire(self, args: dict[str, Any], peer: "PeerCredentials", send_event: Any) -> dict[str, Any]:
        self._not_stopping("start the kernel")
        key = args["key"]
        started = time.monotonic()
        record, source = await self.daemon.envs.acquire(peer.uid, key, args["file"])
        self.kernels_started[source] += 1
        log.info(
            "kernel start: pid=%d uid=%d key=%s env=%s source=%s%s (%.1f ms)",
            peer.pid, peer.uid, key, record.id, source,
            " (from pool)" if source == "pool" else "", (time.monotonic() - started) * 1000,
        )
        if source not in ("known", "renamed"):
            self.daemon.disk.mark_dirty()
        return {
            "env_id": record.id, "path": str(record.path), "python": str(record.interpreter),
            "source": source, "key": key.to_wire(),
            # No watcher here (system mode): the kernel reports its notebook's saves itself.
            "report_notebook_saves": key.kind == "notebook" and self.daemon.watcher is None,
        }

    async def op_notebook_saved(self, args: dict[str, Any], peer: "PeerCredentials", send_event: Any) -> dict[str, Any]:
        """A kernel reports its notebook's file identity after a save (a daemon with no watcher:
        system mode), so a later rename is still recognised."""
        record = self._resolve({"env": args["env"]}, peer, admin_may=False)
        if record.key is None or record.key.kind != "notebook":
            raise protocol.BadRequest("env %s belongs to %s, not to a notebook" % (record.id, record.key))
        updated = record.notebook_file != args["file"] and record.state in states.SETTLED_NOTEBOOK_STATES
        if updated:
            self.store.set_notebook_file(record.id, args["file"])
        return {"env_id": record.id, "updated": updated}

    # --- packages -------------------------------------------------------------------------------

    async def op_pip(self, args: dict[str, Any], peer: "PeerCredentials", send_event: Callable[[str, Any], None]) -> dict[str, Any]:
        self._not_stopping("run the command")
        record = self._resolve({"env": args["env"]}, peer, admin_may=False)
        result = await self.daemon.installs.run(
            record, peer.uid, args["argv"], args["files"], lambda line: send_event("output", line)
        )
        if args["argv"][:1] in (["install"], ["uninstall"]):
            self.daemon.disk.mark_dirty()
        return result

    async def op_installs(self, args: dict[str, Any], peer: "PeerCredentials", send_event: Any) -> dict[str, Any]:
        record = self._resolve(args, peer, admin_may=True)
        return {
            "env_id": record.id,
            "installs": self.store.installs(record.id),
            "requirements": self.store.requirements(record.id),
        }

    # --- seeing and cleaning up -----------------------------------------------------------------

    def _row(self, record: EnvRecord, live: set[str], requirements: int | None = None) -> dict[str, Any]:
        disk = self.daemon.disk.per_env.get(record.id, {})
        if requirements is None:
            requirements = len(self.store.requirements(record.id))
        return {
            "env_id": record.id,
            "path": str(record.path),
            "key": record.key.to_wire() if record.key else None,
            "owner_uid": record.owner_uid,
            "python": record.python,
            "requirements": requirements,
            "disk_bytes": disk.get("disk_bytes"),
            "unshared_bytes": disk.get("unshared_bytes"),
            "created_at": record.created_at,
            "last_used_at": record.last_used_at,
            "live": record.id in live,
            "state": record.state,
            "error": record.error,
            "notebook_file": record.notebook_file,
        }

    async def op_list(self, args: dict[str, Any], peer: "PeerCredentials", send_event: Any) -> dict[str, Any]:
        if args["all"] and not self.is_admin(peer):
            raise protocol.NotAllowed(
                "only root%s can list every user's envs; drop --all to list yours"
                % (" and members of group %s" % self.daemon.config.admin_group if self._admin_gid is not None else "")
            )
        records = await self.store.scan()
        live = self.daemon.live_env_ids()
        counts = self.store.requirement_counts()
        rows = [
            self._row(record, live, counts.get(record.id, 0)) for record in records
            if record.owner_uid is not None and (args["all"] or record.owner_uid == peer.uid)
        ]
        return {"envs": rows, "disk_computed_at": self.daemon.disk.figures.get("computed_at")}

    async def op_show(self, args: dict[str, Any], peer: "PeerCredentials", send_event: Any) -> dict[str, Any]:
        record = self._resolve(args, peer, admin_may=True)
        row = self._row(record, self.daemon.live_env_ids())
        row["requirement_list"] = self.store.requirements(record.id)
        row["installs"] = self.store.installs(record.id, limit=20)
        freeze: list[str] = []
        if record.state in (states.ASSIGNED, states.INSTALLING):
            argv = self.daemon.uv.pip_argv(str(record.path), "freeze", [], [], False)
            returncode, output = await self.daemon.uv.run_unchecked(argv)
            # uv mentions which environment it looked at; keep only the pins.
            freeze = [line for line in output.splitlines() if line and not line.startswith("Using Python")]
            if returncode != 0:
                raise protocol.EnvUnavailable("uv pip freeze failed in %s:\n%s" % (record.id, output))
        row["freeze"] = freeze
        return row

    async def op_remove(self, args: dict[str, Any], peer: "PeerCredentials", send_event: Any) -> dict[str, Any]:
        record = self._resolve(args, peer, admin_may=True)
        self._check_removable(record)
        freed = await unshared_bytes(record.path)
        # Other requests ran during the walk: a kernel may have started in the env meanwhile.
        self._check_removable(self.store.get(record.id) or record)
        await self.daemon.envs.remove(record)
        self.daemon.disk.mark_dirty()
        log.info("removed env %s (%s) for uid %d", record.id, record.key, peer.uid)
        return {"env_id": record.id, "removed": True, "freed_bytes": freed}

    def _check_removable(self, record: EnvRecord) -> None:
        if record.id in self.daemon.live_env_ids():
            raise protocol.NotAllowed("env %s has a running kernel; shut the kernel down first" % record.id)
        if record.state == states.INSTALLING:
            raise protocol.NotAllowed("a package install is running in env %s; try again when it ends" % record.id)

    async def op_gc(self, args: dict[str, Any], peer: "PeerCredentials", send_event: Callable[[str, Any], None]) -> dict[str, Any]:
        if args["all"] and not self.is_admin(peer):
            raise protocol.NotAllowed("only root or the admin group can collect every user's envs")
        return await self.collect(
            older_than_s=args["older_than_s"], orphan_ids=set(args["env_ids"]), dry_run=args["dry_run"],
            uid=None if args["all"] else peer.uid, progress=lambda line: send_event("output", line),
        )

    async def collect(
        self, older_than_s: float | None, orphan_ids: set[str], dry_run: bool, uid: int | None,
        progress: Callable[[str], None] = lambda line: None,
    ) -> dict[str, Any]:
        """The GC policy: unused for ``older_than_s``, or orphaned; never an env with a live kernel.

        Every tree walk and removal is awaited, so kernels start while it runs; an env is judged
        again, as it is now, right before it is removed."""
        now = time.time()

        def reason_to_collect(record: EnvRecord | None) -> str | None:
            if record is None or record.owner_uid is None or (uid is not None and record.owner_uid != uid):
                return None
            if record.state in (states.CREATING, states.INSTALLING, states.DELETING):
                return None
            last_used = record.last_used_at or record.created_at
            if record.id in orphan_ids:
                return "its notebook no longer exists"
            if older_than_s is not None and last_used <= now - older_than_s:
                return "unused for %s" % format_duration(now - last_used, largest_unit_only=True)
            return None

        removed, kept_live = [], []
        for planned in await self.store.scan():
            if reason_to_collect(planned) is None:
                continue
            freed = 0 if planned.id in self.daemon.live_env_ids() else await unshared_bytes(planned.path)
            # The walk let other requests run: judge the env as it is now.
            record = self.store.get(planned.id)
            reason = reason_to_collect(record)
            if record is None or reason is None:
                continue  # used, removed or busy since the plan: not garbage now
            if record.id in self.daemon.live_env_ids():
                kept_live.append({"env_id": record.id, "key": record.key.to_wire() if record.key else None})
                continue
            entry = {"env_id": record.id, "key": record.key.to_wire() if record.key else None,
                     "reason": reason, "freed_bytes": freed}
            progress("%s %s (%s): %s, %s" % (
                "would remove" if dry_run else "removing", record.id, record.key, reason, format_bytes(freed)))
            if not dry_run:
                await self.daemon.envs.remove(record)
            removed.append(entry)
        prune: dict[str, Any] = {"ran": False}
        if not dry_run:
            prune = await self._prune_cache(progress)
            self.daemon.disk.mark_dirty()
        return {
            "dry_run": dry_run, "removed": removed, "kept_live": kept_live,
            "freed_bytes": sum(entry["freed_bytes"] for entry in removed), "cache_prune": prune,
        }

    async def _prune_cache(self, progress: Callable[[str], None]) -> dict[str, Any]:
        installs = self.daemon.installs.status()
        if installs["running"] or installs["queued"] or self.daemon.pool.filling or self.daemon.envs.creating:
            # uv's prune takes an exclusive cache lock: it would stall every kernel start behind it.
            progress("uv cache prune skipped: installs or venv builds are running")
            return {"ran": False, "reason": "installs or venv builds were running"}
        returncode, output = await self.daemon.uv.run_unchecked([self.daemon.uv.binary, "cache", "prune"])
        lines = [line.strip() for line in output.splitlines() if line.strip() and not line.startswith("Pruning cache at")]
        summary = "; ".join(lines) or "done"
        progress("uv cache prune: %s" % summary)
        return {"ran": True, "exit_status": returncode, "summary": summary}

    async def op_pool(self, args: dict[str, Any], peer: "PeerCredentials", send_event: Any) -> dict[str, Any]:
        pool = self.daemon.pool
        if args["size"] is not None:
            if not self.is_admin(peer):
                raise protocol.NotAllowed("only root or the admin group can resize the shared pool")
            pool.target = args["size"]
            pool.wake()
            log.info("pool target set to %d by uid %d (until restart; set pool_size to keep it)", pool.target, peer.uid)
        return pool.status()

    async def op_status(self, args: dict[str, Any], peer: "PeerCredentials", send_event: Any) -> dict[str, Any]:
        return self.status()

    def status(self) -> dict[str, Any]:
        daemon = self.daemon
        by_state = self.store.count_by_state()
        notebook_envs = sum(
            n for state, n in by_state.items() if state not in (states.POOLED, states.CREATING)
        ) + self.store.count_creating_owned()
        return {
            "version": __version__,
            "protocol": protocol.PROTOCOL_VERSION,
            "mode": daemon.config.mode,
            "pid": os.getpid(),
            "socket": str(daemon.config.socket),
            "socket_activated": daemon.socket_activated,
            "uptime_s": round(time.time() - daemon.started_at, 1),
            "pool": daemon.pool.status(),
            "envs": {
                "total": notebook_envs,
                "live": len(daemon.live_env_ids()),
                "broken": by_state[states.BROKEN],
                "by_state": by_state,
            },
            "kernels_started": dict(self.kernels_started),
            "notebook_watch": None if daemon.watcher is None else {
                "folders": len(daemon.watcher.folders), "renames_followed": daemon.watcher.renames_followed,
            },
            "installs": daemon.installs.status(),
            "disk": dict(daemon.disk.figures, scanning=daemon.disk.scanning),
            "link_fallback_seen": daemon.uv.link_fallback_seen,
            "paths": daemon.config.public_summary(),
            "errors": list(daemon.envs.last_errors),
            "disk_full": daemon.envs.disk_full(daemon.config.state_dir),
            "quarantine": quarantined(daemon.config.venvs_dir),
        }
