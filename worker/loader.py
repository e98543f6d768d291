"""Load one stage's shard of a Llama-family GGUF file: only its layers, only its TP slice.

GGUF tensor names (llama.cpp): token_embd, blk.{i}.attn_norm / attn_q / attn_k / attn_v /
attn_output / ffn_norm / ffn_gate / ffn_up / ffn_down, output_norm, output (absent when tied).
A 2-D weight with GGUF shape [in, out] is a NumPy array [out, in] of quant blocks along `in`.

llama.cpp's converter permutes the rows of Q and K inside each head so that RoPE rotates
adjacent pairs (x[2i], x[2i+1]) instead of HF's halves; the model here rotates adjacent pairs,
so the rows are used as stored. The permutation stays inside a head, so slicing by head for
tensor parallelism is still exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from shardline.model_file import ModelSpec


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

    def has(self, name: str) -> bool:
        return name in self.tensors

    def raw(self, name: str):
        if name not in self.tensors:
            raise KeyError(f"tensor {name!r} not in the model file")
        return self.tensors[name]

    def quantized(self, name: str):
        """A 2-D weight kept packed as stored (kernels.formats.QuantizedWeight, a memmap view)."""
        from kernels.formats import QuantizedWeight

        return QuantizedWeight.from_gguf(self.raw(name))

    def dense(self, name: str) -> torch.Tensor:
        """Whole tensor as float32 (norm weights, biases, embeddings)."""
        return torch.from_numpy(np.require(_dequantize(self.raw(name)), requirements=["C", "W"]))

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
