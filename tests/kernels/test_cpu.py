"""Numba CPU kernels and dispatch against the NumPy reference; the real model's tensors."""
from __future__ import annotations

import functools
import os

import gguf
import numpy as np
import pytest
import torch

from shardline.kernels import cpu, dispatch
from shardline.kernels.dispatch import QuantizedLinear, quantized_matmul
from shardline.kernels.formats import GGML_BLOCK, QType, QuantizedWeight, quantize
from shardline.kernels.reference import dequantize_ref, matmul_ref

from .helpers import (KERNEL_FORMATS, MODEL, NEW_GGML, assert_matmul_close, assert_matmul_close_bf16,
                      assert_matmul_close_q8, random_ggml, random_weight)

# out_features not a multiple of any chunk/tile size; in_features a multiple of 32 (and of the
# group sizes used).
SHAPES = [(1, 64), (37, 96), (130, 256), (257, 384)]  # 257: 5 packed groups of 64, the last 1 row
TOKENS = [1, 2, 3, 4, 5, 17, 64]  # the packed kernels take tokens 4 at a time: every remainder


@pytest.mark.parametrize("qtype,sym", KERNEL_FORMATS)
@pytest.mark.parametrize("shape", SHAPES)
def test_kernels_vs_reference(qtype, sym, shape):
    rng = np.random.default_rng(hash((qtype, sym, shape)) % 2**32)
    g = 96 if shape[1] % 96 == 0 and qtype.startswith("int") else 32
    w = random_weight(qtype, sym, *shape, rng, group_size=g)
    wdeq = dequantize_ref(w)
    # q * s + m may be one fused multiply-add (fastmath): a few ulp of the group's magnitude
    np.testing.assert_allclose(cpu.dequantize(w), wdeq, rtol=1e-6, atol=1e-6 * np.abs(wdeq).max())
    for n in TOKENS:
        x = rng.standard_normal((n, shape[1])).astype(np.float32)
        ref = matmul_ref(x, w).astype(np.float64)
        for fn in (cpu.gemv, cpu.gemm, cpu.gemv_rowwise, cpu.gemm_rowwise):
            assert_matmul_close(fn(x, w), x, wdeq, ref)


@pytest.mark.parametrize("qtype,sym", KERNEL_FORMATS + [("f32", True), ("f16", True),
                                                        ("bf16", True)])
def test_dispatch_all_paths(qtype, sym):
    rng = np.random.default_rng(7)
    if qtype.startswith("f") or qtype == "bf16":
        w = quantize(rng.standard_normal((45, 128)).astype(np.float32), qtype)
    else:
        w = random_weight(qtype, sym, 45, 128, rng)
    wdeq = dequantize_ref(w)
    torch.testing.assert_close(dispatch.dequantize(w), torch.from_numpy(wdeq))
    float_w = qtype in ("f32", "f16", "bf16")
    # force the torch tile path (bf16, then fp32), then the kernel path
    for cross, bf16 in ((2, True), (2, False), (1000, True)):
        dispatch.set_crossover(w.qtype, w.shape, cross)
        dispatch.TILE_BF16 = bf16
        try:
            for n in TOKENS:
                x = rng.standard_normal((n, 128)).astype(np.float32)
                y = quantized_matmul(torch.from_numpy(x), w)
                assert y.dtype == torch.float32 and y.shape == (n, 45)
                check = (assert_matmul_close_bf16 if (bf16 and cross == 2 and n > 2 and not float_w)
                         or qtype == "bf16" else assert_matmul_close)  # bf16 weights: bf16 GEMM
                check(y.numpy(), x, wdeq, matmul_ref(x, w).astype(np.float64))
        finally:
            dispatch.TILE_BF16 = True
    dispatch._crossover.clear()


def test_crossover_table():
    w = random_weight("q4_1", True, 64, 128, np.random.default_rng(6))
    assert dispatch.crossover(w) == dispatch.CPU_CROSSOVER[w.qtype]
    dispatch.set_crossover(w.qtype, w.shape, 5)
    assert dispatch.crossover(w) == 5
    dispatch._crossover.clear()


def test_torch_tiles_many_tiles(monkeypatch):
    rng = np.random.default_rng(8)
    w = random_weight("q4_1", True, 100, 64, rng)
    monkeypatch.setattr(dispatch, "TILE_FLOATS", 64 * 16)  # 16-row tiles -> 7 tiles
    x = rng.standard_normal((5, 64)).astype(np.float32)
    y = dispatch._torch_tiles(torch.from_numpy(x), w).numpy()
    assert_matmul_close(y, x, dequantize_ref(w), matmul_ref(x, w).astype(np.float64))


