"""Attention kernels: paged decode attention (one new query token per sequence against its KV
blocks), and causal attention for a prefill chunk (`causal_attention`, at the end).

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
of a sequence together), else over (sequence, KV head). With head_dim and block_size multiples
of 16 it is `decode_heads_simd`, written with explicit 16-lane vectors (shardline/kernels/simd.py): each
sequence's K blocks are first streamed once in address order (`_stream_blocks`), QK takes 16 keys
per fold tree, three query heads of a GQA group per K load (`_dot8x3`; `_dot16` for one head), PV
accumulates four heads of a GQA group in registers over a block
(`_pv4_block`); while it computes, the next sequence's K (during QK) and V (during PV) blocks are
prefetched into L2 (`_prefetch_block`), so that sequence's stream reads from L2, not DRAM. Other
shapes use the scalar `decode_sequence` / `decode_head_group`. All take the softmax in float32
(max subtracted; exp by a vectorizable polynomial, `exp_nonpositive`) and accumulate the values
in float32. A float16 cache (the default `workers.kv_cache_dtype`, as llama.cpp's default f16 KV
cache) is read as IEEE binary16 bit patterns (int16 arrays: Numba has no float16 type) and
widened to float32 on load (`load_float32`, F16C's vcvtph2ps): half the bytes of float32, which
is what a decode step's attention mostly waits for (a 32-sequence,
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

from .simd import LANES, fold1, fold2, fold4, fold8, prefetch, vfma, vload, vsplat, vstore, vzero


@intrinsic
def load_float32(typingctx, x):
    """An element as float32: float32 as is; int16 as the bit pattern of an IEEE 754 binary16
    value, widened exactly (LLVM bitcast to half, fpext; vcvtph2ps with F16C); uint16 as the bit
    pattern of a bfloat16 value (the upper half of a float32), widened exactly (zext, shift)."""
    if x == types.float32:
        return types.float32(x), lambda context, builder, sig, args: args[0]
    if x == types.int16:
        return types.float32(x), lambda context, builder, sig, args: builder.fpext(
            builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    if x == types.uint16:
        i32 = ir.IntType(32)
        return types.float32(x), lambda context, builder, sig, args: builder.bitcast(
            builder.shl(builder.zext(args[0], i32), ir.Constant(i32, 16)), ir.FloatType())
    return None


def _bfloat16_bits(builder, value):
    """LLVM IR: float32 `value` -> the uint16 bit pattern of the nearest bfloat16, ties to even,
    as torch's float -> bfloat16 conversion (c10/util/BFloat16.h round_to_nearest_even: add
    0x7FFF plus the lowest kept bit, keep the upper half; NaN -> 0x7FC0; overflow -> inf)."""
    i32 = ir.IntType(32)
    bits = builder.bitcast(value, i32)
    lsb = builder.and_(builder.lshr(bits, ir.Constant(i32, 16)), ir.Constant(i32, 1))
    rounded = builder.lshr(builder.add(bits, builder.add(lsb, ir.Constant(i32, 0x7FFF))), ir.Constant(i32, 16))
    is_nan = builder.fcmp_unordered("uno", value, value)
    return builder.trunc(builder.select(is_nan, ir.Constant(i32, 0x7FC0), rounded), ir.IntType(16))


@intrinsic
def store_as(typingctx, value, like):
    """float32 `value` converted to the element type of an array whose elements look like
    `like`: float32 as is; int16: the binary16 bit pattern, rounded to nearest even (fptrunc);
    uint16: the bfloat16 bit pattern, rounded to nearest even (`_bfloat16_bits`)."""
    if value != types.float32:
        return None
    if like == types.float32:
        return types.float32(value, like), lambda context, builder, sig, args: args[0]
    if like == types.int16:
        return types.int16(value, like), lambda context, builder, sig, args: builder.bitcast(
            builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))
    if like == types.uint16:
        return types.uint16(value, like), lambda context, builder, sig, args: _bfloat16_bits(builder, args[0])
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


@njit(fastmath=True, inline="always", cache=True)
def _softmax_row(row, length):
    """Softmax of row[:length] in place (max subtracted); row a contiguous 1-D float32 array,
    so the loops vectorize."""
    m = row[0]
    for t in range(1, length):
        m = max(m, row[t])
    total = np.float32(0.0)
    for t in range(length):
        p = exp_nonpositive(row[t] - m)
        row[t] = p
        total += p
    inv = np.float32(1.0) / total
    for t in range(length):
        row[t] *= inv


@njit(fastmath=True, cache=True)
def _softmax_prefix(scores, h_lo, h_hi, length):
    """Softmax of scores[h, :length] for rows h_lo .. h_hi - 1, in place."""
    for h in range(h_lo, h_hi):
        _softmax_row(scores[h], length)


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
    _softmax_prefix(scores, 0, scores.shape[0], scores.shape[1])
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
    _softmax_prefix(scores, 0, scores.shape[0], scores.shape[1])
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


@njit(fastmath=True, inline="always", cache=True)
def _dot16(qs, hq, k_cache, slot, kh):
    """16 dot products as one float32x16: query row qs[hq] (float32 [num_heads, head_dim], C
    order, head_dim a multiple of 16) with the K rows of KV head kh in slots slot .. slot + 15.
    Each row is multiplied 16 lanes at a time into its own partial-sum vector; one fold tree then
    sums all sixteen (15 shuffle-adds instead of 16 horizontal sums)."""
    num_kv, head_dim = k_cache.shape[1], k_cache.shape[2]
    row = num_kv * head_dim
    p0 = p1 = p2 = p3 = p4 = p5 = p6 = p7 = vzero()
    p8 = p9 = p10 = p11 = p12 = p13 = p14 = p15 = vzero()
    for c in range(0, head_dim, LANES):
        qv = vload(qs, hq * head_dim + c)
        o = slot * row + kh * head_dim + c
        p0 = vfma(qv, vload(k_cache, o), p0)
        p1 = vfma(qv, vload(k_cache, o + row), p1)
        p2 = vfma(qv, vload(k_cache, o + 2 * row), p2)
        p3 = vfma(qv, vload(k_cache, o + 3 * row), p3)
        p4 = vfma(qv, vload(k_cache, o + 4 * row), p4)
        p5 = vfma(qv, vload(k_cache, o + 5 * row), p5)
        p6 = vfma(qv, vload(k_cache, o + 6 * row), p6)
        p7 = vfma(qv, vload(k_cache, o + 7 * row), p7)
        p8 = vfma(qv, vload(k_cache, o + 8 * row), p8)
        p9 = vfma(qv, vload(k_cache, o + 9 * row), p9)
        p10 = vfma(qv, vload(k_cache, o + 10 * row), p10)
        p11 = vfma(qv, vload(k_cache, o + 11 * row), p11)
        p12 = vfma(qv, vload(k_cache, o + 12 * row), p12)
        p13 = vfma(qv, vload(k_cache, o + 13 * row), p13)
        p14 = vfma(qv, vload(k_cache, o + 14 * row), p14)
        p15 = vfma(qv, vload(k_cache, o + 15 * row), p15)
    lo = fold2(fold4(fold8(p0, p1), fold8(p2, p3)), fold4(fold8(p4, p5), fold8(p6, p7)))
    hi = fold2(fold4(fold8(p8, p9), fold8(p10, p11)), fold4(fold8(p12, p13), fold8(p14, p15)))
    return fold1(lo, hi)


@njit(fastmath=True, inline="always", cache=True)
def _dot8x3(qs, ha, hb, hc, k_cache, slot, kh):
    """The dot products of three query rows qs[ha], qs[hb], qs[hc] (float32 [num_heads,
    head_dim], C order) with the K rows of KV head kh in slots slot .. slot + 7: three float32x16,
    each eight 2-lane segments of partial sums (key order), for `fold1`. Each K vector is loaded
    (and widened from float16) once for the three heads of a GQA group: 24 accumulators, three
    query vectors and the K vector fit AVX-512's 32 registers."""
    num_kv, head_dim = k_cache.shape[1], k_cache.shape[2]
    row = num_kv * head_dim
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = vzero()
    b0 = b1 = b2 = b3 = b4 = b5 = b6 = b7 = vzero()
    c0 = c1 = c2 = c3 = c4 = c5 = c6 = c7 = vzero()
    for c in range(0, head_dim, LANES):
        qa = vload(qs, ha * head_dim + c)
        qb = vload(qs, hb * head_dim + c)
        qc = vload(qs, hc * head_dim + c)
        o = slot * row + kh * head_dim + c
        k = vload(k_cache, o)
        a0, b0, c0 = vfma(qa, k, a0), vfma(qb, k, b0), vfma(qc, k, c0)
        k = vload(k_cache, o + row)
        a1, b1, c1 = vfma(qa, k, a1), vfma(qb, k, b1), vfma(qc, k, c1)
        k = vload(k_cache, o + 2 * row)
        a2, b2, c2 = vfma(qa, k, a2), vfma(qb, k, b2), vfma(qc, k, c2)
        k = vload(k_cache, o + 3 * row)
        a3, b3, c3 = vfma(qa, k, a3), vfma(qb, k, b3), vfma(qc, k, c3)
        k = vload(k_cache, o + 4 * row)
        a4, b4, c4 = vfma(qa, k, a4), vfma(qb, k, b4), vfma(qc, k, c4)
        k = vload(k_cache, o + 5 * row)
        a5, b5, c5 = vfma(qa, k, a5), vfma(qb, k, b5), vfma(qc, k, c5)
        k = vload(k_cache, o + 6 * row)
        a6, b6, c6 = vfma(qa, k, a6), vfma(qb, k, b6), vfma(qc, k, c6)
        k = vload(k_cache, o + 7 * row)
        a7, b7, c7 = vfma(qa, k, a7), vfma(qb, k, b7), vfma(qc, k, c7)
    ra = fold2(fold4(fold8(a0, a1), fold8(a2, a3)), fold4(fold8(a4, a5), fold8(a6, a7)))
    rb = fold2(fold4(fold8(b0, b1), fold8(b2, b3)), fold4(fold8(b4, b5), fold8(b6, b7)))
    rc = fold2(fold4(fold8(c0, c1), fold8(c2, c3)), fold4(fold8(c4, c5), fold8(c6, c7)))
    return ra, rb, rc


