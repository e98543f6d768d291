"""Formats: reference dequantizers vs gguf's, quantizer error bounds, slicing, GGUF loading."""
from __future__ import annotations

import os

import gguf
import numpy as np
import pytest

from shardline.kernels.formats import GGML_BLOCK, QType, QuantizedWeight, pack_nibbles, quantize, unpack_nibbles
from shardline.kernels.quants import quantize_rows
from shardline.kernels.reference import dequantize_ref, k4_scales, matmul_ref

from .helpers import K_QUANTS, MODEL, NEW_GGML, random_ggml

GGML_TYPES = ["q8_0", "q4_0", "q4_1"] + NEW_GGML


@pytest.mark.parametrize("qtype", GGML_TYPES)
@pytest.mark.parametrize("blocks", [(1, 1), (7, 3), (33, 2)])
def test_reference_matches_gguf(qtype, blocks):
    """Our NumPy dequantizers against gguf's (an independent implementation), bit for bit, on
    random blocks whose fp16 scales are negative, tiny (subnormal) and large."""
    rng = np.random.default_rng(1)
    shape = (blocks[0], blocks[1] * GGML_BLOCK[QType(qtype)][0])
    w = random_ggml(qtype, *shape, rng)
    ours = dequantize_ref(w)
    theirs = gguf.quants.dequantize(w.data, gguf.GGMLQuantizationType[qtype.upper()])
    assert np.count_nonzero(ours) > ours.size // 2 and np.all(np.isfinite(ours))
    np.testing.assert_array_equal(ours, theirs.reshape(shape))


@pytest.mark.parametrize("qtype", ["q4_k", "q5_k"])
def test_k4_scales_every_six_bit_value(qtype):
    """Q4_K/Q5_K's packed 6-bit scales and mins: random scale bytes over 64 rows x 2
    super-blocks reach all 64 values of both, and every one decodes as gguf decodes it."""
    w = random_ggml(qtype, 64, 512, np.random.default_rng(2))
    nb = GGML_BLOCK[w.qtype][1]
    sc, m = k4_scales(np.asarray(w.data).reshape(64, 2, nb)[..., 4:16])
    assert set(np.unique(sc)) == set(range(64)) and set(np.unique(m)) == set(range(64))
    theirs = gguf.quants.dequantize(w.data, gguf.GGMLQuantizationType[qtype.upper()])
    np.testing.assert_array_equal(dequantize_ref(w), theirs.reshape(w.shape))


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "f16", "bf16"])
def test_ggml_quantizers_match_ggml(qtype):
    """The 32-value types follow ggml's reference quantizers rounding for rounding: the same
    bytes as gguf's port of them."""
    rng = np.random.default_rng(2)
    w = (rng.standard_normal((5, 64)) * rng.uniform(0.01, 3, (5, 1)) + rng.uniform(-1, 1, (5, 1))).astype(np.float32)
    qw = quantize(w, qtype)
    t = gguf.GGMLQuantizationType[qtype.upper()]
    ref = gguf.quants.quantize(w, t)
    if qtype in ("f16", "bf16"):
        np.testing.assert_array_equal(dequantize_ref(qw), gguf.quants.dequantize(ref, t).reshape(w.shape))
    else:
        np.testing.assert_array_equal(qw.data, ref)


# (nmax: largest code, smax: largest sub-block scale, n: values per sub-block, affine)
K_QUANTIZER = {"q2_k": (3, 15, 16, True), "q3_k": (3, 31, 16, False), "q4_k": (15, 63, 32, True),
               "q5_k": (31, 63, 32, True), "q6_k": (31, 127, 16, False)}


