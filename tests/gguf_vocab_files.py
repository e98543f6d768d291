"""Small tokenizer vocabularies for tests, written as GGUF metadata the way llama.cpp's converter
(convert_hf_to_gguf.py: `get_vocab_base` + `_set_vocab_gpt2`, `_create_vocab_sentencepiece` +
`_set_vocab_sentencepiece`) writes them, beside the tokenizer they came from.

Byte-level BPE: a BPE trained here with the `tokenizers` library, with the family's pre-tokenizer
as its tokenizer.json has it, saved as a Hugging Face tokenizer directory (tokenizer.json +
tokenizer_config.json) and converted to GGUF. SentencePiece: a BPE model trained here with the
`sentencepiece` library (byte fallback, as Llama 2 / Gemma's tokenizer.model), converted to GGUF.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

# The families' split regexes from transformers (Qwen2's tokenizer module; the Llama 3 and tekken
# ones its GGUF loader writes), not from the code under test.
from transformers.integrations.gguf.gguf_tokenizer_mapping import _LLAMA3_SPLIT, _TEKKEN_SPLIT
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as _QWEN2_SPLIT

# Training text: prose, code, CJK, emoji, digits and whitespace runs, so that the vocabulary has
# merges inside each (every byte is in the alphabet anyway).
CORPUS = [
    "Hello, world! It's a test of the tokenizer; we're checking what they'll do with I'VE and 'S.",
    "The quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX. camelCaseWords and snake_case_words.",
    "日本語の文章と中文句子，还有한국어의 문장. 東京は日本の首都です。北京是中国的首都。",
    "emoji 😀👍🏽👨‍👩‍👧‍👦 🇫🇷 ✅ ❤️ and more 😀😀",
    "def f(x):\n    return {'a': x ** 2}  # comment\n\nclass A:\n\tpass\n",
    "numbers 1234567890 3.14159 1,000,000 2024-06-01 007 42",
    "  leading spaces,   runs of   spaces\ttabs\t\tand\n\nnewlines\r\n\n   \n    indented",
    "café naïve Ωμέγα ∑∫ — “quotes” ‘single’ …",
]

# Texts the tokenizers are compared on.
TEXTS = [
    "Hello, world! It's 2024-06-01 and we're testing.",
    "日本語の文章と中文句子，还有한국어.",
    "emoji 😀👍🏽👨‍👩‍👧‍👦 🇫🇷 and ✅",
    "def f(x):\n    return {'a': x ** 2}  # comment\n",
    "digits 1234567890 3.14159 1,000,000 12345678901234",
    "  leading spaces,   runs of   spaces\ttabs\t\tand\n\nnewlines\r\n\n   \n",
    " a",
    "trailing   ",
    "\n\n\n",
    "I'VE 'S 'll shouting CASE Mixed ThisIsCamelCase",
    "unseen: Ж ऋ 🦙 𝕏 ǅ",
    "",
]


def _byte_level(regexes: list[str]) -> pre_tokenizers.PreTokenizer:
    """Split(regex, isolated) for each regex, then ByteLevel without its own regex (Llama 3 / Qwen2
    tokenizer.json)."""
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated", invert=False) for r in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)]
    )


# family -> (tokenizer.ggml.pre, pre-tokenizer as the family's tokenizer.json has it, BPE
# ignore_merges, special tokens (bos first, eos second), tokenizer_config add_bos_token)
BYTE_LEVEL_FAMILIES = {
    "llama3": ("llama-bpe", lambda: _byte_level([_LLAMA3_SPLIT]), True,
               ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               True),
    "qwen2.5": ("qwen2", lambda: _byte_level([_QWEN2_SPLIT]), False,
                ["<|endoftext|>", "<|im_end|>", "<|im_start|>"], False),
    "deepseek-r1-qwen": ("deepseek-r1-qwen", lambda: _byte_level([_QWEN2_SPLIT]), False,
                         ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"], True),
    "smollm": ("smollm", lambda: pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)]), False,
        ["<|endoftext|>", "<|im_end|>", "<|im_start|>"], False),
    "gpt2": ("gpt-2", lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
             False, ["<|endoftext|>", "<|sep|>"], False),
    "mistral-nemo": ("tekken", lambda: _byte_level([_TEKKEN_SPLIT]), True,
                     ["<s>", "</s>", "[INST]", "[/INST]"], True),
}

USER_DEFINED = ["<think>", "</think>"]  # added tokens that are not special


def train_byte_level_bpe(directory: Path, family: str, vocab_size: int = 700) -> Path:
    """A byte-level BPE in the family's shape, saved as a Hugging Face tokenizer directory."""
    _, make_pre, ignore_merges, specials, add_bos = BYTE_LEVEL_FAMILIES[family]
    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    tok.pre_tokenizer = make_pre()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 3, trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in USER_DEFINED])
    bos, eos = specials[0], specials[1]
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
        "add_bos_token": add_bos, "clean_up_tokenization_spaces": False, "model_max_length": 4096,
    }))
    return directory


