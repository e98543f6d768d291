"""NumPy encoders for the GGML block formats: float32 rows -> the bytes a GGUF file holds.

Layouts as in shardline/kernels/formats.py (from ggml's `ggml-common.h`). Q8_0, Q4_0, Q4_1,
Q5_0 and Q5_1 follow ggml's reference quantizers (`quantize_row_*_ref` in `ggml-quants.c`)
rounding for rounding, so their output equals the file ggml writes. The K-quants are our own,
simpler than ggml's (which searches each sub-block's scale and min for the least weighted
squared error): per sub-block the range is covered exactly, and every quantized scale is
rounded *up* (the fp16 super-block scales to the next fp16, the small integer scales by
ceil), so no code ever clips and each value is within half a step of its sub-block:

    |w - dequant(w)| <= d * sc / 2  (per sub-block, plus float32 rounding), where
    d * sc <= step + d,  step = (max - min) / nmax  (affine types: min = min(0, min w),
    widened by at most dmin) or max|w| / nmax (symmetric types)

That is all the tests and the end-to-end file rewrite need; the kernels never depend on how a
block was chosen.
"""
from __future__ import annotations

import numpy as np

QK = 32
QK_K = 256


def _f16_up(v: np.ndarray) -> np.ndarray:
    """Smallest fp16 >= v (v >= 0, finite, below 65504), as float16."""
    h = v.astype(np.float16)
    low = h.astype(np.float32) < v
    h[low] = np.nextafter(h[low], np.float16(np.inf))
    return h


def _half_bytes(h: np.ndarray) -> np.ndarray:
    """float16 [...] -> uint8 [..., 2] little-endian."""
    return np.ascontiguousarray(h.astype(np.float16)).view(np.uint8).reshape(*h.shape, 2)


def _inv(d: np.ndarray) -> np.ndarray:
    """1 / d where d != 0, else 0 (float32)."""
    with np.errstate(divide="ignore"):
        return np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)


def _nibbles32(q: np.ndarray) -> np.ndarray:
    """uint8 codes [..., 32] -> [..., 16]: byte j = low nibble of value j | value j+16 << 4."""
    return (q[..., :16] & 0x0F) | ((q[..., 16:] & 0x0F) << 4)


def _round_away(v: np.ndarray) -> np.ndarray:
    """C's roundf: halves away from zero."""
    return np.sign(v) * np.floor(np.abs(v) + np.float32(0.5))


def _signed_max(b: np.ndarray) -> np.ndarray:
    """The value of largest magnitude of each block (its sign kept): [..., n] -> [..., 1]."""
    return np.take_along_axis(b, np.abs(b).argmax(axis=-1)[..., None], axis=-1)


def _q8_0(b):  # b: float32 [rows, nb, 32]
    d = np.abs(b).max(axis=-1, keepdims=True) / np.float32(127)
    qs = _round_away(b * _inv(d)).astype(np.int8).view(np.uint8)
    return [_half_bytes(d[..., 0]), qs]


def _q4_0(b):
    d = _signed_max(b) / np.float32(-8)
    q = np.minimum(15, np.trunc(b * _inv(d) + np.float32(8.5))).astype(np.uint8)
    return [_half_bytes(d[..., 0]), _nibbles32(q)]


def _q4_1(b):
    lo, hi = b.min(axis=-1, keepdims=True), b.max(axis=-1, keepdims=True)
    d = (hi - lo) / np.float32(15)
    q = np.minimum(15, np.trunc((b - lo) * _inv(d) + np.float32(0.5))).astype(np.uint8)
    return [_half_bytes(d[..., 0]), _half_bytes(lo[..., 0]), _nibbles32(q)]


def _qh32(q):
    """Fifth bits of 32 codes as the little-endian uint32 qh: uint8 [..., 4]."""
    return np.packbits((q >> 4) & 1, axis=-1, bitorder="little")


def _q5_0(b):
    d = _signed_max(b) / np.float32(-16)
    q = np.minimum(31, np.trunc(b * _inv(d) + np.float32(16.5))).astype(np.uint8)
    return [_half_bytes(d[..., 0]), _qh32(q), _nibbles32(q)]


