"""GPU kernel check and timing (CUDA machine): the Numba CUDA kernels against the NumPy
reference, then GEMV / tiled GEMM / dequant+bf16 GEMM times next to torch bf16 matmul and the
measured HBM copy bandwidth. Under 5 minutes; exits 0 with a message when no GPU is present.

    python bench/gpu_kernels.py
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def cuda_time(fn, reps=20) -> float:
    """Median seconds per call, CUDA events on the current stream."""
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    return float(np.median(ts))


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check (bench/gpu_kernels.py needs a GPU)")
        return 0
    from shardline.kernels import cuda as kc
    from shardline.kernels.dispatch import quantized_matmul
    from shardline.kernels.formats import quantize
    from shardline.kernels.reference import matmul_ref

    rng = np.random.default_rng(0)
    dev = torch.device("cuda")
    buf = torch.empty(1 << 28, dtype=torch.float32, device=dev)  # 1 GiB
    hbm = 2 * buf.nbytes / cuda_time(lambda: buf.clone()) / 1e9
    print(f"device {torch.cuda.get_device_name()} | HBM copy (read+write) {hbm:.0f} GB/s")

    bad = 0
    for q in ("q4_1", "q4_0", "q8_0", "int8", "int4", "q5_0", "q5_1", "q2_k", "q3_k", "q4_k",
              "q5_k", "q6_k"):
        w = quantize(rng.standard_normal((300, 256)).astype(np.float32), q)
        for n in (1, 3, 17):
            x = rng.standard_normal((n, 256)).astype(np.float32)
            ref = matmul_ref(x, w)
            xt = torch.from_numpy(x).to(dev)
            for name, fn in (("gemv", kc.gemv), ("gemm", kc.gemm)):
                if name == "gemv" and n > kc.MAX_TOK:
                    continue
                err = np.abs(fn(xt, w).cpu().numpy() - ref).max() / np.abs(ref).max()
                ok = err < 1e-4
                bad += not ok
                if not ok:
                    print(f"MISMATCH {q} {name} n={n}: rel err {err:.2e}")
    print("correctness:", "all kernels match the reference" if not bad else f"{bad} mismatches")

    print(f"{'fmt':5} {'shape':>11} {'n':>4} {'path':9} {'us':>9} {'GB/s':>7} {'TFLOP/s':>8}")
    for q in ("q4_1", "q8_0", "q5_0", "q4_k", "q6_k"):
        for out, inf in ((4096, 4096), (49152, 576) if q in ("q4_1", "q8_0", "q5_0") else (49152, 1536)):
            w = quantize(rng.standard_normal((out, inf)).astype(np.float32), q)
            wb = torch.randn(out, inf, device=dev, dtype=torch.bfloat16)
            for n in (1, 8, 64, 512):
                xt = torch.randn(n, inf, device=dev)
                xb = xt.bfloat16()
                paths = {"torch_bf16": lambda: xb @ wb.T}
                if n <= kc.MAX_TOK:
                    paths["gemv"] = lambda: kc.gemv(xt, w)
                if n <= 64:
                    paths["gemm"] = lambda: kc.gemm(xt, w)
                paths["deq+bf16"] = lambda: quantized_matmul(xt, w) if n >= 64 else None
                for name, fn in paths.items():
                    if name == "deq+bf16" and n < 64:
                        continue
                    t = cuda_time(fn)
                    nbytes = wb.nbytes if name == "torch_bf16" else w.nbytes
                    print(f"{q:5} {out:>5}x{inf:<5} {n:>4} {name:9} {t * 1e6:9.1f} "
                          f"{nbytes / t / 1e9:7.0f} {2 * n * out * inf / t / 1e12:8.2f}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
