"""Kernel benchmark: effective GB/s (packed weight bytes / time) and GFLOP/s of the Numba CPU
kernels per format, shape and n_tokens, next to the machine's measured memory read bandwidth and
torch fp32/bf16 GEMM GFLOP/s; also the measured CPU crossover (kernel vs dequantize+torch GEMM).

    python bench/kernels.py [--quick] [--out bench/results/kernels.json]

Writes JSON and a PNG (bench/results/kernels.json, kernels.png).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import numba  # noqa: E402

from kernels import cpu, dispatch  # noqa: E402
from kernels.formats import quantize  # noqa: E402

SHAPES = [(576, 576), (1536, 576), (576, 1536), (49152, 576), (4096, 4096)]
FORMATS = [("q4_1", True), ("q4_0", True), ("q8_0", True), ("int8", True), ("int4", True)]
TOKENS = [1, 8, 64, 512]


def best_time(fn, min_time=0.2, max_reps=50) -> float:
    """Best wall time of fn() in seconds after one warm-up call."""
    fn()
    best, spent, reps = float("inf"), 0.0, 0
    while reps < 3 or (spent < min_time and reps < max_reps):
        t = time.perf_counter()
        fn()
        dt = time.perf_counter() - t
        best, spent, reps = min(best, dt), spent + dt, reps + 1
    return best


def read_bandwidth(gib: float) -> float:
    """GB/s of numpy sum over a float32 array of `gib` GiB (touched once beforehand)."""
    a = np.ones(int(gib * 2**30) // 4, np.float32)
    t = best_time(lambda: a.sum(), min_time=0.5, max_reps=5)
    return a.nbytes / t / 1e9


def torch_gflops(dtype, n=1024) -> float:
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / best_time(lambda: a @ b) / 1e9


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer formats/shapes; under a minute")
    ap.add_argument("--out", default="bench/results/kernels.json")
    args = ap.parse_args()
    shapes, formats, tokens = SHAPES, FORMATS, TOKENS
    min_time = 0.2
    if args.quick:
        shapes = [(576, 576), (1536, 576), (4096, 4096)]
        formats = [("q4_1", True), ("q8_0", True)]
        tokens = [1, 8, 64]
        min_time = 0.05
    rng = np.random.default_rng(0)
    res = {"machine": {"cpu": platform.processor() or platform.machine(),
                       "numba_threads": numba.get_num_threads(),
                       "torch_threads": torch.get_num_threads(),
                       "load_avg": os.getloadavg()},
           "read_GBps": read_bandwidth(0.25 if args.quick else 1.0),
           "torch_fp32_GFLOPs": torch_gflops(torch.float32),
           "torch_bf16_GFLOPs": torch_gflops(torch.bfloat16),
           "rows": [], "crossover": {}}
    print(f"memory read {res['read_GBps']:.1f} GB/s | torch fp32 {res['torch_fp32_GFLOPs']:.0f} "
          f"GFLOP/s, bf16 {res['torch_bf16_GFLOPs']:.0f} GFLOP/s | numba threads "
          f"{numba.get_num_threads()}, load avg {os.getloadavg()[0]:.2f}")
    print(f"{'format':6} {'shape':>12} {'n':>4} {'path':6} {'ms':>9} {'GB/s':>7} {'GFLOP/s':>8}")
    for qtype, sym in formats:
        for out, inf in shapes:
            w = quantize(rng.standard_normal((out, inf)).astype(np.float32), qtype, symmetric=sym)
            for n in tokens:
                if n * out * inf > 4096 * 4096 * 64 and args.quick:
                    continue
                x = rng.standard_normal((n, inf)).astype(np.float32)
                xt = torch.from_numpy(x)
                paths = {"gemv": lambda: cpu.gemv(x, w)} if n <= 8 else {}
                if n > 1:
                    paths["gemm"] = lambda: cpu.gemm(x, w)
                if n >= 8:
                    paths["torch"] = lambda: dispatch._torch_tiles(xt, w)
                for path, fn in paths.items():
                    t = best_time(fn, min_time)
                    row = {"qtype": qtype, "shape": [out, inf], "n_tokens": n, "path": path,
                           "ms": t * 1e3, "GBps": w.nbytes / t / 1e9,
                           "GFLOPs": 2 * n * out * inf / t / 1e9}
                    res["rows"].append(row)
                    print(f"{qtype:6} {out:>5}x{inf:<6} {n:>4} {path:6} {row['ms']:9.3f} "
                          f"{row['GBps']:7.1f} {row['GFLOPs']:8.1f}")
            if (out, inf) != (49152, 576) or not args.quick:
                c = dispatch.calibrate(w, tokens=(4, 16, 64) if args.quick
                                       else dispatch.CALIBRATION_TOKENS)
                res["crossover"][f"{qtype} {out}x{inf}"] = c
                print(f"  crossover {qtype} {out}x{inf}: torch path from n_tokens = {c}")
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(res, indent=1))
    plot(res, out_path.with_suffix(".png"))
    print(f"wrote {out_path} and {out_path.with_suffix('.png')}")


def plot(res, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 5))
    gemv = [r for r in res["rows"] if r["n_tokens"] == 1]
    labels = [f"{r['qtype']}\n{r['shape'][0]}x{r['shape'][1]}" for r in gemv]
    a1.bar(range(len(gemv)), [r["GBps"] for r in gemv])
    a1.axhline(res["read_GBps"], color="r", ls="--", label="measured read bandwidth")
    a1.set_xticks(range(len(gemv)), labels, fontsize=6, rotation=90)
    a1.set_ylabel("GB/s (packed weight bytes / time)")
    a1.set_title("GEMV n_tokens=1")
    a1.legend()
    for (q, p), marker in zip({(r["qtype"], r["path"]) for r in res["rows"]}, "osv^<>pDh*x+" * 3):
        pts = sorted((r["n_tokens"], r["GFLOPs"]) for r in res["rows"]
                     if r["qtype"] == q and r["path"] == p and r["shape"] == [4096, 4096])
        if pts:
            a2.plot(*zip(*pts), marker=marker, label=f"{q} {p}")
    a2.axhline(res["torch_fp32_GFLOPs"], color="k", ls="--", label="torch fp32 GEMM")
    a2.axhline(res["torch_bf16_GFLOPs"], color="g", ls=":", label="torch bf16 GEMM")
    a2.set_xscale("log", base=2)
    a2.set_xlabel("n_tokens")
    a2.set_ylabel("GFLOP/s")
    a2.set_title("4096x4096")
    a2.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
