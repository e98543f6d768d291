"""Numba CPU kernels: quantized GEMV / small-batch GEMM straight from packed weights, and a
parallel dequantizer feeding torch's GEMM for many tokens; the entry points (gemv, gemm,
dequantize) for every qtype of formats.FMT.

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
An int8-activation (llama.cpp Q8_1-style) inner loop written as plain Numba loops was tried: LLVM
emits vpdpwssd but not vpmaddubsw and it measured no faster than the float loop, so q8_0/q4_0/q4_1
keep the exact float loop. Q5_0, Q5_1 and the K-quants run shardline/kernels/qdot.py instead, whose
int8 dot products are written with explicit vector intrinsics (vpdpbusd, shardline/kernels/vnni.py)
and run 2-4x faster than this module's float loops (bench/kernels.py), with activations kept as
two int8 planes per block of 32 (an error of max|x| / 64516 per value, the float loops' level).

Compile only what a model needs: the drivers that decode rows (`_gemm`, `_dequant`) take a format
tag (shardline/kernels/specialize.py), and `dequant_row` resolves the tag while typing, so each
format's decoder (shardline/kernels/blocks.py for Q5_* and the K-quants) is compiled only into
the specialization of the formats a model uses; q8_0/q4_0/q4_1/int8/int4 share one, as before.

Threads: Numba's pool (`numba.set_num_threads`, NUMBA_NUM_THREADS); rows are split into chunks
over `prange`.
"""
from __future__ import annotations

import weakref

import numba
import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from . import blocks, qdot
from .formats import F16_LUT, FMT, QType, QuantizedWeight
from .specialize import LEGACY, code_of, tag

LEGACY_FORMATS = (0, 1, 2, 3, 4)  # q8_0, q4_0, q4_1, int8, int4: one compiled `_dequant_row`
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


def dequant_row(family, fmt, row, rowi, row16, srow, mrow, g, lut, h, out):
    """Decode one row into out (float32 [in_features]); `family` is a format tag
    (shardline.kernels.specialize): LEGACY for the formats of `_dequant_row` (q8_0, q4_0, q4_1,
    int8, int4, chosen by `fmt` at run time), else the format's own code, whose decoder alone
    is compiled into the caller."""
    raise NotImplementedError("dequant_row is only callable from Numba-compiled code")


@overload(dequant_row, jit_options={"fastmath": True})
def _dequant_row_overload(family, fmt, row, rowi, row16, srow, mrow, g, lut, h, out):
    f = code_of(family)
    if f == 0:
        return lambda family, fmt, row, rowi, row16, srow, mrow, g, lut, h, out: _dequant_row(
            fmt, row, rowi, row16, srow, mrow, g, lut, h, out)
    if f in (5, 6):
        return lambda family, fmt, row, rowi, row16, srow, mrow, g, lut, h, out: blocks._row_q5(
            fmt, row, row16, lut, h, out)
    if f in (7, 8):
        return lambda family, fmt, row, rowi, row16, srow, mrow, g, lut, h, out: blocks._row_q23_k(
            fmt, row, row16, lut, h, out)
    if f in (9, 10):
        return lambda family, fmt, row, rowi, row16, srow, mrow, g, lut, h, out: blocks._row_q45_k(
            fmt, row, row16, lut, h, out)
    if f == 11:
        return lambda family, fmt, row, rowi, row16, srow, mrow, g, lut, h, out: blocks._row_q6_k(
            row, rowi, row16, lut, h, out)
    raise TypingError(f"dequant_row: no decoder for format family {f}")


def family(fmt: int):
    """The `family` tag of `dequant_row` and the drivers for format code `fmt`."""
    return tag(LEGACY if fmt in LEGACY_FORMATS else fmt)


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
def _gemm(fam, fmt, data, datai, data16, scales, mins, g, lut, h, x, y, nchunk):
    """y = x @ W.T: each weight row is dequantized once into a float32 buffer [in] and dotted
    with all n tokens (x: float32 [n, in] stays in L2 for small n). `fam`: see dequant_row."""
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
            dequant_row(fam, fmt, data[r], datai[r], data16[r], srow, mrow, g, lut, h, w)
            for t in range(n):
                xt = x[t]
                s = np.float32(0.0)
                for i in range(k):
                    s += w[i] * xt[i]
                y[t, r] = s


