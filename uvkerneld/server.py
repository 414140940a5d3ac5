"""The daemon: an asyncio Unix-socket server around the pure protocol, plus start-up and shutdown.

Lifecycle (``Daemon.serve``): ``startup`` (dirs, single-instance lock, store, crash recovery,
socket, pool) -> wait for SIGTERM/SIGINT -> ``shutdown`` (stop accepting, stop the pool filler and
any uv run, drop connections, close the store, remove the socket we created). A second signal
during shutdown forces exit.

Each connection is served by one task that reads frames one at a time. The peer's uid comes from
SO_PEERCRED, never from the message. After a successful ``acquire`` the connection becomes the
kernel's *lifeline*: the stub execs ipykernel with the socket still open, and when the kernel dies
the kernel closes it, which tells us the env no longer has a live kernel. What connections can
make the daemon hold (descriptors, idle time, buffered bytes, log lines) is bounded by connlimits.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import fcntl
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from . import __version__, cachedir, connlimits, envswitch, framing, fsafety, gc, handstart, protocol
from .buildslots import BuildSlots
from .children import ChildRegistry
from .compilequeue import CompileQueue
from .config import Config, ConfigError, load_config
from .diskusage import DiskUsage
from .envs import EnvManager
from .envsync import sweep_scratch
from .installs import InstallManager
from .lifelines import Lifelines
from .notify import Notifier, inherited_listener
from .ops import Operations, parse_request
from .peers import PeerCredentials, peer_credentials
from .pool import WarmPool
from .protocol import UvkError
from .services import Services
from .storeopen import StoreRefused, open_store, private_state_files
from .tasks import cancel_and_wait
from .uv import Uv, find_uv
from .watch import NotebookFolders, NotebookWatcher

log = logging.getLogger("uvkerneld.server")


async def _decode(body: bytes) -> dict[str, Any]:
    """A request's JSON; a large one (a sync's lock, ~10 ms per MB) decoded off the event loop."""
    if len(body) <= connlimits.SMALL_FRAME:
        return protocol.decode_body(body)
    return await asyncio.to_thread(protocol.decode_body, body)

WRITE_TIMEOUT = 30.0
SHUTDOWN_GRACE = 30.0  # running installs/acquires get this long to finish on SIGTERM
STATUS_INTERVAL = 5.0
# A daemon that is exiting (idle exit, restart) holds the state-dir lock for a few more moments;
# its successor, started by the next kernel, waits this long for it instead of failing.
INSTANCE_LOCK_WAIT = 15.0


class StartupError(Exception):
    """The daemon cannot start; the message says why and what to do."""


class _Stoppable(Protocol):
    async def stop(self) -> None: ...


class Daemon:
    def __init__(self, config: Config, flags: dict[str, Any] | None = None) -> None:
        self.config = config
        self.flags = dict(flags or {})  # kept so SIGHUP can reload the config file under them
        self.started_at = time.time()
        self.notifier = Notifier()
        self.socket_activated = False
        self.shutdown_grace = SHUTDOWN_GRACE
        self._busy: set[asyncio.Task[None]] = set()
        self._background: list[asyncio.Task[None]] = []
        # Everything start-up builds; None until it has (or when it failed).
        self.services: Services | None = None
        self.ops: Operations | None = None
        self._running: list[_Stoppable] = []  # pool, disk scanner, notebook watcher, stopped in order
        self._closing = contextlib.ExitStack()  # the store, closed last
        self._server: connlimits.Listener | None = None
        self._lock_file: Any = None
        self._venvs_claim: Any = None
        self._bound_socket = False
        self._stop = asyncio.Event()
        self._connections: set[asyncio.Task[None]] = set()
        self.last_activity = time.monotonic()  # a connection opened or closed
        self.admission: connlimits.Admission | None = None

    # --- lifecycle ------------------------------------------------------------------------------

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal, signum)
        loop.add_signal_handler(signal.SIGHUP, self._on_reload)
        try:
            self._prepare_limits()
            await self.startup()
            await self._stop.wait()
        finally:
            await self.shutdown()

    def _prepare_limits(self) -> None:
        connlimits.install_log_guard()
        fd_limit = connlimits.raise_fd_limit()
        try:
            limits = connlimits.Limits(fd_limit, os.environ)
        except ValueError as exc:
            raise StartupError(str(exc)) from None
        self.admission = connlimits.Admission(limits)
        log.info(
            "open-file limit %s: up to %d connections (%d per uid besides kernels, %d kernels per uid), "
            "idle connections closed after %.0f s, %d MiB for large requests being received",
            fd_limit if fd_limit >= 0 else "unlimited", limits.max_connections,
            limits.max_connections_per_uid, limits.max_kernels_per_uid, limits.idle_timeout,
            limits.frame_buffer_budget >> 20,
        )

    def _on_reload(self) -> None:
        log.info("SIGHUP received: reloading the configuration")
        try:
            new = load_config(self.flags)
        except ConfigError as exc:
            log.error("configuration not reloaded: %s", exc)
            return
        changed = [
            field.name for field in dataclasses.fields(Config)
            if getattr(new, field.name) != getattr(self.config, field.name)
        ]
        applied = []
        if new.log_level != self.config.log_level:
            logging.getLogger().setLevel(new.log_level.upper())
            applied.append("log_level")
        if new.pool_size != self.config.pool_size and self.services is not None:
            self.services.pool.resize(new.pool_size)
            applied.append("pool_size")
        needs_restart = [name for name in changed if name not in applied]
        self.config = dataclasses.replace(self.config, log_level=new.log_level, pool_size=new.pool_size)
        log.info(
            "configuration reloaded: applied %s%s", ", ".join(applied) or "nothing",
            "; restart to apply %s" % ", ".join(needs_restart) if needs_restart else "",
        )

    def _on_signal(self, signum: int) -> None:
        if self._stop.is_set():
            log.warning("second %s: exiting now", signal.Signals(signum).name)
            os._exit(1)
        log.info("%s received: shutting down", signal.Signals(signum).name)
        self._stop.set()

    async def startup(self) -> None:
        config = self.config
        # Inherit the listening socket first: with socket activation, systemd holds it (and
        # queues connections) whatever happens to us, so nothing we do later can lose a client.
        try:
            inherited = inherited_listener()
        except ValueError as exc:
            raise StartupError(str(exc)) from None
        if config.mode == "system":
            # Venvs and cache must be readable by every notebook user, writable by us only.
            os.umask(0o022)
        try:
            if inherited is None:
                handstart.check(config, started_by_kernel=bool(self.flags.get("started_by_kernel")))
            fsafety.prepare_daemon_paths(config, socket_activated=inherited is not None)
        except (handstart.OtherDaemonsSocket, fsafety.UnsafePath) as exc:
            raise StartupError(str(exc)) from None
        for directory in (config.state_dir, config.venvs_dir, config.cache_dir):
            directory.mkdir(parents=True, exist_ok=True)
        if config.mode == "system":
            try:
                cachedir.make_private(config.cache_dir, config.link_mode)
            except cachedir.CacheDirError as exc:
                raise StartupError(str(exc)) from None
        private_state_files(config.state_dir)
        await self._take_instance_lock(inherited)
        await asyncio.to_thread(sweep_scratch, config.state_dir)  # what a killed daemon's syncs left
        uv_binary = find_uv(config.uv)
        try:
            # Also stops uv runs a killed predecessor left, and claims the venvs dir for this store.
            store, self._venvs_claim, adopt = open_store(config)
        except StoreRefused as exc:
            raise StartupError(str(exc)) from None
        self._closing.callback(store.close)
        uv = Uv(uv_binary, str(config.cache_dir), config.link_mode, config.python,
                shared_host=config.mode == "system", children=ChildRegistry(config.state_dir))
        bytecode = CompileQueue(config, store, uv.children) if config.bytecode == "shared" else None
        slots = BuildSlots(config.max_parallel_creates, uv.raise_priority)
        pool_wake = asyncio.Event()
        # A system daemon may not read users' folders; it follows renames at kernel start only.
        folders = NotebookFolders() if config.mode == "user" else None
        envs = EnvManager(config, store, uv, slots, bytecode, refill_pool=pool_wake.set,
                          watch_notebook=folders.notebook_seen if folders is not None else None)
        await envs.recover(adopt=adopt)
        if bytecode is not None:
            await bytecode.recover()
        lifelines = Lifelines(store)
        lifelines.forget_dead_kernels()
        disk = DiskUsage(config.cache_dir, config.venvs_dir)
        pool = WarmPool(envs, store, slots, config.pool_size, pool_wake, disk_changed=disk.mark_dirty)
        installs = InstallManager(config, store, uv, bytecode)
        if bytecode is not None:
            bytecode.start(installs.env_lock)
            self._running.append(bytecode)
        watcher = None
        if folders is not None:
            watcher = NotebookWatcher(envs, store, folders, os.getuid())
        if inherited is not None:
            sock = inherited
            self.socket_activated = True
            address = sock.getsockname()
            if address and address != str(config.socket):
                log.info("socket-activated on %s (overrides %s)", address, config.socket)
                self.config = dataclasses.replace(config, socket=Path(address))
        else:
            sock = self._bind_socket()
            handstart.write_record(config, started_by_kernel=bool(self.flags.get("started_by_kernel")))
        services = self.services = Services(
            config=lambda: self.config, store=store, envs=envs, pool=pool, installs=installs, uv=uv,
            disk=disk, lifelines=lifelines, notebook_watch=_watch_figures(watcher),
            socket_activated=self.socket_activated, started_at=self.started_at, stopping=self._stop.is_set,
        )
        self.ops = Operations(services)
        envswitch.remove_retired_when_unused(services)
        assert self.admission is not None
        self._server = connlimits.Listener(sock, self._on_connection, self.admission.limits)
        log.info(
            "uvkerneld %s ready: mode=%s socket=%s%s venvs=%s cache=%s pool=%d uv=%s",
            __version__, config.mode, self.config.socket,
            " (socket-activated)" if self.socket_activated else "",
            config.venvs_dir, config.cache_dir, config.pool_size, uv_binary,
        )
        pool.start()
        disk.start()
        self._running += [pool, disk]
        if watcher is not None:
            watcher.start()
            self._running.append(watcher)
        if config.gc_interval:
            self._background.append(asyncio.create_task(gc.run_on_schedule(services), name="scheduled-gc"))
        if config.idle_exit:
            self._background.append(asyncio.create_task(self._exit_when_idle(), name="idle-exit"))
        self.notifier.ready(self._status_line())
        self._background.append(asyncio.create_task(self._report_status(), name="sd-status"))
        if self.notifier.watchdog_interval:
            self._background.append(asyncio.create_task(self._watchdog(), name="sd-watchdog"))

    def _status_line(self) -> str:
        if self.services is None:
            return "starting"
        pool = self.services.pool
        counts = self.status()["envs"]  # cheap: counts only
        installs = self.services.installs.status()
        return "pool %d/%d ready, %d envs, %d live kernels, %d installs running, %d queued" % (
            pool.ready, pool.target, counts["total"], counts["live"], installs["running"],
            installs["queued"],
        )

    async def _report_status(self) -> None:
        while True:
            await asyncio.sleep(STATUS_INTERVAL if self.notifier.enabled else 3600)
            self.notifier.status(self._status_line())

    async def _watchdog(self) -> None:
        assert self.notifier.watchdog_interval
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(self.notifier.watchdog_interval)

    async def _take_instance_lock(self, inherited: socket.socket | None) -> None:
        """One daemon per state dir: two would corrupt each other's venvs and store.

        The lock file holds the holder's pid and the socket it serves. A holder that answers
        there is running and staying: refuse at once, naming it. One that does not answer may
        be exiting (idle exit closes its socket first): wait for it, without blocking the loop.
        """
        path = self.config.state_dir / "uvkerneld.pid"
        handle = open(path, "a+")  # noqa: ASYNC230  a small local file, once at startup before serving
        deadline = time.monotonic() + INSTANCE_LOCK_WAIT
        waited = False
        while not _try_flock(handle):
            pid, holder_socket = _lock_holder(handle, self.config.socket)
            if await asyncio.to_thread(self._socket_answers, holder_socket):
                handle.close()
                raise StartupError(
                    "another uvkerneld (pid %s) is already using %s; it answers on %s (`uvkernelctl "
                    "--socket %s status` shows it): stop it first or pass a different --state-dir"
                    % (pid, self.config.state_dir, holder_socket, holder_socket)
                )
            if time.monotonic() > deadline:
                handle.close()
                raise StartupError(
                    "another uvkerneld (pid %s) is already using %s; it does not answer on %s and did "
                    "not exit within %.0f s: stop it first or pass a different --state-dir"
                    % (pid, self.config.state_dir, holder_socket, INSTANCE_LOCK_WAIT)
                )
            if not waited:
                log.info("another uvkerneld (pid %s) holds %s and is not answering on %s: waiting up to "
                         "%.0f s for it to exit", pid, path, holder_socket, INSTANCE_LOCK_WAIT)
                waited = True
            await asyncio.sleep(0.05)
        serving = inherited.getsockname() if inherited is not None else None
        handle.seek(0)
        handle.truncate()
        handle.write("%d\n%s\n" % (os.getpid(), serving or self.config.socket))
        handle.flush()
        self._lock_file = handle

    def _socket_answers(self, path: Path | str | None = None) -> bool:
        """Whether a daemon accepts connections on ``path`` (default: our socket path) now."""
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(2.0)
        try:
            probe.connect(str(path or self.config.socket))
            return True
        except OSError:
            return False
        finally:
            probe.close()

    def _bind_socket(self) -> socket.socket:
        path = str(self.config.socket)
        if os.path.exists(path) or os.path.islink(path):
            if self._socket_answers():
                raise StartupError(
                    "another daemon already answers on %s; refusing to take its socket "
                    "(`uvkernelctl --socket %s status` shows it)" % (path, path)
                )
            # Nobody answers: a stale socket from a daemon that died. Safe to replace.
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Create the socket with its final mode: no window where others could connect.
        old_umask = os.umask(0o177 if self.config.mode == "user" else 0o111)
        try:
            sock.bind(path)
        finally:
            os.umask(old_umask)
        sock.listen(128)
        sock.setblocking(False)
        self._bound_socket = True
        return sock

    async def shutdown(self) -> None:
        log.info("stopping: no new connections")
        self.notifier.stopping()
        if self._server is not None:
            self._server.close()
        for task in self._background:
            await cancel_and_wait(task)
        for part in self._running:
            await part.stop()  # the pool removes a half-built venv: it is never handed out
        # Requests in flight (installs, on-demand builds) get a grace period to finish; idle
        # connections (kernel lifelines) and whatever is still running then are cancelled.
        busy = [task for task in self._busy if not task.done()]
        if busy:
            log.info("waiting up to %.0f s for %d running request(s)", self.shutdown_grace, len(busy))
            _, unfinished = await asyncio.wait(busy, timeout=self.shutdown_grace)
            if unfinished:
                log.warning("aborting %d request(s) still running after %.0f s",
                            len(unfinished), self.shutdown_grace)
        remaining = [task for task in self._connections if not task.done()]
        for task in remaining:
            task.cancel()
        if remaining:
            await asyncio.wait(remaining, timeout=10)
            log.info("closed %d connection(s)", len(remaining))
        if self._bound_socket:
            try:
                os.unlink(self.config.socket)
            except FileNotFoundError:
                pass
        self._closing.close()
        if self._venvs_claim is not None:
            self._venvs_claim.close()  # before the state-dir lock: a successor takes both
        if self._lock_file is not None:
            self._lock_file.close()
        log.info("stopped")

    # --- connections ----------------------------------------------------------------------------

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        self.last_activity = time.monotonic()
        connection_id = id(task)
        lifeline_env: str | None = None
        admission = self.admission
        assert admission is not None
        connection: connlimits.Connection | None = None
        services = self.services
        assert services is not None  # the listener exists only once start-up built everything
        try:
            peer = peer_credentials(writer.get_extra_info("socket"))
            try:
                connection = admission.open(peer.uid, writer)
            except protocol.OverLimit as exc:
                log.warning("refused a connection from uid %d: %s", peer.uid, exc.message)
                await self._send_error(writer, None, exc)
                return
            while True:
                body = await self._read_frame(reader, writer, connection)
                if body is None:
                    return
                request_id = None
                self._busy.add(task)
                try:
                    message = await _decode(body)
                    request_id = protocol.request_id_of(message)
                    protocol.check_request_size(message.get("op"), len(body))
                    request = parse_request(message)
                    if request.op == "acquire":
                        admission.check_kernel_slot(connection)
                    result = await self._dispatch(request, peer, writer)
                except UvkError as exc:
                    await self._send_error(writer, request_id, exc)
                    admission.set_busy(connection, False)
                    continue
                except Exception:
                    log.exception("internal error handling a request from pid %d", peer.pid)
                    await self._send_error(writer, request_id, protocol.InternalError(
                        "internal error in uvkerneld; the daemon log has the details"))
                    admission.set_busy(connection, False)
                    continue
                finally:
                    self._busy.discard(task)
                if request.op == "status":
                    result = dict(result, connections=admission.status())
                if request.op == "acquire" and lifeline_env is None:
                    admission.make_lifeline(connection)
                    lifeline_env = result["env_id"]
                    services.lifelines.add(lifeline_env, connection_id, peer.pid)
                elif request.op == "sync" and lifeline_env not in (None, result["env_id"]):
                    # The sync moved the notebook to a new env (envswitch.py): the stub execs the
                    # kernel there, and the old env is free once no other kernel runs in it.
                    assert lifeline_env is not None
                    services.lifelines.move(lifeline_env, result["env_id"], connection_id, peer.pid)
                    lifeline_env = result["env_id"]
                await self._send(writer, protocol.ok_response(request.id, result))
                admission.set_busy(connection, False)
        except (ConnectionError, asyncio.TimeoutError):
            pass
        finally:
            if connection is not None:
                admission.close(connection)
            if lifeline_env is not None:
                # On shutdown the kernel lives on: its record stays so the next daemon knows.
                services.lifelines.remove(lifeline_env, connection_id, peer.pid,
                                          kernel_ended=not self._stop.is_set())
            self._connections.discard(task)
            self.last_activity = time.monotonic()
            writer.close()

    async def _read_frame(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, connection: connlimits.Connection
    ) -> bytes | None:
        """The next frame's body; None when the connection is to be closed (the peer was told why).

        Waiting for a frame to start is bounded by the idle timeout (not for a kernel's lifeline);
        once its first byte is in, header and body together by the frame timeout, and a large
        body's bytes are reserved from the shared budget before they are read.
        """
        admission = self.admission
        assert admission is not None
        limits = admission.limits
        try:
            return await framing.read_frame(
                reader, admission.idle_timeout_of(connection), limits.frame_timeout, admission,
                started=lambda: admission.set_busy(connection, True), max_size=protocol.MAX_SYNC_FRAME_SIZE,
            )
        except framing.IdleTimeout:
            admission.refused["idle_closed"] += 1
            admission.close(connection, protocol.OverLimit(
                "no request within %.0f s of connecting or of the last answer (idle_timeout); closing: "
                "connect when you have a request to send" % limits.idle_timeout))
            return None
        except UvkError as exc:
            await self._send_error(writer, None, exc)
            return None

    async def _send(self, writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
        writer.write(protocol.encode_frame(message))
        await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)

    async def _send_error(self, writer: asyncio.StreamWriter, request_id: Any, error: UvkError) -> None:
        if error.fault == "client":
            log.info("rejected request: %s: %s", error.code, error.message)
        try:
            await self._send(writer, protocol.error_response(request_id, error))
        except (ConnectionError, asyncio.TimeoutError):
            pass

    # --- ops ------------------------------------------------------------------------------------

    async def _dispatch(
        self, request: protocol.Request, peer: PeerCredentials, writer: asyncio.StreamWriter
    ) -> dict[str, Any]:
        self._authorize(peer)

        def send_event(name: str, data: Any) -> None:
            # Events (uv's output lines) go out as produced. No drain: a client that stopped
            # reading must not stall an install (the buffer is bounded by uv's output).
            if not writer.is_closing():
                writer.write(protocol.encode_frame(protocol.event(request.id, name, data)))

        assert self.ops is not None
        return await self.ops.dispatch(request, peer, send_event)

    def _authorize(self, peer: PeerCredentials) -> None:
        # A user-mode daemon serves its own user only (its socket is 0600 anyway). In system
        # mode every uid may connect; ops.py checks that the envs each op touches are the peer's.
        if self.config.mode == "user" and peer.uid != os.getuid():
            raise protocol.NotAllowed(
                "this uvkerneld serves uid %d only; uid %d should run its own daemon"
                % (os.getuid(), peer.uid)
            )

    def status(self) -> dict[str, Any]:
        assert self.ops is not None
        return self.ops.status()

    def idle(self) -> bool:
        """Nothing for the daemon to do or keep: no connection (so no kernel lifeline and no
        request), no kernel left from an earlier daemon, no build and no install."""
        services = self.services
        assert services is not None
        installs = services.installs.status()
        return (
            not self._connections and not services.lifelines.live_env_ids() and not services.pool.filling
            and not services.envs.creating and not installs["running"] and not installs["queued"]
            and not (services.installs.bytecode is not None and services.installs.bytecode.busy())
        )

    async def _exit_when_idle(self) -> None:
        """Exit after ``idle_exit`` seconds of idleness (a daemon a kernel started on demand).

        The next kernel start starts a new daemon, which finds the pool venvs on disk. Exiting
        closes the socket before anything else, and the successor waits for our state-dir lock
        (INSTANCE_LOCK_WAIT), so a kernel that starts while we exit is served, not refused.
        """
        limit = self.config.idle_exit
        while True:
            if not self.idle():
                self.last_activity = time.monotonic()
            quiet_for = time.monotonic() - self.last_activity
            if quiet_for >= limit:
                log.info("idle for %.0f s (idle_exit): exiting; the next kernel start starts uvkerneld again",
                         quiet_for)
                if self._server is not None:
                    self._server.close()  # from here on, new clients start a successor
                self._stop.set()
                return
            await asyncio.sleep(min(limit - quiet_for, 60.0) + 0.01)


def _lock_holder(handle: Any, default_socket: Path) -> tuple[str, str]:
    """(pid, socket) the lock holder wrote; a daemon of an older version wrote its pid only."""
    handle.seek(0)
    lines = handle.read().splitlines()
    pid = lines[0].strip() if lines and lines[0].strip() else "?"
    holder_socket = lines[1].strip() if len(lines) > 1 and lines[1].strip() else str(default_socket)
    return pid, holder_socket


def _try_flock(handle: Any) -> bool:
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise
        return False


def _watch_figures(watcher: NotebookWatcher | None) -> Callable[[], dict[str, int] | None]:
    """What status shows of the notebook watcher; None without one (system mode)."""
    if watcher is None:
        return lambda: None
    return lambda: {"folders": len(watcher.folders), "renames_followed": watcher.renames_followed}
