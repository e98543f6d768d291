"""Wire protocol: framing, versions, limits on what a peer sent, packed token ids, `require`."""

from __future__ import annotations

import struct

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardline import protocol as P
from shardline.protocol import ErrorCode, MsgType, ProtocolError
from shardline.sampling import SamplingParams

IDS = P.pack_ids([1, 2, 3, 49151])

BODIES = {
    MsgType.GENERATE: {"request_id": "r1", "params": SamplingParams(max_tokens=8, stop=["\n"]).to_dict(),
                       "stream": True, "logprobs": 2, "prompt_token_ids": IDS},
    MsgType.ACCEPTED: {"request_id": "r1", "prompt_tokens": 4},
    MsgType.DELTA: {"request_id": "r1", "text": "héllo 😀", "token_ids": IDS, "logprobs": [[-0.5, [[3, -0.5]]]]},
    MsgType.DONE: {"request_id": "r1", "text": "", "token_ids": b"", "finish_reason": "length", "stop_reason": None,
                   "usage": {"prompt_tokens": 4, "completion_tokens": 0}, "timings": {"ttft_s": 0.25}},
    MsgType.CANCEL: {"request_id": "r1"},
    MsgType.HEALTH: {},
    MsgType.HEALTH_REPLY: {"status": "ok", "workers": 2},
    MsgType.STATS: {},
    MsgType.STATS_REPLY: {"steps_total": 10, "step_time_s_total": 1.5},
    MsgType.MODELS: {},
    MsgType.MODELS_REPLY: {"models": [{"id": "smollm2-135m", "max_model_len": 8192}]},
    MsgType.DRAIN_WORKER: {"request_id": "r2", "worker_id": "local-1"},
    MsgType.DRAIN_WORKER_REPLY: {"request_id": "r2", "worker_id": "local-1", "generation": 2,
                                 "plan": {"pp_size": 1}, "requests_resumed": 3, "drain_s": 4.5},
    MsgType.REGISTER: {"worker_id": "w0", "incarnation": 3, "host": "10.0.0.2", "device": "cpu",
                       "memory_bytes": 2**34, "version": "0.1.0", "pid": 1234, "threads": 1},
    MsgType.ASSIGN: {"rank": 1, "world_size": 2, "stage": 1, "pp_size": 2, "tp_rank": 0, "tp_size": 1,
                     "layer_start": 15, "layer_end": 30, "num_kv_blocks": 512, "block_size": 16},
    MsgType.READY: {"worker_id": "w0", "weight_bytes": 10**8, "kv_bytes": 2**29, "load_s": 1.25},
    MsgType.STEP: {"step_id": 7, "free": [3], "seqs": [{"seq_id": 4, "start": 0, "n": 4, "tokens": IDS,
                                                       "blocks": P.pack_ids([0]), "reset": True, "sample": True}]},
    MsgType.STEP_RESULT: {"step_id": 7, "seq_ids": P.pack_ids([4]), "tokens": P.pack_ids([17]), "forward_s": 0.01},
    MsgType.HEARTBEAT: {"worker_id": "w0", "num_steps": 7, "time": 1.7e9},
    MsgType.SHUTDOWN: {"reason": "drained"},
    MsgType.SHARD_REQUEST: {"worker_id": "w0", "model_digest": "ab" * 32, "reason": "no local model file"},
    MsgType.SHARD_MANIFEST: {"model_digest": "ab" * 32, "total_bytes": 8, "chunk_bytes": 4, "num_chunks": 2,
                             "shard_digest": "cd" * 32, "tensors": [
                                 {"name": "blk.0.attn_q.weight", "ggml_type": 3, "ne": [32, 2], "dtype": "|u1",
                                  "shape": [2, 4], "rows": [0, 2], "cols": None, "offset": 0, "nbytes": 8}]},
    MsgType.SHARD_FETCH: {"index": 1},
    MsgType.SHARD_CHUNK: {"index": 1, "offset": 4, "data": b"\x00\x01\x02\x03", "sha256": "ef" * 32},
    MsgType.ERROR: P.error_body(ErrorCode.INVALID_REQUEST, "max_tokens=0: must be an integer >= 1", request_id="r1"),
}


def header(major=P.PROTOCOL_MAJOR, minor=P.PROTOCOL_MINOR, msg_type=int(MsgType.GENERATE), magic=P.MAGIC) -> bytes:
    return P.HEADER.pack(magic, major, minor, msg_type)


