"""Wire protocol for the client and worker planes (docs/protocol.md is the spec).

Every ZeroMQ message is one frame (a ROUTER adds the peer identity in front of it):

    offset  size  field
    0       2     magic  b"SL"
    2       1     protocol major version
    3       1     protocol minor version
    4       2     message type (uint16, little-endian), see `MsgType`
    6       ...   msgpack body: a map with string keys

Token-id arrays travel as packed little-endian int32 bytes (`pack_ids` / `unpack_ids`). A peer
with another major version is refused with an ERROR naming both versions; a newer minor version
is accepted (fields are only ever added). No pickle anywhere.
"""

from __future__ import annotations

import enum
import struct
from typing import Any

import msgpack
import numpy as np

MAGIC = b"SL"
PROTOCOL_MAJOR = 1
PROTOCOL_MINOR = 2  # 1.1: shard transfer (SHARD_*), model digest in REGISTER/ASSIGN, MODEL_MISMATCH;
# 1.2: DRAIN_WORKER / DRAIN_WORKER_REPLY (move one worker's work elsewhere), SHUTDOWN `reason`
HEADER = struct.Struct("<2sBBH")
HEADER_BYTES = HEADER.size

# Limits applied when decoding anything a peer sent (see docs/protocol.md, "Limits").
MAX_FRAME_BYTES = 64 * 1024 * 1024  # weight chunks are the largest messages
MAX_CLIENT_FRAME_BYTES = 8 * 1024 * 1024
MAX_PROMPT_TOKENS = 1 << 20
MAX_DEPTH = 16  # deepest nesting of maps/lists in a body (the deepest real message, STEP_RESULT, has 6)
SHARD_CHUNK_BYTES = 4 * 1024 * 1024  # weight bytes per SHARD_CHUNK (a frame stays far below MAX_FRAME_BYTES)
SHARD_WINDOW = 4  # SHARD_FETCHes a worker keeps outstanding (bounds the coordinator's send queue)


class MsgType(enum.IntEnum):
    """Message types. 1-63: client plane; 64-127: worker plane; 255: either."""

    # client plane
    GENERATE = 1
    ACCEPTED = 2
    DELTA = 3
    DONE = 4
    CANCEL = 5
    HEALTH = 6
    HEALTH_REPLY = 7
    STATS = 8
    STATS_REPLY = 9
    MODELS = 10
    MODELS_REPLY = 11
    DRAIN_WORKER = 12  # client -> coordinator: re-plan without this worker, then shut it down
    DRAIN_WORKER_REPLY = 13  # coordinator -> client: the drain is done (the new plan serves)
    # worker plane
    REGISTER = 64
    ASSIGN = 65
    READY = 66
    STEP = 67
    STEP_RESULT = 68
    HEARTBEAT = 69
    SHUTDOWN = 71
    SHARD_REQUEST = 72  # worker -> coordinator: send me my shard's tensors
    SHARD_MANIFEST = 73  # coordinator -> worker: the tensors, their slices and offsets, digests
    SHARD_FETCH = 74  # worker -> coordinator: chunk `index`, please
    SHARD_CHUNK = 75  # coordinator -> worker: bytes [offset, offset + len) of the shard stream + sha256
    # both
    ERROR = 255


class ErrorCode(enum.IntEnum):
    """Error codes carried in ERROR and DONE messages."""

    BAD_FRAME = 1  # malformed header, body or schema
    VERSION_MISMATCH = 2
    UNKNOWN_TYPE = 3
    INVALID_REQUEST = 4  # a field out of range, a prompt too long
    OVERLOADED = 5
    UNAVAILABLE = 6  # no workers / cluster not ready
    INTERNAL = 7
    CANCELLED = 8
    NOT_FOUND = 9
    MODEL_MISMATCH = 10  # the worker's model file is not the coordinator's (digests differ)