def _q5_1(b):
    lo, hi = b.min(axis=-1, keepdims=True), b.max(axis=-1, keepdims=True)
    d = (hi - lo) / np.float32(31)
    q = np.minimum(31, np.trunc((b - lo) * _inv(d) + np.float32(0.5))).astype(np.uint8)
    return [_half_bytes(d[..., 0]), _half_bytes(lo[..., 0]), _qh32(q), _nibbles32(q)]


def _affine_superblock(x, nmax: int, smax: int):
    """Sub-block scales and mins of the affine K-quants, x: float32 [rows, nsb, nsub, n].

    Returns (d, dmin float16 [rows, nsb], sc, mn int [rows, nsb, nsub], q uint8 codes like x)
    with value = d * sc * q - dmin * mn, q in 0..nmax, sc and mn in 0..smax, no code clipped."""
    neg = np.maximum(0, -x.min(axis=-1))                         # -min(0, min x) >= 0
    dmin = _f16_up(neg.max(axis=-1) / np.float32(smax))          # [rows, nsb]
    dminf = dmin.astype(np.float32)[..., None]
    mn = np.minimum(smax, np.ceil(neg * _inv(dminf)))            # offset dmin*mn >= -min x
    off = dminf * mn                                             # [rows, nsb, nsub]
    step = (x.max(axis=-1) + off) / np.float32(nmax)             # covers [-off, max]
    step = np.maximum(step, 0)
    d = _f16_up(step.max(axis=-1) / np.float32(smax))
    df = d.astype(np.float32)[..., None]
    sc = np.minimum(smax, np.ceil(step * _inv(df)))
    s = df * sc
    q = np.clip(np.rint((x + off[..., None]) * _inv(s)[..., None]), 0, nmax).astype(np.uint8)
    return d, dmin, sc.astype(np.uint8), mn.astype(np.uint8), q


def _symmetric_superblock(x, qmax: int, smax: int):
    """Sub-block scales of the symmetric K-quants (Q3_K, Q6_K), x: float32 [rows, nsb, nsub, n]:
    (d float16 [rows, nsb], sc int [rows, nsb, nsub] in 0..smax, q int codes in -qmax..qmax)."""
    step = np.abs(x).max(axis=-1) / np.float32(qmax)
    d = _f16_up(step.max(axis=-1) / np.float32(smax))
    df = d.astype(np.float32)[..., None]
    sc = np.minimum(smax, np.ceil(step * _inv(df)))
    q = np.clip(np.rint(x * _inv(df * sc)[..., None]), -qmax, qmax).astype(np.int16)
    return d, sc.astype(np.int16), q


def _k4_scales(sc, mn):
    """Eight 6-bit scales and mins [rows, nsb, 8] -> the 12 packed bytes (`get_scale_min_k4`)."""
    out = np.zeros((*sc.shape[:-1], 12), np.uint8)
    out[..., 0:4] = (sc[..., :4] & 63) | ((sc[..., 4:] >> 4) << 6)
    out[..., 4:8] = (mn[..., :4] & 63) | ((mn[..., 4:] >> 4) << 6)
    out[..., 8:12] = (sc[..., 4:] & 15) | ((mn[..., 4:] & 15) << 4)
    return out


def _q4_k(x):  # x: [rows, nsb, 256]
    d, dmin, sc, mn, q = _affine_superblock(x.reshape(*x.shape[:2], 8, 32), 15, 63)
    q = q.reshape(*x.shape[:2], 4, 2, 32)                        # runs of 64: low, high nibbles
    qs = (q[..., 0, :] | (q[..., 1, :] << 4)).reshape(*x.shape[:2], 128)
    return [_half_bytes(d), _half_bytes(dmin), _k4_scales(sc, mn), qs]


def _q5_k(x):
    d, dmin, sc, mn, q = _affine_superblock(x.reshape(*x.shape[:2], 8, 32), 31, 63)
    qh = np.zeros((*x.shape[:2], 32), np.uint8)
    for s in range(8):                                           # bit s of qh[l]: value 32 s + l
        qh |= ((q[..., s, :] >> 4) & 1) << s
    q = (q & 15).reshape(*x.shape[:2], 4, 2, 32)
    qs = (q[..., 0, :] | (q[..., 1, :] << 4)).reshape(*x.shape[:2], 128)
    return [_half_bytes(d), _half_bytes(dmin), _k4_scales(sc, mn), qh, qs]


