"""Tokenizer, incremental detokenizer and stop-string matcher for the coordinator.

The tokenizer is rebuilt from a GGUF file's metadata (keys as in the GGUF spec,
https://github.com/ggml-org/ggml/blob/master/docs/gguf.md, `tokenizer.ggml.*`): the vocabulary and
merges go into a `tokenizers` byte-level BPE model, and the pre-tokenizer regexes are the ones
llama.cpp uses for the file's `tokenizer.ggml.pre` value (src/llama-vocab.cpp, `regex_exprs`).
A Hugging Face checkpoint directory's tokenizer.json is loaded as is (`Tokenizer.from_hf_directory`).

    text --added-token split--> pieces --regex splits--> words --byte map--> BPE --> ids
    ids  --token_bytes--> raw UTF-8 bytes --decode--> text

Byte-level BPE spells every byte as one printable character (GPT-2's `bytes_to_unicode`), so a
token is a sequence of raw bytes and may end in the middle of a UTF-8 character; that is why
streaming goes through `IncrementalDetokenizer`, which holds back incomplete characters.
"""

from __future__ import annotations

import codecs
import json
import logging
import os
import re
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as _HFTokenizer

logger = logging.getLogger(__name__)

# GGUF token types (llama.cpp `llama_token_type`): 1 normal, 2 unknown, 3 control, 4 user-defined,
# 5 unused, 6 byte.
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4

