"""Folders and files the daemon (and the kernel stub, which starts it) trusts: never another user's.

A socket, a lock or a state database in a folder another user can write can be replaced by that
user; a symlink another user owns points wherever that user likes. Root running a daemon on such
a path has chmodded, created and opened files where another user chose. The rules:

- Missing folders are created by us, with the mode we want (and only those get a mode).
- An existing folder, and every folder above it, must be owned by us or root and writable by no
  one else; folders above may be sticky and world-writable (``/tmp``). The folder itself may be
  sticky only where the caller allows it and the file it will hold there is not someone else's.
- A symlink on the way is followed only when we or root own it.

Standard library only: the kernel stub imports this when it starts a daemon.
"""

import os
import stat

MAX_SYMLINKS = 40


class UnsafePath(Exception):
    """A path another user controls; the message names it, who controls it and what to do."""


def _trusted(uid):
    return uid == 0 or uid == os.geteuid()


def _writable_by_others(st):
    """Whether someone other than us and root can create, remove or rename entries in it."""
    if not _trusted(st.st_uid):
        return True  # the owner can always chmod it
    if st.st_mode & stat.S_IWOTH:
        return True
    return bool(st.st_mode & stat.S_IWGRP) and st.st_gid != os.getegid()


def _refuse(path, what, reason):
    return UnsafePath(
        "refusing to use %s as the %s: %s. Use a folder that only you (or root) can write, or fix "
        "its owner and mode." % (path, what, reason)
    )


def _describe(st):
    return "owner uid %d, mode %04o" % (st.st_uid, stat.S_IMODE(st.st_mode))


def secure_dir(path, mode, what, sticky_leaf=None):
    """Make sure ``path`` is a folder only we (and root) control; create what is missing with ``mode``.

    ``sticky_leaf``: a name in the folder (the socket); the folder may then be sticky and
    world-writable (like /tmp/x) as long as that entry is ours or does not exist yet.
    Returns the folder's real path.
    """
    path = os.path.abspath(os.fspath(path))
    pending = [part for part in path.split(os.sep) if part]
    current = os.sep
    links = 0
    while pending:
        name = pending.pop(0)
        if name in (".", ""):
            continue
        if name == "..":
            current = os.path.dirname(current)
            continue
        _check_above(current, path, what)
        candidate = os.path.join(current, name)
        try:
            st = os.lstat(candidate)
        except FileNotFoundError:
            try:
                os.mkdir(candidate, mode)
                os.chmod(candidate, mode)  # the umask narrowed it; this folder is ours to set
            except FileExistsError:
                pass  # created meanwhile by someone else: checked below like any existing one
            pending.insert(0, name)
            continue
        if stat.S_ISLNK(st.st_mode):
            if not _trusted(st.st_uid):
                raise _refuse(path, what, "%s is a symlink owned by uid %d" % (candidate, st.st_uid))
            links += 1
            if links > MAX_SYMLINKS:
                raise _refuse(path, what, "too many levels of symlinks")
            target = os.readlink(candidate)
            if os.path.isabs(target):
                current = os.sep
            pending[:0] = [part for part in target.split(os.sep) if part]
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise _refuse(path, what, "%s is not a folder" % candidate)
        current = candidate
    st = os.lstat(current)
    if _writable_by_others(st):
        sticky_ok = sticky_leaf is not None and st.st_mode & stat.S_ISVTX and _trusted(st.st_uid)
        if not sticky_ok:
            raise _refuse(path, what, "other users can write to it (%s)" % _describe(st))
        try:
            leaf = os.lstat(os.path.join(current, sticky_leaf))
        except FileNotFoundError:
            return current
        if leaf.st_uid != os.geteuid():
            raise _refuse(path, what, "it is writable by everyone and %s there belongs to uid %d"
                          % (os.path.join(current, sticky_leaf), leaf.st_uid))
    return current


def _check_above(folder, path, what):
    """A folder above the one we want: owned by us or root; others may write only if it is sticky."""
    st = os.lstat(folder)
    if not _trusted(st.st_uid) or (_writable_by_others(st) and not st.st_mode & stat.S_ISVTX):
        raise _refuse(path, what, "%s above it can be changed by other users (%s)" % (folder, _describe(st)))


def check_file(path, what):
    """A file we are about to open or create in a folder ``secure_dir`` checked: not a symlink
    or a file someone else owns (an absent one is fine)."""
    path = os.fspath(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode) and not _trusted(st.st_uid):
        raise _refuse(path, what, "it is a symlink owned by uid %d" % st.st_uid)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return  # our own dangling symlink: opening it creates the file where we pointed it
    if not stat.S_ISREG(st.st_mode) or not _trusted(st.st_uid):
        raise _refuse(path, what, "it is not a regular file of ours (%s)" % _describe(st))


def open_own(path, flags, mode, what):
    """``os.open`` a file of ours without following a symlink; refuse one another user made."""
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        os.close(fd)
        raise _refuse(path, what, "it is not a regular file of ours (%s)" % _describe(st))
    return fd


def prepare_daemon_paths(config, socket_activated):
    """The daemon's start: its state folder, its state database and (unless systemd handed it
    the socket) its socket's folder, checked or created before anything is written there."""
    private = 0o700 if config.mode == "user" else 0o755  # system: users read venvs, reach the socket
    secure_dir(config.state_dir, private, "state folder")
    check_file(config.store_path, "state database")
    if not socket_activated:
        secure_dir(config.socket.parent, private, "socket folder", sticky_leaf=config.socket.name)
