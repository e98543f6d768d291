"""Wire protocol: framing, versions, typed bodies (required fields, types, defaults), limits on what
a peer sent, packed token ids."""

from __future__ import annotations

import struct

import msgpack
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardline import messages as M
from shardline import protocol as P
from shardline.protocol import ErrorCode, MsgType, ProtocolError
from shardline.sampling import SamplingParams
from tests.frames import header, raw_frame

IDS = P.pack_ids([1, 2, 3, 49151])
LOGPROB = (-0.5, [(3, -0.5), (7, -1.25)])
COMM = M.CommStats(all_reduce_s=0.5, num_all_reduce=10, all_gather_s=0.25, num_all_gather=2, send_s=1.0, num_send=3,
                   recv_s=2.0, num_recv=3)
WORKER = M.WorkerStats(worker_id="w0", host="h", pid=7, alive=True, ready=True, drained=False, heartbeat_age_s=0.5,
                       step_time_s=0.01, weight_bytes=10**8, rss_bytes=2**30, kv_bytes=2**29, speed=1.0, comm=COMM,
                       stage=0, layer_start=0, layer_end=30, tp_rank=0, num_steps=9, busy_s=0.1, busy_fraction=None,
                       price_per_hour=None)
PLAN = {"pp_size": 1, "tp_size": 1, "assignments": [{"worker_id": "w0", "layer_start": 0, "layer_end": 30}]}