def test_calibrate_caches_a_crossover():
    w = random_weight("q4_1", True, 64, 128, np.random.default_rng(9))
    c = dispatch.calibrate(w, tokens=(4, 8))
    assert c in (4, 8, 9) and dispatch.calibrate(w, tokens=(4, 8)) == c


def test_quantized_linear():
    rng = np.random.default_rng(10)
    w = random_weight("int4", False, 24, 64, rng)
    bias = torch.from_numpy(rng.standard_normal(24).astype(np.float32))
    lin = QuantizedLinear(w, bias)
    x = torch.from_numpy(rng.standard_normal((2, 3, 64)).astype(np.float32))
    y = lin(x)
    assert y.shape == (2, 3, 24)
    ref = matmul_ref(x.reshape(6, 64).numpy(), w) + bias.numpy()
    np.testing.assert_allclose(y.reshape(6, 24).numpy(), ref, rtol=1e-4, atol=1e-4)
    assert "int4" in repr(lin)


def test_errors():
    w = random_weight("q4_0", True, 8, 64, np.random.default_rng(11))
    with pytest.raises(ValueError, match=r"q4_0 weight \(8, 64\)"):
        quantized_matmul(torch.zeros(2, 32), w)
    with pytest.raises(ValueError, match="unsupported qtype"):
        cpu.gemv(np.zeros((1, 64), np.float32),
                 QuantizedWeight("f32", (8, 64), np.ones((8, 64), np.float32), group_size=1))


@pytest.mark.parametrize("qtype", NEW_GGML)
def test_new_ggml_kernels_vs_reference(qtype):
    """Q5_0, Q5_1 and the K-quants: the CPU dequantizer (the row decoders of the file layout),
    the row-wise kernels (float32 arithmetic: the same bound as the other formats; their dot
    loop is shared, so two formats) and gemv/gemm (the 8-bit integer kernels: the
    int8-activation bound) against the NumPy reference, on odd row counts, one- and
    several-block rows, and tensor-parallel shards."""
    rng = np.random.default_rng(sum(map(ord, qtype)))
    bs = GGML_BLOCK[QType(qtype)][0]
    for shape in ((1, bs), (37, 3 * bs)):
        w = random_ggml(qtype, *shape, rng)
        wdeq = dequantize_ref(w)
        np.testing.assert_allclose(cpu.dequantize(w), wdeq, rtol=1e-6, atol=1e-6 * np.abs(wdeq).max())
        for n in (1, 2, 3, 17):
            x = rng.standard_normal((n, shape[1])).astype(np.float32)
            ref = matmul_ref(x, w).astype(np.float64)
            if qtype in ("q5_0", "q4_k"):  # the row-wise drivers share one dot loop: two formats
                for fn in (cpu.gemv_rowwise, cpu.gemm_rowwise):
                    assert_matmul_close(fn(x, w), x, wdeq, ref)
            for fn in (cpu.gemv, cpu.gemm):
                assert_matmul_close_q8(fn(x, w), x, wdeq)
    for shard in (w.row_slice(5, 30), w.col_slice(bs, 3 * bs)):
        x = rng.standard_normal((2, shard.in_features)).astype(np.float32)
        assert_matmul_close_q8(cpu.gemv(x, shard), x, dequantize_ref(shard))


@pytest.mark.parametrize("qtype", NEW_GGML)
def test_new_ggml_dispatch(qtype):
    """quantized_matmul and QuantizedLinear on the new types: the kernel below the crossover,
    bf16 tiles above it; a bf16 copy built from the CPU dequantizer."""
    rng = np.random.default_rng(15)
    w = random_ggml(qtype, 45, 256, rng)
    wdeq = dequantize_ref(w)
    torch.testing.assert_close(dispatch.dequantize(w), torch.from_numpy(wdeq), rtol=1e-6, atol=1e-6 * np.abs(wdeq).max())
    assert dispatch.crossover(w) == dispatch.CPU_CROSSOVER[w.qtype]
    dispatch.set_crossover(w.qtype, w.shape, 5)  # both paths at small n
    try:
        for n in (1, 3, 6):
            x = rng.standard_normal((n, 256)).astype(np.float32)
            y = quantized_matmul(torch.from_numpy(x), w).numpy()
            if n < 5:
                assert_matmul_close_q8(y, x, wdeq)
            else:
                assert_matmul_close_bf16(y, x, wdeq, matmul_ref(x, w).astype(np.float64))
    finally:
        dispatch._crossover.clear()
    lin = QuantizedLinear(w)
    lin.keep_bf16_copy()
    torch.testing.assert_close(lin.bf16_copy().float(), torch.from_numpy(wdeq), rtol=2.0**-8, atol=1e-7)


