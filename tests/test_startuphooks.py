"""What a system daemon removes from an env before it lets uv run that env's Python."""

from __future__ import annotations

from pathlib import Path

from uvkerneld import startuphooks


def test_only_path_entries_inside_the_env_survive(tmp_path: Path) -> None:
    site = tmp_path / "venv" / "lib" / "python3.11" / "site-packages"
    (site / "pkg").mkdir(parents=True)
    (site / "sitecustomize").mkdir()
    (site / "sitecustomize" / "__init__.py").write_text("")
    files = {
        "inside.pth": "# a comment\n\npkg\n",
        "runs.pth": "pkg\nimport os\n",
        "runs-tab.pth": "import\tos\n",
        "outside.pth": "/tmp\n",
        "escapes.pth": "../../../../elsewhere\n",
        "usercustomize.py": "",
        "sitecustomize.cpython-311-x86_64-linux-gnu.so": "",
        "indented.pth": "  import os\n",  # site.py executes only lines that start with "import": a path
    }
    for name, text in files.items():
        (site / name).write_text(text)
    removed = startuphooks.strip(str(tmp_path / "venv"))
    assert removed == sorted(["runs.pth", "runs-tab.pth", "outside.pth", "escapes.pth", "usercustomize.py",
                              "sitecustomize.cpython-311-x86_64-linux-gnu.so", "sitecustomize"])
    assert sorted(path.name for path in site.iterdir()) == ["indented.pth", "inside.pth", "pkg"]
    assert startuphooks.strip(str(tmp_path / "venv")) == []


def test_per_env_bytecode_on_a_shared_host_compiles_without_running_the_env(tmp_path: Path) -> None:
    import asyncio
    import sys

    from uvkerneld.installs import _compile_without_site

    site = tmp_path / "venv" / "lib" / "python3.11" / "site-packages"
    site.mkdir(parents=True)
    marker = tmp_path / "ran"
    (site / "mod.py").write_text("open(%r, 'w').write('imported')\n" % str(marker))
    (site / "hook.pth").write_text("import os; open(%r, 'w').write('hook')\n" % str(marker))
    asyncio.run(_compile_without_site(sys.executable, tmp_path / "venv"))
    assert list((site / "__pycache__").glob("mod.*.pyc"))
    assert not marker.exists()