BODIES = {
    MsgType.GENERATE: M.Generate(request_id="r1", params=SamplingParams(max_tokens=8, stop=["\n"]).to_dict(),
                                 stream=True, logprobs=2, prompt_token_ids=IDS,
                                 messages=[M.ChatMessage(role="user", content="héllo 😀")]),
    MsgType.ACCEPTED: M.Accepted(request_id="r1", prompt_tokens=4),
    MsgType.DELTA: M.Delta(request_id="r1", index=1, text="héllo 😀", token_ids=IDS, logprobs=[LOGPROB],
                           prompt_logprobs=[None, LOGPROB], prompt_token_ids=P.pack_ids([5, 6]),
                           token_bytes={"3": b"\xe2\x82", "7": b"x"}),
    MsgType.DONE: M.Done(request_id="r1", text="", token_ids=b"", finish_reason="stop", stop_reason=2,
                         usage=M.Usage(prompt_tokens=4, completion_tokens=0, cached_tokens=0, num_preemptions=0),
                         timings=M.Timings(queue_s=0.01, ttft_s=None, e2e_s=0.25),
                         choices=[M.Choice(index=0, text="", token_ids=b"", finish_reason="stop", stop_reason="\n",
                                           logprobs=[LOGPROB])]),
    MsgType.CANCEL: M.Cancel(request_id="r1"),
    MsgType.HEALTH: M.Health(),
    MsgType.HEALTH_REPLY: M.HealthReply(status="ok", workers_up=2, workers_expected=2, model="smollm2-135m"),
    MsgType.STATS: M.Stats(request_id="s1"),
    MsgType.STATS_REPLY: M.StatsReply(
        requests_total=1, requests_finished=1, generation_tokens_total=8, prompt_tokens_total=4, steps_total=10,
        step_time_s_total=1.5, state="serving", coordinator=M.ProcessStats(pid=1, rss_bytes=2**28, num_fds=30),
        num_requests_running=0, worker_drain=M.WorkerDrainState(worker_id="w1", phase="quiesce", elapsed_s=0.5),
        workers=[WORKER], throughput_window_s=30.0, generation_tokens_per_s=None, price_per_hour=None,
        cost_total=None, cost_per_million_tokens=None, recent_cost_per_million_tokens=None, plan=PLAN),
    MsgType.MODELS: M.Models(),
    MsgType.MODELS_REPLY: M.ModelsReply(models=[M.ModelCard(id="smollm2-135m", name="SmolLM2", context_length=8192,
                                                            architecture="llama")]),
    MsgType.DRAIN_WORKER: M.DrainWorker(request_id="r2", worker_id="local-1"),
    MsgType.DRAIN_WORKER_REPLY: M.DrainWorkerReply(request_id="r2", worker_id="local-1", plan_id=2, plan=PLAN,
                                                   requests_resumed=3, drain_s=4.5),
    MsgType.REGISTER: M.Register(worker_id="w0", incarnation="3f2a", host="10.0.0.2", device="cpu",
                                 memory_bytes=2**34, version="0.1.0", pid=1234, threads=1, price_per_hour=0.5),
    MsgType.ASSIGN: M.Assign(
        plan_id=1, rank=1, world_size=2, stage=1, pp_size=2, tp_rank=0, tp_size=1, layer_start=15, layer_end=30,
        spec={"name": "tiny", "num_layers": 30, "layer_types": ["full"] * 2}, num_kv_blocks=512, block_size=16,
        max_positions=8192, store_host="10.0.0.1", store_port=7452, store_prefix="plan1/", data_plane_timeout_s=30.0,
        heartbeat_interval_s=1.0, heartbeat_misses=5, quantization="none", quantization_group_size=32,
        dtype="float32", gemm_weights="packed", kv_cache_dtype="float16", token_stream=True, model_digest="ab" * 32),
    MsgType.READY: M.Ready(worker_id="w0", plan_id=1, weight_bytes=10**8, kv_bytes=2**29, load_s=1.25,
                           async_scheduling=True,
                           shard_transfer=M.TransferStats(bytes=8, chunks=2, retries=0, seconds=0.5, format="gguf")),
    MsgType.STEP: M.Step(step_id=7, free=[3], seqs=[
        M.StepSeq(seq_id=4, start=0, n=4, tokens=IDS, blocks=P.pack_ids([0]), reset=True, sample=True,
                  params=SamplingParams().to_dict(), logprobs=2, prompt_len=4),
        M.StepSeq(seq_id=5, start=9, n=1, tokens=b"", blocks=b"", reset=False, sample=True, input_step=6)]),
    MsgType.STEP_RESULT: M.StepResult(step_id=7, seq_ids=P.pack_ids([4, 5]), tokens=P.pack_ids([17, 18]),
                                      forward_s=0.01, logprobs=[LOGPROB, None], prompt_logprobs=[(4, 1, [LOGPROB])]),
    MsgType.HEARTBEAT: M.Heartbeat(worker_id="w0", incarnation="3f2a", num_steps=7, step_times_s=[0.01], comm=COMM),
    MsgType.SHUTDOWN: M.Shutdown(reason="drained"),
    MsgType.SHARD_REQUEST: M.ShardRequest(worker_id="w0", model_digest="ab" * 32, reason="no local model file"),
    MsgType.SHARD_MANIFEST: M.ShardManifest(model_digest="ab" * 32, total_bytes=8, chunk_bytes=4, num_chunks=2,
                                            shard_digest="cd" * 32, tensors=[
        M.ManifestTensor(name="blk.0.attn_q.weight", ggml_type=3, ne=[32, 2], dtype="|u1", shape=[2, 4], rows=(0, 2),
                         offset=0, nbytes=8)]),
    MsgType.SHARD_FETCH: M.ShardFetch(index=1),
    MsgType.SHARD_CHUNK: M.ShardChunk(index=1, offset=4, data=b"\x00\x01\x02\x03", sha256="ef" * 32),
    MsgType.ERROR: P.error(ErrorCode.INVALID_REQUEST, "max_tokens=0: must be an integer >= 1", request_id="r1"),
}


def test_every_message_type_has_a_round_trip_case():
    assert set(BODIES) == set(MsgType)
    assert all(type(body) is P.BODY_TYPES[t] and P.msg_type_of(body) is t for t, body in BODIES.items())


@pytest.mark.parametrize("msg_type", list(MsgType), ids=lambda t: t.name)
def test_round_trip(msg_type):
    frame = P.encode(BODIES[msg_type])
    assert frame[:2] == b"SL" and frame[2:4] == bytes([P.PROTOCOL_MAJOR, P.PROTOCOL_MINOR])
    assert struct.unpack_from("<H", frame, 4)[0] == int(msg_type)
    got_type, body = P.decode(frame)
    assert got_type is msg_type and body == BODIES[msg_type]


def test_a_body_at_its_defaults_is_an_empty_map():
    assert P.encode(M.Health()) == header(MsgType.HEALTH) + b"\x80"
    assert P.decode(header(MsgType.HEALTH) + b"\x80") == (MsgType.HEALTH, M.Health())


