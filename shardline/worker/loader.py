"""Load one stage's shard of a dense decoder: only its layers, only its TP slice.

Two sources, one interface (`has`, `dense`, `rows`, `cols`, `quantized`, `linear_weight`,
`head_rows`, `ffn_range`, `rope_rows_adjacent`; tensors named by their logical GGUF names,
shardline/architectures.py): `GGUFShardLoader` keeps a GGUF file's quantized weights packed as
stored, and `SafetensorsShardLoader` reads a Hugging Face checkpoint and quantizes it on load.
`open_shard_loader` picks one by the model path. A family that stores several logical tensors in
one (Phi-3's `attn_qkv`, its gate+up `ffn_up`) is read part by part: the loaders resolve each
logical name to its stored tensor and rows (`Architecture.locate` / `hf_locate`).

GGUF tensor names (llama.cpp): token_embd, blk.{i}.attn_norm / attn_q / attn_k / attn_v /
attn_output / ffn_norm / ffn_gate / ffn_up / ffn_down (+ the families' q/k and post norms),
output_norm, output (absent when tied). A 2-D weight with GGUF shape [in, out] is a NumPy array
[out, in] of quant blocks along `in`.

RoPE layout. The model rotates adjacent pairs (x[2i], x[2i+1]). llama.cpp's converter permutes
the rows of Q and K inside each head into that order for its LLAMA architecture (Llama, Mistral),
so those rows are used as stored. Every other family here is NEOX RoPE in llama.cpp (rotate-half,
x[i] with x[i + rotary_dim/2]) and its GGUF keeps Hugging Face's row order, as every Hugging
Face checkpoint does; `rope_rows_adjacent` says which a loader delivers, and rows in the
rotate-half order are put into the adjacent-pair order with `rope_row_order` (on load for
safetensors; by the model for such GGUF files). The permutation stays inside a head, so slicing
by head for tensor parallelism is still exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from shardline.architectures import architecture
from shardline.model_file import (ModelError, ModelSpec, SafetensorsCheckpoint, embedding_quantization,
                                  is_safetensors_checkpoint)

# Float32 values read (and quantized) at a time when loading a safetensors weight: 16 MiB, so the
# float copy held while loading stays far below one layer's, whatever the tensor's size.
LOAD_CHUNK_FLOATS = 1 << 22


@dataclass(frozen=True)
class ShardSpec:
    """Which part of the model a worker holds."""

    layer_start: int
    layer_end: int  # exclusive
    is_first: bool
    is_last: bool
    tp_rank: int = 0
    tp_size: int = 1


def _dequantize(t) -> np.ndarray:
    """A gguf.ReaderTensor -> float32 array [out, in] (or [n] for 1-D)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    if t.tensor_type == GGMLQuantizationType.F32:
        arr = np.array(t.data, dtype=np.float32)
    else:
        arr = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
    shape = tuple(int(x) for x in reversed(t.shape.tolist()))
    return arr.reshape(shape)


