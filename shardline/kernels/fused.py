"""Fused decode layer for the CPU: one Numba call per Llama decoder layer for a step whose
sequences each bring one new token.

Why: a decode step of SmolLM2-135M does ~96 MB of weight reads (~7 ms at the GEMV kernels'
bandwidth) but ran ~25 torch ops and 4 kernel dispatches per layer from Python, ~300 us per
layer, ~9 ms per token over 30 layers: more than the arithmetic. Here the whole layer (RMSNorm,
fused QKV GEMV, RoPE, KV-cache write, paged attention, output projection, residual, RMSNorm,
gate/up GEMV, SwiGLU, down GEMV, residual) runs inside compiled code; Python calls it once.

The math is the one of shardline/worker/model.py's DecoderLayer (Touvron et al. 2023, LLaMA; Su et al.
2021, RoPE on adjacent pairs as GGUF stores Q/K rows; Ainslie et al. 2023, GQA; Kwon et al.
2023, paged KV) with the same GEMV kernels (shardline/kernels/cpu.py, row-interleaved q8_0/q4_0/q4_1, and
shardline/kernels/qdot.py's 8-bit integer kernels for Q5_0, Q5_1 and the K-quants)
and the same attention loop (shardline/kernels/attention.py); only the RMSNorm and RoPE arithmetic are
written out here (float32, as torch does them), so results agree with the unfused path to
float32 rounding. Tests: tests/kernels/test_fused.py against DecoderLayer.

`rope_cache_attention`, `_rms_norm`, `add_to` and `add_rms_norm` also serve the layers whose
GEMMs are torch's bf16 GEMMs (shardline/worker/model.py DecoderLayer.forward / forward_bf16): there the
activations they read or write may be bfloat16, passed as uint16 arrays of bit patterns
(shardline.kernels.attention.load_float32 widens them exactly, store_as rounds to nearest even).

Shapes (T = tokens of the step, one per sequence; H = hidden; D = head_dim; F = ffn width):
    x            float32 [T, H], updated in place (residual stream)
    norm weights float32 [H]
    linears      (fmt, qs, d, m) from shardline.kernels.cpu._packed (any of its formats, each
                 linear its own): qkv [Hq*D + 2*Hkv*D, H],
                 o [H, Hq*D], gate_up [2F, H], down [H, F]
    cos, sin     float32 [max_positions, D/2] rotary factors
    positions    int64 [T]; slots int64 [T] flat KV slot of each token
    k_cache, v_cache float32 [num_slots, Hkv, D], or int16 (float16 bit patterns, shardline/kernels/attention.py)
    block_tables int32 [T, max_blocks]; context_lens int32 [T] (position + 1)
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .attention import _paged_decode, load_float32, store_as
from .cpu import packed_linear


@njit(fastmath=True, cache=True)
def _rms_norm(x, w, eps, out):
    """out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * w (Zhang & Sennrich 2019), computed in float32;
    out float32, or uint16 for bfloat16 bit patterns (rounded to nearest even, as torch's
    `.bfloat16()` of the float32 result)."""
    n, h = x.shape
    for t in range(n):
        s = np.float32(0.0)
        for i in range(h):
            s += x[t, i] * x[t, i]
        r = np.float32(1.0) / np.sqrt(s / np.float32(h) + eps)
        for i in range(h):
            out[t, i] = store_as(x[t, i] * r * w[i], out[0, 0])


@njit(fastmath=True, cache=True)
def add_to(x, y):
    """x += y in place: x float32 [T, H]; y float32, or uint16 bfloat16 bit patterns (widened
    exactly), [T, H]. The residual add after a projection whose GEMM returned bfloat16."""
    n, h = x.shape
    for t in range(n):
        for i in range(h):
            x[t, i] += load_float32(y[t, i])


@njit(fastmath=True, cache=True)
def add_rms_norm(x, y, w, eps, out):
    """x += y in place (as `add_to`), then out = RMSNorm(x) * w (as `_rms_norm`, the same
    float32 arithmetic): the attention block's residual add and the MLP's input norm in one
    call."""
    add_to(x, y)
    _rms_norm(x, w, eps, out)


@njit(cache=True)
def _linear(fmt, qs, dd, mm, x, y, nchunk):
    """y = x @ W.T through the packed kernels (shardline.kernels.cpu.packed_linear): serial, or
    over `nchunk` prange chunks."""
    packed_linear(fmt, qs, dd, mm, x, y, nchunk)


@njit(fastmath=True, cache=True)
def rope_cache_attention(qkv, cos, sin, positions, slots, k_cache, v_cache, block_tables, context_lens,
                         block_size, num_heads, scale, per_sequence, out):
    """The middle of a decoder layer's attention for T single-token sequences, from the fused
    QKV projection qkv [T, Hq*D + 2*Hkv*D]: RoPE on Q and K, K and V written into the caches at
    `slots` (in the caches' dtype), paged attention of each query over its context, written to
    out [T, Hq*D], the input of the output projection. qkv and out: float32, or uint16 bfloat16
    bit patterns (the bf16 GEMMs' output and input: qkv widened exactly, out rounded to nearest
    even, as torch's `.float()` and `.bfloat16()` would); the arithmetic is float32 either way.
    `per_sequence`: the work split of shardline.kernels.attention._paged_decode (parallel when Numba has
    several threads)."""
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
                a = load_float32(src[2 * i])
                b = load_float32(src[2 * i + 1])
                dst[2 * i] = a * c[i] - b * s[i]
                dst[2 * i + 1] = a * s[i] + b * c[i]
        for kh in range(num_kv):  # K rotated likewise, then K and V stored in the cache's dtype
            src = qkv[t, q_size + kh * head_dim:q_size + (kh + 1) * head_dim]
            dst = k_cache[slot, kh]
            for i in range(half):
                a = load_float32(src[2 * i])
                b = load_float32(src[2 * i + 1])
                dst[2 * i] = store_as(a * c[i] - b * s[i], dst[0])
                dst[2 * i + 1] = store_as(a * s[i] + b * c[i], dst[0])
            src = qkv[t, q_size + kv_size + kh * head_dim:q_size + kv_size + (kh + 1) * head_dim]
            dst = v_cache[slot, kh]
            for i in range(head_dim):
                dst[i] = store_as(load_float32(src[i]), dst[0])
    attn = np.empty((n, num_heads, head_dim), np.float32)
    _paged_decode(q, k_cache, v_cache, block_tables, context_lens, block_size, scale, attn, per_sequence)
    flat = attn.reshape(n, q_size)
    for t in range(n):
        for i in range(q_size):
            out[t, i] = store_as(flat[t, i], out[0, 0])


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
    attn = np.empty((n, q_size), np.float32)
    rope_cache_attention(qkv, cos, sin, positions, slots, k_cache, v_cache, block_tables, context_lens,
                         block_size, num_heads, scale, True, attn)
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
