"""The dense model families Shardline serves, as data: one `Architecture` row per family.

A row says how a family's files name and lay out its tensors and which of the decoder layer's
options it switches on; `shardline/worker/model.py` runs every family through one forward pass
that reads these switches. Names and conventions come from llama.cpp's `convert_hf_to_gguf.py`
(GGUF tensor and metadata names, what the converter does to each tensor) and from transformers'
modeling files (Hugging Face tensor names, config.json fields).

Tensors are named in the GGUF vocabulary throughout Shardline (llama.cpp's LLM_TENSOR names):

    token_embd, output_norm, output                            (whole model)
    blk.{i}.attn_norm  attn_q attn_k attn_v (+ .bias)  attn_output      (attention)
    blk.{i}.attn_q_norm attn_k_norm                    per-head q/k RMSNorm (qk_norm)
    blk.{i}.post_attention_norm                        norm of the attention output (post_norms)
    blk.{i}.ffn_norm  ffn_gate ffn_up ffn_down                          (gated MLP)
    blk.{i}.post_ffw_norm                              norm of the MLP output (post_norms)

These are the *logical* tensors the model reads. A family may store several of them in one
tensor (Phi-3: `attn_qkv` holds Q, K and V rows; its stored `ffn_up` holds the gate rows and then
the up rows); `Architecture.locate` / `hf_locate` give the stored tensor and the row offset of a
logical one. Shard transfer and the loaders speak logical names; only the file readers resolve.

Options (each a switch of the one forward pass):

    qkv_bias        Q, K, V projections carry biases (Qwen2)
    qk_norm         RMSNorm over each head of q and k before RoPE (Qwen3, Gemma 3)
    norm_offset     RMSNorm scales by (1 + w) (Gemma): Hugging Face stores w, GGUF stores 1 + w
                    (the converter adds 1 to every `*norm.weight`), so the safetensors loader adds 1
    post_norms      four norms a layer: the attention and MLP outputs are normed before their
                    residual adds (Gemma 2/3: post_attention_layernorm is that norm there, and
                    pre_feedforward_layernorm the MLP's input norm)
    embedding_scale embeddings times sqrt(hidden_size) (Gemma)
    activation      "silu" (SwiGLU) or "gelu_tanh" (GeGLU with tanh-approximated GELU, Gemma)
    fused_qkv       Q, K, V stored as one tensor (Phi-3)
    fused_gate_up   gate and up stored as one tensor, gate rows first (Phi-3)
    gguf_qk_permuted GGUF Q/K rows are already in the adjacent-pair RoPE order: llama.cpp's
                    converter permutes Q and K for its LLAMA architecture only; every other family
                    here uses NEOX RoPE (rotate-half, as Hugging Face) and keeps Hugging Face's
                    rows, which are permuted on load (shardline/worker/loader.py rope_row_order)
    sliding_window_pattern  GGUF files of the family do not list their sliding-window layers;
                    llama.cpp hard-codes them (`set_swa_pattern(n)`): layer i slides when n is 0
                    or i % n < n - 1, so every n-th layer is global (Gemma 2: 2, Gemma 3: 6; 0:
                    every layer slides once the file gives a window, as Mistral's and Phi-3's
                    configs mean it)
    tied_embeddings the lm_head is always the token embedding (Gemma)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

# Hugging Face module of each logical layer tensor, under model.layers.{i}. (transformers'
# modeling_llama.py; llama.cpp's gguf-py tensor_mapping.py maps the same pairs).
_LLAMA_HF = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
# Gemma 2/3 (modeling_gemma2.py): four norms; post_attention_layernorm normalizes the attention
# output, pre_feedforward_layernorm is the MLP's input norm.
_GEMMA_HF = {**_LLAMA_HF, "post_attention_norm": "post_attention_layernorm",
             "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}
# Phi-3 (modeling_phi3.py): fused projections.
_PHI3_HF = {**_LLAMA_HF, "attn_qkv": "self_attn.qkv_proj", "ffn_gate_up": "mlp.gate_up_proj"}

# Stored tensors of the fused families: GGUF name and Hugging Face key of the fused tensor, and
# its parts in row order. Sizes come from the spec (`_part_rows`).
_FUSED_QKV = ("attn_qkv", "attn_qkv", ("attn_q", "attn_k", "attn_v"))
_FUSED_GATE_UP = ("ffn_up", "ffn_gate_up", ("ffn_gate", "ffn_up"))

GLOBAL_HF = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


@dataclass(frozen=True)
class Architecture:
    """One dense decoder family (see the module doc for what each option means)."""

    name: str  # ModelSpec.architecture: GGUF's general.architecture
    hf_architectures: tuple[str, ...]  # config.json `architectures` entries
    hf_names: Mapping[str, str] = field(default_factory=lambda: MappingProxyType(_LLAMA_HF))
    gguf_qk_permuted: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    norm_offset: bool = False
    post_norms: bool = False
    embedding_scale: bool = False
    activation: str = "silu"
    fused_qkv: bool = False
    fused_gate_up: bool = False
    sliding_window_pattern: int = 0
    tied_embeddings: bool = False

    @property
    def llama_style(self) -> bool:
        """Whether the layer is Llama's: RMSNorm, attention, RMSNorm, SwiGLU, nothing between.
        Only such layers fit the fused CPU decode kernels (shardline/kernels/fused.py) and the
        bfloat16 activation path; the others run the general path."""
        return not (self.post_norms or self.qk_norm or self.activation != "silu")

    def layer_tensors(self) -> tuple[str, ...]:
        """The logical per-layer tensors this family's layers read (without biases)."""
        names = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up",
                 "ffn_down"]
        if self.qk_norm:
            names += ["attn_q_norm", "attn_k_norm"]
        if self.post_norms:
            names += ["post_attention_norm", "post_ffw_norm"]
        return tuple(names)

    def _fused(self, short: str):
        for on, (gguf, hf, parts) in ((self.fused_qkv, _FUSED_QKV), (self.fused_gate_up, _FUSED_GATE_UP)):
            if on and short in parts:
                return gguf, hf, parts
        return None

    def locate(self, name: str, spec) -> tuple[str, int, int | None]:
        """Logical GGUF tensor name -> (stored GGUF name, first row, number of rows or None for
        the whole tensor). `blk.3.ffn_gate.weight` of Phi-3 -> (`blk.3.ffn_up.weight`, 0, F)."""
        prefix, short, suffix = split_name(name)
        fused = self._fused(short) if suffix == "weight" else None
        if fused is None:
            return name, 0, None
        start, rows = _part_rows(spec, fused[2], short)
        return f"{prefix}{fused[0]}.{suffix}", start, rows

    def hf_locate(self, name: str, spec) -> tuple[str, int, int | None]:
        """Logical GGUF tensor name -> (Hugging Face tensor name, first row, number of rows or
        None for the whole tensor), e.g. `blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`.

        Raises:
            KeyError: a name with no Hugging Face counterpart in this family.
        """
        prefix, short, suffix = split_name(name)
        if not prefix:
            if short not in GLOBAL_HF:
                raise KeyError(name)
            return f"{GLOBAL_HF[short]}.{suffix}", 0, None
        fused = self._fused(short) if suffix == "weight" else None
        if fused is not None:
            start, rows = _part_rows(spec, fused[2], short)
            short = fused[1]
        else:
            start, rows = 0, None
        if short not in self.hf_names:
            raise KeyError(name)
        return f"model.layers.{prefix[4:-1]}.{self.hf_names[short]}.{suffix}", start, rows


