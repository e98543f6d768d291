"""Choose a matmul per device and n_tokens, and wrap quantized weights as torch modules.

CPU, every GGML block type and int8/int4 (cpu.py):
    n_tokens < crossover     the Numba kernel: q8_0/q4_0/q4_1 the row-interleaved float kernels
                             (4 tokens per pass over the weight); q5_0/q5_1 and the K-quants the
                             row-interleaved 8-bit integer kernels (qdot.py: llama.cpp's
                             scheme with activations as two int8 planes per 32 values; 4
                             tokens per pass);
                             int8/int4 fused GEMV for <= 2 tokens, else the row-wise small GEMM
    n_tokens >= crossover    dequantize tiles of rows to float32, round tile and x to bfloat16,
                             torch (oneDNN) bf16 GEMM accumulating in float32 (TILE_BF16; False:
                             float32 tiles and fp32 GEMM)
  The crossover comes from CPU_CROSSOVER, a table measured once per qtype (not per shape, not at
  worker start: the lazy per-shape calibration cost up to seconds and was unreliable under load).
  `set_crossover` pins one (qtype, shape); `calibrate(w)` still measures one on this machine and
  pins it for the process.
  With a bf16 copy (`QuantizedLinear.keep_bf16_copy`, cluster.yaml `workers.gemm_weights: bf16`)
  n_tokens >= BF16_COPY_MIN_TOKENS (BF16_COPY_MIN_TOKENS_WIDE for vocabulary-sized matrices)
  multiply the copy directly (no per-step dequantization; the copy costs 2 bytes per parameter on
  top of the packed weight; kept in oneDNN's blocked layout).
CUDA (cuda.py): n_tokens <= 8 GEMV kernel, <= CUDA_CROSSOVER tiled GEMM kernel, else dequantize
  to bf16 + torch GEMM. CUDA_CROSSOVER is a placeholder until bench/gpu_kernels.py runs on a GPU.
f32/f16 weights: torch fp32 GEMM; bf16 weights: torch bf16 GEMM on the stored weight (float32
result); on CUDA the weight is copied to the device once per call.
"""
from __future__ import annotations

import time

import numba
import numpy as np
import torch

from . import cpu, reference
from .formats import FLOAT_TYPES, QType, QuantizedWeight

GEMV_MAX_TOKENS = 2
# First n_tokens at which dequantized tiles + torch bf16 GEMM beat the Numba kernel, single thread
# (NUMBA_NUM_THREADS=1, torch 1 thread), AMD EPYC (Zen 4) dev machine, medians; measured by
#   NUMBA_NUM_THREADS=1 python bench/kernels.py --crossover
# on the SmolLM2-135M shapes (960x576, 576x576, 3072x576, 576x1536; 49152x576 for q8_0), n in
# 4, 8, 16, 32, 64, 128, 512. q4_1 (ms, kernel / fp32 tiles / bf16 tiles), e.g. 3072x576:
#   n=16 0.885 / 1.228 / 1.113   n=32 1.794 / 1.829 / 1.400   n=64 4.18 / 3.03 / 2.05
# the kernel won at n <= 16 and bf16 at n >= 32 on all four shapes; fp32 tiles never won.
# q8_0 49152x576: n=8 10.2 / 14.4 / 14.3, n=16 20.7 / 19.5 / 17.1 -> bf16 from 16.
# q4_0 shares q4_1's kernel (fewer bytes: same table). int8/int4: not measured (row-wise kernel,
# about 3x slower than the packed ones): 8 is a guess; measure with `calibrate`.
# Q5_0/Q5_1 and the K-quants run the 8-bit integer kernels (qdot.py; their tiles dequantize the
# packed copy): the kernel won at n <= 64 and bf16 tiles at n >= 128 on every shape measured
# (same command with --crossover-types q5_0,q4_k,q6_k, 1 thread, load average ~3), ms kernel /
# bf16 tiles: q5_0 3072x576 n=64 1.94 / 2.32, n=128 3.67 / 3.64; q4_k 576x1536 n=64 1.00 / 1.12,
# n=128 2.04 / 1.56; q4_k 4096x4096 n=64 16.0 / 20.2, n=128 33.9 / 30.7; q6_k 576x1536 tied at
# n=64 (1.09 / 1.09). q2_k, q3_k and q5_k share the kernel.
CPU_CROSSOVER = {QType.Q4_0: 32, QType.Q4_1: 32, QType.Q8_0: 16, QType.INT8: 8, QType.INT4: 8,
                 QType.Q5_0: 128, QType.Q5_1: 128, QType.Q2_K: 128, QType.Q3_K: 128,
                 QType.Q4_K: 128, QType.Q5_K: 128, QType.Q6_K: 128}
