"""The wire protocol between uvkerneld and its clients: pure, no sockets, standard library only.

How it works
------------
Every message is one *frame*: a 4-byte big-endian unsigned length, then that many bytes of UTF-8
JSON holding one object. Frames larger than ``MAX_FRAME_SIZE`` are refused before their body is
read, so a client cannot make the daemon buffer unbounded data.

A request is ``{"v": 1, "id": <int|str>, "op": <str>, "args": {...}}``. The daemon answers with
exactly one final response carrying the same id, either
``{"v": 1, "id": ..., "ok": true, "result": {...}}`` or
``{"v": 1, "id": ..., "ok": false, "error": {"code": <stable code>, "message": <what to do>}}``.
Long operations may send ``{"v": 1, "id": ..., "event": <name>, "data": ...}`` frames before the
final response.

Errors form one hierarchy split by who is at fault (the client sent something wrong, or the daemon
could not do it); each carries a stable ``code`` that clients may branch on and a message written
for a person.

This module is imported by the kernel stub on every kernel start, so it must stay standard
library only and cheap to import (no dataclasses/typing/inspect, and not even ``json``: see
fastjson.py).
"""

import os
import struct

from . import envid, fastjson

PROTOCOL_VERSION = 1
HEADER = struct.Struct(">I")
HEADER_SIZE = HEADER.size
MAX_FRAME_SIZE = 1 << 20  # 1 MiB: far above any real request, small enough to never hurt the daemon
# ... but a "sync" request carries the notebook's "uv.lock" (up to declared.MAX_LOCK_CHARS, 8 Mi
# characters; 25 data-science packages lock to 1.25 MB). Large bodies are read only once their length
# is reserved from connlimits' shared budget, so this bounds one request, not the daemon's memory.
MAX_SYNC_FRAME_SIZE = 16 << 20
MAX_ID_LENGTH = 128
MAX_PATH_LENGTH = 4096
MAX_AGE_S = 100 * 365 * 86400

MAX_PIP_ARGS = 256
KEY_KINDS = ("notebook", "env", "dir")
ENV_NAME_MAX = 64
_ENV_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


# --- errors -------------------------------------------------------------------------------------


class UvkError(Exception):
    """Base of every error that can travel over the wire."""

    code = "internal"
    fault = "daemon"

    def __init__(self, message):
        super().__init__(message)
        self.message = message

    def to_wire(self):
        return {"code": self.code, "message": self.message}


class ClientFault(UvkError):
    """The request was wrong; retrying it unchanged will fail again."""

    fault = "client"
    code = "bad_request"


class FrameTooLarge(ClientFault):
    code = "frame_too_large"


class TruncatedFrame(ClientFault):
    code = "truncated_frame"


class NotJson(ClientFault):
    code = "not_json"


class BadRequest(ClientFault):
    code = "bad_request"


class UnknownOp(ClientFault):
    code = "unknown_op"


class UnsupportedVersion(ClientFault):
    code = "unsupported_version"


class NotAllowed(ClientFault):
    code = "not_allowed"


class NotFound(ClientFault):
    code = "not_found"


class BadDeclaration(ClientFault):
    """A notebook's declared dependencies cannot be used as they are; the message names the cell or
    metadata key, what is wrong and what to do. Nothing in the env changed."""

    code = "bad_declaration"


class DaemonFault(UvkError):
    """The daemon could not do what was asked; the message says why and what to do."""

    fault = "daemon"
    code = "internal"


class EnvUnavailable(DaemonFault):
    code = "env_unavailable"


class ShuttingDown(DaemonFault):
    code = "shutting_down"


class InternalError(DaemonFault):
    code = "internal"


class OverLimit(DaemonFault):
    """A bound on connections, running kernels or buffered request bytes was reached; the
    message names it. The same request may succeed later."""

    code = "over_limit"


ERROR_CLASSES: dict[str, type[UvkError]] = {
    cls.code: cls
    for cls in (
        FrameTooLarge, TruncatedFrame, NotJson, BadRequest, UnknownOp, UnsupportedVersion,
        NotAllowed, NotFound, BadDeclaration, EnvUnavailable, ShuttingDown, InternalError, OverLimit,
    )
}


