"""Tokenizers rebuilt from GGUF metadata against the tokenizers they were converted from.

Each vocabulary is built here (tests/gguf_vocab_files.py): byte-level BPEs trained with the
`tokenizers` library in each family's shape (tokenizer.json pre-tokenizer as the real model ships
it), SentencePiece BPE models trained with `sentencepiece` (Llama 2 style with a dummy prefix,
Gemma style without). Each is written as GGUF metadata the way llama.cpp's converter writes it,
and `Tokenizer.from_gguf` must give the ids of transformers' tokenizer for the source vocabulary
(and, for SentencePiece, of `sentencepiece` itself).
"""

from __future__ import annotations

import logging

import gguf
import pytest
from tokenizers import AddedToken, decoders, models, normalizers
from tokenizers import Tokenizer as HFTokenizer

from tests.gguf_vocab_files import (
    BYTE_LEVEL_FAMILIES,
    TEXTS,
    USER_DEFINED,
    train_byte_level_bpe,
    train_sentencepiece,
    write_byte_level_gguf,
    write_sentencepiece_gguf,
)
from shardline.coordinator.tokenizer import IncrementalDetokenizer, Tokenizer
from shardline.model_file import ModelError

transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")


def texts_with_specials(specials: list[str]) -> list[str]:
    a, b = specials[0], specials[-1]
    return [
        f"{a}hello{b}",
        f"{a} hello {b}\n",
        f"text {b}{a}more text",
        f"{b}{b}",
        "<think>reasoning</think> answer <think>",
        f"{a}日本語 😀{b}",
    ]


# ---- byte-level BPE families -------------------------------------------------------------------


@pytest.fixture(scope="module", params=sorted(BYTE_LEVEL_FAMILIES))
def byte_level(request, tmp_path_factory):
    family = request.param
    pre, _, _, specials, _ = BYTE_LEVEL_FAMILIES[family]
    d = tmp_path_factory.mktemp(family.replace(".", "_"))
    hf_dir = train_byte_level_bpe(d / "hf", family)
    ours = Tokenizer.from_gguf(write_byte_level_gguf(d / "vocab.gguf", hf_dir, pre))
    ref = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    return family, ours, ref, specials


def test_byte_level_ids_equal_transformers(byte_level):
    family, ours, ref, specials = byte_level
    for text in TEXTS + texts_with_specials(specials):
        assert ours.encode(text) == ref.encode(text, add_special_tokens=False), (family, text)


def test_byte_level_bos_as_the_family_adds_it(byte_level):
    family, ours, ref, specials = byte_level
    for text in ("hi there", ""):
        assert ours.encode(text, add_special_tokens=True) == ref.encode(text), (family, text)
    assert ours.add_bos_token == BYTE_LEVEL_FAMILIES[family][4]
    assert ours.bos_token_id == ref.convert_tokens_to_ids(specials[0])
    assert ours.eos_token_id == ref.convert_tokens_to_ids(specials[1])


def test_byte_level_round_trip(byte_level):
    family, ours, ref, specials = byte_level
    for text in TEXTS + texts_with_specials(specials):
        ids = ours.encode(text)
        assert ours.decode(ids) == text, (family, text)
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
        detok = IncrementalDetokenizer(ours)
        assert "".join(detok.push([i]) for i in ids) + detok.flush() == text


def test_byte_level_special_and_user_defined_tokens(byte_level):
    family, ours, ref, specials = byte_level
    for token in specials + USER_DEFINED:
        assert ours.encode(token) == [ref.convert_tokens_to_ids(token)]
    assert ours.special_ids == {ref.convert_tokens_to_ids(t) for t in specials}
    assert ours.pre == BYTE_LEVEL_FAMILIES[family][0]


# ---- SentencePiece -----------------------------------------------------------------------------


def spm_reference(sp, *, add_space_prefix: bool, special: list[str]):
    """transformers' tokenizer for a SentencePiece vocabulary, laid out as the model's
    tokenizer.json ships it: Llama 2 (Prepend + Replace normalizer, Strip decoder) or Gemma
    (Replace only; its whitespace runs are vocabulary pieces reached by merges); merges from
    transformers' own `generate_merges` over the pieces' scores."""
    from transformers import PreTrainedTokenizerFast
    from transformers.tokenization_utils_base import generate_merges

    pieces = [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    vocab = {p: i for i, p in enumerate(pieces)}
    merges = generate_merges(vocab, {p: sp.get_score(i) for i, p in enumerate(pieces)})
    tok = HFTokenizer(models.BPE(vocab, merges, unk_token=sp.id_to_piece(sp.unk_id()), fuse_unk=True,
                                 byte_fallback=True))
    steps = [normalizers.Prepend("\u2581")] if add_space_prefix else []
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "\u2581")])
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if add_space_prefix else []))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=sp.id_to_piece(sp.bos_id()),
                                   eos_token=sp.id_to_piece(sp.eos_id()), unk_token=sp.id_to_piece(sp.unk_id()))