def test_every_message_type_has_a_round_trip_case():
    assert set(BODIES) == set(MsgType)


@pytest.mark.parametrize("msg_type", list(MsgType), ids=lambda t: t.name)
def test_round_trip(msg_type):
    frame = P.encode(msg_type, BODIES[msg_type])
    assert frame[:2] == b"SL" and frame[2:4] == bytes([P.PROTOCOL_MAJOR, P.PROTOCOL_MINOR])
    assert struct.unpack_from("<H", frame, 4)[0] == int(msg_type)
    got_type, body = P.decode(frame)
    assert got_type is msg_type and body == BODIES[msg_type]


def test_encode_without_body_is_an_empty_map():
    assert P.decode(P.encode(MsgType.HEALTH)) == (MsgType.HEALTH, {})


def test_error_body_names_the_code():
    assert P.error_body(ErrorCode.OVERLOADED, "busy") == {"code": 5, "code_name": "OVERLOADED", "message": "busy"}


# ---- malformed frames --------------------------------------------------------------------------


def raises(frame: bytes, code=ErrorCode.BAD_FRAME, match=None, **kw) -> ProtocolError:
    with pytest.raises(ProtocolError, match=match) as info:
        P.decode(frame, **kw)
    assert info.value.code is code
    return info.value


@given(st.data())
@settings(max_examples=100, deadline=None)
def test_every_truncation_is_refused(data):
    msg_type = data.draw(st.sampled_from(list(MsgType)))
    frame = P.encode(msg_type, BODIES[msg_type] or {"x": 1})
    cut = data.draw(st.integers(0, len(frame) - 1))
    raises(frame[:cut])


def test_short_header_message():
    raises(b"SL\x01", match="shorter than the 6-byte header")


def test_bad_magic():
    raises(header(magic=b"XY") + msgpack.packb({}), match="bad magic")


def test_other_major_version_names_both_versions():
    err = raises(header(major=2, minor=3) + msgpack.packb({}), ErrorCode.VERSION_MISMATCH)
    assert "2.3" in str(err) and f"{P.PROTOCOL_MAJOR}.{P.PROTOCOL_MINOR}" in str(err)
    raises(header(major=0) + msgpack.packb({}), ErrorCode.VERSION_MISMATCH)


def test_newer_minor_version_is_accepted_with_unknown_fields():
    frame = header(minor=P.PROTOCOL_MINOR + 7, msg_type=int(MsgType.CANCEL)) + msgpack.packb(
        {"request_id": "r", "added_in_a_later_minor": [1, 2]})
    assert P.decode(frame) == (MsgType.CANCEL, {"request_id": "r", "added_in_a_later_minor": [1, 2]})


@pytest.mark.parametrize("mtype", [0, 62, 63, 76, 254, 65535])
def test_unknown_type(mtype):
    err = raises(header(msg_type=mtype) + msgpack.packb({}), ErrorCode.UNKNOWN_TYPE)
    assert str(mtype) in str(err)


@pytest.mark.parametrize("body", [[1, 2], "text", 5, None, b"raw", True], ids=repr)
def test_body_must_be_a_map(body):
    raises(header() + msgpack.packb(body, use_bin_type=True), match="must be a map")


@pytest.mark.parametrize("body", [
    b"\x81\x01\x01",  # {1: 1}
    b"\x81\xc4\x01k\x01",  # {b"k": 1}
    b"\x81\xc0\x01",  # {None: 1}
    b"\x81\x91\x01\x01",  # {[1]: 1}
    b"\x81\xa1k\x81\x81\xa1a\x01\x01",  # {"k": {{"a": 1}: 1}}: an unhashable nested key
], ids=["int", "bytes", "nil", "array", "nested-map"])
def test_map_keys_must_be_strings(body):
    raises(header() + body)


@pytest.mark.parametrize("body", [b"", b"\xc1", b"\x80\x80", b"\x81\xa1k", b"\xd5\xff\x00\x00"],
                         ids=["empty", "reserved-byte", "extra-data", "missing-value", "bad-timestamp"])
def test_malformed_msgpack(body):
    raises(header() + body, match="malformed msgpack body for GENERATE")


def test_oversized_frame_is_refused_before_decoding():
    frame = P.encode(MsgType.GENERATE, {"prompt": "x" * 100})
    raises(frame, max_bytes=len(frame) - 1, match=f"exceeds the limit of {len(frame) - 1} bytes")
    assert P.decode(frame, max_bytes=len(frame))[1]["prompt"] == "x" * 100
    big = P.encode(MsgType.GENERATE, {"prompt_token_ids": b"\0" * P.MAX_CLIENT_FRAME_BYTES})
    raises(big, max_bytes=P.MAX_CLIENT_FRAME_BYTES, match="exceeds the limit")


