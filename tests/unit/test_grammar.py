"""Constrained decoding on the coordinator (coordinator/grammar.py) with SmolLM2's real tokenizer:
masks admit exactly the texts the constraint describes, compile errors name what failed, the
cache, batch filling, rollback and termination."""

from __future__ import annotations

import json
import re

import jsonschema
import numpy as np
import pytest

from shardline import token_bitmask
from shardline.coordinator.grammar import GrammarCompiler, GrammarError
from shardline.coordinator.tokenizer import Tokenizer
from shardline.model_file import resolve_model_path
from shardline.structured_outputs import StructuredOutputsParams as P

EOS = 2  # SmolLM2's <|im_end|>


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_model_path(resolve_model_path("smollm2-135m"))


@pytest.fixture(scope="module")
def grammars(tok) -> GrammarCompiler:
    return GrammarCompiler(tok)


def allowed(g: GrammarCompiler, m) -> set[int]:
    bm = g.allocate_bitmask(1)
    m.fill_bitmask(bm)
    return set(token_bitmask.allowed_tokens(bm[0], g.vocab_size).tolist())


def follow(g, tok, params, text: str):
    """Drive a matcher through the model's tokens of `text`, each checked against the mask
    filled before it. Returns the matcher (not yet given EOS)."""
    m = g.matcher(params)
    for t in tok.encode(text):
        assert t in allowed(g, m), (text, t, tok.token_bytes(t))
        assert m.accept_token(t)
    return m


def random_walk(g, tok, params, seed: int, max_tokens: int = 200) -> str | None:
    """Sample uniformly among the allowed tokens until EOS: the text, or None past max_tokens."""
    rng = np.random.default_rng(seed)
    m, ids = g.matcher(params), []
    for _ in range(max_tokens):
        t = int(rng.choice(sorted(allowed(g, m))))
        assert m.accept_token(t)
        if t == EOS:
            assert m.is_terminated
            return tok.decode(ids)
        ids.append(t)
    return None


ADDRESS = {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string",
                                                                              "pattern": "^[0-9]{5}$"}},
           "required": ["city", "zip"], "additionalProperties": False}
PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0},
                                           "address": ADDRESS, "tags": {"type": "array", "items": {"type": "string"}}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.mark.parametrize("text", [
    '{"name": "Ada", "age": 36, "address": {"city": "London", "zip": "10001"}}',
    json.dumps({"name": "Grace Hopper", "age": 85, "tags": ["navy", "COBOL"]}, indent=2),
    '{"name":"Ünïcode ✓","age":0}',
])
def test_valid_json_is_followed_to_the_end_and_then_only_eos_is_allowed(grammars, tok, text):
    m = follow(grammars, tok, P(json=PERSON), text)
    assert allowed(grammars, m) == {EOS} and not m.is_terminated
    assert m.accept_token(EOS) and m.is_terminated
    assert allowed(grammars, m) == {EOS}  # terminated: the stop tokens only
    assert not m.accept_token(tok.encode(" ")[0])


@pytest.mark.parametrize("text, bad", [
    ('{"name": "Ada", "age": -1}', "-"),  # minimum 0
    ('{"name": "Ada", "age": 3, "extra": 1}', ' "extra'),  # not a listed property
    ('{"age": 3, "name": "Ada"}', '"age'),  # properties in the schema's order
    ('{"name": "Ada", "age": 3, "address": {"city": "X", "zip": "123"}}', '"}'),  # zip pattern
])
def test_invalid_json_is_refused_where_it_goes_wrong(grammars, tok, text, bad):
    m = grammars.matcher(P(json=PERSON))
    ids = tok.encode(text)
    refused = next(i for i, t in enumerate(ids) if t not in allowed(grammars, m) or not m.accept_token(t))
    assert not m.accept_token(ids[refused])
    assert len(tok.decode(ids[:refused])) <= text.index(bad) + len(bad) <= len(tok.decode(ids[:refused + 1])) + 1


def test_special_tokens_are_never_text_but_a_text_special_token_may_be(tok, grammars):
    m = follow(grammars, tok, P(json={"type": "string"}), '"abc')
    specials = set(tok.special_ids) - {EOS}
    assert specials and not (allowed(grammars, m) & (specials | {EOS}))
    marker = "<|im_start|>"  # stands in for a tool-call marker such as Mistral's [TOOL_CALLS]
    grammar = P(grammar=f'root ::= {json.dumps(marker)} [a-z]+')
    assert 1 not in allowed(grammars, grammars.matcher(grammar))  # spelled with ordinary tokens only
    with_marker = GrammarCompiler(tok, text_special_tokens=[marker])
    m = with_marker.matcher(grammar)
    assert 1 in allowed(with_marker, m) and m.accept_token(1)
    with pytest.raises(ValueError, match="'hello' is not a special token"):
        GrammarCompiler(tok, text_special_tokens=["hello"])


FINITE = {"type": "object", "properties": {
    "color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"},
    "size": {"type": "integer", "minimum": 1, "maximum": 9}, "kind": {"const": "box"}},
    "required": ["color", "ok", "size", "kind"], "additionalProperties": False}


