"""Compile the ``.py`` files of uv cache entries: the child process of compilequeue.py.

The daemon runs it *by path* with the venvs' interpreter (its cache tag must be the one the
kernels look for, and that interpreter need not have uvkerneld installed)::

    python -I -S .../uvkerneld/compilework.py DAEMON_PID WORKERS GATE ENTRY...

It runs at idle priority and dies with the daemon (childside.become_background, loaded by path
too), compiles in WORKERS processes, and prints ``done ENTRY`` as soon as every file of one
entry is compiled, so the daemon links that entry's bytecode while the rest still compiles.

Crash safety: ``compileall`` writes each ``.pyc`` through importlib's ``_write_atomic`` (a temp
file ``<name>.pyc.<number>``, then ``os.replace``), so a ``.pyc`` name never holds half a file,
whenever this process is killed. What a kill leaves is at most such a temp file, which the daemon
removes before it compiles the entry again (``remove_partial_writes``).

``GATE`` is ``-`` or a file: with a file, the compile waits after the first entry until that file
exists. Only tests set it (compilequeue.compile_gate: never on a shared host).

Standard library only, Python 3.8 and later: this is the venvs' interpreter, not the daemon's.
"""

from __future__ import annotations

import compileall
import importlib.util
import multiprocessing
import os
import re
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from types import ModuleType
from typing import Any

# childside.py, loaded by path in main(); the workers inherit it through fork.
_childside: Any = None

# importlib's temp name for a .pyc it is writing: "<name>.pyc.<id(path)>".
_PARTIAL = re.compile(r"\.pyc\.\d+$")


def python_files(entry: str) -> list[str]:
    found: list[str] = []
    for directory, subdirs, files in os.walk(entry):
        subdirs[:] = [name for name in subdirs if name != "__pycache__"]
        found.extend(os.path.join(directory, name) for name in files if name.endswith(".py"))
    return found


def remove_partial_writes(entry: str) -> int:
    """Remove the temp files of a compile that was killed mid-write; returns how many."""
    removed = 0
    for directory, _, files in os.walk(entry):
        if os.path.basename(directory) != "__pycache__":
            continue
        for name in files:
            if _PARTIAL.search(name):
                try:
                    os.unlink(os.path.join(directory, name))
                    removed += 1
                except OSError:
                    pass
    return removed


def compile_one(path: str) -> bool:
    # quiet=2: files that are not valid Python for this version (templates, py2 examples) are
    # not errors here; those modules compile at import, as they always did.
    return bool(compileall.compile_file(path, quiet=2))


def _wait_for_gate(gate: str) -> None:
    while not os.path.exists(gate):
        time.sleep(0.05)


def _report(entry: str) -> None:
    sys.stdout.write("done %s\n" % os.path.basename(entry))
    sys.stdout.flush()


def compile_entries(entries: list[str], workers: int, gate: str | None) -> None:
    for entry in entries:
        remove_partial_writes(entry)
    files = {entry: python_files(entry) for entry in entries}
    groups = [entries[:1], entries[1:]] if gate else [entries]
    executor = None
    if workers > 1:
        # fork: the workers start from this process as it is (loaded childside, idle priority),
        # all at once from this thread, and each dies with it (a worker blocked on the work queue
        # would not notice).
        executor = ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("fork"),
            initializer=_die_with_leader, initargs=(os.getpid(),))
    try:
        for number, group in enumerate(groups):
            if number and gate:
                _wait_for_gate(gate)
            if executor is not None:
                _compile_in(executor, group, files)
                continue
            for entry in group:
                for path in files[entry]:
                    compile_one(path)
                _report(entry)
    finally:
        if executor is not None:
            executor.shutdown()


def _compile_in(executor: ProcessPoolExecutor, entries: list[str], files: dict[str, list[str]]) -> None:
    """All files of ``entries`` in the pool at once (one entry's files alone rarely fill it), each
    entry reported once its last file is done."""
    left = {entry: len(files[entry]) for entry in entries}
    owner: dict[Future[bool], str] = {}
    for entry in entries:
        if not left[entry]:
            _report(entry)
        for path in files[entry]:
            owner[executor.submit(compile_one, path)] = entry
    pending: set[Future[bool]] = set(owner)
    while pending:
        finished, pending = wait(pending, return_when=FIRST_COMPLETED)
        for future in finished:
            entry = owner[future]
            left[entry] -= 1
            if not left[entry]:
                _report(entry)


def _die_with_leader(leader_pid: int) -> None:
    if _childside is not None:
        _childside.die_with_parent(leader_pid)


def _load_childside() -> ModuleType:
    """childside.py from the folder of this file (this interpreter may not import uvkerneld)."""
    spec = importlib.util.spec_from_file_location(
        "_uvkerneld_childside", os.path.join(os.path.dirname(os.path.abspath(__file__)), "childside.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str]) -> int:
    if len(argv) < 3 or not argv[0].isdigit() or not argv[1].isdigit():
        sys.stderr.write("usage: python compilework.py DAEMON_PID WORKERS GATE|- ENTRY...\n")
        return 2
    global _childside
    _childside = _load_childside()
    _childside.become_background(int(argv[0]), idle=True)
    compile_entries(argv[3:], max(1, int(argv[1])), None if argv[2] == "-" else argv[2])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