@njit(fastmath=True, inline="always", cache=True)
def _pv4_block(scores, v_cache, slot, t0, n, kh, g0, g_end, acc):
    """acc[g0:g_end] += scores[g0:g_end, t0:t0 + n] times V rows slot .. slot + n - 1 of KV head
    kh; g_end - g0 <= 4 heads accumulate together in registers over the block (a missing fourth
    repeats the last and is not stored)."""
    head_dim = v_cache.shape[2]
    row = v_cache.shape[1] * head_dim
    h1, h2, h3 = min(g0 + 1, g_end - 1), min(g0 + 2, g_end - 1), min(g0 + 3, g_end - 1)
    for c in range(0, head_dim, LANES):
        a0 = vload(acc, g0 * head_dim + c)
        a1 = vload(acc, h1 * head_dim + c)
        a2 = vload(acc, h2 * head_dim + c)
        a3 = vload(acc, h3 * head_dim + c)
        o = slot * row + kh * head_dim + c
        for t in range(t0, t0 + n):
            v = vload(v_cache, o)
            a0 = vfma(vsplat(scores[g0, t]), v, a0)
            a1 = vfma(vsplat(scores[h1, t]), v, a1)
            a2 = vfma(vsplat(scores[h2, t]), v, a2)
            a3 = vfma(vsplat(scores[h3, t]), v, a3)
            o += row
        vstore(acc, g0 * head_dim + c, a0)
        if h1 > g0:
            vstore(acc, h1 * head_dim + c, a1)
        if h2 > h1:
            vstore(acc, h2 * head_dim + c, a2)
        if h3 > h2:
            vstore(acc, h3 * head_dim + c, a3)


