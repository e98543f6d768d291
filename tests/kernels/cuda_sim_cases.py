"""CUDA kernels under NUMBA_ENABLE_CUDASIM=1 on tiny shapes. Not collected directly (numba reads
the variable at import): test_cuda.py runs this file in a subprocess with it set."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from shardline.kernels.reference import dequantize_ref, matmul_ref

from shardline.kernels.formats import GGML_BLOCK, QType

from tests.kernels.helpers import KERNEL_FORMATS, NEW_GGML, assert_matmul_close, random_weight


@pytest.mark.parametrize("qtype,sym", KERNEL_FORMATS + [(q, True) for q in NEW_GGML])
def test_cuda_sim(qtype, sym):
    from shardline.kernels import cuda as kc
    assert kc.SIM
    rng = np.random.default_rng(21)
    k = 64 if qtype in ("q5_0", "q5_1") or GGML_BLOCK.get(QType(qtype), (32,))[0] == 32 else 256
    w = random_weight(qtype, sym, 5, k, rng)           # 5 rows: not a multiple of TILE
    wdeq = dequantize_ref(w)
    np.testing.assert_allclose(kc.dequantize(w, "cpu").numpy(), wdeq, rtol=1e-6,
                               atol=1e-6 * np.abs(wdeq).max())
    x = rng.standard_normal((3, k)).astype(np.float32)
    ref = matmul_ref(x, w).astype(np.float64)
    xt = torch.from_numpy(x)
    assert_matmul_close(kc.gemv(xt, w).numpy(), x, wdeq, ref)
    assert_matmul_close(kc.gemm(xt, w).numpy(), x, wdeq, ref)


def test_cuda_sim_gemm_tiles():
    from shardline.kernels import cuda as kc
    rng = np.random.default_rng(22)
    w = random_weight("q4_1", True, 17, 32, rng)        # 2 row tiles x 2 token tiles
    x = rng.standard_normal((17, 32)).astype(np.float32)
    assert_matmul_close(kc.gemm(torch.from_numpy(x), w).numpy(), x, dequantize_ref(w),
                        matmul_ref(x, w).astype(np.float64))
