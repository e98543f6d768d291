"""Hugging Face safetensors checkpoints: config.json -> ModelSpec, the shard loader (Q/K layout,
TP slices, quantize on load), the planner's sizes, the directory tokenizer, and clear errors.

References: transformers' LlamaForCausalLM writes the tiny checkpoints (save_pretrained, sharded
with an index) and computes the reference logits; the SmolLM2 GGUF, dequantized by `gguf`, is the
reference for the Q/K permutation; `shardline.kernels.formats.quantize` on the whole tensor is the reference
for the chunked quantization.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from shardline.coordinator.planner import ModelSizes, PlanError, WorkerOffer, check_quantization, make_plan
from shardline.config import ConfigError, load_config
from shardline.model_file import ModelError, SafetensorsCheckpoint, read_model_spec, resolve_model_path
from shardline.worker import loader as loader_mod
from shardline.worker.kv_cache import KVCache
from shardline.worker.loader import GGUFShardLoader, SafetensorsShardLoader, ShardSpec, permute_rope_rows
from shardline.worker.model import DecoderLayer, StageModel, build_attention_metadata

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
            initializer_range=0.1, bos_token_id=1, eos_token_id=2)
PROMPT = [5, 17, 33, 8, 90, 41, 2, 64, 11, 70, 3, 55]


def _write_tiny(directory, tie: bool, seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY, **overrides}, tie_word_embeddings=tie))
    model.save_pretrained(str(directory), max_shard_size="100KB")  # several shards + index.json
    return directory


@pytest.fixture(scope="module")
def tiny_untied(tmp_path_factory):
    return _write_tiny(tmp_path_factory.mktemp("tiny_untied"), tie=False)


@pytest.fixture(scope="module")
def tiny_tied(tmp_path_factory):
    return _write_tiny(tmp_path_factory.mktemp("tiny_tied"), tie=True, seed=1)


@pytest.fixture(scope="module")
def smollm2_2layers(tmp_path_factory):
    """The first two layers of the packaged SmolLM2 GGUF as a Hugging Face checkpoint."""
    from tests.safetensors_checkpoint import gguf_to_hf_checkpoint

    return gguf_to_hf_checkpoint(resolve_model_path("smollm2-135m"), tmp_path_factory.mktemp("smol2"),
                                 num_layers=2, tokenizer="shardline")


def reference_logits(directory, ids) -> np.ndarray:
    from transformers import LlamaForCausalLM

    m = LlamaForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    with torch.inference_mode():
        return m(torch.tensor([ids])).logits[0].numpy()


def stage_logits(directory, ids, quantization="none", prefill=8, dtype="float32",
                 kv_dtype=torch.float32) -> np.ndarray:
    """Our single-stage model: prefill ids[:prefill], then decode the rest one token at a time
    through the paged KV cache (float32 by default: these tests compare the weights' arithmetic).
    Returns logits of positions prefill-1 .. len(ids)-1."""
    spec = read_model_spec(directory)
    model = StageModel(spec, SafetensorsShardLoader(str(directory), spec, ShardSpec(0, spec.num_layers, True, True),
                                                    quantization, 32, dtype), 64)
    kv = KVCache(spec.num_layers, 4, 16, spec.num_kv_heads, spec.head_dim, dtype=kv_dtype)
    rows = [model(torch.tensor(ids[:prefill]), build_attention_metadata([(0, prefill, [0], True)], 16), kv)]
    for pos in range(prefill, len(ids)):
        rows.append(model(torch.tensor([ids[pos]]), build_attention_metadata([(pos, 1, [0], True)], 16), kv))
    return torch.cat(rows).numpy()


# ---- config.json -> ModelSpec -------------------------------------------------------------------


def test_spec_reads_config_json_and_sharded_checkpoint(tiny_untied):
    assert (tiny_untied / "model.safetensors.index.json").is_file()
    spec = read_model_spec(resolve_model_path(str(tiny_untied)))
    assert spec.architecture == "llama" and spec.num_layers == 3 and spec.hidden_size == 64
    assert (spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.intermediate_size) == (4, 2, 16, 128)
    assert (spec.vocab_size, spec.rope_theta, spec.rms_norm_eps, spec.context_length) == (96, 10000.0, 1e-5, 256)
    assert not spec.tie_word_embeddings and spec.eos_token_id == 2 and spec.bos_token_id == 1
    ckpt = SafetensorsCheckpoint(tiny_untied)
    assert len({f for f in ckpt.files.values()}) > 1  # the index maps tensors to several shards


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_config(directory, **changes):
    path = directory / "config.json"
    cfg = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    path.write_text(json.dumps(cfg))


def test_directory_errors_name_what_is_missing(tmp_path, tiny_untied):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match="has no config.json"):
        resolve_model_path(str(empty))
    (empty / "config.json").write_text("{}")
    with pytest.raises(ModelError, match=r"has no \*\.safetensors"):
        resolve_model_path(str(empty))
    d = _copy(tiny_untied, tmp_path / "gpt2")
    _edit_config(d, architectures=["GPT2LMHeadModel"])
    with pytest.raises(ModelError, match=r"architectures \['GPT2LMHeadModel'\] is not supported.*LlamaForCausalLM"):
        read_model_spec(d)
    d = _copy(tiny_untied, tmp_path / "nohidden")
    _edit_config(d, hidden_size=None)
    with pytest.raises(ModelError, match="hidden_size missing"):
        read_model_spec(d)
    d = _copy(tiny_untied, tmp_path / "scaled")
    _edit_config(d, rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0})
    with pytest.raises(ModelError, match="rope_type 'llama3' needs low_freq_factor"):
        read_model_spec(d)
    _edit_config(d, rope_parameters={"rope_type": "proportional", "rope_theta": 5e5, "factor": 8.0})
    with pytest.raises(ModelError, match="rope_type 'proportional' is not supported"):
        read_model_spec(d)
    d = _copy(tiny_untied, tmp_path / "gelu")
    _edit_config(d, hidden_act="gelu")
    with pytest.raises(ModelError, match="hidden_act 'gelu'"):
        read_model_spec(d)
    d = _copy(tiny_untied, tmp_path / "noeos")
    _edit_config(d, eos_token_id=None)
    assert read_model_spec(d).eos_token_id == 2  # from generation_config.json
    (d / "generation_config.json").unlink()
    with pytest.raises(ModelError, match="no eos_token_id"):
        read_model_spec(d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="invalid JSON"):
        read_model_spec(d)


def test_missing_tensor_and_wrong_shape_are_named(tmp_path, tiny_tied):
    from safetensors.numpy import load_file, save_file

    d = _copy(tiny_tied, tmp_path / "missing")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    victim = "model.layers.1.mlp.up_proj.weight"
    shard = d / index["weight_map"][victim]
    tensors = load_file(str(shard))
    del tensors[victim]
    save_file(tensors, str(shard))
    with pytest.raises(ModelError, match=rf"tensor {victim} missing from the checkpoint"):
        read_model_spec(d)
    # untied config without lm_head.weight: the missing head is named
    d = _copy(tiny_tied, tmp_path / "nohead")
    _edit_config(d, tie_word_embeddings=False)
    with pytest.raises(ModelError, match="lm_head.weight missing"):
        read_model_spec(d)
    d = _copy(tiny_tied, tmp_path / "shape")
    _edit_config(d, intermediate_size=96)
    with pytest.raises(ModelError, match=r"mlp.gate_proj.weight has shape \[128, 64\], config.json implies \[96, 64\]"):
        read_model_spec(d)


def test_quantization_config_and_group_size_checks():
    cfg = load_config(overrides={"model": "/models/llama", "quantization": "int4", "quantization_group_size": 64})
    assert cfg.quantization == "int4" and cfg.quantization_group_size == 64
    assert load_config().quantization == "none"
    with pytest.raises(ConfigError, match="quantization=int8 applies to Hugging Face safetensors.*smollm2-135m"):
        load_config(overrides={"quantization": "int8"})
    with pytest.raises(ConfigError, match="quantization"):
        load_config(overrides={"model": "/m", "quantization": "int3"})
    with pytest.raises(ConfigError, match="quantization_group_size"):
        load_config(overrides={"model": "/m", "quantization": "int8", "quantization_group_size": 48})
    spec = read_model_spec(resolve_model_path("smollm2-135m"))  # hidden 576 = 4.5 x 128
    check_quantization(spec, 3, 64)
    with pytest.raises(PlanError, match="quantization_group_size=128 does not divide hidden_size=576"):
        check_quantization(spec, 1, 128)


# ---- the loader ----------------------------------------------------------------------------------


def test_qk_rows_match_the_gguf_layout(smollm2_2layers):
    """Our HF->adjacent-pair permutation undoes transformers' reverse permutation used to write the
    checkpoint: the loaded Q, K (and every other) weight equals the GGUF's dequantized tensor."""
    gguf_path = str(resolve_model_path("smollm2-135m"))
    shard = ShardSpec(0, 2, True, True)
    ours = SafetensorsShardLoader(str(smollm2_2layers), read_model_spec(smollm2_2layers), shard)
    ref = GGUFShardLoader(gguf_path, read_model_spec(gguf_path), shard)
    for name in ("blk.0.attn_q.weight", "blk.1.attn_k.weight", "blk.1.attn_v.weight", "blk.0.attn_output.weight",
                 "blk.1.ffn_down.weight", "blk.0.attn_norm.weight", "token_embd.weight", "output_norm.weight"):
        assert torch.equal(ours.dense(name), ref.dense(name)), name
    w = ours.dense("blk.0.attn_q.weight").numpy()
    assert not np.array_equal(w, ours.ckpt.read("model.layers.0.self_attn.q_proj.weight"))  # it was permuted
    assert np.array_equal(permute_rope_rows(np.arange(8.0), 4), [0, 2, 1, 3, 4, 6, 5, 7])


@pytest.mark.parametrize("quantization", ["none", "int8", "int4"])
def test_tp_slices_and_chunked_quantization_equal_whole_tensor_quantization(tiny_untied, monkeypatch, quantization):
    """Each TP rank's Q rows / down_proj columns, read and quantized in small chunks, equal the
    same slice of `shardline.kernels.formats.quantize` applied to the whole (permuted) tensor."""
    from shardline.kernels.formats import quantize

    monkeypatch.setattr(loader_mod, "LOAD_CHUNK_FLOATS", 16 * 64)  # 16 rows of 64 per chunk: many chunks
    spec = read_model_spec(tiny_untied)
    full = SafetensorsShardLoader(str(tiny_untied), spec, ShardSpec(0, 3, True, True), "none")
    qtype = {"none": "f32"}.get(quantization, quantization)
    sym = quantization != "int4"  # int4 is asymmetric (a min per group)
    q_full = quantize(full.dense("blk.2.attn_q.weight").numpy(), qtype, 32, symmetric=sym)
    down_full = full.dense("blk.2.ffn_down.weight").numpy()
    for tp_rank in (0, 1):
        ld = SafetensorsShardLoader(str(tiny_untied), spec, ShardSpec(0, 3, True, True, tp_rank, 2), quantization)
        r0, r1 = ld.head_rows("blk.2.attn_q.weight", spec.num_heads)
        q = ld.linear_weight("blk.2.attn_q.weight", rows=(r0, r1))
        assert q.shape == (r1 - r0, 64) and np.array_equal(q.data, q_full.data[r0:r1])
        if quantization != "none":
            assert np.array_equal(q.scales, q_full.scales[r0:r1])
            assert (q.mins is None) == sym and (sym or np.array_equal(q.mins, q_full.mins[r0:r1]))
        f0, f1 = ld.ffn_range()
        d = ld.linear_weight("blk.2.ffn_down.weight", cols=(f0, f1))
        assert np.array_equal(d.data, quantize(down_full[:, f0:f1], qtype, 32, symmetric=sym).data)


def test_float_logits_match_transformers(tiny_untied):
    """quantization none: logits (prefill 8 tokens, then 4 decode steps through the paged KV
    cache) equal transformers' float32 forward on the same directory within 1e-4 of the largest
    |logit| (summation order only), and the greedy choices agree; with the float16 cache (the
    default) within 1e-2 (K and V rounded to 11 significant bits)."""
    ref = reference_logits(tiny_untied, PROMPT)[7:]
    ours = stage_logits(tiny_untied, PROMPT, "none")
    assert np.abs(ours - ref).max() < 1e-4 * np.abs(ref).max()
    assert np.array_equal(ours.argmax(1), ref.argmax(1))
    half = stage_logits(tiny_untied, PROMPT, "none", kv_dtype=torch.float16)
    assert np.abs(half - ref).max() < 1e-2 * np.abs(ref).max()
    assert np.array_equal(half.argmax(1), ref.argmax(1))


def dequantized_reference_logits(directory, ids, quantization: str) -> np.ndarray:
    """transformers' forward with every 2-D weight replaced by shardline.kernels.reference.dequantize_ref(
    quantize(w)) (int8 symmetric, int4 asymmetric; the embedding and lm_head at
    embedding_quantization's type): the float model
    our quantized workers should compute exactly. Groups run along a row, so quantizing the HF rows
    and permuting Q/K rows afterwards gives the same values as our loader's permute-then-quantize."""
    from transformers import LlamaForCausalLM

    from shardline.kernels.formats import quantize
    from shardline.kernels.reference import dequantize_ref
    from shardline.model_file import embedding_quantization

    m = LlamaForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    with torch.inference_mode():
        for name, p in m.named_parameters():
            if p.dim() == 2:
                qt = embedding_quantization(quantization) if "embed" in name or "lm_head" in name else quantization
                p.copy_(torch.from_numpy(dequantize_ref(quantize(p.numpy(), qt, 32, symmetric=qt != "int4"))))
        return m(torch.tensor([ids])).logits[0].numpy()


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantized_logits_match_the_dequantized_reference(tiny_untied, monkeypatch, quantization):
    """With int8/int4 weights the logits equal the dequantized reference:
      - within 1e-4 of the largest |logit| when every matmul is exact float32 (the Numba kernels
        for few tokens; dispatch.TILE_BF16 off, so prefill tiles are float32 too),
      - within 5e-2 with the default bf16 tiles for prefills of >= crossover tokens (x and the
        dequantized tile rounded to bfloat16, 8 significant bits).
    The weights' own quantization error (dequantized vs float reference) is what remains; it is
    checked on SmolLM2 in tests/integration/test_safetensors.py."""
    import shardline.kernels.dispatch as dispatch

    ref = dequantized_reference_logits(tiny_untied, PROMPT, quantization)[7:]
    scale = np.abs(ref).max()
    monkeypatch.setattr(dispatch, "TILE_BF16", False)
    exact = stage_logits(tiny_untied, PROMPT, quantization)
    assert np.abs(exact - ref).max() < 1e-4 * scale
    monkeypatch.setattr(dispatch, "TILE_BF16", True)
    default = stage_logits(tiny_untied, PROMPT, quantization)
    assert np.abs(default - ref).max() < 5e-2 * scale
    float_ref = reference_logits(tiny_untied, PROMPT)[7:]
    assert np.abs(exact - float_ref).max() > 1e-3 * scale  # the weights really were quantized


def test_bfloat16_keeps_weights_bf16(tiny_tied):
    """dtype bfloat16 with quantization none keeps bf16 weights (half the bytes) and still matches
    the float reference within bf16 rounding (2^-8 relative per weight)."""
    ref = reference_logits(tiny_tied, PROMPT)[7:]
    ours = stage_logits(tiny_tied, PROMPT, "none", dtype="bfloat16")
    assert np.abs(ours - ref).max() / np.abs(ref).max() < 2e-2
    spec = read_model_spec(tiny_tied)
    ld = SafetensorsShardLoader(str(tiny_tied), spec, ShardSpec(0, 3, True, True), "none", dtype="bfloat16")
    w = ld.linear_weight("blk.0.ffn_up.weight")
    assert w.qtype.value == "bf16" and w.nbytes == 128 * 64 * 2


@pytest.mark.parametrize("quantization", ["none", "int8", "int4"])
def test_planner_sizes_equal_what_the_worker_holds(tiny_tied, quantization):
    """ModelSizes.from_safetensors (headers only) equals the bytes of the weights the loader builds:
    per layer, and embedding (shared with the tied lm_head: one copy, int8 under int4)."""
    spec = read_model_spec(tiny_tied)
    sizes = ModelSizes.from_model(str(tiny_tied), spec, quantization, 32)
    ld = SafetensorsShardLoader(str(tiny_tied), spec, ShardSpec(0, 3, True, True), quantization)
    model = StageModel(spec, ld, 64)
    for i, layer in enumerate(model.layers):
        assert isinstance(layer, DecoderLayer)
        held = sum(m.qweight.nbytes for m in (layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj))
        held += 4 * (layer.input_norm.weight.numel() + layer.post_attention_norm.weight.numel())
        assert sizes.layer_bytes[i] == held, (i, sizes.layer_bytes[i], held)
    assert model.lm_head.qweight is model.embed_tokens.weight  # tied: one encoded copy
    assert sizes.embed_bytes == model.embed_tokens.nbytes
    assert model.embed_tokens.weight.qtype.value == {"none": "f32"}.get(quantization, "int8")
    plan = make_plan(spec, sizes, [WorkerOffer("w0", "127.0.0.1", 2**30)], 1, 1, 16)
    assert model.weight_bytes() == plan.assignments[0].weight_bytes


def test_gguf_models_refuse_quantization():
    path = str(resolve_model_path("smollm2-135m"))
    with pytest.raises(ValueError, match="quantization=int8 applies to safetensors checkpoints"):
        loader_mod.open_shard_loader(path, read_model_spec(path), ShardSpec(0, 1, True, False), "int8")


# ---- the directory tokenizer --------------------------------------------------------------------


def test_directory_tokenizer_equals_the_gguf_tokenizer(smollm2_2layers):
    from shardline.coordinator.tokenizer import IncrementalDetokenizer, Tokenizer

    ours = Tokenizer.from_model_path(smollm2_2layers)
    ref = Tokenizer.from_gguf(resolve_model_path("smollm2-135m"))
    assert ours.vocab_size == ref.vocab_size == 49152
    assert (ours.eos_token_id, ours.bos_token_id, ours.special_ids) == (ref.eos_token_id, ref.bos_token_id,
                                                                        ref.special_ids)
    for text in ("Hello, world!", "def f(x):\n    return 2**10 - 3", "naïve café – 東京 ²³", "<|im_start|>user"):
        ids = ours.encode(text)
        assert ids == ref.encode(text) and ours.decode(ids) == text
        detok = IncrementalDetokenizer(ours)
        assert "".join(detok.push([i]) for i in ids) + detok.flush() == text
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    assert ours.apply_chat_template(msgs) == ref.apply_chat_template(msgs)


def test_sentencepiece_style_tokenizer_json(tmp_path):
    """A Llama-2-style tokenizer.json (BPE with byte fallback, U+2581 for spaces, BOS added by the
    post-processor): encode/decode through `tokenizers`, bytes for streaming from <0xNN> and U+2581."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers, processors

    from shardline.coordinator.tokenizer import IncrementalDetokenizer, Tokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for piece in ("\u2581", "h", "i", "\u2581h", "\u2581hi", "o", "\u2581o"):
        vocab[piece] = len(vocab)
    merges = [("\u2581", "h"), ("\u2581h", "i"), ("\u2581", "o")]
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    t = Tokenizer.from_hf_directory(tmp_path)
    assert (t.bos_token_id, t.eos_token_id, t.add_bos_token) == (1, 2, True)
    ids = t.encode("hi o é", add_special_tokens=True)
    assert ids[0] == 1 and t.decode(ids, skip_special_tokens=True) == "hi o é"
    assert [t.token_bytes(i) for i in ids[1:]] == [b" hi", b" o", b" "] + [bytes([b]) for b in "é".encode()]
    detok = IncrementalDetokenizer(t, skip_special_tokens=True)
    assert "".join(detok.push([i]) for i in ids) + detok.flush() == " hi o é"  # streamed: leading space kept
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="no tokenizer.json"):
        Tokenizer.from_hf_directory(tmp_path)
