"""Row-interleaved 8-bit integer kernels for Q5_0, Q5_1 and the K-quants (decode and small
batches on the CPU).

The scheme follows llama.cpp's (ggml-cpu/quants.c `ggml_vec_dot_*_q8_*`): the activations are
quantized to int8 per block of 32 values, the weight codes stay small unsigned integers, and
each block's dot product is an exact integer sum scaled once:

    value = A * code + B            (per row and sub-block of 16 or 32 values, see below)
    sum_i value_i x_i ~= d * (A * sum_i code_i xq_i + B * sum_i xq_i)

Where llama.cpp keeps one int8 plane (scale max|x| / 127, per 256 values for the K-quants), we
keep two per block of 32: x ~= d (254 q1 + q2) with d = max|x| / (127 * 254), q1 = round(x / (254
d)) and q2 = round((x - 254 d q1) / d) both in -127..127, and run the integer dot product on
both (xq_i = 254 q1_i + q2_i). Error: |x_i - d xq_i| <= d / 2 = max|x| / 64516 per block, so
|y - x @ W.T| <= sum_i |W_i| d(i) / 2 plus float32 rounding (tests check exactly this bound).
One plane is llama.cpp's accuracy: on a Q4_K_M-like SmolLM2-135M its logits moved by up to 0.79
(log-probabilities by 0.26 nats) against transformers' float32 forward of the same file; two
planes: 0.008 (0.0013 nats), the float kernels' level. The second plane costs 10-20% on one
token from cache and ~40% on four; from DRAM, where decode reads its weights, the difference was
within this shared machine's run-to-run noise (Q4_K 4096x4096, one thread: 21.7 GB/s with one
plane, 19.2 GB/s with two, while the measured read bandwidth was 21.5 and 17.1 GB/s).

Layout (built once per weight by `pack`, cached like cpu.py's `_packed`): output rows in groups
of 16, one int32 lane per row, so a 64-byte load holds 4 code bytes of each of 16 rows and one
`dpbusd` (shardline/kernels/vnni.py: AVX512-VNNI `vpdpbusd`) multiplies them with 4
activation bytes broadcast to every lane; no horizontal sums. For group g and 32-value block b:

    codes [g, b, :]  uint8, word w = 0..3, 16 rows x 4 bytes each:
      nibble formats (Q5_0, Q5_1, Q4_K, Q5_K, Q6_K), bytes 0..255:
        byte 64 w + 4 r + i: low nibble = code[4w + i] & 15, high nibble = code[16 + 4w + i] & 15
      then the high bits, 16 rows x 4 bytes per word:
        Q5_0/Q5_1/Q5_K, bytes 256..319: byte i of row r: bit w = bit 4 of code[4w + i],
                                        bit 4 + w = bit 4 of code[16 + 4w + i]
        Q6_K, bytes 256..383: word 0 bits 2w..2w+1 = bits 4-5 of code[4w + i],
                              word 1 the same for code[16 + 4w + i]
      2-bit formats (Q2_K, Q3_K), bytes 0..127: the low 2 bits as Q6_K's high words; Q3_K
        then, bytes 128..191, its third bit as Q5's high word (at bit 2 of the code)
    hdr   int16 (fp16 bits) [g, h, 2, 16]: Q5_0/Q5_1 (d, m) per block (h = b); K-quants (d, dmin)
          per super-block (h = b // 8)
    sub   [g, b // 8, 16, 16] per super-block: Q4_K/Q5_K uint8 scales 0..7 then mins 0..7;
          Q6_K int8 scales; Q3_K int8 (six-bit scale - 32); Q2_K uint8 (scale | min << 4)

(A, B) per row: Q5_0 (d, -16 d), Q5_1 (d, m); Q4_K/Q5_K (d sc, -dmin m) per 32; Q6_K
(d sc, -32 d sc), Q3_K (d sc, -4 d sc), Q2_K (d (s & 15), -dmin (s >> 4)) per 16, the low and
high 16 values of a 32-block being the two sub-blocks of 16. The copy is the file's size
(Q5_0, Q5_1, Q2_K, Q6_K) or up to 4% larger (Q3_K 114 / 110, Q4_K 148 / 144, Q5_K 180 / 176
bytes per super-block); rows are padded to a multiple of 16 with zeros.

The kernels take the format as a tag (shardline/kernels/specialize.py), so a model compiles
the kernels of its own types only.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange
from numba.extending import overload

from .formats import FMT, QType, QuantizedWeight
from .reference import k4_scales, q3_scales, unsigned_codes
from .simd import vfma, vload, vmul, vsplat, vstore, vzero
from .specialize import code_of, tag
from .vnni import bload, dpbusd, iadd, iand, ibroadcast, iload, ior, isll, isplat, isrl, isub, izero, to_f32

ROWS = 16
QDOT_FORMATS = (FMT[QType.Q5_0], FMT[QType.Q5_1], FMT[QType.Q2_K], FMT[QType.Q3_K],
                FMT[QType.Q4_K], FMT[QType.Q5_K], FMT[QType.Q6_K])
CODE_BYTES = {5: 320, 6: 320, 7: 128, 8: 192, 9: 256, 10: 320, 11: 384}


# ---------------------------------------------------------------------------------------------
# Packing (NumPy, once per weight)
# ---------------------------------------------------------------------------------------------

def _rows_last(a: np.ndarray, groups: int) -> np.ndarray:
    """[groups * 16, ...] -> [groups, ..., 16]: rows of a group become the last axis."""
    a = a.reshape(groups, ROWS, *a.shape[1:])
    return np.ascontiguousarray(np.moveaxis(a, 1, -1))


def _words(bits: np.ndarray, shift: int) -> np.ndarray:
    """Per-word bit fields [rows, nb, 4 (w), 4 (i)] -> bytes [rows, nb, 4 (i)] with field w at
    bit shift * w (the layout of the high-bit and 2-bit words, module doc)."""
    out = np.zeros(bits.shape[:2] + (4,), np.uint8)
    for w in range(4):
        out |= (bits[:, :, w, :] << (shift * w)).astype(np.uint8)
    return out


def pack(w: QuantizedWeight):
    """(tag, codes, hdr, sub): w in the row-interleaved layout of the module doc, tag the
    format's tag (specialize.tag). Q5_0, Q5_1 and the K-quants only (others: ValueError)."""
    fmt = FMT.get(w.qtype, -1)
    if fmt not in QDOT_FORMATS:
        raise ValueError(f"qdot kernels: unsupported qtype {w.qtype.value}")
    out, k = w.shape
    groups, nb = -(-out // ROWS), k // 32
    pad = groups * ROWS - out
    code = np.pad(unsigned_codes(w), ((0, pad), (0, 0))).reshape(groups * ROWS, nb, 2, 4, 4)
    lo, hi = code[:, :, 0], code[:, :, 1]                          # [rows, nb, w, i]
    planes = []
    if fmt in (7, 8):
        planes += [_words(lo & 3, 2), _words(hi & 3, 2)]
        if fmt == 8:
            planes.append(_words((lo >> 2) & 1, 1) | _words((hi >> 2) & 1, 1) << 4)
    else:
        planes += [((lo[:, :, w] & 15) | ((hi[:, :, w] & 15) << 4)) for w in range(4)]
        if fmt == 11:
            planes += [_words(lo >> 4, 2), _words(hi >> 4, 2)]
        elif fmt != 9:
            planes.append(_words(lo >> 4, 1) | _words(hi >> 4, 1) << 4)
    # each plane [rows, nb, 4] -> [groups, nb, plane, 16 rows, 4] -> [groups, nb, bytes]
    codes = np.stack(planes, axis=2).reshape(groups, ROWS, nb, len(planes), 4)
    codes = np.ascontiguousarray(codes.transpose(0, 2, 3, 1, 4)).reshape(groups, nb, -1)
    assert codes.shape[2] == CODE_BYTES[fmt]
    blk = np.pad(np.asarray(w.data), ((0, pad), (0, 0)))
    if fmt in (5, 6):
        b = blk.reshape(groups * ROWS, nb, -1)
        hdr = np.stack([b[:, :, 0:2], b[:, :, 2:4] if fmt == 6 else np.zeros_like(b[:, :, 0:2])], axis=2)
        sub = np.zeros((1, 1, 1, ROWS), np.uint8)
    else:
        b = blk.reshape(groups * ROWS, nb // 8, -1)
        o_d, o_m = {7: (80, 82), 8: (108, None), 9: (0, 2), 10: (0, 2), 11: (208, None)}[fmt]
        dmin = b[:, :, o_m:o_m + 2] if o_m is not None else np.zeros_like(b[:, :, 0:2])
        hdr = np.stack([b[:, :, o_d:o_d + 2], dmin], axis=2)
        if fmt in (9, 10):
            sc, m = k4_scales(b[:, :, 4:16])
            sub = np.concatenate([sc, m], axis=2)
        elif fmt == 8:
            sub = q3_scales(b[:, :, 96:108]).astype(np.int8)
        elif fmt == 11:
            sub = b[:, :, 192:208].view(np.int8)
        else:
            sub = b[:, :, 0:16]
        sub = _rows_last(np.ascontiguousarray(sub), groups)
    hdr = _rows_last(np.ascontiguousarray(hdr).view(np.int16)[..., 0], groups)
    return tag(fmt), codes, hdr, sub


# ---------------------------------------------------------------------------------------------
# Per-format pieces, chosen at compile time
# ---------------------------------------------------------------------------------------------

@njit(inline="always")
def _nibbles(codes, base, w):
    v = iload(codes, base + 64 * w)
    m4 = isplat(0x0F0F0F0F)
    return iand(v, m4), iand(isrl(v, 4), m4)


@njit(inline="always")
def _with_high_bit(lo, hi, h, w, pos):
    """lo | bit w of each byte of h at bit pos, hi | bit 4 + w of h at bit pos (the high-bit
    words of Q5_0/Q5_1/Q5_K and Q3_K)."""
    m1 = isplat(0x01010101)
    return ior(lo, isll(iand(isrl(h, w), m1), pos)), ior(hi, isll(iand(isrl(h, 4 + w), m1), pos))


@njit(inline="always")
def _word_q5(codes, base, w):
    """Q5_0 / Q5_1 / Q5_K: nibbles | the high word's bits w and 4 + w at bit 4."""
    lo, hi = _nibbles(codes, base, w)
    return _with_high_bit(lo, hi, iload(codes, base + 256), w, 4)


@njit(inline="always")
def _word_q6(codes, base, w):
    """Q6_K: nibbles | two high bits from words 0 (low 16 values) and 1 (high 16)."""
    lo, hi = _nibbles(codes, base, w)
    m3 = isplat(0x03030303)
    h0 = iand(isrl(iload(codes, base + 256), 2 * w), m3)
    h1 = iand(isrl(iload(codes, base + 320), 2 * w), m3)
    return ior(lo, isll(h0, 4)), ior(hi, isll(h1, 4))


@njit(inline="always")
def _word_q2(codes, base, w):
    """Q2_K: the 2-bit codes from words 0 and 1."""
    m3 = isplat(0x03030303)
    return iand(isrl(iload(codes, base), 2 * w), m3), iand(isrl(iload(codes, base + 64), 2 * w), m3)


@njit(inline="always")
def _word_q3(codes, base, w):
    """Q3_K: the 2-bit codes | the third bit (bits w and 4 + w of word 2) at bit 2."""
    lo, hi = _word_q2(codes, base, w)
    return _with_high_bit(lo, hi, iload(codes, base + 128), w, 2)


@njit(inline="always")
def _scales_q5_0(hdr, sub, g, nb, b):
    a = vload(hdr, (g * nb + b) * 2 * ROWS)
    m = vmul(a, vsplat(np.float32(-16.0)))
    return a, m, a, m


@njit(inline="always")
def _scales_q5_1(hdr, sub, g, nb, b):
    o = (g * nb + b) * 2 * ROWS
    a = vload(hdr, o)
    m = vload(hdr, o + ROWS)
    return a, m, a, m


@njit(inline="always")
def _scales_k45(hdr, sub, g, nb, b):
    """Q4_K / Q5_K: sub-block b % 8 of super-block b // 8 (32 values)."""
    sb = g * (nb // 8) + b // 8
    d = vload(hdr, sb * 2 * ROWS)
    dmin = vload(hdr, sb * 2 * ROWS + ROWS)
    s = b % 8
    a = vmul(d, to_f32(bload(sub, (sb * 16 + s) * ROWS)))
    m = vmul(vmul(dmin, to_f32(bload(sub, (sb * 16 + 8 + s) * ROWS))), vsplat(np.float32(-1.0)))
    return a, m, a, m


@njit(inline="always")
def _scales_16(hdr, sub, g, nb, b, offset):
    """Q6_K (offset 32) / Q3_K (offset 4): sub-blocks 2 (b % 8) and 2 (b % 8) + 1 of 16
    values, value = d * sc * (code - offset)."""
    sb = g * (nb // 8) + b // 8
    d = vload(hdr, sb * 2 * ROWS)
    s = 2 * (b % 8)
    a0 = vmul(d, to_f32(bload(sub, (sb * 16 + s) * ROWS)))
    a1 = vmul(d, to_f32(bload(sub, (sb * 16 + s + 1) * ROWS)))
    neg = vsplat(np.float32(-offset))
    return a0, vmul(a0, neg), a1, vmul(a1, neg)


@njit(inline="always")
def _scales_q2(hdr, sub, g, nb, b):
    """Q2_K: per 16 values, scale byte & 15 times d, byte >> 4 times dmin."""
    sb = g * (nb // 8) + b // 8
    d = vload(hdr, sb * 2 * ROWS)
    dmin = vmul(vload(hdr, sb * 2 * ROWS + ROWS), vsplat(np.float32(-1.0)))
    s = 2 * (b % 8)
    m15 = isplat(15)
    s0 = bload(sub, (sb * 16 + s) * ROWS)
    s1 = bload(sub, (sb * 16 + s + 1) * ROWS)
    return (vmul(d, to_f32(iand(s0, m15))), vmul(dmin, to_f32(isrl(s0, 4))),
            vmul(d, to_f32(iand(s1, m15))), vmul(dmin, to_f32(isrl(s1, 4))))


def word(fmt, codes, base, w):
    """(lo, hi) int32x16: the codes of values 4w..4w+3 and 16+4w..16+4w+3 of a block, 16 rows."""
    raise NotImplementedError("compiled code only")


def scales(fmt, hdr, sub, g, nb, b):
    """(A_lo, B_lo, A_hi, B_hi) float32x16 of block b of group g (module doc)."""
    raise NotImplementedError("compiled code only")


@overload(word, inline="always")
def _word_overload(fmt, codes, base, w):
    f = {5: _word_q5, 6: _word_q5, 10: _word_q5, 9: _nibbles, 11: _word_q6, 7: _word_q2,
         8: _word_q3}[code_of(fmt)]
    return lambda fmt, codes, base, w: f(codes, base, w)


@overload(scales, inline="always")
def _scales_overload(fmt, hdr, sub, g, nb, b):
    f = code_of(fmt)
    if f == 11:
        return lambda fmt, hdr, sub, g, nb, b: _scales_16(hdr, sub, g, nb, b, 32)
    if f == 8:
        return lambda fmt, hdr, sub, g, nb, b: _scales_16(hdr, sub, g, nb, b, 4)
    fn = {5: _scales_q5_0, 6: _scales_q5_1, 9: _scales_k45, 10: _scales_k45, 7: _scales_q2}[f]
    return lambda fmt, hdr, sub, g, nb, b: fn(hdr, sub, g, nb, b)


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------

@njit(fastmath=True, cache=True)
def quantize_activations(x, xq, dx, xsf):
    """x float32 [n, k] as two int8 planes per block of 32: x ~= d * (254 q1 + q2) with
    d = max|x| / (127 * 254), q1 = round(x / (254 d)), q2 = round((x - 254 d q1) / d), both in
    -127..127 (|error| <= d / 2 = max|x| / 64516).
    xq int8 [n, k / 32, 2, 32] (q1 then q2 of each block), dx float32 [n, k / 32] (d),
    xsf float32 [n, k / 16] (d times the sum of 254 q1 + q2 over each 16 values)."""
    n, k = x.shape
    for t in range(n):
        for b in range(k // 32):
            amax = np.float32(0.0)
            for j in range(32):
                amax = max(amax, abs(x[t, b * 32 + j]))
            d1 = amax / np.float32(127.0)
            inv1 = np.float32(1.0) / d1 if amax > 0 else np.float32(0.0)
            d = d1 / np.float32(254.0)
            inv = np.float32(1.0) / d if amax > 0 else np.float32(0.0)
            for half in range(2):
                s = 0
                for j in range(16):
                    v = x[t, b * 32 + 16 * half + j]
                    q1 = np.int32(np.rint(v * inv1))
                    q2 = np.int32(np.rint((v - np.float32(q1) * d1) * inv))
                    q2 = min(127, max(-127, q2))
                    xq[t, b, 0, 16 * half + j] = q1
                    xq[t, b, 1, 16 * half + j] = q2
                    s += 254 * q1 + q2
                xsf[t, 2 * b + half] = d * np.float32(s)
            dx[t, b] = d


@njit(fastmath=True, cache=True)
def _store(y, t, r0, acc, tmp):
    """y[t, r0 : r0 + 16] = acc, clipped at y's last column."""
    out = y.shape[1]
    if r0 + ROWS <= out:
        vstore(y, t * out + r0, acc)
    else:
        vstore(tmp, 0, acc)
        for r in range(out - r0):
            y[t, r0 + r] = tmp[r]


@njit(inline="always")
def _combine(d1, d2):
    """254 * d1 + d2: the dot products of the two activation planes as one integer (|d1| <=
    32 * 63 * 127, so no overflow)."""
    return iadd(isub(isll(d1, 8), isll(d1, 1)), d2)


@njit(inline="always")
def _block_update(acc, dlo, dhi, alo, blo, ahi, bhi, dxb, xs_lo, xs_hi):
    """acc + dx * (A_lo dot_lo + A_hi dot_hi) + B_lo dx sum_lo + B_hi dx sum_hi."""
    d = vsplat(dxb)
    acc = vfma(vmul(to_f32(dlo), d), alo, acc)
    acc = vfma(vmul(to_f32(dhi), d), ahi, acc)
    acc = vfma(blo, vsplat(xs_lo), acc)
    return vfma(bhi, vsplat(xs_hi), acc)


@njit(fastmath=True, cache=True)
def _groups1(fmt, codes, hdr, sub, xq, dx, xsf, y, t, g0, g1):
    """One token t: y[t, rows of groups g0..g1) from the packed weight."""
    nb, cb = codes.shape[1], codes.shape[2]
    tmp = np.empty(ROWS, np.float32)
    for g in range(g0, g1):
        acc = vzero()
        for b in range(nb):
            base = (g * nb + b) * cb
            x0 = (t * nb + b) * 64
            dlo = izero()
            dhi = izero()
            rlo = izero()
            rhi = izero()
            for w in range(4):
                lo, hi = word(fmt, codes, base, w)
                dlo = dpbusd(dlo, lo, ibroadcast(xq, x0 + 4 * w))
                dhi = dpbusd(dhi, hi, ibroadcast(xq, x0 + 16 + 4 * w))
                rlo = dpbusd(rlo, lo, ibroadcast(xq, x0 + 32 + 4 * w))
                rhi = dpbusd(rhi, hi, ibroadcast(xq, x0 + 48 + 4 * w))
            alo, blo, ahi, bhi = scales(fmt, hdr, sub, g, nb, b)
            acc = _block_update(acc, _combine(dlo, rlo), _combine(dhi, rhi), alo, blo, ahi, bhi, dx[t, b],
                                xsf[t, 2 * b], xsf[t, 2 * b + 1])
        _store(y, t, g * ROWS, acc, tmp)


@njit(fastmath=True, cache=True)
def _groups4(fmt, codes, hdr, sub, xq, dx, xsf, y, t0, g0, g1):
    """Tokens t0..t0+3 share each decoded code word: y[t0:t0+4, rows of groups g0..g1)."""
    nb, cb = codes.shape[1], codes.shape[2]
    tmp = np.empty(ROWS, np.float32)
    for g in range(g0, g1):
        acc0 = vzero()
        acc1 = vzero()
        acc2 = vzero()
        acc3 = vzero()
        for b in range(nb):
            base = (g * nb + b) * cb
            x0 = (t0 * nb + b) * 64
            xs = nb * 64  # one token's blocks of xq
            l0 = izero()
            h0 = izero()
            l1 = izero()
            h1 = izero()
            l2 = izero()
            h2 = izero()
            l3 = izero()
            h3 = izero()
            m0 = izero()
            n0 = izero()
            m1 = izero()
            n1 = izero()
            m2 = izero()
            n2 = izero()
            m3 = izero()
            n3 = izero()
            for w in range(4):
                lo, hi = word(fmt, codes, base, w)
                i = x0 + 4 * w
                l0 = dpbusd(l0, lo, ibroadcast(xq, i))
                h0 = dpbusd(h0, hi, ibroadcast(xq, i + 16))
                m0 = dpbusd(m0, lo, ibroadcast(xq, i + 32))
                n0 = dpbusd(n0, hi, ibroadcast(xq, i + 48))
                l1 = dpbusd(l1, lo, ibroadcast(xq, i + xs))
                h1 = dpbusd(h1, hi, ibroadcast(xq, i + xs + 16))
                m1 = dpbusd(m1, lo, ibroadcast(xq, i + xs + 32))
                n1 = dpbusd(n1, hi, ibroadcast(xq, i + xs + 48))
                l2 = dpbusd(l2, lo, ibroadcast(xq, i + 2 * xs))
                h2 = dpbusd(h2, hi, ibroadcast(xq, i + 2 * xs + 16))
                m2 = dpbusd(m2, lo, ibroadcast(xq, i + 2 * xs + 32))
                n2 = dpbusd(n2, hi, ibroadcast(xq, i + 2 * xs + 48))
                l3 = dpbusd(l3, lo, ibroadcast(xq, i + 3 * xs))
                h3 = dpbusd(h3, hi, ibroadcast(xq, i + 3 * xs + 16))
                m3 = dpbusd(m3, lo, ibroadcast(xq, i + 3 * xs + 32))
                n3 = dpbusd(n3, hi, ibroadcast(xq, i + 3 * xs + 48))
            alo, blo, ahi, bhi = scales(fmt, hdr, sub, g, nb, b)
            acc0 = _block_update(acc0, _combine(l0, m0), _combine(h0, n0), alo, blo, ahi, bhi, dx[t0, b],
                                 xsf[t0, 2 * b], xsf[t0, 2 * b + 1])
            acc1 = _block_update(acc1, _combine(l1, m1), _combine(h1, n1), alo, blo, ahi, bhi, dx[t0 + 1, b],
                                 xsf[t0 + 1, 2 * b], xsf[t0 + 1, 2 * b + 1])
            acc2 = _block_update(acc2, _combine(l2, m2), _combine(h2, n2), alo, blo, ahi, bhi, dx[t0 + 2, b],
                                 xsf[t0 + 2, 2 * b], xsf[t0 + 2, 2 * b + 1])
            acc3 = _block_update(acc3, _combine(l3, m3), _combine(h3, n3), alo, blo, ahi, bhi, dx[t0 + 3, b],
                                 xsf[t0 + 3, 2 * b], xsf[t0 + 3, 2 * b + 1])
        _store(y, t0, g * ROWS, acc0, tmp)
        _store(y, t0 + 1, g * ROWS, acc1, tmp)
        _store(y, t0 + 2, g * ROWS, acc2, tmp)
        _store(y, t0 + 3, g * ROWS, acc3, tmp)


@njit(fastmath=True, cache=True)
def _run_groups(fmt, codes, hdr, sub, xq, dx, xsf, y, g0, g1):
    """All tokens over groups g0..g1: four at a time, the rest one by one."""
    n = xq.shape[0]
    t = 0
    while t + 4 <= n:
        _groups4(fmt, codes, hdr, sub, xq, dx, xsf, y, t, g0, g1)
        t += 4
    while t < n:
        _groups1(fmt, codes, hdr, sub, xq, dx, xsf, y, t, g0, g1)
        t += 1


@njit(fastmath=True, cache=True)
def qdot_serial(fmt, codes, hdr, sub, x, y):
    """y float32 [n, out] = x float32 [n, k] @ W.T on one thread (W packed by `pack`)."""
    n, k = x.shape
    xq = np.empty((n, k // 32, 2, 32), np.int8)
    dx = np.empty((n, k // 32), np.float32)
    xsf = np.empty((n, k // 16), np.float32)
    quantize_activations(x, xq, dx, xsf)
    _run_groups(fmt, codes, hdr, sub, xq, dx, xsf, y, 0, codes.shape[0])


@njit(parallel=True, fastmath=True, cache=True)
def qdot_parallel(fmt, codes, hdr, sub, x, y, nchunk):
    """As `qdot_serial`, the row groups split into `nchunk` chunks over Numba's threads."""
    n, k = x.shape
    xq = np.empty((n, k // 32, 2, 32), np.int8)
    dx = np.empty((n, k // 32), np.float32)
    xsf = np.empty((n, k // 16), np.float32)
    quantize_activations(x, xq, dx, xsf)
    groups = codes.shape[0]
    per = (groups + nchunk - 1) // nchunk
    for c in prange(nchunk):
        _run_groups(fmt, codes, hdr, sub, xq, dx, xsf, y, min(groups, c * per), min(groups, (c + 1) * per))


@njit(fastmath=True, cache=True)
def _dequant_rows(fmt, codes, hdr, sub, r0, out):
    """out float32 [n, k] = rows r0 .. r0 + n of the packed weight, value = A * code + B (the
    kernels' A and B, so exactly the values they multiply)."""
    nb, cb = codes.shape[1], codes.shape[2]
    n = out.shape[0]
    tile = np.empty((32, ROWS), np.float32)  # [value of the block, row of the group]
    m255 = isplat(255)
    for g in range(r0 // ROWS, (r0 + n + ROWS - 1) // ROWS):
        lo_row = max(r0, g * ROWS)
        hi_row = min(r0 + n, (g + 1) * ROWS)
        for b in range(nb):
            base = (g * nb + b) * cb
            alo, blo, ahi, bhi = scales(fmt, hdr, sub, g, nb, b)
            for w in range(4):
                lo, hi = word(fmt, codes, base, w)
                for i in range(4):
                    vstore(tile, (4 * w + i) * ROWS, vfma(to_f32(iand(isrl(lo, 8 * i), m255)), alo, blo))
                    vstore(tile, (16 + 4 * w + i) * ROWS, vfma(to_f32(iand(isrl(hi, 8 * i), m255)), ahi, bhi))
            for r in range(lo_row, hi_row):
                dst = out[r - r0, b * 32:b * 32 + 32]
                for j in range(32):
                    dst[j] = tile[j, r - g * ROWS]


@njit(parallel=True, cache=True)
def _dequant_parallel(fmt, codes, hdr, sub, r0, out, nchunk):
    n = out.shape[0]
    per = -(-n // (nchunk * ROWS)) * ROWS  # whole groups per chunk when r0 is group-aligned
    for c in prange(nchunk):
        a = min(n, c * per)
        b = min(n, (c + 1) * per)
        if a < b:
            _dequant_rows(fmt, codes, hdr, sub, r0 + a, out[a:b])


def dequantize(p, r0: int, out: np.ndarray) -> np.ndarray:
    """out float32 [n, in] = rows r0 .. r0 + n of the weight packed as p = pack(W)."""
    fmt, codes, hdr, sub = p
    threads = numba.get_num_threads()
    if threads == 1 or out.shape[0] < 4 * ROWS * threads:
        _dequant_rows(fmt, codes, hdr, sub, r0, out)
    else:
        _dequant_parallel(fmt, codes, hdr, sub, r0, out, 4 * threads)
    return out


def matmul(p, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """y float32 [n, out] = x float32 [n, in] @ W.T with p = pack(W): one thread, or Numba's
    threads when the weight has >= 4 row groups per thread."""
    fmt, codes, hdr, sub = p
    threads = numba.get_num_threads()
    groups = codes.shape[0]
    if threads == 1 or groups < 4 * threads:
        qdot_serial(fmt, codes, hdr, sub, x, y)
    else:
        qdot_parallel(fmt, codes, hdr, sub, x, y, min(groups, 4 * threads))
    return y