def test_defaults_are_not_sent_and_absent_fields_take_them():
    """A running sequence's STEP entry carries no params/history/...; the decoder fills the defaults."""
    entry = M.StepSeq(seq_id=1, start=5, n=1, tokens=P.pack_ids([9]), blocks=b"", reset=False, sample=True)
    sent = msgspec.msgpack.decode(P.encode(M.Step(step_id=3, seqs=[entry]))[P.HEADER_BYTES:])
    assert sent == {"step_id": 3, "seqs": [{"seq_id": 1, "start": 5, "n": 1, "tokens": P.pack_ids([9]),
                                            "blocks": b"", "reset": False, "sample": True}]}
    (got,) = P.decode(raw_frame(MsgType.STEP, sent))[1].seqs
    assert (got.input_step, got.params, got.logprobs, got.prompt_len, got.prompt_logprobs, got.history) == (
        None, None, 0, None, 0, b"")
    # replies whose readers take every key send them all, nil included
    reply = msgspec.msgpack.decode(P.encode(BODIES[MsgType.STATS_REPLY])[P.HEADER_BYTES:])
    assert reply["num_kv_blocks"] is None and reply["workers"][0]["busy_fraction"] is None


def test_error_names_the_code():
    assert P.error(ErrorCode.OVERLOADED, "busy") == M.Error(code=5, code_name="OVERLOADED", message="busy")
    assert P.error(ErrorCode.UNAVAILABLE, "x", plan_id=3).plan_id == 3


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
    frame = P.encode(BODIES[msg_type])
    cut = data.draw(st.integers(0, len(frame) - 1))
    raises(frame[:cut])


def test_short_header_message():
    raises(b"SL\x01", match="shorter than the 6-byte header")


def test_bad_magic():
    raises(header(magic=b"XY") + msgpack.packb({}), match="bad magic")


def test_other_major_version_names_both_versions():
    err = raises(header(major=9, minor=3) + msgpack.packb({}), ErrorCode.VERSION_MISMATCH)
    assert "9.3" in str(err) and f"{P.PROTOCOL_MAJOR}.{P.PROTOCOL_MINOR}" in str(err)
    raises(header(major=1, minor=2) + msgpack.packb({}), ErrorCode.VERSION_MISMATCH)  # the previous major


def test_newer_minor_version_is_accepted_with_unknown_fields():
    frame = header(MsgType.CANCEL, minor=P.PROTOCOL_MINOR + 7) + msgpack.packb(
        {"request_id": "r", "added_in_a_later_minor": [1, {"deep": [2]}]})
    assert P.decode(frame) == (MsgType.CANCEL, M.Cancel(request_id="r"))


@pytest.mark.parametrize("mtype", [0, 62, 63, 76, 254, 65535])
def test_unknown_type(mtype):
    err = raises(header(mtype) + msgpack.packb({}), ErrorCode.UNKNOWN_TYPE)
    assert str(mtype) in str(err)


def test_a_type_not_valid_on_the_plane_is_unknown_there():
    frame = P.encode(BODIES[MsgType.DONE])
    err = raises(frame, ErrorCode.UNKNOWN_TYPE, accept=P.CLIENT_REQUESTS)
    assert "DONE" in str(err) and "not valid on this plane" in str(err)
    raises(P.encode(M.Generate(request_id="r")), ErrorCode.UNKNOWN_TYPE, accept=P.WORKER_REQUESTS)
    assert P.decode(P.encode(M.Health()), accept=P.CLIENT_REQUESTS)[0] is MsgType.HEALTH


@pytest.mark.parametrize("body", [[1, 2], "text", 5, None, b"raw", True], ids=repr)
def test_body_must_be_a_map(body):
    raises(header(MsgType.HEALTH) + msgpack.packb(body, use_bin_type=True), match="HEALTH: Expected `object`")