# With a resident bf16 copy the GEMM needs no dequantization: it beat the packed kernels from
# n = 8 on every SmolLM2 shape (1 thread, same machine and command as above, e.g. q4_1 3072x576
# n=8 kernel 0.433 ms / bf16 copy 0.242 ms; q8_0 49152x576 n=8 10.2 / 8.5 ms).
BF16_COPY_MIN_TOKENS = 8
# Vocabulary-sized matrices (the lm_head) cross over sooner against the blocked bf16 copy: Q8_0
# 49152x576, 1 thread, ms kernel / bf16 copy: n=2 5.8 / 4.5, n=4 5.2 / 3.3 (n=1 stays on the GEMV).
WIDE_OUT_FEATURES = 16384
BF16_COPY_MIN_TOKENS_WIDE = 2

TILE_BF16 = True  # the torch path for many tokens: bf16 GEMM (~3 significant digits) or fp32
CUDA_GEMV_MAX_TOKENS = 8
CUDA_CROSSOVER = 64  # not yet measured on a GPU (see bench/gpu_kernels.py)
TILE_FLOATS = 1 << 20  # dequantized tile size for the torch path: 4 MiB of float32
CALIBRATION_TOKENS = (4, 8, 16, 32, 64, 128)

_crossover: dict[tuple, int] = {}


def bf16_copy_min_tokens(out_features: int) -> int:
    """n_tokens from which a layer with a bf16 copy multiplies the copy instead of the packed weight."""
    return BF16_COPY_MIN_TOKENS_WIDE if out_features >= WIDE_OUT_FEATURES else BF16_COPY_MIN_TOKENS


def dequantize(w: QuantizedWeight) -> torch.Tensor:
    """Weight -> torch float32 [out_features, in_features] on the CPU (any qtype)."""
    if cpu.supported(w.qtype):
        return torch.from_numpy(cpu.dequantize(w))
    return torch.from_numpy(np.ascontiguousarray(reference.dequantize_ref(w)))  # f32/f16/bf16


def _float_weight(w: QuantizedWeight) -> torch.Tensor:
    """f32/f16/bf16 weight as a torch tensor [out, in] (no copy for f32/f16)."""
    t = torch.from_numpy(np.ascontiguousarray(w.data))
    return t.view(torch.bfloat16) if w.qtype is QType.BF16 else t


