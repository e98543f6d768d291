"""Hostile input on both planes: at least 10,000 malformed frames to the client plane and to the
worker plane of a live cluster (truncated headers, bad magic, other protocol versions, unknown and
misplaced message types, broken msgpack, bodies that are not maps, deep nesting, huge declared
lengths, ext types, invalid UTF-8, wrong field types, out-of-range parameters, multi-part and
oversized frames, spoofed worker messages).

Checked: the coordinator answers each frame with an ERROR naming the problem (or drops it where
the protocol says so: an empty frame, a frame over the size limit), stays up, its resident memory
and file descriptors stay flat, the workers are still alive, and a normal greedy request afterwards
gives the same tokens as before the fuzzing. The frames come from a seeded generator, so a failure
reproduces.
"""

from __future__ import annotations

import random
import struct
import time
import uuid

import msgpack
import pytest
import zmq

from shardline import protocol as P
from shardline.protocol import ErrorCode, MsgType
from tests.integration.conftest import pp_config

N_FRAMES = 10_000  # per plane
BATCH = 250  # frames sent before their replies are read (stays far below the high-water marks)
RSS_GROWTH_LIMIT = 32 * 2**20  # bytes the coordinator may grow over 10,000 frames (allocator noise)

HEADER = struct.Struct("<2sBBH")
CLIENT_TYPES = [MsgType.GENERATE, MsgType.CANCEL, MsgType.HEALTH, MsgType.STATS, MsgType.MODELS]
WORKER_TYPES = [MsgType.REGISTER, MsgType.READY, MsgType.STEP_RESULT, MsgType.HEARTBEAT, MsgType.ERROR]


def _hdr(t: int, major: int = P.PROTOCOL_MAJOR, minor: int = P.PROTOCOL_MINOR, magic: bytes = b"SL") -> bytes:
    return HEADER.pack(magic, major, minor, t)


def _nested(depth: int) -> bytes:
    """A map {"a": [[[...nil...]]]} nested `depth` lists deep."""
    return b"\x81\xa1a" + b"\x91" * depth + b"\xc0"


def _huge_length(rng: random.Random) -> bytes:
    """A body declaring a str/bin/array/map/ext of ~4 GiB that the frame does not hold."""
    prefix = rng.choice([b"\xdb", b"\xc6", b"\xdd", b"\xdf", b"\xc9"])  # str32 bin32 array32 map32 ext32
    return b"\x81\xa1a" + prefix + struct.pack(">I", rng.choice([0xFFFFFFFF, 0x7FFFFFFF, 1 << 30]))


def _bad_fields(rng: random.Random, t: MsgType) -> dict:
    """A body of type `t` with one required field missing or of the wrong type."""
    good = {
        MsgType.GENERATE: {"request_id": "r", "prompt": "hi", "params": {"max_tokens": 2}},
        MsgType.CANCEL: {"request_id": "r"},
        MsgType.REGISTER: {"worker_id": "w", "host": "h", "device": "cpu", "memory_bytes": 1, "version": "0.0"},
        MsgType.READY: {"worker_id": "w"},
        MsgType.STEP_RESULT: {"step_id": 1, "seq_ids": b"", "tokens": b""},
        MsgType.HEARTBEAT: {"worker_id": "local-0", "incarnation": "x"},
    }[t]
    body = dict(good)
    key = rng.choice(sorted(body))
    if rng.random() < 0.3 and key != "params":  # params is optional: removing it leaves a valid request
        del body[key]
    else:
        body[key] = rng.choice([12345, -1, 1.5, True, None, [1, 2], {"x": 1}, b"\xff\xfe", "s" * rng.randint(0, 40)])
        if (isinstance(good[key], type(body[key])) and not isinstance(body[key], bool)) or (
                key == "params" and body[key] is None):
            body[key] = [good[key]]  # a valid value by chance (same type, or nil params): make it wrong
    return body