@functools.lru_cache(maxsize=1)
def _model_tensors():
    return {x.name: x for x in gguf.GGUFReader(MODEL).tensors}


@pytest.mark.skipif(not os.path.exists(MODEL), reason="default model not installed")
@pytest.mark.parametrize("name", ["blk.0.ffn_down.weight", "blk.3.attn_k.weight",
                                  "blk.29.ffn_gate.weight", "token_embd.weight"])
def test_real_model_tensors(name):
    t = _model_tensors()[name]
    w = QuantizedWeight.from_gguf(t)
    if name == "token_embd.weight":
        w = w.row_slice(1000, 3003)  # lm_head shard: 2003 rows
    wdeq = gguf.quants.dequantize(np.asarray(w.data), t.tensor_type).reshape(w.shape)
    np.testing.assert_array_equal(cpu.dequantize(w), wdeq)
    rng = np.random.default_rng(13)
    for n in (1, 3, 17):
        x = rng.standard_normal((n, w.in_features)).astype(np.float32)
        ref = x.astype(np.float64) @ wdeq.astype(np.float64).T
        for fn in (cpu.gemv, cpu.gemm):
            assert_matmul_close(fn(x, w), x, wdeq, ref)
        dispatch.set_crossover(w.qtype, w.shape, 8)  # both paths run: n = 17 takes bf16 tiles
        check = assert_matmul_close_bf16 if n >= 8 and dispatch.TILE_BF16 else assert_matmul_close
        check(quantized_matmul(torch.from_numpy(x), w).numpy(), x, wdeq, ref)
    dispatch._crossover.clear()


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0", "q4_1"])
def test_packed_serial_and_parallel(qtype):
    """The packed kernels one-threaded and split over Numba's threads (groups >= 4 per thread)."""
    import numba
    rng = np.random.default_rng(14)
    w = random_weight(qtype, True, 64 * 9 + 3, 128, rng)
    wdeq = dequantize_ref(w)
    before = numba.get_num_threads()
    try:
        for threads in sorted({1, numba.config.NUMBA_NUM_THREADS}):
            numba.set_num_threads(threads)
            for n in (1, 6):
                x = rng.standard_normal((n, 128)).astype(np.float32)
                assert_matmul_close(cpu.gemv(x, w), x, wdeq, matmul_ref(x, w).astype(np.float64))
    finally:
        numba.set_num_threads(before)


@pytest.mark.parametrize("qtype,sym", [("q4_1", True), ("q8_0", True), ("int4", False)])
def test_bf16_copy_path(qtype, sym, monkeypatch):
    """QuantizedLinear.keep_bf16_copy: few tokens still take the packed kernel (float32 bound),
    many tokens multiply the bf16 copy (bf16 bound); tiles of the copy cover every row."""
    rng = np.random.default_rng(11)
    w = random_weight(qtype, sym, 100, 128, rng)
    monkeypatch.setattr(dispatch, "TILE_FLOATS", 128 * 16)  # 16-row tiles while copying
    lin = dispatch.QuantizedLinear(w)
    assert lin.keep_bf16_copy() == 100 * 128 * 2
    wdeq = dequantize_ref(w)
    # within one bf16 rounding (2^-8 relative) of the float32 reference dequantization
    torch.testing.assert_close(lin.bf16_copy().float(), torch.from_numpy(wdeq), rtol=2.0**-8, atol=1e-7)
    assert lin._bf16_blocked == torch.backends.mkldnn.is_available()  # oneDNN's layout where there is one
    for n in (1, dispatch.BF16_COPY_MIN_TOKENS - 1, dispatch.BF16_COPY_MIN_TOKENS, 40):
        x = rng.standard_normal((n, 128)).astype(np.float32)
        y = lin(torch.from_numpy(x)).numpy()
        check = assert_matmul_close_bf16 if n >= dispatch.BF16_COPY_MIN_TOKENS else assert_matmul_close
        check(y, x, wdeq, matmul_ref(x, w).astype(np.float64))
        if n >= dispatch.BF16_COPY_MIN_TOKENS:  # the blocked copy gives torch's plain bf16 product bit for bit
            plain = (torch.from_numpy(x).bfloat16() @ lin.bf16_copy().T).float().numpy()
            np.testing.assert_array_equal(y, plain)
    # a vocabulary-sized layer (here: 100 rows counted as wide) takes the copy from 2 tokens
    monkeypatch.setattr(dispatch, "WIDE_OUT_FEATURES", 100)
    x = torch.from_numpy(rng.standard_normal((2, 128)).astype(np.float32))
    np.testing.assert_array_equal(lin(x).numpy(), (x.bfloat16() @ lin.bf16_copy().T).float().numpy())
    assert lin.packed_kernel_args(2) is None and lin.packed_kernel_args(1) is not None or qtype == "int4"


