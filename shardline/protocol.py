"""Wire protocol for the client and worker planes (docs/protocol.md is the spec): framing, message
types, error codes, limits, and the codec that turns a message body (a struct of
`shardline.messages`) into a frame and back.

Every ZeroMQ message is one frame (a ROUTER adds the peer identity in front of it):

    offset  size  field
    0       2     magic  b"SL"
    2       1     protocol major version
    3       1     protocol minor version
    4       2     message type (uint16, little-endian), see `MsgType`
    6       ...   msgpack body: a map with string keys, the fields of the type's struct

Token-id arrays travel as packed little-endian int32 bytes (`pack_ids` / `unpack_ids`). A peer
with another major version is refused with an ERROR naming both versions; a newer minor version
is accepted (fields are only ever added). No pickle anywhere.
"""

from __future__ import annotations

import enum
import struct

import msgspec
import numpy as np

from shardline import messages as M
from shardline.messages import MAX_DEPTH, Message  # noqa: F401 (MAX_DEPTH: the body nesting limit)

MAGIC = b"SL"
PROTOCOL_MAJOR = 2
PROTOCOL_MINOR = 0  # 2.0: every body a typed struct; plan_id, input_step, token_stream, async_scheduling
HEADER = struct.Struct("<2sBBH")
HEADER_BYTES = HEADER.size

# Limits applied when decoding anything a peer sent (see docs/protocol.md, "Limits").
MAX_FRAME_BYTES = 64 * 1024 * 1024  # weight chunks are the largest messages
MAX_CLIENT_FRAME_BYTES = 8 * 1024 * 1024
MAX_PROMPT_TOKENS = 1 << 20
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


BODY_TYPES: dict[MsgType, type[Message]] = {
    MsgType.GENERATE: M.Generate, MsgType.ACCEPTED: M.Accepted, MsgType.DELTA: M.Delta, MsgType.DONE: M.Done,
    MsgType.CANCEL: M.Cancel, MsgType.HEALTH: M.Health, MsgType.HEALTH_REPLY: M.HealthReply,
    MsgType.STATS: M.Stats, MsgType.STATS_REPLY: M.StatsReply, MsgType.MODELS: M.Models,
    MsgType.MODELS_REPLY: M.ModelsReply, MsgType.DRAIN_WORKER: M.DrainWorker,
    MsgType.DRAIN_WORKER_REPLY: M.DrainWorkerReply, MsgType.REGISTER: M.Register, MsgType.ASSIGN: M.Assign,
    MsgType.READY: M.Ready, MsgType.STEP: M.Step, MsgType.STEP_RESULT: M.StepResult,
    MsgType.HEARTBEAT: M.Heartbeat, MsgType.SHUTDOWN: M.Shutdown, MsgType.SHARD_REQUEST: M.ShardRequest,
    MsgType.SHARD_MANIFEST: M.ShardManifest, MsgType.SHARD_FETCH: M.ShardFetch, MsgType.SHARD_CHUNK: M.ShardChunk,
    MsgType.ERROR: M.Error,
}
"""The body struct of each message type."""

CLIENT_REQUESTS = frozenset({MsgType.GENERATE, MsgType.CANCEL, MsgType.HEALTH, MsgType.STATS, MsgType.MODELS,
                             MsgType.DRAIN_WORKER})
"""Message types a client may send the coordinator; anything else on the client plane is UNKNOWN_TYPE."""

WORKER_REQUESTS = frozenset({MsgType.REGISTER, MsgType.READY, MsgType.STEP_RESULT, MsgType.HEARTBEAT,
                             MsgType.SHARD_REQUEST, MsgType.SHARD_FETCH, MsgType.ERROR})
"""Message types a worker may send the coordinator; anything else on the worker plane is UNKNOWN_TYPE."""

