"""Frames built from raw msgpack bodies, for tests of what a decoder refuses (a body that need not
be a valid struct of its type: a field missing, of the wrong type, hostile lengths)."""

from __future__ import annotations

import msgpack

from shardline import protocol as P
from shardline.protocol import MsgType


def header(msg_type: int = int(MsgType.GENERATE), major: int = P.PROTOCOL_MAJOR, minor: int = P.PROTOCOL_MINOR,
           magic: bytes = P.MAGIC) -> bytes:
    """A frame header (6 bytes)."""
    return P.HEADER.pack(magic, major, minor, int(msg_type))


def raw_frame(msg_type: MsgType, body) -> bytes:
    """A frame of `msg_type` whose body is `body` (any msgpack-able value) as msgpack."""
    return header(msg_type) + msgpack.packb(body, use_bin_type=True)