@pytest.mark.parametrize("onednn", [True, False])
def test_swiglu_on_a_split_bf16_copy(onednn, monkeypatch):
    """A fused gate+up layer keeps its bf16 copy as two row blocks (`row_parts` = 2): `forward`
    still gives the plain bf16 product of the whole weight bit for bit, and `swiglu` gives
    SiLU(x Wg^T) * (x Wu^T) as bfloat16 within the bf16 roundings of a float64 reference (two
    GEMMs with bf16 inputs and outputs, SiLU and the product each rounded once more); both with
    oneDNN's post-ops and on the plain-layout path of a torch without oneDNN."""
    if onednn and not torch.backends.mkldnn.is_available():
        pytest.skip("needs a torch build with oneDNN (mkldnn); the case without it still runs")
    if not onednn:
        monkeypatch.setattr(dispatch, "_onednn_blocked", lambda w: (w, False))
    rng = np.random.default_rng(12)
    w = random_weight("q8_0", True, 2 * 64, 128, rng)
    monkeypatch.setattr(dispatch, "TILE_FLOATS", 128 * 16)
    lin = dispatch.QuantizedLinear(w)
    lin.row_parts = 2
    assert lin.keep_bf16_copy() == 128 * 128 * 2
    assert len(lin.weight_bf16) == 2 and lin._bf16_blocked == onednn
    wdeq = dequantize_ref(w).astype(np.float64)
    torch.testing.assert_close(lin.bf16_copy().float(), torch.from_numpy(wdeq).float(), rtol=2.0**-8, atol=1e-7)
    n = dispatch.BF16_COPY_MIN_TOKENS + 9
    x = rng.standard_normal((n, 128)).astype(np.float32)
    xt = torch.from_numpy(x)
    np.testing.assert_array_equal(lin(xt).numpy(), (xt.bfloat16() @ lin.bf16_copy().T).float().numpy())

    act = lin.swiglu(xt)
    assert act.dtype == torch.bfloat16 and tuple(act.shape) == (n, 64)
    g, u = x.astype(np.float64) @ wdeq[:64].T, x.astype(np.float64) @ wdeq[64:].T
    ref = g / (1 + np.exp(-g)) * u
    c = 2.0**-6  # each GEMM output: inputs and output rounded to bf16 (2^-8 each), float32 sums
    ag, au = np.abs(x) @ np.abs(wdeq[:64]).T, np.abs(x) @ np.abs(wdeq[64:]).T
    eg, eu = c * ag, c * au  # |GEMM output - exact|
    gmax, umax = np.abs(g) + eg, np.abs(u) + eu
    bound = (1.1 * eg + 2.0**-8 * gmax) * umax + gmax * eu + 2.0**-8 * gmax * umax + 1e-6  # |SiLU'| <= 1.1
    err = np.abs(act.float().numpy().astype(np.float64) - ref)
    assert np.all(err <= bound), f"max err {err.max():.3g}, worst ratio {(err / bound).max():.3g}"
    # gate and up swapped would be far outside the bound
    swapped = u / (1 + np.exp(-u)) * g
    assert np.any(np.abs(swapped - ref) > bound)
    # the down projection takes the bf16 activation as it is
    down = dispatch.QuantizedLinear(random_weight("q8_0", True, 48, 64, rng))
    down.keep_bf16_copy()
    np.testing.assert_array_equal(down(act).numpy(), (act @ down.bf16_copy().T).float().numpy())

    assert lin.swiglu(xt[: dispatch.BF16_COPY_MIN_TOKENS - 1]) is None  # few tokens: the packed kernels
    plain = dispatch.QuantizedLinear(w)
    plain.keep_bf16_copy()
    assert plain.swiglu(xt) is None  # one block: not a split gate+up
    odd = dispatch.QuantizedLinear(random_weight("q8_0", True, 3, 128, rng))
    odd.row_parts = 2
    with pytest.raises(ValueError, match="equal parts"):
        odd.keep_bf16_copy()
