"""What a notebook file declares about its dependencies, read cheaply: the one reader.

Cheaply: a notebook of many megabytes (outputs) is read only at its head, up to the first code
cell, and its tail, the top-level metadata (``read_laid_out``); a notebook laid out otherwise
than Jupyter writes them is parsed whole, with the same result (tests/test_nbdecl.py).

Three places hold a declaration (issue 11; README "Notebooks that carry their dependencies"):
- juv: a PEP 723 block (``# /// script`` ... ``# ///``) as the source of the first code cell,
  and the text of a uv lockfile in the notebook's top-level metadata under ``"uv.lock"``;
- nteract: ``metadata.runt.uv`` = ``{"dependencies": [...], "requires-python": ..., ...}``;
- older nteract notebooks: the same object at ``metadata.uv``.

This module only *finds* them and returns their raw text/objects (``Declaration``); what they
mean (TOML, requirement syntax, which wins) is decided by the daemon (declared.py), which never
reads the notebook file itself: in system mode the file is read by the user's own process (the
stub or uvkernelctl) and the declaration travels over the socket.

Standard library only, no ``json``/``re`` at import: the kernel stub imports this module on
every kernel start.
"""

import os
import stat

from uvkerneld import fastjson

SCRIPT_START = "# /// script"
LOCK_KEY = "uv.lock"
RUNT_UV_KEY = "metadata.runt.uv"
LEGACY_UV_KEY = "metadata.uv"


class NotebookUnreadable(Exception):
    """The notebook file cannot be read or is not a notebook; the message says which and why."""


class Declaration:
    """The raw declaration found in one notebook file (any field may be None).

    ``script``: the whole source of the code cell holding the PEP 723 block; ``script_cell``: that
    cell's number, counting from 1 as a user does. ``uv`` / ``uv_key``: the nteract object and
    where it was (``metadata.runt.uv`` or ``metadata.uv``). ``lock``: the ``"uv.lock"`` text.
    """

    __slots__ = ("lock", "script", "script_cell", "uv", "uv_key")

    def __init__(self, script=None, script_cell=None, uv=None, uv_key=None, lock=None):
        self.script = script
        self.script_cell = script_cell
        self.uv = uv
        self.uv_key = uv_key
        self.lock = lock

    def to_wire(self):
        # A fixed key order: the digest is taken over this dict's JSON text on both sides.
        return {
            "script": self.script, "script_cell": self.script_cell,
            "uv": self.uv, "uv_key": self.uv_key, "lock": self.lock,
        }

    @classmethod
    def from_wire(cls, wire):
        return cls(wire.get("script"), wire.get("script_cell"), wire.get("uv"), wire.get("uv_key"),
                   wire.get("lock"))

    def __eq__(self, other):
        return isinstance(other, Declaration) and self.to_wire() == other.to_wire()

    def __repr__(self):
        return "Declaration(%r)" % self.to_wire()


def digest(wire):
    """The identity of a declaration (its wire dict): equal digests mean nothing to sync."""
    # Imported here: only notebooks that declare something pay for it. CPython 3.11's builtin
    # _sha256 imports in 0.3 ms; hashlib loads OpenSSL first (3.4 ms, on every such kernel start).
    try:
        from _sha256 import sha256  # type: ignore[import-not-found]  # no typeshed stub
    except ImportError:
        from hashlib import sha256

    ordered = {name: wire.get(name) for name in ("script", "script_cell", "uv", "uv_key", "lock")}
    return sha256(fastjson.dumps(ordered).encode("utf-8", "surrogatepass")).hexdigest()


def cell_source(cell):
    source = cell.get("source", "")
    if isinstance(source, list):
        return "".join(part for part in source if isinstance(part, str))
    return source if isinstance(source, str) else ""


def is_script_block(source):
    """Whether a cell's source holds a PEP 723 ``script`` block (the opening line, alone)."""
    for line in source.splitlines():
        if line.rstrip() == SCRIPT_START:
            return True
    return False


def from_notebook(notebook):
    """The Declaration in a parsed notebook (a dict), or None when it declares nothing."""
    if not isinstance(notebook, dict):
        raise NotebookUnreadable("the file holds JSON but not a notebook (no top-level object)")
    found = Declaration()
    cells = notebook.get("cells")
    if isinstance(cells, list):
        for number, cell in enumerate(cells, 1):
            if isinstance(cell, dict) and cell.get("cell_type") == "code":
                source = cell_source(cell)
                if is_script_block(source):
                    found.script, found.script_cell = source, number
                break  # only the first code cell can hold the block (juv puts it there)
    _metadata_declaration(notebook.get("metadata"), found)
    return _or_none(found)