@njit(parallel=True, fastmath=True, cache=True)
def _dequant(fam, fmt, data, datai, data16, scales, mins, g, lut, h, out):
    """out: float32 [rows, in] <- packed rows. `fam`: see dequant_row."""
    rows = data.shape[0]
    has_s = scales.shape[0] == rows
    has_m = mins.shape[0] == rows
    for r in prange(rows):
        srow = scales[r] if has_s else scales[0, :0]
        mrow = mins[r] if has_m else mins[0, :0]
        dequant_row(fam, fmt, data[r], datai[r], data16[r], srow, mrow, g, lut, h, out[r])


# ---------------------------------------------------------------------------------------------
# Row-interleaved ("lanes = rows") kernels for q8_0 / q4_0 / q4_1, the decode hot path.
#
# Why a second layout: in the file layout each 32-value block's 16 (or 32) code bytes sit between
# fp16 headers, so any loop over one block is 16 iterations long and LLVM (Numba 0.68) cannot make
# a full-width vector loop of it: with a runtime length it picks 16 lanes x 2 interleaved and falls
# to its 4-lane remainder loop; with a constant it unrolls and vectorizes the block loop with
# gathers. Both ran at ~3 GB/s. Repacked once per weight (cached, see `_packed`) into groups of
# PACK_ROWS output rows, byte j of block b of all rows of a group is contiguous:
#     qs   uint8 / int8 [groups, blocks, 16 (q4) or 32 (q8), PACK_ROWS]
#     d, m float32      [groups, blocks, PACK_ROWS]       (q4_0: m = -8 d; q8_0: no m)
# so the innermost loop runs over PACK_ROWS rows (full 16-lane zmm vectors, no per-block
# horizontal sums, no gathers), x[t, i] is a broadcast scalar, and per block the row sums are
# scaled: y += d * sum_j q_j x_j + m * sum_j x_j. Exact float32 arithmetic (no activation
# quantization): the same error bound as the row-wise kernels. Rows past out_features are zero.
# The packed copy has float32 scales: 24 bytes per q4_1 block instead of 20 (+20%), 18 -> 24 for
# q4_0 would be +33%, q8_0 34 -> 36 (+6%).
# ---------------------------------------------------------------------------------------------
PACK_ROWS = 64
FLOAT_PACKED = (0, 1, 2)  # q8_0, q4_0, q4_1: this section; the others of PACKED_FORMATS: qdot.py
PACKED_FORMATS = FLOAT_PACKED + qdot.QDOT_FORMATS
_pack_cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


@njit(cache=True)
def _pack(fmt, data, data16, lut, qs, dd, mm):
    out = data.shape[0]
    nb, nq, rows = qs.shape[1], qs.shape[2], qs.shape[3]
    bs = 34 if fmt == 0 else (18 if fmt == 1 else 20)
    for r in range(out):
        g = r // rows
        rr = r % rows
        for b in range(nb):
            o = b * bs
            d = lut[np.int64(data16[r, o >> 1])]
            dd[g, b, rr] = d
            if fmt == 2:
                mm[g, b, rr] = lut[np.int64(data16[r, (o >> 1) + 1])]
                q0 = o + 4
            else:
                mm[g, b, rr] = np.float32(-8.0) * d
                q0 = o + 2
            for j in range(nq):
                qs[g, b, j, rr] = data[r, q0 + j]


_MADV_DONTNEED = 4  # linux/mman.h


def release_file_pages(a: np.ndarray) -> bool:
    """Drop the whole memory pages of `a` from this process's resident memory when `a` is a
    view of a read-only file mapping (a GGUF memmap): the file's bytes stay in the page cache
    and come back on the next read (madvise(MADV_DONTNEED), Linux). Returns whether it did;
    arrays of process memory (copies) are left alone, since for them the call would zero them."""
    if not isinstance(a, np.memmap) or getattr(a, "mode", None) != "r" or not a.flags.c_contiguous:
        return False
    import ctypes
    import mmap

    start = a.ctypes.data
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    last = (start + a.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if last <= first:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED) == 0


