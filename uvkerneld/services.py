"""What request handlers and garbage collection work with, built once by the daemon at start-up.

Everything here exists for the daemon's whole life (no field is ever None), so the handlers in
ops.py and gc.py need nothing from the server and do not import it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from .config import Config
from .diskusage import DiskUsage
from .envs import EnvManager
from .installs import InstallManager
from .lifelines import Lifelines
from .pool import WarmPool
from .store import Store
from .uv import Uv


@dataclasses.dataclass(frozen=True)
class Services:
    # The configuration as it is now: SIGHUP may change pool_size and log_level.
    config: Callable[[], Config]
    store: Store
    envs: EnvManager
    pool: WarmPool
    installs: InstallManager
    uv: Uv
    disk: DiskUsage
    lifelines: Lifelines
    # The notebook watcher's figures; None when there is no watcher (system mode, where the
    # daemon may not read users' folders and kernels report their notebook's saves themselves).
    notebook_watch: Callable[[], dict[str, int] | None]
    socket_activated: bool
    started_at: float
    stopping: Callable[[], bool]  # SIGTERM/SIGINT received: start nothing new
