"""The wire protocol, driven without any I/O."""

from __future__ import annotations

import asyncio
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from uvkerneld import connlimits, fastjson, framing, kernel_extension, protocol
from uvkerneld.ops import parse_request
from uvkerneld.protocol import (
    BadRequest,
    FrameDecoder,
    FrameTooLarge,
    NotJson,
    TruncatedFrame,
    UnknownOp,
    UnsupportedVersion,
)


def frame_of(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def decode_one(data: bytes) -> dict:
    decoder = FrameDecoder()
    decoder.feed(data)
    message = decoder.next_message()
    assert message is not None
    return message


REPO = Path(__file__).resolve().parent.parent


def parse(data: dict) -> protocol.Request:
    return parse_request(decode_one(protocol.encode_frame(data)))


def test_request_round_trip() -> None:
    message = protocol.request(7, "acquire", {"key": {"kind": "notebook", "value": "/home/a/x.ipynb"}})
    request = parse(message)
    assert request.id == 7 and request.op == "acquire"
    assert request.args["key"] == protocol.EnvKey("notebook", "/home/a/x.ipynb")


def test_response_and_error_round_trip() -> None:
    ok = decode_one(protocol.encode_frame(protocol.ok_response("r1", {"path": "/v/e-1"})))
    assert protocol.parse_response(ok, "r1") == {"path": "/v/e-1"}
    error = protocol.error_response(3, protocol.NotAllowed("uid 1001 may not use env e-1"))
    with pytest.raises(protocol.NotAllowed, match="uid 1001 may not"):
        protocol.parse_response(decode_one(protocol.encode_frame(error)), 3)


def test_event_frames_are_not_final() -> None:
    event = decode_one(protocol.encode_frame(protocol.event(4, "output", "Resolved 3 packages")))
    assert protocol.parse_response(event, 4) is None


def test_decoder_handles_bytes_one_at_a_time_and_back_to_back_frames() -> None:
    data = (protocol.encode_frame(protocol.request(1, "status"))
            + protocol.encode_frame(protocol.request(2, "status")))
    decoder = FrameDecoder()
    seen = []
    for byte in data:
        decoder.feed(bytes([byte]))
        message = decoder.next_message()
        if message is not None:
            seen.append(message["id"])
    assert seen == [1, 2]
    decoder.eof()  # nothing left over: no error


def test_non_ascii_paths_survive() -> None:
    request = parse(protocol.request(1, "acquire",
                                     {"key": {"kind": "notebook", "value": "/home/zoë/日本.ipynb"}}))
    assert request.args["key"].value == "/home/zoë/日本.ipynb"


@pytest.mark.parametrize(
    "body, error, code",
    [
        (b"not json at all", NotJson, "not_json"),
        (b"\xff\xfe\x00", NotJson, "not_json"),
        (b'{"v": 1, "id": 1, "op": "status"', NotJson, "not_json"),
        (b"[1, 2, 3]", BadRequest, "bad_request"),
        (b'"a string"', BadRequest, "bad_request"),
    ],
)
def test_malformed_bodies(body: bytes, error: type, code: str) -> None:
    with pytest.raises(error) as caught:
        decode_one(frame_of(body))
    assert caught.value.code == code


NOTEBOOK_KEY = {"kind": "notebook", "value": "/home/u/a.ipynb"}
GOOD_FILE = {"dev": 2049, "ino": 1 << 63, "size": 1200, "mtime_ns": 1764374400123456789}


def test_acquire_carries_the_notebook_file_identity_as_text() -> None:
    request = parse({"v": 1, "id": 1, "op": "acquire", "args": {"key": NOTEBOOK_KEY, "file": GOOD_FILE}})
    # As text: an inode number may use all 64 bits, more than an SQLite integer holds.
    assert request.args["file"] == "2049:9223372036854775808:1200:1764374400123456789"
    assert parse({"v": 1, "id": 1, "op": "acquire", "args": {"key": NOTEBOOK_KEY}}).args["file"] is None


def test_identity_of_a_file_and_what_a_save_keeps(tmp_path) -> None:  # type: ignore[no-untyped-def]
    notebook = tmp_path / "a.ipynb"
    notebook.write_text("{}")
    before = protocol.identity_of(notebook.stat())
    with open(notebook, "w") as handle:  # an in-place save: same inode, new size and mtime
        handle.write('{"cells": []}')
    after = protocol.identity_of(notebook.stat())
    assert after != before and protocol.same_inode(before, after)
    copy = tmp_path / "b.ipynb"
    copy.write_text('{"cells": []}')
    assert not protocol.same_inode(after, protocol.identity_of(copy.stat()))


@pytest.mark.parametrize(
    "message, error, fragment",
    [
        ({"v": "1", "id": 1, "op": "status"}, BadRequest, '"v" must be an integer'),
        ({"v": True, "id": 1, "op": "status"}, BadRequest, '"v" must be an integer'),
        ({"v": 2, "id": 1, "op": "status"}, UnsupportedVersion, "speaks protocol 1"),
        ({"v": 1, "op": "status"}, BadRequest, '"id" is missing'),
        ({"v": 1, "id": 1.5, "op": "status"}, BadRequest, '"id" must be an integer or a string'),
        ({"v": 1, "id": [1], "op": "status"}, BadRequest, '"id" must be'),
        ({"v": 1, "id": "x" * 500, "op": "status"}, BadRequest, '"id" must be'),
        ({"v": 1, "id": 1, "op": 5}, BadRequest, '"op" must be a string'),
        ({"v": 1, "id": 1, "op": "rm_rf"}, UnknownOp, "unknown op 'rm_rf'"),
        ({"v": 1, "id": 1, "op": "status", "args": []}, BadRequest, '"args" must be an object'),
        ({"v": 1, "id": 1, "op": "acquire", "args": {}}, BadRequest, 'acquire needs "key"'),
        ({"v": 1, "id": 1, "op": "acquire", "args": {"key": "x"}}, BadRequest, 'acquire needs "key"'),
        ({"v": 1, "id": 1, "op": "acquire", "args": {"key": {"kind": "file", "value": "/a"}}},
         BadRequest, "key kind must be one of"),
        ({"v": 1, "id": 1, "op": "acquire", "args": {"key": {"kind": "notebook", "value": 3}}},
         BadRequest, "non-empty string"),
        ({"v": 1, "id": 1, "op": "acquire", "args": {"key": {"kind": "notebook", "value": "a.ipynb"}}},
         BadRequest, "must be absolute and normalized"),
        ({"v": 1, "id": 1, "op": "acquire",
          "args": {"key": {"kind": "notebook", "value": "/a/../etc/x.ipynb"}}},
         BadRequest, "must be absolute and normalized"),
        ({"v": 1, "id": 1, "op": "acquire", "args": {"key": {"kind": "dir", "value": "/a\0b"}}},
         BadRequest, "contains NUL"),
        ({"v": 1, "id": 1, "op": "acquire", "args": {"key": {"kind": "env", "value": "../../etc"}}},
         BadRequest, "env name '../../etc' is not allowed"),
        ({"v": 1, "id": 1, "op": "acquire", "args": {"key": {"kind": "env", "value": "a/b"}}},
         BadRequest, "env name 'a/b' is not allowed"),
        ({"v": 1, "id": 1, "op": "acquire", "args": {"key": {"kind": "env", "value": "x" * 65}}},
         BadRequest, "is not allowed"),
        ({"v": 1, "id": 1, "op": "acquire",
          "args": {"key": {"kind": "dir", "value": "/a"}, "file": GOOD_FILE}},
         BadRequest, '"file" describes a notebook file; it is only valid with a notebook key'),
        ({"v": 1, "id": 1, "op": "acquire", "args": {"key": NOTEBOOK_KEY, "file": [1, 2, 3, 4]}},
         BadRequest, '"file" must be an object with dev, ino, size, mtime_ns'),
        ({"v": 1, "id": 1, "op": "acquire", "args": {"key": NOTEBOOK_KEY, "file": dict(GOOD_FILE, ino=-1)}},
         BadRequest, '"file.ino" must be a non-negative integer, got -1'),
        ({"v": 1, "id": 1, "op": "acquire",
          "args": {"key": NOTEBOOK_KEY, "file": dict(GOOD_FILE, size="12")}},
         BadRequest, '"file.size" must be a non-negative integer'),
        ({"v": 1, "id": 1, "op": "acquire", "args": {"key": NOTEBOOK_KEY, "file": dict(GOOD_FILE, dev=True)}},
         BadRequest, '"file.dev" must be a non-negative integer'),
        ({"v": 1, "id": 1, "op": "acquire",
          "args": {"key": NOTEBOOK_KEY, "file": {"dev": 1, "ino": 2, "size": 3}}},
         BadRequest, '"file.mtime_ns" must be a non-negative integer, got None'),
        ({"v": 1, "id": 1, "op": "acquire",
          "args": {"key": NOTEBOOK_KEY, "file": dict(GOOD_FILE, ino=1 << 64)}},
         BadRequest, '"file.ino" must be a non-negative integer'),
    ],
)
def test_invalid_requests(message: dict, error: type, fragment: str) -> None:
    with pytest.raises(error) as caught:
        parse(message)
    assert fragment in caught.value.message
    assert caught.value.code == error.code


@pytest.mark.parametrize(
    "op, args, fragment",
    [
        ("show", {}, 'exactly one of "env" (its path), "env_id" or "key"'),
        ("show", {"env": "/v/e-1", "env_id": "e-000000000000"}, "exactly one of"),
        ("remove", {"env_id": "../etc"}, '"env_id" must look like e-0123456789ab'),
        ("remove", {"env_id": "e-XYZ000000000"}, '"env_id" must look like'),
        ("installs", {"env": "relative/venv"}, '"env" must be the absolute path of a venv'),
        ("notebook_saved", {"env": "/v/e-1"}, '"file" must be an object with dev, ino, size, mtime_ns'),
        ("notebook_saved", {"env": "/v/../e-1", "file": GOOD_FILE},
         '"env" must be the absolute path of a venv'),
        ("notebook_saved", {"env": "/v/e-1", "file": dict(GOOD_FILE, size=-5)},
         '"file.size" must be a non-negative'),
        ("installs", {"key": "notebook.ipynb"}, '"key" must be {"kind": ..., "value": ...}'),
        ("list", {"all": "yes"}, '"all" must be true or false'),
        ("gc", {"older_than_s": -1}, '"older_than_s" must be a number of seconds >= 0'),
        ("gc", {"older_than_s": True}, '"older_than_s" must be a number'),
        ("gc", {"env_ids": "e-000000000000"}, '"env_ids" must be a list of env ids'),
        ("gc", {"dry_run": 1}, '"dry_run" must be true or false'),
        ("pool", {"size": 65}, '"size" must be an integer from 0 to 64'),
        ("pool", {"size": "2"}, '"size" must be an integer'),
        ("pip", {"env": "/v/e-1", "argv": "install six"}, '"argv" must be a list of at most 256 strings'),
        ("pip", {"env": "/v/e-1", "argv": ["install"] * 300}, '"argv" must be a list of at most 256 strings'),
        ("pip", {"env": "/v/e-1", "argv": ["install", "-r", "x"], "files": [3]},
         '"files" must be a list of strings'),
    ],
)
def test_invalid_op_arguments(op: str, args: dict, fragment: str) -> None:
    with pytest.raises(BadRequest) as caught:
        parse(protocol.request(1, op, args))
    assert fragment in caught.value.message


def test_request_id_is_kept_for_errors_when_usable() -> None:
    assert protocol.request_id_of({"id": 9, "op": "nope"}) == 9
    assert protocol.request_id_of({"id": True}) is None
    assert protocol.request_id_of({}) is None


def test_frame_too_large_is_refused_from_the_header_alone() -> None:
    decoder = FrameDecoder()
    decoder.feed(struct.pack(">I", protocol.MAX_FRAME_SIZE + 1))
    with pytest.raises(FrameTooLarge) as caught:
        decoder.next_message()
    assert caught.value.code == "frame_too_large"


def test_encoding_an_oversized_message_is_refused() -> None:
    with pytest.raises(FrameTooLarge):
        protocol.encode_frame({"blob": "x" * (protocol.MAX_FRAME_SIZE + 1)})


@pytest.mark.parametrize("data", [b"\x00\x00", frame_of(b'{"v": 1, "id": 1, "op": "status"}')[:-3]])
def test_truncated_frames(data: bytes) -> None:
    decoder = FrameDecoder()
    decoder.feed(data)
    assert decoder.next_message() is None
    with pytest.raises(TruncatedFrame) as caught:
        decoder.eof()
    assert caught.value.code == "truncated_frame"


def test_error_codes_are_stable_and_rebuild_on_the_client() -> None:
    assert sorted(protocol.ERROR_CLASSES) == sorted([
        "frame_too_large", "truncated_frame", "not_json", "bad_request", "unknown_op",
        "unsupported_version", "not_allowed", "not_found", "bad_declaration", "env_unavailable",
        "shutting_down", "internal", "over_limit",
    ])
    for code, cls in protocol.ERROR_CLASSES.items():
        rebuilt = protocol.error_from_wire({"code": code, "message": "m"})
        assert type(rebuilt) is cls and rebuilt.message == "m"
    unknown = protocol.error_from_wire({"code": "from_the_future", "message": "m"})
    assert unknown.code == "from_the_future"


def test_response_with_wrong_id_or_version_is_rejected() -> None:
    with pytest.raises(protocol.InternalError):
        protocol.parse_response(protocol.ok_response(2, {}), 1)
    with pytest.raises(UnsupportedVersion):
        protocol.parse_response({"v": 9, "id": 1, "ok": True}, 1)


def test_protocol_module_imports_only_the_standard_library() -> None:
    # The kernel stub imports it on every kernel start: it must stay light and dependency-free.
    code = (
        "import sys; before = set(sys.modules); import kernel_stub.stub; "
        "print(' '.join(sorted(set(sys.modules) - before)))"
    )
    # As kernel.json runs the stub: -I -S, so nothing from site or .pth files hides an import.
    result = subprocess.run([sys.executable, "-I", "-S", "-c",
                             "import sys; sys.path.insert(0, %r); " % str(REPO) + code],
                            capture_output=True, text=True, timeout=30, cwd="/")
    assert result.returncode == 0, result.stderr
    loaded = result.stdout.split()
    ours = {"kernel_stub", "kernel_stub.stub", "uvkerneld", "uvkerneld.protocol", "uvkerneld.client",
            "uvkerneld.locations", "uvkerneld.fastjson", "uvkerneld.envid", "uvkerneld.nbdecl",
            "uvkerneld.envvars"}
    third_party = [
        name for name in loaded
        if name.split(".")[0] not in sys.stdlib_module_names and name not in ours
    ]
    assert third_party == []
    assert "asyncio" not in loaded and "sqlite3" not in loaded
    # The imports that cost the stub 15 ms of its 22 (they pull in re and enum): not at all.
    assert not {"json", "socket", "re", "enum"} & set(loaded), loaded


FASTJSON_VALUES = [
    {}, [], "", 0, -1, 2**70, -(2**63), 1.5, -0.0, 1e300, 3.141592653589793, True, False, None,
    "plain", "é ü 中文 \U0001f600",
    "quote \" backslash \\ slash / tab \t newline \n nul \x00 bell \x07 del \x7f",
    {"v": 1, "id": "req-1", "op": "acquire",
     "args": {"key": {"kind": "notebook", "value": "/home/ü/a b.ipynb"}}},
    {"nested": [[[{"a": [None, {"b": []}]}]]], "empty": {"": ""}},
    {1: "int key", 2.5: "float key", None: "none key"},
    {True: "bool key", False: "another"},  # its own dict: True == 1 would overwrite key 1
    ("tuple", "items"),
    [float("inf"), float("-inf")],
]


@pytest.mark.parametrize("value", FASTJSON_VALUES, ids=range(len(FASTJSON_VALUES)))
def test_fastjson_writes_and_reads_exactly_what_json_does(value: object) -> None:
    assert fastjson.ACCELERATED  # on CPython the C path is the one in use
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    assert fastjson.dumps(value) == text
    assert fastjson.loads(text) == json.loads(text)
    pretty = json.dumps(value, indent=2)  # whitespace and \u escapes, as other writers produce
    assert fastjson.loads(" \n" + pretty + "\t\r\n") == json.loads(pretty)


def test_fastjson_nan_and_errors_behave_like_json() -> None:
    nan = fastjson.loads('[NaN]')[0]
    assert nan != nan and fastjson.dumps([float("nan")]) == "[NaN]"
    for bad in ("", "   ", "{", '{"a" 1}', "[1,]", '"unterminated', "tru", '{"a":1} x', "1 2", '"\\x"',
                '"a\x01b"'):
        with pytest.raises(ValueError):
            json.loads(bad)
        with pytest.raises(ValueError):
            fastjson.loads(bad)
    with pytest.raises(TypeError, match="Object of type set is not JSON serializable"):
        fastjson.dumps({"a": {1, 2}})
    circular: list[object] = []
    circular.append(circular)
    with pytest.raises(ValueError, match="Circular reference"):
        fastjson.dumps(circular)
    # A failed call leaves nothing behind for the next one.
    assert fastjson.dumps([[1], [1]]) == "[[1],[1]]"



@pytest.mark.parametrize(
    "args",
    [
        {"key": {"kind": "notebook", "value": "/home/u/caf\udce9.ipynb"}},
        {"key": {"kind": "dir", "value": "/home/u/\ud800"}},
    ],
)
def test_lone_surrogates_in_paths_are_bad_requests(args: dict) -> None:
    with pytest.raises(BadRequest, match="not valid Unicode"):
        parse_request(protocol.request(1, "acquire", args))


def test_lone_surrogates_and_nul_in_pip_requests_are_bad_requests() -> None:
    with pytest.raises(BadRequest, match="valid Unicode text without NUL"):
        parse_request(protocol.request(1, "pip", {"env": "/v/e", "argv": ["install", "six\x00"]}))
    with pytest.raises(BadRequest, match="valid Unicode text without NUL"):
        parse_request(protocol.request(1, "pip", {"env": "/v/e", "argv": ["install", "\ud800"]}))
    with pytest.raises(BadRequest, match='"env" must be the absolute path'):
        parse_request(protocol.request(1, "pip", {"env": "/v/\udce9", "argv": []}))


def test_deep_json_is_not_json_and_surrogates_are_sent_as_escapes() -> None:
    with pytest.raises(NotJson, match="nested too deeply"):
        protocol.decode_body(b"[" * 100_000)
    frame = protocol.encode_frame(protocol.error_response(None, UnknownOp("unknown op 'st\ud800tus'")))
    assert decode_one(frame)["error"]["message"] == "unknown op 'st\ud800tus'"  # the escape round-trips


# --- the daemon's frame reader (framing.py) and the kernel extension's copy of the format -------


def read_frames(data: bytes, idle_timeout: float | None = 5.0, budget_bytes: int = 1 << 22,
                eof: bool = True) -> tuple[list[bytes | BaseException], connlimits.Admission]:
    """What ``framing.read_frame`` makes of ``data`` (then end of stream): bodies until the end,
    or the error it raised; and the real admission whose byte budget it used."""
    limits = connlimits.Limits(1024, {"UVKERNELD_FRAME_BUFFER_BUDGET": str(budget_bytes)})
    admission = connlimits.Admission(limits)

    async def run() -> list[bytes | BaseException]:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        if eof:
            reader.feed_eof()
        results: list[bytes | BaseException] = []
        while True:
            try:
                body = await framing.read_frame(reader, idle_timeout, 5.0, admission)
            except (framing.IdleTimeout, protocol.UvkError) as exc:
                return [*results, exc]
            if body is None:
                return results
            results.append(body)

    return asyncio.run(run()), admission


def test_the_frame_reader_reads_protocol_frames_and_stops_at_the_end() -> None:
    messages = [protocol.request(1, "status"), {"path": "/home/\u00fc/\u00e4.ipynb"},
                {"blob": "x" * (100 << 10)}]
    results, admission = read_frames(b"".join(protocol.encode_frame(message) for message in messages))
    assert [protocol.decode_body(body) for body in results] == messages  # type: ignore[arg-type]
    assert admission.buffered == 0  # the large body's reservation was given back


@pytest.mark.parametrize("data, error, fragment", [
    (struct.pack(">I", protocol.MAX_FRAME_SIZE + 1), FrameTooLarge, "exceeds the 1048576-byte limit"),
    (b"\x00\x00", TruncatedFrame, "connection closed inside a frame header (2 of 4 bytes)"),
    (frame_of(b'{"v": 1}')[:-2], TruncatedFrame, "connection closed after 6 of 8 body bytes"),
    (frame_of(b"x" * (200 << 10)), protocol.OverLimit, "frame_buffer_budget 102400"),
])
def test_the_frame_reader_refuses_what_cannot_be_read(data: bytes, error: type, fragment: str) -> None:
    results, admission = read_frames(data, budget_bytes=100 << 10)
    assert isinstance(results[-1], error) and fragment in results[-1].message, results
    assert admission.buffered == 0


def test_the_frame_reader_gives_up_on_a_connection_that_sends_nothing() -> None:
    results, _ = read_frames(b"", idle_timeout=0.05, eof=False)
    assert len(results) == 1 and isinstance(results[0], framing.IdleTimeout)


def test_the_kernel_extensions_copy_of_the_frame_format_matches_protocol() -> None:
    # kernel_extension.py runs in the notebook's venv, which cannot import uvkerneld: it keeps a copy.
    args = {"env": "/var/lib/uvkerneld/venvs/e-0123456789ab",
            "file": {"dev": 2049, "ino": (1 << 64) - 1, "size": 0, "mtime_ns": 1_700_000_000_123_456_789}}
    request = parse_request(decode_one(kernel_extension._request_frame("notebook_saved", args)))
    assert request.op == "notebook_saved" and request.args["env"] == args["env"]
    assert request.args["file"] == protocol.parse_file_identity(args["file"])
    for message in ({"path": "/home/\u00fc/\u00e4 b.ipynb"}, {"lone": "\udce9"}, {"n": [1, 2.5, None, True]}):
        assert decode_one(kernel_extension._encode_frame(message)) == message
    # The same size limit: the largest frame one sends, the other reads; one byte more neither does.
    assert kernel_extension._MAX_FRAME_SIZE == protocol.MAX_FRAME_SIZE
    padding = len(json.dumps({"blob": ""}))
    largest = {"blob": "x" * (protocol.MAX_FRAME_SIZE - padding)}
    frame = kernel_extension._encode_frame(largest)
    assert len(frame) == protocol.HEADER_SIZE + protocol.MAX_FRAME_SIZE and decode_one(frame) == largest
    with pytest.raises(ValueError, match="exceeds uvkerneld's 1048576-byte frame limit"):
        kernel_extension._encode_frame({"blob": "x" * (protocol.MAX_FRAME_SIZE - padding + 1)})
    results, _ = read_frames(frame[:protocol.HEADER_SIZE - 1] + b"\x01" + frame[protocol.HEADER_SIZE:])
    assert isinstance(results[0], FrameTooLarge)  # what the daemon makes of a frame one byte longer
