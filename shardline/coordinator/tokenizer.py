"""Tokenizer, incremental detokenizer and stop-string matcher for the coordinator.

The tokenizer comes from the model's own metadata: a GGUF file's `tokenizer.ggml.*` keys, rebuilt
as a `tokenizers` pipeline by `gguf_vocab.build_gguf_vocab` (byte-level BPE with its
`tokenizer.ggml.pre` pre-tokenizer, or SentencePiece), or a Hugging Face checkpoint directory's
tokenizer.json, loaded as is (`Tokenizer.from_hf_directory`). The chat template is rendered by
`chat_template.ChatTemplate`.

    text --added-token split--> pieces --pre-tokenizer / normalizer--> words --BPE--> ids
    ids  --token_bytes--> raw UTF-8 bytes --decode--> text

A token stands for raw bytes (byte-level BPE spells every byte as one printable character, GPT-2's
`bytes_to_unicode`; SentencePiece falls back to `<0xNN>` byte tokens), so it may end in the middle
of a UTF-8 character; that is why streaming goes through `IncrementalDetokenizer`, which holds back
incomplete characters.
"""

from __future__ import annotations

import codecs
import json
import os
from pathlib import Path
from typing import Any, NamedTuple

from tokenizers import Tokenizer as _HFTokenizer

from shardline.coordinator.chat_template import ChatTemplate
from shardline.coordinator.gguf_vocab import (  # noqa: F401  (bytes_to_unicode: public here too)
    build_gguf_vocab,
    byte_level_bytes,
    bytes_to_unicode,
    sentencepiece_bytes,
)


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


def read_gguf_tokenizer_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The `tokenizer.*` metadata and `general.architecture` of a GGUF file, as plain values.

    Raises:
        ModelError: the file is not a readable GGUF file.
    """
    from shardline.model_file import ModelError, open_gguf

    try:
        reader = open_gguf(path)
    except Exception as exc:  # gguf raises ValueError/struct errors on a bad magic or truncation
        raise ModelError(f"{path}: not a readable GGUF file ({exc})") from exc
    return {key: field.contents() for key, field in reader.fields.items()
            if key.startswith("tokenizer.") or key == "general.architecture"}


class Tokenizer:
    """The model's tokenizer: text <-> token ids, token bytes for streaming, and its chat template.

    Build it with `Tokenizer.from_model_path(path)` (a GGUF file or a Hugging Face checkpoint
    directory). Token ids are ints in `[0, vocab_size)`. Special tokens (GGUF token types control
    and unknown, e.g. `<|im_start|>`; tokenizer.json's added tokens marked special) are matched
    whole in input text and dropped by `decode(..., skip_special_tokens=True)`. User-defined tokens
    (GGUF type 4, e.g. `<think>`) are matched whole too but are not special.
    """

    def __init__(
        self,
        hf_tokenizer: _HFTokenizer,
        tokens: list[str],
        special_ids: set[int] | frozenset[int],
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
        # Byte-level BPE unless the caller gives them (SentencePiece vocabularies).
        self._token_bytes: list[bytes] = (token_bytes if token_bytes is not None
                                          else [byte_level_bytes(t) for t in tokens])
        self._compiled_template: ChatTemplate | None = None
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
        """The tokenizer and chat template (`tokenizer.chat_template`) of a GGUF file; see
        `from_gguf_metadata`.

        Raises:
            ModelError: the file is not GGUF, or its tokenizer is missing or unsupported.
        """
        return cls.from_gguf_metadata(read_gguf_tokenizer_metadata(path), source=str(path))

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any], source: str = "GGUF") -> "Tokenizer":
        """The tokenizer described by GGUF `tokenizer.*` metadata (see `gguf_vocab.build_gguf_vocab`
        for the vocabulary kinds and pre-tokenizers: byte-level BPE "gpt2" with its
        `tokenizer.ggml.pre`, SentencePiece "llama").

        Raises:
            ModelError: no vocabulary, or a tokenizer model or pre-tokenizer that is not supported
                (named in the message, with `source`).
        """
        vocab = build_gguf_vocab(meta, source)
        return cls(
            vocab.tokenizer,
            vocab.tokens,
            vocab.special_ids,
            bos_token_id=vocab.bos_token_id,
            eos_token_id=vocab.eos_token_id,
            unk_token_id=vocab.unk_token_id,
            pad_token_id=vocab.pad_token_id,
            add_bos_token=vocab.add_bos_token,
            add_eos_token=vocab.add_eos_token,
            chat_template=meta.get("tokenizer.chat_template"),
            pre=vocab.pre if vocab.model == "gpt2" else "sentencepiece",
            token_bytes=vocab.token_bytes,
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
            t.encode("utf-8") if i in special_ids else sentencepiece_bytes(t) for i, t in enumerate(tokens)]
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

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        *,
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        **kwargs: Any,
    ) -> str:
        """Render `messages` ([{"role": ..., "content": ...}, ...]) with the model's chat template,
        as transformers' `apply_chat_template(..., tokenize=False)` renders it (see
        `chat_template.ChatTemplate`): `bos_token`, `eos_token`, `unk_token` and `pad_token` are
        the model's, `tools` and `documents` are passed through, further keyword arguments become
        template variables.

        Raises:
            ValueError: the model has no chat template, or the template does not parse, raised
                (`raise_exception`) or failed.
        """
        if not self.chat_template:
            raise ValueError("this model has no chat template (GGUF tokenizer.chat_template, "
                             "tokenizer_config.json chat_template)")
        if self._compiled_template is None:
            self._compiled_template = ChatTemplate(self.chat_template)
        special_tokens = {
            "bos_token": self._token_text(self._bos_token_id),
            "eos_token": self._token_text(self._eos_token_id),
            "unk_token": self._token_text(self.unk_token_id),
            "pad_token": self._token_text(self.pad_token_id),
        }
        return self._compiled_template.render(
            messages, add_generation_prompt=add_generation_prompt, tools=tools, documents=documents,
            special_tokens=special_tokens, **kwargs)

    def _token_text(self, token_id: int | None) -> str | None:
        return None if token_id is None else self._tokens[token_id]


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
