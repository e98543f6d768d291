"""Paged KV cache of one worker: its layers, its KV heads.

    k_cache[layer]: [num_blocks, block_size, num_kv_heads_local, head_dim]   (v_cache alike)

    block b:  slot b*block_size + 0 | b*block_size + 1 | ... | b*block_size + block_size-1
              each slot holds one token's K (or V) for all local KV heads: [num_kv_heads_local, head_dim]

The coordinator's block manager owns the block ids; the worker only writes K/V at the slots a
step's slot mapping names and reads the slots of each sequence's block table.

dtype float16 (the default, `workers.kv_cache_dtype`; llama.cpp's default f16 cache) holds twice
the tokens of float32 in the same memory and halves the bytes a decode step's attention reads;
K and V are rounded to it when written and computed with in float32.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float16, device: str = "cpu"):
        if dtype not in (torch.float16, torch.float32):
            raise ValueError(f"KV cache dtype {dtype}: expected torch.float16 or torch.float32")
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        # the per-layer flat views, made once (a step asks for every layer's, and a view is not free)
        self._layers = [(self.k[i].flatten(0, 1), self.v[i].flatten(0, 1)) for i in range(num_layers)]

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat views of layer i: [num_blocks * block_size, num_kv_heads, head_dim] for K and V
        (views of `k` and `v`: writes through them land in the pool)."""
        return self._layers[i]

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype_bytes: int = 2) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * dtype_bytes
