"""Tokenizer, incremental detokenizer and stop-string matcher (no transformers, no processes).

Uses the packaged SmolLM2 GGUF for the real vocabulary, and tiny GGUF files written here for the
pre-tokenizer table and the error paths.
"""

from __future__ import annotations

import gguf
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from shardline.coordinator.tokenizer import (
    IncrementalDetokenizer,
    StopStringMatcher,
    Tokenizer,
    bytes_to_unicode,
)
from shardline.model_file import ModelError, resolve_model_path

HYPO = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

MULTIBYTE = "日本語の文章 😀👍🏽👨‍👩‍👧‍👦 🇫🇷 café naïve Ωμέγα ∑∫ 한국어 "


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_gguf(resolve_model_path("smollm2-135m"))


# ---- tiny GGUF files ---------------------------------------------------------------------------


def write_tiny_gguf(path, *, model="gpt2", pre="gpt2", merges=("1 2", "3 4", "12 3"), chat_template=None):
    """A GGUF with only tokenizer metadata: the 256 byte tokens, a few merges, two control tokens."""
    byte_tokens = [bytes_to_unicode()[b] for b in range(256)]
    merged = ["".join(m.split(" ")) for m in merges]
    tokens = ["<|bos|>", "<|eos|>"] + byte_tokens + merged
    types = [3, 3] + [1] * (len(tokens) - 2)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model(model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if merges:
        w.add_token_merges(list(merges))
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def pieces(t: Tokenizer, text: str) -> list[str]:
    return [t.token_bytes(i).decode("utf-8") for i in t.encode(text)]


def test_non_bpe_gguf_is_refused(tmp_path):
    path = write_tiny_gguf(tmp_path / "spm.gguf", model="llama")
    with pytest.raises(ValueError, match="'llama'"):
        Tokenizer.from_gguf(path)


def test_bpe_without_merges_is_refused(tmp_path):
    path = write_tiny_gguf(tmp_path / "nomerges.gguf", merges=())
    with pytest.raises(ValueError, match="merges"):
        Tokenizer.from_gguf(path)


@pytest.mark.parametrize(
    "pre, expected",
    [
        ("gpt2", ["12", "34", "5"]),  # " ?\p{N}+": one word, merges by rank
        ("smollm", ["1", "2", "3", "4", "5"]),  # every numeral its own word
        ("llama-bpe", ["123", "4", "5"]),  # \p{N}{1,3}: words "123", "45"
        ("qwen2", ["1", "2", "3", "4", "5"]),  # \p{N}
    ],
)
def test_pre_tokenizer_follows_gguf_pre(tmp_path, pre, expected):
    t = Tokenizer.from_gguf(write_tiny_gguf(tmp_path / "t.gguf", pre=pre))
    assert pieces(t, "12345") == expected


def test_unknown_pre_is_refused(tmp_path):
    # No other regex splits text the way the merges were learned: refused, by name.
    path = write_tiny_gguf(tmp_path / "t.gguf", pre="no-such-pre")
    with pytest.raises(ModelError, match="tokenizer.ggml.pre 'no-such-pre' is not a known pre-tokenizer"):
        Tokenizer.from_gguf(path)


def test_chat_template_helpers(tmp_path):
    template = (
        "{{ bos_token }}{% for m in messages %}"
        "{% if m['role'] not in ['user', 'assistant'] %}{{ raise_exception('bad role: ' + m['role']) }}{% endif %}"
        "{{ m['role'] }}: {{ m['content'] | trim }}{{ eos_token }}\n"
        "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
    )
    t = Tokenizer.from_gguf(write_tiny_gguf(tmp_path / "t.gguf", chat_template=template))
    msgs = [{"role": "user", "content": " hi "}]
    assert t.apply_chat_template(msgs) == "<|bos|>user: hi<|eos|>\nassistant:"
    assert t.apply_chat_template(msgs, add_generation_prompt=False) == "<|bos|>user: hi<|eos|>\n"
    with pytest.raises(ValueError, match="bad role: tool"):
        t.apply_chat_template([{"role": "tool", "content": "x"}])


def test_chat_template_is_sandboxed(tmp_path):
    t = Tokenizer.from_gguf(write_tiny_gguf(tmp_path / "t.gguf", chat_template="{{ messages.append(1) }}"))
    with pytest.raises(ValueError, match="unsafe|not safe|immutable|append"):
        t.apply_chat_template([])


def test_missing_chat_template(tmp_path):
    t = Tokenizer.from_gguf(write_tiny_gguf(tmp_path / "t.gguf"))
    with pytest.raises(ValueError, match="chat_template"):
        t.apply_chat_template([{"role": "user", "content": "hi"}])


# ---- the real vocabulary -----------------------------------------------------------------------


def test_metadata(tok):
    assert tok.vocab_size == 49152
    assert tok.bos_token_id == 1 and tok.eos_token_id == 2
    assert tok.id_to_token(2) == "<|im_end|>"
    assert tok.pre == "smollm"


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world!",
        "  leading spaces and   multiple\tspaces\ttabs",
        "line one\nline two\r\nline three\n\n",
        "12345 and 3.14159",
        MULTIBYTE,
        "def f(x):\n    return {'a': x ** 2}  # comment\n",
        "",
    ],
)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


