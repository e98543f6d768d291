"""Request forms of structured outputs (shardline/structured_outputs.py) and the new SamplingParams
fields (logit_bias, structured_outputs): typed values, wire round trips, errors naming the field."""

from __future__ import annotations

import json

import msgpack
import pytest

from shardline.sampling import MAX_LOGIT_BIAS, SamplingParams
from shardline.structured_outputs import RequestFieldError, StructuredOutputsParams, from_request

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


def test_each_request_form_gives_its_constraint():
    assert from_request() is None
    assert from_request(response_format={"type": "text"}) is None
    assert from_request(response_format={"type": "json_object"}) == StructuredOutputsParams(json_object=True)
    rf = {"type": "json_schema", "json_schema": {"name": "thing-1", "schema": SCHEMA, "strict": True}}
    assert from_request(response_format=rf) == StructuredOutputsParams(json=SCHEMA, strict=True)
    no_schema = {"type": "json_schema", "json_schema": {"name": "any"}}
    assert from_request(response_format=no_schema) == StructuredOutputsParams(json={})
    assert from_request(guided_json='{"type": "string"}') == StructuredOutputsParams(json={"type": "string"})
    assert from_request(guided_regex="[0-9]+").regex == "[0-9]+"
    assert from_request(guided_choice=["a", "b"]).choice == ("a", "b")
    assert from_request(guided_grammar='root ::= "x"').grammar == 'root ::= "x"'
    so = from_request(structured_outputs={"json": SCHEMA, "disable_any_whitespace": True})
    assert so.kind == "json" and so.disable_any_whitespace and not so.strict


@pytest.mark.parametrize("kwargs, param, message", [
    ({"response_format": "json"}, "response_format", "must be an object with a `type`"),
    ({"response_format": {"type": "xml"}}, "response_format", "response_format.type='xml': must be text, json_object"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema: must be an object"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "bad name", "schema": SCHEMA}}},
     "response_format", "json_schema.name: must be 1 to 64"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": "yes"}}},
     "response_format", "strict: must be a boolean"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}},
     "response_format", "schema: must be a JSON object, got list"),
    ({"guided_json": "{not json"}, "guided_json", "guided_json: not valid JSON"),
    ({"guided_regex": ""}, "guided_regex", "guided_regex: must be a non-empty string"),
    ({"guided_choice": []}, "guided_choice", "guided_choice: must be 1 to 1024 non-empty strings"),
    ({"guided_choice": ["a", 3]}, "guided_choice", "must be 1 to 1024 non-empty strings"),
    ({"guided_grammar": 5}, "guided_grammar", "must be a non-empty string"),
    ({"structured_outputs": {"json": SCHEMA, "regex": "x"}}, "structured_outputs",
     "give exactly one of json, json_object, regex, choice, grammar, structural_tag \\(got json, regex\\)"),
    ({"structured_outputs": {"whitespace_pattern": " "}}, "structured_outputs", "unknown field\\(s\\) whitespace_pattern"),
    ({"structured_outputs": {}}, "structured_outputs", "give exactly one of"),
    ({"structured_outputs": {"json_object": "yes"}}, "structured_outputs", "json_object='yes': must be a boolean"),
    ({"guided_regex": "x" * 70000}, "guided_regex", "longer than 65536 characters"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "[a-z]"}, "guided_regex",
     "give only one output constraint, got response_format, guided_regex"),
])
def test_malformed_forms_name_the_field(kwargs, param, message):
    with pytest.raises(RequestFieldError, match=message) as info:
        from_request(**kwargs)
    assert info.value.param == param and isinstance(info.value, ValueError)


def test_params_key_identifies_the_constraint_and_the_wire_form_round_trips():
    a = StructuredOutputsParams(json=SCHEMA, strict=True)
    assert a.key == StructuredOutputsParams(json=dict(SCHEMA), strict=True).key
    assert len({a.key, StructuredOutputsParams(json=SCHEMA).key, StructuredOutputsParams(regex="x").key,
                StructuredOutputsParams(grammar="x").key}) == 4
    for p in (a, StructuredOutputsParams(choice=["x", "y"]), StructuredOutputsParams(json_object=True),
              StructuredOutputsParams(structural_tag={"type": "structural_tag", "format": {"type": "any_text"}})):
        d = msgpack.unpackb(msgpack.packb(p.to_dict()), strict_map_key=True)
        assert StructuredOutputsParams.from_dict(d) == p
    assert a.to_dict() == {"json": json.dumps(SCHEMA), "strict": True}  # text: any depth travels
    deep = {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "object"}}}}}
    for _ in range(10):
        deep = {"type": "array", "items": deep}
    assert SamplingParams(structured_outputs={"json": deep}).to_dict()["structured_outputs"] == {"json": json.dumps(deep)}


def test_sampling_params_carry_logit_bias_and_structured_outputs_over_the_wire():
    p = SamplingParams(logit_bias={"50": -100, 7: 2.5}, structured_outputs={"choice": ["yes", "no"]}, n=2, seed=3)
    assert p.logit_bias == {50: -100.0, 7: 2.5}
    assert p.structured_outputs == StructuredOutputsParams(choice=("yes", "no"))
    d = msgpack.unpackb(msgpack.packb(p.to_dict()), strict_map_key=True)  # the protocol's unpacking
    assert d["logit_bias"] == {"50": -100.0, "7": 2.5}
    assert SamplingParams.from_dict(d) == p
    assert p.for_choice(1).structured_outputs == p.structured_outputs and p.for_choice(1).logit_bias == p.logit_bias
    plain = SamplingParams().to_dict()  # a peer that predates the fields reads a plain request unchanged
    assert "logit_bias" not in plain and "structured_outputs" not in plain
    assert SamplingParams(logit_bias={}).logit_bias is None


@pytest.mark.parametrize("value, message", [
    ([1, 2], "must be a map of token id to bias"),
    ({"-1": 1}, "key '-1' must be a token id"),
    ({"x": 1}, "key 'x' must be a token id"),
    ({1.5: 1}, "key 1.5 must be a token id"),
    ({3: 100.5}, "bias 100.5 of token 3 must be a number in \\[-100, 100\\]"),
    ({3: "1"}, "bias '1' of token 3"),
    ({3: True}, "bias True of token 3"),
    ({i: 1 for i in range(MAX_LOGIT_BIAS + 1)}, f"at most {MAX_LOGIT_BIAS} entries"),
])
def test_logit_bias_out_of_range_names_the_field(value, message):
    with pytest.raises(ValueError, match=rf"^logit_bias[=:].*{message}"):
        SamplingParams(logit_bias=value)


def test_structured_outputs_of_the_wrong_type_is_refused():
    with pytest.raises(ValueError, match="^structured_outputs='json': must be a StructuredOutputsParams"):
        SamplingParams(structured_outputs="json")
    with pytest.raises(ValueError, match="give exactly one of"):
        SamplingParams(structured_outputs={"regex": "a", "choice": ["b"]})
