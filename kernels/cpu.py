"""Numba CPU kernels: quantized GEMV / small-batch GEMM straight from packed weights, and a
parallel dequantizer feeding torch's GEMM for many tokens.

Formats as in formats.py (ggml-quants.c `dequantize_row_*`). All kernels compute
y[t, r] = sum_i x[t, i] * W[r, i] in float32.

How the inner loops vectorize (the hard part; measured on Zen 4, Numba 0.68 / LLVM):
  * the per-block loops run to a *runtime* half-block length `h` (always 16). With a constant 16
    LLVM unrolls the loop fully and then vectorizes the outer block loop with gathers, 3-4x
    slower. With `range(h)` the innermost loop becomes a clean 16-lane vector loop.
  * indices go through slices (`qs = row[o:o + h]`, then `qs[j]`): with a computed `row[o + j]`
    Numba's negative-index wraparound blocks vectorization.
  * nibbles are widened via int32 (`np.int32(q) & 15`) so the converts stay 32-bit.
  * fp16 scales are read as uint16 (blocks are 18/20/34 bytes, all even) and decoded through a
    65536-entry float32 table (Numba has no CPU float16); reading them as two bytes made LLVM
    gather bytes with vpinsrb across blocks, costing ~40%.
The GEMV (n_tokens == 1) fuses unpacking and the dot per block; the small GEMM dequantizes one
weight row into an L1-resident float32 buffer once and dots it with every token.
An int8-activation (llama.cpp Q8_1-style) inner loop was tried: LLVM emits vpdpwssd but not
vpmaddubsw and it measured no faster than the float loop, so the exact float loop is kept.

Threads: Numba's pool (`numba.set_num_threads`, NUMBA_NUM_THREADS); rows are split into chunks
over `prange`.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from .formats import GGML_BLOCK, QType, QuantizedWeight

# fp16 bit pattern -> float32 value: float32 [65536]
F16_LUT = np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float32)

# format codes understood by the kernels
FMT = {QType.Q8_0: 0, QType.Q4_0: 1, QType.Q4_1: 2, QType.INT8: 3, QType.INT4: 4}
HALF = 16  # half a 32-value block; passed at run time on purpose (see module doc)

_EMPTY = np.zeros((1, 0), np.float32)  # "no scales/mins": rows of length 0


@njit(inline="always")
def _f16(row16, o, lut):
    """fp16 at byte offset o (even: every GGML block size here is even) -> float32."""
    return lut[np.int64(row16[o >> 1])]


@njit(fastmath=True, cache=True)
def _dequant_row(fmt, row, rowi, row16, srow, mrow, g, lut, h, out):
    """Dequantize one packed row into out: float32 [in_features].

    row / rowi / row16: the row's packed bytes as uint8, int8 and uint16 (same memory,
    uint16 for the fp16 block scales); srow/mrow: float32
    per-group scales/mins (own formats; mrow has length 0 when symmetric); g: group size.
    """
    k = out.shape[0]
    nb = k // 32
    if fmt == 0:  # Q8_0: [d f16][32 x int8]
        for b in range(nb):
            o = b * 34
            d = _f16(row16, o, lut)
            qs = rowi[o + 2:o + 2 + 2 * h]
            ob = out[b * 32:b * 32 + 2 * h]
            for j in range(2 * h):
                ob[j] = np.float32(qs[j]) * d
    elif fmt == 1 or fmt == 2:  # Q4_0: [d][16 qs]; Q4_1: [d][m][16 qs]
        bs = 18 if fmt == 1 else 20
        for b in range(nb):
            o = b * bs
            d = _f16(row16, o, lut)
            if fmt == 1:
                m = np.float32(-8.0) * d
                qs = row[o + 2:o + 2 + h]
            else:
                m = _f16(row16, o + 2, lut)
                qs = row[o + 4:o + 4 + h]
            lo = out[b * 32:b * 32 + h]
            hi = out[b * 32 + h:b * 32 + 2 * h]
            for j in range(h):
                qf = np.float32(qs[j])
                qh = np.floor(qf * np.float32(0.0625))
                lo[j] = (qf - np.float32(16.0) * qh) * d + m
                hi[j] = qh * d + m
    elif fmt == 3:  # int8: codes [in], per-group s (and m)
        asym = mrow.shape[0] > 0
        for gi in range(k // g):
            s = srow[gi]
            m = mrow[gi] if asym else np.float32(0.0)
            qs = rowi[gi * g:(gi + 1) * g]
            ob = out[gi * g:(gi + 1) * g]
            for j in range(qs.shape[0]):
                ob[j] = np.float32(qs[j]) * s + m
    else:  # int4: 16 bytes per 32 values (ggml nibble order), per-group s (and m)
        asym = mrow.shape[0] > 0
        for b in range(nb):
            gi = b * 32 // g
            s = srow[gi]
            m = mrow[gi] if asym else np.float32(-8.0) * s
            qs = row[b * 16:b * 16 + h]
            lo = out[b * 32:b * 32 + h]
            hi = out[b * 32 + h:b * 32 + 2 * h]
            for j in range(h):
                qf = np.float32(qs[j])
                qh = np.floor(qf * np.float32(0.0625))
                lo[j] = (qf - np.float32(16.0) * qh) * s + m
                hi[j] = qh * s + m


@njit(fastmath=True, cache=True)
def _dot_row(fmt, row, rowi, row16, srow, mrow, g, lut, h, x, xsum):
    """Fused unpack-and-dot of one packed row with one activation x: float32 [in].

    xsum: float32 [in // 32] per-block sums of x (the min/offset term factors out:
    sum_j (q_j d + m) x_j = d * sum_j q_j x_j + m * xsum_b).
    """
    k = x.shape[0]
    nb = k // 32
    acc = np.float32(0.0)
    if fmt == 0:
        for b in range(nb):
            o = b * 34
            d = _f16(row16, o, lut)
            qs = rowi[o + 2:o + 2 + 2 * h]
            xb = x[b * 32:b * 32 + 2 * h]
            s = np.float32(0.0)
            for j in range(2 * h):
                s += np.float32(qs[j]) * xb[j]
            acc += d * s
    elif fmt == 1 or fmt == 2:
        bs = 18 if fmt == 1 else 20
        for b in range(nb):
            o = b * bs
            d = _f16(row16, o, lut)
            if fmt == 1:
                m = np.float32(-8.0) * d
                qs = row[o + 2:o + 2 + h]
            else:
                m = _f16(row16, o + 2, lut)
                qs = row[o + 4:o + 4 + h]
            xa = x[b * 32:b * 32 + h]
            xb = x[b * 32 + h:b * 32 + 2 * h]
            s = np.float32(0.0)
            for j in range(h):
                qf = np.float32(qs[j])
                qh = np.floor(qf * np.float32(0.0625))
                s += (qf - np.float32(16.0) * qh) * xa[j] + qh * xb[j]
            acc += d * s + m * xsum[b]
    elif fmt == 3:
        asym = mrow.shape[0] > 0
        for gi in range(k // g):
            qs = rowi[gi * g:(gi + 1) * g]
            xb = x[gi * g:(gi + 1) * g]
            s = np.float32(0.0)
            for j in range(qs.shape[0]):
                s += np.float32(qs[j]) * xb[j]
            acc += srow[gi] * s
            if asym:
                xs = np.float32(0.0)
                for b in range(gi * g // 32, (gi + 1) * g // 32):
                    xs += xsum[b]
                acc += mrow[gi] * xs
    else:
        asym = mrow.shape[0] > 0
        for b in range(nb):
            gi = b * 32 // g
            sc = srow[gi]
            m = mrow[gi] if asym else np.float32(-8.0) * sc
            qs = row[b * 16:b * 16 + h]
            xa = x[b * 32:b * 32 + h]
            xb = x[b * 32 + h:b * 32 + 2 * h]
            s = np.float32(0.0)
            for j in range(h):
                qf = np.float32(qs[j])
                qh = np.floor(qf * np.float32(0.0625))
                s += (qf - np.float32(16.0) * qh) * xa[j] + qh * xb[j]
            acc += sc * s + m * xsum[b]
    return acc


@njit(parallel=True, fastmath=True, cache=True)
def _gemv(fmt, data, datai, data16, scales, mins, g, lut, h, x, y, nchunk):
    """y[t, r] = dot(W[r], x[t]) with the fused per-block loop (best for 1-2 tokens)."""
    n, k = x.shape
    out = data.shape[0]
    nb = k // 32
    xsum = np.empty((n, nb), np.float32)
    for t in range(n):
        for b in range(nb):
            s = np.float32(0.0)
            for j in range(32):
                s += x[t, b * 32 + j]
            xsum[t, b] = s
    per = (out + nchunk - 1) // nchunk
    has_s = scales.shape[0] == out
    has_m = mins.shape[0] == out
    for c in prange(nchunk):
        for r in range(c * per, min(out, (c + 1) * per)):
            srow = scales[r] if has_s else scales[0, :0]
            mrow = mins[r] if has_m else mins[0, :0]
            for t in range(n):
                y[t, r] = _dot_row(fmt, data[r], datai[r], data16[r], srow, mrow, g, lut, h, x[t], xsum[t])


@njit(parallel=True, fastmath=True, cache=True)
def _gemm(fmt, data, datai, data16, scales, mins, g, lut, h, x, y, nchunk):
    """y = x @ W.T: each weight row is dequantized once into a float32 buffer [in] and dotted
    with all n tokens (x: float32 [n, in] stays in L2 for small n)."""
    n, k = x.shape
    out = data.shape[0]
    per = (out + nchunk - 1) // nchunk
    has_s = scales.shape[0] == out
    has_m = mins.shape[0] == out
    for c in prange(nchunk):
        w = np.empty(k, np.float32)
        for r in range(c * per, min(out, (c + 1) * per)):
            srow = scales[r] if has_s else scales[0, :0]
            mrow = mins[r] if has_m else mins[0, :0]
            _dequant_row(fmt, data[r], datai[r], data16[r], srow, mrow, g, lut, h, w)
            for t in range(n):
                xt = x[t]
                s = np.float32(0.0)
                for i in range(k):
                    s += w[i] * xt[i]
                y[t, r] = s


@njit(parallel=True, fastmath=True, cache=True)
def _dequant(fmt, data, datai, data16, scales, mins, g, lut, h, out):
    """out: float32 [rows, in] <- packed rows."""
    rows = data.shape[0]
    has_s = scales.shape[0] == rows
    has_m = mins.shape[0] == rows
    for r in prange(rows):
        srow = scales[r] if has_s else scales[0, :0]
        mrow = mins[r] if has_m else mins[0, :0]
        _dequant_row(fmt, data[r], datai[r], data16[r], srow, mrow, g, lut, h, out[r])


def _args(w: QuantizedWeight):
    if w.qtype not in FMT:
        raise ValueError(f"cpu kernels: unsupported qtype {w.qtype.value}")
    data = np.asarray(w.data)
    if not data.flags.c_contiguous:
        data = np.ascontiguousarray(data)
    data = data.view(np.uint8)
    datai = data.view(np.int8)
    data16 = data.view(np.uint16) if data.shape[1] % 2 == 0 else np.zeros((data.shape[0], 0), np.uint16)
    sc = _EMPTY if w.scales is None else np.ascontiguousarray(w.scales, dtype=np.float32)
    mn = _EMPTY if w.mins is None else np.ascontiguousarray(w.mins, dtype=np.float32)
    return FMT[w.qtype], data, datai, data16, sc, mn, int(w.group_size), F16_LUT, HALF


def _nchunk(out: int) -> int:
    """Row chunks for prange: 8 per Numba thread (load balance without per-row overhead)."""
    return max(1, min(out, numba.get_num_threads() * 8))


def _check_x(x: np.ndarray, w: QuantizedWeight) -> np.ndarray:
    if x.ndim != 2 or x.shape[1] != w.in_features:
        raise ValueError(f"{w.qtype.value} weight {w.shape}: x must be [n_tokens, "
                         f"{w.in_features}], got {list(x.shape)}")
    return np.ascontiguousarray(x, dtype=np.float32)


def gemv(x: np.ndarray, w: QuantizedWeight, y: np.ndarray | None = None) -> np.ndarray:
    """Fused quantized GEMV (decode): x float32 [n_tokens, in] -> y float32 [n_tokens, out].

    One pass over the packed weight per token: best for n_tokens of 1 or 2.
    Formats: q8_0, q4_0, q4_1, int8, int4.
    """
    x = _check_x(x, w)
    y = np.empty((x.shape[0], w.out_features), np.float32) if y is None else y
    _gemv(*_args(w), x, y, _nchunk(w.out_features))
    return y


def gemm(x: np.ndarray, w: QuantizedWeight, y: np.ndarray | None = None) -> np.ndarray:
    """Small-batch quantized GEMM: x float32 [n_tokens, in] -> y float32 [n_tokens, out].

    Reads the packed weight once, dequantizing row by row into an L1 buffer.
    Formats: q8_0, q4_0, q4_1, int8, int4.
    """
    x = _check_x(x, w)
    y = np.empty((x.shape[0], w.out_features), np.float32) if y is None else y
    _gemm(*_args(w), x, y, _nchunk(w.out_features))
    return y


def dequantize(w: QuantizedWeight, out: np.ndarray | None = None) -> np.ndarray:
    """Parallel dequantization to float32 [out_features, in_features] (q8_0/q4_0/q4_1/int8/int4)."""
    out = np.empty(w.shape, np.float32) if out is None else out
    if out.shape != w.shape or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"dequantize: out must be contiguous float32 {list(w.shape)}")
    _dequant(*_args(w), out)
    return out


def supported(qtype: QType) -> bool:
    """True when the Numba CPU kernels take this qtype directly."""
    return qtype in FMT
