"""Daemon settings: defaults < config file (TOML) < environment (UVKERNELD_*) < command-line flags.

One ``Config`` object, validated in one place (``load_config``); every error names the setting,
where its value came from, and what is allowed.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import envvars, locations
from .tomlcompat import tomllib

LINK_MODES = ("hardlink", "symlink", "copy", "clone")
MODES = ("user", "system")
LOG_LEVELS = ("debug", "info", "warning", "error")
BYTECODE_MODES = ("shared", "per-env", "off")


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")


def parse_duration(text: str) -> float:
    """'30d', '12h', '0s', '90' (seconds) -> seconds. Raises ValueError with a readable message."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(
            "duration %r is not valid: use a number with s, m, h, d or w, like 30d or 12h" % text)
    factor = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[match.group(2)]
    return float(match.group(1)) * factor


class ConfigError(Exception):
    """A setting is invalid; the message names it, its source and what to use instead."""


@dataclasses.dataclass(frozen=True)
class Config:
    mode: str
    socket: Path
    state_dir: Path
    cache_dir: Path
    venvs_dir: Path
    pool_size: int
    link_mode: str
    python: str
    log_level: str
    kernel_packages: tuple[str, ...]
    max_parallel_creates: int
    max_parallel_installs: int
    max_parallel_compiles: int  # processes compiling shared bytecode in the background
    bytecode: str
    uv: str | None
    admin_group: str | None
    gc_interval: float  # seconds between scheduled gc runs; 0 = off
    gc_older_than: float  # seconds unused before gc removes an env
    idle_exit: float  # seconds with no kernel, request or build before the daemon exits; 0 = never
    config_file: Path | None

    @property
    def store_path(self) -> Path:
        return self.state_dir / "state.db"

    def public_summary(self) -> dict[str, Any]:
        """The settings worth showing in status and logs (paths and numbers, never secrets)."""
        return {
            "mode": self.mode,
            "socket": str(self.socket),
            "state_dir": str(self.state_dir),
            "cache_dir": str(self.cache_dir),
            "venvs_dir": str(self.venvs_dir),
            "pool_size": self.pool_size,
            "link_mode": self.link_mode,
            "python": self.python,
            "kernel_packages": list(self.kernel_packages),
            "idle_exit_s": self.idle_exit,
            "config_file": str(self.config_file) if self.config_file else None,
        }


def default_kernel_packages() -> tuple[str, ...]:
    # Pin the ipykernel this daemon was installed with: every pool venv then resolves from the
    # warm cache, and kernels match the version the install was tested with.
    from importlib.metadata import PackageNotFoundError, version

    try:
        return ("ipykernel==%s" % version("ipykernel"),)
    except PackageNotFoundError:  # pragma: no cover - ipykernel is a dependency
        return ("ipykernel",)


def _defaults(mode: str) -> dict[str, Any]:
    if mode == "system":
        state = Path("/var/lib/uvkerneld")
        return {
            "socket": Path(locations.SYSTEM_SOCKET),
            "state_dir": state,
            "cache_dir": Path("/var/cache/uvkerneld/uv"),
            "venvs_dir": state / "venvs",
        }
    data = Path(locations.user_data_home()) / "uvkerneld"
    return {
        "socket": Path(locations.default_socket_path()),
        "state_dir": data,
        "cache_dir": Path(locations.user_cache_home()) / "uvkerneld" / "uv",
        "venvs_dir": data / "venvs",
    }


def default_mode(environ: Mapping[str, str]) -> str:
    """``system`` when systemd's system instance started us directly, else ``user``.

    Services get INVOCATION_ID; only the user manager sets MANAGERPID; and the system manager
    is pid 1, our parent. Checking all three keeps a test run under some CI service user-mode.
    """
    if environ.get("INVOCATION_ID") and not environ.get("MANAGERPID") and os.getppid() == 1:
        return "system"
    return "user"