_SINGLE_BYTES: dict[int, set[bytes]] = {}


def representable(tok, text):
    """True if every UTF-8 byte of `text` has a byte token. SmolLM2's vocab lacks 21 of the 256
    (e.g. 0x04, and 0xF1/0xF2, the lead bytes of planes 4-11); BPE drops those bytes, as
    transformers does."""
    if id(tok) not in _SINGLE_BYTES:
        _SINGLE_BYTES[id(tok)] = {tok.token_bytes(i) for i in range(tok.vocab_size)}
    return all(bytes([b]) in _SINGLE_BYTES[id(tok)] for b in text.encode("utf-8"))


@given(st.text(max_size=60))
@HYPO
def test_round_trip_any_text(tok, text):
    assume(representable(tok, text))
    assert tok.decode(tok.encode(text)) == text


def test_bytes_missing_from_vocab_are_dropped(tok):
    assert not representable(tok, "\x04") and not representable(tok, "\U00040000")
    assert tok.decode(tok.encode("a\x04b")) == "ab"


def test_digits_split_one_by_one(tok):
    ids = tok.encode("12345")
    assert len(ids) == 5 and tok.decode(ids) == "12345"
    assert [tok.decode([i]) for i in tok.encode(" 42")] == [" ", "4", "2"]


def test_special_tokens_encode_as_one_id(tok):
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.decode(ids) == "<|im_start|>user\nhi<|im_end|>"
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"
    assert tok.encode("<|im_end|>") == [2]
    # no BOS: tokenizer.ggml.add_bos_token is False for this file
    assert tok.encode("hi", add_special_tokens=True) == tok.encode("hi")


def test_token_bytes(tok):
    ids = tok.encode("😀")
    assert b"".join(tok.token_bytes(i) for i in ids) == "😀".encode()
    assert tok.token_bytes(2) == b"<|im_end|>"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.token_bytes(tok.vocab_size)
    with pytest.raises(ValueError):
        tok.decode([-1])


def test_chat_template_smollm(tok):
    out = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert out == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    sys = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert tok.apply_chat_template(sys, add_generation_prompt=False) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"
    )


# ---- incremental detokenizer -------------------------------------------------------------------


def chunked(draw, ids):
    """Cut `ids` into consecutive chunks of 0..3 ids."""
    out, i = [], 0
    while i < len(ids):
        n = draw(st.integers(0, 3))
        out.append(ids[i : i + n])
        i += n
    return out


@st.composite
def id_streams(draw, tok_ids_pool):
    ids = draw(st.lists(st.one_of(st.integers(0, 49151), st.sampled_from(tok_ids_pool)), max_size=40))
    return ids, chunked(draw, ids)


# Tokens that carry partial UTF-8 characters: most of these are single bytes of emoji/CJK.
_POOL_TEXT = MULTIBYTE + "<|im_start|><|im_end|>"


@given(data=st.data())
@HYPO
def test_detokenizer_concat_equals_decode(tok, data):
    pool = tok.encode(_POOL_TEXT)
    ids, chunks = data.draw(id_streams(pool))
    skip = data.draw(st.booleans())
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    out = "".join(detok.push(c) for c in chunks) + detok.flush()
    assert out == tok.decode(ids, skip_special_tokens=skip)
    assert detok.token_ids == ids


@given(data=st.data(), text=st.text(alphabet=st.sampled_from(sorted(set(_POOL_TEXT)) + list("ab \n")), max_size=30))
@HYPO
def test_detokenizer_never_emits_half_a_character(tok, data, text):
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok)
    emitted = ""
    for chunk in chunked(data.draw, ids):
        delta = detok.push(chunk)
        assert "\ufffd" not in delta
        emitted += delta
        assert text.startswith(emitted)
    assert detok.flush() == ""
    assert emitted == text


