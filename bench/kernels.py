"""Kernel benchmark: effective GB/s (packed weight bytes / time), its share of the machine's
measured memory read bandwidth, and GFLOP/s of the Numba CPU kernels per format, shape, thread
count (1 and 2) and n_tokens, next to torch fp32/bf16 GEMM GFLOP/s. Paths: gemv/gemm (q8_0/q4_*:
row-interleaved float kernels; q5_*, K-quants: the 8-bit integer kernels of
shardline/kernels/qdot.py), gemv_rw/gemm_rw (the plain row-wise kernels on the file layout),
torch / torch_bf16 (dequantized tiles + fp32 / bf16 GEMM). Shapes: SmolLM2-135M's (576x576 q/o,
192x576 k/v, 1536x576 gate/up, 576x1536 down, 49152x576 lm_head) and 4096x4096; the K-quants
only where in_features is a multiple of 256 (llama.cpp writes the 576-wide SmolLM2 tensors of a
Q4_K_M file as Q5_0, its Q6_K ones as Q8_0). Then decode-like GEMVs over weights several times
the last-level cache (every byte from DRAM). With --crossover: kernel vs fp32 vs bf16 tiles at
n = 4..512 (the measurement behind shardline.kernels.dispatch.CPU_CROSSOVER; run it with
NUMBA_NUM_THREADS=1 for the 1-thread workers), then the table in use.

    python bench/kernels.py [--quick] [--crossover] [--out bench/results/kernels.json]

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

# OpenMP threads wait between regions as a worker's do (shardline/cli.py _omp_wait_policy)
os.environ.setdefault("GOMP_SPINCOUNT", "1000000")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import numba  # noqa: E402

from shardline.kernels import cpu, dispatch  # noqa: E402
from shardline.kernels.formats import quantize  # noqa: E402

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576), (4096, 4096)]
FORMATS = [("q4_k", True), ("q6_k", True), ("q5_0", True), ("q8_0", True), ("q4_1", True),
           ("q5_k", True), ("q4_0", True), ("int8", True), ("int4", True)]
TOKENS = [1, 4, 8, 64, 512]
THREADS = (1, 2)
K_QUANTS = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k")


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


@numba.njit(parallel=True, fastmath=True, cache=True)
def _parallel_sum(a2):
    partial = np.zeros(a2.shape[0], np.float32)
    for c in numba.prange(a2.shape[0]):
        partial[c] = a2[c].sum()
    return partial.sum()


def read_bandwidth(gib: float) -> float:
    """GB/s of a sum over a float32 array of `gib` GiB (touched once beforehand) on all of
    Numba's threads, the threads the kernels get (numpy's own sum runs on one thread and reached
    only 22-28 GB/s here, against ~35 GB/s with Numba on one or two threads)."""
    a = np.ones(int(gib * 2**30) // 4, np.float32).reshape(16 * numba.get_num_threads(), -1)
    t = best_time(lambda: _parallel_sum(a), min_time=0.5, max_reps=5)
    return a.nbytes / t / 1e9


def fits(qtype: str, inf: int) -> bool:
    """Whether a row of `inf` values is whole blocks of qtype (256 for the K-quants)."""
    return inf % (256 if qtype in K_QUANTS else 32) == 0


def streaming_gemv(rng, qtype: str, shapes: list[tuple[int, int]], total_bytes: float) -> dict:
    """GB/s of the GEMV (one token) over distinct packed weights of `shapes`, repeated until they
    hold `total_bytes` (several times the last-level cache, so every byte comes from DRAM, as in
    a decode step), called one after another; the best of several sweeps."""
    ws = []
    while sum(w.nbytes for w in ws) < total_bytes:
        for out, inf in shapes:
            ws.append(quantize(rng.standard_normal((out, inf)).astype(np.float32), qtype))
    xs = {inf: rng.standard_normal((1, inf)).astype(np.float32) for _, inf in shapes}

    def sweep():
        for w in ws:
            cpu.gemv(xs[w.in_features], w)

    t = best_time(sweep, min_time=1.0, max_reps=10)
    nbytes = sum(w.nbytes for w in ws)
    return {"qtype": qtype, "shapes": [list(s) for s in shapes], "weights": len(ws), "bytes": nbytes,
            "ms": t * 1e3, "GBps": nbytes / t / 1e9}


def torch_gflops(dtype, n=1024) -> float:
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / best_time(lambda: a @ b) / 1e9


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer formats/shapes; under a minute")
    ap.add_argument("--crossover", action="store_true",
                    help="measure kernel vs fp32/bf16 tiles on the model's shapes, n = 4..512")
    ap.add_argument("--crossover-types", default="",
                    help="comma-separated qtypes for --crossover alone (skips the other tables)")
    ap.add_argument("--out", default="bench/results/kernels.json")
    args = ap.parse_args()
    shapes, formats, tokens = SHAPES, FORMATS, TOKENS
    min_time = 0.2
    if args.quick:
        formats = [("q4_k", True), ("q6_k", True), ("q5_0", True), ("q8_0", True), ("q4_1", True)]
        tokens = [1, 4, 64]
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
    if args.crossover_types:
        res["crossover_rows"] = crossover_rows(rng, args.crossover_types.split(","))
        formats, THREADS_RUN = [], ()
    else:
        THREADS_RUN = THREADS
    print(f"{'format':6} {'shape':>12} {'thr':>3} {'n':>4} {'path':10} {'ms':>9} {'GB/s':>7} "
          f"{'%read':>6} {'GFLOP/s':>8}")
    quick_shapes = {(576, 576), (576, 1536), (4096, 4096)}
    for threads in THREADS_RUN:
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        torch.set_num_threads(threads)
        for qtype, sym in formats:
            for out, inf in shapes:
                if not fits(qtype, inf) or (args.quick and (out, inf) not in quick_shapes):
                    continue
                w = quantize(rng.standard_normal((out, inf)).astype(np.float32), qtype, symmetric=sym)
                for n in tokens:
                    if n * out * inf > 4096 * 4096 * 64 and args.quick:
                        continue
                    x = rng.standard_normal((n, inf)).astype(np.float32)
                    xt = torch.from_numpy(x)
                    paths = {}
                    if n <= 8:
                        paths["gemv"] = lambda: cpu.gemv(x, w)
                    if n <= 8 and qtype.startswith("q") and not args.quick:
                        paths["gemv_rw"] = lambda: cpu.gemv_rowwise(x, w)
                    if 8 < n <= 64 or (n > 1 and not qtype.startswith("q")):
                        paths["gemm"] = lambda: cpu.gemm(x, w)
                    if n >= 8:
                        paths["torch"] = lambda: dispatch._torch_tiles(xt, w)
                        paths["torch_bf16"] = lambda: dispatch._torch_tiles(xt, w, True)
                    for path, fn in paths.items():
                        t = best_time(fn, min_time)
                        row = {"qtype": qtype, "shape": [out, inf], "threads": numba.get_num_threads(),
                               "n_tokens": n, "path": path, "ms": t * 1e3, "GBps": w.nbytes / t / 1e9,
                               "fraction_of_read": w.nbytes / t / 1e9 / res["read_GBps"],
                               "GFLOPs": 2 * n * out * inf / t / 1e9}
                        res["rows"].append(row)
                        print(f"{qtype:6} {out:>5}x{inf:<6} {row['threads']:>3} {n:>4} {path:10} "
                              f"{row['ms']:9.3f} {row['GBps']:7.1f} {100 * row['fraction_of_read']:5.0f}% "
                              f"{row['GFLOPs']:8.1f}", flush=True)
    # decode reads every weight once per token from DRAM: GEMVs over weights 4x the L3 cache,
    # square and in SmolLM2's layer shapes (qkv, o, gate_up, down)
    res["streaming_gemv"] = []
    stream_formats = ("q4_k", "q6_k", "q5_0", "q8_0", "q4_1")
    for threads in THREADS_RUN:
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        for qtype in stream_formats:
            for label, sh in (("4096x4096", [(4096, 4096)]),
                              ("SmolLM2 layers", [(960, 576), (576, 576), (3072, 576), (576, 1536)])):
                sh = [s for s in sh if fits(qtype, s[1])]
                if qtype in K_QUANTS and label == "SmolLM2 layers":
                    label = "SmolLM2 down (576x1536)"
                r = streaming_gemv(rng, qtype, sh, 64e6 if args.quick else 128e6)
                r["label"], r["threads"] = label, numba.get_num_threads()
                r["fraction_of_read"] = r["GBps"] / res["read_GBps"]
                res["streaming_gemv"].append(r)
                print(f"{qtype} GEMV from DRAM, {label}, {r['threads']} thread(s): {r['bytes'] / 1e6:.0f} MB in "
                      f"{r['ms']:.2f} ms = {r['GBps']:.1f} GB/s, {100 * r['fraction_of_read']:.0f}% of the "
                      f"measured read bandwidth", flush=True)
    res["crossover_table"] = {q.value: n for q, n in dispatch.CPU_CROSSOVER.items()}
    if args.crossover and not args.crossover_types:
        res["crossover_rows"] = crossover_rows(rng)
    print("dispatch.CPU_CROSSOVER (torch bf16 tiles from n_tokens):", res["crossover_table"])
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(res, indent=1))
    plot(res, out_path.with_suffix(".png"))
    print(f"wrote {out_path} and {out_path.with_suffix('.png')}")


def crossover_rows(rng, only=()):
    """Median ms of the kernel, fp32 tiles and bf16 tiles per (qtype, shape, n); `only`: these
    qtypes alone."""
    from tests.kernels.helpers import random_ggml

    def med(fn, reps):
        fn()
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return float(np.median(ts))

    rows = []
    cases = [("q4_1", 960, 576), ("q4_1", 576, 576), ("q4_1", 3072, 576), ("q4_1", 576, 1536),
             ("q8_0", 49152, 576), ("q5_0", 960, 576), ("q5_0", 576, 576), ("q5_0", 3072, 576),
             ("q4_k", 576, 1536), ("q6_k", 576, 1536), ("q4_k", 4096, 4096)]
    if only:
        cases = [c for c in cases if c[0] in only]
    for q, o, i in cases:
        w = random_ggml(q, o, i, rng, wide=False)
        for n in (4, 8, 16, 32, 64, 128, 512):
            x = torch.from_numpy(rng.standard_normal((n, i)).astype(np.float32))
            reps = max(3, int(40 / (1 + n * o * i / 3e7)))
            t = {"kernel": med(lambda: cpu.gemm(x.numpy(), w), reps),
                 "fp32": med(lambda: dispatch._torch_tiles(x, w), reps),
                 "bf16": med(lambda: dispatch._torch_tiles(x, w, True), reps)}
            best = min(t, key=t.get)
            rows.append({"qtype": q, "shape": [o, i], "n_tokens": n, "best": best,
                         **{k + "_ms": v * 1e3 for k, v in t.items()}})
            print(f"  {q} {o:>5}x{i:<5} n={n:<4} kernel {t['kernel']*1e3:8.3f}  fp32 "
                  f"{t['fp32']*1e3:8.3f}  bf16 {t['bf16']*1e3:8.3f} ms  best {best}", flush=True)
    return rows


def plot(res, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 5))
    gemv = [r for r in res["rows"] if r["n_tokens"] == 1 and r["path"] == "gemv"]
    labels = [f"{r['qtype']} {r['threads']}t\n{r['shape'][0]}x{r['shape'][1]}" for r in gemv]
    a1.bar(range(len(gemv)), [r["GBps"] for r in gemv])
    a1.axhline(res["read_GBps"], color="r", ls="--", label="measured read bandwidth")
    a1.set_xticks(range(len(gemv)), labels, fontsize=6, rotation=90)
    a1.set_ylabel("GB/s (packed weight bytes / time)")
    a1.set_title("GEMV n_tokens=1")
    a1.legend()
    for (q, p), marker in zip({(r["qtype"], r["path"]) for r in res["rows"]}, "osv^<>pDh*x+" * 3):
        pts = sorted((r["n_tokens"], r["GFLOPs"]) for r in res["rows"]
                     if r["qtype"] == q and r["path"] == p and r["shape"] == [4096, 4096]
                     and r["threads"] == max(THREADS))
        if pts:
            a2.plot(*zip(*pts), marker=marker, label=f"{q} {p}")
    a2.axhline(res["torch_fp32_GFLOPs"], color="k", ls="--", label="torch fp32 GEMM")
    a2.axhline(res["torch_bf16_GFLOPs"], color="g", ls=":", label="torch bf16 GEMM")
    a2.set_xscale("log", base=2)
    a2.set_xlabel("n_tokens")
    a2.set_ylabel("GFLOP/s")
    a2.set_title(f"4096x4096, {max(THREADS)} threads")
    a2.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