def _bad_generate(rng: random.Random) -> dict:
    """GENERATE with a well-typed body but an invalid value (the coordinator must name it)."""
    rid = uuid.uuid4().hex
    return rng.choice([
        {"request_id": rid, "prompt": "x", "params": {"temperature": -1.0}},
        {"request_id": rid, "prompt": "x", "params": {"max_tokens": 0}},
        {"request_id": rid, "prompt": "x", "params": {"no_such_param": 1}},
        {"request_id": rid, "prompt": "x", "params": {"top_p": 7}},
        {"request_id": rid, "prompt": "x", "params": {"stop": [""] * 100}},
        {"request_id": rid, "prompt_token_ids": b"\x01\x02\x03"},  # not a multiple of 4
        {"request_id": rid, "prompt_token_ids": struct.pack("<3i", 1, -5, 10**9)},  # ids out of the vocabulary
        {"request_id": rid, "messages": [{"role": 1, "content": None}]},
        {"request_id": rid, "messages": "not a list"},
        {"request_id": rid},  # no prompt at all
        {"request_id": "", "prompt": "x"},
        {"request_id": "r" * 200, "prompt": "x"},
        {"request_id": rid, "prompt": "x", "logprobs": 1000},
    ])


def hostile_frame(rng: random.Random, plane: str) -> tuple[list[bytes], bool]:
    """One hostile message (list of ZeroMQ frames) and whether the coordinator must answer it."""
    types = CLIENT_TYPES if plane == "client" else WORKER_TYPES
    other = WORKER_TYPES if plane == "client" else [MsgType.GENERATE, MsgType.HEALTH, MsgType.DONE]
    t = rng.choice(types)
    kind = rng.randrange(17)
    if kind == 0:  # truncated header (at least 1 byte: an empty frame means "peer gone")
        return [_hdr(t)[: rng.randint(1, 5)]], True
    if kind == 1:
        return [_hdr(t, magic=rng.choice([b"XX", b"\x00\x00", b"LS"])) + b"\x80"], True
    if kind == 2:  # another major version
        return [_hdr(t, major=rng.choice([0, 2, 9, 255])) + b"\x80"], True
    if kind == 3:  # an unknown type number
        return [_hdr(rng.choice([0, 62, 63, 100, 200, 254, 65535])) + b"\x80"], True
    if kind == 4:  # a type of the other plane, or a reply type
        return [_hdr(rng.choice(other)) + msgpack.packb({"request_id": "x"})], True
    if kind == 5:  # truncated or garbage msgpack
        body = msgpack.packb({"request_id": "r", "prompt": "hello" * 10})
        return [_hdr(t) + body[: rng.randint(1, len(body) - 1)]], True
    if kind == 6:  # a body that is not a map
        return [_hdr(t) + msgpack.packb(rng.choice([[1, 2, 3], 7, "str", b"bin", None, 1.5, True]))], True
    if kind == 7:  # deep nesting, within and beyond msgpack's own stack limit
        return [_hdr(t) + _nested(rng.choice([17, 64, 500, 2000, 5000]))], True
    if kind == 8:
        return [_hdr(t) + _huge_length(rng)], True
    if kind == 9:  # ext types (timestamps included) are not part of the protocol
        return [_hdr(t) + b"\x81\xa1a" + rng.choice([b"\xd4\x05\x00", b"\xd6\xff\x00\x00\x00\x01", b"\xc7\x02\x01ab"])], True
    if kind == 10:  # invalid UTF-8 in a str
        return [_hdr(t) + b"\x81\xa1a\xa2\xff\xfe"], True
    if kind == 11:  # non-string map keys
        return [_hdr(t) + msgpack.packb({1: 2, b"k": "v"}, use_bin_type=True)], True
    if kind == 12:  # wrong field types or a missing required field
        tt = rng.choice([x for x in types if x is not MsgType.ERROR and x is not MsgType.HEALTH
                         and x is not MsgType.STATS and x is not MsgType.MODELS])
        return [_hdr(tt) + msgpack.packb(_bad_fields(rng, tt), use_bin_type=True)], True
    if kind == 13:  # random bytes after a valid header
        return [_hdr(t) + rng.randbytes(rng.randint(1, 300))], True
    if kind == 14:  # several frames in one message
        return [_hdr(t) + b"\x80"] * rng.randint(2, 4), True
    if kind == 15:  # random bytes, no header at all
        return [rng.randbytes(rng.randint(1, 64))], True
    # kind 16: well-formed but invalid on this plane
    if plane == "client":
        return [_hdr(MsgType.GENERATE) + msgpack.packb(_bad_generate(rng), use_bin_type=True)], True
    spoof = rng.choice([  # worker messages from a peer that never registered, or a refused REGISTER
        (MsgType.STEP_RESULT, {"step_id": 0, "seq_ids": P.pack_ids([0]), "tokens": P.pack_ids([1])}),
        (MsgType.READY, {"worker_id": "local-0", "plan_id": 1}),
        (MsgType.HEARTBEAT, {"worker_id": "local-0", "incarnation": "not-its-incarnation"}),
        (MsgType.ERROR, {"code": int(ErrorCode.UNAVAILABLE), "code_name": "UNAVAILABLE",
                         "message": "spoofed data-plane failure"}),
        (MsgType.REGISTER, {"worker_id": "fuzz", "host": "h", "device": "cpu", "memory_bytes": 1, "version": "0.0.0"}),
    ])
    return [_hdr(spoof[0]) + msgpack.packb(spoof[1], use_bin_type=True)], True


