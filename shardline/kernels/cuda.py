"""Numba CUDA kernels for the same formats (import lazily: `kernels` imports without CUDA).

    gemv:     decode. One thread block per output row; its TPB threads stride over the row's
              32-value quant blocks, each keeping one partial sum per token (n_tokens <= 8), then
              a shared-memory tree reduction (no warp shuffles, so NUMBA_ENABLE_CUDASIM runs it).
    gemm:     prefill. 16x16 output tiles (tokens x rows); per 32-wide k step each thread loads
              2 activations and dequantizes 2 weights into shared memory, then 32 FMAs.
    dequant:  packed -> float32 [out, in], for dequantize + torch bf16 GEMM at many tokens.

Value decoding follows ggml-quants.c (`dequantize_row_*`, `get_scale_min_k4`; layouts in
formats.py), one element at a time: every GGML block type (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K..Q6_K)
and int8/int4. fp16 scales via a 65536-entry float32 table in device memory. This module depends
on formats.py alone; dispatch.py chooses between its kernels. Kernels run on torch's current stream (`cuda.external_stream`) over
zero-copy views of torch tensors (`cuda.as_cuda_array`). Under the simulator both are missing,
so tensors (on the CPU there) are passed as NumPy views and the default stream is used.
"""
from __future__ import annotations

import math
import weakref

import numpy as np
import torch
from numba import cuda, float32, int32

from .formats import F16_LUT, FMT, QuantizedWeight

SIM = not hasattr(cuda, "external_stream")  # the simulator lacks it (numba 0.68)
TPB = 32 if SIM else 128  # GEMV threads per block (power of two for the tree reduction);
#                          small under the simulator, which runs each thread as a Python thread
MAX_TOK = 8      # GEMV tokens per launch (partial sums kept in registers/local memory)
TILE = 16        # GEMM output tile edge
DEQ_TPB = 64 if SIM else 256

_dev_cache: "weakref.WeakKeyDictionary[QuantizedWeight, dict]" = weakref.WeakKeyDictionary()


@cuda.jit(device=True, inline=True)
def _f16(data, r, o, lut):
    return lut[int32(data[r, o]) | (int32(data[r, o + 1]) << 8)]


@cuda.jit(device=True, inline=True)
def _scale_min_k4(s, data, r, o):
    """Six-bit (scale, min) of Q4_K/Q5_K sub-block s from the 12 scale bytes at data[r, o:]."""
    if s < 4:
        return int32(data[r, o + s]) & 63, int32(data[r, o + s + 4]) & 63
    return ((int32(data[r, o + s + 4]) & 15) | ((int32(data[r, o + s - 4]) >> 6) << 4),
            (int32(data[r, o + s + 4]) >> 4) | ((int32(data[r, o + s]) >> 6) << 4))


