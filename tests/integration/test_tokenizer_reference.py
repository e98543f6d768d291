"""Our GGUF tokenizer against transformers' GGUF tokenizer on the same file (SmolLM2-135M).

transformers has no "smollm" pre-tokenizer for GGUF files and falls back to GPT-2 splitting; the
two agree except where a non-ASCII numeral (like "²") follows a space. For those we compare with
the tokenizer.json pre-tokenizer (`split_digits=True`) and mark the stock comparison xfail.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardline.coordinator.tokenizer import IncrementalDetokenizer, Tokenizer
from shardline.model_file import resolve_model_path
from tests.reference import load_reference_tokenizer, reference_logits

pytestmark = pytest.mark.integration

STRINGS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "日本語のテキストと中文文本，还有한국어.",
    "emoji 😀🎉🚀 skin tones 👍🏻👍🏽👍🏿 ZWJ 👨‍👩‍👧‍👦 👩🏽‍💻 flags 🇫🇷🇯🇵 ❤️",
    "café naïve résumé Ångström façade Straße ñandú",
    " leading space",
    "   three leading spaces",
    "multiple    spaces   inside  ",
    "tabs\tand\t\ttabs",
    "new\nlines\n\n\nand trailing\n",
    "windows\r\nline\r\nendings\r\n",
    "12345",
    " 12345 67 8.9 1,000,000 2024-01-31",
    "x = [1, 2, 3]\nfor i in range(10):\n    print(f'{i:>3}')  # comment\n",
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>assistant\nSure!<|im_end|>\n<|endoftext|>",
    "Hello , world . It 's  don't I'M",
    "x² + y² = z², CJK 一二三 ３",
    "",
]

# Where stock transformers differs (a space, then a numeral other than 0-9): " ²" is one word for
# GPT-2 splitting, two for "smollm" (llama.cpp, SmolLM2's tokenizer.json).
NUMERAL_STRINGS = ["e = mc ²", "½ cup and ¾ spoon", " ٣٤٥ arabic-indic"]

CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "user", "content": "Bonjour 😀"},
        {"role": "assistant", "content": "Salut !"},
        {"role": "user", "content": "  spaces\nand lines  "},
    ],
]


@pytest.fixture(scope="module")
def ours() -> Tokenizer:
    return Tokenizer.from_gguf(resolve_model_path("smollm2-135m"))


@pytest.fixture(scope="module")
def ref():
    return load_reference_tokenizer()


@pytest.fixture(scope="module")
def ref_split():
    return load_reference_tokenizer(split_digits=True)


@pytest.mark.parametrize("text", STRINGS)
def test_ids_match_transformers(ours, ref, text):
    assert ours.encode(text) == ref.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("text", STRINGS)
def test_decode_round_trips(ours, ref, text):
    ids = ours.encode(text)
    assert ours.decode(ids) == text
    assert ours.decode(ids) == ref.decode(ids)
    assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    detok = IncrementalDetokenizer(ours)
    assert "".join(detok.push([i]) for i in ids) + detok.flush() == text


def test_digits_split_like_transformers(ours, ref):
    ids = ours.encode("12345")
    assert ids == ref.encode("12345", add_special_tokens=False)
    assert [ours.decode([i]) for i in ids] == list("12345")


def test_special_token_is_one_id(ours, ref):
    text = "<|im_start|>user\nhi<|im_end|>"
    assert ours.encode(text)[0] == ref.convert_tokens_to_ids("<|im_start|>") == 1
    assert ours.encode(text)[-1] == ref.convert_tokens_to_ids("<|im_end|>") == ours.eos_token_id


@pytest.mark.parametrize("text", NUMERAL_STRINGS + STRINGS)
def test_ids_match_tokenizer_json_pre_tokenizer(ours, ref_split, text):
    assert ours.encode(text) == ref_split.encode(text, add_special_tokens=False)
    assert ours.decode(ours.encode(text)) == text


@pytest.mark.xfail(reason="transformers' GGUF loader has no 'smollm' pre-tokenizer (no numeral split)", strict=True)
@pytest.mark.parametrize("text", NUMERAL_STRINGS)
def test_numerals_vs_stock_transformers(ours, ref, text):
    assert ours.encode(text) == ref.encode(text, add_special_tokens=False)


@given(st.text(max_size=80))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_random_text_matches_reference(ours, ref_split, text):
    assert ours.encode(text) == ref_split.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(ours, ref, messages, add_generation_prompt):
    expected = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    got = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert got == expected
    assert ours.encode(got) == ref.encode(expected, add_special_tokens=False)


@pytest.mark.slow
def test_reference_logits_shape_and_causality(ours):
    prompt = ours.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    ids = ours.encode(prompt)
    logits = reference_logits(ids)  # [T, vocab]
    assert logits.shape == (len(ids), ours.vocab_size) and logits.dtype == np.float32
    assert np.isfinite(logits).all()
    # causal: a prefix's logits are the full sequence's logits at the same positions
    np.testing.assert_allclose(reference_logits(ids[:10]), logits[:10], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError):
        reference_logits([])
