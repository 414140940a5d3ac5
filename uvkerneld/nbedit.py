"""The safe notebook writer: change a notebook file's declaration and nothing else, atomically.

``uvkernelctl lock`` writes a notebook that JupyterLab, juv or a colleague's editor may be saving
at the same time. So: parse with nbformat (no version conversion), let the caller change only the
declaration cell/metadata, write a temp file in the same folder (O_EXCL, the original's mode and
owner), fsync it, and right before ``os.replace`` check that the file on disk is still the one we
read (same inode, same bytes). When it is not, nothing is written: the other writer's bytes stay.
A symlinked notebook is written where the link points (the link stays a link). A hard-linked one
(st_nlink > 1) is written in place, as jupyter_server's atomic_writing writes every notebook: a
rename would split it into two diverging notebooks, while Jupyter itself keeps its names together;
the old bytes are kept in a backup file beside it until the new ones are on disk.

Runs in the user's own process (never in the daemon): the user's permissions decide what it may
write, and it refuses up front what would silently change ownership or ignore a read-only file.
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# Called with the notebook's path after the temp file is complete and right before the re-check
# and the rename: a test holds the writer here to change the file underneath it (no timing).
BEFORE_REPLACE_HOOKS: list[Callable[[str], None]] = []


class EditError(Exception):
    """The notebook cannot be read or written as asked; the message says what and what to do."""


class NotebookChanged(EditError):
    """Another program changed the notebook while we worked on it; nothing was written."""


@dataclass
class Loaded:
    """A notebook as read: its path, its bytes and stat (to detect a concurrent writer), the parse."""

    path: str
    data: bytes
    stat: os.stat_result
    notebook: Any  # nbformat.NotebookNode


def read(path: str) -> Loaded:
    """Read and parse ``path`` with nbformat, as it is on disk (no version conversion). A symlink is
    followed: the file it names is what gets written."""
    import nbformat

    path = os.path.realpath(path)
    try:
        with open(path, "rb") as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise EditError("%s is not a regular file; give the path of a .ipynb notebook" % path)
            data = handle.read()
    except FileNotFoundError:
        raise EditError("no such notebook: %s" % path) from None
    except IsADirectoryError:
        raise EditError("%s is a folder; give the path of a .ipynb notebook" % path) from None
    except OSError as exc:
        raise EditError("cannot read %s: %s" % (path, exc.strerror)) from None
    try:
        # nbformat.reader, not nbformat.reads: reads validates, and validating a 4.5 notebook without cell
        # ids adds ids to every cell (with a MissingIDFieldWarning); lock changes only the declaration.
        notebook = nbformat.reader.reads(data.decode("utf-8"))
    except Exception as exc:  # nbformat raises NotJSONError, ValueError, KeyError, ... for non-notebooks
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise EditError("%s is not a notebook nbformat can read (%s)" % (path, reason[:200])) from None
    if isinstance(notebook.get("nbformat"), int) and notebook["nbformat"] < 4:
        raise EditError("%s is nbformat %s: open and save it in Jupyter first (that makes it nbformat 4)"
                        % (path, notebook.get("nbformat")))
    if not isinstance(notebook.get("cells"), list) or not isinstance(notebook.get("metadata"), dict):
        raise EditError("%s is not a notebook (no cells list or metadata object)" % path)
    return Loaded(path, data, info, notebook)


def check_writable(loaded: Loaded) -> None:
    """Refuse up front what a rewrite would get wrong: a read-only file, or one owned by someone else
    (a rename puts a new inode in place; only root can give it back to its owner)."""
    info = loaded.stat
    if not info.st_mode & stat.S_IWUSR:
        raise EditError("%s is read-only (mode %04o); make it writable (chmod u+w) to change it"
                        % (loaded.path, stat.S_IMODE(info.st_mode)))
    if os.geteuid() != 0 and info.st_uid != os.geteuid():
        raise EditError("%s belongs to uid %d, not to you (uid %d): writing it would change its owner; "
                        "ask its owner to run this, or copy the notebook"
                        % (loaded.path, info.st_uid, os.geteuid()))
    folder = os.path.dirname(os.path.abspath(loaded.path))
    if not os.access(folder, os.W_OK | os.X_OK):
        raise EditError("cannot write in %s (the notebook is replaced atomically by a new file in its "
                        "folder); make the folder writable for you" % folder)


def serialize(notebook: Any) -> bytes:
    """The bytes Jupyter itself writes for this notebook (nbformat.write: sorted keys, indent 1), minus
    nbformat.writes' validation, which would add cell ids the file did not have."""
    import nbformat

    text = nbformat.v4.writes(notebook)
    if not text.endswith("\n"):
        text += "\n"
    return text.encode("utf-8")