def _process_stats(client) -> dict:
    return client.stats()["coordinator"]


def _fire(address: str, plane: str, seed: int) -> tuple[int, int, dict]:
    """Send N_FRAMES hostile messages from a few sockets, read the replies. Returns (frames that
    must be answered, ERROR replies received, {error code name: count})."""
    rng = random.Random(seed)
    ctx = zmq.Context.instance()
    socks = []
    for _ in range(8):  # several peers; on the worker plane, identities that never registered
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.ROUTING_ID, b"fuzz-" + uuid.uuid4().hex.encode())
        s.connect(address)
        socks.append(s)
    expected = got = 0
    codes: dict[str, int] = {}
    try:
        for start in range(0, N_FRAMES, BATCH):
            owed = [0] * len(socks)
            for i in range(start, min(start + BATCH, N_FRAMES)):
                k = i % len(socks)
                frames, answered = hostile_frame(rng, plane)
                socks[k].send_multipart(frames)
                owed[k] += answered
                expected += answered
            for k, s in enumerate(socks):  # every answer of this batch, or a timeout
                deadline = time.monotonic() + 20.0
                while owed[k] and time.monotonic() < deadline:
                    if s.poll(200):
                        msg_type, body = P.decode(s.recv())
                        if msg_type in (MsgType.HEALTH_REPLY, MsgType.STATS_REPLY, MsgType.MODELS_REPLY):
                            name = msg_type.name  # random bytes that happen to be a valid empty map
                        else:
                            assert msg_type is MsgType.ERROR, (msg_type, body)
                            assert body.message, body  # the error says what was wrong
                            name = body.code_name
                        codes[name] = codes.get(name, 0) + 1
                        owed[k] -= 1
                        got += 1
    finally:
        for s in socks:
            s.close(linger=0)
    return expected, got, codes


def _oversized(address: str) -> None:
    """Frames over the plane's limit: ZMQ_MAXMSGSIZE drops the connection, nothing is answered."""
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(address)
    try:
        big = _hdr(MsgType.GENERATE) + msgpack.packb({"request_id": "big", "prompt": "x" * (P.MAX_CLIENT_FRAME_BYTES + 10)})
        for _ in range(3):
            s.send(big)
        assert not s.poll(1000), "an oversized frame was answered instead of dropped"
    finally:
        s.close(linger=0)