@pytest.mark.parametrize("msg_type, body", [
    (MsgType.HEALTH, b"\x81\x01\x01"),  # {1: 1}
    (MsgType.HEALTH, b"\x81\xc4\x01k\x01"),  # {b"k": 1}
    (MsgType.HEALTH, b"\x81\xc0\x01"),  # {None: 1}
    (MsgType.HEALTH, b"\x81\x91\x01\x01"),  # {[1]: 1}
    (MsgType.GENERATE, b"\x82\xaarequest_id\xa1r\xa6params\x81\x01\x01"),  # {..., "params": {1: 1}}
    (MsgType.GENERATE, b"\x82\xaarequest_id\xa1r\xa6params\x81\x81\xa1a\x01\x01"),  # params: {{"a": 1}: 1}
], ids=["int", "bytes", "nil", "array", "nested-int", "nested-map"])
def test_map_keys_must_be_strings(msg_type, body):
    raises(header(msg_type) + body)


@pytest.mark.parametrize("body", [b"", b"\xc1", b"\x80\x80", b"\x81\xa1k", b"\xd5\xff\x00\x00"],
                         ids=["empty", "reserved-byte", "extra-data", "missing-value", "bad-timestamp"])
def test_malformed_msgpack(body):
    raises(header(MsgType.HEALTH) + body, match="HEALTH")


def test_oversized_frame_is_refused_before_decoding():
    frame = P.encode(M.Generate(request_id="r", prompt="x" * 100))
    raises(frame, max_bytes=len(frame) - 1, match=f"exceeds the limit of {len(frame) - 1} bytes")
    assert P.decode(frame, max_bytes=len(frame))[1].prompt == "x" * 100
    big = P.encode(M.Generate(request_id="r", prompt_token_ids=b"\0" * P.MAX_CLIENT_FRAME_BYTES))
    raises(big, max_bytes=P.MAX_CLIENT_FRAME_BYTES, match="exceeds the limit")


@pytest.mark.parametrize("depth", [2_000, 200_000])
@pytest.mark.parametrize("opener", [b"\x91", b"\x81\xa1k"], ids=["arrays", "maps"])
def test_deeply_nested_body_is_refused(opener, depth):
    raises(header(MsgType.HEALTH) + b"\x81\xa1k" + opener * depth + b"\xc0")  # an unknown field
    params = b"\x82\xaarequest_id\xa1r\xa6params\x81\xa1k"  # {"request_id": "r", "params": {"k": ...}}
    raises(header(MsgType.GENERATE) + params + opener * depth + b"\xc0")


@pytest.mark.parametrize("prefix", [
    b"\xdd",  # array 32
    b"\xdf",  # map 32
    b"\xc6",  # bin 32
    b"\xdb",  # str 32
    b"\xc9",  # ext 32
], ids=["array32", "map32", "bin32", "str32", "ext32"])
@pytest.mark.parametrize("declared", [2**31, 2**32 - 1, P.MAX_FRAME_BYTES - 1])
def test_huge_declared_lengths_are_refused_without_allocating(prefix, declared):
    """A header claiming billions of elements or bytes in a small frame: refused, quickly, in an
    unknown field, in a typed one, in a free-form one and as the body itself."""
    length = prefix + struct.pack(">I", declared) + b"\x01" * 64
    raises(header(MsgType.HEALTH) + b"\x81\xa1k" + length)
    raises(header(MsgType.HEALTH) + b"\x81\xaarequest_id" + length)
    raises(header(MsgType.GENERATE) + b"\x82\xaarequest_id\xa1r\xa6params" + length)
    raises(header(MsgType.HEALTH) + prefix + struct.pack(">I", declared) + b"\x00" * 64)


def test_element_count_limit_scales_with_the_frame():
    """A frame holds at most one element per byte, so counts above its size are lies."""
    arr16 = b"\x82\xa7step_id\x01\xa4free\xdc" + struct.pack(">H", 60000) + b"\x01" * 100
    raises(header(MsgType.STEP) + arr16, match="truncated")
    honest = P.encode(M.Step(step_id=0, seqs=[], free=list(range(5000))))
    assert P.decode(honest)[1].free == list(range(5000))


@given(st.binary(max_size=64))
@settings(max_examples=300, deadline=None)
def test_random_bodies_decode_or_raise_protocol_error(body):
    try:
        msg_type, decoded = P.decode(header() + body)
    except ProtocolError as exc:
        assert exc.code is ErrorCode.BAD_FRAME and "GENERATE" in str(exc)
    else:
        assert msg_type is MsgType.GENERATE and isinstance(decoded, M.Generate)
        assert isinstance(decoded.request_id, str)


# ---- typed bodies ------------------------------------------------------------------------------


