"""Garbage collection of envs: which to remove and why, and the step that removes them.

The rules are pure (``judge``/``plan``: records, the time, the policy, the envs with a live
kernel and the orphaned ones in; envs and reasons out), so they are tested without a daemon.
An env is garbage when it is its owner's, not busy (being built, installed into or deleted),
and either orphaned (its notebook or folder no longer exists), retired (its notebook moved to a
new env, envswitch.py) or unused for longer than the policy allows. An env with a live kernel
is never removed; it is reported as kept.

Orphans are found by looking at paths (``find_orphans``), so whoever may see them does it: the
user's ``uvkernelctl gc --orphans``, or a user-mode daemon on its schedule. A system daemon never
reads users' files. A missing notebook whose file is in its folder under another name (same
device and inode) was renamed, not deleted: its env is kept and follows it at the next kernel
start.

``collect`` removes: every tree walk and removal is awaited, so kernels start while it runs,
and each env is judged again, as it is then, right before it goes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from . import protocol, states
from .diskusage import unshared_bytes
from .units import format_bytes, format_duration

if TYPE_CHECKING:
    from .services import Services
    from .store import EnvRecord

log = logging.getLogger("uvkerneld.gc")

# An env in one of these states is in use by the daemon right now: never garbage.
BUSY_STATES = (states.CREATING, states.INSTALLING, states.DELETING)
# Key kinds that name a path, which can disappear and leave the env orphaned.
PATH_KINDS = ("notebook", "dir")
ORPHANED = "its notebook no longer exists"


@dataclasses.dataclass(frozen=True)
class Policy:
    older_than_s: float | None  # unused this long makes an env garbage; None: age alone never does
    uid: int | None  # only this owner's envs; None: every user's


@dataclasses.dataclass(frozen=True)
class Planned:
    record: EnvRecord
    reason: str
    live: bool  # a kernel runs in it: reported as kept, never removed


# --- the rules (pure) ---------------------------------------------------------------------------


def judge(
    record: EnvRecord | None, now: float, policy: Policy, live_ids: set[str], orphan_ids: set[str]
) -> Planned | None:
    """Why ``record`` is garbage under ``policy`` at time ``now``, or None when it is not."""
    if record is None or record.owner_uid is None:
        return None
    if policy.uid is not None and record.owner_uid != policy.uid:
        return None
    if record.state in BUSY_STATES:
        return None
    last_used = record.last_used_at or record.created_at
    if record.state == states.RETIRED:
        reason = record.error or "its notebook moved to another env"
    elif record.id in orphan_ids:
        reason = ORPHANED
    elif policy.older_than_s is not None and last_used <= now - policy.older_than_s:
        reason = "unused for %s" % format_duration(now - last_used, largest_unit_only=True)
    else:
        return None
    return Planned(record, reason, record.id in live_ids)


def plan(
    records: Iterable[EnvRecord], now: float, policy: Policy, live_ids: set[str], orphan_ids: set[str]
) -> list[Planned]:
    """The garbage among ``records``, in their order, each with its reason."""
    return [planned for planned in (judge(record, now, policy, live_ids, orphan_ids) for record in records)
            if planned is not None]


# --- orphans: looking at paths, as someone who may see them -------------------------------------


def find_orphans(candidates: Iterable[tuple[str, str, str, str | None]]) -> tuple[list[str], dict[str, str]]:
    """(orphaned env ids, {env id: where its renamed notebook is now}) among ``candidates``:
    (env id, key kind, key value, the notebook's file identity or None). Stats paths: run it as
    the user whose notebooks they are, and off the event loop."""
    orphans: list[str] = []
    renamed: dict[str, str] = {}
    for env_id, kind, path, notebook_file in candidates:
        if kind not in PATH_KINDS or os.path.exists(path):
            continue
        now_at = renamed_notebook(path, notebook_file) if kind == "notebook" else None
        if now_at:
            renamed[env_id] = now_at
        else:
            orphans.append(env_id)
    return orphans, renamed


def renamed_notebook(old_path: str, notebook_file: str | None) -> str | None:
    """Where a missing notebook went, if it was renamed within its folder: the file there with
    the same device and inode (a daemon that could not watch the folder has not seen it yet)."""
    if not notebook_file:
        return None
    try:
        with os.scandir(os.path.dirname(old_path)) as entries:
            for entry in entries:
                if entry.name.endswith(".ipynb") and entry.is_file():
                    if protocol.same_inode(protocol.identity_of(entry.stat()), notebook_file):
                        return entry.path
    except OSError:
        pass
    return None


# --- removing -----------------------------------------------------------------------------------


def _still_garbage(
    record: EnvRecord, now: float, policy: Policy, live: set[str], orphan_ids: set[str]
) -> bool:
    verdict = judge(record, now, policy, live, orphan_ids)
    return verdict is not None and not verdict.live


async def collect(
    services: Services, policy: Policy, orphan_ids: set[str], dry_run: bool,
    progress: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:
    """Remove (or with ``dry_run`` list) the garbage, then prune uv's cache."""
    store, lifelines = services.store, services.lifelines
    now = time.time()
    removed, kept_live = [], []
    for planned in plan(await store.scan(), now, policy, lifelines.live_env_ids(), orphan_ids):
        freed = 0 if planned.live else await unshared_bytes(planned.record.path)
        # The walk let other requests run: judge the env as it is now.
        current = judge(store.get(planned.record.id), now, policy, lifelines.live_env_ids(), orphan_ids)
        if current is None:
            continue  # used, removed or busy since the plan: not garbage now
        record = current.record
        key = record.key.to_wire() if record.key else None
        if current.live:
            kept_live.append({"env_id": record.id, "key": key})
            continue
        progress("%s %s (%s): %s, %s" % (
            "would remove" if dry_run else "removing", record.id, record.key, current.reason,
            format_bytes(freed)))
        if not dry_run and not await services.envs.remove(record, lambda now_record: _still_garbage(
                now_record, now, policy, lifelines.live_env_ids(), orphan_ids)):
            continue  # a kernel start took it while we waited for its lock
        removed.append({"env_id": record.id, "key": key, "reason": current.reason, "freed_bytes": freed})
    prune: dict[str, Any] = {"ran": False}
    if not dry_run:
        prune = await prune_cache(services, progress)
        services.disk.mark_dirty()
    return {
        "dry_run": dry_run, "removed": removed, "kept_live": kept_live,
        "freed_bytes": sum(entry["freed_bytes"] for entry in removed), "cache_prune": prune,
    }


async def prune_cache(services: Services, progress: Callable[[str], None]) -> dict[str, Any]:
    installs = services.installs.status()
    if installs["running"] or installs["queued"] or services.pool.filling or services.envs.creating:
        # uv's prune takes an exclusive cache lock: it would stall every kernel start behind it.
        progress("uv cache prune skipped: installs or venv builds are running")
        return {"ran": False, "reason": "installs or venv builds were running"}
    uv = services.uv
    returncode, output = await uv.run_unchecked([uv.binary, "cache", "prune"])
    lines = [line.strip() for line in output.splitlines()
             if line.strip() and not line.startswith("Pruning cache at")]
    summary = "; ".join(lines) or "done"
    progress("uv cache prune: %s" % summary)
    return {"ran": True, "exit_status": returncode, "summary": summary}


# --- on a schedule ------------------------------------------------------------------------------


async def run_on_schedule(services: Services) -> None:
    """Every ``gc_interval``: remove envs unused for ``gc_older_than`` and, in user mode, orphans."""
    while True:
        config = services.config()
        await asyncio.sleep(config.gc_interval)
        try:
            result = await collect(
                services, Policy(config.gc_older_than, uid=None), await orphaned_env_ids(services),
                dry_run=False, progress=lambda line: log.info("gc: %s", line),
            )
            log.info("scheduled gc removed %d env(s), freed %s",
                     len(result["removed"]), format_bytes(result["freed_bytes"]))
        except Exception:  # the schedule must survive a failed run
            log.exception("scheduled gc failed")


async def orphaned_env_ids(services: Services) -> set[str]:
    # Only a user-mode daemon may look at notebook paths: in system mode it never reads a
    # user's files (ProtectHome=yes hides them anyway); there `uvkernelctl gc --orphans`,
    # run by the user, finds orphans and names them.
    if services.config().mode != "user":
        return set()
    candidates = [
        (record.id, record.key.kind, record.key.value, record.notebook_file)
        for record in await services.store.scan() if record.key is not None
    ]
    # A stat per env, on home folders that may be network mounts: off the loop.
    orphans, renamed = await asyncio.to_thread(find_orphans, candidates)
    for env_id, now_at in renamed.items():
        log.info("gc: kept %s: its notebook was renamed to %s; its env moves there at its next kernel start",
                 env_id, now_at)
    return set(orphans)
