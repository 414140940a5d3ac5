"""Whether a process is alive, from /proc: the one place that reads /proc/<pid>/stat.

A zombie (state Z, or X while it is reaped) has exited: it holds a pid until its parent waits for
it, but nothing runs. ``os.kill(pid, 0)`` succeeds on a zombie, so it is the fallback only where
/proc cannot be read (hidepid). Standard library only and cheap: the kernel stub imports this
while it waits for a daemon it started.
"""

import os

_EXITED_STATES = ("Z", "X")


def stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state first, so index = field - 3);
    None when there is no such process or /proc does not show it."""
    return _fields_of("/proc/%d/stat" % pid)


def _fields_of(stat_path: str) -> list[str] | None:
    try:
        with open(stat_path) as handle:
            # The command name is in parentheses and may itself hold ") ": split at the last one.
            return handle.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def is_exited(fields: list[str]) -> bool:
    """``stat_fields`` of a process that has exited and was not reaped yet (a zombie)."""
    return fields[0] in _EXITED_STATES


def _other_thread_runs(pid: int) -> bool:
    """/proc/<pid>/stat shows the main thread: a process whose main thread exited while others
    run shows Z there too. It is alive while any of its threads has not exited."""
    try:
        tids = os.listdir("/proc/%d/task" % pid)
    except OSError:
        return False
    for tid in tids:
        fields = _fields_of("/proc/%d/task/%s/stat" % (pid, tid))
        if fields is not None and not is_exited(fields):
            return True
    return False


def pid_alive(pid: int) -> bool:
    """A process with this pid exists and has not exited (a zombie is dead), whoever owns it."""
    if pid <= 0:
        return False  # os.kill would address a process group, or every process
    fields = stat_fields(pid)
    if fields is not None:
        return not is_exited(fields) or _other_thread_runs(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process: it exists
    return True