@pytest.mark.parametrize("msg_type, body, words", [
    (MsgType.GENERATE, {"prompt": "x"}, "Object missing required field `request_id`"),
    (MsgType.GENERATE, {"request_id": 7}, "Expected `str`, got `int` - at `$.request_id`"),
    (MsgType.GENERATE, {"request_id": "r", "logprobs": True}, "Expected `int | null`, got `bool` - at `$.logprobs`"),
    (MsgType.GENERATE, {"request_id": "r", "stream": 1}, "Expected `bool`, got `int` - at `$.stream`"),
    (MsgType.GENERATE, {"request_id": "r", "messages": [{"role": "user", "content": None}]},
     "Expected `str`, got `None` - at `$.messages[0].content`"),
    (MsgType.STEP, {"step_id": 1}, "Object missing required field `seqs`"),
    (MsgType.STEP, {"step_id": 1, "seqs": [{"seq_id": 1}]}, "Object missing required field `start` - at `$.seqs[0]`"),
    (MsgType.STEP_RESULT, {"step_id": 1, "seq_ids": b"", "tokens": b"", "logprobs": [[0.5, [[1, 0.5, 3]]]]},
     "Expected `array` of length 2, got 3 - at `$.logprobs[0][1][0]`"),
    (MsgType.ASSIGN, {**msgspec.to_builtins(BODIES[MsgType.ASSIGN], builtin_types=(bytes,)), "dtype": "float64"},
     "Invalid enum value 'float64' - at `$.dtype`"),
])
def test_a_wrong_body_is_refused_naming_the_message_type_and_the_field(msg_type, body, words):
    err = raises(raw_frame(msg_type, body))
    assert str(err) == f"{msg_type.name}: {words}"


def test_numbers_are_strict():
    """An int field takes no bool or float; a float field takes an int (as a float)."""
    raises(raw_frame(MsgType.SHARD_FETCH, {"index": True}), match=r"got `bool` - at `\$.index`")
    raises(raw_frame(MsgType.SHARD_FETCH, {"index": 1.0}), match=r"got `float` - at `\$.index`")
    beat = P.decode(raw_frame(MsgType.HEARTBEAT, {"busy_s": 3}))[1]
    assert beat.busy_s == 3.0 and type(beat.busy_s) is float


@pytest.mark.parametrize("value, words", [
    (msgpack.ExtType(5, b"x"), "`params`: Ext values are not part of the protocol"),
    (msgpack.Timestamp(1), "`params`: timestamp values are not part of the protocol"),
    ({1: 2}, "`params`: map keys must be strings, got int"),
    ([[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]], f"`params` nests deeper than {P.MAX_DEPTH} levels"),  # 16 arrays: 18 levels
], ids=["ext", "timestamp", "int-key", "deep"])
def test_free_form_values_are_plain_and_shallow(value, words):
    err = raises(raw_frame(MsgType.GENERATE, {"request_id": "r", "params": {"v": value}}))
    assert str(err) == f"GENERATE: {words}"
    err = raises(raw_frame(MsgType.STEP, {"step_id": 1, "seqs": [{
        "seq_id": 1, "start": 0, "n": 1, "tokens": b"", "blocks": b"", "reset": True, "sample": True,
        "params": {"v": value}}]}))
    assert str(err) == f"STEP: {words} - at `$.seqs[0]`"  # the path of the entry holding the field


def test_free_form_values_within_the_limit_are_accepted():
    params = {"v": [[[[[[[[[[[[[[1]]]]]]]]]]]]]], "s": ["x"], "n": None, "b": b"\x00"}  # 14 arrays: 16 levels
    assert P.decode(raw_frame(MsgType.GENERATE, {"request_id": "r", "params": params}))[1].params == params


def test_request_id_of_a_body_that_did_not_decode():
    assert P.request_id_of(raw_frame(MsgType.GENERATE, {"request_id": "r7", "stream": 1})) == "r7"
    assert P.request_id_of(raw_frame(MsgType.GENERATE, {"request_id": 7})) == ""
    assert P.request_id_of(raw_frame(MsgType.GENERATE, {"request_id": "r" * 129})) == ""
    assert P.request_id_of(header() + b"\xc1") == "" and P.request_id_of(b"SL") == ""


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
