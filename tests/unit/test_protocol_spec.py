"""docs/protocol.md is the spec: its message and error tables, limits and field lists must agree
with shardline/protocol.py, the message structs of shardline/messages.py (in both directions),
SamplingParams and the bodies the client builds. (What the coordinator sends is checked against
the same tables in tests/integration/test_client_options.py.)"""

from __future__ import annotations

import re
import typing
from dataclasses import fields

import msgspec

from shardline import protocol as P
from shardline.client import _generate_body
from shardline.protocol import ErrorCode, MsgType
from shardline.sampling import MAX_LOGPROBS, MAX_N, SamplingParams
from tests.protocol_doc import error_table, message_table, section


def test_message_tables_list_exactly_the_message_types():
    doc = {n: name for n, (name, _) in message_table().items()}
    code = {int(m): m.name for m in MsgType}
    assert doc == code, f"only in the doc: {set(doc.items()) - set(code.items())}; " \
                        f"only in the code: {set(code.items()) - set(doc.items())}"


def test_error_table_lists_exactly_the_error_codes():
    assert error_table() == {int(c): c.name for c in ErrorCode}


def test_parser_reads_tables_it_is_given():
    text = "| type | name | direction | body |\n|---|---|---|---|\n| 7 | PING | a → b | `x`, `y` [{`z`}] |\n" \
           "\n| code | name | meaning |\n|---|---|---|\n| 3 | OOPS | bad |\n"
    assert message_table(text) == {7: ("PING", {"x", "y", "z"})}
    assert error_table(text) == {3: "OOPS"}


def struct_fields(cls: type[msgspec.Struct]) -> set[str]:
    """The wire names of a struct's fields and of every struct nested in them (through lists,
    tuples, maps and unions)."""
    out = set()
    for f in msgspec.structs.fields(cls):
        out.add(f.encode_name)
        types = [f.type]
        while types:
            t = types.pop()
            if isinstance(t, type) and issubclass(t, msgspec.Struct):
                out |= struct_fields(t)
            else:
                types.extend(typing.get_args(t))
    return out


def test_every_message_type_has_a_struct():
    assert set(P.BODY_TYPES) == set(MsgType)
    assert len(set(P.BODY_TYPES.values())) == len(MsgType)  # one struct per type


def test_struct_fields_are_exactly_the_documented_fields():
    """Each message's row names every field of its struct (nested parts' too), and nothing else."""
    table = message_table()
    for msg_type, cls in P.BODY_TYPES.items():
        doc, code = table[int(msg_type)][1], struct_fields(cls)
        assert doc == code, f"{msg_type.name}: only in docs/protocol.md {sorted(doc - code)}; " \
                            f"only in {cls.__name__} {sorted(code - doc)}"


class _Inner(msgspec.Struct):
    deep: int


class _Outer(msgspec.Struct):
    plain: str
    listed: list[_Inner] | None = None
    keyed: dict[str, tuple[_Inner, int]] = {}


def test_struct_fields_parser_sees_nested_parts():
    assert struct_fields(_Outer) == {"plain", "listed", "keyed", "deep"}


def test_client_bodies_use_documented_fields():
    """What the client puts on the wire (the encoded map's keys) is documented."""
    table = message_table()
    body = _generate_body("r1", None, None, [1, 2, 3], True, 3, 2,
                          dict(n=2, max_tokens=4, stop=["x"], seed=1, repetition_penalty=1.1))
    sent = msgspec.msgpack.decode(P.encode(body)[P.HEADER_BYTES:])
    assert {"request_id", "prompt_token_ids", "params", "stream", "logprobs", "prompt_logprobs"} == set(sent)
    assert set(sent) <= table[MsgType.GENERATE][1]
    for t in (MsgType.HEALTH, MsgType.STATS, MsgType.MODELS, MsgType.CANCEL):
        assert "request_id" in table[t][1]


def test_every_sampling_param_is_specified():
    client_plane = section("Client plane")
    m = re.search(r"^`params` \(all optional.*?(?=\n\n)", client_plane, re.S | re.M)
    assert m, "the params paragraph is missing"
    documented = set(re.findall(r"`([a-z_]+)`", m.group(0)))
    assert {f.name for f in fields(SamplingParams)} <= documented


def test_limits_table_matches_the_constants():
    limits = {r.split("|")[1].strip(): r.split("|")[2].strip()
              for r in section("Limits").splitlines() if r.startswith("|") and not r.startswith("|--")}
    assert limits["client frame"].startswith(f"{P.MAX_CLIENT_FRAME_BYTES // 2**20} MiB")
    assert limits["worker frame"].startswith(f"{P.MAX_FRAME_BYTES // 2**20} MiB")
    assert limits["token ids per array"].startswith(f"2^{P.MAX_PROMPT_TOKENS.bit_length() - 1}")
    assert limits["`n`"] == str(MAX_N)
    assert limits["`logprobs`, `prompt_logprobs`"] == str(MAX_LOGPROBS)
    if hasattr(P, "MAX_DEPTH"):
        assert limits["body nesting"].startswith(f"{P.MAX_DEPTH} levels")


def test_framing_header_matches():
    framing = section("Framing")
    assert f'`b"{P.MAGIC.decode()}"`' in framing
    assert re.search(rf"^\| 2 \| 1 \| major \| {P.PROTOCOL_MAJOR} \|$", framing, re.M)
    assert re.search(rf"^\| 3 \| 1 \| minor \| {P.PROTOCOL_MINOR} \|$", framing, re.M)
    assert f"this peer\nspeaks {P.PROTOCOL_MAJOR}.{P.PROTOCOL_MINOR}" in framing  # the VERSION_MISMATCH example
    assert P.HEADER_BYTES == 6 and "| 6 | … | body |" in framing