def test_detokenizer_holds_back_split_emoji(tok):
    ids = tok.encode("😀")
    assert len(ids) > 1
    detok = IncrementalDetokenizer(tok)
    assert [detok.push([i]) for i in ids] == [""] * (len(ids) - 1) + ["😀"]


@given(data=st.data())
@HYPO
def test_detokenizer_prompt_priming(tok, data):
    pool = tok.encode(_POOL_TEXT)
    prompt = data.draw(st.lists(st.sampled_from(pool), max_size=8))
    ids, chunks = data.draw(id_streams(pool))
    detok = IncrementalDetokenizer(tok, prompt_ids=prompt)
    out = "".join(detok.push(c) for c in chunks) + detok.flush()
    assert detok.prompt_text + out == tok.decode(prompt + ids)


def test_detokenizer_character_across_prompt_boundary(tok):
    ids = tok.encode("ab😀")
    detok = IncrementalDetokenizer(tok, prompt_ids=ids[:-1])
    assert detok.prompt_text == "ab"
    assert detok.push(ids[-1:]) == "😀"


# ---- stop strings ------------------------------------------------------------------------------


def run_stop(stops, deltas, include=False):
    m = StopStringMatcher(stops, include_stop_str_in_output=include)
    out, stopped_by = [], None
    for d in deltas:
        text, stopped, which = m.push(d)
        out.append(text)
        if stopped:
            stopped_by = which
            break
    else:
        out.append(m.flush())
    return "".join(out), stopped_by, out


def test_stop_split_across_deltas():
    text, which, parts = run_stop(["STOP"], ["Hello S", "TO", "P world"])
    assert (text, which) == ("Hello ", "STOP")
    assert parts[:2] == ["Hello ", ""]  # "S" and "STO" held back, never emitted


def test_stop_include_in_output():
    assert run_stop(["STOP"], ["Hello S", "TO", "P world"], include=True)[:2] == ("Hello STOP", "STOP")


def test_false_start_is_released():
    text, which, parts = run_stop(["STOP"], ["a ST", "AR", "T"])
    assert which is None and text == "a STAR" + "T"
    assert parts == ["a ", "STAR", "T", ""]


def test_overlapping_prefixes():
    # "aab" held as possible start of "aabc"; the true match starts one character later.
    assert run_stop(["abc"], ["a", "a", "b", "c"])[:2] == ("a", "abc")
    assert run_stop(["abab"], ["ab", "a", "b", "ab"])[:2] == ("", "abab")
    assert run_stop(["xyz", "yz!"], ["x", "y", "z!"])[:2] == ("", "xyz")


def test_earliest_completing_stop_wins():
    assert run_stop(["abc", "b"], ["abc"])[:2] == ("a", "b")
    assert run_stop(["bc", "abc"], ["abc"])[:2] == ("", "abc")  # same end: earlier start
    assert run_stop(["\n\n", "User:"], ["ok\n", "\nUser:"])[:2] == ("ok", "\n\n")


def test_flush_returns_held_text():
    m = StopStringMatcher(["</s>"])
    assert m.push("end </") == ("end ", False, None)
    assert m.flush() == "</"
    assert m.flush() == ""


def test_after_stop_nothing_more():
    m = StopStringMatcher(["."])
    assert m.push("a.b") == ("a", True, ".")
    assert m.push("more") == ("", True, ".")
    assert m.flush() == ""


def test_no_stop_strings_passes_through():
    m = StopStringMatcher([])
    assert m.push("abc") == ("abc", False, None)


def test_empty_stop_string_refused():
    with pytest.raises(ValueError):
        StopStringMatcher(["ok", ""])


def reference_stop(text, stops, include):
    best = None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best is None or (i + len(s), i) < best[:2]):
            best = (i + len(s), i, s)
    if best is None:
        return text, None
    end, start, s = best
    return text[: end if include else start], s


@given(
    text=st.text(alphabet="abc\n", max_size=30),
    stops=st.lists(st.text(alphabet="abc\n", min_size=1, max_size=4), max_size=3),
    cuts=st.lists(st.integers(0, 30), max_size=8),
    include=st.booleans(),
)
@settings(max_examples=500, deadline=None)
def test_stop_matcher_independent_of_chunking(text, stops, cuts, include):
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    deltas = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    got_text, got_stop, parts = run_stop(stops, deltas, include)
    assert (got_text, got_stop) == reference_stop(text, stops, include)
    # text emitted before the final push never contains a stop string
    emitted_early = "".join(parts[:-1])
    assert not any(s in emitted_early for s in stops)
