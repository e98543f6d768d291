"""Paged decode attention: one new query token per sequence against its KV blocks.

The decode half of PagedAttention (Kwon et al. 2023, "Efficient Memory Management for Large
Language Model Serving with PagedAttention", and vLLM's `paged_attention_v1` kernel): each
sequence's keys and values live in fixed-size blocks of a shared pool, found through the
sequence's block table, so nothing is gathered or padded before the softmax.

    q:             float32 [num_seqs, num_heads, head_dim]
    k_cache:       float16 or float32 [num_slots, num_kv_heads, head_dim]  (num_slots = num_blocks *
    v_cache:       same dtype and shape as k_cache                          block_size; slot = block *
                                                                            block_size + offset)
    block_tables:  int32   [num_seqs, max_blocks_per_seq]  (entries past a sequence's length unused)
    context_lens:  int32   [num_seqs]  tokens each query attends to (positions 0 .. len-1)
    returns        float32 [num_seqs, num_heads, head_dim]

Grouped-query attention (Ainslie et al. 2023): query head j reads KV head j // (num_heads //
num_kv_heads), as `torch.nn.functional.scaled_dot_product_attention(enable_gqa=True)`.

CPU: a Numba kernel, parallel over sequences when there are at least two per thread (all heads
of a sequence together, its blocks read in address order: `decode_sequence`), else over
(sequence, KV head) (`decode_head_group`: each key row is read once per group of query heads);
both take the softmax in float32 (max subtracted; exp by a vectorizable polynomial, `exp_nonpositive`)
and accumulate the values in float32. The head_dim loops vectorize. A float16 cache
(`workers.kv_cache_dtype: float16`, as llama.cpp's default f16 KV cache) is read as IEEE binary16
bit patterns (int16 arrays: Numba has no float16 type) and widened to float32 on load (`load_float32`, F16C's vcvtph2ps): half the
bytes of float32, which is what a decode step's attention mostly waits for (a 32-sequence,
192-token step of 17 layers read its KV from DRAM at ~11 GB/s on one core).
Other devices: `paged_decode_attention_torch`, which gathers the slots and calls SDPA (also the
reference the tests check the kernel against).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
import numba
from llvmlite import ir
from numba import njit, prange
from numba.core import types
from numba.extending import intrinsic


@intrinsic
def load_float32(typingctx, x):
    """A cache element as float32: float32 as is; int16 as the bit pattern of an IEEE 754
    binary16 value, widened exactly (LLVM bitcast to half, fpext; vcvtph2ps with F16C)."""
    if x == types.float32:
        return types.float32(x), lambda context, builder, sig, args: args[0]
    if x == types.int16:
        return types.float32(x), lambda context, builder, sig, args: builder.fpext(
            builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    return None


@intrinsic
def store_as(typingctx, value, like):
    """float32 `value` converted to the element type of a cache whose elements look like `like`:
    float32 as is; int16: the binary16 bit pattern, rounded to nearest even (fptrunc)."""
    if value != types.float32:
        return None
    if like == types.float32:
        return types.float32(value, like), lambda context, builder, sig, args: args[0]
    if like == types.int16:
        return types.int16(value, like), lambda context, builder, sig, args: builder.bitcast(
            builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))
    return None


@intrinsic
def _float32_from_bits(typingctx, bits):
    """The float32 whose IEEE 754 bit pattern is the int32 `bits`."""
    if bits != types.int32:
        return None
    return types.float32(bits), lambda context, builder, sig, args: builder.bitcast(args[0], ir.FloatType())


@njit(fastmath=True, inline="always", cache=True)
def exp_nonpositive(x):
    """exp(x) in float32 for x <= 0 (below -87: 0 up to 1e-38), max relative error ~1.2e-7:
    x = n ln2 + r with |r| <= ln2/2, exp(r) by Cephes' expf polynomial (S. Moshier, Cephes Math
    Library, expf.c), times 2^n built from its exponent bits. Plain arithmetic, so LLVM vectorizes
    a loop of it (np.exp in a loop stays a scalar libm call without Intel's SVML: a softmax over
    32 x 9 x 192 scores took 0.19 ms, 1/8 of a layer's attention)."""
    x = max(x, np.float32(-87.0))
    n = np.floor(x * np.float32(1.44269504088896341) + np.float32(0.5))
    r = x - n * np.float32(0.693359375) + n * np.float32(2.12194440e-4)  # ln2 in two parts (Cody-Waite)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * r * r + r + np.float32(1.0)
    return p * _float32_from_bits(np.int32((np.int32(n) + 127) << 23))


@njit(fastmath=True, cache=True)
def _softmax_rows(scores):
    """Softmax of each row of scores float32 [rows, length], in place (max subtracted)."""
    rows, length = scores.shape
    for r in range(rows):
        m = scores[r, 0]
        for t in range(1, length):
            m = max(m, scores[r, t])
        total = np.float32(0.0)
        for t in range(length):
            p = exp_nonpositive(scores[r, t] - m)
            scores[r, t] = p
            total += p
        inv = np.float32(1.0) / total
        for t in range(length):
            scores[r, t] *= inv


@njit(fastmath=True, cache=True)
def decode_head_group(q, k_cache, v_cache, block_tables, context_lens, block_size, scale, b, h, out):
    """Sequence b's query heads of KV head h (GQA group) against its paged context; writes
    out[b, group heads]. Shapes as in the module doc; serial (called per (sequence, KV head))."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    group = num_heads // k_cache.shape[1]
    length = context_lens[b]
    h0 = h * group
    scores = np.empty((group, length), np.float32)
    for t in range(length):
        slot = block_tables[b, t // block_size] * block_size + t % block_size
        k = k_cache[slot, h]
        for g in range(group):
            qg = q[b, h0 + g]
            s = np.float32(0.0)
            for d in range(head_dim):
                s += qg[d] * load_float32(k[d])
            scores[g, t] = s * scale
    _softmax_rows(scores)
    acc = np.zeros((group, head_dim), np.float32)
    for t in range(length):
        slot = block_tables[b, t // block_size] * block_size + t % block_size
        v = v_cache[slot, h]
        for g in range(group):
            p = scores[g, t]
            a = acc[g]
            for d in range(head_dim):
                a[d] += p * load_float32(v[d])
    for g in range(group):
        out[b, h0 + g] = acc[g]


@njit(fastmath=True, cache=True)
def decode_sequence(q, k_cache, v_cache, block_tables, context_lens, block_size, scale, b, out):
    """All query heads of sequence b against its paged context; writes out[b]. Walks the context
    block by block and reads each slot's K (then V) row of all KV heads at once, so the pool is
    streamed in address order (per KV head, the rows are 2-3 cache lines apart: 1.7x faster on 32
    sequences x 192 tokens from DRAM than `decode_head_group` per head). Shapes as in the module
    doc; serial."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    group = num_heads // k_cache.shape[1]
    length = context_lens[b]
    num_blocks = (length + block_size - 1) // block_size
    qs = np.empty((num_heads, head_dim), np.float32)
    for hq in range(num_heads):
        for d in range(head_dim):
            qs[hq, d] = q[b, hq, d] * scale
    scores = np.empty((num_heads, length), np.float32)
    for j in range(num_blocks):
        base = block_tables[b, j] * block_size
        t0 = j * block_size
        for i in range(min(block_size, length - t0)):
            for hq in range(num_heads):
                kh = hq // group
                s = np.float32(0.0)
                for d in range(head_dim):
                    s += qs[hq, d] * load_float32(k_cache[base + i, kh, d])
                scores[hq, t0 + i] = s
    _softmax_rows(scores)
    acc = np.zeros((num_heads, head_dim), np.float32)
    for j in range(num_blocks):
        base = block_tables[b, j] * block_size
        t0 = j * block_size
        for i in range(min(block_size, length - t0)):
            for hq in range(num_heads):
                kh = hq // group
                p = scores[hq, t0 + i]
                for d in range(head_dim):
                    acc[hq, d] += p * load_float32(v_cache[base + i, kh, d])
    for hq in range(num_heads):
        for d in range(head_dim):
            out[b, hq, d] = acc[hq, d]


@njit(parallel=True, fastmath=True, cache=True)
def _paged_decode(q, k_cache, v_cache, block_tables, context_lens, block_size, scale, out, per_sequence):
    num_seqs, num_kv_heads = q.shape[0], k_cache.shape[1]
    if per_sequence:  # enough sequences for every thread: one per work item
        for b in prange(num_seqs):
            decode_sequence(q, k_cache, v_cache, block_tables, context_lens, block_size, scale, b, out)
    else:  # few sequences (one stream on several threads): split by KV head too
        for w in prange(num_seqs * num_kv_heads):
            decode_head_group(q, k_cache, v_cache, block_tables, context_lens, block_size, scale,
                              w // num_kv_heads, w % num_kv_heads, out)


class PagedDecodePlan:
    """The per-step half of `paged_decode_attention`: block tables and context lengths checked
    and converted once per step, then `run` once per layer (saves ~10 small tensor ops a layer).

    block_tables: int [num_seqs, max_blocks_per_seq]; context_lens: int [num_seqs] (tokens);
    block_size: tokens per block. Raises ValueError on inconsistent shapes or lengths.
    """

    def __init__(self, block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int):
        if block_tables.dim() != 2 or context_lens.shape != (block_tables.shape[0],):
            raise ValueError("block_tables must be [num_seqs, max_blocks] and context_lens [num_seqs]")
        if len(context_lens) and (int(context_lens.min()) < 1
                                  or int(context_lens.max()) > block_tables.shape[1] * block_size):
            raise ValueError("context_lens must be in [1, max_blocks_per_seq * block_size]")
        self.block_tables = block_tables.to(torch.int32).contiguous()
        self.context_lens = context_lens.to(torch.int32).contiguous()
        self.block_size = int(block_size)
        self._np = (self.block_tables.numpy(), self.context_lens.numpy())

    def run(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
            scale: float | None = None) -> torch.Tensor:
        """q float32 [num_seqs, num_heads, head_dim] against the caches [num_slots, num_kv_heads,
        head_dim] (float16 or float32, the same for both) -> float32 [num_seqs, num_heads, head_dim].
        scale defaults to 1/sqrt(head_dim). On the CPU a float32 q uses the Numba kernel, anything
        else the torch reference."""
        if q.dim() != 3 or k_cache.dim() != 3 or v_cache.shape != k_cache.shape:
            raise ValueError(f"q must be [seqs, heads, dim] and caches [slots, kv_heads, dim]; got "
                             f"{list(q.shape)}, {list(k_cache.shape)}, {list(v_cache.shape)}")
        if q.shape[2] != k_cache.shape[2] or q.shape[1] % k_cache.shape[1]:
            raise ValueError(f"{q.shape[1]} query heads of dim {q.shape[2]} do not group over "
                             f"{k_cache.shape[1]} KV heads of dim {k_cache.shape[2]}")
        if q.shape[0] != self.block_tables.shape[0]:
            raise ValueError(f"{q.shape[0]} queries for {self.block_tables.shape[0]} block tables")
        scale = 1.0 / math.sqrt(q.shape[2]) if scale is None else scale
        if k_cache.dtype != v_cache.dtype:
            raise ValueError(f"k_cache is {k_cache.dtype} but v_cache {v_cache.dtype}")
        if q.is_cuda or q.dtype != torch.float32 or k_cache.dtype not in (torch.float32, torch.float16):
            return paged_decode_attention_torch(q, k_cache, v_cache, self.block_tables, self.context_lens,
                                                self.block_size, scale)
        out = torch.empty(q.shape, dtype=torch.float32)
        tables, lens = self._np
        per_sequence = q.shape[0] >= 2 * numba.get_num_threads()
        _paged_decode(q.contiguous().numpy(), cache_array(k_cache), cache_array(v_cache), tables, lens,
                      self.block_size, np.float32(scale), out.numpy(), per_sequence)
        return out


def cache_array(cache: torch.Tensor) -> np.ndarray:
    """A CPU KV cache tensor as the array the Numba kernels take: float32 as is, float16 as its
    int16 bit patterns (a view, no copy; see `load_float32`). Raises ValueError on other dtypes."""
    if cache.dtype == torch.float16:
        return cache.view(torch.int16).numpy()
    if cache.dtype == torch.float32:
        return cache.numpy()
    raise ValueError(f"KV cache dtype {cache.dtype}: expected float16 or float32")


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor,
                           block_size: int, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v per sequence over its paged context (shapes in the module doc).

    scale defaults to 1/sqrt(head_dim). A CPU float32 q (caches float16 or float32) uses the Numba
    kernel; anything else the torch reference. Raises ValueError on inconsistent shapes or context lengths.
    """
    return PagedDecodePlan(block_tables, context_lens, block_size).run(q, k_cache, v_cache, scale)


def paged_decode_attention_torch(q, k_cache, v_cache, block_tables, context_lens, block_size: int,
                                 scale: float | None = None) -> torch.Tensor:
    """The same result by gathering each sequence's slots (padded to the longest) and calling
    torch's scaled_dot_product_attention with a padding mask, in q's dtype (the cache's elements
    are converted to it). Any device."""
    scale = 1.0 / math.sqrt(q.shape[2]) if scale is None else scale
    max_len = int(context_lens.max())
    pos = torch.arange(max_len, device=q.device)
    tables = block_tables.to(device=q.device, dtype=torch.int64)
    slots = tables[:, pos // block_size] * block_size + pos % block_size  # [B, L]
    mask = pos.unsqueeze(0) < context_lens.to(q.device).unsqueeze(1)  # [B, L]
    slots = torch.where(mask, slots, torch.zeros_like(slots))
    kk = k_cache[slots].transpose(1, 2).to(q.dtype)  # [B, Hkv, L, D]
    vv = v_cache[slots].transpose(1, 2).to(q.dtype)
    o = F.scaled_dot_product_attention(q.unsqueeze(2), kk, vv, attn_mask=mask[:, None, None, :],
                                       scale=scale, enable_gqa=True)
    return o.squeeze(2)