def write(loaded: Loaded, notebook: Any) -> bytes:
    """Replace ``loaded.path`` with ``notebook``, atomically; refuse if the file changed since read.
    Returns the bytes written."""
    data = serialize(notebook)
    if loaded.stat.st_nlink > 1:
        _write_in_place(loaded, data)
        return data
    folder, name = os.path.split(os.path.abspath(loaded.path))
    temp = os.path.join(folder, ".%s.uvkernelctl-%s.tmp" % (name, secrets.token_hex(4)))
    mode = stat.S_IMODE(loaded.stat.st_mode)
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise EditError("cannot create a file in %s: %s" % (folder, exc.strerror)) from None
    try:
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                own = os.fstat(handle.fileno())
                if (own.st_uid, own.st_gid) != (loaded.stat.st_uid, loaded.stat.st_gid):
                    os.fchown(handle.fileno(), loaded.stat.st_uid, loaded.stat.st_gid)
                os.fchmod(handle.fileno(), mode)  # after chown: chown may clear set-id bits
                os.fsync(handle.fileno())
        except PermissionError:
            raise EditError("cannot give the new %s the owner %d:%d and mode %04o of the old one; "
                            "nothing was written" % (loaded.path, loaded.stat.st_uid, loaded.stat.st_gid,
                                                     mode)) from None
        except OSError as exc:
            raise EditError("writing %s failed: %s; nothing was written" % (temp, exc.strerror)) from None
        for hook in BEFORE_REPLACE_HOOKS:
            hook(loaded.path)
        _check_unchanged(loaded)
        # A writer that saves between this check and the rename is not seen: no lock exists that
        # Jupyter and juv would honour. The window is two system calls, not the seconds of `uv lock`.
        os.replace(temp, loaded.path)
    except BaseException:
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
        raise
    _fsync_folder(folder)
    return data


def _write_in_place(loaded: Loaded, data: bytes) -> None:
    """Overwrite a hard-linked notebook's inode (every name sees the new bytes), with a backup of the
    old bytes beside it until the new ones are on disk; a failed write puts the old bytes back."""
    folder, name = os.path.split(loaded.path)
    backup = os.path.join(folder, ".~%s.uvkernelctl-%s.bak" % (name, secrets.token_hex(4)))
    try:
        fd = os.open(backup, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(loaded.data)
            os.fsync(handle.fileno())
    except OSError as exc:
        _unlink_quietly(backup)
        raise EditError("cannot back up %s before writing it in place: %s; nothing was written"
                        % (loaded.path, exc.strerror)) from None
    try:
        for hook in BEFORE_REPLACE_HOOKS:
            hook(loaded.path)
        _check_unchanged(loaded)
    except BaseException:
        _unlink_quietly(backup)
        raise
    try:
        _overwrite(loaded.path, data)
    except OSError as exc:
        try:
            _overwrite(loaded.path, loaded.data)
        except OSError:
            raise EditError("writing %s failed (%s) and so did putting its old bytes back; they are in %s"
                            % (loaded.path, exc.strerror, backup)) from None
        _unlink_quietly(backup)
        raise EditError("writing %s failed: %s; its old bytes are back"
                        % (loaded.path, exc.strerror)) from None
    _unlink_quietly(backup)


def _overwrite(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.truncate()
        os.fsync(handle.fileno())


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _check_unchanged(loaded: Loaded) -> None:
    try:
        with open(loaded.path, "rb") as handle:
            now = os.fstat(handle.fileno())
            same = (now.st_dev, now.st_ino) == (loaded.stat.st_dev, loaded.stat.st_ino) and (
                handle.read() == loaded.data)
    except OSError:
        same = False
    if not same:
        raise NotebookChanged(
            "%s changed on disk while uvkernelctl worked on it (another program saved, moved or deleted "
            "it); nothing was written: run the command again" % loaded.path)


def _fsync_folder(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a folder; the rename itself is done
    finally:
        os.close(fd)