def error_from_wire(error):
    """Rebuild the exception a response's ``error`` object describes (client side)."""
    if not isinstance(error, dict):
        return InternalError("daemon sent a malformed error: %r" % (error,))
    code = error.get("code")
    cls = ERROR_CLASSES.get(code, UvkError) if isinstance(code, str) else UvkError
    exc = cls(str(error.get("message", "")))
    if cls is UvkError:
        exc.code = str(error.get("code"))
    return exc


# --- framing ------------------------------------------------------------------------------------


def encode_frame(message, max_size=MAX_FRAME_SIZE):
    """Serialize one message object into a frame."""
    # A lone surrogate (from a client's "\\udc80" or an undecodable file name) goes out as the
    # JSON escape it came in as, instead of failing to encode.
    body = fastjson.dumps(message).encode("utf-8", "backslashreplace")
    if len(body) > max_size:
        raise FrameTooLarge(
            "message of %d bytes exceeds the %d-byte frame limit" % (len(body), max_size)
        )
    return HEADER.pack(len(body)) + body


def frame_limit(op):
    """The largest request frame of ``op``."""
    return MAX_SYNC_FRAME_SIZE if op == "sync" else MAX_FRAME_SIZE


def check_request_size(op, length):
    """A request body of ``length`` bytes, read under the largest limit: refused over its op's own."""
    if length > frame_limit(op):
        raise FrameTooLarge("a request of %d bytes (op %.40r) exceeds its %d-byte limit; send smaller "
                            "requests" % (length, op, frame_limit(op)))


def frame_length(header, max_size=MAX_FRAME_SIZE):
    """Length announced by a 4-byte frame header; refuses lengths over ``max_size``."""
    if len(header) != HEADER_SIZE:
        raise TruncatedFrame("frame header is %d bytes, expected %d" % (len(header), HEADER_SIZE))
    (length,) = HEADER.unpack(header)
    if length > max_size:
        raise FrameTooLarge(
            "frame of %d bytes exceeds the %d-byte limit; send smaller requests" % (length, max_size)
        )
    return length


def decode_body(body):
    """Parse a frame body into a JSON object (dict)."""
    try:
        message = fastjson.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise NotJson("frame body is not UTF-8 JSON: %s" % exc) from None
    except RecursionError:
        raise NotJson("frame body is JSON nested too deeply (arrays/objects inside each other); "
                      "send a flat request object") from None
    if not isinstance(message, dict):
        raise BadRequest("a message must be a JSON object, got %s" % type(message).__name__)
    return message


class FrameDecoder:
    """Incremental decoder: feed bytes as they arrive, take complete message objects out."""

    __slots__ = ("_buffer", "_max_size")

    def __init__(self, max_size=MAX_FRAME_SIZE):
        self._buffer = bytearray()
        self._max_size = max_size

    def feed(self, data):
        self._buffer += data

    def next_message(self):
        """The next complete message, or None when more bytes are needed."""
        if len(self._buffer) < HEADER_SIZE:
            return None
        length = frame_length(bytes(self._buffer[:HEADER_SIZE]), self._max_size)
        end = HEADER_SIZE + length
        if len(self._buffer) < end:
            return None
        body = bytes(self._buffer[HEADER_SIZE:end])
        del self._buffer[:end]
        return decode_body(body)

    def eof(self):
        """The peer closed; leftover bytes mean a frame was cut short."""
        if self._buffer:
            raise TruncatedFrame(
                "connection closed after %d bytes of an incomplete frame" % len(self._buffer)
            )


# --- requests -----------------------------------------------------------------------------------


class Request:
    """A validated request. Build with ``parse_request``; an invalid one cannot exist."""

    __slots__ = ("args", "id", "op")

    def __init__(self, request_id, op, args):
        self.id = request_id
        self.op = op
        self.args = args

    def __repr__(self):
        return "Request(id=%r, op=%r)" % (self.id, self.op)


