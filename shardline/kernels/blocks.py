"""Numba decoders of one packed row in the file's layout, for Q5_0, Q5_1 and the K-quants.

Each `_row_*` writes the float32 values of one row of GGML blocks (layouts and formulas in
shardline/kernels/formats.py, from ggml-quants.c's `dequantize_row_*`); shardline/kernels/cpu.py
dots them with the activations (the plain GEMV/GEMM) or hands them to torch's GEMM.

Arguments, as cpu.py passes them: row uint8 [row_bytes] and the same bytes as row16 uint16
(fp16 fields sit at even offsets in every block: 22, 24, 84, 110, 144, 176, 210 bytes), lut the
fp16 -> float32 table (formats.F16_LUT), h the half-block length 16 passed at run time (see
cpu.py's module doc: a runtime inner length vectorizes cleanly), out float32 [in_features].

cpu.py's `dequant_row` picks one of them at compile time, so a model compiles only the
decoders of its own types.
"""
from __future__ import annotations

import numpy as np
from numba import njit


@njit(inline="always")
def _half(row16, o, lut):
    """fp16 at even byte offset o -> float32."""
    return lut[np.int64(row16[o >> 1])]


@njit(fastmath=True, cache=True)
def _row_q5(fmt, row, row16, lut, h, out):
    """Q5_0 (fmt 5) / Q5_1 (fmt 6): value = (nib | qh bit << 4) * d + m, m = -16 d for Q5_0."""
    bs = 22 if fmt == 5 else 24
    for b in range(out.shape[0] // 32):
        o = b * bs
        d = _half(row16, o, lut)
        if fmt == 5:
            m = np.float32(-16.0) * d
            o_qh = o + 2
        else:
            m = _half(row16, o + 2, lut)
            o_qh = o + 4
        qh = np.int64(row16[o_qh >> 1]) | (np.int64(row16[(o_qh >> 1) + 1]) << 16)
        qs = row[o_qh + 4:o_qh + 4 + h]
        lo = out[b * 32:b * 32 + h]
        hi = out[b * 32 + h:b * 32 + 2 * h]
        for j in range(h):
            v = np.int32(qs[j])
            c0 = (v & 15) | (np.int32((qh >> j) & 1) << 4)
            c1 = (v >> 4) | (np.int32((qh >> (j + 16)) & 1) << 4)
            lo[j] = np.float32(c0) * d + m
            hi[j] = np.float32(c1) * d + m


@njit(inline="always")
def _scale_min_k4(j, sc):
    """Six-bit scale and min of sub-block j (0..7) from Q4_K/Q5_K's 12 scale bytes
    (ggml's `get_scale_min_k4`)."""
    if j < 4:
        return np.int32(sc[j]) & 63, np.int32(sc[j + 4]) & 63
    return ((np.int32(sc[j + 4]) & 15) | ((np.int32(sc[j - 4]) >> 6) << 4),
            (np.int32(sc[j + 4]) >> 4) | ((np.int32(sc[j]) >> 6) << 4))


@njit(fastmath=True, cache=True)
def _row_q45_k(fmt, row, row16, lut, h, out):
    """Q4_K (fmt 9) / Q5_K (fmt 10): sub-block s of 32: value = d*sc[s]*q - dmin*m[s]."""
    bs = 144 if fmt == 9 else 176
    qs0 = 16 if fmt == 9 else 48
    for sb in range(out.shape[0] // 256):
        o = sb * bs
        d = _half(row16, o, lut)
        dmin = _half(row16, o + 2, lut)
        sc = row[o + 4:o + 16]
        qh = row[o + 16:o + 48]
        for r in range(4):  # a run of 32 code bytes: sub-block 2r low nibbles, 2r+1 high
            s0, m0 = _scale_min_k4(2 * r, sc)
            s1, m1 = _scale_min_k4(2 * r + 1, sc)
            a0, b0 = d * np.float32(s0), dmin * np.float32(m0)
            a1, b1 = d * np.float32(s1), dmin * np.float32(m1)
            for part in range(2):  # 2 x 16 bytes: a runtime inner length of 16
                q = row[o + qs0 + 32 * r + part * h:o + qs0 + 32 * r + part * h + h]
                q5 = qh[part * h:part * h + h]
                lo = out[sb * 256 + 64 * r + part * h:sb * 256 + 64 * r + part * h + h]
                hi = out[sb * 256 + 64 * r + 32 + part * h:sb * 256 + 64 * r + 32 + part * h + h]
                for j in range(h):
                    v = np.int32(q[j])
                    c0 = v & 15
                    c1 = v >> 4
                    if fmt == 10:
                        u = np.int32(q5[j])
                        c0 |= ((u >> (2 * r)) & 1) << 4
                        c1 |= ((u >> (2 * r + 1)) & 1) << 4
                    lo[j] = a0 * np.float32(c0) - b0
                    hi[j] = a1 * np.float32(c1) - b1


@njit(fastmath=True, cache=True)
def _row_q6_k(row, rowi, row16, lut, h, out):
    """Q6_K: sub-block s of 16: value = d * sc[s] * (q - 32), q six bits from ql and qh."""
    for sb in range(out.shape[0] // 256):
        o = sb * 210
        d = _half(row16, o + 208, lut)
        for half in range(2):
            ql = row[o + 64 * half:o + 64 * half + 64]
            qh = row[o + 128 + 32 * half:o + 128 + 32 * half + 32]
            base = sb * 256 + 128 * half
            for part in range(2):  # values l = 16 part .. 16 part + 15 of each quarter
                a0 = d * np.float32(rowi[o + 192 + 8 * half + part])
                a1 = d * np.float32(rowi[o + 192 + 8 * half + part + 2])
                a2 = d * np.float32(rowi[o + 192 + 8 * half + part + 4])
                a3 = d * np.float32(rowi[o + 192 + 8 * half + part + 6])
                l0 = ql[part * h:part * h + h]
                l1 = ql[32 + part * h:32 + part * h + h]
                hh = qh[part * h:part * h + h]
                y0 = out[base + part * h:base + part * h + h]
                y1 = out[base + 32 + part * h:base + 32 + part * h + h]
                y2 = out[base + 64 + part * h:base + 64 + part * h + h]
                y3 = out[base + 96 + part * h:base + 96 + part * h + h]
                for j in range(h):
                    u = np.int32(hh[j])
                    v0 = np.int32(l0[j])
                    v1 = np.int32(l1[j])
                    y0[j] = a0 * np.float32(((v0 & 15) | ((u & 3) << 4)) - 32)
                    y1[j] = a1 * np.float32(((v1 & 15) | (((u >> 2) & 3) << 4)) - 32)
                    y2[j] = a2 * np.float32(((v0 >> 4) | (((u >> 4) & 3) << 4)) - 32)
                    y3[j] = a3 * np.float32(((v1 >> 4) | (((u >> 6) & 3) << 4)) - 32)


@njit(fastmath=True, cache=True)
def _row_q23_k(fmt, row, row16, lut, h, out):
    """Q2_K (fmt 7): value = d*(sc & 15)*q - dmin*(sc >> 4); Q3_K (fmt 8): value =
    d*(sc6 - 32)*(q - 4 + 4*hbit). Value 128 half + 32 j + l: bits 2j of qs[32 half + l]."""
    bs = 84 if fmt == 7 else 110
    qs0 = 16 if fmt == 7 else 32
    for sb in range(out.shape[0] // 256):
        o = sb * bs
        if fmt == 7:
            d = _half(row16, o + 80, lut)
            dmin = _half(row16, o + 82, lut)
        else:
            d = _half(row16, o + 108, lut)
            dmin = np.float32(0.0)
        hm = row[o:o + 32]
        for half in range(2):
            for j in range(4):
                for part in range(2):
                    s = 8 * half + 2 * j + part  # sub-block of 16 values
                    if fmt == 7:
                        sc = np.int32(row[o + s])
                        a = d * np.float32(sc & 15)
                        b = dmin * np.float32(sc >> 4)
                    else:
                        low = (np.int32(row[o + 96 + (s % 8)]) >> (4 * (s // 8))) & 15
                        high = (np.int32(row[o + 104 + (s % 4)]) >> (2 * (s // 4))) & 3
                        a = d * np.float32((low | (high << 4)) - 32)
                        b = np.float32(4.0) * a
                    q = row[o + qs0 + 32 * half + part * h:o + qs0 + 32 * half + part * h + h]
                    hb = hm[part * h:part * h + h]
                    y = out[sb * 256 + 128 * half + 32 * j + part * h:
                            sb * 256 + 128 * half + 32 * j + part * h + h]
                    sh = 2 * j
                    hsh = 4 * half + j
                    for i in range(h):
                        c = (np.int32(q[i]) >> sh) & 3
                        if fmt == 8:
                            c |= ((np.int32(hb[i]) >> hsh) & 1) << 2
                        y[i] = a * np.float32(c) - b