@njit(fastmath=True, inline="always", cache=True)
def _stream_blocks(cache, block_tables, b, num_blocks, block_size, sink):
    """Read sequence b's blocks of `cache` once, in address order, one load per 64-byte line,
    before the kernel computes on them (the values feed a dummy sum stored to `sink`, so the
    loads are kept). A plain sequential stream keeps many misses in flight and the block lands
    in L1/L2; the dot-product loops then read it from there. Without it the same loops, which
    walk a block 16 rows at a time per head, left most of the DRAM latency exposed: 17 layers x
    32 sequences x 193 tokens from a pool larger than the caches took 14.1 ms with a float16
    cache and 21.5 ms with float32, and 10.0 / 13.9 ms with it (the scalar kernel: 12.8 / 16.9)."""
    row = cache.shape[1] * cache.shape[2]
    line = 64 // cache.itemsize
    a0 = a1 = a2 = a3 = vzero()  # four independent chains: one load a cycle, not one per FMA latency
    for j in range(num_blocks):
        o = block_tables[b, j] * block_size * row
        for e in range(0, block_size * row, 4 * line):
            a0 = vfma(a0, a0, vload(cache, o + e))
            a1 = vfma(a1, a1, vload(cache, o + e + line))
            a2 = vfma(a2, a2, vload(cache, o + e + 2 * line))
            a3 = vfma(a3, a3, vload(cache, o + e + 3 * line))
    vstore(sink, 0, vfma(a0, a1, vfma(a2, a3, a0)))


