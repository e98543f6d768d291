"""Test checkpoints in Hugging Face layout (config.json + *.safetensors + tokenizer files).

No model hub is reachable, so `gguf_to_hf_checkpoint` makes one from a GGUF file: every tensor
dequantized with the `gguf` package's own dequantizer, Q and K rows put back into the
rotate-half layout with transformers' inverse of llama.cpp's permutation
(`transformers.integrations.ggml`'s reverse_permute formula), written as float32 with
`safetensors`. Shardline serving that directory therefore holds exactly the GGUF's dequantized
weights, and transformers' `LlamaForCausalLM.from_pretrained(directory)` is an independent
reference for it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from shardline.model_file import hf_tensor_name, read_model_spec


def reverse_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """GGUF Q/K rows (adjacent-pair RoPE) -> Hugging Face rows (rotate-half). w: [n_head * d, ...]."""
    dim = w.shape[0] // n_head // 2
    return np.ascontiguousarray(w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape))


def gguf_to_hf_checkpoint(gguf_path: str | Path, out_dir: str | Path, num_layers: int | None = None,
                          tokenizer: str | None = "shardline") -> Path:
    """Write a Hugging Face Llama checkpoint of the GGUF at `gguf_path` into `out_dir`.

    num_layers: keep only the first layers (a smaller valid model), None for all.
    tokenizer: "transformers" (transformers' GGUF tokenizer conversion, SmolLM2's digit-splitting
    pre-tokenizer restored, saved with save_pretrained: tokenizer.json, tokenizer_config.json,
    chat_template.jinja), "shardline" (our GGUF tokenizer's tokenizer.json and a tokenizer_config.json
    with the chat template), or None. Returns out_dir.
    """
    import gguf
    from safetensors.numpy import save_file
    from transformers import LlamaConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = read_model_spec(gguf_path)
    layers = spec.num_layers if num_layers is None else num_layers
    reader = gguf.GGUFReader(str(gguf_path))
    tensors: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        if t.name.startswith("blk.") and int(t.name.split(".")[1]) >= layers:
            continue
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        w = w.reshape([int(n) for n in reversed(t.shape.tolist())])
        if ".attn_q." in t.name:
            w = reverse_permute(w, spec.num_heads)
        elif ".attn_k." in t.name:
            w = reverse_permute(w, spec.num_kv_heads)
        tensors[hf_tensor_name(t.name)] = np.ascontiguousarray(w)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = LlamaConfig(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=layers, num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim, max_position_embeddings=spec.context_length, rms_norm_eps=spec.rms_norm_eps,
        rope_theta=spec.rope_theta, tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=spec.bos_token_id, eos_token_id=spec.eos_token_id, architectures=["LlamaForCausalLM"],
    )
    config.save_pretrained(str(out))
    if tokenizer == "transformers":
        from tests.reference import load_reference_tokenizer

        load_reference_tokenizer(split_digits=True).save_pretrained(str(out))
    elif tokenizer == "shardline":
        from shardline.coordinator.tokenizer import Tokenizer

        tok = Tokenizer.from_gguf(gguf_path)
        tok._tok.save(str(out / "tokenizer.json"))
        (out / "tokenizer_config.json").write_text(json.dumps({
            "eos_token": tok.id_to_token(tok.eos_token_id), "bos_token": tok.id_to_token(tok.bos_token_id),
            "chat_template": tok.chat_template, "add_bos_token": tok.add_bos_token}))
    return out