def split_name(name: str) -> tuple[str, str, str]:
    """`blk.3.attn_q.weight` -> ("blk.3.", "attn_q", "weight"); `output.weight` -> ("", "output", "weight").

    Raises:
        KeyError: a name of neither form.
    """
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit():
        return f"blk.{parts[1]}.", parts[2], parts[3]
    if len(parts) == 2:
        return "", parts[0], parts[1]
    raise KeyError(name)


def _part_rows(spec, parts: tuple[str, ...], short: str) -> tuple[int, int]:
    """(first row, rows) of logical tensor `short` inside a fused tensor of `parts`."""
    size = {"attn_q": spec.num_heads * spec.head_dim, "attn_k": spec.num_kv_heads * spec.head_dim,
            "attn_v": spec.num_kv_heads * spec.head_dim, "ffn_gate": spec.intermediate_size,
            "ffn_up": spec.intermediate_size}
    start = 0
    for p in parts:
        if p == short:
            return start, size[p]
        start += size[p]
    raise AssertionError(f"{short} is not a part of {parts}")


ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (
    Architecture(name="llama", hf_architectures=("LlamaForCausalLM",), gguf_qk_permuted=True),
    # Mistral's checkpoints convert to GGUF architecture "llama"; "mistral" is kept for GGUF files
    # that name it.
    Architecture(name="mistral", hf_architectures=("MistralForCausalLM",), gguf_qk_permuted=True),
    Architecture(name="qwen2", hf_architectures=("Qwen2ForCausalLM",), qkv_bias=True),
    Architecture(name="qwen3", hf_architectures=("Qwen3ForCausalLM",), qk_norm=True),
    Architecture(name="gemma2", hf_architectures=("Gemma2ForCausalLM",), hf_names=MappingProxyType(_GEMMA_HF),
         norm_offset=True, post_norms=True, embedding_scale=True, activation="gelu_tanh",
         sliding_window_pattern=2, tied_embeddings=True),
    Architecture(name="gemma3", hf_architectures=("Gemma3ForCausalLM",), hf_names=MappingProxyType(_GEMMA_HF),
         qk_norm=True, norm_offset=True, post_norms=True, embedding_scale=True, activation="gelu_tanh",
         sliding_window_pattern=6, tied_embeddings=True),
    Architecture(name="phi3", hf_architectures=("Phi3ForCausalLM",), hf_names=MappingProxyType(_PHI3_HF),
         fused_qkv=True, fused_gate_up=True),
)}

# config.json `architectures` entry -> family
HF_ARCHITECTURES: dict[str, str] = {hf: a.name for a in ARCHITECTURES.values() for hf in a.hf_architectures}

# Mixture-of-experts families, refused by name until expert parallelism lands: config.json
# `architectures` entries, and the config.json keys that count experts (transformers' names).
MOE_HF_ARCHITECTURES = ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "PhimoeForCausalLM",
                        "DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM", "OlmoeForCausalLM")
MOE_CONFIG_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")


def architecture(name: str) -> Architecture:
    """The family row of `ModelSpec.architecture`.

    Raises:
        KeyError: an architecture Shardline does not serve.
    """
    return ARCHITECTURES[name]