@pytest.fixture(scope="module")
def cluster(clusters):
    return clusters.get(pp_config(2))


def test_fuzz_both_planes(cluster):
    client = cluster.client
    prompt = "The three primary colors are"
    before = client.generate(prompt, max_tokens=12, temperature=0)
    _fire(cluster.address, "client", seed=99)  # warm-up: allocator pools and log buffers settle
    base = _process_stats(client)

    t0 = time.monotonic()
    expected, got, codes = _fire(cluster.address, "client", seed=1)
    assert got == expected, f"client plane: {expected - got} of {expected} hostile frames unanswered"
    assert {"BAD_FRAME", "VERSION_MISMATCH", "UNKNOWN_TYPE", "INVALID_REQUEST"} <= set(codes), codes
    _oversized(cluster.address)
    w_addr = cluster.config.worker_address
    w_expected, w_got, w_codes = _fire(w_addr, "worker", seed=2)
    assert w_got == w_expected, f"worker plane: {w_expected - w_got} of {w_expected} hostile frames unanswered"
    assert {"BAD_FRAME", "VERSION_MISMATCH", "UNKNOWN_TYPE"} <= set(w_codes), w_codes
    elapsed = time.monotonic() - t0

    # the fuzzing sockets were just closed: the coordinator's ZeroMQ I/O thread closes its ends of
    # those connections when it sees them go (a CI run read 39 fds against 33 right away)
    deadline = time.monotonic() + 15.0
    after = _process_stats(client)
    while after["num_fds"] > base["num_fds"] + 4 and time.monotonic() < deadline:
        time.sleep(0.1)  # poll interval
        after = _process_stats(client)
    assert after["pid"] == base["pid"], "the coordinator restarted"
    growth = after["rss_bytes"] - base["rss_bytes"]
    assert growth < RSS_GROWTH_LIMIT, f"coordinator RSS grew by {growth / 2**20:.1f} MiB over {2 * N_FRAMES} frames"
    assert after["num_fds"] <= base["num_fds"] + 4, (base, after)
    health = client.health()
    assert health["status"] == "ok" and health["workers_up"] == 2, health
    stats = client.stats()
    assert all(w["alive"] for w in stats["workers"]) and len(stats["workers"]) == 2, stats["workers"]

    again = client.generate(prompt, max_tokens=12, temperature=0)
    assert again.token_ids == before.token_ids
    print(f"\nfuzz: {N_FRAMES} client + {N_FRAMES} worker frames in {elapsed:.1f} s; client errors {codes}; "
          f"worker errors {w_codes}; RSS {base['rss_bytes'] / 2**20:.1f} -> {after['rss_bytes'] / 2**20:.1f} MiB; "
          f"fds {base['num_fds']} -> {after['num_fds']}")


def test_heartbeat_before_register_is_dropped_quietly(cluster):
    """A worker that started before the coordinator bound queues heartbeats on its heartbeat
    socket (routing id `<worker id>#hb`) that can be read before its REGISTER: those are dropped
    without an ERROR (nothing reads that socket; they were logged as bad frames at every
    `shardline launch`). The same HEARTBEAT from any other identity is still answered."""
    body = msgpack.packb({"worker_id": "early-worker", "incarnation": "x"}, use_bin_type=True)
    ctx = zmq.Context.instance()
    socks = {}
    try:
        for name in (b"early-worker#hb", b"someone-else"):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.ROUTING_ID, name)
            s.connect(cluster.config.worker_address)
            s.send(_hdr(MsgType.HEARTBEAT) + body)
            socks[name] = s
        assert socks[b"someone-else"].poll(5000), "the control HEARTBEAT got no ERROR"
        assert P.decode(socks[b"someone-else"].recv())[0] is MsgType.ERROR
        assert not socks[b"early-worker#hb"].poll(500), "an early heartbeat was answered"
        assert cluster.client.health()["status"] == "ok"
    finally:
        for s in socks.values():
            s.close(linger=0)