@pytest.fixture(scope="module")
def llama_spm(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama_spm")
    model = train_sentencepiece(d, add_dummy_prefix=True)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    ours = Tokenizer.from_gguf(write_sentencepiece_gguf(d / "vocab.gguf", model))
    return ours, sp, spm_reference(sp, add_space_prefix=True, special=["<unk>", "<s>", "</s>"])


GEMMA_USER_DEFINED = ["\u2581\u2581\u2581\u2581", "\u2581\u2581"]  # Gemma's whitespace-run tokens


@pytest.fixture(scope="module")
def gemma_spm(tmp_path_factory):
    d = tmp_path_factory.mktemp("gemma_spm")
    model = train_sentencepiece(d, add_dummy_prefix=False, user_defined=GEMMA_USER_DEFINED)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    path = write_sentencepiece_gguf(d / "vocab.gguf", model, arch="gemma2", user_defined=GEMMA_USER_DEFINED,
                                    add_space_prefix=False)
    ref = spm_reference(sp, add_space_prefix=False, special=["<unk>", "<s>", "</s>"])
    return Tokenizer.from_gguf(path), sp, ref


@pytest.fixture(params=["llama", "gemma"])
def sentencepiece(request, llama_spm, gemma_spm):
    return {"llama": llama_spm, "gemma": gemma_spm}[request.param]


def test_sentencepiece_ids_equal_sentencepiece_and_transformers(sentencepiece):
    ours, sp, ref = sentencepiece
    for text in TEXTS:
        assert ours.encode(text) == sp.encode(text), text
        assert ours.encode(text) == ref.encode(text, add_special_tokens=False), text


def test_sentencepiece_byte_fallback(sentencepiece):
    ours, sp, _ = sentencepiece
    ids = ours.encode("𝕏")  # not in the vocabulary: its four UTF-8 bytes
    assert [ours.id_to_token(i) for i in ids][-4:] == ["<0xF0>", "<0x9D>", "<0x95>", "<0x8F>"]
    assert ids == sp.encode("𝕏")


def test_sentencepiece_special_tokens_equal_transformers(sentencepiece):
    ours, sp, ref = sentencepiece
    for text in texts_with_specials(["<s>", "</s>"]):
        ids = ours.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == ref.decode(ids), text
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True), text
    assert ours.encode("<s>") == [sp.bos_id()] and ours.bos_token_id == sp.bos_id()
    assert ours.eos_token_id == sp.eos_id() and ours.unk_token_id == sp.unk_id()
    assert ours.special_ids == {sp.unk_id(), sp.bos_id(), sp.eos_id()}


def test_sentencepiece_round_trip(sentencepiece):
    ours, sp, _ = sentencepiece
    for text in TEXTS:
        ids = ours.encode(text)
        assert ours.decode(ids) == text == sp.decode(ids), text
        # streamed text keeps the space the dummy prefix stands for (the text after a prompt)
        detok = IncrementalDetokenizer(ours)
        streamed = "".join(detok.push([i]) for i in ids) + detok.flush()
        dummy_prefix = " " if text and ours.token_bytes(ours.encode("a")[0]).startswith(b" ") else ""
        assert streamed == dummy_prefix + text, text


def test_sentencepiece_bos_added_by_default(llama_spm):
    ours, sp, _ = llama_spm
    # no tokenizer.ggml.add_bos_token in the file: SentencePiece vocabularies add BOS (llama.cpp)
    assert ours.add_bos_token and not ours.add_eos_token
    assert ours.encode("hi", add_special_tokens=True) == [sp.bos_id()] + sp.encode("hi")


def test_gemma_whitespace_runs_are_user_defined_tokens(gemma_spm):
    ours, sp, _ = gemma_spm
    run4 = ours.encode("    ")
    assert len(run4) == 1 and ours.id_to_token(run4[0]) == "    "
    assert ours.encode("a" + " " * 9 + "b") == sp.encode("a" + " " * 9 + "b")
    assert ours.encode(" a") == sp.encode(" a")  # no space prefix: " a" is "▁a"


# ---- metadata that is refused ------------------------------------------------------------------


def write_gguf(path, **meta):
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in meta.items():
        key = "tokenizer.ggml." + key
        if isinstance(value, str):
            w.add_string(key, value)
        elif key.endswith("scores"):
            w.add_array(key, [float(v) for v in value])
        else:
            w.add_array(key, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("model", ["gemma4", "t5", "bert", "rwkv"])
def test_unsupported_tokenizer_model_is_refused(tmp_path, model):
    path = write_gguf(tmp_path / "t.gguf", model=model, tokens=["a", "b"], merges=["a b"], scores=[0.0, 0.0])
    with pytest.raises(ModelError, match=f"tokenizer.ggml.model '{model}' is not supported"):
        Tokenizer.from_gguf(path)


def test_missing_vocabulary_is_refused(tmp_path):
    with pytest.raises(ModelError, match="no tokenizer.ggml.tokens"):
        Tokenizer.from_gguf(write_gguf(tmp_path / "t.gguf", model="gpt2"))


def test_sentencepiece_without_scores_is_refused(tmp_path):
    path = write_gguf(tmp_path / "t.gguf", model="llama", tokens=["<unk>", "a"])
    with pytest.raises(ModelError, match="'llama'.*without tokenizer.ggml.scores"):
        Tokenizer.from_gguf(path)


def test_missing_pre_uses_llama_cpp_default_with_warning(tmp_path, caplog):
    tokens = ["a", "b", ",", "ab", "1", "2", "3", "4"]
    path = write_gguf(tmp_path / "t.gguf", model="gpt2", tokens=tokens, merges=["a b"])
    with caplog.at_level(logging.WARNING, logger="shardline.coordinator.gguf_vocab"):
        t = Tokenizer.from_gguf(path)
    assert any("no tokenizer.ggml.pre" in r.getMessage() for r in caplog.records)
    # llama.cpp's default splits punctuation runs first, then numerals into runs of three digits
    assert [t.id_to_token(i) for i in t.encode("ab,1234")] == ["ab", ",", "1", "2", "3", "4"]
    assert t.pre is None
