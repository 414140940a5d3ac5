"""What a notebook file declares about its dependencies, read cheaply: the one reader.

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
    import hashlib  # only notebooks that declare something pay for it

    ordered = {name: wire.get(name) for name in ("script", "script_cell", "uv", "uv_key", "lock")}
    return hashlib.sha256(fastjson.dumps(ordered).encode("utf-8", "surrogatepass")).hexdigest()


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
    metadata = notebook.get("metadata")
    if isinstance(metadata, dict):
        runt = metadata.get("runt")
        if isinstance(runt, dict) and "uv" in runt:
            found.uv, found.uv_key = runt["uv"], RUNT_UV_KEY
        elif "uv" in metadata:
            found.uv, found.uv_key = metadata["uv"], LEGACY_UV_KEY
        if LOCK_KEY in metadata:
            found.lock = metadata[LOCK_KEY]
    if found.script is None and found.uv is None and found.lock is None:
        return None
    return found


def read_declaration(path):
    """The Declaration in the notebook at ``path``, or None when it declares nothing."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise NotebookUnreadable("cannot read %s: %s" % (path, os.strerror(exc.errno or 0))) from None
    try:
        notebook = fastjson.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise NotebookUnreadable("%s is not a notebook (not JSON: %s)" % (path, exc)) from None
    return from_notebook(notebook)
