"""What a notebook file declares about its dependencies, read cheaply: the one reader.

Cheaply: a notebook of many megabytes (outputs) is read only at its head, up to the first code
cell, and its tail, the top-level metadata (``read_laid_out``: Jupyter's and Colab's layouts); a
notebook laid out otherwise is parsed whole, with the same result (tests/test_nbdecl.py), up to
FULL_PARSE_LIMIT bytes: a larger one is NotebookUnreadable (the stub: it declares nothing).

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


# digest(Declaration().to_wire()): an env synced to "declares nothing" (its notebook's declaration
# was deleted) needs no sync while the notebook still declares nothing; a constant, so that the
# stub need not import hashlib to know it (tests/test_stub_declaration.py checks the value).
NOTHING_DIGEST = "ee2313bebc0274022f6e4d7c2991ca9dea0c2403389f61de7eb4cdc166b8bb9c"


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
# A larger file the fast path cannot read is not parsed whole: that costs ~5 ms and ~4 bytes of
# memory per byte (a 2 GB file: 40 s, 4 GB) at every kernel start, for a notebook no usual tool
# writes (Jupyter, nbformat, VS Code, Colab and juv files take the fast path). 16 MiB: ~80 ms.
FULL_PARSE_LIMIT = 16 * 1024 * 1024
# A first code cell larger than this (its outputs: a 50 MB plot, a long log) is not decoded whole;
# only its "source" is. Smaller cells are decoded whole, which checks the cell is one JSON object.
BIG_CELL = 1024 * 1024


# Bytes without which a cell's JSON text cannot decode to a "# /// script" line: the words
# themselves, or a JSON escape that could spell them (a backslash-u escape, or backslash-slash).
_BLOCK_MARKERS = (b"/// script", b"\\u", b"\\/")


class _NotLaidOut(Exception):
    """The file is not laid out as nbformat writes it: the fast path gives way to the full parse."""


def read_declaration(path, chunk=CHUNK, small_file=SMALL_FILE, full_parse_limit=FULL_PARSE_LIMIT):
    """The Declaration in the notebook at ``path``, or None when it declares nothing.

    Only the head (up to the first code cell) and the tail (the top-level metadata) of a large
    notebook are read: see ``read_laid_out``. Whenever the file is not laid out as expected, the
    whole file is parsed instead, with the same result; above ``full_parse_limit`` bytes it is
    not, and NotebookUnreadable says why.
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
            if size > full_parse_limit:
                raise NotebookUnreadable(
                    "%s is %.1f MB and not laid out as Jupyter or Colab save notebooks (it starts %r); "
                    "a file above %.3g MiB is read only in those layouts, so it declares nothing here: "
                    "open and save it in Jupyter to have its declaration read"
                    % (path, size / 1e6, _pread(fd, 16, 0, path), full_parse_limit / 2 ** 20)) from None
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
# Colab writes indent 2, keys in insertion order: "nbformat", "nbformat_minor", "metadata", then
# "cells" last (and in a cell "source" before "outputs"). Both are read with any indent of 1-8 spaces.
#
# A JSON string cannot hold a raw newline (it is written ``\n``), so a newline in the file is always
# whitespace between tokens, and "newline, 2 indents, }" ends a cell, "newline, 1 indent, "metadata": "
# starts a key. The head is decoded one cell at a time by the same C scanner as fastjson.loads,
# reading on only while the cell's end is not yet in what we read. Jupyter's order: the tail from the
# last ``\n "metadata": `` must be that object followed by exactly the nbformat/nbformat_minor keys
# and the closing brace. That closing brace is the top-level object's (the file ends there), so the
# key is a top-level key and the last "metadata" in it: the one a full parse keeps. Colab's order: the
# metadata is decoded from the head, and the file must end with the cells' closing bracket and brace.
# Anything else raises _NotLaidOut. Not checked: the cells between the first code cell and the end
# (or the metadata), which this path never reads (a corrupt middle, or a second "cells" or "metadata"
# key there, goes unnoticed); and in a first code cell above BIG_CELL, whatever is not its "source"
# (a hand-made cell whose outputs hold a line that looks like the cell's "source" key is misread).


def read_laid_out(fd, size, chunk=CHUNK):
    """The Declaration from the head and tail of a file laid out as nbformat or Colab write it.

    Raises _NotLaidOut when the layout is not that, NotebookUnreadable when the file cannot be read.
    """
    head = _Head(fd, size, chunk)
    newline = b"\r\n" if head.startswith(b"{\r\n", 0) else b"\n"
    if not head.startswith(b"{" + newline, 0):
        raise _NotLaidOut()
    position = len(newline) + 1
    indent = b""
    while head.startswith(b" ", position + len(indent)) and len(indent) < 8:
        indent += b" "
    if not indent:
        raise _NotLaidOut()
    layout = _Layout(newline, indent)
    position += len(indent)
    if head.startswith(b'"cells": [', position):  # Jupyter's order: the metadata is at the end
        script, script_cell = _first_code_cell(head, position + len(b'"cells": ['), layout)
        metadata = _top_level_metadata(fd, size, chunk, layout)
    else:  # Colab's order, or not laid out
        metadata, position = _leading_metadata(head, position, layout)
        script, script_cell = _first_code_cell(head, position, layout)
        _check_cells_end_the_file(fd, size, layout)
    found = Declaration(script, script_cell)
    _metadata_declaration(metadata, found)
    return _or_none(found)