# Pre-tokenizer regexes, from llama.cpp's src/llama-vocab.cpp (`regex_exprs` per
# `LLAMA_VOCAB_PRE_TYPE_*`), written as in the models' tokenizer.json. llama.cpp applies them one
# after the other, each splitting the pieces of the previous one and keeping unmatched text as its
# own piece; `pre_tokenizers.Split(..., behavior="isolated")` in sequence does the same.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# `tokenizer.ggml.pre` -> (regexes applied in order, BPE ignore_merges). llama.cpp sets
# `ignore_merges` for llama-3: a word that is itself a vocabulary entry is not merged piecewise.
PRE_TOKENIZER_SPLITS: dict[str, tuple[tuple[str, ...], bool]] = {
    # digits split one by one first (tokenizer.json: Digits(individual_digits) + ByteLevel)
    "smollm": ((r"\p{N}", _GPT2_SPLIT), False),
    "starcoder": ((r"\p{N}", _GPT2_SPLIT), False),
    "refact": ((r"\p{N}", _GPT2_SPLIT), False),
    "codeshell": ((r"\p{N}", _GPT2_SPLIT), False),
    "gpt2": ((_GPT2_SPLIT,), False),
    "default": ((_GPT2_SPLIT,), False),
    "mpt": ((_GPT2_SPLIT,), False),
    "olmo": ((_GPT2_SPLIT,), False),
    "llama-bpe": ((_LLAMA3_SPLIT,), True),
    "llama3": ((_LLAMA3_SPLIT,), True),
    "llama-v3": ((_LLAMA3_SPLIT,), True),
    "dbrx": ((_LLAMA3_SPLIT,), False),
    "smaug-bpe": ((_LLAMA3_SPLIT,), False),
    "qwen2": ((_QWEN2_SPLIT,), False),
    "stablelm2": ((_QWEN2_SPLIT,), False),
    "deepseek-r1-qwen": ((_QWEN2_SPLIT,), False),
}
_FALLBACK_PRE = "gpt2"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte 0..255 to the printable character that spells it in the vocab."""
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


def _spelled_bytes(token: str) -> bytes:
    """Raw bytes of a vocabulary entry; text outside the byte alphabet is taken as UTF-8, as the
    `tokenizers` ByteLevel decoder does."""
    try:
        return bytes(_BYTE_OF_CHAR[c] for c in token)
    except KeyError:
        return token.encode("utf-8")


def _sentencepiece_bytes(token: str) -> bytes:
    """Raw bytes of a SentencePiece-style BPE token: `<0xNN>` is byte NN (byte fallback), U+2581
    is a space, the rest is UTF-8 text."""
    m = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", token)
    if m:
        return bytes([int(m.group(1), 16)])
    return token.replace("\u2581", " ").encode("utf-8")


def _has_component(node: Any, kind: str) -> bool:
    """True when a tokenizer.json component (possibly a Sequence of them) has `type == kind`."""
    if not isinstance(node, dict):
        return False
    if node.get("type") == kind:
        return True
    return any(_has_component(n, kind) for key in ("decoders", "pretokenizers") for n in node.get(key) or [])


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _read_gguf_tokenizer(path: str | os.PathLike) -> dict[str, Any]:
    from shardline.model_file import open_gguf

    reader = open_gguf(path)
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.") or key == "general.architecture":
            meta[key] = field.contents()
    return meta


class Tokenizer:
    """Byte-level BPE tokenizer rebuilt from GGUF metadata, plus the model's chat template.

    Build it with `Tokenizer.from_gguf(path)`. Token ids are ints in `[0, vocab_size)`.
    Control tokens (GGUF token type 3, e.g. `<|im_start|>`) are special tokens: they are matched
    whole in input text and dropped by `decode(..., skip_special_tokens=True)`. User-defined tokens
    (type 4) are matched whole too but are not special.
    """

    def __init__(
        self,
        hf_tokenizer: _HFTokenizer,
        tokens: list[str],
        special_ids: set[int],
        *,
        bos_token_id: int | None,
        eos_token_id: int | None,
        unk_token_id: int | None = None,
        pad_token_id: int | None = None,
        add_bos_token: bool = False,
        add_eos_token: bool = False,
        chat_template: str | None = None,
        pre: str | None = None,
        token_bytes: list[bytes] | None = None,
    ):
        self._tok = hf_tokenizer
        self._tokens = tokens
        self.special_ids = frozenset(special_ids)
        self._bos_token_id = bos_token_id
        self._eos_token_id = eos_token_id
        self.unk_token_id = unk_token_id
        self.pad_token_id = pad_token_id
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        self.chat_template = chat_template
        self.pre = pre
        # token id -> raw bytes; special tokens are spelled by their text (as in decode()).
        # Byte-level BPE unless the caller gives them (SentencePiece-style vocabularies).
        self._token_bytes: list[bytes] = token_bytes if token_bytes is not None else [_spelled_bytes(t) for t in tokens]
        self._compiled_template = None
        # No token stands for more characters than it has bytes (a character is >= 1 UTF-8 byte),
        # so a text of more than n * max_token_chars characters encodes to more than n tokens:
        # `max_chars_for` lets a caller refuse such a text without tokenizing it.
        self.max_token_chars = max((len(b) for b in self._token_bytes), default=1) or 1

    def max_chars_for(self, num_tokens: int) -> int:
        """Characters beyond which any text encodes to more than `num_tokens` tokens."""
        return num_tokens * self.max_token_chars

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> "Tokenizer":
        """Read `tokenizer.ggml.*` and `tokenizer.chat_template` from a GGUF file.

        Supports `tokenizer.ggml.model == "gpt2"` (byte-level BPE). The pre-tokenizer follows
        `tokenizer.ggml.pre` (see `PRE_TOKENIZER_SPLITS`); an unknown value falls back to GPT-2's
        regex with a logged warning.

        Raises:
            ValueError: the file has no tokenizer, a tokenizer model other than "gpt2" (e.g.
                "llama" sentencepiece), or no merges.
        """
        meta = _read_gguf_tokenizer(path)
        model = meta.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise ValueError(
                f"{path}: tokenizer.ggml.model is {model!r}; only byte-level BPE ('gpt2') is supported"
            )
        tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
        merges_raw = meta.get("tokenizer.ggml.merges")
        if not merges_raw:
            raise ValueError(f"{path}: byte-level BPE tokenizer without tokenizer.ggml.merges")
        token_types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
        pre = meta.get("tokenizer.ggml.pre") or "default"

        vocab: dict[str, int] = {}
        for i, t in enumerate(tokens):
            if t in vocab:
                logger.warning("GGUF vocab: token %r appears at ids %d and %d; keeping %d", t, vocab[t], i, vocab[t])
                continue
            vocab[t] = i
        merges = [tuple(m.split(" ", 1)) for m in merges_raw]

        if pre not in PRE_TOKENIZER_SPLITS:
            logger.warning(
                "tokenizer.ggml.pre=%r is not known; falling back to the GPT-2 pre-tokenizer regex", pre
            )
        splits, ignore_merges = PRE_TOKENIZER_SPLITS.get(pre, PRE_TOKENIZER_SPLITS[_FALLBACK_PRE])

        unk = meta.get("tokenizer.ggml.unknown_token_id")
        hf = _HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
        hf.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in splits]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        hf.decoder = decoders.ByteLevel()

        special_ids = {i for i, ty in enumerate(token_types) if ty == TOKEN_TYPE_CONTROL}
        user_ids = [i for i, ty in enumerate(token_types) if ty == TOKEN_TYPE_USER_DEFINED]
        hf.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in sorted(special_ids)])
        if user_ids:
            hf.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i in user_ids])
        assert hf.get_vocab_size(with_added_tokens=True) == len(vocab), "added tokens grew the vocab"

        return cls(
            hf,
            tokens,
            special_ids,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
            unk_token_id=unk,
            pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
            add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
            add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
            chat_template=meta.get("tokenizer.chat_template"),
            pre=pre,
        )

    @classmethod
    def from_model_path(cls, path: str | os.PathLike) -> "Tokenizer":
        """`from_hf_directory` for a Hugging Face checkpoint directory, else `from_gguf`."""
        if Path(path).is_dir():
            return cls.from_hf_directory(path)
        return cls.from_gguf(path)

    @classmethod
    def from_hf_directory(cls, directory: str | os.PathLike) -> "Tokenizer":
        """The tokenizer of a Hugging Face checkpoint directory.

        tokenizer.json is loaded as is by the `tokenizers` library (normalizer, pre-tokenizer, BPE
        model, added tokens). From tokenizer_config.json: `bos_token` / `eos_token` (else
        config.json's ids), `add_bos_token` / `add_eos_token` (else what tokenizer.json's post
        processor adds), and `chat_template` (a string, or a list of named templates: "default");
        else the chat_template.jinja file transformers >= 4.43 writes beside it. Added tokens
        marked special are the special tokens.

        Token bytes for streaming: byte-level BPE (decoder ByteLevel: GPT-2, Llama 3, SmolLM,
        Qwen2) spells each byte as one character; SentencePiece-style BPE (byte_fallback, U+2581
        for a space: Llama 2, Mistral, TinyLlama) stands for byte NN with `<0xNN>` and for a space
        with U+2581. (Its decoder also strips the first leading space of a decoded text; streamed
        deltas keep it, as they should after a prompt.)

        Raises:
            ValueError: no tokenizer.json, a tokenizer model other than BPE, a BPE of neither kind,
                or unreadable JSON.
        """
        d = Path(directory)
        path = d / "tokenizer.json"
        if not path.is_file():
            raise ValueError(f"{d}: no tokenizer.json (the coordinator tokenizes with it)")
        spec = _read_json(path)
        hf = _HFTokenizer.from_file(str(path))
        model = spec.get("model") or {}
        if model.get("type") != "BPE":
            raise ValueError(f"{path}: tokenizer model {model.get('type')!r} is not supported, only BPE")
        byte_level = _has_component(spec.get("decoder"), "ByteLevel")
        sentencepiece = model.get("byte_fallback") or _has_component(spec.get("decoder"), "ByteFallback")
        if not byte_level and not sentencepiece:
            raise ValueError(f"{path}: neither a byte-level BPE (ByteLevel decoder) nor a SentencePiece-style one "
                             f"(byte_fallback); cannot map tokens to bytes")
        vocab = hf.get_vocab(with_added_tokens=True)
        tokens = [""] * (max(vocab.values()) + 1)
        for t, i in vocab.items():
            tokens[i] = t
        special_ids = {i for i, t in hf.get_added_tokens_decoder().items() if t.special}
        tcfg = _read_json(d / "tokenizer_config.json") if (d / "tokenizer_config.json").is_file() else {}
        mcfg = _read_json(d / "config.json") if (d / "config.json").is_file() else {}

        def token_id(key: str) -> int | None:
            v = tcfg.get(key)
            v = v.get("content") if isinstance(v, dict) else v
            if isinstance(v, str) and hf.token_to_id(v) is not None:
                return hf.token_to_id(v)
            v = mcfg.get(f"{key}_id")
            v = v[0] if isinstance(v, list) and v else v
            return v if isinstance(v, int) else None

        bos, eos = token_id("bos_token"), token_id("eos_token")
        template = tcfg.get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        if template is None and (d / "chat_template.jinja").is_file():
            template = (d / "chat_template.jinja").read_text()
        probe = hf.encode("a", add_special_tokens=True).ids
        add_bos = tcfg.get("add_bos_token", bos is not None and probe[:1] == [bos])
        add_eos = tcfg.get("add_eos_token", eos is not None and probe[-1:] == [eos])
        token_bytes = None if byte_level else [
            t.encode("utf-8") if i in special_ids else _sentencepiece_bytes(t) for i, t in enumerate(tokens)]
        return cls(hf, tokens, special_ids, bos_token_id=bos, eos_token_id=eos,
                   unk_token_id=token_id("unk_token"), pad_token_id=token_id("pad_token"),
                   add_bos_token=bool(add_bos), add_eos_token=bool(add_eos), chat_template=template,
                   pre="tokenizer.json", token_bytes=token_bytes)

    # ---- ids <-> text -------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of token ids (the GGUF `tokenizer.ggml.tokens` length; the lm_head rows)."""
        return len(self._tokens)

    @property
    def bos_token_id(self) -> int | None:
        return self._bos_token_id

    @property
    def eos_token_id(self) -> int | None:
        return self._eos_token_id

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. Special and user-defined tokens written in the text (e.g.
        `<|im_start|>`) become their single id. `add_special_tokens` prepends BOS / appends EOS
        only where the GGUF asks for it (`tokenizer.ggml.add_bos_token` / `add_eos_token`)."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_special_tokens:
            if self.add_bos_token and self._bos_token_id is not None:
                ids = [self._bos_token_id] + ids
            if self.add_eos_token and self._eos_token_id is not None:
                ids = ids + [self._eos_token_id]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`. Byte sequences that are not valid UTF-8 become U+FFFD.

        Raises:
            ValueError: an id outside `[0, vocab_size)`.
        """
        ids = list(ids)
        self._check_ids(ids)
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """Raw bytes a token stands for (special tokens: their UTF-8 text). May be part of a
        UTF-8 character."""
        self._check_ids([token_id])
        return self._token_bytes[token_id]

    def id_to_token(self, token_id: int) -> str:
        """The vocabulary entry as stored in the GGUF (byte-level spelling, e.g. 'Ġhello')."""
        self._check_ids([token_id])
        return self._tokens[token_id]

    def _check_ids(self, ids: list[int]) -> None:
        n = len(self._tokens)
        for i in ids:
            if not 0 <= i < n:
                raise ValueError(f"token id {i} is outside the vocabulary [0, {n})")

    # ---- chat template ------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """Render `messages` ([{"role": ..., "content": ...}, ...]) with the GGUF's
        `tokenizer.chat_template`, the way transformers renders it: a sandboxed jinja2
        environment with trim_blocks/lstrip_blocks, `raise_exception`, `strftime_now`, a `tojson`
        filter, and the special tokens as `bos_token`, `eos_token`, `unk_token`, `pad_token`.
        Extra keyword arguments become template variables.

        Raises:
            ValueError: the GGUF has no chat template, or the template raised (raise_exception).
        """
        if not self.chat_template:
            raise ValueError("this GGUF has no tokenizer.chat_template")
        import jinja2

        template = self._compile_template()
        variables = {
            "bos_token": self._token_text(self._bos_token_id),
            "eos_token": self._token_text(self._eos_token_id),
            "unk_token": self._token_text(self.unk_token_id),
            "pad_token": self._token_text(self.pad_token_id),
        }
        variables.update(kwargs)
        try:
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.TemplateError as e:
            raise ValueError(f"chat template failed: {e}") from e

    def _token_text(self, token_id: int | None) -> str | None:
        return None if token_id is None else self._tokens[token_id]

    def _compile_template(self):
        if self._compiled_template is None:
            import jinja2
            from jinja2.ext import loopcontrols
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message):
                raise jinja2.exceptions.TemplateError(message)

            def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
                return json.dumps(
                    x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
                )

            def strftime_now(fmt):
                return datetime.now().strftime(fmt)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
            env.filters["tojson"] = tojson
            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = strftime_now
            self._compiled_template = env.from_string(self.chat_template)
        return self._compiled_template


class IncrementalDetokenizer:
    """Turns a stream of generated token ids into text deltas, one `push` per step.

    Tokens are mapped to raw bytes and fed to an incremental UTF-8 decoder, so a character split
    over several tokens is emitted only once its last byte arrives (never half a character).
    Invariant: `"".join(pushes) + flush() == tokenizer.decode(all_ids, skip_special_tokens)`
    (invalid byte sequences become U+FFFD, as in `decode`). `prompt_ids`, if given, prime the
    decoder: a character begun by the prompt's last tokens and finished by the first generated
    ones is emitted whole by the first `push`.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int] | None = None, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.token_ids: list[int] = []
        self.prompt_text = self._decode(prompt_ids) if prompt_ids else ""  # complete prompt characters

    def _decode(self, ids: list[int]) -> str:
        tok = self.tokenizer
        tok._check_ids(ids)
        skip = tok.special_ids if self.skip_special_tokens else ()
        data = b"".join(tok._token_bytes[i] for i in ids if i not in skip)
        return self._decoder.decode(data)

    def push(self, new_ids: list[int]) -> str:
        """Append `new_ids`; return the text they complete ("" while a character is unfinished).

        Raises:
            ValueError: an id outside the vocabulary.
        """
        new_ids = list(new_ids)
        text = self._decode(new_ids)
        self.token_ids.extend(new_ids)
        return text

    def flush(self) -> str:
        """End of stream: return held-back bytes of an unfinished character (as U+FFFD)."""
        return self._decoder.decode(b"", final=True)


class StopMatch(NamedTuple):
    """Result of `StopStringMatcher.push`: text safe to emit, whether a stop string matched, which."""

    text: str
    stopped: bool
    stop: str | None


class StopStringMatcher:
    """Finds stop strings in streamed text without ever emitting part of one.

    Fed text deltas, it emits text up to the earliest point where a stop string could begin and
    holds back the tail that is a prefix of some stop string. On a match, output ends at the stop
    string (or after it with `include_stop_str_in_output`) and the matcher is done. If several
    stop strings match, the one that completes first in the text wins (ties: the one starting
    earlier), so the result does not depend on how the text was cut into deltas.

    Raises:
        ValueError: an empty stop string.
    """

    def __init__(self, stop: list[str], include_stop_str_in_output: bool = False):
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        self.stop = list(dict.fromkeys(stop))
        self.include_stop_str_in_output = include_stop_str_in_output
        self._held = ""  # text received but not emitted: a possible start of a stop string
        self.matched: str | None = None

    @property
    def stopped(self) -> bool:
        return self.matched is not None

    def push(self, delta: str) -> StopMatch:
        """Add `delta`; return the text now safe to emit. After a match every call returns
        `("", True, matched)`."""
        if self.matched is not None:
            return StopMatch("", True, self.matched)
        if not self.stop:
            return StopMatch(delta, False, None)
        buf = self._held + delta
        # The earliest-completing match. Any match lies in `buf`: emitted text never holds the
        # start of a stop string (see below), and `buf` had no full match before this delta.
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for s in self.stop:
            i = buf.find(s)
            if i >= 0:
                cand = (i + len(s), i, s)
                if best is None or cand[:2] < best[:2]:
                    best = cand
        if best is not None:
            end, start, s = best
            self.matched = s
            self._held = ""
            return StopMatch(buf[: end if self.include_stop_str_in_output else start], True, s)
        # Hold back from the first position whose suffix is a proper prefix of a stop string.
        cut = len(buf)
        for i in range(max(0, len(buf) - max(len(s) for s in self.stop) + 1), len(buf)):
            tail = buf[i:]
            if any(s.startswith(tail) for s in self.stop):
                cut = i
                break
        self._held = buf[cut:]
        return StopMatch(buf[:cut], False, None)

    def flush(self) -> str:
        """Generation ended for another reason (EOS, max_tokens): return the held-back text."""
        held, self._held = self._held, ""
        return held if self.matched is None else ""