class ProtocolError(ValueError):
    """A frame that cannot be decoded; `code` is the `ErrorCode` to answer with."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.BAD_FRAME):
        super().__init__(message)
        self.code = code


def encode(msg_type: MsgType, body: dict[str, Any] | None = None) -> bytes:
    """Encode one message: header + msgpack body."""
    return HEADER.pack(MAGIC, PROTOCOL_MAJOR, PROTOCOL_MINOR, int(msg_type)) + msgpack.packb(
        body or {}, use_bin_type=True
    )


def decode(frame: bytes, max_bytes: int = MAX_FRAME_BYTES) -> tuple[MsgType, dict[str, Any]]:
    """Decode one frame into (type, body).

    Raises:
        ProtocolError: too large, too short, bad magic, other major version, unknown type, or a
            body that is not a msgpack map with string keys.
    """
    if len(frame) > max_bytes:
        raise ProtocolError(f"frame of {len(frame)} bytes exceeds the limit of {max_bytes} bytes")
    if len(frame) < HEADER_BYTES:
        raise ProtocolError(f"frame of {len(frame)} bytes is shorter than the {HEADER_BYTES}-byte header")
    magic, major, minor, mtype = HEADER.unpack_from(frame)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {magic!r}, expected {MAGIC!r}")
    if major != PROTOCOL_MAJOR:
        raise ProtocolError(
            f"protocol version {major}.{minor} is not supported; this peer speaks {PROTOCOL_MAJOR}.{PROTOCOL_MINOR}",
            ErrorCode.VERSION_MISMATCH,
        )
    try:
        msg_type = MsgType(mtype)
    except ValueError:
        raise ProtocolError(f"unknown message type {mtype}", ErrorCode.UNKNOWN_TYPE) from None
    n = len(frame) - HEADER_BYTES
    try:
        # Every declared length is capped by the body's size (a str/bin of k bytes needs k body
        # bytes, an array of k items at least k, a map of k pairs 2k), so a hostile length prefix
        # is refused before anything is allocated; ext types are not part of the protocol. (The
        # buffer itself is bounded by `max_bytes` above and by ZMQ_MAXMSGSIZE on the sockets.)
        body = msgpack.unpackb(
            memoryview(frame)[HEADER_BYTES:],
            raw=False,
            strict_map_key=True,
            max_str_len=n,
            max_bin_len=n,
            max_array_len=n,
            max_map_len=n // 2,
            max_ext_len=0,
        )
    except (ValueError, TypeError, msgpack.exceptions.ExtraData, msgpack.exceptions.UnpackException,
            RecursionError) as exc:
        raise ProtocolError(f"malformed msgpack body for {msg_type.name}: {exc or type(exc).__name__}") from None
    if not isinstance(body, dict):
        raise ProtocolError(f"{msg_type.name} body must be a map, got {type(body).__name__}")
    if not all(isinstance(k, str) for k in body):  # strict_map_key still lets bytes keys through
        raise ProtocolError(f"{msg_type.name} body must be a map with string keys")
    check_depth(body, MAX_DEPTH, msg_type.name)
    return msg_type, body


def check_depth(obj: Any, max_depth: int = MAX_DEPTH, what: str = "message") -> None:
    """Refuse maps/lists nested deeper than `max_depth` (iterative, so a hostile body cannot
    exhaust the stack of whoever walks it later).

    Raises:
        ProtocolError: BAD_FRAME naming the depth limit.
    """
    stack = [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if d > max_depth:
            raise ProtocolError(f"{what} body nests deeper than {max_depth} levels")
        if isinstance(o, dict):
            stack.extend((v, d + 1) for v in o.values() if isinstance(v, (dict, list)))
        elif isinstance(o, list):
            stack.extend((v, d + 1) for v in o if isinstance(v, (dict, list)))


# ---- per-message schemas -------------------------------------------------------------------------
# Field name -> (accepted Python types, required). `int` never accepts a bool; `float` accepts an
# int; `bytes` is a msgpack bin; `type(None)` allows nil. Fields not listed are ignored (a newer
# minor version may add them); listed fields must have the listed types.
_NUM = (int, float)
_NIL = type(None)
SCHEMAS: dict[MsgType, dict[str, tuple[tuple[type, ...], bool]]] = {
    MsgType.GENERATE: {"request_id": ((str,), True), "prompt": ((str,), False), "messages": ((list,), False),
                       "prompt_token_ids": ((bytes,), False), "params": ((dict, _NIL), False),
                       "stream": ((bool,), False), "logprobs": ((int, _NIL), False),
                       "prompt_logprobs": ((int, _NIL), False)},
    MsgType.CANCEL: {"request_id": ((str,), True)},
    MsgType.HEALTH: {"request_id": ((str,), False)},
    MsgType.STATS: {"request_id": ((str,), False)},
    MsgType.MODELS: {"request_id": ((str,), False)},
    MsgType.DRAIN_WORKER: {"request_id": ((str,), False), "worker_id": ((str,), True)},
    MsgType.SHUTDOWN: {"reason": ((str,), False)},
    MsgType.REGISTER: {"worker_id": ((str,), True), "incarnation": ((str,), False), "host": ((str,), True),
                       "device": ((str,), True), "memory_bytes": ((int,), True), "version": ((str,), True),
                       "pid": ((int,), False), "threads": ((int,), False), "price_per_hour": ((*_NUM, _NIL), False),
                       "speed": (_NUM, False), "model_digest": ((str,), False), "model_path": ((str,), False),
                       "protocol": ((str,), False)},
    MsgType.READY: {"worker_id": ((str,), True), "weight_bytes": ((int,), False), "rss_bytes": ((int,), False),
                    "kv_bytes": ((int,), False), "load_s": (_NUM, False), "generation": ((int,), False)},
    MsgType.STEP_RESULT: {"step_id": ((int,), True), "seq_ids": ((bytes,), True), "tokens": ((bytes,), True),
                          "forward_s": (_NUM, False), "logprobs": ((list, _NIL), False),
                          "prompt_logprobs": ((list, _NIL), False)},
    MsgType.HEARTBEAT: {"worker_id": ((str,), False), "incarnation": ((str,), False), "num_steps": ((int,), False),
                        "step_time_s": (_NUM, False), "rss_bytes": ((int,), False), "busy_s": (_NUM, False),
                        "step_times_s": ((list,), False), "time": (_NUM, False)},
    MsgType.ASSIGN: {"rank": ((int,), True), "world_size": ((int,), True), "stage": ((int,), True),
                     "pp_size": ((int,), True), "tp_rank": ((int,), True), "tp_size": ((int,), True),
                     "layer_start": ((int,), True), "layer_end": ((int,), True), "spec": ((dict,), True),
                     "num_kv_blocks": ((int,), True), "block_size": ((int,), True), "store_port": ((int,), True),
                     "store_host": ((str,), True), "store_prefix": ((str,), True), "generation": ((int,), False)},
    MsgType.STEP: {"step_id": ((int,), True), "seqs": ((list,), True), "free": ((list,), False)},
    MsgType.SHARD_REQUEST: {"worker_id": ((str,), True), "model_digest": ((str,), True), "reason": ((str,), False)},
    MsgType.SHARD_MANIFEST: {"model_digest": ((str,), True), "format": ((str,), False), "tensors": ((list,), True),
                             "total_bytes": ((int,), True),
                             "chunk_bytes": ((int,), True), "num_chunks": ((int,), True),
                             "shard_digest": ((str,), True)},
    MsgType.SHARD_FETCH: {"index": ((int,), True)},
    MsgType.SHARD_CHUNK: {"index": ((int,), True), "offset": ((int,), True), "data": ((bytes,), True),
                          "sha256": ((str,), True)},
    MsgType.ERROR: {"code": ((int,), False), "code_name": ((str,), False), "message": ((str,), False),
                    "request_id": ((str,), False)},
}

CLIENT_REQUESTS = frozenset({MsgType.GENERATE, MsgType.CANCEL, MsgType.HEALTH, MsgType.STATS, MsgType.MODELS,
                             MsgType.DRAIN_WORKER})
"""Message types a client may send the coordinator; anything else on the client plane is UNKNOWN_TYPE."""


def validate(msg_type: MsgType, body: dict[str, Any]) -> dict[str, Any]:
    """Check `body` against `SCHEMAS[msg_type]` (types without a schema pass). Returns `body`.

    Raises:
        ProtocolError: BAD_FRAME naming the message type, the field and the expected type.
    """
    schema = SCHEMAS.get(msg_type)
    if schema is None:
        return body
    for key, (types, required) in schema.items():
        if key not in body:
            if required:
                raise ProtocolError(f"{msg_type.name}: missing field {key!r}")
            continue
        v = body[key]
        if not isinstance(v, types) or (isinstance(v, bool) and bool not in types):
            names = "/".join("nil" if t is _NIL else "bin" if t is bytes else t.__name__ for t in types)
            raise ProtocolError(f"{msg_type.name}: field {key!r} must be {names}, got {type(v).__name__}")
    return body


def pack_ids(ids) -> bytes:
    """Token ids -> packed little-endian int32 bytes."""
    return np.asarray(ids, dtype="<i4").tobytes()


def unpack_ids(data: bytes, max_len: int = MAX_PROMPT_TOKENS) -> list[int]:
    """Packed little-endian int32 bytes -> list of token ids.

    Raises:
        ProtocolError: not bytes, a length not a multiple of 4, or more than `max_len` ids.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"token ids must be packed int32 bytes, got {type(data).__name__}")
    if len(data) % 4:
        raise ProtocolError(f"packed token ids have {len(data)} bytes, not a multiple of 4")
    if len(data) // 4 > max_len:
        raise ProtocolError(f"{len(data) // 4} token ids exceed the limit of {max_len}")
    return np.frombuffer(data, dtype="<i4").tolist()


def error_body(code: ErrorCode, message: str, **extra) -> dict[str, Any]:
    return {"code": int(code), "code_name": code.name, "message": message, **extra}


def require(body: dict, key: str, types, msg_type: str = "message"):
    """Return body[key] after checking its type; raises ProtocolError naming the field."""
    if key not in body:
        raise ProtocolError(f"{msg_type}: missing field {key!r}")
    value = body[key]
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
        names = "/".join(t.__name__ for t in _as_tuple(types))
        raise ProtocolError(f"{msg_type}: field {key!r} must be {names}, got {type(value).__name__}")
    return value


def _as_tuple(types):
    return types if isinstance(types, tuple) else (types,)