class EnvKey:
    """Which env a client means: a notebook path, an explicit env name, or a folder's scratch env."""

    __slots__ = ("kind", "value")

    def __init__(self, kind, value):
        self.kind = kind
        self.value = value

    def to_wire(self):
        return {"kind": self.kind, "value": self.value}

    def __eq__(self, other):
        return isinstance(other, EnvKey) and (self.kind, self.value) == (other.kind, other.value)

    def __hash__(self):
        return hash((self.kind, self.value))

    def __repr__(self):
        return "%s:%s" % (self.kind, self.value)


def request_id_of(message):
    """The id of a message if it is usable, else None (so errors can still be correlated)."""
    request_id = message.get("id")
    if isinstance(request_id, bool) or not isinstance(request_id, (int, str)):
        return None
    if isinstance(request_id, str) and (len(request_id) > MAX_ID_LENGTH or not _encodable(request_id)):
        return None
    return request_id


def parse_request(message, validators):
    """Validate a decoded message as a request for one of the ops in ``validators`` (op name ->
    its argument check; the daemon's registry is ``uvkerneld.ops.OPS``)."""
    version = message.get("v")
    if isinstance(version, bool) or not isinstance(version, int):
        raise BadRequest('"v" must be an integer protocol version, got %r' % (version,))
    if version != PROTOCOL_VERSION:
        raise UnsupportedVersion(
            "this daemon speaks protocol %d, the client sent %d: use a client from the same "
            "uvkerneld release as the daemon" % (PROTOCOL_VERSION, version)
        )
    if "id" not in message:
        raise BadRequest('"id" is missing: every request needs an integer or string id')
    request_id = request_id_of(message)
    if request_id is None:
        raise BadRequest(
            '"id" must be an integer or a string of at most %d characters (valid Unicode), got %r'
            % (MAX_ID_LENGTH, _short(message.get("id")))
        )
    op = message.get("op")
    if not isinstance(op, str):
        raise BadRequest('"op" must be a string, got %r' % (_short(op),))
    if op not in validators:
        raise UnknownOp("unknown op %r; this daemon knows: %s" % (_short(op), ", ".join(validators)))
    args = message.get("args", {})
    if not isinstance(args, dict):
        raise BadRequest('"args" must be an object, got %s' % type(args).__name__)
    return Request(request_id, op, validators[op](args))


# Each op's argument check: wire args in, checked args out, BadRequest for anything else. The
# daemon's registry (``uvkerneld.ops.OPS``) pairs each with its op's name and handler.


def validate_acquire(args):
    key = args.get("key")
    if not isinstance(key, dict):
        raise BadRequest('acquire needs "key": {"kind": ..., "value": ...}')
    validated = {"key": parse_env_key(key.get("kind"), key.get("value")), "file": None}
    if args.get("file") is not None:
        if validated["key"].kind != "notebook":
            raise BadRequest('"file" describes a notebook file; it is only valid with a notebook key')
        validated["file"] = parse_file_identity(args["file"])
    return validated


DECLARATION_FIELDS = ("script", "script_cell", "uv", "uv_key", "lock")
DECLARATION_PLACES = ("metadata.runt.uv", "metadata.uv")


def validate_sync(args):
    """acquire's arguments, plus the notebook's declaration as the client read it (nbdecl's wire
    form) and "force". What the declaration means is checked by the daemon (declared.py)."""
    validated = validate_acquire(args)
    if validated["key"].kind != "notebook":
        raise BadRequest("sync needs a notebook key: only a notebook carries a declaration")
    wire = args.get("declaration")
    if not isinstance(wire, dict) or not set(wire) <= set(DECLARATION_FIELDS):
        raise BadRequest('"declaration" must be an object with some of %s' % ", ".join(DECLARATION_FIELDS))
    declaration = {name: wire.get(name) for name in DECLARATION_FIELDS}
    for name in ("script", "lock"):
        if declaration[name] is not None and not isinstance(declaration[name], str):
            raise BadRequest('"declaration.%s" must be text or null' % name)
    _check_texts([text for text in (declaration["script"], declaration["lock"]) if text], '"declaration"')
    cell = declaration["script_cell"]
    if (declaration["script"] is None) != (cell is None) or (cell is not None and (
            isinstance(cell, bool) or not isinstance(cell, int) or cell < 1)):
        raise BadRequest('"declaration.script_cell" must be the number (from 1) of the cell with "script"')
    if declaration["uv_key"] not in (None, *DECLARATION_PLACES) or (
            declaration["uv"] is not None and declaration["uv_key"] is None):
        raise BadRequest('"declaration.uv_key" must be one of %s, with "uv"' % ", ".join(DECLARATION_PLACES))
    validated["declaration"] = declaration
    validated["force"] = _flag(args, "force")
    return validated


