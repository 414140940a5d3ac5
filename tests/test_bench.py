"""A smoke run of bench/ (one round, small sizes) so the benchmark cannot rot. No timing asserts:
figures are checked for shape and sanity only; the real numbers come from `python -m bench`."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import Layout

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_bench_quick_run_produces_every_figure(layout: Layout) -> None:
    out = layout.root / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--skip", "pip", "--cache-dir", str(layout.cache_dir),
         "--json", str(out)],
        cwd=str(ROOT), capture_output=True, text=True, timeout=1200,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = json.loads(out.read_text())
    starts = figures["kernel_start"]
    for case in ("plain", "plain_nowrite", "plain_cold", "known", "known_nowrite", "pool", "pool_nowrite",
                 "pool_empty"):
        assert starts[case]["median_s"] > 0 and math.isfinite(starts[case]["ratio"]), case
    assert starts["pool_empty"]["extra_s"] > 0  # it really built a venv on demand
    assert 0 < figures["stub"]["stub_ms"] < figures["stub"]["total_ms"]
    many = figures["many_envs"]
    assert many["envs"] == 50 and many["acquire_p50_ms"] > 0 and many["rss_many_mb"] > 0
    assert figures["parallel_installs"]["ratio"] > 0
    disk = figures["disk"]
    assert disk["notebooks"] == 2 and 0 < disk["ratio"] < 1 and disk["per_env_unshared_bytes"] > 0
    abuse = figures["abuse"]
    assert abuse["held_open"] <= abuse["limits"]["max_connections_per_uid"] and abuse["status_max_ms"] > 0
    assert abuse["partial_refused"] > 0 and abuse["rss_partial_frames_mb"] > 0
    assert "kernel start, launch -> first kernel_info_reply" in result.stdout
    latency = figures["latency"]
    assert latency["gc_envs"] == 3 and latency["files_per_env"] > 1000  # real venvs were removed
    for case in ("idle", "gc", "rm"):
        assert latency[case]["samples"] > 0 and 0 < latency[case]["p50_ms"] <= latency[case]["max_ms"], case
    assert "uvkernelctl gc --older-than 0s (3 envs)" in result.stdout
    check_burst(figures["burst"], result.stdout)


def check_burst(burst: dict[str, Any], stdout: str) -> None:
    assert burst["kernels"] == 6 and burst["plain_median_s"] > 0 and burst["uvkerneld_median_s"] > 0
    assert math.isfinite(burst["ratio"])
    # Every new notebook got a venv from the pool or a clone on demand; none failed.
    assert burst["sources"].get("pool", 0) + burst["sources"].get("created", 0) == 6
    assert burst["clone_median_s"] > 0 and burst["uv_build_median_s"] > 0
    assert "burst: 6 kernels for 6 new notebooks launched at once" in stdout


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_bench_notebooks_section_produces_its_figures(layout: Layout) -> None:
    out = layout.root / "bench.json"
    others = ["starts", "stub", "many", "parallel", "disk", "seed", "abuse", "latency", "burst", "pip"]
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--cache-dir", str(layout.cache_dir), "--json", str(out),
         *("--skip=%s" % name for name in others)],
        cwd=str(ROOT), capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = json.loads(out.read_text())["notebooks"]
    assert figures["megabytes"] > 1.5 and figures["cells"] > 5
    for case, start in figures["starts"].items():
        assert start["median_s"] > 0 and math.isfinite(start["ratio"]), case
    assert set(figures["starts"]) == {"plain", "tiny", "big", "declared"}
    assert figures["declared_starts"] == 1 and figures["declared_uv_runs"] == 0  # unchanged: no sync
    assert 0 < figures["reader"]["fast_ms"] < figures["reader"]["full_ms"]
    assert all(value > 0 for value in figures["stub_ms"].values()) and set(figures["stub_ms"]) == {
        "tiny", "big", "declared"}
    assert "uv runs during 1 starts of the unchanged declared notebook: 0  ok" in result.stdout


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_bench_burst_section_alone(layout: Layout) -> None:
    out = layout.root / "burst.json"
    skipped = [arg for name in ("starts", "stub", "many", "parallel", "disk", "abuse", "latency", "notebooks",
                                "pip") for arg in ("--skip", name)]
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", *skipped, "--cache-dir", str(layout.cache_dir),
         "--json", str(out)],
        cwd=str(ROOT), capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    check_burst(json.loads(out.read_text())["burst"], result.stdout)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_bench_pip_install_section(layout: Layout) -> None:
    """The `pip` section alone (issue 13), one round with a small package."""
    out = layout.root / "bench.json"
    sections = ["starts", "stub", "many", "parallel", "disk", "abuse", "latency", "notebooks", "burst"]
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", *[arg for name in sections for arg in ("--skip", name)],
         "--cache-dir", str(layout.cache_dir), "--json", str(out)],
        cwd=str(ROOT), capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = json.loads(out.read_text())["pip_install"]
    assert figures["package"] == "tabulate==0.9.0" and figures["new_distributions"] == 1
    for name in ("uvkerneld_s", "uv_s", "pip_s", "import_right_after_s", "import_after_compile_s"):
        assert 0 < figures[name] < 600, name
    assert figures["linked_s"] >= figures["uvkerneld_s"]
    assert math.isfinite(figures["vs_uv"]) and math.isfinite(figures["vs_pip"])
    assert "%pip install tabulate==0.9.0" in result.stdout and "bytecode is linked" in result.stdout
