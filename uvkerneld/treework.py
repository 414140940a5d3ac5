"""Work on one whole venv tree, in a child process of the daemon: its size, its deletion.

A venv has ~10,000 files. Walking or deleting one takes 0.1-0.3 s of CPU, most of it in Python
code that holds the GIL; in a thread of the daemon that competes with the event loop for the GIL
and tripled the p99 of every kernel start while ``uvkernelctl gc`` ran (``python -m bench``,
section latency). So the daemon runs ``python -m uvkerneld.treework DAEMON_PID unshared|remove PATH``
(diskusage.unshared_bytes, diskusage.remove_tree) and only waits for it. This module imports
nothing but the standard library's cheapest modules: the child's start is paid per venv.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from .childside import become_background


class TreeUsage:
    __slots__ = ("apparent", "files", "linked", "new", "real", "unshared")

    def __init__(self) -> None:
        self.apparent = 0  # every link's st_size, like `du --apparent-size --count-links`
        self.linked = 0  # every link's blocks, like `du --count-links`: the disk use as copies
        self.real = 0  # each inode of this tree once, like `du`
        self.new = 0  # like real, minus inodes already in ``seen`` (counted in an earlier tree)
        self.unshared = 0  # inodes with no link outside this tree: what deleting it frees
        self.files = 0


def scan_tree(root: Path, seen: set[tuple[int, int]] | None = None) -> TreeUsage:
    """Usage of one tree; ``seen`` (shared across calls) makes ``real`` count inodes once overall."""
    usage = TreeUsage()
    links_here: dict[tuple[int, int], list[int]] = {}
    stack = [str(root)]
    while stack:
        directory = stack.pop()
        try:
            entries = os.scandir(directory)
        except OSError:
            continue
        with entries:
            for entry in entries:
                try:
                    info = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                usage.apparent += info.st_size
                usage.files += 1
                inode = (info.st_dev, info.st_ino)
                blocks = info.st_blocks * 512
                usage.linked += blocks
                counted = links_here.get(inode)
                if counted is None:
                    links_here[inode] = [1, info.st_nlink, blocks]
                    usage.real += blocks
                    if seen is None or inode not in seen:
                        usage.new += blocks
                        if seen is not None:
                            seen.add(inode)
                else:
                    counted[0] += 1
    try:
        root_info = os.lstat(root)
        usage.apparent += root_info.st_size
        usage.linked += root_info.st_blocks * 512
        usage.real += root_info.st_blocks * 512
        usage.new += root_info.st_blocks * 512
    except OSError:
        pass
    usage.unshared = sum(blocks for here, total, blocks in links_here.values() if here >= total)
    return usage



def main(argv: list[str]) -> int:
    """``DAEMON_PID unshared PATH`` prints what deleting PATH would free; ``DAEMON_PID remove
    PATH`` deletes it. Either at nice 10, killed with the daemon."""
    if len(argv) != 3 or not argv[0].isdigit() or argv[1] not in ("unshared", "remove"):
        print("usage: python -m uvkerneld.treework DAEMON_PID unshared|remove PATH", file=sys.stderr)
        return 2
    become_background(int(argv[0]), idle=False)
    command, root = argv[1], Path(argv[2])
    if command == "unshared":
        print(scan_tree(root).unshared)
    else:
        # What the daemon did in a thread before: the caller removes exactly the path it holds
        # in its store, and a file that cannot be removed leaves the rest to be removed.
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