def _metadata_declaration(metadata, found):
    """Fill ``found`` from the notebook's top-level metadata (any JSON value)."""
    if isinstance(metadata, dict):
        runt = metadata.get("runt")
        if isinstance(runt, dict) and "uv" in runt:
            found.uv, found.uv_key = runt["uv"], RUNT_UV_KEY
        elif "uv" in metadata:
            found.uv, found.uv_key = metadata["uv"], LEGACY_UV_KEY
        if LOCK_KEY in metadata:
            found.lock = metadata[LOCK_KEY]


def _or_none(found):
    if found.script is None and found.uv is None and found.lock is None:
        return None
    return found


# The first read of the head and of the tail; each grows by doubling while it is too short.
CHUNK = 64 * 1024
# Files up to this size are parsed whole (about 0.3 ms: 4-5 ms per MB here); larger ones through
# the fast path, which reads about as much of them.
SMALL_FILE = CHUNK


# Bytes without which a cell's JSON text cannot decode to a "# /// script" line: the words
# themselves, or a JSON escape that could spell them (a backslash-u escape, or backslash-slash).
_BLOCK_MARKERS = (b"/// script", b"\\u", b"\\/")


class _NotLaidOut(Exception):
    """The file is not laid out as nbformat writes it: the fast path gives way to the full parse."""


def read_declaration(path, chunk=CHUNK, small_file=SMALL_FILE):
    """The Declaration in the notebook at ``path``, or None when it declares nothing.

    Only the head (up to the first code cell) and the tail (the top-level metadata) of a large
    notebook are read: see ``read_laid_out``. Whenever the file is not laid out as expected, the
    whole file is parsed instead, with the same result.
    """
    fd = _open(path)
    try:
        size = os.fstat(fd).st_size
        if size > small_file:
            try:
                return read_laid_out(fd, size, chunk)
            except _NotLaidOut:
                pass
            except OSError as exc:
                raise NotebookUnreadable("cannot read %s: %s" % (path, os.strerror(exc.errno or 0))) from None
        return parse_whole(_pread(fd, size, 0, path), path)
    finally:
        os.close(fd)


def read_declaration_full(path):
    """The reference reader: the whole file parsed. read_declaration equals it on every notebook."""
    fd = _open(path)
    try:
        return parse_whole(_pread(fd, os.fstat(fd).st_size, 0, path), path)
    finally:
        os.close(fd)


def parse_whole(data, path):
    try:
        notebook = fastjson.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise NotebookUnreadable("%s is not a notebook (not JSON: %s)" % (path, exc)) from None
    return from_notebook(notebook)


def _open(path):
    try:
        # O_NONBLOCK: a FIFO named like a notebook must not hang the kernel start (no effect on files).
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise NotebookUnreadable("cannot read %s: %s" % (path, os.strerror(exc.errno or 0))) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise NotebookUnreadable("cannot read %s: not a regular file" % path)
    return fd


def _pread(fd, length, offset, path):
    try:
        data = os.pread(fd, length, offset)
    except OSError as exc:
        raise NotebookUnreadable("cannot read %s: %s" % (path, os.strerror(exc.errno or 0))) from None
    return data


# --- the fast path -----------------------------------------------------------------------------------
#
# Jupyter and nbformat write ``json.dumps(nb, sort_keys=True, indent=1, ensure_ascii=False)``:
#
#   {
#    "cells": [
#     {
#      "cell_type": "markdown",
#      ...
#     },
#     {
#      ...
#     }
#    ],
#    "metadata": {
#     ...
#    },
#    "nbformat": 4,
#    "nbformat_minor": 5
#   }
#
# A JSON string cannot hold a raw newline (it is written ``\n``), so a newline in the file is always
# whitespace between tokens, and "newline, two spaces, }" ends a cell, "newline, one space, "metadata": "
# starts a key. The head is decoded one cell at a time by the same C scanner as fastjson.loads,
# reading on only while the cell's end is not yet in what we read; the tail from the last
# ``\n "metadata": `` must be that object followed by exactly the nbformat/nbformat_minor keys
# and the closing brace. That closing brace is the top-level object's (the file ends there), so the
# key is a top-level key and the last "metadata" in it: the one a full parse keeps. Anything else
# raises _NotLaidOut. Not checked: the cells between the first code cell and the metadata, which
# this path never reads (a corrupt middle, or a second "cells" key there, goes unnoticed).


def read_laid_out(fd, size, chunk=CHUNK):
    """The Declaration from the head and tail of a file laid out as nbformat writes it.

    Raises _NotLaidOut when the layout is not that, NotebookUnreadable when the file cannot be read.
    """
    script, script_cell = _first_code_cell(fd, size, chunk)
    metadata = _top_level_metadata(fd, size, chunk)
    found = Declaration(script, script_cell)
    _metadata_declaration(metadata, found)
    return _or_none(found)