def _torch_tiles(x: torch.Tensor, w: QuantizedWeight, bf16: bool = False) -> torch.Tensor:
    """y = x @ W.T by dequantizing tiles of output rows to float32 and calling torch's GEMM
    (with bf16: tile and x rounded to bfloat16, product accumulated by oneDNN, result float32)."""
    out, inf = w.shape
    y = torch.empty((x.shape[0], out), dtype=torch.float32)
    rows = max(16, TILE_FLOATS // inf)
    buf = np.empty((min(rows, out), inf), np.float32)
    xb = x.bfloat16() if bf16 else x
    for r0 in range(0, out, rows):
        r1 = min(out, r0 + rows)
        tile = torch.from_numpy(cpu.dequantize_rows(w, r0, r1, buf[: r1 - r0]))
        if bf16:
            y[:, r0:r1] = (xb @ tile.bfloat16().T).float()
        else:
            y[:, r0:r1] = x @ tile.T
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
    """Measure on this machine the n_tokens from which dequantize + torch GEMM (TILE_BF16) beats
    the Numba kernel for w's (qtype, shape), and pin it for this process (as `set_crossover`).
    Returns a value in tokens, or max(tokens)+1 if the kernel won everywhere. Uses random
    activations (timing only). Not called by dispatch: CPU_CROSSOVER is used unless pinned."""
    key = (w.qtype, w.shape, numba.get_num_threads(), torch.get_num_threads())
    if key in _crossover:
        return _crossover[key]
    gen = torch.Generator().manual_seed(0)
    cross = max(tokens) + 1
    for n in tokens:
        x = torch.randn((n, w.in_features), generator=gen)
        if _best_time(lambda: _torch_tiles(x, w, TILE_BF16)) < _best_time(lambda: _kernel(x, w)):
            cross = n
            break
    _crossover[key] = cross
    return cross


def crossover(w: QuantizedWeight) -> int:
    """n_tokens from which the CPU torch path is taken for w: pinned value, else the table."""
    key = (w.qtype, w.shape, numba.get_num_threads(), torch.get_num_threads())
    return _crossover.get(key, CPU_CROSSOVER.get(w.qtype, 8))


def set_crossover(qtype, shape, n_tokens: int) -> None:
    """Pin the CPU crossover for (qtype, shape) under the current thread counts."""
    from .formats import parse_qtype
    key = (parse_qtype(qtype), tuple(shape), numba.get_num_threads(), torch.get_num_threads())
    _crossover[key] = int(n_tokens)


ONEDNN_BATCH_HINT = 32  # tokens the blocked layout is chosen for; any n gives the same products


def _onednn_blocked(w: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """bf16 [out, in] -> (the weight in oneDNN's blocked layout for torch.ops.mkldnn.
    _linear_pointwise, True), or (w, False) where this torch has no oneDNN."""
    if torch.backends.mkldnn.is_available():
        try:
            return torch.ops.mkldnn._reorder_linear_weight(w, ONEDNN_BATCH_HINT), True
        except (RuntimeError, AttributeError):
            pass
    return w, False


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
        return _cuda_matmul(x, w)
    if w.qtype is QType.BF16:  # bf16 GEMM on the stored weight (no float32 copy per call)
        return (x.bfloat16() @ _float_weight(w).T).float()
    if w.qtype in FLOAT_TYPES:
        return x @ _float_weight(w).float().T
    if n <= GEMV_MAX_TOKENS or n < crossover(w):
        return _kernel(x, w)
    return _torch_tiles(x, w, TILE_BF16)


def _cuda_matmul(x: torch.Tensor, w: QuantizedWeight) -> torch.Tensor:
    """The CUDA choice (module doc): x float32 [n, in] on a CUDA device -> float32 [n, out]."""
    from . import cuda as kcuda

    if w.qtype in FLOAT_TYPES:
        wt = _float_weight(w).to(x.device)
        return (x.bfloat16() @ wt.T).float() if w.qtype is QType.BF16 else x @ wt.float().T
    n = x.shape[0]
    if n <= CUDA_GEMV_MAX_TOKENS:
        return kcuda.gemv(x, w)
    if n < CUDA_CROSSOVER:
        return kcuda.gemm(x, w)
    wt = kcuda.dequantize(w, x.device).to(torch.bfloat16)
    return (x.to(torch.bfloat16) @ wt.T).float()


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
        # the bf16 copy: row blocks of [out, in] (one, or `row_parts` equal ones), each plain or
        # oneDNN-blocked; None without a copy
        self.weight_bf16: tuple[torch.Tensor, ...] | None = None
        self._bf16_blocked = False
        self.row_parts = 1  # set before keep_bf16_copy: 2 for a fused gate+up (see `swiglu`)

    def keep_bf16_copy(self) -> int:
        """Keep W dequantized to bfloat16 [out_features, in_features] next to the packed form, so
        calls with >= bf16_copy_min_tokens(out_features) tokens skip the per-call tile
        dequantization (CPU).
        Built tile by tile (peak extra memory: one float32 tile, then the copy once more while
        it is reordered). Where torch has oneDNN, the copy is kept in oneDNN's blocked layout
        (`torch.ops.mkldnn._reorder_linear_weight`, as torch's own CPU weight prepacking does):
        the same products bit for bit, without the layout change oneDNN otherwise makes of the
        weight on every call (15 layers of SmolLM2 x 32 tokens from DRAM, one thread: 28.0 ->
        21.0 ms; the lm_head 14.9 -> 10.2 ms). With `row_parts` > 1 the copy is kept as that many
        equal row blocks (a fused gate+up: `swiglu` multiplies them with oneDNN's SiLU and
        multiply post-ops). Returns the copy's bytes. Float weights (f32/f16/bf16) get a copy
        too. Raises ValueError when the rows do not
        split into `row_parts` equal blocks."""
        w = self.qweight
        if w.out_features % self.row_parts:
            raise ValueError(f"{w.out_features} rows do not split into {self.row_parts} equal parts")
        copy = torch.empty(w.shape, dtype=torch.bfloat16)
        rows = max(16, TILE_FLOATS // w.in_features)
        for r0 in range(0, w.out_features, rows):
            r1 = min(w.out_features, r0 + rows)
            tile = (cpu.dequantize_rows(w, r0, r1) if cpu.supported(w.qtype)
                    else reference.dequantize_ref(w.row_slice(r0, r1)))
            copy[r0:r1] = torch.from_numpy(tile).to(torch.bfloat16)
        parts = []
        for part in copy.chunk(self.row_parts, 0):
            part, self._bf16_blocked = _onednn_blocked(part.contiguous())
            parts.append(part)
        self.weight_bf16 = tuple(parts)
        return w.out_features * w.in_features * 2

    def bf16_copy(self) -> torch.Tensor | None:
        """The bf16 copy as a plain [out_features, in_features] tensor (a dense copy when it is
        kept blocked), or None without one."""
        if self.weight_bf16 is None:
            return None
        parts = [p.to_dense() if self._bf16_blocked else p for p in self.weight_bf16]
        return parts[0] if len(parts) == 1 else torch.cat(parts, 0)

    def _part_matmul(self, xb: torch.Tensor, i: int) -> torch.Tensor:
        """xb bfloat16 [n, in] @ row block i of the copy -> bfloat16 [n, out / row_parts]."""
        if self._bf16_blocked:
            return torch.ops.mkldnn._linear_pointwise(xb, self.weight_bf16[i], None, "none", [], "")
        return xb @ self.weight_bf16[i].T

    def takes_bf16_copy(self, n_tokens: int) -> bool:
        """Whether a CPU call with n_tokens tokens multiplies the bf16 copy (there is one and
        n_tokens >= bf16_copy_min_tokens(out_features)) rather than the packed weight."""
        return self.weight_bf16 is not None and n_tokens >= bf16_copy_min_tokens(self.out_features)

    def bf16_linear(self, xb: torch.Tensor) -> torch.Tensor:
        """xb bfloat16 [n, in] @ the bf16 copy -> bfloat16 [n, out]: bf16 products, float32 sums
        rounded to nearest even, no bias (the GEMM `forward` runs on the copy, without its
        conversions to and from float32, for callers that keep activations in bfloat16 between
        GEMMs: shardline/worker/model.py's DecoderLayer.forward_bf16). Raises RuntimeError without a copy."""
        if self.weight_bf16 is None:
            raise RuntimeError("bf16_linear needs the bf16 copy (keep_bf16_copy)")
        if len(self.weight_bf16) == 1:
            return self._part_matmul(xb, 0)
        return torch.cat([self._part_matmul(xb, i) for i in range(len(self.weight_bf16))], -1)

    def _bf16_matmul(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 float32 or bfloat16 [n, in] @ the bf16 copy -> float32 [n, out] (bf16 products,
        float32 sums rounded to bf16)."""
        return self.bf16_linear(x2 if x2.dtype == torch.bfloat16 else x2.bfloat16()).float()

    def swiglu(self, x: torch.Tensor) -> torch.Tensor | None:
        """SiLU(x @ W_gate.T) * (x @ W_up.T) for a fused gate+up layer (W = [W_gate; W_up], kept
        as two row blocks: `row_parts` = 2), as bfloat16 [n, out / 2], ready for the down
        projection's bf16 GEMM; None where this call would not take the bf16 copy (no copy, not
        two parts, too few tokens, CUDA), and the caller runs `forward` and the activation itself.

        x: float32 [n, in]. On oneDNN the SiLU and the product are post-ops of the two GEMMs
        (`_linear_pointwise` "swish", then its binary "mul" with the SiLU output): no float32
        [n, out] intermediate, no separate elementwise passes (512 tokens, SmolLM2 gate+up+down,
        one thread: 10.9 -> 9.6 ms). Each GEMM sums in float32 and applies its post-op before
        rounding to bf16, as the unfused path rounds its GEMM output (SwiGLU: Shazeer 2020,
        "GLU Variants Improve Transformer")."""
        if (not self.takes_bf16_copy(x.shape[0]) or len(self.weight_bf16) != 2 or x.is_cuda
                or self.bias is not None):
            return None
        xb = x.reshape(-1, x.shape[-1]).bfloat16()
        if self._bf16_blocked:
            linear = torch.ops.mkldnn._linear_pointwise
            gate = linear(xb, self.weight_bf16[0], None, "swish", [], "")
            return linear.binary(xb, gate, self.weight_bf16[1], None, "mul")
        gate, up = self._part_matmul(xb, 0).float(), self._part_matmul(xb, 1).float()  # bf16-rounded
        return (torch.nn.functional.silu(gate) * up).bfloat16()

    def packed_kernel_args(self, n_tokens: int):
        """(fmt, qs, d, m) of the row-interleaved CPU kernels (shardline.kernels.cpu._packed) when `forward`
        would run them for `n_tokens` tokens (CPU, a GGML block type other than int8/int4, no
        bias, below the crossover and the bf16-copy threshold), so a fused caller
        (shardline/kernels/fused.py) makes the same choice; else None."""
        w = self.qweight
        if (self.bias is not None or cpu.FMT.get(w.qtype) not in cpu.PACKED_FORMATS or w.in_features % 32
                or self.takes_bf16_copy(n_tokens)
                or not (n_tokens <= GEMV_MAX_TOKENS or n_tokens < crossover(w))):
            return None
        return cpu._packed(w)

    @property
    def in_features(self) -> int:
        return self.qweight.in_features

    @property
    def out_features(self) -> int:
        return self.qweight.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: float32 [..., in_features] (or bfloat16, as `swiglu` returns) -> float32 [..., out_features]."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if self.takes_bf16_copy(x2.shape[0]) and not x2.is_cuda:
            y = self._bf16_matmul(x2.contiguous())
        else:
            y = quantized_matmul(x2.float(), self.qweight)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"qtype={self.qweight.qtype.value}, nbytes={self.qweight.nbytes}")
