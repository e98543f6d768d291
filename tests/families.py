"""Tiny random-weight models of every served family, as Hugging Face checkpoints and as GGUF files.

Each entry of FAMILIES is a transformers config shaped like a real model's (the same fields and
options: GQA ratio, explicit head_dim, biases, norms, soft-capping, sliding-window layout, RoPE
variant) with layers and widths shrunk, and the pretraining context (`original_max_position_
embeddings`) and sliding windows made small, so a test reaches positions past them in a few
dozen tokens. `build_family` makes, once per directory:

  hf/          transformers' model with random weights (seeded), saved by `save_pretrained`
               (config.json, model.safetensors, generation_config.json) plus a tokenizer
  model.gguf   the same weights written the way llama.cpp's convert_hf_to_gguf.py writes the
               family: its architecture name and metadata keys, tensor names from gguf-py's own
               TensorNameMap (not Shardline's table), Q/K rows permuted for LLAMA, Gemma's norms
               stored as 1 + w, Phi-3's fused attn_qkv and gate+up ffn_up as they are, llama3's
               `rope_freqs` divisors and LongRoPE's `rope_factors_long/short` tensors. 2-D
               weights are Q8_0 (so the packed CPU kernels and the fused decode layer run), 1-D
               tensors F32.

The checkpoint's 2-D weights are first rounded to Q8_0's grid (quantized and dequantized by
`gguf.quants`), so both files hold exactly the same values and transformers' forward on the
checkpoint is the reference for both.

Deliberate departures from the real configs, so the options are exercised on a random model:
Gemma 2's soft-capping values are lowered (random logits never reach 50 / 30), the llama3
conversion computes `rope_freqs` from the config's original context (the converter reads a
top-level `original_max_position_embeddings`, else 8192: the real models' value), and weights are
drawn with a larger `initializer_range` so that greedy choices are well separated.

The tokenizer is a tiny byte-level BPE (256 byte tokens, a few merges, BOS and EOS), so the
vocabulary is 264 tokens; prompts are given as token ids.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shardline.coordinator.tokenizer import bytes_to_unicode

# ---- the tokenizer ------------------------------------------------------------------------------

_BYTE_CHARS = bytes_to_unicode()  # GPT-2's printable character for each byte
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("e", "r")]
SPECIALS = ["<|bos|>", "<|eos|>"]


TOKENS = [_BYTE_CHARS[b] for b in range(256)] + ["".join(m) for m in MERGES] + SPECIALS
VOCAB_SIZE = len(TOKENS)  # 264
BOS_ID, EOS_ID = TOKENS.index("<|bos|>"), TOKENS.index("<|eos|>")


def _write_tokenizer(directory: Path) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(TOKENS[:-len(SPECIALS)])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=MERGES))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    assert tok.get_vocab_size(with_added_tokens=True) == VOCAB_SIZE
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": SPECIALS[0], "eos_token": SPECIALS[1], "add_bos_token": False}))


# ---- the families ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """A tiny model: transformers class, config fields, GGUF architecture, and the positions a
    test must reach (past the pretraining context and the sliding window)."""

    name: str
    hf_class: str
    gguf_arch: str
    config: dict
    reach: int  # tokens a test should run to


_COMMON = dict(vocab_size=VOCAB_SIZE, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=None,
               initializer_range=0.15)

FAMILIES: dict[str, Family] = {f.name: f for f in (
    # Llama-3.2-1B: tied, GQA 4:1, llama3 RoPE factor 32 (original 8192 -> 32 here)
    Family("llama3.2", "LlamaForCausalLM", "llama", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32}), reach=48),
    # Llama-3.1-8B: untied, GQA 4:1, llama3 factor 8
    Family("llama3.1", "LlamaForCausalLM", "llama", dict(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
        head_dim=16, max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32}), reach=48),
    # Qwen2.5-0.5B: tied, q/k/v biases, with the YaRN scaling Qwen2.5's model cards describe
    Family("qwen2.5", "Qwen2ForCausalLM", "qwen2", dict(
        hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=True,
        rope_parameters={"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0,
                         "original_max_position_embeddings": 32}), reach=48),
    # Qwen3-0.6B: tied, q/k norms, head_dim 2x hidden / heads
    Family("qwen3", "Qwen3ForCausalLM", "qwen3", dict(
        hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}), reach=40),
    # Mistral-7B-v0.3: untied, GQA 4:1, no sliding window
    Family("mistral", "MistralForCausalLM", "llama", dict(
        hidden_size=128, intermediate_size=224, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
        head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False, sliding_window=None,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}), reach=40),
    # Gemma-2-2B: four norms, GeGLU, soft-capping (lowered), alternating sliding / global layers
    Family("gemma2", "Gemma2ForCausalLM", "gemma2", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, query_pre_attn_scalar=32, max_position_embeddings=256, rms_norm_eps=1e-6,
        hidden_activation="gelu_pytorch_tanh", attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
        sliding_window=12, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}), reach=40),
    # Gemma-3-1B: five sliding layers then a global one, local and global RoPE bases, q/k norms, 1 KV head
    Family("gemma3", "Gemma3ForCausalLM", "gemma3", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=1,
        head_dim=32, query_pre_attn_scalar=32, max_position_embeddings=256, rms_norm_eps=1e-6,
        hidden_activation="gelu_pytorch_tanh", sliding_window=12,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}}), reach=40),
    # Phi-3-mini-128k: fused qkv and gate_up, LongRoPE, sliding window; partial rotary as Phi-4-mini
    Family("phi3", "Phi3ForCausalLM", "phi3", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=256, original_max_position_embeddings=32, rms_norm_eps=1e-5,
        tie_word_embeddings=False, sliding_window=40, partial_rotary_factor=0.75,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                         "short_factor": [1.0, 1.02, 1.05, 1.1, 1.2, 1.4],
                         "long_factor": [1.0, 1.3, 2.5, 6.0, 14.0, 31.0]}), reach=48),
)}

# Further RoPE variants on the Llama-3.1 shape (config.json only: GGUF has no dynamic NTK)
ROPE_VARIANTS: dict[str, Family] = {
    "llama-linear": Family("llama-linear", "LlamaForCausalLM", "llama", {
        **FAMILIES["llama3.1"].config, "rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0,
                                                          "factor": 4.0}}, reach=40),
    "llama-dynamic": Family("llama-dynamic", "LlamaForCausalLM", "llama", {
        **FAMILIES["llama3.1"].config, "max_position_embeddings": 32,
        "rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0}}, reach=48),
}


@dataclass(frozen=True)
class FamilyFiles:
    family: Family
    hf_dir: Path
    gguf_path: Path | None


def build_family(name: str, directory: str | Path, seed: int = 0, gguf: bool = True) -> FamilyFiles:
    """Write family `name`'s tiny model into `directory` (hf/ and model.gguf; see the module doc).
    Returns the paths; files already there are kept."""
    import torch
    import transformers

    fam = FAMILIES.get(name) or ROPE_VARIANTS[name]
    out = Path(directory)
    hf_dir, gguf_path = out / "hf", out / "model.gguf"
    if not (hf_dir / "config.json").is_file():
        hf_dir.mkdir(parents=True, exist_ok=True)
        cls = getattr(transformers, fam.hf_class)
        config = cls.config_class(**_COMMON, **fam.config, architectures=[fam.hf_class])
        torch.manual_seed(seed)
        model = cls(config).eval()
        _round_to_q8_0(model)
        model.save_pretrained(str(hf_dir))
        _write_tokenizer(hf_dir)
    if gguf and not gguf_path.is_file():
        write_gguf(reference_model(str(hf_dir)), fam, gguf_path)
    return FamilyFiles(fam, hf_dir, gguf_path if gguf else None)


def _round_to_q8_0(model) -> None:
    """Every 2-D weight replaced by its Q8_0 value (gguf's quantizer and dequantizer)."""
    import torch
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                q = quantize(p.numpy().astype(np.float32), GGMLQuantizationType.Q8_0)
                p.copy_(torch.from_numpy(dequantize(q, GGMLQuantizationType.Q8_0).reshape(p.shape)))


@functools.lru_cache(maxsize=None)
def reference_model(hf_dir: str):
    """transformers' model from the checkpoint, float32, eager attention (soft-capping needs it)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()


def reference_logits(model, ids: list[int], chunks: list[int]) -> np.ndarray:
    """transformers' logits of `ids`, fed through its KV cache in pieces of `chunks` tokens (the
    last piece one token at a time after them): [len(ids), vocab] float32. Feeding in the same
    pieces as the model under test matters for the RoPE variants that depend on the sequence
    length (LongRoPE, dynamic NTK), whose frequencies follow the length at each forward pass."""
    import torch

    bounds, pos = [], 0
    for n in chunks:
        bounds.append((pos, pos + n))
        pos += n
    bounds += [(p, p + 1) for p in range(pos, len(ids))]
    cache, rows = None, []
    with torch.inference_mode():
        for a, b in bounds:
            out = model(torch.tensor([ids[a:b]]), cache=cache, use_cache=True, position_ids=torch.arange(a, b)[None])
            cache = out.cache
            rows.append(out.logits[0].float())
    return torch.cat(rows).numpy()


def reference_greedy(model, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy continuation of `prompt`: n tokens, the prompt in one forward pass,
    then one token a pass through its cache (as `generate` does; EOS does not stop it)."""
    import torch

    ids, cache = list(prompt), None
    with torch.inference_mode():
        step = ids
        for _ in range(n):
            start = len(ids) - len(step)
            out = model(torch.tensor([step]), cache=cache, use_cache=True,
                        position_ids=torch.arange(start, len(ids))[None])
            cache = out.cache
            step = [int(out.logits[0, -1].argmax())]
            ids += step
    return ids[len(prompt):]


