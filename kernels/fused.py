"""Fused decode layer for the CPU: one Numba call per Llama decoder layer for a step whose
sequences each bring one new token.

Why: a decode step of SmolLM2-135M does ~96 MB of weight reads (~7 ms at the GEMV kernels'
bandwidth) but ran ~25 torch ops and 4 kernel dispatches per layer from Python, ~300 us per
layer, ~9 ms per token over 30 layers: more than the arithmetic. Here the whole layer (RMSNorm,
fused QKV GEMV, RoPE, KV-cache write, paged attention, output projection, residual, RMSNorm,
gate/up GEMV, SwiGLU, down GEMV, residual) runs inside compiled code; Python calls it once.

The math is the one of worker/model.py's DecoderLayer (Touvron et al. 2023, LLaMA; Su et al.
2021, RoPE on adjacent pairs as GGUF stores Q/K rows; Ainslie et al. 2023, GQA; Kwon et al.
2023, paged KV) with the same GEMV kernels (kernels/cpu.py, row-interleaved q8_0/q4_0/q4_1)
and the same attention loop (kernels/attention.py); only the RMSNorm and RoPE arithmetic are
written out here (float32, as torch does them), so results agree with the unfused path to
float32 rounding. Tests: tests/kernels/test_fused.py against DecoderLayer.

Shapes (T = tokens of the step, one per sequence; H = hidden; D = head_dim; F = ffn width):
    x            float32 [T, H], updated in place (residual stream)
    norm weights float32 [H]
    linears      (fmt, qs, d, m) from kernels.cpu._packed: qkv [Hq*D + 2*Hkv*D, H],
                 o [H, Hq*D], gate_up [2F, H], down [H, F]
    cos, sin     float32 [max_positions, D/2] rotary factors
    positions    int64 [T]; slots int64 [T] flat KV slot of each token
    k_cache, v_cache float32 [num_slots, Hkv, D], or int16 (float16 bit patterns, kernels/attention.py)
    block_tables int32 [T, max_blocks]; context_lens int32 [T] (position + 1)
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .attention import _paged_decode, store_as
from .cpu import _packed_parallel, _packed_serial


@njit(fastmath=True, cache=True)
def _rms_norm(x, w, eps, out):
    """out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * w (Zhang & Sennrich 2019)."""
    n, h = x.shape
    for t in range(n):
        s = np.float32(0.0)
        for i in range(h):
            s += x[t, i] * x[t, i]
        r = np.float32(1.0) / np.sqrt(s / np.float32(h) + eps)
        for i in range(h):
            out[t, i] = x[t, i] * r * w[i]


@njit(cache=True)
def _linear(fmt, qs, dd, mm, x, y, nchunk):
    """y = x @ W.T through the packed kernels: serial, or over `nchunk` prange chunks."""
    if nchunk > 1:
        _packed_parallel(fmt, qs, dd, mm, x, y, nchunk)
    else:
        _packed_serial(fmt, qs, dd, mm, x, y)


@njit(fastmath=True, cache=True)
def rope_cache_attention(qkv, cos, sin, positions, slots, k_cache, v_cache, block_tables, context_lens,
                         block_size, num_heads, scale, per_sequence):
    """The middle of a decoder layer's attention for T single-token sequences, from the fused
    QKV projection qkv float32 [T, Hq*D + 2*Hkv*D]: RoPE on Q and K, K and V written into the
    caches at `slots` (in the caches' dtype), paged attention of each query over its context.
    Returns float32 [T, Hq*D], the input of the output projection. `per_sequence`: the work
    split of kernels.attention._paged_decode (parallel when Numba has several threads)."""
    n = qkv.shape[0]
    num_kv, head_dim = k_cache.shape[1], k_cache.shape[2]
    half = head_dim // 2
    q_size, kv_size = num_heads * head_dim, num_kv * head_dim
    q = np.empty((n, num_heads, head_dim), np.float32)
    for t in range(n):
        c = cos[positions[t]]
        s = sin[positions[t]]
        slot = slots[t]
        for hh in range(num_heads):  # RoPE: (a + ib) * (c + is) on adjacent pairs
            src = qkv[t, hh * head_dim:(hh + 1) * head_dim]
            dst = q[t, hh]
            for i in range(half):
                a = src[2 * i]
                b = src[2 * i + 1]
                dst[2 * i] = a * c[i] - b * s[i]
                dst[2 * i + 1] = a * s[i] + b * c[i]
        for kh in range(num_kv):  # K rotated likewise, then K and V stored in the cache's dtype
            src = qkv[t, q_size + kh * head_dim:q_size + (kh + 1) * head_dim]
            dst = k_cache[slot, kh]
            for i in range(half):
                a = src[2 * i]
                b = src[2 * i + 1]
                dst[2 * i] = store_as(a * c[i] - b * s[i], dst[0])
                dst[2 * i + 1] = store_as(a * s[i] + b * c[i], dst[0])
            src = qkv[t, q_size + kv_size + kh * head_dim:q_size + kv_size + (kh + 1) * head_dim]
            dst = v_cache[slot, kh]
            for i in range(head_dim):
                dst[i] = store_as(src[i], dst[0])
    attn = np.empty((n, num_heads, head_dim), np.float32)
    _paged_decode(q, k_cache, v_cache, block_tables, context_lens, block_size, scale, attn, per_sequence)
    return attn.reshape(n, q_size)


@njit(fastmath=True, cache=True)
def decode_attention(x, norm_w, eps, qkv_f, qkv_q, qkv_d, qkv_m, o_f, o_q, o_d, o_m,
                     cos, sin, positions, slots, k_cache, v_cache, block_tables, context_lens,
                     block_size, num_heads, scale, nchunk):
    """The attention half of a decoder layer for T single-token sequences: returns the output
    projection float32 [T, H] (before any tensor-parallel all-reduce and the residual add);
    writes each token's K and V into the caches at `slots`."""
    n, hidden = x.shape
    num_kv, head_dim = k_cache.shape[1], k_cache.shape[2]
    q_size, kv_size = num_heads * head_dim, num_kv * head_dim
    h = np.empty_like(x)
    _rms_norm(x, norm_w, eps, h)
    qkv = np.empty((n, q_size + 2 * kv_size), np.float32)
    _linear(qkv_f, qkv_q, qkv_d, qkv_m, h, qkv, nchunk)
    attn = rope_cache_attention(qkv, cos, sin, positions, slots, k_cache, v_cache, block_tables, context_lens,
                                block_size, num_heads, scale, True)
    out = np.empty((n, hidden), np.float32)
    _linear(o_f, o_q, o_d, o_m, attn, out, nchunk)
    return out


@njit(fastmath=True, cache=True)
def decode_mlp(x, norm_w, eps, gu_f, gu_q, gu_d, gu_m, dn_f, dn_q, dn_d, dn_m, nchunk):
    """The SwiGLU half (Shazeer 2020): down(silu(gate(h)) * up(h)) with h = RMSNorm(x); returns
    float32 [T, H] before any all-reduce and the residual add."""
    n, hidden = x.shape
    h = np.empty_like(x)
    _rms_norm(x, norm_w, eps, h)
    ffn = dn_q.shape[1] * 32  # down's input width (packed blocks of 32)
    gu = np.empty((n, 2 * ffn), np.float32)
    _linear(gu_f, gu_q, gu_d, gu_m, h, gu, nchunk)
    act = np.empty((n, ffn), np.float32)
    for t in range(n):
        for i in range(ffn):
            g = gu[t, i]
            act[t, i] = g / (np.float32(1.0) + np.exp(-g)) * gu[t, ffn + i]
    out = np.empty((n, hidden), np.float32)
    _linear(dn_f, dn_q, dn_d, dn_m, act, out, nchunk)
    return out


@njit(fastmath=True, cache=True)
def decode_layer(x, attn_norm, ffn_norm, eps, qkv_f, qkv_q, qkv_d, qkv_m, o_f, o_q, o_d, o_m,
                 gu_f, gu_q, gu_d, gu_m, dn_f, dn_q, dn_d, dn_m, cos, sin, positions, slots,
                 k_cache, v_cache, block_tables, context_lens, block_size, num_heads, scale, nchunk):
    """A whole decoder layer without tensor parallelism: x += attention(x); x += mlp(x)."""
    x += decode_attention(x, attn_norm, eps, qkv_f, qkv_q, qkv_d, qkv_m, o_f, o_q, o_d, o_m, cos, sin,
                          positions, slots, k_cache, v_cache, block_tables, context_lens, block_size,
                          num_heads, scale, nchunk)
    x += decode_mlp(x, ffn_norm, eps, gu_f, gu_q, gu_d, gu_m, dn_f, dn_q, dn_d, dn_m, nchunk)