def default_config_file(mode: str) -> Path:
    if mode == "system":
        return Path("/etc/uvkerneld/config.toml")
    return Path(locations.user_config_home()) / "uvkerneld" / "config.toml"


# name -> (parser from string/TOML value, env var)
_PATH_KEYS = ("socket", "state_dir", "cache_dir", "venvs_dir")
_KEYS = (
    "mode", *_PATH_KEYS, "pool_size", "link_mode", "python", "log_level", "kernel_packages",
    "max_parallel_creates", "max_parallel_installs", "max_parallel_compiles", "bytecode", "uv", "admin_group",
    "gc_interval", "gc_older_than", "idle_exit",
)
# How long a daemon that a kernel started (not systemd, not a person) stays up with nothing to do.
# Long enough that a user's working day never sees the restart; the pool stays on disk anyway.
AUTOSTARTED_IDLE_EXIT = "1h"


def load_config(
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Merge the four layers and validate. ``flags`` holds only options given on the command line."""
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    environ = os.environ if environ is None else environ
    variables = {key: envvars.setting_var(key) for key in _KEYS}
    from_env = {key: environ[name] for key, name in variables.items() if environ.get(name)}

    config_file_source = flags.get("config") or environ.get(envvars.CONFIG)
    mode = str(flags.get("mode") or from_env.get("mode") or default_mode(environ))
    _check_choice("mode", mode, MODES, "--mode/" + envvars.MODE)
    if config_file_source:
        config_file: Path | None = Path(config_file_source).expanduser()
        assert config_file is not None
        if not config_file.is_file():
            raise ConfigError("config file %s does not exist (from --config/%s)"
                              % (config_file, envvars.CONFIG))
    else:
        config_file = default_config_file(mode)
        if not config_file.is_file():
            config_file = None
    from_file = _read_config_file(config_file) if config_file else {}
    if "mode" in from_file and not (flags.get("mode") or from_env.get("mode")):
        mode = str(from_file["mode"])
        _check_choice("mode", mode, MODES, str(config_file))

    values: dict[str, Any] = {
        **_defaults(mode),
        "pool_size": 2,
        "link_mode": "hardlink",
        "python": sys.executable,
        "log_level": "info",
        "kernel_packages": None,
        # One venv build at a time: two uv runs that fill a cold cache at once unpack the same
        # wheels into two cache entries, and their venvs then share nothing (seen here: a 204 MB
        # cache instead of 105 MB, dedup 1.0x). On a warm cache a build takes ~0.6 s.
        "max_parallel_creates": 1,
        "max_parallel_installs": max(1, os.cpu_count() or 1),
        # At idle priority: compiles use the cores nobody else wants, so all of them by default.
        "max_parallel_compiles": max(1, os.cpu_count() or 1),
        "bytecode": "shared",
        "uv": None,
        "admin_group": None,
        # The shared host collects daily; a personal daemon only when asked (uvkernelctl gc).
        "gc_interval": "1d" if mode == "system" else "0",
        "gc_older_than": "30d",
        # A daemon started by a kernel stub goes away when unused, like the kernels it serves;
        # one started by systemd or by hand stays until stopped.
        "idle_exit": AUTOSTARTED_IDLE_EXIT if flags.get("started_by_kernel") else "0",
    }
    sources = {key: "default" for key in values}
    for layer_name, layer in ((str(config_file), from_file), ("environment", from_env), ("flag", flags)):
        for key in _KEYS:
            if key in layer and key != "mode":
                values[key] = layer[key]
                sources[key] = envvars.setting_var(key) if layer_name == "environment" else (
                    "--" + key.replace("_", "-") if layer_name == "flag" else layer_name
                )

    def source(key: str) -> str:
        return sources.get(key, "default")

    for key in _PATH_KEYS:
        values[key] = _path(key, values[key], source(key))
    values["pool_size"] = _int("pool_size", values["pool_size"], source("pool_size"), 0, 64)
    values["max_parallel_creates"] = _int(
        "max_parallel_creates", values["max_parallel_creates"], source("max_parallel_creates"), 1, 64
    )
    values["max_parallel_installs"] = _int(
        "max_parallel_installs", values["max_parallel_installs"], source("max_parallel_installs"), 1, 64
    )
    values["max_parallel_compiles"] = _int(
        "max_parallel_compiles", values["max_parallel_compiles"], source("max_parallel_compiles"), 1, 64
    )
    _check_choice("link_mode", values["link_mode"], LINK_MODES, source("link_mode"))
    values["log_level"] = str(values["log_level"]).lower()
    _check_choice("log_level", values["log_level"], LOG_LEVELS, source("log_level"))
    _check_choice("bytecode", values["bytecode"], BYTECODE_MODES, source("bytecode"))
    values["kernel_packages"] = _packages(values["kernel_packages"], source("kernel_packages"))
    for key in ("gc_interval", "gc_older_than", "idle_exit"):
        values[key] = _duration_setting(key, values[key], source(key))
    if values["admin_group"] is not None:
        values["admin_group"] = str(values["admin_group"])
    if not isinstance(values["python"], str) or not values["python"]:
        raise ConfigError("python (from %s) must be an interpreter path or version" % source("python"))
    if len(os.fsencode(str(values["socket"]))) > 107:
        raise ConfigError(
            "socket path %s (from %s) is longer than the 107 bytes AF_UNIX allows: pick a shorter "
            "path" % (values["socket"], source("socket"))
        )
    return Config(mode=mode, config_file=config_file, **values)


def _read_config_file(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config file %s is not valid TOML: %s" % (path, exc)) from None
    except OSError as exc:
        raise ConfigError("cannot read config file %s: %s" % (path, exc.strerror)) from None
    # Accept both top-level keys and a [uvkerneld] table, with dashes or underscores.
    table = data.get("uvkerneld", data)
    normalized = {str(key).replace("-", "_"): value for key, value in table.items()}
    unknown = sorted(set(normalized) - set(_KEYS))
    if unknown:
        raise ConfigError(
            "config file %s has unknown setting(s) %s; known: %s"
            % (path, ", ".join(unknown), ", ".join(_KEYS))
        )
    return normalized


def _check_choice(key: str, value: Any, choices: tuple[str, ...], source: str) -> None:
    if value not in choices:
        raise ConfigError(
            "%s %r (from %s) is not valid; choose one of: %s" % (key, value, source, ", ".join(choices))
        )


def _int(key: str, value: Any, source: str, low: int, high: int) -> int:
    try:
        number = int(value)
        if isinstance(value, bool) or isinstance(value, float):
            raise ValueError
    except (TypeError, ValueError):
        raise ConfigError("%s (from %s) must be an integer, got %r" % (key, source, value)) from None
    if not low <= number <= high:
        raise ConfigError("%s (from %s) must be between %d and %d, got %d" % (key, source, low, high, number))
    return number


def _duration_setting(key: str, value: Any, source: str) -> float:
    try:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return parse_duration(str(value))
        return float(value)
    except ValueError as exc:
        raise ConfigError("%s (from %s): %s" % (key, source, exc)) from None


def _path(key: str, value: Any, source: str) -> Path:
    if not isinstance(value, (str, Path)) or not str(value):
        raise ConfigError("%s (from %s) must be a path, got %r" % (key, source, value))
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = Path.cwd() / path
    return path


def _packages(value: Any, source: str) -> tuple[str, ...]:
    if value is None:
        return default_kernel_packages()
    if isinstance(value, str):
        value = [part for part in value.replace(",", " ").split() if part]
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(
            "kernel_packages (from %s) must be a non-empty list of requirement strings" % source
        )
    if not any(v.strip().lower().startswith("ipykernel") for v in value):
        raise ConfigError(
            "kernel_packages (from %s) must include ipykernel: kernels run ipykernel_launcher" % source
        )
    return tuple(value)
