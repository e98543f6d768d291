"""Tokenizer vocabularies rebuilt from GGUF metadata, as `tokenizers` pipelines.

A GGUF file carries no tokenizer.json: its tokenizer is the `tokenizer.ggml.*` metadata (keys as in
the GGUF spec, https://github.com/ggml-org/ggml/blob/master/docs/gguf.md) that llama.cpp's
converter writes and llama.cpp's `src/llama-vocab.cpp` reads. `build_gguf_vocab` turns it into a
`tokenizers.Tokenizer` that splits text the way llama.cpp does, for the two vocabulary kinds that
the supported families use:

    tokenizer.ggml.model  kind                         families
    "gpt2"                byte-level BPE + merges      Llama 3.x, Qwen2.5, Qwen3, SmolLM, Mistral
                          + a `tokenizer.ggml.pre`       Nemo (tekken), DeepSeek-R1 distills
                          pre-tokenizer
    "llama"               SentencePiece BPE: scores,   Llama 2, Mistral 7B, Phi-3, Gemma 2/3
                          `<0xNN>` byte fallback, U+2581
                          for a space

Byte-level BPE (`gpt2`):

    text --added-token split--> pieces --pre-tokenizer regexes--> words --bytes_to_unicode--> BPE --> ids

  Each regex of llama.cpp's `regex_exprs` for the file's pre-tokenizer splits the pieces of the
  previous one, keeping the text between matches as pieces of its own; `Split(..., "isolated")` in
  sequence does the same. The regexes are written as in the models' tokenizer.json (llama.cpp
  rewrites some, e.g. `(?i:'s)` as `'[sS]`, for its own regex engine; the `tokenizers` library runs
  the originals). An unknown pre-tokenizer name is refused: no other regex splits text the way the
  merges were learned.

SentencePiece (`llama`):

    text --added-token split--> pieces --prepend U+2581 (add_space_prefix), space -> U+2581-->
         --BPE over the whole piece, merges in score order--> ids; a character outside the
         vocabulary --> its UTF-8 bytes as <0xNN> tokens

  SentencePiece's BPE merges, at each step, the adjacent pair whose concatenation is the
  best-scoring vocabulary entry (sentencepiece `bpe_model.cc`, llama.cpp `llm_tokenizer_spm`). A
  GGUF stores the scores, not merges, so the merges are derived: every split of a normal token
  into two vocabulary entries, ranked by the token's score, as transformers' SentencePiece
  converter writes them into tokenizer.json. llama.cpp puts a space before the text of every piece
  between added tokens when `add_space_prefix` is set (default for this kind; Gemma's files say
  false); the `Prepend` normalizer, which `tokenizers` runs on each such piece, does the same, as
  in Llama 2's tokenizer.json.

Added tokens, from `tokenizer.ggml.token_type` (llama.cpp `llama_token_type`): control (3) and
unknown (2) tokens are special tokens, user-defined (4) ones (`<think>`, Gemma's runs of spaces)
added tokens that are not special; both are matched whole in the input text before anything else,
as llama.cpp's `tokenizer_st_partition` does.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, NamedTuple

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from shardline.model_file import ModelError

logger = logging.getLogger(__name__)

# GGUF token types (llama.cpp `llama_token_type`).
TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_UNKNOWN = 2
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4
TOKEN_TYPE_UNUSED = 5
TOKEN_TYPE_BYTE = 6

SPACE = "\u2581"  # SentencePiece's spelling of a space ("▁")

# ---- byte-level BPE pre-tokenizers ---------------------------------------------------------------

# Regexes from llama.cpp's src/llama-vocab.cpp (`regex_exprs` per `LLAMA_VOCAB_PRE_TYPE_*`), in the
# form the models' tokenizer.json writes them.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


class PreTokenizer(NamedTuple):
    """How llama.cpp pre-tokenizes for one `tokenizer.ggml.pre` value.

    `splits`: the regexes, applied one after the other. `ignore_merges`: a word that is itself a
    vocabulary entry becomes that token without merging (llama.cpp sets it for llama-bpe and
    tekken). `add_bos`: whether BOS is prepended when the file has no
    `tokenizer.ggml.add_bos_token`.
    """

    splits: tuple[str, ...]
    ignore_merges: bool = False
    add_bos: bool = False


_GPT2 = PreTokenizer((_GPT2_SPLIT,))
_DIGITS_GPT2 = PreTokenizer((r"\p{N}", _GPT2_SPLIT))  # tokenizer.json: Digits(individual_digits) + ByteLevel
_LLAMA3 = PreTokenizer((_LLAMA3_SPLIT,), ignore_merges=True, add_bos=True)
_QWEN2 = PreTokenizer((_QWEN2_SPLIT,))

# `tokenizer.ggml.pre` -> pre-tokenizer, for the names llama.cpp maps to these regexes.
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    # llama.cpp's regexes for "default" (also what it uses when the key is missing)
    "default": PreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", _GPT2_SPLIT, r"\p{N}+", r"[0-9][0-9][0-9]")),
    "gpt-2": _GPT2,
    "gpt2": _GPT2,  # the tokenizer.ggml.model value, accepted as a pre name too
    "phi-2": _GPT2,
    "mpt": _GPT2,
    "olmo": _GPT2,
    "jais": _GPT2,
    "exaone4": _GPT2,
    "smollm": _DIGITS_GPT2,
    "starcoder": _DIGITS_GPT2,
    "refact": _DIGITS_GPT2,
    "command-r": _DIGITS_GPT2,
    "codeshell": _DIGITS_GPT2,
    "exaone": _DIGITS_GPT2,
    "minerva-7b": _DIGITS_GPT2,
    "llama-bpe": _LLAMA3,
    "llama3": _LLAMA3,
    "llama-v3": _LLAMA3,
    "falcon3": _LLAMA3,
    "pixtral": _LLAMA3,
    "dbrx": PreTokenizer((_LLAMA3_SPLIT,)),
    "smaug-bpe": PreTokenizer((_LLAMA3_SPLIT,)),
    "qwen2": _QWEN2,
    "deepseek-r1-qwen": _QWEN2,
    "stablelm2": _QWEN2,
    "megrez": _QWEN2,
    "qwen35": PreTokenizer((_QWEN35_SPLIT,)),
    "tekken": PreTokenizer((_TEKKEN_SPLIT,), ignore_merges=True),
    "gpt-4o": PreTokenizer((_GPT4O_SPLIT,)),
    "llama4": PreTokenizer((_GPT4O_SPLIT,)),
}

SUPPORTED_TOKENIZER_MODELS = ("gpt2", "llama")


# ---- byte spellings ------------------------------------------------------------------------------


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte 0..255 to the printable character that spells it in a
    byte-level vocabulary (openai/gpt-2 `encoder.py`)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


_BYTE_OF_CHAR = {c: b for b, c in bytes_to_unicode().items()}
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def byte_level_bytes(token: str) -> bytes:
    """Raw bytes of a byte-level BPE vocabulary entry; text outside the byte alphabet (added tokens
    such as `<｜User｜>`) is taken as UTF-8, as the `tokenizers` ByteLevel decoder does."""
    try:
        return bytes(_BYTE_OF_CHAR[c] for c in token)
    except KeyError:
        return token.encode("utf-8")


def sentencepiece_bytes(token: str) -> bytes:
    """Raw bytes of a SentencePiece vocabulary entry: `<0xNN>` is byte NN (byte fallback), U+2581
    is a space, the rest is UTF-8 text."""
    m = _BYTE_TOKEN.fullmatch(token)
    if m:
        return bytes([int(m.group(1), 16)])
    return token.replace(SPACE, " ").encode("utf-8")


# ---- building ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GGUFVocab:
    """A GGUF file's tokenizer: the `tokenizers` pipeline plus what it cannot hold.

    `tokens[i]` is token id i as the file spells it; `token_bytes[i]` the raw bytes it stands for
    (special tokens: their UTF-8 text); `special_ids` the control and unknown tokens. Token ids
    are ints in `[0, len(tokens))`.
    """

    tokenizer: HFTokenizer
    model: str
    pre: str | None
    tokens: list[str]
    token_bytes: list[bytes]
    special_ids: frozenset[int]
    bos_token_id: int | None
    eos_token_id: int | None
    unk_token_id: int | None
    pad_token_id: int | None
    add_bos_token: bool
    add_eos_token: bool


def build_gguf_vocab(meta: dict[str, Any], source: str = "GGUF") -> GGUFVocab:
    """The tokenizer described by GGUF metadata `meta` (`tokenizer.*` keys and their values, as
    `gguf.ReaderField.contents()` gives them).

    `tokenizer.ggml.model` "gpt2" is byte-level BPE with `tokenizer.ggml.merges` and the
    `tokenizer.ggml.pre` pre-tokenizer (missing: llama.cpp's "default", with a warning); "llama"
    is SentencePiece BPE from `tokenizer.ggml.scores`, with `tokenizer.ggml.add_space_prefix`
    (default true). `add_bos_token` / `add_eos_token` come from `tokenizer.ggml.add_bos_token` /
    `add_eos_token`, else llama.cpp's defaults (BOS for SentencePiece and Llama 3's pre-tokenizer).

    Raises:
        ModelError: no token list, a tokenizer model other than "gpt2" / "llama", a pre-tokenizer
            not in `PRE_TOKENIZERS`, BPE without merges, SentencePiece without scores, or token
            metadata of the wrong length. `source` (the file) is named in the message.
    """
    model = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ModelError(f"{source}: no tokenizer.ggml.tokens; the coordinator needs the model's vocabulary")
    tokens = [str(t) for t in tokens]
    types = meta.get("tokenizer.ggml.token_type")
    types = [int(t) for t in types] if types is not None else [TOKEN_TYPE_NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise ModelError(f"{source}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")

    pre: str | None = None
    if model == "gpt2":
        pre = meta.get("tokenizer.ggml.pre") or None
        tok, add_bos_default = _byte_level_bpe(meta, tokens, pre, source)
        token_bytes = [byte_level_bytes(t) for t in tokens]
    elif model == "llama":
        tok = _sentencepiece_bpe(meta, tokens, types, source)
        add_bos_default = True
        token_bytes = [sentencepiece_bytes(t) if ty in (TOKEN_TYPE_NORMAL, TOKEN_TYPE_BYTE) else t.encode("utf-8")
                       for t, ty in zip(tokens, types)]
    else:
        raise ModelError(f"{source}: tokenizer.ggml.model {model!r} is not supported "
                         f"(supported: {', '.join(repr(m) for m in SUPPORTED_TOKENIZER_MODELS)})")

    special_ids = {i for i, ty in enumerate(types) if ty in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_UNKNOWN)}
    user_ids = [i for i, ty in enumerate(types) if ty == TOKEN_TYPE_USER_DEFINED]
    # An added token whose text is already in the vocabulary keeps that id.
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in sorted(special_ids)])
    tok.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i in user_ids])
    assert tok.get_vocab_size(with_added_tokens=True) == len(set(tokens)), "added tokens grew the vocabulary"

    def token_id(key: str) -> int | None:
        v = meta.get(f"tokenizer.ggml.{key}")
        if v is None:
            return None
        if not 0 <= int(v) < len(tokens):
            raise ModelError(f"{source}: tokenizer.ggml.{key} = {v} is outside the vocabulary [0, {len(tokens)})")
        return int(v)

    add_bos = meta.get("tokenizer.ggml.add_bos_token")
    add_eos = meta.get("tokenizer.ggml.add_eos_token")
    return GGUFVocab(
        tokenizer=tok,
        model=model,
        pre=pre,
        tokens=tokens,
        token_bytes=token_bytes,
        special_ids=frozenset(special_ids),
        bos_token_id=token_id("bos_token_id"),
        eos_token_id=token_id("eos_token_id"),
        unk_token_id=token_id("unknown_token_id"),
        pad_token_id=token_id("padding_token_id"),
        add_bos_token=bool(add_bos_default if add_bos is None else add_bos),
        add_eos_token=bool(add_eos),
    )


def _vocab_dict(tokens: list[str], source: str) -> dict[str, int]:
    """token text -> id; a text listed twice keeps its first id (llama.cpp's `token_to_id` keeps
    the last, but a duplicate is a converter bug either way, so it is logged)."""
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        if t in vocab:
            logger.warning("%s: token %r appears at ids %d and %d; keeping %d", source, t, vocab[t], i, vocab[t])
            continue
        vocab[t] = i
    return vocab


def _byte_level_bpe(meta: dict[str, Any], tokens: list[str], pre: str | None, source: str) -> tuple[HFTokenizer, bool]:
    merges_raw = meta.get("tokenizer.ggml.merges")
    if not merges_raw:
        raise ModelError(f"{source}: byte-level BPE tokenizer ('gpt2') without tokenizer.ggml.merges")
    if pre is None:
        logger.warning("%s: no tokenizer.ggml.pre; using llama.cpp's 'default' pre-tokenizer, as llama.cpp does "
                       "(generation quality may suffer: reconvert the model)", source)
        spec = PRE_TOKENIZERS["default"]
    elif pre in PRE_TOKENIZERS:
        spec = PRE_TOKENIZERS[pre]
    else:
        raise ModelError(f"{source}: tokenizer.ggml.pre {pre!r} is not a known pre-tokenizer "
                         f"(known: {', '.join(sorted(PRE_TOKENIZERS))}); its regexes decide how text is split, "
                         f"so no other one can stand in for it")
    # A merge is "left right"; llama.cpp splits at the first space after the first character.
    merges = []
    for m in merges_raw:
        pos = m.find(" ", 1)
        if pos < 0:
            raise ModelError(f"{source}: tokenizer.ggml.merges entry {m!r} is not 'left right'")
        merges.append((m[:pos], m[pos + 1:]))
    tok = HFTokenizer(models.BPE(vocab=_vocab_dict(tokens, source), merges=merges, ignore_merges=spec.ignore_merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in spec.splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    return tok, spec.add_bos


def sentencepiece_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's score-ordered merging.

    For every normal token, each split into two vocabulary entries is a merge; merges are ranked
    by the merged token's score, best first (ties: the longer left part first, then file order),
    as transformers' `generate_merges` writes a SentencePiece model's merges into tokenizer.json.
    """
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    candidates = []  # (score, len(left), len(right), order, left, right)
    for i, t in enumerate(tokens):
        if types[i] != TOKEN_TYPE_NORMAL or vocab[t] != i or len(t) < 2:
            continue
        splits = [(t[:k], t[k:]) for k in range(1, len(t)) if t[:k] in vocab and t[k:] in vocab]
        splits.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        for left, right in splits:
            candidates.append((scores[i], len(left), len(right), -len(candidates), left, right))
    candidates.sort(reverse=True)
    return [(c[4], c[5]) for c in candidates]


def _sentencepiece_bpe(meta: dict[str, Any], tokens: list[str], types: list[int], source: str) -> HFTokenizer:
    scores = meta.get("tokenizer.ggml.scores")
    if scores is None:
        raise ModelError(f"{source}: tokenizer.ggml.model 'llama' (SentencePiece) without tokenizer.ggml.scores; "
                         f"the scores decide the merge order")
    scores = [float(s) for s in scores]
    if len(scores) != len(tokens):
        raise ModelError(f"{source}: tokenizer.ggml.scores has {len(scores)} entries for {len(tokens)} tokens")
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    if unk_id is None:
        unk_id = next((i for i, ty in enumerate(types) if ty == TOKEN_TYPE_UNKNOWN), None)
    tok = HFTokenizer(models.BPE(
        vocab=_vocab_dict(tokens, source),
        merges=sentencepiece_merges(tokens, scores, types),
        unk_token=tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None,
        fuse_unk=True,
        byte_fallback=True,
    ))
    add_space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    steps = [normalizers.Prepend(SPACE)] if add_space_prefix else []
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", SPACE)])
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(steps)
    return tok