class _Head:
    """The start of the file as bytes, read on (doubling) only as far as asked."""

    __slots__ = ("data", "fd", "size")

    def __init__(self, fd, size, chunk):
        self.fd, self.size, self.data = fd, size, bytearray()
        self._read(min(chunk, size))

    def _read(self, length):
        """Read on up to ``length`` bytes from the start (only the new part is read)."""
        more = os.pread(self.fd, length - len(self.data), len(self.data))
        if len(more) < length - len(self.data):
            raise _NotLaidOut()  # shorter than fstat said: changed meanwhile
        self.data += more

    def _grow(self):
        if len(self.data) >= self.size:
            raise _NotLaidOut()  # all read and still not as expected
        self._read(min(self.size, len(self.data) * 2))

    def startswith(self, prefix, position):
        while len(self.data) < position + len(prefix) and len(self.data) < self.size:
            self._grow()
        return self.data.startswith(prefix, position)

    def find(self, marker, position):
        while True:
            found = self.data.find(marker, position)
            if found >= 0:
                return found
            # Search on from where this search ended, not again through a large output.
            position = max(position, len(self.data) - len(marker) + 1)
            self._grow()


def _first_code_cell(fd, size, chunk):
    """(script, script_cell) from the cells up to and including the first code cell."""
    head = _Head(fd, size, chunk)
    newline = b"\r\n" if head.startswith(b"{\r\n", 0) else b"\n"
    opening = b"{" + newline + b' "cells": ['
    if not head.startswith(opening, 0):
        raise _NotLaidOut()
    position = len(opening)
    if head.startswith(b"],", position):
        return None, None  # no cells
    cell_start = newline + b"  {"
    cell_end = newline + b"  }"
    number = 0
    while True:
        if not head.startswith(cell_start, position):
            raise _NotLaidOut()
        position += len(cell_start) - 1
        # The cell is decoded only once its end is read: bytes are searched, text is scanned.
        end = head.find(cell_end, position) + len(cell_end)
        if head.startswith(b"{" + newline + b'   "cell_type": "code",', position) and not any(
            marker in head.data[position:end] for marker in _BLOCK_MARKERS
        ):
            # The first code cell, and no "/// script" in it, written plainly or escaped: it holds
            # no block, and its outputs (a plot can be megabytes) need not be decoded at all.
            return None, None
        try:
            text = head.data[position:end].decode("utf-8")
        except UnicodeDecodeError:
            raise _NotLaidOut() from None  # the full parse reports it
        try:
            cell, scanned = fastjson.scan(text, 0)
        except ValueError:
            raise _NotLaidOut() from None
        if scanned != len(text) or not isinstance(cell, dict):
            raise _NotLaidOut()  # the cell did not end at the first "newline, two spaces, }"
        position = end
        number += 1
        if cell.get("cell_type") == "code":
            source = cell_source(cell)
            return (source, number) if is_script_block(source) else (None, None)
        if head.startswith(b",", position):
            position += 1
        elif head.startswith(newline + b" ]", position):
            return None, None  # no code cell
        else:
            raise _NotLaidOut()


def _top_level_metadata(fd, size, chunk):
    """The value of the top-level "metadata" key, from the tail of the file."""
    length = min(chunk, size)
    while True:
        data = os.pread(fd, length, size - length)
        if len(data) < length:
            raise _NotLaidOut()  # shorter than fstat said: changed meanwhile
        newline = b"\r\n" if data.endswith((b"\r\n", b"\r\n}")) else b"\n"
        marker = data.rfind(newline + b' "metadata": ')
        if marker >= 2:  # the two characters before it are checked below
            break
        if length >= size:
            raise _NotLaidOut()
        length = min(size, length * 2)
    # The cells' closing bracket (or an empty list) right before the key.
    if not data[:marker].endswith(b"],"):
        raise _NotLaidOut()
    try:
        text = data[marker:].decode("utf-8")
    except UnicodeDecodeError:
        raise _NotLaidOut() from None
    nl = newline.decode()
    try:
        metadata, position = fastjson.scan(text, len(nl) + len(' "metadata": '))
    except ValueError:
        raise _NotLaidOut() from None
    if not _is_closing(text, position, nl):
        raise _NotLaidOut()
    return metadata


def _is_closing(text, position, newline):
    """Whether ``text[position:]`` is ``,\n "nbformat": N,\n "nbformat_minor": M\n}`` + whitespace."""
    for key in ("nbformat", "nbformat_minor"):
        prefix = "," + newline + ' "%s": ' % key
        if not text.startswith(prefix, position):
            return False
        position += len(prefix)
        digits = position
        while position < len(text) and text[position] in "0123456789":
            position += 1
        if position == digits or (position - digits > 1 and text[digits] == "0"):
            return False  # no number, or one JSON does not allow (a leading zero)
    end = newline + "}"
    return text.startswith(end, position) and not text[position + len(end):].strip(" \t\n\r")
