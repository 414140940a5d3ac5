"""Settings: defaults < config file < environment < flags, with errors that name the culprit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from uvkerneld.config import ConfigError, load_config


def test_user_mode_defaults_live_under_xdg_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    config = load_config({}, {})
    assert config.mode == "user"
    assert config.state_dir == tmp_path / "data" / "uvkerneld"
    assert config.venvs_dir == tmp_path / "data" / "uvkerneld" / "venvs"
    assert config.cache_dir == tmp_path / "cache" / "uvkerneld" / "uv"
    assert config.socket == tmp_path / "cache" / "uvkerneld" / "uvkerneld.sock"
    assert config.pool_size == 2 and config.link_mode == "hardlink"
    assert config.kernel_packages[0].startswith("ipykernel==")


def test_precedence_file_then_environment_then_flags(tmp_path: Path) -> None:
    config_file = tmp_path / "config.toml"
    config_file.write_text(
        'pool-size = 5\nlink_mode = "copy"\nvenvs_dir = "/from/file"\nsocket = "/tmp/f.sock"\n')
    environ = {"UVKERNELD_CONFIG": str(config_file), "UVKERNELD_LINK_MODE": "symlink",
               "UVKERNELD_SOCKET": "/tmp/e.sock"}
    config = load_config({"socket": "/tmp/flag.sock"}, environ)
    assert config.pool_size == 5  # file
    assert config.venvs_dir == Path("/from/file")  # file
    assert config.link_mode == "symlink"  # environment beats file
    assert config.socket == Path("/tmp/flag.sock")  # flag beats environment
    assert config.config_file == config_file


def test_config_file_may_use_a_uvkerneld_table(tmp_path: Path) -> None:
    config_file = tmp_path / "c.toml"
    config_file.write_text('[uvkerneld]\npool_size = 0\nkernel_packages = ["ipykernel", "numpy"]\n')
    config = load_config({"config": str(config_file)}, {})
    assert config.pool_size == 0 and config.kernel_packages == ("ipykernel", "numpy")


@pytest.mark.parametrize(
    "flags, environ, file_text, fragment",
    [
        ({"pool_size": -1}, {}, None, "pool_size (from --pool-size) must be between 0 and 64, got -1"),
        ({}, {"UVKERNELD_POOL_SIZE": "many"}, None,
         "pool_size (from UVKERNELD_POOL_SIZE) must be an integer, got 'many'"),
        ({}, {"UVKERNELD_LINK_MODE": "reflink"}, None,
         "link_mode 'reflink' (from UVKERNELD_LINK_MODE) is not valid"),
        ({"mode": "cluster"}, {}, None, "mode 'cluster'"),
        ({}, {}, "pool_size = 2\npool_sise = 3\n", "unknown setting(s) pool_sise"),
        ({}, {}, "pool_size = [\n", "is not valid TOML"),
        ({}, {}, 'kernel_packages = ["numpy"]\n', "must include ipykernel"),
        ({}, {}, "pool_size = 2.5\n", "must be an integer"),
        ({"socket": "/tmp/" + "s" * 120}, {}, None, "longer than the 107 bytes"),
        ({}, {"UVKERNELD_BYTECODE": "fast"}, None,
         "bytecode 'fast' (from UVKERNELD_BYTECODE) is not valid; choose one of: shared, per-env, off"),
        ({}, {"UVKERNELD_GC_OLDER_THAN": "a month"}, None,
         "gc_older_than (from UVKERNELD_GC_OLDER_THAN): duration 'a month' is not valid"),
        ({}, {}, 'gc_interval = "soon"\n', "gc_interval (from"),
        ({"config": "/nonexistent/uvk.toml"}, {}, None, "does not exist"),
    ],
)
def test_bad_settings_are_named_with_their_source(
    tmp_path: Path, flags: dict, environ: dict, file_text: str | None, fragment: str
) -> None:
    if file_text is not None:
        config_file = tmp_path / "bad.toml"
        config_file.write_text(file_text)
        environ = dict(environ, UVKERNELD_CONFIG=str(config_file))
    with pytest.raises(ConfigError) as caught:
        load_config(flags, environ)
    assert fragment in str(caught.value)


def test_daemon_refuses_bad_flags_with_exit_2(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "uvkerneld", "--pool-size", "100", "--state-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2
    assert "pool_size (from --pool-size) must be between 0 and 64, got 100" in result.stderr
    assert not (tmp_path / "state.db").exists()  # nothing half-made