def write_byte_level_gguf(path: Path, hf_dir: Path, pre: str, arch: str = "llama") -> Path:
    """GGUF tokenizer metadata of the Hugging Face tokenizer in `hf_dir`, as convert_hf_to_gguf.py's
    `_set_vocab_gpt2` writes it: tokens by id, CONTROL for added special tokens, USER_DEFINED for
    other added tokens, the merges, special token ids, add_bos and the chat template."""
    tok = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    vocab = tok.get_vocab(with_added_tokens=True)
    added = tok.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(len(vocab)):
        token = tok.id_to_token(i)
        tokens.append(token)
        if i in added:
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    gguf.SpecialVocab(hf_dir, load_merges=True).add_to_gguf(w, quiet=True)
    _finish(w)
    return path


def train_sentencepiece(directory: Path, *, add_dummy_prefix: bool, user_defined: list[str] = (),
                        vocab_size: int = 500) -> Path:
    """A SentencePiece BPE model with byte fallback (Llama 2 / Gemma's kind), trained here;
    returns the tokenizer.model path."""
    import sentencepiece as spm

    directory.mkdir(parents=True, exist_ok=True)
    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join(CORPUS * 3))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(directory / "tokenizer"), model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, character_coverage=0.98, add_dummy_prefix=add_dummy_prefix,
        remove_extra_whitespaces=False, normalization_rule_name="identity", allow_whitespace_only_pieces=True,
        split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False, minloglevel=2,
        user_defined_symbols=list(user_defined), num_threads=1)
    return directory / "tokenizer.model"


def write_sentencepiece_gguf(path: Path, model_file: Path, *, arch: str = "llama", user_defined: list[str] = (),
                             add_space_prefix: bool | None = None, chat_template: str | None = None) -> Path:
    """GGUF tokenizer metadata of a SentencePiece model, as convert_hf_to_gguf.py's
    `_create_vocab_sentencepiece` + `_set_vocab_sentencepiece` write it (`tokenizer.ggml.model`
    "llama", pieces, scores, token types; Gemma's converters add add_space_prefix = False).
    `user_defined`: pieces typed USER_DEFINED with U+2581 respelled as spaces, as the converter does
    for tokenizer_config.json's added tokens that are not special."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        piece = sp.id_to_piece(i)
        scores.append(sp.get_score(i))
        if piece in user_defined:
            piece = piece.replace("\u2581", " ")
            types.append(gguf.TokenType.USER_DEFINED)
        elif sp.is_unknown(i):
            types.append(gguf.TokenType.UNKNOWN)
        elif sp.is_control(i):
            types.append(gguf.TokenType.CONTROL)
        elif sp.is_unused(i):
            types.append(gguf.TokenType.UNUSED)
        elif sp.is_byte(i):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(piece)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    if add_space_prefix is not None:
        w.add_add_space_prefix(add_space_prefix)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    _finish(w)
    return path


def _finish(w: gguf.GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