def _packed(w: QuantizedWeight):
    """w in its row-interleaved layout, built once per weight object: (fmt, qs, d, m) for
    q8_0/q4_0/q4_1 (this section), (tag, codes, hdr, sub) for Q5_0, Q5_1 and the K-quants
    (shardline/kernels/qdot.py). Either is what `packed_linear` takes."""
    p = _pack_cache.get(w)
    if p is None and FMT[w.qtype] in qdot.QDOT_FORMATS:
        p = _pack_cache[w] = qdot.pack(w)
        release_file_pages(w.data)  # from now on every kernel, dequantize included, reads p
    elif p is None:
        fmt = FMT[w.qtype]
        out, k = w.shape
        groups, nb = -(-out // PACK_ROWS), k // 32
        nq = 32 if fmt == 0 else 16
        qs = np.zeros((groups, nb, nq, PACK_ROWS), np.uint8)
        dd = np.zeros((groups, nb, PACK_ROWS), np.float32)
        mm = np.zeros((groups, nb, PACK_ROWS), np.float32)
        data = np.ascontiguousarray(np.asarray(w.data)).view(np.uint8)
        _pack(fmt, data, data.view(np.uint16), F16_LUT, qs, dd, mm)
        p = (fmt, qs.view(np.int8) if fmt == 0 else qs, dd, mm)
        _pack_cache[w] = p
    return p


@njit(fastmath=True, cache=True)
def _xsums(x):
    n, k = x.shape
    nb = k // 32
    xsum = np.empty((n, nb), np.float32)
    for t in range(n):
        for b in range(nb):
            s = np.float32(0.0)
            for j in range(32):
                s += x[t, b * 32 + j]
            xsum[t, b] = s
    return xsum


@njit(fastmath=True, cache=True)
def _q4_groups(qs, dd, mm, x, xsum, y, g0, g1):
    """q4_0/q4_1 packed groups [g0, g1): y[:, rows of those groups] = x @ W.T.
    One token: fused decode+FMA; more: chunks of 4 tokens share each decoded byte."""
    nb, rows = qs.shape[1], qs.shape[3]
    n = x.shape[0]
    out = y.shape[1]
    acc = np.zeros((4, rows), np.float32)
    blk = np.zeros((4, rows), np.float32)
    i15 = np.int32(15)
    i4 = np.int32(4)
    for t0 in range(0, n, 4):
        nt = min(4, n - t0)
        for g in range(g0, g1):
            acc[:] = 0
            for b in range(nb):
                blk[:] = 0
                b0 = blk[0]
                if nt == 1:  # two code rows per pass: half the loads/stores of b0 per FMA
                    for j in range(0, 16, 2):
                        q = qs[g, b, j]
                        q1 = qs[g, b, j + 1]
                        i0 = b * 32 + j
                        l0 = x[t0, i0]
                        h0 = x[t0, i0 + 16]
                        l1 = x[t0, i0 + 1]
                        h1 = x[t0, i0 + 17]
                        for r in range(rows):
                            v = np.int32(q[r])
                            v1 = np.int32(q1[r])
                            b0[r] += (np.float32(np.int32(v & i15)) * l0
                                      + np.float32(np.int32(v >> i4)) * h0
                                      + np.float32(np.int32(v1 & i15)) * l1
                                      + np.float32(np.int32(v1 >> i4)) * h1)
                else:
                    b1 = blk[1]
                    b2 = blk[2]
                    b3 = blk[3]
                    for j in range(16):
                        q = qs[g, b, j]
                        i0 = b * 32 + j
                        i1 = i0 + 16
                        l0 = x[t0, i0]
                        h0 = x[t0, i1]
                        l1 = x[t0 + 1, i0]
                        h1 = x[t0 + 1, i1]
                        l2 = x[t0 + 2, i0] if nt > 2 else np.float32(0.0)
                        h2 = x[t0 + 2, i1] if nt > 2 else np.float32(0.0)
                        l3 = x[t0 + 3, i0] if nt > 3 else np.float32(0.0)
                        h3 = x[t0 + 3, i1] if nt > 3 else np.float32(0.0)
                        for r in range(rows):
                            v = np.int32(q[r])
                            lo = np.float32(np.int32(v & i15))
                            hi = np.float32(np.int32(v >> i4))
                            b0[r] += lo * l0 + hi * h0
                            b1[r] += lo * l1 + hi * h1
                            b2[r] += lo * l2 + hi * h2
                            b3[r] += lo * l3 + hi * h3
                db = dd[g, b]
                mb = mm[g, b]
                for t in range(nt):
                    xs = xsum[t0 + t, b]
                    bt = blk[t]
                    at = acc[t]
                    for r in range(rows):
                        at[r] += db[r] * bt[r] + mb[r] * xs
            r0 = g * rows
            for t in range(nt):
                for r in range(min(rows, out - r0)):
                    y[t0 + t, r0 + r] = acc[t, r]


@njit(fastmath=True, cache=True)
def _q8_groups(qs, dd, x, y, g0, g1):
    """q8_0 packed groups [g0, g1) (qs int8 [groups, blocks, 32, rows]); as _q4_groups."""
    nb, rows = qs.shape[1], qs.shape[3]
    n = x.shape[0]
    out = y.shape[1]
    acc = np.zeros((4, rows), np.float32)
    blk = np.zeros((4, rows), np.float32)
    for t0 in range(0, n, 4):
        nt = min(4, n - t0)
        for g in range(g0, g1):
            acc[:] = 0
            for b in range(nb):
                blk[:] = 0
                b0 = blk[0]
                if nt == 1:  # two code rows per pass, as in _q4_groups
                    for j in range(0, 32, 4):
                        q = qs[g, b, j]
                        q1 = qs[g, b, j + 1]
                        q2 = qs[g, b, j + 2]
                        q3 = qs[g, b, j + 3]
                        i0 = b * 32 + j
                        l0 = x[t0, i0]
                        l1 = x[t0, i0 + 1]
                        l2 = x[t0, i0 + 2]
                        l3 = x[t0, i0 + 3]
                        for r in range(rows):
                            b0[r] += (np.float32(np.int32(q[r])) * l0 + np.float32(np.int32(q1[r])) * l1
                                      + np.float32(np.int32(q2[r])) * l2 + np.float32(np.int32(q3[r])) * l3)
                else:
                    b1 = blk[1]
                    b2 = blk[2]
                    b3 = blk[3]
                    for j in range(32):
                        q = qs[g, b, j]
                        i0 = b * 32 + j
                        l0 = x[t0, i0]
                        l1 = x[t0 + 1, i0]
                        l2 = x[t0 + 2, i0] if nt > 2 else np.float32(0.0)
                        l3 = x[t0 + 3, i0] if nt > 3 else np.float32(0.0)
                        for r in range(rows):
                            v = np.float32(np.int32(q[r]))
                            b0[r] += v * l0
                            b1[r] += v * l1
                            b2[r] += v * l2
                            b3[r] += v * l3
                db = dd[g, b]
                for t in range(nt):
                    bt = blk[t]
                    at = acc[t]
                    for r in range(rows):
                        at[r] += db[r] * bt[r]
            r0 = g * rows
            for t in range(nt):
                for r in range(min(rows, out - r0)):
                    y[t0 + t, r0 + r] = acc[t, r]


@njit(fastmath=True, cache=True)
def _q4_gemv_groups(qs, dd, mm, x, xsum, y, g0, g1, h):
    """One token (decode): _q4_groups' nt == 1 path on its own, with a flat accumulator and the
    half-block length `h` (16) at run time; LLVM keeps this loop nest tighter (~10% faster)."""
    nb, rows = qs.shape[1], qs.shape[3]
    out = y.shape[1]
    acc = np.zeros(rows, np.float32)
    blk = np.zeros(rows, np.float32)
    i15 = np.int32(15)
    i4 = np.int32(4)
    for g in range(g0, g1):
        acc[:] = 0
        for b in range(nb):
            blk[:] = 0
            for j in range(0, h, 2):
                q0 = qs[g, b, j]
                q1 = qs[g, b, j + 1]
                i0 = b * 32 + j
                l0 = x[0, i0]
                h0 = x[0, i0 + 16]
                l1 = x[0, i0 + 1]
                h1 = x[0, i0 + 17]
                for r in range(rows):
                    v0 = np.int32(q0[r])
                    v1 = np.int32(q1[r])
                    blk[r] += (np.float32(np.int32(v0 & i15)) * l0 + np.float32(np.int32(v0 >> i4)) * h0
                               + np.float32(np.int32(v1 & i15)) * l1 + np.float32(np.int32(v1 >> i4)) * h1)
            db = dd[g, b]
            mb = mm[g, b]
            xs = xsum[0, b]
            for r in range(rows):
                acc[r] += db[r] * blk[r] + mb[r] * xs
        r0 = g * rows
        for r in range(min(rows, out - r0)):
            y[0, r0 + r] = acc[r]


@njit(cache=True)
def _packed_serial(fmt, qs, dd, mm, x, y):
    g = qs.shape[0]
    if fmt == 0:
        _q8_groups(qs, dd, x, y, 0, g)
    elif x.shape[0] == 1:
        _q4_gemv_groups(qs, dd, mm, x, _xsums(x), y, 0, g, HALF)
    else:
        _q4_groups(qs, dd, mm, x, _xsums(x), y, 0, g)


@njit(parallel=True, cache=True)
def _packed_parallel(fmt, qs, dd, mm, x, y, nchunk):
    groups = qs.shape[0]
    per = (groups + nchunk - 1) // nchunk
    xsum = _xsums(x)
    for c in prange(nchunk):
        g0 = min(groups, c * per)
        g1 = min(groups, (c + 1) * per)
        if fmt == 0:
            _q8_groups(qs, dd, x, y, g0, g1)
        elif x.shape[0] == 1:
            _q4_gemv_groups(qs, dd, mm, x, xsum, y, g0, g1, HALF)
        else:
            _q4_groups(qs, dd, mm, x, xsum, y, g0, g1)


def packed_linear(fmt, qs, dd, mm, x, y, nchunk):
    """y float32 [n, out] = x float32 [n, in] @ W.T from `_packed(W)`'s tuple (fmt, qs, dd, mm),
    serial (nchunk 1) or over `nchunk` prange chunks; callable from Numba code
    (shardline/kernels/fused.py). q8_0/q4_0/q4_1 run this module's kernels, the tagged formats
    shardline/kernels/qdot.py's."""
    raise NotImplementedError("compiled code only; from Python use gemv/gemm")


@overload(packed_linear)
def _packed_linear_overload(fmt, qs, dd, mm, x, y, nchunk):
    if isinstance(fmt, types.Integer):
        def float_kernels(fmt, qs, dd, mm, x, y, nchunk):
            if nchunk > 1:
                _packed_parallel(fmt, qs, dd, mm, x, y, nchunk)
            else:
                _packed_serial(fmt, qs, dd, mm, x, y)
        return float_kernels

    def int8_kernels(fmt, qs, dd, mm, x, y, nchunk):
        if nchunk > 1:
            qdot.qdot_parallel(fmt, qs, dd, mm, x, y, nchunk)
        else:
            qdot.qdot_serial(fmt, qs, dd, mm, x, y)
    return int8_kernels


def _packed_matmul(x: np.ndarray, w: QuantizedWeight, y: np.ndarray) -> np.ndarray:
    p = _packed(w)
    if FMT[w.qtype] in qdot.QDOT_FORMATS:
        return qdot.matmul(p, x, y)
    fmt, qs, dd, mm = p
    groups = qs.shape[0]
    threads = numba.get_num_threads()
    # one thread, or a weight too small to split (a parallel launch costs more than ~4 groups)
    if threads == 1 or groups < 4 * threads:
        _packed_serial(fmt, qs, dd, mm, x, y)
    else:
        _packed_parallel(fmt, qs, dd, mm, x, y, min(groups, 4 * threads))
    return y


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
    fmt = FMT[w.qtype]
    return family(fmt), fmt, data, datai, data16, sc, mn, int(w.group_size), F16_LUT, HALF


def _rowwise_gemv(x: np.ndarray, w: QuantizedWeight, y: np.ndarray) -> np.ndarray:
    """The fused per-block loop (q8_0/q4_*/int8/int4); the other formats dequantize each row into
    an L1 buffer and dot it with every token (`_gemm`)."""
    fam, *args = _args(w)
    if fam is tag(LEGACY):
        _gemv(*args, x, y, _nchunk(w.out_features))
    else:
        _gemm(fam, *args, x, y, _nchunk(w.out_features))
    return y


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

    q8_0/q4_0/q4_1: the row-interleaved kernels (weight repacked once, cached per weight
    object); one pass over the weight per 4 tokens. int8/int4: the row-wise fused loop, one pass
    per token (best for 1-2 tokens). Other GGML types: `gemv_rowwise`. Every qtype of
    formats.FMT; ValueError for others.
    """
    x = _check_x(x, w)
    y = np.empty((x.shape[0], w.out_features), np.float32) if y is None else y
    if FMT.get(w.qtype) in PACKED_FORMATS and w.in_features % 32 == 0:
        return _packed_matmul(x, w, y)
    return _rowwise_gemv(x, w, y)


def gemv_rowwise(x: np.ndarray, w: QuantizedWeight, y: np.ndarray | None = None) -> np.ndarray:
    """The plain fused GEMV straight from the file layout (no repacking), every format;
    kept as the simple version the packed kernels are checked and benchmarked against."""
    x = _check_x(x, w)
    y = np.empty((x.shape[0], w.out_features), np.float32) if y is None else y
    return _rowwise_gemv(x, w, y)


def gemm(x: np.ndarray, w: QuantizedWeight, y: np.ndarray | None = None) -> np.ndarray:
    """Small-batch quantized GEMM: x float32 [n_tokens, in] -> y float32 [n_tokens, out].

    q8_0/q4_0/q4_1: the row-interleaved kernels (as `gemv`). int8/int4: reads the packed
    weight once, dequantizing row by row into an L1 buffer; so do the other GGML types.
    Every qtype of formats.FMT; ValueError for others.
    """
    x = _check_x(x, w)
    y = np.empty((x.shape[0], w.out_features), np.float32) if y is None else y
    if FMT.get(w.qtype) in PACKED_FORMATS and w.in_features % 32 == 0:
        return _packed_matmul(x, w, y)
    _gemm(*_args(w), x, y, _nchunk(w.out_features))
    return y


def gemm_rowwise(x: np.ndarray, w: QuantizedWeight, y: np.ndarray | None = None) -> np.ndarray:
    """The plain small GEMM from the file layout (row dequantized into L1, dotted with all)."""
    x = _check_x(x, w)
    y = np.empty((x.shape[0], w.out_features), np.float32) if y is None else y
    _gemm(*_args(w), x, y, _nchunk(w.out_features))
    return y


def dequantize(w: QuantizedWeight, out: np.ndarray | None = None) -> np.ndarray:
    """Parallel dequantization to float32 [out_features, in_features], every qtype of
    formats.FMT; ValueError for others or an `out` of the wrong shape or dtype."""
    return dequantize_rows(w, 0, w.out_features, out)


def dequantize_rows(w: QuantizedWeight, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
    """Rows [start, stop) of w as float32 [stop - start, in_features] (into `out` when given):
    from the 8-bit kernels' packed copy when w has one (its file pages may be released, see
    `release_file_pages`), else from w's bytes. ValueError for an unsupported qtype, a row range
    outside w or an `out` of the wrong shape or dtype."""
    if w.qtype not in FMT:
        raise ValueError(f"cpu kernels: unsupported qtype {w.qtype.value}")
    shape = (stop - start, w.in_features)
    if not 0 <= start < stop <= w.out_features:
        raise ValueError(f"dequantize_rows({start}, {stop}) out of range for shape {w.shape}")
    out = np.empty(shape, np.float32) if out is None else out
    if out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"dequantize: out must be contiguous float32 {list(shape)}")
    p = _pack_cache.get(w)
    if p is not None and FMT[w.qtype] in qdot.QDOT_FORMATS:
        return qdot.dequantize(p, start, out)
    part = w if (start, stop) == (0, w.out_features) else w.row_slice(start, stop)
    _dequant(*_args(part), out)
    return out


def supported(qtype: QType) -> bool:
    """True when the Numba CPU kernels take this qtype directly."""
    return qtype in FMT
