"""Tool calling (shardline/tool_calls.py): the three formats parsed from texts as the models write
them, whole and streamed in any cuts, the format detected from chat templates, the constraint for
tool_choice required / named compiled and followed, and tools / tool_choice checked."""

from __future__ import annotations

import json
import random

import jsonschema
import numpy as np
import pytest

from shardline import token_bitmask
from shardline.structured_outputs import RequestFieldError
from shardline.tool_calls import (HermesToolParser, Llama3JsonToolParser, MistralToolParser, ToolChoice,
                                  detect_tool_parser, parse_tool_choice, parse_tools, tool_parser)

WEATHER = {"type": "object", "properties": {"location": {"type": "string", "maxLength": 24},
                                            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
           "required": ["location", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}}, "required": ["tz"],
        "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]

PARIS = '{"location": "Paris, France", "unit": "celsius"}'
TRUNCATED = 'Sure.<tool_call>\n{"name": "get_weather", "arguments": {"location": "Pa'  # cut by max_tokens
# (parser, model output, content, [(name, arguments)]; None: not a valid call, the text is content)
CASES = [
    (HermesToolParser(), f'<tool_call>\n{{"name": "get_weather", "arguments": {PARIS}}}\n</tool_call>', None,
     [("get_weather", PARIS)]),
    (HermesToolParser(), 'I will check both.\n<tool_call>\n{"name": "get_weather", "arguments": '
     '{"location": "Paris, France", "unit": "celsius"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", '
     '"arguments": {"tz": "CET"}}\n</tool_call>', "I will check both.\n",
     [("get_weather", PARIS), ("get_time", '{"tz": "CET"}')]),
    (HermesToolParser(), "The weather in Paris is sunny, 21 °C. <tool_call> is how I would call a tool.",
     "The weather in Paris is sunny, 21 °C. <tool_call> is how I would call a tool.", []),
    (HermesToolParser(), TRUNCATED, None, None),
    (Llama3JsonToolParser(), f'{{"name": "get_weather", "parameters": {PARIS}}}', None, [("get_weather", PARIS)]),
    (Llama3JsonToolParser(), f'<|python_tag|>{{"name": "get_weather", "parameters": {PARIS}}}; '
     '{"name": "get_time", "parameters": {"tz": "UTC"}}', None,
     [("get_weather", PARIS), ("get_time", '{"tz": "UTC"}')]),
    (Llama3JsonToolParser(), "It is 21 °C and sunny in Paris.", "It is 21 °C and sunny in Paris.", []),
    (Llama3JsonToolParser(), '{"answer": 42, "unit": "none"}', '{"answer": 42, "unit": "none"}', []),
    (MistralToolParser(), f'[TOOL_CALLS] [{{"name": "get_weather", "arguments": {PARIS}}}]', None,
     [("get_weather", PARIS)]),
    (MistralToolParser(), 'Let me look.[TOOL_CALLS][{"name": "get_weather", "arguments": {"location": "Paris, '
     'France", "unit": "celsius"}, "id": "a1b2c3d4e"}, {"name": "get_time", "arguments": {"tz": "UTC"}}]',
     "Let me look.", [("get_weather", PARIS), ("get_time", '{"tz": "UTC"}')]),
    (MistralToolParser(True), f'[TOOL_CALLS]get_weather[ARGS]{PARIS}[TOOL_CALLS]get_time[ARGS]{{"tz": "UTC"}}',
     None, [("get_weather", PARIS), ("get_time", '{"tz": "UTC"}')]),
    (MistralToolParser(True), "No tools needed: 2 + 2 = 4.", "No tools needed: 2 + 2 = 4.", []),
]


@pytest.mark.parametrize("parser, text, content, calls", CASES)
def test_finished_outputs_parse_as_vllm_parses_them(parser, text, content, calls):
    out = parser.parse(text)
    if calls is None:  # a call that is not valid: the whole text is content
        assert out.content == text and out.tool_calls == []
        return
    assert out.content == content
    assert [(c.name, c.arguments) for c in out.tool_calls] == calls
    for c in out.tool_calls:
        json.loads(c.arguments)
        assert c.to_openai() == {"id": c.id, "type": "function", "function": {"name": c.name,
                                                                             "arguments": c.arguments}}
    ids = [c.id for c in out.tool_calls]
    assert len(set(ids)) == len(ids)
    if isinstance(parser, MistralToolParser):
        assert all(len(i) == 9 and i.isalnum() for i in ids)
    else:
        assert all(i.startswith("call_") and len(i) == 29 for i in ids)


def _cuts(text: str, seed: int) -> list[str]:
    if seed == 0:
        return list(text)  # one character at a time
    rng = random.Random(seed)
    pieces, i = [], 0
    while i < len(text):
        n = rng.randint(1, 12)
        pieces.append(text[i:i + n])
        i += n
    return pieces


@pytest.mark.parametrize("parser, text, content, calls", CASES)
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_streamed_deltas_add_up_to_the_parsed_output(parser, text, content, calls, seed):
    stream = parser.stream()
    deltas = [stream.push(piece) for piece in _cuts(text, seed)] + [stream.finish()]
    streamed_content = "".join(d.get("content", "") for d in deltas)
    by_index: dict[int, dict] = {}
    for d in deltas:
        for tc in d.get("tool_calls", []):
            entry = by_index.setdefault(tc["index"], {"first": tc, "arguments": ""})
            if "id" in tc:  # the first delta of a call: id, type and the whole name, no arguments yet
                assert entry["first"] is tc and tc["type"] == "function" and tc["function"]["arguments"] == ""
            else:
                assert set(tc) == {"index", "function"} and set(tc["function"]) == {"arguments"}
            entry["arguments"] += tc["function"]["arguments"]
    if text == TRUNCATED:  # its name went out before the cut: a call with the arguments written so far
        assert streamed_content == "Sure." and len(by_index) == 1
        assert (by_index[0]["first"]["function"]["name"], by_index[0]["arguments"]) == ("get_weather",
                                                                                       '{"location": "Pa')
        return
    if calls is None:
        assert streamed_content == text and not by_index
        return
    assert streamed_content == (content or "" if calls else text)
    assert sorted(by_index) == list(range(len(calls)))
    assert [(by_index[i]["first"]["function"]["name"], by_index[i]["arguments"]) for i in by_index] == calls
    assert stream.tool_calls_sent == len(calls)


def test_stream_holds_back_a_marker_until_it_is_settled():
    stream = HermesToolParser().stream()
    assert stream.push("Checking <tool") == {"content": "Checking "}
    assert stream.push("_ca") == {}
    assert stream.push("ll>\n{\"name\": \"get_") == {}
    first = stream.push('time", "arguments": {"tz"')
    assert first["tool_calls"][0]["function"] == {"name": "get_time", "arguments": ""}
    assert first["tool_calls"][1] == {"index": 0, "function": {"arguments": '{"tz"'}}
    stream = Llama3JsonToolParser().stream()
    assert stream.push("  ") == {} and stream.push("<|python") == {}
    assert stream.push("_tag|>") == {}
    stream = MistralToolParser().stream()
    assert stream.push("Hi [TOOL") == {"content": "Hi "} and stream.finish() == {"content": "[TOOL"}


def test_the_format_is_detected_from_the_chat_template(tok):
    chat = pytest.importorskip("tests.unit.test_chat_template")
    assert isinstance(detect_tool_parser(chat.QWEN25_STYLE), HermesToolParser)
    assert isinstance(detect_tool_parser(chat.LLAMA3_STYLE), Llama3JsonToolParser)
    mistral = ("{%- for message in messages %}{%- if message.tool_calls %}{{- '[TOOL_CALLS][' }}"
               "{%- for tc in message.tool_calls %}{{- tc.function | tojson }}{%- endfor %}{{- ']' + eos_token }}"
               "{%- endif %}{%- endfor %}")
    parser = detect_tool_parser(mistral)
    assert isinstance(parser, MistralToolParser) and not parser.args_marker and parser.markers == ("[TOOL_CALLS]",)
    v11 = detect_tool_parser(mistral.replace("'[TOOL_CALLS]['", "'[TOOL_CALLS]' + tc.function.name + '[ARGS]'"))
    assert v11.args_marker and v11.markers == ("[TOOL_CALLS]", "[ARGS]")
    assert detect_tool_parser(tok.chat_template) is None  # SmolLM2's template teaches no tool calls
    assert detect_tool_parser(None) is None
    assert tool_parser("llama3_json").name == "llama3_json"
    with pytest.raises(ValueError, match="unknown tool parser 'pythonic'"):
        tool_parser("pythonic")


@pytest.fixture(scope="module")
def tok():
    from shardline.coordinator.tokenizer import Tokenizer
    from shardline.model_file import resolve_model_path

    return Tokenizer.from_model_path(resolve_model_path("smollm2-135m"))


@pytest.fixture(scope="module")
def grammars(tok):
    from shardline.coordinator.grammar import GrammarCompiler

    return GrammarCompiler(tok)


def _walk(grammars, tok, params, seed: int, max_tokens: int = 400) -> str:
    """Sample among the allowed tokens until EOS, preferring tokens without whitespace (a uniform
    walk spends most steps on JSON's optional whitespace)."""
    rng = np.random.default_rng(seed)
    m, ids, bm = grammars.matcher(params), [], grammars.allocate_bitmask(1)
    for _ in range(max_tokens):
        m.fill_bitmask(bm)
        allowed = token_bitmask.allowed_tokens(bm[0], grammars.vocab_size)
        solid = [t for t in allowed if not any(c in tok.token_bytes(int(t)) for c in b" \t\r\n")]
        t = int(rng.choice(solid if solid and rng.random() < 0.9 else allowed))
        assert m.accept_token(t)
        if t == tok.eos_token_id:
            return tok.decode(ids)
        ids.append(t)
    raise AssertionError(f"no EOS in {max_tokens} tokens: {tok.decode(ids)!r}")


PARSERS = [HermesToolParser(), Llama3JsonToolParser(), MistralToolParser(), MistralToolParser(True)]


@pytest.mark.parametrize("parser", PARSERS, ids=lambda p: f"{p.name}{'-args' if 'ARGS' in str(p.markers) else ''}")
def test_required_and_named_constraints_force_valid_calls_of_the_parsers_format(parser, grammars, tok):
    tools = parse_tools(TOOLS)
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    assert parser.constraint(tools, ToolChoice("auto")) is None and parser.constraint(tools, ToolChoice("none")) is None
    for choice in (ToolChoice("required"), ToolChoice("function", "get_time")):
        params = parser.constraint(tools, choice)
        assert params.kind == "structural_tag"
        names = set()
        for seed in range(6):
            out = parser.parse(_walk(grammars, tok, params, seed))
            assert out.content is None and out.tool_calls, out
            if choice.mode == "function" or isinstance(parser, Llama3JsonToolParser):
                assert len(out.tool_calls) == 1
            for call in out.tool_calls:
                jsonschema.validate(json.loads(call.arguments), schemas[call.name])
                names.add(call.name)
        assert names == ({"get_time"} if choice.mode == "function" else {"get_time", "get_weather"})


@pytest.mark.parametrize("parser, text", [(p, t) for p, t, _, calls in CASES if calls and
                                          not t.startswith(("I will", "Let me", "<|python_tag|>"))])
def test_calls_as_models_write_them_satisfy_the_required_constraint(parser, text, grammars, tok):
    m = grammars.matcher(parser.constraint(parse_tools(TOOLS), ToolChoice("required")))
    assert all(m.accept_token(t) for t in tok.encode(text)) and m.accept_token(tok.eos_token_id), text


@pytest.mark.parametrize("tools, message", [
    ([], "tools: must be a list of 1 to 128 tools"),
    ({"type": "function"}, "tools: must be a list"),
    ([{"type": "retrieval"}], 'tools\\[0\\]: must be {"type": "function"'),
    ([{"type": "function", "function": {"name": "has space"}}], "tools\\[0\\]: function.name must be"),
    ([{"type": "function", "function": {"name": "f", "parameters": "x"}}], "parameters must be a JSON schema"),
    ([{"type": "function", "function": {"name": "f", "description": 3}}], "description must be a string"),
    ([{"type": "function", "function": {"name": "f"}}, {"type": "function", "function": {"name": "f"}}],
     "tools\\[1\\]: function 'f' is defined twice"),
])
def test_malformed_tools_name_the_entry(tools, message):
    with pytest.raises(RequestFieldError, match=message) as info:
        parse_tools(tools)
    assert info.value.param == "tools"


def test_tool_choice_forms():
    tools = parse_tools(TOOLS)
    assert parse_tool_choice(None, tools) == ToolChoice("auto")
    assert parse_tool_choice(None, None) == ToolChoice("none")
    assert parse_tool_choice("auto", None) == ToolChoice("none")
    assert parse_tool_choice("required", tools) == ToolChoice("required")
    assert parse_tool_choice({"type": "function", "function": {"name": "get_time"}}, tools) == \
        ToolChoice("function", "get_time")
    for value, message in [("required", "'required' needs tools"), ("always", "must be \"none\", \"auto\""),
                           ({"type": "function", "function": {"name": "nope"}}, "function 'nope' is not in tools"),
                           ({"type": "function"}, "must be \"none\"")]:
        with pytest.raises(RequestFieldError, match=message) as info:
            parse_tool_choice(value, None if value == "required" else tools)
        assert info.value.param == "tool_choice"