class GGUFShardLoader:
    """Reads the tensors of one shard from a memory-mapped GGUF file."""

    def __init__(self, path: str, spec: ModelSpec, shard: ShardSpec):
        import gguf

        self.spec = spec
        self.shard = shard
        self.reader = gguf.GGUFReader(path)
        self.tensors = {t.name: t for t in self.reader.tensors}

    @property
    def rope_rows_adjacent(self) -> bool:
        """Whether Q/K rows (and q/k norm weights) come in the adjacent-pair RoPE order: as stored
        for the families llama.cpp permutes (see the module doc), else Hugging Face's order."""
        return architecture(self.spec.architecture).gguf_qk_permuted

    def has(self, name: str) -> bool:
        try:
            return self._part(name)[0] is not None
        except KeyError:
            return False

    def close(self) -> None:
        """Nothing to release: the packed weights are views of the file's memory map, which must
        stay mapped while the model runs."""

    def raw(self, name: str):
        if name not in self.tensors:
            raise KeyError(f"tensor {name!r} not in the model file")
        return self.tensors[name]

    def _part(self, name: str):
        """(stored tensor, first row, rows or None) of logical tensor `name` (see the module doc)."""
        stored, start, rows = architecture(self.spec.architecture).locate(name, self.spec)
        return self.raw(stored), start, rows

    def quantized(self, name: str):
        """A 2-D weight kept packed as stored (shardline.kernels.formats.QuantizedWeight, a memmap view)."""
        from shardline.kernels.formats import QuantizedWeight

        t, start, rows = self._part(name)
        q = QuantizedWeight.from_gguf(t)
        return q if rows is None else q.row_slice(start, start + rows)

    def linear_weight(self, name: str, rows: tuple[int, int] | None = None,
                      cols: tuple[int, int] | None = None):
        """A 2-D weight's output rows [r0, r1) or input columns [c0, c1) (a TP shard), packed:
        rows are views of the file; columns are copied (see QuantizedWeight.col_slice)."""
        q = self.quantized(name)
        if cols is not None and cols != (0, q.in_features):
            return q.col_slice(*cols)
        if rows is not None and rows != (0, q.out_features):
            return q.row_slice(*rows)
        return q

    def dense(self, name: str) -> torch.Tensor:
        """Whole tensor as float32 (norm weights, biases, embeddings)."""
        t, start, rows = self._part(name)
        w = _dequantize(t)
        if rows is not None:
            w = w[start:start + rows]
        return torch.from_numpy(np.require(w, requirements=["C", "W"]))

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Output rows [start, stop) of a 2-D weight (or elements of a 1-D bias), float32."""
        return self.dense(name)[start:stop].contiguous()

    def cols(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Input columns [start, stop) of a 2-D weight, float32."""
        return self.dense(name)[:, start:stop].contiguous()

    # TP slices --------------------------------------------------------------------------
    def head_rows(self, name: str, num_heads: int) -> tuple[int, int]:
        """Row range of this TP rank's heads in a Q/K/V projection with `num_heads` heads."""
        per = num_heads // self.shard.tp_size
        d = self.spec.head_dim
        return self.shard.tp_rank * per * d, (self.shard.tp_rank + 1) * per * d

    def ffn_range(self) -> tuple[int, int]:
        per = self.spec.intermediate_size // self.shard.tp_size
        return self.shard.tp_rank * per, (self.shard.tp_rank + 1) * per

    def vocab_rows(self) -> tuple[int, int]:
        """This TP rank's vocabulary rows [v0, v1) of the token embedding and the lm_head
        (`shardline.shard.vocab_range`: ceil(V / t) per rank, the last rank's slice short)."""
        from shardline.shard import vocab_range

        return vocab_range(self.spec.vocab_size, self.shard.tp_rank, self.shard.tp_size)


