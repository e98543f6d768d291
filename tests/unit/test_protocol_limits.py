"""Decoder limits and per-message schemas (shardline/protocol.py): hostile bodies are refused with
a ProtocolError naming the problem, before anything large is allocated."""

from __future__ import annotations

import struct

import msgpack
import pytest

from shardline import protocol as P
from shardline.protocol import ErrorCode, MsgType, ProtocolError

HDR = P.HEADER.pack(P.MAGIC, P.PROTOCOL_MAJOR, P.PROTOCOL_MINOR, int(MsgType.GENERATE))


@pytest.mark.parametrize("body, words", [
    (b"\x81\xa1a\xdb\xff\xff\xff\xff", "incomplete"),  # str32 declaring 4 GiB
    (b"\x81\xa1a\xc6\xff\xff\xff\xff", "incomplete"),  # bin32 declaring 4 GiB
    (b"\x81\xa1a\xdd\x7f\xff\xff\xff", "max_array_len"),  # array32 declaring 2^31 items
    (b"\xdf\xff\xff\xff\xff", "max_map_len"),  # map32 declaring 2^32 pairs
    (b"\x81\xa1a\xd4\x05\x00", "max_ext_len"),  # ext types are not part of the protocol
    (b"\x81\xa1a\xa2\xff\xfe", "utf-8"),  # invalid UTF-8 in a str
])
def test_hostile_lengths_and_types_refused(body, words):
    with pytest.raises(ProtocolError) as e:
        P.decode(HDR + body)
    assert e.value.code is ErrorCode.BAD_FRAME and "GENERATE" in str(e.value)
    assert words in str(e.value).lower()


@pytest.mark.parametrize("depth", [P.MAX_DEPTH, 100, 5000])
def test_nesting_depth_bounded(depth):
    body = b"\x81\xa1a" + b"\x91" * depth + b"\xc0"  # {"a": [[...[nil]...]]}: depth + 1 levels
    with pytest.raises(ProtocolError):
        P.decode(HDR + body)


def test_nesting_within_limit_accepted():
    body = b"\x81\xa1a" + b"\x91" * (P.MAX_DEPTH - 2) + b"\xc0"
    assert P.decode(HDR + body)[1]["a"]


def test_frame_size_limit_names_both_sizes():
    frame = P.encode(MsgType.GENERATE, {"prompt": "x" * 100})
    with pytest.raises(ProtocolError, match=rf"{len(frame)} bytes exceeds the limit of 64 bytes"):
        P.decode(frame, max_bytes=64)


def test_unknown_type_and_version_named():
    with pytest.raises(ProtocolError, match="unknown message type 200") as e:
        P.decode(P.HEADER.pack(P.MAGIC, P.PROTOCOL_MAJOR, 0, 200) + b"\x80")
    assert e.value.code is ErrorCode.UNKNOWN_TYPE
    with pytest.raises(ProtocolError, match=r"protocol version 9\.0 is not supported; this peer speaks 1\.") as e:
        P.decode(P.HEADER.pack(P.MAGIC, 9, 0, 1) + b"\x80")
    assert e.value.code is ErrorCode.VERSION_MISMATCH


@pytest.mark.parametrize("msg_type, body, field", [
    (MsgType.GENERATE, {"prompt": "x"}, "request_id"),
    (MsgType.GENERATE, {"request_id": 7, "prompt": "x"}, "request_id"),
    (MsgType.GENERATE, {"request_id": "r", "stream": 1}, "stream"),  # an int is not a bool
    (MsgType.GENERATE, {"request_id": "r", "logprobs": True}, "logprobs"),  # a bool is not an int
    (MsgType.GENERATE, {"request_id": "r", "prompt_token_ids": "1 2 3"}, "prompt_token_ids"),
    (MsgType.REGISTER, {"worker_id": "w", "host": "h", "device": "cpu", "memory_bytes": 1.5, "version": "1"},
     "memory_bytes"),
    (MsgType.STEP_RESULT, {"step_id": 1, "seq_ids": [1], "tokens": b""}, "seq_ids"),
    (MsgType.STEP, {"step_id": 1}, "seqs"),
])
def test_schema_names_message_and_field(msg_type, body, field):
    frame = P.encode(msg_type, body)
    t, b = P.decode(frame)
    with pytest.raises(ProtocolError, match=rf"{msg_type.name}: .*'{field}'"):
        P.validate(t, b)


def test_valid_messages_pass_and_unknown_fields_are_ignored():
    body = {"request_id": "r", "prompt": "hi", "params": {"max_tokens": 2}, "stream": True, "logprobs": 2,
            "added_in_a_later_minor_version": [1, 2]}
    assert P.validate(*P.decode(P.encode(MsgType.GENERATE, body))) == body
    step = {"step_id": 3, "seqs": [{"seq_id": 1, "tokens": P.pack_ids([1, 2])}], "free": []}
    assert P.validate(*P.decode(P.encode(MsgType.STEP, step)))["step_id"] == 3


def test_non_string_keys_refused():
    with pytest.raises(ProtocolError):
        P.decode(HDR + msgpack.packb({1: 2}))
    with pytest.raises(ProtocolError, match="string keys"):
        P.decode(HDR + msgpack.packb({b"k": 1}, use_bin_type=True))


def test_huge_token_array_refused():
    with pytest.raises(ProtocolError, match="exceed the limit"):
        P.unpack_ids(struct.pack("<4i", 1, 2, 3, 4), max_len=3)