_MSG_TYPE = {cls: t for t, cls in BODY_TYPES.items()}
_HEADERS = {t: HEADER.pack(MAGIC, PROTOCOL_MAJOR, PROTOCOL_MINOR, int(t)) for t in MsgType}
_ENCODER = msgspec.msgpack.Encoder()
_DECODERS = {t: msgspec.msgpack.Decoder(cls) for t, cls in BODY_TYPES.items()}
_REQUEST_REF = msgspec.msgpack.Decoder(M.RequestRef)


def msg_type_of(body: Message) -> MsgType:
    """The message type whose body `body` is."""
    return _MSG_TYPE[type(body)]


def encode(body: Message) -> bytes:
    """Encode one message: the header of `body`'s type + its msgpack body.

    Raises:
        KeyError: `body` is not a message body struct (a bug of the caller).
    """
    return _HEADERS[_MSG_TYPE[type(body)]] + _ENCODER.encode(body)


def read_header(frame: bytes, max_bytes: int = MAX_FRAME_BYTES,
                accept: frozenset[MsgType] | None = None) -> MsgType:
    """Check a frame's size and header; returns its message type.

    Raises:
        ProtocolError: too large or too short (BAD_FRAME), bad magic (BAD_FRAME), another major
            version (VERSION_MISMATCH, naming both), an unknown type or one not in `accept`
            (UNKNOWN_TYPE).
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
    if accept is not None and msg_type not in accept:
        raise ProtocolError(f"{msg_type.name} (type {mtype}) is not valid on this plane", ErrorCode.UNKNOWN_TYPE)
    return msg_type


def decode(frame: bytes, max_bytes: int = MAX_FRAME_BYTES,
           accept: frozenset[MsgType] | None = None) -> tuple[MsgType, Message]:
    """Decode one frame into (type, body struct of that type, `BODY_TYPES`).

    The body is decoded straight into its struct: a missing required field or a value of the
    wrong type is refused with its path. msgspec checks every declared length against the bytes
    left (a hostile length prefix fails before anything is allocated), refuses invalid UTF-8 and
    non-string keys of the body's maps, bounds nesting by the interpreter's recursion limit, and
    skips unknown fields unread; `Any`-typed fields are checked by `messages.check_plain` (plain
    values, at most `MAX_DEPTH` levels). (The buffer itself is bounded by `max_bytes` and by
    ZMQ_MAXMSGSIZE on the sockets.)

    Raises:
        ProtocolError: see `read_header`; BAD_FRAME naming the message type for a body that is
            not valid msgpack, not a map, or not a valid body of its type.
    """
    msg_type = read_header(frame, max_bytes, accept)
    try:
        return msg_type, _DECODERS[msg_type].decode(memoryview(frame)[HEADER_BYTES:])
    except msgspec.ValidationError as exc:
        raise ProtocolError(f"{msg_type.name}: {exc}") from None
    except (msgspec.DecodeError, RecursionError) as exc:
        raise ProtocolError(f"malformed msgpack body for {msg_type.name}: {exc}") from None


def request_id_of(frame: bytes) -> str:
    """The `request_id` of a client request whose body did not decode (to name it in the ERROR),
    or "" when it has none that is a string of at most 128 characters."""
    try:
        rid = _REQUEST_REF.decode(memoryview(frame)[HEADER_BYTES:]).request_id
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
        return ""
    return rid if len(rid) <= 128 else ""


def pack_ids(ids) -> bytes:
    """Token ids (a list, tuple, range or any iterable of ints) -> packed little-endian int32 bytes.
    (struct, not NumPy: a STEP packs two short arrays per sequence, where NumPy's per-call cost
    dominates.)

    Raises:
        struct.error: an id outside int32.
    """
    if not isinstance(ids, (list, tuple, range)):
        ids = list(ids)
    return struct.pack(f"<{len(ids)}i", *ids)


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


def error(code: ErrorCode, message: str, request_id: str = "", plan_id: int | None = None) -> M.Error:
    """An ERROR body with `code` and its name."""
    return M.Error(code=int(code), code_name=code.name, message=message, request_id=request_id, plan_id=plan_id)
