"""A worker's shard: which tensors (and which slices of them) one pipeline stage x TP rank holds,
and the model digest the join handshake compares.

Both sides of a shard transfer use `shard_tensor_slices`: the coordinator to stream exactly
these bytes, the worker to check that it received them. It mirrors what `shardline/worker/model.py` asks
its loader for (logical GGUF tensor names, shardline/architectures.py):

    stage 0:        token_embd.weight                               rows of this rank's vocabulary slice
    every layer i:  blk.i.attn_norm / ffn_norm                      whole
                    blk.i.attn_q / attn_k / attn_v  (+ .bias)       rows of this rank's heads   (column-parallel)
                    blk.i.attn_output                               cols of this rank's heads   (row-parallel)
                    blk.i.ffn_gate / ffn_up                         rows of this rank's FFN slice
                    blk.i.ffn_down                                  cols of this rank's FFN slice
                    blk.i.attn_q_norm / attn_k_norm                 whole (families with q/k norms)
                    blk.i.post_attention_norm / post_ffw_norm       whole (families with post-norms)
    last stage:     output_norm.weight                              whole
                    output.weight (or the tied token_embd.weight)   rows of this rank's vocabulary slice

The names are logical: where a family stores several of these in one tensor (Phi-3's attn_qkv,
its gate+up ffn_up), the coordinator's sources cut the part out (`Architecture.locate`), so the
worker receives the same logical tensors it would read from the file.

Rows are output features ([out, in] weights), columns input features; a 1-D bias is sliced like
its weight's rows. The embedding and lm_head are vocabulary-parallel (Megatron-LM, Shoeybi et
al. 2019, sec. 3): TP rank r holds the vocabulary rows `vocab_range(V, r, t)`.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from shardline.architectures import architecture
from shardline.model_file import ModelSpec


@dataclass(frozen=True)
class TensorSlice:
    """One tensor of a shard: `rows` = output rows [r0, r1) of a 2-D weight (elements of a 1-D
    tensor), `cols` = input columns [c0, c1); None = all of that dimension."""

    name: str
    rows: tuple[int, int] | None = None
    cols: tuple[int, int] | None = None


def head_rows(spec: ModelSpec, num_heads: int, tp_rank: int, tp_size: int) -> tuple[int, int]:
    """Rows of TP rank `tp_rank`'s heads in a projection with `num_heads` heads of head_dim."""
    per = num_heads // tp_size * spec.head_dim
    return tp_rank * per, (tp_rank + 1) * per


def ffn_range(spec: ModelSpec, tp_rank: int, tp_size: int) -> tuple[int, int]:
    """TP rank `tp_rank`'s slice of the intermediate (FFN) dimension."""
    per = spec.intermediate_size // tp_size
    return tp_rank * per, (tp_rank + 1) * per


def vocab_range(vocab_size: int, tp_rank: int, tp_size: int) -> tuple[int, int]:
    """TP rank `tp_rank`'s rows [v0, v1) of the token embedding and the lm_head.

    Each rank's slice is padded to per = ceil(V / t) rows: rank r holds [r * per, min((r + 1) *
    per, V)), so only the last rank's slice can be short (V = 49152, t = 3: 16384 rows each). The
    padding is never stored; the lm_head pads the last rank's partial logits with -inf to `per`
    columns for the all-gather and cuts the gathered [T, t * per] back to V (shardline/worker/model.py,
    `VocabParallelLMHead`). t = 1: (0, V). Raises ValueError when a rank would hold no row
    (V <= (t - 1) * per; the planner refuses such a layout first).
    """
    per = -(-vocab_size // tp_size)
    v0, v1 = tp_rank * per, min((tp_rank + 1) * per, vocab_size)
    if v0 >= v1:
        raise ValueError(f"tensor_parallel={tp_size} leaves rank {tp_rank} no rows of a {vocab_size}-token vocabulary")
    return v0, v1


def shard_tensor_slices(spec: ModelSpec, layer_start: int, layer_end: int, is_first: bool, is_last: bool,
                        tp_rank: int = 0, tp_size: int = 1) -> list[TensorSlice]:
    """The tensors (GGUF names) and slices a worker of this shard reads, in a fixed order (see the
    module doc). With tp_size 1 every slice is whole (rows/cols None)."""
    def part(r: tuple[int, int], whole: int) -> tuple[int, int] | None:
        return None if r == (0, whole) else r

    q_rows = part(head_rows(spec, spec.num_heads, tp_rank, tp_size), spec.num_heads * spec.head_dim)
    kv_rows = part(head_rows(spec, spec.num_kv_heads, tp_rank, tp_size), spec.num_kv_heads * spec.head_dim)
    f = part(ffn_range(spec, tp_rank, tp_size), spec.intermediate_size)
    vocab = part(vocab_range(spec.vocab_size, tp_rank, tp_size), spec.vocab_size)
    fam = architecture(spec.architecture)
    extra = (["attn_q_norm", "attn_k_norm"] if fam.qk_norm else []) + (
        ["post_attention_norm", "post_ffw_norm"] if fam.post_norms else [])
    out: list[TensorSlice] = []
    if is_first:
        out.append(TensorSlice("token_embd.weight", rows=vocab))
    for i in range(layer_start, layer_end):
        p = f"blk.{i}."
        out += [TensorSlice(p + "attn_norm.weight"), TensorSlice(p + "ffn_norm.weight")]
        for proj, rows in (("attn_q", q_rows), ("attn_k", kv_rows), ("attn_v", kv_rows)):
            out.append(TensorSlice(f"{p}{proj}.weight", rows=rows))
            if spec.attention_bias:
                out.append(TensorSlice(f"{p}{proj}.bias", rows=rows))
        out += [TensorSlice(p + "attn_output.weight", cols=q_rows),
                TensorSlice(p + "ffn_gate.weight", rows=f), TensorSlice(p + "ffn_up.weight", rows=f),
                TensorSlice(p + "ffn_down.weight", cols=f)]
        out += [TensorSlice(f"{p}{t}.weight") for t in extra]
    if is_last:
        out.append(TensorSlice("output_norm.weight"))
        head = "token_embd.weight" if spec.tie_word_embeddings else "output.weight"
        if not (is_first and spec.tie_word_embeddings):  # one stage, tied: already listed
            out.append(TensorSlice(head, rows=vocab))
    return out


# Files of a Hugging Face checkpoint directory that define the model (the digest covers these).
_CHECKPOINT_PATTERNS = ("config.json", "*.safetensors", "tokenizer.json", "tokenizer_config.json",
                        "generation_config.json")


def _file_sha256(path: Path, chunk_bytes: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


def model_digest(path: str | os.PathLike) -> str:
    """SHA-256 hex digest naming a model: of the file for a GGUF; for a checkpoint directory, of
    the lines "<file name> <sha256 of the file>" of its model files (config.json, *.safetensors,
    tokenizer files), sorted by name. Reads every byte (about 1-2 s per GB).

    Raises:
        OSError: the path cannot be read.
    """
    p = Path(path)
    if not p.is_dir():
        return _file_sha256(p)
    files = sorted({f for pat in _CHECKPOINT_PATTERNS for f in p.glob(pat) if f.is_file()})
    lines = "".join(f"{f.name} {_file_sha256(f)}\n" for f in files)
    return hashlib.sha256(lines.encode()).hexdigest()
