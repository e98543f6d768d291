"""CUDA kernels: the simulator run (subprocess, tiny shapes) and real-GPU checks (marked gpu)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from .helpers import KERNEL_FORMATS, NEW_GGML, assert_matmul_close, random_weight

ROOT = Path(__file__).resolve().parents[2]


def test_cuda_kernels_under_simulator():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "tests/kernels/cuda_sim_cases.py"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def test_import_without_cuda():
    r = subprocess.run([sys.executable, "-c", "import kernels; print('ok')"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("qtype,sym", KERNEL_FORMATS + [(q, True) for q in NEW_GGML])
@pytest.mark.parametrize("n", [1, 3, 17, 64, 200])
def test_cuda_matmul_on_gpu(qtype, sym, n):
    from shardline.kernels.dispatch import quantized_matmul
    from shardline.kernels.reference import dequantize_ref, matmul_ref
    rng = np.random.default_rng(31)
    k = 512 if qtype.endswith("_k") else 576
    w = random_weight(qtype, sym, 1000, k, rng)
    x = rng.standard_normal((n, k)).astype(np.float32)
    y = quantized_matmul(torch.from_numpy(x).cuda(), w).cpu().numpy()
    ref = matmul_ref(x, w).astype(np.float64)
    if n >= 64:  # bf16 GEMM path: relative error ~ 2^-8 per operand
        np.testing.assert_allclose(y, ref, rtol=0.05, atol=0.02 * np.abs(ref).max())
    else:
        assert_matmul_close(y, x, dequantize_ref(w), ref)