FILE_IDENTITY_FIELDS = ("dev", "ino", "size", "mtime_ns")


def file_identity(stat_result):
    """What the stub sends about a notebook file: enough to recognise it after a rename."""
    return {"dev": stat_result.st_dev, "ino": stat_result.st_ino, "size": stat_result.st_size,
            "mtime_ns": stat_result.st_mtime_ns}


def identity_of(stat_result):
    """The file identity text of a stat result (what ``parse_file_identity`` returns for it)."""
    return parse_file_identity(file_identity(stat_result))


def same_inode(identity, other):
    """Whether two file identities name the same device and inode (a save changes only the rest)."""
    return identity.split(":", 2)[:2] == other.split(":", 2)[:2]


def parse_file_identity(value):
    """A validated file identity, as the text "dev:ino:size:mtime_ns" (inode numbers use all 64
    bits on some filesystems, more than an SQLite integer holds).

    A rename keeps all four; a copy gets a new inode, and a new file that happens to reuse a
    deleted notebook's inode number will not also have its size and nanosecond mtime.
    """
    if not isinstance(value, dict):
        raise BadRequest('"file" must be an object with %s' % ", ".join(FILE_IDENTITY_FIELDS))
    fields = []
    for name in FILE_IDENTITY_FIELDS:
        number = value.get(name)
        if isinstance(number, bool) or not isinstance(number, int) or not 0 <= number < 1 << 64:
            raise BadRequest('"file.%s" must be a non-negative integer, got %s' % (name, _short(number)))
        fields.append(str(number))
    return ":".join(fields)


def validate_status(args):
    return {}


def _validate_env_path(args):
    env = args.get("env")
    if not isinstance(env, str) or not env.startswith("/") or os.path.normpath(env) != env or "\0" in env \
            or not _encodable(env):
        raise BadRequest('"env" must be the absolute path of a venv, got %r' % (_short(env),))
    return env


def validate_pip(args):
    argv = args.get("argv")
    if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv) or len(argv) > MAX_PIP_ARGS:
        raise BadRequest('"argv" must be a list of at most %d strings' % MAX_PIP_ARGS)
    _check_texts(argv, '"argv"')
    files = args.get("files", [])
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise BadRequest('"files" must be a list of strings (the contents of -r/-c files)')
    _check_texts(files, '"files"')
    return {"env": _validate_env_path(args), "argv": argv, "files": files}


def validate_target(args):
    """Which env an op is about: exactly one of "env" (path), "env_id" or "key"."""
    given = [name for name in ("env", "env_id", "key") if name in args]
    if len(given) != 1:
        raise BadRequest('name the env with exactly one of "env" (its path), "env_id" or "key"')
    if given == ["env"]:
        return {"env": _validate_env_path(args)}
    if given == ["env_id"]:
        env_id = args["env_id"]
        if not envid.is_env_id(env_id):
            raise BadRequest('"env_id" must look like %s, got %r' % (envid.EXAMPLE, _short(env_id)))
        return {"env_id": env_id}
    key = args["key"]
    if not isinstance(key, dict):
        raise BadRequest('"key" must be {"kind": ..., "value": ...}')
    return {"key": parse_env_key(key.get("kind"), key.get("value"))}


def _flag(args, name):
    value = args.get(name, False)
    if not isinstance(value, bool):
        raise BadRequest('"%s" must be true or false' % name)
    return value


def validate_list(args):
    return {"all": _flag(args, "all")}


