"""NumPy reference dequantizers and matmul: the ground truth every kernel is tested against.

Written from ggml's `dequantize_row_*` and `get_scale_min_k4` (ggml-quants.c) with the block
layouts of shardline/kernels/formats.py; tests check them against `gguf.quants.dequantize`, an
independent implementation.
"""
from __future__ import annotations

import numpy as np

from .formats import GGML_BLOCK, QType, QuantizedWeight, unpack_nibbles


def _blocks(w: QuantizedWeight) -> np.ndarray:
    """GGML packed rows uint8 [out, row_bytes] -> [out, n_blocks, bytes_per_block]."""
    n, b = GGML_BLOCK[w.qtype]
    return np.asarray(w.data).reshape(w.out_features, w.in_features // n, b)


def _f16(b: np.ndarray) -> np.ndarray:
    """uint8 [..., 2] little-endian fp16 bytes -> float32 [...]."""
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


def dequantize_ref(w: QuantizedWeight) -> np.ndarray:
    """Weight -> float32 [out_features, in_features] (ggml semantics, see formats.py)."""
    out, inf = w.shape
    q = w.qtype
    if q is QType.F32:
        return np.asarray(w.data, dtype=np.float32)
    if q is QType.F16:
        return np.asarray(w.data).astype(np.float32)
    if q is QType.BF16:
        return (np.asarray(w.data).astype(np.uint32) << 16).view(np.float32)
    if q is QType.Q8_0:
        blk = _blocks(w)
        d = _f16(blk[:, :, 0:2])
        qs = blk[:, :, 2:].view(np.int8).astype(np.float32)
        return (qs * d[..., None]).reshape(out, inf)
    if q in (QType.Q4_0, QType.Q4_1):
        blk = _blocks(w)
        d = _f16(blk[:, :, 0:2])
        off = 2 if q is QType.Q4_0 else 4
        qs = blk[:, :, off:]                                     # [out, nb, 16]
        nib = np.concatenate([qs & 0x0F, qs >> 4], axis=2).astype(np.float32)  # [out, nb, 32]
        if q is QType.Q4_0:
            return ((nib - 8.0) * d[..., None]).reshape(out, inf)
        m = _f16(blk[:, :, 2:4])
        return (nib * d[..., None] + m[..., None]).reshape(out, inf)
    if q in (QType.Q5_0, QType.Q5_1):
        blk = _blocks(w)
        d = _f16(blk[:, :, 0:2])
        codes = unsigned_codes(w).reshape(out, -1, 32).astype(np.float32)
        if q is QType.Q5_0:
            return ((codes - 16.0) * d[..., None]).reshape(out, inf)
        m = _f16(blk[:, :, 2:4])
        return (codes * d[..., None] + m[..., None]).reshape(out, inf)
    if q in _K_DEQUANT:
        return _K_DEQUANT[q](_blocks(w)).reshape(out, inf)
    if q in (QType.INT8, QType.INT4):
        g = w.group_size
        codes = (np.asarray(w.data).astype(np.float32) if q is QType.INT8
                 else unpack_nibbles(np.asarray(w.data)).astype(np.float32))
        if q is QType.INT4 and w.symmetric:
            codes -= 8.0
        v = codes.reshape(out, inf // g, g) * w.scales[..., None]
        if not w.symmetric:
            v += w.mins[..., None]
        return v.reshape(out, inf).astype(np.float32)
    raise ValueError(f"dequantize_ref: unsupported qtype {q.value}")


def k4_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 scale bytes uint8 [..., 12] -> (sc, m) uint8 [..., 8], six bits each
    (ggml's `get_scale_min_k4`: sub-blocks 0..3 in the low 6 bits of bytes 0..3 / 4..7,
    sub-blocks 4..7 split into bytes 8..11's nibbles and the top 2 bits of bytes 0..3 / 4..7)."""
    a, b, c = scales[..., 0:4], scales[..., 4:8], scales[..., 8:12]
    sc = np.concatenate([a & 63, (c & 15) | ((a >> 6) << 4)], axis=-1)
    m = np.concatenate([b & 63, (c >> 4) | ((b >> 6) << 4)], axis=-1)
    return sc, m


def q3_scales(scales: np.ndarray) -> np.ndarray:
    """Q3_K's 12 scale bytes uint8 [..., 12] -> the 16 signed sub-block scales int [..., 16]
    (6 bits minus 32: low 4 bits in bytes 0..7's nibbles, high 2 bits in bytes 8..11)."""
    s = np.arange(16)
    low = (scales[..., s % 8] >> (4 * (s // 8))) & 15
    high = (scales[..., 8 + s % 4] >> (2 * (s // 4))) & 3
    return (low | (high << 4)).astype(np.int32) - 32


def _two_bit_codes(qs: np.ndarray) -> np.ndarray:
    """Q2_K/Q3_K low bits: qs uint8 [..., 64] -> codes [..., 256], value 128h + 32j + l at bits
    2j..2j+1 of qs[32h + l]."""
    planes = qs.reshape(*qs.shape[:-1], 2, 1, 32) >> (2 * np.arange(4, dtype=np.uint8))[:, None]
    return (planes & 3).reshape(*qs.shape[:-1], 256)


def _codes_q2_k(blk):
    return _two_bit_codes(blk[..., 16:80])


def _codes_q3_k(blk):  # low 2 bits | hmask bit << 2: 0..7, value offset 4
    low = _two_bit_codes(blk[..., 32:96]).reshape(*blk.shape[:2], 8, 32)
    hbit = (blk[..., None, 0:32] >> np.arange(8, dtype=np.uint8)[:, None]) & 1     # [.., 8, 32]
    return (low | (hbit << 2)).reshape(*blk.shape[:2], 256)


def _codes_q4_k(blk):
    return _q4_k_nibbles(blk[..., 16:144]).reshape(*blk.shape[:2], 256)


def _codes_q5_k(blk):
    high = (blk[..., None, 16:48] >> np.arange(8, dtype=np.uint8)[:, None]) & 1   # [.., 8, 32]
    return (_q4_k_nibbles(blk[..., 48:176]) | (high << 4)).reshape(*blk.shape[:2], 256)


def _codes_q6_k(blk):  # 0..63, value offset 32
    ql = blk[..., 0:128].reshape(*blk.shape[:2], 2, 2, 32)      # [half, run, l]
    qh = blk[..., 128:192].reshape(*blk.shape[:2], 2, 1, 32)
    low = np.stack([ql[..., 0, :] & 15, ql[..., 1, :] & 15, ql[..., 0, :] >> 4, ql[..., 1, :] >> 4],
                   axis=-2)                                         # [half, quarter, l]
    high = (qh >> (2 * np.arange(4, dtype=np.uint8))[:, None]) & 3
    return (low | (high << 4)).reshape(*blk.shape[:2], 256)


def _codes_q5(blk, off):  # Q5_0 (off 2) / Q5_1 (off 4): nibble | qh bit << 4
    qh = np.ascontiguousarray(blk[:, :, off:off + 4]).view("<u4")            # [out, nb, 1]
    high = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)     # [out, nb, 32]
    qs = blk[:, :, off + 4:]
    return np.concatenate([qs & 0x0F, qs >> 4], axis=2) | (high << 4)


def unsigned_codes(w: QuantizedWeight) -> np.ndarray:
    """The integer code of every value of a Q5_0, Q5_1 or K-quant weight, as stored: uint8
    [out_features, in_features], 0..31 (Q5_*, Q5_K), 0..3 (Q2_K), 0..7 (Q3_K: low bits | hmask
    bit << 2, value d*sc*(code - 4)), 0..15 (Q4_K), 0..63 (Q6_K, value d*sc*(code - 32))."""
    blk = _blocks(w)
    if w.qtype in (QType.Q5_0, QType.Q5_1):
        return _codes_q5(blk, 2 if w.qtype is QType.Q5_0 else 4).reshape(w.shape)
    fn = {QType.Q2_K: _codes_q2_k, QType.Q3_K: _codes_q3_k, QType.Q4_K: _codes_q4_k,
          QType.Q5_K: _codes_q5_k, QType.Q6_K: _codes_q6_k}[w.qtype]
    return fn(blk).reshape(w.shape)


def _dequant_q2_k(blk):  # [out, nsb, 84]
    sc = blk[..., 0:16]
    d, dmin = _f16(blk[..., 80:82]), _f16(blk[..., 82:84])
    q = _codes_q2_k(blk).reshape(*blk.shape[:2], 16, 16).astype(np.float32)
    a = d[..., None] * (sc & 15).astype(np.float32)
    b = dmin[..., None] * (sc >> 4).astype(np.float32)
    return a[..., None] * q - b[..., None]


def _dequant_q3_k(blk):  # [out, nsb, 110]
    d = _f16(blk[..., 108:110])
    q = _codes_q3_k(blk).astype(np.int32).reshape(*blk.shape[:2], 16, 16) - 4
    a = d[..., None] * q3_scales(blk[..., 96:108]).astype(np.float32)
    return a[..., None] * q.astype(np.float32)


def _q4_k_nibbles(qs):
    """Q4_K/Q5_K qs uint8 [..., 128] -> low 4 bits of the 256 values [..., 8, 32]."""
    r = qs.reshape(*qs.shape[:-1], 4, 1, 32) >> np.array([0, 4], np.uint8)[:, None]
    return (r & 15).reshape(*qs.shape[:-1], 8, 32)


def _dequant_q4_k(blk):  # [out, nsb, 144]
    d, dmin = _f16(blk[..., 0:2]), _f16(blk[..., 2:4])
    sc, m = k4_scales(blk[..., 4:16])
    q = _codes_q4_k(blk).reshape(*blk.shape[:2], 8, 32).astype(np.float32)
    return (d[..., None] * sc)[..., None] * q - (dmin[..., None] * m)[..., None]


def _dequant_q5_k(blk):  # [out, nsb, 176]
    d, dmin = _f16(blk[..., 0:2]), _f16(blk[..., 2:4])
    sc, m = k4_scales(blk[..., 4:16])
    q = _codes_q5_k(blk).reshape(*blk.shape[:2], 8, 32).astype(np.float32)
    return (d[..., None] * sc)[..., None] * q - (dmin[..., None] * m)[..., None]


def _dequant_q6_k(blk):  # [out, nsb, 210]
    q = _codes_q6_k(blk).astype(np.float32) - 32.0
    sc = blk[..., 192:208].view(np.int8).astype(np.float32)
    d = _f16(blk[..., 208:210])
    return (d[..., None] * sc)[..., None] * q.reshape(*blk.shape[:2], 16, 16)


_K_DEQUANT = {QType.Q2_K: _dequant_q2_k, QType.Q3_K: _dequant_q3_k, QType.Q4_K: _dequant_q4_k,
              QType.Q5_K: _dequant_q5_k, QType.Q6_K: _dequant_q6_k}


def matmul_ref(x: np.ndarray, w: QuantizedWeight) -> np.ndarray:
    """y = x @ W.T in float64, returned as float32.

    x: float32 [n_tokens, in_features]; returns float32 [n_tokens, out_features].
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != w.in_features:
        raise ValueError(f"matmul_ref: x shape {x.shape} does not match weight {w.shape}")
    return (x.astype(np.float64) @ dequantize_ref(w).astype(np.float64).T).astype(np.float32)
