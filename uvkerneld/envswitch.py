"""A notebook whose declaration needs another interpreter than its env's moves to a new env.

``requires-python`` is a fact about the venv's interpreter, which a venv cannot change (uv
writes its path into the venv). So when the notebook's env does not satisfy it and another
interpreter on the host does (envsync.py picks it), the notebook gets a new env:

1. Under the notebook key's lock (no kernel start gets its env meanwhile) and the old env's
   install turn (no ``%pip`` changes it meanwhile), a build slot is taken and a bare venv is
   built on that interpreter, ``creating`` and keyless (EnvManager.build_on).
2. envsync's pipeline syncs the declaration into it: the kernel's own packages and the declared
   ones, resolved for its interpreter, the old env's pins as preferences, and what ``%pip`` added
   outside the declaration carried over (envsync's merge rule).
3. One store transaction (Store.switch_env) gives the notebook's key, file identity and records
   to the new env and ``retires`` the old one (keyless), so (uid, key) never has two envs, in
   the store or in the venvs' record files.
4. The retired env is removed once no kernel runs in it: the stub that asked for the sync
   holds a lifeline to it, which the server moves to the new env with the ``sync`` result
   (Lifelines.move); another kernel still running in it keeps it until that kernel ends.

Crash safety: killed during 1-2, the new env is a ``creating`` row recovery removes and the old
env is untouched; killed after 3, the retired env is removed at the next start (if no kernel of
the earlier daemon still runs in it) or by gc. A failed build or sync removes the new env and
leaves the old one as it was.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from . import protocol, states
from .declared import Parsed
from .installs import check_changeable
from .services import Services
from .store import EnvRecord

log = logging.getLogger("uvkerneld.envswitch")

SyncInto = Callable[
    [Services, EnvRecord, Parsed, Callable[[str], None], EnvRecord],
    Awaitable[tuple[dict[str, str] | None, dict[str, list[str]]]],
]


async def switch(
    services: Services, record: EnvRecord, uid: int, parsed: Parsed, digest: str, python: tuple[str, str],
    force: bool, send_line: Callable[[str], None], sync_into: SyncInto,
) -> tuple[EnvRecord, dict[str, Any]]:
    """Steps 1-3 for the notebook whose env is ``record`` (the caller holds its key's lock);
    ``python`` is (path, version). Returns (the new env, the sync's outcome)."""
    store, envs = services.store, services.envs
    path, version = python
    async with services.installs.turn(record.id):
        current = store.get(record.id)
        if current is None:
            raise protocol.NotFound("env %s was removed meanwhile" % record.id)
        check_changeable(current)
        send_line("uvkerneld: %s asks for requires-python %r; this notebook's env has another Python: "
                  "building a new env on Python %s (%s)"
                  % (parsed.place, parsed.requires_python, version, path))
        async with envs.build_slot():
            new = await envs.build_on(uid, path)
            try:
                install_id = store.insert_install(new.id, uid, "sync", ["sync", *parsed.dependencies])
                store.install_started(install_id)
                requirements, changes = await sync_into(services, current, parsed, send_line, new)
                store.install_finished(install_id, 0 if requirements is not None else 1)
            except BaseException:  # BadDeclaration, uv not running, cancelled: the old env is as it was
                await asyncio.shield(envs.discard(new))
                raise
            if requirements is None:
                await envs.discard(new)
                raise protocol.EnvUnavailable(
                    "uv pip sync failed in the new env on Python %s (its output is above); this "
                    "notebook's env is unchanged, and the next kernel start tries again" % version)
            reason = "replaced by env %s on Python %s (%s: requires-python %r)" % (
                new.id, version, parsed.place, parsed.requires_python)
            moved = store.switch_env(
                current.id, new.id, reason, digest, list(parsed.dependencies), requirements)
    services.disk.mark_dirty()
    log.info("notebook %s moved from env %s to env %s on Python %s (%s)",
             current.key, current.id, moved.id, version, path)
    remove_if_unused(services, current.id)
    return moved, {"synced": True, "changes": changes}


def remove_if_unused(services: Services, env_id: str) -> None:
    """Remove ``env_id`` in the background if it is retired and no kernel runs in it."""
    services.envs.remove_retired_soon(env_id, services.lifelines.live_env_ids, services.disk.mark_dirty)


def remove_retired_when_unused(services: Services) -> None:
    """At start-up: retired envs go when their last kernel ends, and those no kernel of an
    earlier daemon still runs in (a daemon stopped before it could remove them) go now."""
    services.lifelines.on_released = lambda env_id: remove_if_unused(services, env_id)
    for record in list(services.store.all()):
        if record.state == states.RETIRED:
            remove_if_unused(services, record.id)
