"""Choose a matmul per device and n_tokens, and wrap quantized weights as torch modules.

CPU, q8_0/q4_0/q4_1/int8/int4 (cpu.py):
    n_tokens <= 2            fused GEMV (one pass over the packed weight per token)
    2 < n_tokens < crossover small GEMM (each packed row dequantized once into L1, dotted with all)
    n_tokens >= crossover    dequantize tiles of rows to float32, torch GEMM per tile
  crossover is measured, not guessed: `calibrate(w)` times the kernel path against the torch path
  at a few n_tokens and caches the first n where torch wins, per (qtype, shape, numba threads).
  The first call for a new (qtype, shape) with n_tokens > 2 pays the calibration (tens of ms for
  the small model's shapes, ~0.5 s for 4096x4096); `set_crossover` pins it, e.g. from
  `python bench/kernels.py` output.
CUDA (cuda.py): n_tokens <= 8 GEMV kernel, <= CUDA_CROSSOVER tiled GEMM kernel, else dequantize
  to bf16 + torch GEMM. CUDA_CROSSOVER is a placeholder until bench/gpu_kernels.py runs on a GPU.
f32/f16/bf16 weights: torch GEMM. Q4_K/Q6_K: reference dequantization (gguf) + torch GEMM.
"""
from __future__ import annotations

import time

import numba
import numpy as np
import torch

from . import cpu, reference
from .formats import FLOAT_TYPES, QType, QuantizedWeight

GEMV_MAX_TOKENS = 2
CUDA_GEMV_MAX_TOKENS = 8
CUDA_CROSSOVER = 64  # not yet measured on a GPU (see bench/gpu_kernels.py)
TILE_FLOATS = 1 << 20  # dequantized tile size for the torch path: 4 MiB of float32
CALIBRATION_TOKENS = (4, 8, 16, 32, 64, 128)

_crossover: dict[tuple, int] = {}


def dequantize(w: QuantizedWeight) -> torch.Tensor:
    """Weight -> torch float32 [out_features, in_features] on the CPU (any supported qtype)."""
    if cpu.supported(w.qtype):
        return torch.from_numpy(cpu.dequantize(w))
    return torch.from_numpy(np.ascontiguousarray(reference.dequantize_ref(w)))


def _float_weight(w: QuantizedWeight) -> torch.Tensor:
    """f32/f16/bf16 weight as a torch tensor [out, in] (no copy for f32/f16)."""
    t = torch.from_numpy(np.ascontiguousarray(w.data))
    return t.view(torch.bfloat16) if w.qtype is QType.BF16 else t


def _torch_tiles(x: torch.Tensor, w: QuantizedWeight) -> torch.Tensor:
    """y = x @ W.T by dequantizing tiles of output rows to float32 and calling torch's GEMM."""
    out, inf = w.shape
    y = torch.empty((x.shape[0], out), dtype=torch.float32)
    rows = max(16, TILE_FLOATS // inf)
    buf = np.empty((min(rows, out), inf), np.float32)
    for r0 in range(0, out, rows):
        r1 = min(out, r0 + rows)
        tile = cpu.dequantize(w.row_slice(r0, r1), buf[: r1 - r0])
        y[:, r0:r1] = x @ torch.from_numpy(tile).T
    return y


def _kernel(x: torch.Tensor, w: QuantizedWeight) -> torch.Tensor:
    xn = x.numpy()
    f = cpu.gemv if x.shape[0] <= GEMV_MAX_TOKENS else cpu.gemm
    return torch.from_numpy(f(xn, w))


def _best_time(fn, reps: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def calibrate(w: QuantizedWeight, tokens=CALIBRATION_TOKENS) -> int:
    """Measure the n_tokens from which dequantize+torch GEMM beats the Numba kernel for w's
    (qtype, shape) on this machine; cached. Returns a value in tokens, or max(tokens)+1 if the
    kernel won everywhere. Uses random activations (timing only)."""
    key = (w.qtype, w.shape, numba.get_num_threads(), torch.get_num_threads())
    if key in _crossover:
        return _crossover[key]
    gen = torch.Generator().manual_seed(0)
    cross = max(tokens) + 1
    for n in tokens:
        x = torch.randn((n, w.in_features), generator=gen)
        if _best_time(lambda: _torch_tiles(x, w)) < _best_time(lambda: _kernel(x, w)):
            cross = n
            break
    _crossover[key] = cross
    return cross


def set_crossover(qtype, shape, n_tokens: int) -> None:
    """Pin the CPU crossover for (qtype, shape) under the current thread counts."""
    from .formats import parse_qtype
    key = (parse_qtype(qtype), tuple(shape), numba.get_num_threads(), torch.get_num_threads())
    _crossover[key] = int(n_tokens)


def quantized_matmul(x: torch.Tensor, w: QuantizedWeight) -> torch.Tensor:
    """y = x @ W.T.

    x: float32 [n_tokens, in_features], contiguous, on the CPU or a CUDA device.
    Returns float32 [n_tokens, out_features] on x's device. See the module doc for the choice
    of kernel. Raises ValueError on a shape mismatch or an unsupported qtype.
    """
    if x.dim() != 2 or x.shape[1] != w.in_features:
        raise ValueError(f"{w.qtype.value} weight {w.shape}: x must be [n_tokens, "
                         f"{w.in_features}], got {list(x.shape)}")
    if x.dtype != torch.float32:
        raise ValueError(f"x must be float32, got {x.dtype}")
    x = x.contiguous()
    n = x.shape[0]
    if x.is_cuda:
        from . import cuda as kcuda
        return kcuda.matmul(x, w)
    if w.qtype in FLOAT_TYPES:
        return x @ _float_weight(w).float().T
    if not cpu.supported(w.qtype):
        return x @ dequantize(w).T  # Q4_K / Q6_K: reference path
    if n <= GEMV_MAX_TOKENS or n < calibrate(w):
        return _kernel(x, w)
    return _torch_tiles(x, w)


class QuantizedLinear(torch.nn.Module):
    """Linear layer y = x @ W.T + b with W kept packed (memory ~= the file's bytes).

    weight: QuantizedWeight [out_features, in_features]; bias: float32 [out_features] or None.
    forward: x float32 [..., in_features] -> float32 [..., out_features].
    """

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.qweight = weight
        if bias is not None and tuple(bias.shape) != (weight.out_features,):
            raise ValueError(f"bias shape {tuple(bias.shape)} != ({weight.out_features},)")
        self.register_buffer("bias", None if bias is None else bias.float())

    @property
    def in_features(self) -> int:
        return self.qweight.in_features

    @property
    def out_features(self) -> int:
        return self.qweight.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = quantized_matmul(x.reshape(-1, x.shape[-1]), self.qweight)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"qtype={self.qweight.qtype.value}, nbytes={self.qweight.nbytes}")