@pytest.mark.parametrize("depth", [2_000, 200_000])
@pytest.mark.parametrize("opener", [b"\x91", b"\x81\xa1k"], ids=["arrays", "maps"])
def test_deeply_nested_body_is_refused(opener, depth):
    raises(header() + b"\x81\xa1k" + opener * depth + b"\xc0")


@pytest.mark.parametrize("prefix", [
    b"\xdd",  # array 32
    b"\xdf",  # map 32
    b"\xc6",  # bin 32
    b"\xdb",  # str 32
    b"\xc9",  # ext 32
], ids=["array32", "map32", "bin32", "str32", "ext32"])
@pytest.mark.parametrize("declared", [2**31, 2**32 - 1, P.MAX_FRAME_BYTES - 1])
def test_huge_declared_lengths_are_refused_without_allocating(prefix, declared):
    """A header claiming billions of elements or bytes in a small frame: refused, quickly."""
    body = b"\x81\xa1k" + prefix + struct.pack(">I", declared) + b"\x01" * 64
    raises(header() + body)
    raises(header() + prefix + struct.pack(">I", declared) + b"\x00" * 64)


def test_element_count_limit_scales_with_the_frame():
    """A frame holds at most one element per byte, so counts above its size are lies."""
    arr16 = b"\x81\xa1k\xdc" + struct.pack(">H", 60000) + b"\xc0" * 100
    raises(header() + arr16, match="exceeds max_array_len")
    honest = P.encode(MsgType.STEP, {"free": list(range(5000))})
    assert P.decode(honest)[1]["free"] == list(range(5000))


@given(st.binary(max_size=64))
@settings(max_examples=300, deadline=None)
def test_random_bodies_decode_or_raise_protocol_error(body):
    try:
        msg_type, decoded = P.decode(header() + body)
    except ProtocolError as exc:
        assert exc.code is ErrorCode.BAD_FRAME
    else:
        assert msg_type is MsgType.GENERATE and isinstance(decoded, dict)
        assert all(isinstance(k, str) for k in decoded)


# ---- token ids ---------------------------------------------------------------------------------


@given(st.lists(st.integers(-(2**31), 2**31 - 1), max_size=200))
@settings(max_examples=100, deadline=None)
def test_pack_unpack_ids_round_trip(ids):
    data = P.pack_ids(ids)
    assert len(data) == 4 * len(ids)
    assert P.unpack_ids(data) == ids


def test_pack_ids_is_little_endian_int32():
    assert P.pack_ids([1, 256, -1]) == b"\x01\x00\x00\x00\x00\x01\x00\x00\xff\xff\xff\xff"


def test_unpack_ids_refuses_bad_input():
    with pytest.raises(ProtocolError, match="not a multiple of 4"):
        P.unpack_ids(b"\x00" * 7)
    with pytest.raises(ProtocolError, match="must be packed int32 bytes, got list"):
        P.unpack_ids([1, 2])
    with pytest.raises(ProtocolError, match="3 token ids exceed the limit of 2"):
        P.unpack_ids(P.pack_ids([1, 2, 3]), max_len=2)
    assert P.unpack_ids(bytearray(P.pack_ids([5]))) == [5]


# ---- require -----------------------------------------------------------------------------------


def test_require_returns_the_value_and_names_the_field():
    body = {"request_id": "r", "n": 3, "flag": True, "ids": b"\x00" * 4}
    assert P.require(body, "request_id", str) == "r"
    assert P.require(body, "n", (int, float)) == 3
    assert P.require(body, "flag", bool) is True
    with pytest.raises(ProtocolError, match="GENERATE: missing field 'prompt'") as info:
        P.require(body, "prompt", str, "GENERATE")
    assert info.value.code is ErrorCode.BAD_FRAME
    with pytest.raises(ProtocolError, match="field 'request_id' must be int, got str"):
        P.require(body, "request_id", int)
    with pytest.raises(ProtocolError, match="field 'flag' must be int, got bool"):
        P.require(body, "flag", int)  # a bool is not an int on the wire
    with pytest.raises(ProtocolError, match="field 'ids' must be str/int, got bytes"):
        P.require(body, "ids", (str, int))