# ---- GGUF, as convert_hf_to_gguf.py writes it ------------------------------------------------------


def _llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: rotate-half rows -> adjacent pairs, per head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_rope_freqs(rope: dict, head_dim: int) -> np.ndarray:
    """LlamaModel.generate_extra_tensors: the per-frequency divisors of llama3 RoPE."""
    base, factor = rope["rope_theta"], rope["factor"]
    low, high, old = rope["low_freq_factor"], rope["high_freq_factor"], rope["original_max_position_embeddings"]
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def write_gguf(model, fam: Family, path: Path) -> None:
    """`model`'s weights and config as a GGUF file of architecture `fam.gguf_arch` (module doc)."""
    import gguf

    cfg = model.config.to_dict()
    arch = fam.gguf_arch
    n_layers, heads = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    rope = cfg.get("rope_parameters") or {}
    full = rope.get("full_attention", rope)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(n_layers)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    if arch != "gemma2":  # Gemma2Model.set_gguf_parameters writes no base (llama.cpp's default 10000)
        w.add_rope_freq_base(full["rope_theta"])
    kind = full.get("rope_type", "default")
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(full["factor"])
    elif kind == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(full["factor"])
        w.add_rope_scaling_orig_ctx_len(full["original_max_position_embeddings"])
    extra: dict[str, np.ndarray] = {}
    if arch == "llama":
        w.add_vocab_size(cfg["vocab_size"])
        w.add_rope_dimension_count(head_dim)
        if kind == "llama3":
            extra["rope_freqs.weight"] = _llama3_rope_freqs(full, head_dim)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(cfg["attn_logit_softcapping"])
        w.add_final_logit_softcapping(cfg["final_logit_softcapping"])
        w.add_sliding_window(cfg["sliding_window"])
    if arch == "gemma3":
        w.add_rope_freq_base_swa(rope["sliding_attention"]["rope_theta"])
        w.add_sliding_window(cfg["sliding_window"])
    if arch == "phi3":
        original = cfg["original_max_position_embeddings"]
        w.add_rope_scaling_orig_ctx_len(original)
        w.add_rope_dimension_count(int(cfg["partial_rotary_factor"] * cfg["hidden_size"]) // heads)
        w.add_sliding_window(cfg.get("sliding_window") or 0)
        scale = cfg["max_position_embeddings"] / original
        w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0)
        extra["rope_factors_long.weight"] = np.array(full["long_factor"], dtype=np.float32)
        extra["rope_factors_short.weight"] = np.array(full["short_factor"], dtype=np.float32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(TOKENS)
    w.add_token_types([gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t in TOKENS])
    w.add_token_merges([" ".join(m) for m in MERGES])
    w.add_bos_token_id(BOS_ID)
    w.add_eos_token_id(EOS_ID)
    w.add_add_bos_token(False)

    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), n_layers)
    for name, data in extra.items():
        w.add_tensor(name, data)
    for hf_name, t in model.state_dict().items():
        if hf_name == "lm_head.weight" and (arch.startswith("gemma") or cfg.get("tie_word_embeddings")):
            continue  # not in a tied checkpoint's files (Gemma2Model.filter_tensors drops it anyway)
        data = t.detach().float().numpy().copy()
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert name is not None, hf_name
        if arch == "llama" and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            data = _llama_permute(data, heads)
        elif arch == "llama" and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            data = _llama_permute(data, kv_heads)
        if arch.startswith("gemma") and hf_name.endswith("norm.weight"):
            data = data + np.float32(1.0)  # Gemma(2/3)Model.modify_tensors: RMSNorm's 1 + w
        if data.ndim == 2:
            w.add_tensor(name, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, data.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