@pytest.mark.parametrize("qtype", K_QUANTS + ["q5_0", "q8_0"])
def test_quantizer_roundtrip_through_gguf(qtype):
    """Our encoder's bytes, decoded by gguf, are within the documented bound of the input
    (shardline/kernels/quants.py): half of each sub-block's step plus half a super-block scale
    unit, steps taken from the input's own range, with fp16 rounding up of d and dmin."""
    rng = np.random.default_rng(4)
    rows = 9
    w = (rng.standard_normal((rows, 512)) * rng.uniform(0.01, 3, (rows, 1))
         + rng.uniform(-1, 1, (rows, 1))).astype(np.float32)
    w[0] = np.abs(w[0])          # a row without negative values: min 0, dmin 0
    w[1, :256] = 0.0             # an all-zero super-block
    data = quantize_rows(w, qtype.upper())
    assert data.shape == (rows, 512 // GGML_BLOCK[QType(qtype)][0] * GGML_BLOCK[QType(qtype)][1])
    deq = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[qtype.upper()]).reshape(w.shape)
    err = np.abs(deq - w)
    up = 1 + 2.0**-10  # fp16 rounding up of a super-block scale
    slack = 1e-6 * np.abs(w).max(axis=1, keepdims=True)
    if qtype in K_QUANTIZER:
        nmax, smax, n, affine = K_QUANTIZER[qtype]
        x = w.reshape(rows, 2, 256 // n, n)
        if affine:
            neg = np.maximum(0, -x.min(axis=-1))
            dmin = neg.max(axis=-1, keepdims=True) / smax * up
            step = (x.max(axis=-1) + neg + dmin) / nmax
        else:
            step = np.abs(x).max(axis=-1) / nmax
        d = step.max(axis=-1, keepdims=True) / smax * up
        bound = np.repeat(((step + d) / 2).reshape(rows, -1), n, axis=1)
    else:  # q8_0: half a step; q5_0: a whole step where the code of -max clips at 31 (ggml's
        # d = max / -16 maps +max to 0 and -max to 32)
        levels, steps = (16, 1.0) if qtype == "q5_0" else (127, 0.5)
        step = np.abs(w.reshape(rows, -1, 32)).max(axis=-1) / levels
        bound = np.repeat(step * (steps + 2.0**-11 * levels), 32, axis=1)  # + fp16 rounding of d
    assert np.all(err <= bound + slack), f"worst ratio {(err / (bound + slack)).max():.3f}"
    assert np.all(deq[1, :256] == 0)
    rel = np.sqrt(((deq - w) ** 2).mean() / (w**2).mean())
    assert rel < {"q2_k": 0.45, "q3_k": 0.25, "q4_k": 0.1, "q5_k": 0.05, "q6_k": 0.03,
                  "q5_0": 0.05, "q8_0": 0.01}[qtype], rel


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
                                        ("int8", True), ("q5_0", True), ("q5_1", True)])
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


@pytest.mark.parametrize("qtype", K_QUANTS)
def test_k_quant_slices_take_whole_super_blocks(qtype):
    """Tensor-parallel shards of a K-quant weight: row slices are views; column slices copy
    whole 256-value super-blocks; a slice inside a super-block is refused, saying why."""
    w = random_ggml(qtype, 13, 768, np.random.default_rng(6))
    full = dequantize_ref(w)
    rs = w.row_slice(3, 10)
    assert np.shares_memory(rs.data, w.data) and rs.group_size == 256
    np.testing.assert_array_equal(dequantize_ref(rs), full[3:10])
    cs = w.col_slice(256, 768)
    assert cs.shape == (13, 512) and cs.data.flags.c_contiguous
    np.testing.assert_array_equal(dequantize_ref(cs), full[:, 256:768])
    for start, stop in ((32, 288), (0, 384), (128, 512)):  # 32-aligned, not 256-aligned
        with pytest.raises(ValueError, match="super-block.*multiple of 256"):
            w.col_slice(start, stop)


def test_from_gguf_every_ggml_type(tmp_path):
    """A GGUF written with gguf's writer holding one tensor of each block type (our encoder's
    bytes): each loads without a copy, with its qtype, shape and values."""
    rng = np.random.default_rng(7)
    path = tmp_path / "types.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    expect = {}
    for i, qtype in enumerate(GGML_TYPES):
        w = rng.standard_normal((3 + i, 512)).astype(np.float32)
        data = quantize_rows(w, qtype.upper())
        expect[f"t.{qtype}"] = (qtype, data)
        writer.add_tensor(f"t.{qtype}", data, raw_dtype=gguf.GGMLQuantizationType[qtype.upper()])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    for name, (qtype, data) in expect.items():
        qw = QuantizedWeight.from_gguf(tensors[name])
        assert qw.qtype is QType(qtype) and qw.shape == (data.shape[0], 512)
        assert qw.group_size == GGML_BLOCK[qw.qtype][0]
        assert np.shares_memory(qw.data, tensors[name].data)
        np.testing.assert_array_equal(qw.data, data)
        np.testing.assert_array_equal(
            dequantize_ref(qw),
            gguf.quants.dequantize(data, gguf.GGMLQuantizationType[qtype.upper()]).reshape(qw.shape))


def test_errors_name_qtype_and_shape():
    with pytest.raises(ValueError, match="iq2_xxs"):
        QuantizedWeight("iq2_xxs", (4, 256), np.zeros((4, 66), np.uint8))
    with pytest.raises(ValueError, match="q5_0.*22"):
        QuantizedWeight("q5_0", (4, 32), np.zeros((4, 20), np.uint8))
    with pytest.raises(ValueError, match="q4_k.*multiple of 256"):
        QuantizedWeight("q4_k", (4, 288), np.zeros((4, 162), np.uint8))
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize(np.ones((2, 288), np.float32), "q6_k")
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
