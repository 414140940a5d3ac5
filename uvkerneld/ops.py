"""What each request does. Every op is in one registry, ``OPS`` (at the end): its name, its
argument check (in protocol.py) and its handler. The server turns frames into ``Request``
objects with ``parse_request`` and calls ``Operations.dispatch``; handlers use the ``Services``
start-up built, never the server.

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
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

from . import __version__, envsync, gc, protocol, states
from .diskusage import unshared_bytes
from .peers import PeerCredentials
from .services import Services
from .store import EnvRecord
from .venvsdir import quarantined

log = logging.getLogger("uvkerneld.ops")


class Operations:
    def __init__(self, services: Services) -> None:
        self.services = services
        self.store = services.store
        self.kernels_started = {"known": 0, "renamed": 0, "pool": 0, "created": 0, "rebuilt": 0}
        self._admin_gid = self._resolve_admin_group(services.config().admin_group)

    # --- plumbing -------------------------------------------------------------------------------

    async def dispatch(
        self, request: protocol.Request, peer: PeerCredentials, send_event: Callable[[str, Any], None]
    ) -> dict[str, Any]:
        return await OPS[request.op].handle(self, request.args, peer, send_event)

    @staticmethod
    def _resolve_admin_group(group: str | None) -> int | None:
        if not group:
            return None
        try:
            return int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            log.warning("admin_group %r does not exist; only root can see every env", group)
            return None

    def is_admin(self, peer: PeerCredentials) -> bool:
        if peer.uid == 0 or (self.services.config().mode == "user" and peer.uid == os.getuid()):
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

    def _resolve(self, args: dict[str, Any], peer: PeerCredentials, admin_may: bool) -> EnvRecord:
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
            raise protocol.NotFound(
                "uid %d has no env %s; `uvkernelctl list` shows yours" % (peer.uid, label))
        raise protocol.NotFound(
            "uid %d does not own an env at %s: packages can only be changed in your own "
            "notebook's env" % (peer.uid, label)
        )

    def _not_stopping(self, what: str) -> None:
        if self.services.stopping():
            raise protocol.ShuttingDown("uvkerneld is shutting down; %s again in a moment" % what)

    # --- kernels --------------------------------------------------------------------------------

    async def op_acquire(
        self, args: dict[str, Any], peer: PeerCredentials, send_event: Any
    ) -> dict[str, Any]:
        self._not_stopping("start the kernel")
        key = args["key"]
        started = time.monotonic()
        record, source = await self.services.envs.acquire(peer.uid, key, args["file"])
        self.kernels_started[source] += 1
        log.info(
            "kernel start: pid=%d uid=%d key=%s env=%s source=%s%s (%.1f ms)",
            peer.pid, peer.uid, key, record.id, source,
            " (from pool)" if source == "pool" else "", (time.monotonic() - started) * 1000,
        )
        if source not in ("known", "renamed"):
            self.services.disk.mark_dirty()
        return self._acquired(record, source)

    def _acquired(self, record: EnvRecord, source: str) -> dict[str, Any]:
        assert record.key is not None
        return {
            "env_id": record.id, "path": str(record.path), "python": str(record.interpreter),
            "source": source, "key": record.key.to_wire(),
            # No watcher here (system mode): the kernel reports its notebook's saves itself.
            "report_notebook_saves": record.key.kind == "notebook" and self.services.notebook_watch() is None,
            # The client syncs its notebook's declaration when this differs (nbdecl.digest).
            "declared_digest": record.declared_digest,
        }

    async def op_sync(
        self, args: dict[str, Any], peer: PeerCredentials, send_event: Callable[[str, Any], None]
    ) -> dict[str, Any]:
        """acquire, then make the env match the notebook's declaration (envsync.py)."""
        self._not_stopping("sync the notebook's env")
        record, source = await self.services.envs.acquire(peer.uid, args["key"], args["file"])
        if source not in ("known", "renamed"):
            self.services.disk.mark_dirty()
        # The env may be a new one: a declaration that needs another interpreter (envswitch.py).
        record, outcome = await envsync.sync(
            self.services, record, peer.uid, args["declaration"], args["force"],
            lambda line: send_event("output", line))
        return {**self._acquired(record, source), **outcome}

    async def op_notebook_saved(
        self, args: dict[str, Any], peer: PeerCredentials, send_event: Any
    ) -> dict[str, Any]:
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

    async def op_pip(
        self, args: dict[str, Any], peer: PeerCredentials, send_event: Callable[[str, Any], None]
    ) -> dict[str, Any]:
        self._not_stopping("run the command")
        record = self._resolve({"env": args["env"]}, peer, admin_may=False)
        result = await self.services.installs.run(
            record, peer.uid, args["argv"], args["files"], lambda line: send_event("output", line)
        )
        if args["argv"][:1] in (["install"], ["uninstall"]):
            self.services.disk.mark_dirty()
        return result

    async def op_installs(
        self, args: dict[str, Any], peer: PeerCredentials, send_event: Any
    ) -> dict[str, Any]:
        record = self._resolve(args, peer, admin_may=True)
        return {
            "env_id": record.id,
            "installs": self.store.installs(record.id),
            "requirements": self.store.requirements(record.id),
        }

    # --- seeing and cleaning up -----------------------------------------------------------------

    def _row(self, record: EnvRecord, live: set[str], requirements: int | None = None) -> dict[str, Any]:
        disk = self.services.disk.per_env.get(record.id, {})
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

    async def op_list(self, args: dict[str, Any], peer: PeerCredentials, send_event: Any) -> dict[str, Any]:
        if args["all"] and not self.is_admin(peer):
            raise protocol.NotAllowed(
                "only root%s can list every user's envs; drop --all to list yours"
                % (" and members of group %s" % self.services.config().admin_group
                   if self._admin_gid is not None else "")
            )
        records = await self.store.scan()
        live = self.services.lifelines.live_env_ids()
        counts = self.store.requirement_counts()
        rows = [
            self._row(record, live, counts.get(record.id, 0)) for record in records
            if record.owner_uid is not None and (args["all"] or record.owner_uid == peer.uid)
        ]
        return {"envs": rows, "disk_computed_at": self.services.disk.figures.get("computed_at")}

    async def op_show(self, args: dict[str, Any], peer: PeerCredentials, send_event: Any) -> dict[str, Any]:
        record = self._resolve(args, peer, admin_may=True)
        row = self._row(record, self.services.lifelines.live_env_ids())
        row["requirement_list"] = self.store.requirements(record.id)
        row["installs"] = self.store.installs(record.id, limit=20)
        freeze: list[str] = []
        if record.state in (states.ASSIGNED, states.INSTALLING):
            argv = self.services.uv.pip_argv(str(record.path), "freeze", [], [], False)
            returncode, output = await self.services.uv.run_unchecked(argv)
            # uv mentions which environment it looked at; keep only the pins.
            freeze = [line for line in output.splitlines() if line and not line.startswith("Using Python")]
            if returncode != 0:
                raise protocol.EnvUnavailable("uv pip freeze failed in %s:\n%s" % (record.id, output))
        row["freeze"] = freeze
        return row

    async def op_remove(self, args: dict[str, Any], peer: PeerCredentials, send_event: Any) -> dict[str, Any]:
        record = self._resolve(args, peer, admin_may=True)
        self._check_removable(record)
        freed = await unshared_bytes(record.path)

        def still_removable(current: EnvRecord) -> bool:
            # Other requests ran during the walk and while we waited for the env's lock: a
            # kernel may have started in it meanwhile. Raises NotAllowed, saying why.
            self._check_removable(current)
            return True

        if not await self.services.envs.remove(record, still_removable):
            raise protocol.NotFound("env %s was removed meanwhile" % record.id)
        self.services.disk.mark_dirty()
        log.info("removed env %s (%s) for uid %d", record.id, record.key, peer.uid)
        return {"env_id": record.id, "removed": True, "freed_bytes": freed}

    def _check_removable(self, record: EnvRecord) -> None:
        if record.id in self.services.lifelines.live_env_ids():
            raise protocol.NotAllowed("env %s has a running kernel; shut the kernel down first" % record.id)
        if record.state == states.INSTALLING:
            raise protocol.NotAllowed(
                "a package install is running in env %s; try again when it ends" % record.id)

    async def op_gc(
        self, args: dict[str, Any], peer: PeerCredentials, send_event: Callable[[str, Any], None]
    ) -> dict[str, Any]:
        if args["all"] and not self.is_admin(peer):
            raise protocol.NotAllowed("only root or the admin group can collect every user's envs")
        return await gc.collect(
            self.services, gc.Policy(args["older_than_s"], uid=None if args["all"] else peer.uid),
            set(args["env_ids"]), dry_run=args["dry_run"], progress=lambda line: send_event("output", line),
        )

    async def op_pool(self, args: dict[str, Any], peer: PeerCredentials, send_event: Any) -> dict[str, Any]:
        pool = self.services.pool
        if args["size"] is not None:
            if not self.is_admin(peer):
                raise protocol.NotAllowed("only root or the admin group can resize the shared pool")
            pool.resize(args["size"])
            log.info("pool target set to %d by uid %d (until restart; set pool_size to keep it)",
                     pool.target, peer.uid)
        return pool.status()

    async def op_status(self, args: dict[str, Any], peer: PeerCredentials, send_event: Any) -> dict[str, Any]:
        return self.status()

    def status(self) -> dict[str, Any]:
        services = self.services
        config = services.config()
        by_state = self.store.count_by_state()
        notebook_envs = sum(
            n for state, n in by_state.items() if state not in (states.POOLED, states.CREATING)
        ) + self.store.count_creating_owned()
        return {
            "version": __version__,
            "protocol": protocol.PROTOCOL_VERSION,
            "mode": config.mode,
            "pid": os.getpid(),
            "socket": str(config.socket),
            "socket_activated": services.socket_activated,
            "uptime_s": round(time.time() - services.started_at, 1),
            "pool": services.pool.status(),
            "envs": {
                "total": notebook_envs,
                "live": len(services.lifelines.live_env_ids()),
                "broken": by_state[states.BROKEN],
                "by_state": by_state,
            },
            "kernels_started": dict(self.kernels_started),
            "notebook_watch": services.notebook_watch(),
            "installs": services.installs.status(),
            "bytecode": None if services.installs.bytecode is None else services.installs.bytecode.status(),
            "disk": dict(services.disk.figures, scanning=services.disk.scanning),
            "link_fallback_seen": services.uv.link_fallback_seen,
            "paths": config.public_summary(),
            "errors": list(services.envs.last_errors),
            "disk_full": services.envs.disk_full(config.state_dir),
            "quarantine": quarantined(config.venvs_dir),
        }


