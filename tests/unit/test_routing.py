"""The coordinator's frame routing without sockets (a coordinator whose outbox records messages):
what a body that fails to decode, or a type sent on the wrong plane, is answered with."""

from __future__ import annotations

from shardline import messages as M
from shardline.protocol import ErrorCode, MsgType
from tests.fake_cluster import FakeCluster
from tests.frames import raw_frame

CLIENT = b"client-1"


def _errors(c: FakeCluster, peer: bytes | str) -> list[M.Error]:
    return c.outbox.to(peer, MsgType.ERROR)


def test_a_body_that_fails_to_decode_is_refused_naming_its_request_and_field():
    c = FakeCluster()
    c.client_says(CLIENT, raw_frame(MsgType.GENERATE, {"request_id": "r1", "prompt": "hi", "stream": "yes"}))
    c.client_says(CLIENT, raw_frame(MsgType.GENERATE, {"request_id": "r2", "messages": [{"role": "user"}]}))
    c.client_says(CLIENT, raw_frame(MsgType.GENERATE, {"request_id": 3, "prompt": "hi"}))
    assert [(e.code, e.request_id, e.message) for e in _errors(c, CLIENT)] == [
        (ErrorCode.BAD_FRAME, "r1", "GENERATE: Expected `bool`, got `str` - at `$.stream`"),
        (ErrorCode.BAD_FRAME, "r2", "GENERATE: Object missing required field `content` - at `$.messages[0]`"),
        (ErrorCode.BAD_FRAME, "", "GENERATE: Expected `str`, got `int` - at `$.request_id`"),  # no id to name
    ]


def test_a_generate_without_a_prompt_is_refused():
    c = FakeCluster(workers={"count": 1})
    c.serve("w0")
    c.client_says(CLIENT, M.Generate(request_id="r1", params={"max_tokens": 2}))
    (err,) = _errors(c, CLIENT)
    assert (err.code, err.request_id) == (ErrorCode.BAD_FRAME, "r1") and "no prompt" in err.message
    assert len(c.coord.requests) == 0


def test_a_type_of_the_other_plane_or_a_reply_is_unknown_there():
    c = FakeCluster()
    c.client_says(CLIENT, M.Accepted(request_id="r1", prompt_tokens=3))  # a reply type, from a client
    c.client_says(CLIENT, M.ShardFetch(index=0))
    c.worker_says("w9", M.Generate(request_id="r2", prompt="hi"))
    assert [(e.code, e.request_id, e.message) for e in _errors(c, CLIENT)] == [
        (ErrorCode.UNKNOWN_TYPE, "r1", "ACCEPTED (type 2) is not valid on this plane"),
        (ErrorCode.UNKNOWN_TYPE, "", "SHARD_FETCH (type 74) is not valid on this plane")]
    (err,) = _errors(c, "w9")
    assert (err.code, err.message) == (ErrorCode.UNKNOWN_TYPE, "GENERATE (type 1) is not valid on this plane")
    assert c.registry.workers == {} and len(c.coord.requests) == 0
