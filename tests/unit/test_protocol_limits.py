"""Decoder limits and typed bodies (shardline/protocol.py, shardline/messages.py): hostile bodies
are refused with a ProtocolError naming the problem, before anything large is allocated."""

from __future__ import annotations

import re
import struct

import msgpack
import pytest

from shardline import messages as M
from shardline import protocol as P
from shardline.protocol import ErrorCode, MsgType, ProtocolError
from tests.frames import header, raw_frame

HDR = header(MsgType.GENERATE)
R = b"\x82\xaarequest_id\xa1r"  # a map of 2 pairs: {"request_id": "r", <the pair that follows>}


@pytest.mark.parametrize("body, words", [
    (R + b"\xa6prompt\xdb\xff\xff\xff\xff", "truncated"),  # str32 declaring 4 GiB
    (R + b"\xb0prompt_token_ids\xc6\xff\xff\xff\xff", "truncated"),  # bin32 declaring 4 GiB
    (R + b"\xa8messages\xdd\x7f\xff\xff\xff", "truncated"),  # array32 declaring 2^31 items
    (R + b"\xa6params\xdf\xff\xff\xff\xff", "truncated"),  # map32 declaring 2^32 pairs
    (b"\xdf\xff\xff\xff\xff", "truncated"),  # the body itself a map32 declaring 2^32 pairs
    (R + b"\xa6params\x81\xa1a\xd4\x05\x00", "ext values are not part of the protocol"),  # ext types are not
    (R + b"\xa6params\x81\xa1a\xd6\xff\x00\x00\x00\x01", "timestamp values are not part"),  # ... timestamps either
    (R + b"\xa6prompt\xd4\x05\x00", "got `ext` - at `$.prompt`"),  # an ext where a str belongs
    (R + b"\xa6prompt\xa2\xff\xfe", "utf-8"),  # invalid UTF-8 in a str
])
def test_hostile_lengths_and_types_refused(body, words):
    with pytest.raises(ProtocolError) as e:
        P.decode(HDR + body)
    assert e.value.code is ErrorCode.BAD_FRAME and "GENERATE" in str(e.value)
    assert words in str(e.value).lower()


def test_fields_the_peer_does_not_know_are_skipped_unread():
    """A newer minor version's field (here a hostile one) never reaches the code: it is skipped."""
    for value in (b"\xd4\x05\x00", b"\xa2\xff\xfe", b"\x91" * 100 + b"\xc0"):
        assert P.decode(HDR + R + b"\xa2zz" + value)[1] == M.Generate(request_id="r")  # {"request_id": "r", "zz": ...}


@pytest.mark.parametrize("depth", [P.MAX_DEPTH, 100, 5000])
def test_nesting_depth_bounded(depth):
    body = R + b"\xa6params\x81\xa1a" + b"\x91" * depth + b"\xc0"  # params {"a": [[...[nil]...]]}: depth + 2 levels
    with pytest.raises(ProtocolError):
        P.decode(HDR + body)


def test_nesting_within_limit_accepted():
    body = R + b"\xa6params\x81\xa1a" + b"\x91" * (P.MAX_DEPTH - 2) + b"\xc0"
    assert P.decode(HDR + body)[1].params["a"]


def test_frame_size_limit_names_both_sizes():
    frame = P.encode(M.Generate(request_id="r", prompt="x" * 100))
    with pytest.raises(ProtocolError, match=rf"{len(frame)} bytes exceeds the limit of 64 bytes"):
        P.decode(frame, max_bytes=64)


def test_unknown_type_and_version_named():
    with pytest.raises(ProtocolError, match="unknown message type 200") as e:
        P.decode(P.HEADER.pack(P.MAGIC, P.PROTOCOL_MAJOR, 0, 200) + b"\x80")
    assert e.value.code is ErrorCode.UNKNOWN_TYPE
    speaks = rf"protocol version 9\.0 is not supported; this peer speaks {P.PROTOCOL_MAJOR}\."
    with pytest.raises(ProtocolError, match=speaks) as e:
        P.decode(P.HEADER.pack(P.MAGIC, 9, 0, 1) + b"\x80")
    assert e.value.code is ErrorCode.VERSION_MISMATCH


@pytest.mark.parametrize("msg_type, body, field", [
    (MsgType.GENERATE, {"prompt": "x"}, "request_id"),
    (MsgType.GENERATE, {"request_id": 7, "prompt": "x"}, "$.request_id"),
    (MsgType.GENERATE, {"request_id": "r", "stream": 1}, "$.stream"),  # an int is not a bool
    (MsgType.GENERATE, {"request_id": "r", "logprobs": True}, "$.logprobs"),  # a bool is not an int
    (MsgType.GENERATE, {"request_id": "r", "prompt_token_ids": "1 2 3"}, "$.prompt_token_ids"),
    (MsgType.REGISTER, {"worker_id": "w", "host": "h", "device": "cpu", "memory_bytes": 1.5, "version": "1"},
     "$.memory_bytes"),
    (MsgType.STEP_RESULT, {"step_id": 1, "seq_ids": [1], "tokens": b""}, "$.seq_ids"),
    (MsgType.STEP, {"step_id": 1}, "seqs"),
])
def test_type_errors_name_message_and_field(msg_type, body, field):
    with pytest.raises(ProtocolError, match=rf"^{msg_type.name}: .*`{re.escape(field)}`") as e:
        P.decode(raw_frame(msg_type, body))
    assert e.value.code is ErrorCode.BAD_FRAME


def test_valid_messages_pass_and_unknown_fields_are_ignored():
    body = {"request_id": "r", "prompt": "hi", "params": {"max_tokens": 2}, "stream": True, "logprobs": 2,
            "added_in_a_later_minor_version": [1, 2]}
    assert P.decode(raw_frame(MsgType.GENERATE, body))[1] == M.Generate(
        request_id="r", prompt="hi", params={"max_tokens": 2}, stream=True, logprobs=2)
    step = {"step_id": 3, "seqs": [{"seq_id": 1, "start": 0, "n": 2, "tokens": P.pack_ids([1, 2]), "blocks": b"",
                                    "reset": True, "sample": False}], "free": []}
    assert P.decode(raw_frame(MsgType.STEP, step))[1].step_id == 3


def test_non_string_keys_refused():
    with pytest.raises(ProtocolError):
        P.decode(HDR + msgpack.packb({1: 2}))
    with pytest.raises(ProtocolError, match=r"Expected `str`, got `bytes` - at `key` in `\$`"):
        P.decode(HDR + msgpack.packb({b"k": 1}, use_bin_type=True))


def test_huge_token_array_refused():
    with pytest.raises(ProtocolError, match="exceed the limit"):
        P.unpack_ids(struct.pack("<4i", 1, 2, 3, 4), max_len=3)