# --- the registry: every op the daemon knows, its argument check and its handler ----------------

SendEvent = Callable[[str, Any], None]


class Op(NamedTuple):
    validate: Callable[[dict[str, Any]], dict[str, Any]]  # wire args -> checked args, or BadRequest
    handle: Callable[[Operations, dict[str, Any], PeerCredentials, SendEvent], Awaitable[dict[str, Any]]]


# In this order in the "unknown op" error.
OPS: dict[str, Op] = {
    "acquire": Op(protocol.validate_acquire, Operations.op_acquire),
    "sync": Op(protocol.validate_sync, Operations.op_sync),
    "status": Op(protocol.validate_status, Operations.op_status),
    "pip": Op(protocol.validate_pip, Operations.op_pip),
    "installs": Op(protocol.validate_target, Operations.op_installs),
    "remove": Op(protocol.validate_target, Operations.op_remove),
    "list": Op(protocol.validate_list, Operations.op_list),
    "show": Op(protocol.validate_target, Operations.op_show),
    "gc": Op(protocol.validate_gc, Operations.op_gc),
    "pool": Op(protocol.validate_pool, Operations.op_pool),
    "notebook_saved": Op(protocol.validate_notebook_saved, Operations.op_notebook_saved),
}
_VALIDATORS = {name: op.validate for name, op in OPS.items()}


def parse_request(message: dict[str, Any]) -> protocol.Request:
    """A decoded message as a request for one of ``OPS``, its arguments checked."""
    return protocol.parse_request(message, _VALIDATORS)
