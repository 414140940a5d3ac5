"""``uvkerneld``: the command line only builds a Config and runs the Daemon."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from . import __version__, envvars
from .config import AUTOSTARTED_IDLE_EXIT, LINK_MODES, LOG_LEVELS, MODES, ConfigError, load_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="uvkerneld",
        description="Per-host daemon that gives every Jupyter notebook its own uv-built venv.",
        epilog="Every option can also be set as %s<OPTION> in the environment or in the "
        "TOML config file (defaults < config file < environment < flags)." % envvars.SETTING_PREFIX,
    )
    parser.add_argument("--version", action="version", version="uvkerneld " + __version__)
    parser.add_argument("--config", metavar="FILE", help="TOML config file")
    parser.add_argument("--mode", choices=MODES, help="user (default) or system")
    parser.add_argument("--socket", metavar="PATH", help="Unix socket to listen on")
    parser.add_argument("--state-dir", metavar="DIR", help="where the SQLite state lives")
    parser.add_argument("--cache-dir", metavar="DIR", help="the shared uv cache")
    parser.add_argument("--venvs-dir", metavar="DIR", help="where notebook venvs are created")
    parser.add_argument("--pool-size", metavar="N", type=int, help="warm venvs kept ready (default 2)")
    parser.add_argument("--link-mode", choices=LINK_MODES, help="how uv links files from the cache")
    parser.add_argument("--python", metavar="PY", help="interpreter for the venvs (default: this one)")
    parser.add_argument("--log-level", choices=LOG_LEVELS, help="default info")
    parser.add_argument("--idle-exit", metavar="DURATION",
                        help="exit after this long with no kernel, request or build (like 1h, 30m; "
                        "0 = never, the default unless started by a kernel)")
    parser.add_argument("--started-by-kernel", action="store_true", default=None,
                        help="set by the kernel stub when it starts the daemon on demand: "
                        "idle_exit then defaults to %s" % AUTOSTARTED_IDLE_EXIT)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    flags = {key: value for key, value in vars(args).items() if value is not None}
    try:
        config = load_config(flags)
    except ConfigError as exc:
        print("uvkerneld: %s" % exc, file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from .server import Daemon, StartupError

    try:
        asyncio.run(Daemon(config, flags).serve())
    except StartupError as exc:
        logging.getLogger("uvkerneld").error("%s", exc)
        return 1
    except KeyboardInterrupt:  # pragma: no cover - signal handlers normally catch it
        return 0
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
