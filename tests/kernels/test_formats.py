"""Formats: reference dequantizers vs gguf's, quantizer error bounds, slicing, GGUF loading."""
from __future__ import annotations

import os

import gguf
import numpy as np
import pytest

from shardline.kernels.formats import QType, QuantizedWeight, pack_nibbles, quantize, unpack_nibbles
from shardline.kernels.reference import dequantize_ref, matmul_ref

from .helpers import MODEL, random_ggml


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0", "q4_1"])
@pytest.mark.parametrize("shape", [(1, 32), (7, 96), (33, 256)])
def test_reference_matches_gguf(qtype, shape):
    rng = np.random.default_rng(1)
    w = random_ggml(qtype, *shape, rng)
    ours = dequantize_ref(w)
    theirs = gguf.quants.dequantize(w.data, gguf.GGMLQuantizationType[qtype.upper()])
    assert np.count_nonzero(ours) > ours.size // 2
    np.testing.assert_array_equal(ours, theirs.reshape(shape))


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0", "q4_1", "f16", "bf16"])
def test_ggml_quantizers_roundtrip(qtype):
    rng = np.random.default_rng(2)
    w = rng.standard_normal((5, 64)).astype(np.float32)
    qw = quantize(w, qtype)
    ref = gguf.quants.dequantize(gguf.quants.quantize(w, gguf.GGMLQuantizationType[qtype.upper()]),
                                 gguf.GGMLQuantizationType[qtype.upper()])
    np.testing.assert_allclose(dequantize_ref(qw), ref.reshape(w.shape), rtol=0, atol=0)


@pytest.mark.parametrize("qtype,levels_sym,levels_asym", [("int8", 127, 255), ("int4", 7, 15)])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [True, False])
def test_own_quantizer_error_bound(qtype, levels_sym, levels_asym, group_size, symmetric):
    """Round to nearest: |w - deq| <= s/2 per group, s = amax/levels (sym) or range/levels (asym);
    a 1e-6 relative slack covers float32 rounding of s * q + m."""
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((9, 256)) * rng.uniform(0.1, 3, (9, 1)) + 0.3).astype(np.float32)
    qw = quantize(w, qtype, group_size=group_size, symmetric=symmetric)
    err = np.abs(dequantize_ref(qw) - w).reshape(9, -1, group_size)
    wg = w.reshape(9, -1, group_size)
    if symmetric:
        half_step = np.abs(wg).max(axis=2) / levels_sym / 2
    else:
        half_step = (wg.max(axis=2) - wg.min(axis=2)) / levels_asym / 2
    slack = 1e-6 * np.abs(wg).max(axis=2)
    assert np.all(err.max(axis=2) <= half_step + slack)
    assert qw.nbytes < w.nbytes / (3 if qtype == "int8" else 5)


def test_nibble_order_is_ggml():
    nib = np.arange(32, dtype=np.uint8)[None] % 16
    packed = pack_nibbles(nib)
    assert packed[0, 0] == (0 | (0 << 4)) and packed[0, 1] == (1 | (1 << 4))
    nib2 = np.random.default_rng(4).integers(0, 16, (3, 128), dtype=np.uint8)
    np.testing.assert_array_equal(unpack_nibbles(pack_nibbles(nib2)), nib2)
    # value j in the low nibble of byte j, value j+16 in its high nibble
    v = np.zeros((1, 32), np.uint8)
    v[0, 16] = 5
    assert pack_nibbles(v)[0, 0] == 0x50


@pytest.mark.parametrize("qtype,sym", [("q4_1", True), ("q8_0", True), ("int4", False),
                                        ("int8", True)])
def test_row_and_col_slice(qtype, sym):
    rng = np.random.default_rng(5)
    w = quantize(rng.standard_normal((40, 128)).astype(np.float32), qtype, group_size=32,
                 symmetric=sym)
    full = dequantize_ref(w)
    rs = w.row_slice(10, 25)
    assert np.shares_memory(rs.data, w.data) and rs.shape == (15, 128)
    np.testing.assert_array_equal(dequantize_ref(rs), full[10:25])
    cs = w.col_slice(32, 96)
    assert cs.shape == (40, 64)
    np.testing.assert_array_equal(dequantize_ref(cs), full[:, 32:96])
    with pytest.raises(ValueError, match="aligned"):
        w.col_slice(16, 64)
    with pytest.raises(ValueError, match="row_slice"):
        w.row_slice(30, 50)


def test_errors_name_qtype_and_shape():
    with pytest.raises(ValueError, match="q5_0"):
        QuantizedWeight("q5_0", (4, 32), np.zeros((4, 22), np.uint8))
    with pytest.raises(ValueError, match="q4_1.*40"):
        QuantizedWeight("q4_1", (4, 64), np.zeros((4, 41), np.uint8))
    with pytest.raises(ValueError, match="in_features=48"):
        quantize(np.ones((2, 48), np.float32), "int4")
    w = quantize(np.ones((2, 64), np.float32), "int8")
    with pytest.raises(ValueError, match="64"):
        matmul_ref(np.ones((1, 32), np.float32), w)


@pytest.mark.skipif(not os.path.exists(MODEL), reason="default model not installed")
def test_from_gguf_no_copy():
    r = gguf.GGUFReader(MODEL)
    t = {x.name: x for x in r.tensors}
    emb = QuantizedWeight.from_gguf(t["token_embd.weight"])
    assert emb.qtype is QType.Q8_0 and emb.shape == (49152, 576) and emb.nbytes == 30081024
    assert np.shares_memory(emb.data, t["token_embd.weight"].data)
    down = QuantizedWeight.from_gguf(t["blk.0.ffn_down.weight"])
    assert down.qtype is QType.Q4_1 and down.shape == (576, 1536)
    with pytest.raises(ValueError, match="2-D"):
        QuantizedWeight.from_gguf(t["blk.0.attn_norm.weight"])
