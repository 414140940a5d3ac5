"""Default user-mode locations (XDG). Standard library only: the kernel stub imports this.

The socket lives in ``$XDG_RUNTIME_DIR`` (per-user tmpfs, mode 0700) when there is one; otherwise
under the user cache dir, whose path stays short enough for AF_UNIX (about 107 bytes).
"""

import os

from . import envvars

SYSTEM_SOCKET = "/run/uvkerneld/uvkerneld.sock"


def _xdg(variable, fallback):
    value = os.environ.get(variable, "")
    # The XDG spec says relative values are invalid and must be ignored.
    if value and os.path.isabs(value):
        return value
    return os.path.join(os.path.expanduser("~"), fallback)


def user_cache_home():
    return _xdg("XDG_CACHE_HOME", ".cache")


def user_data_home():
    return _xdg("XDG_DATA_HOME", os.path.join(".local", "share"))


def user_config_home():
    return _xdg("XDG_CONFIG_HOME", ".config")


def default_socket_path():
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if runtime and os.path.isabs(runtime) and os.path.isdir(runtime):
        return os.path.join(runtime, "uvkerneld", "uvkerneld.sock")
    return os.path.join(user_cache_home(), "uvkerneld", "uvkerneld.sock")


def socket_path_from_env():
    """The socket every client uses: ``UVKERNELD_SOCKET`` if set, else the user-mode default."""
    return os.environ.get(envvars.SOCKET) or default_socket_path()


def daemon_log_path(socket_path):
    """Where a daemon auto-started by the kernel stub writes its log: beside its socket."""
    return os.path.join(os.path.dirname(socket_path), "uvkerneld.log")