@pytest.mark.parametrize("params, check", [
    (P(json=FINITE, disable_any_whitespace=True), lambda s: jsonschema.validate(json.loads(s), FINITE) or True),
    (P(regex=r"[0-9]{3}-[a-z]{2}"), lambda s: re.fullmatch(r"[0-9]{3}-[a-z]{2}", s)),
    (P(choice=("yes", "no", 'a "quoted" choice', "naïve\tline")), lambda s: s in ("yes", "no", 'a "quoted" choice',
                                                                                   "naïve\tline")),
    (P(grammar='root ::= "(" [0-9] ("+" [0-9])? ")"'), lambda s: re.fullmatch(r"\([0-9](\+[0-9])?\)", s)),
    (P(grammar='start: "go " DIR\nDIR: "north" | "south"'), lambda s: s in ("go north", "go south")),
])
def test_every_text_the_masks_allow_satisfies_the_constraint(grammars, tok, params, check):
    for seed in range(12):
        text = random_walk(grammars, tok, params, seed)
        assert text is not None and check(text), text


def test_compile_errors_name_the_kind_and_the_reason(grammars):
    cases = [
        (P(json={"type": "foo"}), r'^json: cannot compile: Unsupported type "foo"$'),
        (P(json={"$ref": "#/$defs/missing"}), r"^json: cannot compile: .*missing"),
        (P(regex="a(b"), r"^regex: cannot compile: Regex parsing error at position [0-9]+: The parenthesis is not closed"),
        (P(grammar="root ::= undefined_rule"), r'^grammar: cannot compile: .*Rule "undefined_rule" is not defined'),
        (P(grammar="start: missing"), r"^grammar: cannot compile: Lark error at line 1, column 8: unknown name"),
        (P(structural_tag={"type": "nope"}), r"^structural_tag: cannot compile: Invalid structural tag"),
    ]
    for params, pattern in cases:
        with pytest.raises(GrammarError, match=pattern):
            grammars.compile(params)
    assert issubclass(GrammarError, ValueError)


@pytest.mark.parametrize("schema, pointer, keyword", [
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "#", "uniqueItems"),
    ({"type": "object", "properties": {"a/b": {"type": "integer", "not": {"const": 3}}}}, "#/properties/a~1b", "not"),
    ({"anyOf": [{"type": "string"}, {"type": "integer", "if": {"minimum": 0}, "then": {"maximum": 5}}]},
     "#/anyOf/1", "if"),
    ({"$defs": {"n": {"type": "number", "multipleOf": 0.5}}, "$ref": "#/$defs/n"}, "#/$defs/n", "multipleOf"),
])
def test_strict_refuses_keywords_the_engine_cannot_enforce(grammars, schema, pointer, keyword):
    with pytest.raises(GrammarError, match=rf"^json: keyword '{keyword}' at {re.escape(pointer)} "):
        grammars.compile(P(json=schema, strict=True))
    assert grammars.compile(P(json=schema)) is not None  # best effort without strict
    assert grammars.compile(P(json={"type": "integer", "multipleOf": 5}, strict=True)) is not None


def test_compiled_grammars_are_cached_by_constraint(tok):
    g = GrammarCompiler(tok)
    a = g.compile(P(json=PERSON))
    assert g.compile(P(json=json.loads(json.dumps(PERSON)))) is a and (g.hits, g.misses) == (1, 1)
    assert g.compile(P(json=PERSON, strict=True)) is not a and g.misses == 2
    tiny = GrammarCompiler(tok, cache_bytes=1)  # holds one grammar at a time
    b = tiny.compile(P(regex="[a-z]+"))
    tiny.compile(P(regex="[0-9]+"))
    assert tiny.compile(P(regex="[a-z]+")) is not b and tiny.misses == 3


def test_fill_bitmask_of_many_matchers_equals_one_at_a_time(grammars, tok):
    texts = ['{"name": "A", "age": 1', '{"na', "", '{"name": "B", "age": 2, "tags": ["x"']
    matchers = [follow(grammars, tok, P(json=PERSON), t) for t in texts]
    done = follow(grammars, tok, P(regex="[a-z]+"), "abc")
    assert done.accept_token(EOS)
    matchers.insert(2, done)
    batch = grammars.allocate_bitmask(len(matchers) + 1)
    grammars.fill_bitmask(matchers, batch)
    for i, m in enumerate(matchers):
        one = grammars.allocate_bitmask(1)
        m.fill_bitmask(one)
        assert np.array_equal(batch[i], one[0])
    assert token_bitmask.allowed_tokens(batch[2], grammars.vocab_size).tolist() == [EOS]


def test_rollback_restores_the_earlier_state(grammars, tok):
    m = follow(grammars, tok, P(json=PERSON), '{"name": "Ada"')
    before = allowed(grammars, m)
    ids = tok.encode(', "age": 36}')
    assert all(m.accept_token(t) for t in ids) and m.accept_token(EOS) and m.is_terminated
    m.rollback(len(ids) + 1)
    assert not m.is_terminated and allowed(grammars, m) == before
    with pytest.raises(ValueError, match="cannot roll back"):
        m.rollback(m.num_accepted + 1)


def test_a_padded_lm_head_never_allows_the_padding(tok):
    g = GrammarCompiler(tok, vocab_size=tok.vocab_size + 64)
    assert g.num_words == (tok.vocab_size + 64) // 32
    m = g.matcher(P(json={"type": "string"}))
    assert m.accept_token(tok.encode('"')[0])
    assert max(allowed(g, m)) < tok.vocab_size