@cuda.jit(device=True)
def _value_k(fmt, data, lut, r, k):
    """W[r, k] of a K-quant row (fmt 7..11, see formats.FMT) as float32."""
    sb = k // 256
    i = k % 256
    if fmt == 9 or fmt == 10:  # Q4_K / Q5_K: sub-blocks of 32, runs of 32 bytes (low, high)
        o = sb * (144 if fmt == 9 else 176)
        s = i // 32
        l = i % 32
        byte = int32(data[r, o + (16 if fmt == 9 else 48) + 32 * (s // 2) + l])
        q = (byte & 15) if s % 2 == 0 else (byte >> 4)
        if fmt == 10:
            q |= ((int32(data[r, o + 16 + l]) >> s) & 1) << 4
        sc, m = _scale_min_k4(s, data, r, o + 4)
        return _f16(data, r, o, lut) * float32(sc) * float32(q) - _f16(data, r, o + 2, lut) * float32(m)
    if fmt == 11:  # Q6_K
        o = sb * 210
        half = i // 128
        quarter = (i % 128) // 32
        l = i % 32
        byte = int32(data[r, o + 64 * half + 32 * (quarter % 2) + l])
        q = (byte & 15) if quarter < 2 else (byte >> 4)
        q |= ((int32(data[r, o + 128 + 32 * half + l]) >> (2 * quarter)) & 3) << 4
        sc = int32(data[r, o + 192 + i // 16])
        sc -= (sc & 128) << 1
        return _f16(data, r, o + 208, lut) * float32(sc) * float32(q - 32)
    # Q2_K (7) / Q3_K (8): sub-blocks of 16; 2-bit planes, value 128 half + 32 j + l
    o = sb * (84 if fmt == 7 else 110)
    half = i // 128
    j = (i % 128) // 32
    l = i % 32
    s = i // 16
    q = (int32(data[r, o + (16 if fmt == 7 else 32) + 32 * half + l]) >> (2 * j)) & 3
    if fmt == 7:
        sc = int32(data[r, o + s])
        return (_f16(data, r, o + 80, lut) * float32(sc & 15) * float32(q)
                - _f16(data, r, o + 82, lut) * float32(sc >> 4))
    hb = (int32(data[r, o + l]) >> (4 * half + j)) & 1
    low = (int32(data[r, o + 96 + s % 8]) >> (4 * (s // 8))) & 15
    high = (int32(data[r, o + 104 + s % 4]) >> (2 * (s // 4))) & 3
    return _f16(data, r, o + 108, lut) * float32((low | (high << 4)) - 32) * float32(q - 4 + 4 * hb)


@cuda.jit(device=True)
def _value(fmt, data, scales, mins, g, lut, r, k):
    """W[r, k] as float32 (one element; block header read per call, cached by L1)."""
    if fmt >= 7:
        return _value_k(fmt, data, lut, r, k)
    b = k // 32
    j = k % 32
    if fmt == 5 or fmt == 6:  # Q5_0 / Q5_1: the fifth bit from the 32-bit qh
        bs = 22 if fmt == 5 else 24
        oq = b * bs + (2 if fmt == 5 else 4)
        byte = int32(data[r, oq + 4 + (j % 16)])
        q = ((byte & 15) if j < 16 else (byte >> 4)) | (((int32(data[r, oq + j // 8]) >> (j % 8)) & 1) << 4)
        d = _f16(data, r, b * bs, lut)
        if fmt == 5:
            return float32(q - 16) * d
        return float32(q) * d + _f16(data, r, b * bs + 2, lut)
    if fmt == 0:      # Q8_0
        q = int32(data[r, b * 34 + 2 + j])
        return float32(q - ((q & 128) << 1)) * _f16(data, r, b * 34, lut)
    if fmt == 1 or fmt == 2:
        bs = 18 if fmt == 1 else 20
        off = 2 if fmt == 1 else 4
        byte = int32(data[r, b * bs + off + (j % 16)])
        nib = (byte & 15) if j < 16 else (byte >> 4)
        d = _f16(data, r, b * bs, lut)
        if fmt == 1:
            return float32(nib - 8) * d
        return float32(nib) * d + _f16(data, r, b * bs + 2, lut)
    gi = k // g
    if fmt == 3:      # int8 (codes stored as uint8 bit patterns)
        q = int32(data[r, k])
        v = float32(q - ((q & 128) << 1)) * scales[r, gi]
    else:             # int4
        byte = int32(data[r, b * 16 + (j % 16)])
        nib = (byte & 15) if j < 16 else (byte >> 4)
        if mins.shape[1] == 0:
            return float32(nib - 8) * scales[r, gi]
        v = float32(nib) * scales[r, gi]
    if mins.shape[1] > 0:
        v += mins[r, gi]
    return v


@cuda.jit
def _gemv_kernel(fmt, data, scales, mins, g, lut, x, y):
    # grid: out rows; block: TPB threads. x: [n, in] float32 (n <= MAX_TOK); y: [n, out]
    r = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    n = x.shape[0]
    k = x.shape[1]
    part = cuda.local.array(MAX_TOK, float32)
    for t in range(MAX_TOK):
        part[t] = 0.0
    for b in range(tid, k // 32, TPB):        # threads stride over quant blocks
        for j in range(32):
            v = _value(fmt, data, scales, mins, g, lut, r, b * 32 + j)
            for t in range(n):
                part[t] += v * x[t, b * 32 + j]
    red = cuda.shared.array(TPB, float32)
    for t in range(n):
        red[tid] = part[t]
        cuda.syncthreads()
        s = TPB // 2
        while s > 0:                            # shared-memory tree reduction
            if tid < s:
                red[tid] += red[tid + s]
            cuda.syncthreads()
            s //= 2
        if tid == 0:
            y[t, r] = red[0]
        cuda.syncthreads()


@cuda.jit
def _gemm_kernel(fmt, data, scales, mins, g, lut, x, y):
    # block (TILE, TILE): thread (tx, ty) -> y[t0 + ty, r0 + tx]; k steps of 32
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    r0 = cuda.blockIdx.x * TILE
    t0 = cuda.blockIdx.y * TILE
    n = x.shape[0]
    k = x.shape[1]
    out = data.shape[0]
    xs = cuda.shared.array((TILE, 32), float32)   # activations [tokens, k-step]
    ws = cuda.shared.array((TILE, 32), float32)   # dequantized weights [rows, k-step]
    acc = float32(0.0)
    for k0 in range(0, k, 32):
        for c in range(2):                       # 256 threads fill 2 x 16 x 32 values
            col = tx * 2 + c
            t = t0 + ty
            xs[ty, col] = x[t, k0 + col] if t < n else float32(0.0)
            r = r0 + ty
            ws[ty, col] = _value(fmt, data, scales, mins, g, lut, r, k0 + col) if r < out \
                else float32(0.0)
        cuda.syncthreads()
        for j in range(32):
            acc += xs[ty, j] * ws[tx, j]
        cuda.syncthreads()
    if t0 + ty < n and r0 + tx < out:
        y[t0 + ty, r0 + tx] = acc


@cuda.jit
def _dequant_kernel(fmt, data, scales, mins, g, lut, out):
    k = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    r = cuda.blockIdx.y
    if k < out.shape[1]:
        out[r, k] = _value(fmt, data, scales, mins, g, lut, r, k)


def _arr(t: torch.Tensor):
    """Zero-copy Numba view of a torch tensor (NumPy view under the simulator)."""
    return t.numpy() if SIM else cuda.as_cuda_array(t)


def _stream():
    return 0 if SIM else cuda.external_stream(torch.cuda.current_stream().cuda_stream)


def device_weight(w: QuantizedWeight, device) -> dict:
    """Copies of w's arrays on `device` as torch tensors, cached per weight object."""
    if w.qtype not in FMT:
        raise ValueError(f"cuda kernels: unsupported qtype {w.qtype.value}")
    ent = _dev_cache.get(w)
    if ent is None or ent["device"] != torch.device(device):
        def put(a, dt):
            return torch.from_numpy(np.ascontiguousarray(a, dtype=dt)).to(device)
        empty = np.zeros((1, 0), np.float32)
        ent = {"device": torch.device(device),
               "data": put(np.asarray(w.data).view(np.uint8), np.uint8),
               "scales": put(empty if w.scales is None else w.scales, np.float32),
               "mins": put(empty if w.mins is None else w.mins, np.float32),
               "lut": put(F16_LUT, np.float32)}
        _dev_cache[w] = ent
    return ent


def _args(w: QuantizedWeight, device):
    d = device_weight(w, device)
    return (FMT[w.qtype], _arr(d["data"]), _arr(d["scales"]), _arr(d["mins"]),
            int(w.group_size), _arr(d["lut"]))


def gemv(x: torch.Tensor, w: QuantizedWeight) -> torch.Tensor:
    """Decode GEMV: x float32 [n_tokens <= 8, in] (device) -> float32 [n_tokens, out]."""
    n = x.shape[0]
    if n > MAX_TOK or x.shape[1] != w.in_features:
        raise ValueError(f"cuda gemv: x {list(x.shape)} vs weight {w.shape} (n_tokens <= {MAX_TOK})")
    y = torch.empty((n, w.out_features), dtype=torch.float32, device=x.device)
    _gemv_kernel[w.out_features, TPB, _stream()](*_args(w, x.device), _arr(x), _arr(y))
    return y


def gemm(x: torch.Tensor, w: QuantizedWeight) -> torch.Tensor:
    """Tiled GEMM: x float32 [n_tokens, in] (device) -> float32 [n_tokens, out]."""
    if x.shape[1] != w.in_features:
        raise ValueError(f"cuda gemm: x {list(x.shape)} vs weight {w.shape}")
    n = x.shape[0]
    y = torch.empty((n, w.out_features), dtype=torch.float32, device=x.device)
    grid = (math.ceil(w.out_features / TILE), math.ceil(n / TILE))
    _gemm_kernel[grid, (TILE, TILE), _stream()](*_args(w, x.device), _arr(x), _arr(y))
    return y


def dequantize(w: QuantizedWeight, device) -> torch.Tensor:
    """Packed weight -> float32 [out, in] on `device`."""
    out = torch.empty(w.shape, dtype=torch.float32, device=device)
    grid = (math.ceil(w.in_features / DEQ_TPB), w.out_features)
    _dequant_kernel[grid, DEQ_TPB, _stream()](*_args(w, device), _arr(out))
    return out