class _Layout:
    """The line break and one level of indentation of a file, and the byte markers made of them."""

    __slots__ = ("cell_end", "cell_key", "cell_start", "cells_end", "indent", "key", "newline")

    def __init__(self, newline, indent):
        self.newline, self.indent = newline, indent
        self.key = newline + indent + b'"'  # a top-level key starts
        self.cell_start = newline + indent * 2 + b"{"
        self.cell_end = newline + indent * 2 + b"}"
        self.cells_end = newline + indent + b"]"
        self.cell_key = newline + indent * 3 + b'"'  # a key of a cell starts


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


def _decode_value(data, start, end):
    """The JSON value that is exactly ``data[start:end]``; _NotLaidOut if it is not one."""
    try:
        text = data[start:end].decode("utf-8")
    except UnicodeDecodeError:
        raise _NotLaidOut() from None  # the full parse reports it
    try:
        value, scanned = fastjson.scan(text, 0)
    except ValueError:
        raise _NotLaidOut() from None
    if scanned != len(text):
        raise _NotLaidOut()
    return value


def _leading_metadata(head, position, layout):
    """Colab's order, top-level keys before "cells" (``position`` is at the first one's quote):
    (the metadata's value or None, the position after ``"cells": [``)."""
    metadata = None
    seen = set()
    while not head.startswith(b'"cells": [', position):
        for name in (b"nbformat", b"nbformat_minor", b"metadata"):
            if name not in seen and head.startswith(b'"%s": ' % name, position):
                break
        else:
            raise _NotLaidOut()
        seen.add(name)
        start = position + len(name) + 4
        # The next top-level key: a metadata object's own keys are indented deeper.
        end = head.find(b"," + layout.key, start)
        value = _decode_value(head.data, start, end)
        if name == b"metadata":
            metadata = value
        position = end + len(layout.key)  # at the next key's opening quote (after the comma)
    return metadata, position + len(b'"cells": [')


def _check_cells_end_the_file(fd, size, layout):
    """Colab's order: the file ends with the cells' closing bracket and the top-level brace."""
    length = min(size, 64)
    data = os.pread(fd, length, size - length).rstrip(b" \t\r\n")
    if not data.endswith((layout.cells_end + layout.newline + b"}", b"[]" + layout.newline + b"}")):
        raise _NotLaidOut()


def _first_code_cell(head, position, layout):
    """(script, script_cell) from the cells up to and including the first code cell; ``position``
    is right after the cells' opening bracket."""
    if head.startswith(b"]", position):
        return None, None  # no cells
    number = 0
    code_cell = b"{" + layout.newline + layout.indent * 3 + b'"cell_type": "code",'
    while True:
        if not head.startswith(layout.cell_start, position):
            raise _NotLaidOut()
        position += len(layout.cell_start) - 1
        # The cell is decoded only once its end is read: bytes are searched, text is scanned.
        end = head.find(layout.cell_end, position) + len(layout.cell_end)
        if head.startswith(code_cell, position):
            # What follows a cell: a hand-made file whose "cell end" is not one is decoded as before.
            followed = head.startswith(b",", end) or head.startswith(layout.cells_end, end)
            if end - position > BIG_CELL and followed:
                found = _source_only(head.data, position, end, layout)
                if found is not None:
                    source = cell_source({"source": found})
                    return (source, number + 1) if is_script_block(source) else (None, None)
            if not any(head.data.find(marker, position, end) >= 0 for marker in _BLOCK_MARKERS):
                # The first code cell, and no "/// script" in it, written plainly or escaped: it holds
                # no block, and its outputs (a plot can be megabytes) need not be decoded at all.
                return None, None
        cell = _decode_value(head.data, position, end)
        if not isinstance(cell, dict):
            raise _NotLaidOut()  # the cell did not end at the first "newline, 2 indents, }"
        position = end
        number += 1
        if cell.get("cell_type") == "code":
            source = cell_source(cell)
            return (source, number) if is_script_block(source) else (None, None)
        if head.startswith(b",", position):
            position += 1
        elif head.startswith(layout.cells_end, position):
            return None, None  # no code cell
        else:
            raise _NotLaidOut()


def _source_only(data, position, end, layout):
    """The value of the "source" key of the code cell ``data[position:end]``, decoding nothing else;
    None when it is not where nbformat (last key) or Colab (a key followed by others) put it."""
    key = layout.cell_key + b'source": '
    at = data.rfind(key, position, end)
    if at < 0:
        return None
    start = at + len(key)
    stop = data.find(layout.cell_key, start, end)  # the next key of the cell, if any
    stop = end - len(layout.cell_end) if stop < 0 else stop - 1  # before the comma
    if stop < start or (stop != end - len(layout.cell_end) and data[stop:stop + 1] != b","):
        return None
    if not any(data.find(marker, start, stop) >= 0 for marker in _BLOCK_MARKERS):
        return ""  # no block in it: not even the source is decoded
    try:
        return _decode_value(data, start, stop)
    except _NotLaidOut:
        return None


def _top_level_metadata(fd, size, chunk, layout):
    """The value of the top-level "metadata" key, from the tail of the file."""
    length = min(chunk, size)
    key = layout.key + b'metadata": '
    while True:
        data = os.pread(fd, length, size - length)
        if len(data) < length:
            raise _NotLaidOut()  # shorter than fstat said: changed meanwhile
        marker = data.rfind(key)
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
    nl, indent = layout.newline.decode(), layout.indent.decode()
    try:
        metadata, position = fastjson.scan(text, len(key))
    except ValueError:
        raise _NotLaidOut() from None
    if not _is_closing(text, position, nl, indent):
        raise _NotLaidOut()
    return metadata


def _is_closing(text, position, newline, indent):
    """Whether ``text[position:]`` is ``,\n "nbformat": N,\n "nbformat_minor": M\n}`` + whitespace."""
    for key in ("nbformat", "nbformat_minor"):
        prefix = "," + newline + indent + '"%s": ' % key
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