def rope_row_order(num_rows: int, head_dim: int, rotary_dim: int | None = None) -> np.ndarray:
    """Row indices that put Q/K rows of whole heads from the rotate-half RoPE order (Hugging
    Face; llama.cpp's NEOX) into the adjacent-pair order the model rotates: `w[order]`.

    Within each head, rotate-half pairs row i with row i + r/2 (r = rotary_dim, default
    head_dim); llama.cpp's convert_hf_to_gguf.py `permute` interleaves them, so that row 2i is
    rotate-half row i and row 2i+1 is row i + r/2; rows r .. head_dim-1 (not rotated: partial
    rotary) stay:

        rotate-half head rows:  0 1 2 ... r/2-1 | r/2 r/2+1 ... r-1 | r ... d-1
        adjacent-pair order:    0 r/2 1 r/2+1 2 ... r/2-1 r-1       | r ... d-1

    Returns int64 [num_rows]. (For r = d this is the converter's `reshape(n_head, 2, d/2, ...)
    .swapaxes(1, 2)`.)
    """
    assert num_rows % head_dim == 0, f"{num_rows} rows are not whole heads of {head_dim}"
    r = rotary_dim or head_dim
    one = np.arange(head_dim)
    one[0:r:2] = np.arange(r // 2)
    one[1:r:2] = r // 2 + np.arange(r // 2)
    return (np.arange(num_rows // head_dim)[:, None] * head_dim + one[None, :]).reshape(-1)


def permute_rope_rows(w: np.ndarray, head_dim: int, rotary_dim: int | None = None) -> np.ndarray:
    """Hugging Face Q/K rows (or biases, or a q/k norm weight) -> the adjacent-pair RoPE layout
    the model uses: `w[rope_row_order(...)]`, whole heads [n_heads * head_dim, ...]."""
    return np.ascontiguousarray(w[rope_row_order(w.shape[0], head_dim, rotary_dim)])


class SafetensorsShardLoader:
    """Reads one shard of a Hugging Face checkpoint (config.json + *.safetensors) and quantizes it
    on load.

    Tensors are asked for by their logical GGUF names (shardline/worker/model.py's vocabulary) and
    found through the checkpoint's `locate` (HF name and rows, `shardline.model_file.hf_locate`).
    Each 2-D weight is read in chunks of about LOAD_CHUNK_FLOATS values (only this shard's rows /
    columns), Q and K rows (and biases, q/k norm weights) permuted into the adjacent-pair RoPE
    layout (`rope_row_order`, with the spec's rotary_dim), and each chunk encoded by
    `shardline.kernels.formats.quantize`:

        quantization  2-D weights                                    embedding, lm_head
        none          f32 (dtype float32) / bf16                     same
        int8          int8 symmetric (scale per group)               int8 symmetric
        int4          int4 asymmetric (scale and min per group)      int8 symmetric (see embedding_quantization)

    int4 keeps a per-group minimum (zero point) as ggml's Q4_1 and AWQ/GPTQ do: with 16 levels
    over [min, max] instead of 15 over [-amax, amax], its error bound is (max-min)/30 against
    amax/14; int8 has levels to spare and stays symmetric.

    so the float copy held while loading is one chunk, not a layer. Norms and biases stay
    float32; a family whose RMSNorm scales by (1 + w) (Gemma) gets 1 + w, the form GGUF stores and
    the model multiplies by. A tied lm_head shares the embedding's encoded weight.

    Raises:
        ModelError: a tensor the model needs is missing.
        ValueError: an unknown quantization or dtype.
    """

    def __init__(self, path: str, spec: ModelSpec, shard: ShardSpec, quantization: str = "none",
                 group_size: int = 32, dtype: str = "float32", checkpoint=None):
        """`checkpoint`: an object with SafetensorsCheckpoint's reading interface to read from
        instead of opening `path` (shardline/worker/shard_transfer.py's ReceivedCheckpoint)."""
        if quantization not in ("none", "int8", "int4"):
            raise ValueError(f"unknown quantization {quantization!r}; expected none, int8 or int4")
        if dtype not in ("float32", "bfloat16"):
            raise ValueError(f"unknown dtype {dtype!r}; expected float32 or bfloat16")
        self.spec = spec
        self.shard = shard
        self.quantization = quantization
        self.group_size = group_size
        self.dtype = dtype
        self.ckpt = checkpoint if checkpoint is not None else SafetensorsCheckpoint(path)
        self._embedding = None  # (rows, the encoded token embedding's rows), shared with a tied lm_head

    rope_rows_adjacent = True  # Q/K rows are permuted on load

    def _hf(self, name: str) -> tuple[str, int, int]:
        """(HF tensor, first row, rows) holding logical tensor `name`."""
        try:
            hf, start, rows = self.ckpt.locate(name, self.spec)
        except KeyError:
            raise KeyError(f"tensor {name!r} has no Hugging Face counterpart") from None
        if hf not in self.ckpt:
            raise ModelError(f"{self.ckpt.directory}: tensor {hf} (for {name}) is missing")
        return hf, start, self.ckpt.shapes[hf][0] if rows is None else rows

    def _is_rope(self, name: str) -> bool:
        return any(f".{t}." in name for t in ("attn_q", "attn_k", "attn_q_norm", "attn_k_norm"))

    def _norm_offset(self, name: str) -> bool:
        return architecture(self.spec.architecture).norm_offset and name.endswith("norm.weight")

    def has(self, name: str) -> bool:
        try:
            return self.ckpt.locate(name, self.spec)[0] in self.ckpt
        except KeyError:
            return False

    def close(self) -> None:
        """Unmap the checkpoint once the stage model is built (every weight is a copy)."""
        self.ckpt.close()

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Output rows [start, stop) of a 2-D weight (or elements of a 1-D tensor), float32; Q/K
        rows in the adjacent-pair RoPE layout (start, stop: whole heads); norm weights as the
        model multiplies by them."""
        hf, first, _ = self._hf(name)
        w = self.ckpt.read(hf, rows=(first + start, first + stop))
        if self._is_rope(name):
            w = permute_rope_rows(w, self.spec.head_dim, self.spec.rotary_dim)
        if self._norm_offset(name):
            w = w + np.float32(1.0)
        return torch.from_numpy(np.ascontiguousarray(w))

    def dense(self, name: str) -> torch.Tensor:
        """Whole tensor as float32 (norm weights, biases)."""
        return self.rows(name, 0, self._hf(name)[2])

    def cols(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Input columns [start, stop) of a 2-D weight, float32."""
        hf, first, n = self._hf(name)
        return torch.from_numpy(self.ckpt.read(hf, rows=(first, first + n), cols=(start, stop)))

    def quantized(self, name: str):
        """A whole 2-D weight, encoded as `quantization` says (shardline.kernels.formats.QuantizedWeight)."""
        return self.linear_weight(name)

    def linear_weight(self, name: str, rows: tuple[int, int] | None = None,
                      cols: tuple[int, int] | None = None):
        """A 2-D weight's output rows [r0, r1) or input columns [c0, c1) (a TP shard; all when
        None), read chunk by chunk and encoded (see the class doc). Returns a QuantizedWeight of
        shape (r1 - r0, c1 - c0)."""
        from shardline.kernels.formats import quantize

        embedding = name == "token_embd.weight" and cols is None  # kept: a tied lm_head asks for the same rows
        if embedding and self._embedding is not None and self._embedding[0] == rows:
            return self._embedding[1]
        hf, first, out_all = self._hf(name)
        in_all = self.ckpt.shapes[hf][1]
        r0, r1 = rows or (0, out_all)
        c0, c1 = cols or (0, in_all)
        method = self.quantization
        if name in ("token_embd.weight", "output.weight"):
            method = embedding_quantization(method)
        qtype = {"int8": "int8", "int4": "int4"}.get(method, "bf16" if self.dtype == "bfloat16" else "f32")
        step = max(1, LOAD_CHUNK_FLOATS // (c1 - c0))
        rope = self._is_rope(name)
        if rope:  # whole heads per chunk, so the permutation stays inside the chunk
            hd = self.spec.head_dim
            step = max(hd, step // hd * hd)
        data = scales = mins = None
        for a in range(r0, r1, step):
            b = min(r1, a + step)
            w = self.ckpt.read(hf, (first + a, first + b), (c0, c1))
            if rope:
                w = permute_rope_rows(w, self.spec.head_dim, self.spec.rotary_dim)
            q = quantize(w, qtype, group_size=self.group_size, symmetric=qtype != "int4")
            del w
            if data is None:  # one allocation per weight: chunks are copied in, never concatenated
                data = np.empty((r1 - r0, *q.data.shape[1:]), q.data.dtype)
                scales = None if q.scales is None else np.empty((r1 - r0, q.scales.shape[1]), np.float32)
                mins = None if q.mins is None else np.empty((r1 - r0, q.mins.shape[1]), np.float32)
            data[a - r0:b - r0] = q.data
            if scales is not None:
                scales[a - r0:b - r0] = q.scales
            if mins is not None:
                mins[a - r0:b - r0] = q.mins
        from shardline.kernels.formats import QuantizedWeight

        weight = QuantizedWeight(q.qtype, (r1 - r0, c1 - c0), data, scales, mins, q.group_size)
        if embedding:
            self._embedding = (rows, weight)
        return weight

    # TP slices --------------------------------------------------------------------------
    head_rows = GGUFShardLoader.head_rows
    ffn_range = GGUFShardLoader.ffn_range
    vocab_rows = GGUFShardLoader.vocab_rows


def open_shard_loader(path: str, spec: ModelSpec, shard: ShardSpec, quantization: str = "none",
                      group_size: int = 32, dtype: str = "float32"):
    """The loader for `path`: SafetensorsShardLoader for a checkpoint directory, GGUFShardLoader
    for a GGUF file.

    Raises:
        ValueError: quantization other than none for a GGUF file (its weights are already
            quantized; the config refuses this combination too).
    """
    if is_safetensors_checkpoint(path):
        return SafetensorsShardLoader(path, spec, shard, quantization, group_size, dtype)
    if quantization != "none":
        raise ValueError(f"quantization={quantization} applies to safetensors checkpoints; {path} is a GGUF file")
    return GGUFShardLoader(path, spec, shard)
