"""NumPy reference dequantizers and matmul: the ground truth every kernel is tested against.

Written from ggml's `dequantize_row_q8_0/q4_0/q4_1` (ggml-quants.c); tests check them against
`gguf.quants.dequantize`, an independent implementation. Q4_K/Q6_K reuse gguf's dequantizers.
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
    if q in (QType.Q4_K, QType.Q6_K):
        import gguf
        t = gguf.GGMLQuantizationType[q.name]
        return gguf.quants.dequantize(np.asarray(w.data), t).reshape(out, inf).astype(np.float32)
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


def matmul_ref(x: np.ndarray, w: QuantizedWeight) -> np.ndarray:
    """y = x @ W.T in float64, returned as float32.

    x: float32 [n_tokens, in_features]; returns float32 [n_tokens, out_features].
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != w.in_features:
        raise ValueError(f"matmul_ref: x shape {x.shape} does not match weight {w.shape}")
    return (x.astype(np.float64) @ dequantize_ref(w).astype(np.float64).T).astype(np.float32)