def _q6_k(x):
    d, sc, q = _symmetric_superblock(x.reshape(*x.shape[:2], 16, 16), 31, 127)
    u = (q + 32).astype(np.uint8).reshape(*x.shape[:2], 2, 4, 32)  # [half, quarter, l]
    ql = np.concatenate([(u[..., 0, :] & 15) | ((u[..., 2, :] & 15) << 4),
                         (u[..., 1, :] & 15) | ((u[..., 3, :] & 15) << 4)], axis=-1)  # [.., 2, 64]
    qh = ((u[..., 0, :] >> 4) | ((u[..., 1, :] >> 4) << 2) | ((u[..., 2, :] >> 4) << 4)
          | ((u[..., 3, :] >> 4) << 6))                                                # [.., 2, 32]
    return [ql.reshape(*x.shape[:2], 128), qh.reshape(*x.shape[:2], 64),
            sc.astype(np.int8).view(np.uint8), _half_bytes(d)]


def _two_bit_planes(q):
    """2-bit codes [rows, nsb, 256] -> qs [rows, nsb, 64]: value 128h + 32j + l at bits 2j of
    qs[32h + l] (Q2_K and Q3_K)."""
    q = q.reshape(*q.shape[:2], 2, 4, 32)
    qs = q[..., 0, :] | (q[..., 1, :] << 2) | (q[..., 2, :] << 4) | (q[..., 3, :] << 6)
    return qs.reshape(*q.shape[:2], 64)


def _q3_k(x):
    d, sc, q = _symmetric_superblock(x.reshape(*x.shape[:2], 16, 16), 3, 31)
    q = (q + 4).astype(np.uint8).reshape(*x.shape[:2], 256)     # 0..7: bit 2 is the hmask bit
    hb = (q >> 2).reshape(*x.shape[:2], 8, 32)                   # [4h + j, l]
    hmask = np.zeros((*x.shape[:2], 32), np.uint8)
    for i in range(8):
        hmask |= hb[..., i, :] << i
    s = (sc + 32).astype(np.uint8)                               # [rows, nsb, 16], 6 bits
    scales = np.zeros((*x.shape[:2], 12), np.uint8)
    scales[..., 0:8] = (s[..., 0:8] & 15) | ((s[..., 8:16] & 15) << 4)
    for k in range(4):
        scales[..., 8:12] |= ((s[..., 4 * k:4 * k + 4] >> 4) & 3) << (2 * k)
    return [hmask, _two_bit_planes(q & 3), scales, _half_bytes(d)]


def _q2_k(x):
    d, dmin, sc, mn, q = _affine_superblock(x.reshape(*x.shape[:2], 16, 16), 3, 15)
    return [sc | (mn << 4), _two_bit_planes(q.reshape(*x.shape[:2], 256)), _half_bytes(d),
            _half_bytes(dmin)]


_ENCODERS = {"Q8_0": (QK, _q8_0), "Q4_0": (QK, _q4_0), "Q4_1": (QK, _q4_1), "Q5_0": (QK, _q5_0),
             "Q5_1": (QK, _q5_1), "Q2_K": (QK_K, _q2_k), "Q3_K": (QK_K, _q3_k),
             "Q4_K": (QK_K, _q4_k), "Q5_K": (QK_K, _q5_k), "Q6_K": (QK_K, _q6_k)}
GGML_TYPES = tuple(_ENCODERS)


def quantize_rows(w: np.ndarray, ggml_type: str) -> np.ndarray:
    """Encode float rows as GGML blocks.

    w: float32 [rows, k] (k a multiple of the type's block size: 32, or 256 for the K-quants;
    finite, |w| well below 65504 * the type's largest code so the fp16 scales stay finite).
    ggml_type: "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K".
    Returns uint8 [rows, k / block * block_bytes], the rows as a GGUF file stores them.
    Raises ValueError for another type or a k that is not a multiple of the block size.
    """
    if ggml_type not in _ENCODERS:
        raise ValueError(f"quantize_rows: no encoder for {ggml_type}; expected one of {GGML_TYPES}")
    n, enc = _ENCODERS[ggml_type]
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2 or w.shape[1] % n:
        raise ValueError(f"{ggml_type}: rows must be [rows, k] with k a multiple of {n}, got {w.shape}")
    rows = w.shape[0]
    parts = enc(w.reshape(rows, w.shape[1] // n, n))
    return np.ascontiguousarray(np.concatenate(parts, axis=-1).reshape(rows, -1))