def validate_gc(args):
    older_than = args.get("older_than_s")
    if older_than is not None and (isinstance(older_than, bool) or not isinstance(older_than, (int, float))
                                   or not 0 <= older_than <= MAX_AGE_S):
        raise BadRequest('"older_than_s" must be a number of seconds >= 0 (at most 100 years) or null')
    env_ids = args.get("env_ids", [])
    if not isinstance(env_ids, list) or not all(isinstance(e, str) for e in env_ids):
        raise BadRequest('"env_ids" must be a list of env ids')
    _check_texts(env_ids, '"env_ids"')
    return {
        "older_than_s": older_than, "env_ids": env_ids, "dry_run": _flag(args, "dry_run"),
        "all": _flag(args, "all"),
    }


def validate_pool(args):
    size = args.get("size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= 64):
        raise BadRequest('"size" must be an integer from 0 to 64')
    return {"size": size}


def validate_notebook_saved(args):
    return {"env": _validate_env_path(args), "file": parse_file_identity(args.get("file"))}


def parse_env_key(kind, value):
    """Validate an env key. Paths must be absolute and normalized; names are a safe charset."""
    if kind not in KEY_KINDS:
        raise BadRequest("key kind must be one of %s, got %r" % (", ".join(KEY_KINDS), _short(kind)))
    if not isinstance(value, str) or not value:
        raise BadRequest("key value must be a non-empty string, got %r" % (_short(value),))
    if kind == "env":
        if len(value) > ENV_NAME_MAX or value[0] in ".-" or not set(value) <= _ENV_NAME_CHARS:
            raise BadRequest(
                "env name %r is not allowed: use 1-%d letters, digits, '.', '_' or '-', "
                "not starting with '.' or '-'" % (_short(value), ENV_NAME_MAX)
            )
        return EnvKey(kind, value)
    if len(value) > MAX_PATH_LENGTH or "\0" in value:
        raise BadRequest("%s path is too long or contains NUL" % kind)
    if not _encodable(value):
        raise BadRequest("%s path %r is not valid Unicode (a lone surrogate, as from a file name that is "
                         "not UTF-8); rename it to a UTF-8 name" % (kind, _short(value)))
    if not value.startswith("/") or os.path.normpath(value) != value or value.startswith("//"):
        raise BadRequest(
            "%s path must be absolute and normalized (no '..', '.', or '//'), got %r"
            % (kind, _short(value))
        )
    return EnvKey(kind, value)


def _short(value, limit=80):
    try:
        text = repr(value) if not isinstance(value, str) else value
    except RecursionError:
        return "<a value nested too deeply to show>"
    return text if len(text) <= limit else text[:limit] + "..."


def _encodable(text):
    """Whether ``text`` is valid Unicode: no lone surrogate, which SQLite, the file system calls
    and UTF-8 output all refuse."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_texts(texts, what):
    """Strings that reach a subprocess's argv or a file: valid Unicode without NUL."""
    for text in texts:
        if "\0" in text or not _encodable(text):
            raise BadRequest("%s must be valid Unicode text without NUL characters, got %r"
                             % (what, _short(text)))


# --- messages -----------------------------------------------------------------------------------


def request(request_id, op, args=None):
    return {"v": PROTOCOL_VERSION, "id": request_id, "op": op, "args": args or {}}


def ok_response(request_id, result):
    return {"v": PROTOCOL_VERSION, "id": request_id, "ok": True, "result": result}


def error_response(request_id, error):
    return {"v": PROTOCOL_VERSION, "id": request_id, "ok": False, "error": error.to_wire()}


def event(request_id, name, data):
    return {"v": PROTOCOL_VERSION, "id": request_id, "event": name, "data": data}


def parse_response(message, expected_id):
    """Client side: the result of a final response, or raise the error it carries.

    Returns None for an event frame (the caller keeps reading).
    """
    if message.get("v") != PROTOCOL_VERSION:
        raise UnsupportedVersion(
            "daemon answered with protocol %r, this client speaks %d: restart the daemon after "
            "upgrading uvkerneld" % (message.get("v"), PROTOCOL_VERSION)
        )
    if message.get("id") != expected_id:
        raise InternalError("daemon answered request %r, expected %r" % (message.get("id"), expected_id))
    if "event" in message:
        return None
    if message.get("ok") is True:
        result = message.get("result")
        return result if isinstance(result, dict) else {}
    raise error_from_wire(message.get("error"))