@njit(fastmath=True, inline="always", cache=True)
def _prefetch_block(cache, block_tables, b, j, block_size):
    """Prefetch block j of sequence b (every 64-byte line) into L2."""
    row = cache.shape[1] * cache.shape[2]
    o = block_tables[b, j] * block_size * row
    for e in range(0, block_size * row, 64 // cache.itemsize):
        prefetch(cache, o + e)


@njit(fastmath=True, cache=True)
def decode_heads_simd(q, k_cache, v_cache, block_tables, context_lens, block_size, scale, b, h_lo, h_hi, out,
                      b_next=-1):
    """Query heads h_lo .. h_hi - 1 of sequence b against its paged context, with explicit
    16-lane vectors (shardline/kernels/simd.py); writes out[b, h_lo:h_hi]. Needs head_dim and block_size
    multiples of 16 (the K rows of a block are read 16 at a time; rows past the context are
    read but their scores never used). Caches and out C-contiguous. Serial.

    K is first streamed into the caches (`_stream_blocks`); QK: per 16 keys of a block, the
    scores of three query heads of a group at a time from two `_dot8x3` (each K vector loaded and
    widened once for the three), of a group's last one or two heads from `_dot16`. 32 sequences x
    192 tokens x 17 layers of SmolLM2 (9 query heads, 3 KV heads), one core, KV in cache / from
    DRAM: 10.3 / 12.4 ms with `_dot16` for every head and a single-chain stream, 8.1 / 11.2 ms. Softmax per head row. V streamed likewise; PV: per block, four query
    heads of a KV group at a time accumulate each 16-lane slice of head_dim in registers over
    the block's rows (each V slice loaded once for the four), kept between blocks in `acc`.
    b_next: the sequence this thread computes next (its blocks are prefetched block by block
    alongside this one's), or -1."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    group = num_heads // k_cache.shape[1]
    length = context_lens[b]
    num_blocks = (length + block_size - 1) // block_size
    stride = num_blocks * block_size
    qs = np.empty((num_heads, head_dim), np.float32)
    for hq in range(h_lo, h_hi):
        for d in range(head_dim):
            qs[hq, d] = q[b, hq, d] * scale
    scores = np.empty((num_heads, stride), np.float32)
    kv_lo, kv_hi = h_lo // group, (h_hi - 1) // group + 1
    sink = np.empty(LANES, np.float32)
    _stream_blocks(k_cache, block_tables, b, num_blocks, block_size, sink)
    nb_next = 0 if b_next < 0 else (context_lens[b_next] + block_size - 1) // block_size
    for j in range(num_blocks):
        if j < nb_next:
            _prefetch_block(k_cache, block_tables, b_next, j, block_size)
        base = block_tables[b, j] * block_size
        t0 = j * block_size
        for sub in range(0, min(block_size, length - t0), LANES):
            for kh in range(kv_lo, kv_hi):
                g_lo, g_hi = max(h_lo, kh * group), min(h_hi, (kh + 1) * group)
                hq = g_lo
                while hq + 3 <= g_hi:  # three heads of the group per pass over the K rows
                    a_lo, b_lo, c_lo = _dot8x3(qs, hq, hq + 1, hq + 2, k_cache, base + sub, kh)
                    a_hi, b_hi, c_hi = _dot8x3(qs, hq, hq + 1, hq + 2, k_cache, base + sub + 8, kh)
                    vstore(scores, hq * stride + t0 + sub, fold1(a_lo, a_hi))
                    vstore(scores, (hq + 1) * stride + t0 + sub, fold1(b_lo, b_hi))
                    vstore(scores, (hq + 2) * stride + t0 + sub, fold1(c_lo, c_hi))
                    hq += 3
                for h in range(hq, g_hi):
                    vstore(scores, h * stride + t0 + sub, _dot16(qs, h, k_cache, base + sub, kh))
    _softmax_prefix(scores, h_lo, h_hi, length)
    acc = np.zeros((num_heads, head_dim), np.float32)
    _stream_blocks(v_cache, block_tables, b, num_blocks, block_size, sink)
    for j in range(num_blocks):
        if j < nb_next:
            _prefetch_block(v_cache, block_tables, b_next, j, block_size)
        base = block_tables[b, j] * block_size
        t0 = j * block_size
        n = min(block_size, length - t0)
        for kh in range(kv_lo, kv_hi):
            for g0 in range(max(h_lo, kh * group), min(h_hi, (kh + 1) * group), 4):  # four heads of a group
                _pv4_block(scores, v_cache, base, t0, n, kh, g0, min(h_hi, (kh + 1) * group, g0 + 4), acc)
    for hq in range(h_lo, h_hi):
        for d in range(head_dim):
            out[b, hq, d] = acc[hq, d]


@njit(parallel=True, fastmath=True, cache=True)
def _paged_decode(q, k_cache, v_cache, block_tables, context_lens, block_size, scale, out, per_sequence):
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    group = num_heads // num_kv_heads
    if block_size % LANES == 0 and head_dim % LANES == 0:  # the vector kernel (SmolLM2: 16, 64)
        if per_sequence:
            for b in prange(num_seqs):
                decode_heads_simd(q, k_cache, v_cache, block_tables, context_lens, block_size, scale,
                                  b, 0, num_heads, out, b + 1 if b + 1 < num_seqs else -1)
        else:
            for w in prange(num_seqs * num_kv_heads):
                h = w % num_kv_heads
                decode_heads_simd(q, k_cache, v_cache, block_tables, context_lens, block_size, scale,
                                  w // num_kv_heads, h * group, (h + 1) * group, out)
    elif per_sequence:  # enough sequences for every thread: one per work item
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


# ---- prefill: a chunk of new tokens against its context ------------------------------------
@njit(fastmath=True, inline="always", cache=True)
def _vstore4(arr, o, row, a0, a1, a2, a3):
    """Store four register rows at flat offsets o, o + row, o + 2 row, o + 3 row of arr."""
    vstore(arr, o, a0)
    vstore(arr, o + row, a1)
    vstore(arr, o + 2 * row, a2)
    vstore(arr, o + 3 * row, a3)


@njit(fastmath=True, cache=True)
def _causal_head(q, k, v, scale, hq, out, kt, vh, scores, qs):
    """Query head hq of one sequence's chunk: rows i of q (positions L - n + i) against keys
    0 .. L - n + i; writes out[:, hq]. kt [head_dim, Lp] / vh [Lp, head_dim]: scratch for the
    transposed K and the V of hq's KV head; scores [4, Lp], qs [4, head_dim] scratch."""
    n, num_heads, head_dim = q.shape
    L = k.shape[0]
    kh = hq // (num_heads // k.shape[1])
    lp = kt.shape[1]
    off = L - n
    for t in range(L):
        for d in range(head_dim):
            kt[d, t] = k[t, kh, d]
            vh[t, d] = v[t, kh, d]
    for t in range(L, lp):  # the last 16-key block reads zeros past L (their scores are masked)
        for d in range(head_dim):
            kt[d, t] = 0.0
            vh[t, d] = 0.0
    for i0 in range(0, n, 4):
        for r in range(4):
            ri = min(i0 + r, n - 1)  # a block past the last row repeats it (not stored)
            for d in range(head_dim):
                qs[r, d] = q[ri, hq, d] * scale
        kmax = off + min(i0 + 3, n - 1) + 1  # keys the block's last row sees
        for t0 in range(0, kmax, LANES):  # QK: four rows x 16 keys in registers
            a0 = a1 = a2 = a3 = vzero()
            for d in range(head_dim):
                kv = vload(kt, d * lp + t0)
                a0 = vfma(vsplat(qs[0, d]), kv, a0)
                a1 = vfma(vsplat(qs[1, d]), kv, a1)
                a2 = vfma(vsplat(qs[2, d]), kv, a2)
                a3 = vfma(vsplat(qs[3, d]), kv, a3)
            _vstore4(scores, t0, lp, a0, a1, a2, a3)
        for r in range(4):  # causal softmax of each row; probabilities past its last key are 0
            row = scores[r]
            length = min(off + i0 + r + 1, kmax)
            _softmax_row(row, length)
            for t in range(length, kmax):
                row[t] = 0.0
        for c in range(0, head_dim, LANES):  # PV: four rows x 16 columns in registers
            a0 = a1 = a2 = a3 = vzero()
            for t in range(kmax):
                vv = vload(vh, t * head_dim + c)
                a0 = vfma(vsplat(scores[0, t]), vv, a0)
                a1 = vfma(vsplat(scores[1, t]), vv, a1)
                a2 = vfma(vsplat(scores[2, t]), vv, a2)
                a3 = vfma(vsplat(scores[3, t]), vv, a3)
            _vstore4(qs, c, head_dim, a0, a1, a2, a3)  # qs is free again: rows' outputs, copied out below
        for r in range(min(4, n - i0)):
            for d in range(head_dim):
                out[i0 + r, hq, d] = qs[r, d]


@njit(parallel=True, fastmath=True, cache=True)
def _causal_attention(q, k, v, scale, out):
    n, num_heads, head_dim = q.shape
    lp = (k.shape[0] + LANES - 1) // LANES * LANES
    for hq in prange(num_heads):
        kt = np.empty((head_dim, lp), np.float32)
        vh = np.empty((lp, head_dim), np.float32)
        scores = np.empty((4, lp), np.float32)
        qs = np.empty((4, head_dim), np.float32)
        _causal_head(q, k, v, scale, hq, out, kt, vh, scores, qs)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale + causal mask) v for one sequence's chunk of new tokens.

    q: float32 [n, num_heads, head_dim], the chunk's queries at positions L - n .. L - 1;
    k, v: float32 [L, num_kv_heads, head_dim], the whole context (earlier tokens, then the chunk's);
    row i attends to keys 0 .. L - n + i (grouped-query: query head j reads KV head
    j // (num_heads // num_kv_heads)). Returns float32 [n, num_heads, head_dim]. scale defaults to
    1/sqrt(head_dim). Raises ValueError on inconsistent shapes.

    CPU with head_dim a multiple of 16: a Numba kernel in explicit 16-lane vectors, parallel
    over query heads. Per head, K is transposed once ([head_dim, L]), then four query rows at a
    time take 16 scores per register pass (each K vector loaded once for the four), the causal
    softmax per row in float32 (max subtracted, `exp_nonpositive`), and PV accumulates four rows
    x 16 columns in registers. Keys past a row's causal bound are never weighted; a row block
    skips the key blocks no row of it sees. Four 128-token prompts of SmolLM2 (9 query heads,
    3 KV heads, head_dim 64), one core: 1.49 ms a layer against 2.51 ms for torch's flash
    scaled_dot_product_attention with the KV heads repeated per group; a 17-layer 512-token
    prefill step's attention (cache write included) 62 -> 42 ms. Otherwise (CUDA, other dtypes
    or head sizes) `causal_attention_torch`, which the tests also check.
    """
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"q must be [n, heads, dim] and k, v [L, kv_heads, dim]; got "
                         f"{list(q.shape)}, {list(k.shape)}, {list(v.shape)}")
    n, num_heads, head_dim = q.shape
    L = k.shape[0]
    if k.shape[2] != head_dim or num_heads % k.shape[1] or n > L:
        raise ValueError(f"{n} queries x {num_heads} heads of dim {head_dim} against {L} keys x "
                         f"{k.shape[1]} heads of dim {k.shape[2]}")
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    if (q.is_cuda or head_dim % LANES or q.dtype != torch.float32 or k.dtype != torch.float32
            or v.dtype != torch.float32):
        return causal_attention_torch(q, k, v, scale)
    out = torch.empty(q.shape, dtype=torch.float32)
    if n:
        _causal_attention(q.contiguous().numpy(), k.contiguous().numpy(), v.contiguous().numpy(),
                          np.float32(scale), out.numpy())
    return out


def causal_attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           scale: float | None = None) -> torch.Tensor:
    """`causal_attention` by torch's scaled_dot_product_attention (any device, q's dtype)."""
    n, num_heads, _ = q.shape
    L = k.shape[0]
    group = num_heads // k.shape[1]
    kk = k.transpose(0, 1).repeat_interleave(group, 0)[None].to(q.dtype)  # [1, H, L, D]
    vv = v.transpose(0, 1).repeat_interleave(group, 0)[None].to(q.dtype)
    mask = None if n == L else torch.ones(n, L, dtype=torch.bool, device=q.device).tril(diagonal=L - n)
    o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], kk, vv, attn_mask=mask,
                                       is_causal=mask is None, scale=scale)
    return o[0].transpose(0, 1)
