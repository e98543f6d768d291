"""The 8-bit integer kernels of Q5_0, Q5_1 and the K-quants (shardline/kernels/qdot.py): matmuls
against the float64 reference within the bound of int8 activations, the fused decode MLP on
them, and that a model compiles the kernels of its own types only."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numba
import numpy as np
import pytest

from shardline.kernels import cpu, fused, qdot
from shardline.kernels.formats import GGML_BLOCK, QType
from shardline.kernels.reference import dequantize_ref, matmul_ref, unsigned_codes

from .helpers import NEW_GGML, assert_matmul_close_q8, random_ggml

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("qtype", NEW_GGML)
def test_qdot_matmul_vs_reference(qtype):
    """Every token count path (4 tokens per pass, then one by one), a row count that leaves a
    partial group of 16, single-block rows, and blocks with negative, tiny and large scales."""
    rng = np.random.default_rng(sum(map(ord, qtype)) + 1)
    bs = GGML_BLOCK[QType(qtype)][0]
    for out, k in ((37, 2 * bs), (16, bs)):
        w = random_ggml(qtype, out, k, rng)
        wdeq = dequantize_ref(w)
        for n in (1, 2, 4, 5, 9):
            x = rng.standard_normal((n, k)).astype(np.float32)
            x[:, :32] *= 100.0  # one block with larger activations than the rest
            assert_matmul_close_q8(cpu.gemv(x, w), x, wdeq)
            assert_matmul_close_q8(cpu.gemm(x, w), x, wdeq)


def test_qdot_parallel_and_zero_activations():
    """The row groups split over Numba's threads give the serial result bit for bit; an
    all-zero block of activations contributes exactly nothing."""
    rng = np.random.default_rng(3)
    w = random_ggml("q4_k", 16 * 8 * 2 + 5, 512, rng)
    x = rng.standard_normal((3, 512)).astype(np.float32)
    x[:, 64:96] = 0.0
    p = cpu._packed(w)
    serial = np.empty((3, w.out_features), np.float32)
    qdot.qdot_serial(*p, x, serial)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        par = np.empty_like(serial)
        qdot.qdot_parallel(*p, x, par, 4)
    finally:
        numba.set_num_threads(before)
    np.testing.assert_array_equal(par, serial)
    assert_matmul_close_q8(serial, x, dequantize_ref(w))


@pytest.mark.parametrize("qtype", ["q5_0", "q6_k", "q3_k"])
def test_packed_codes_follow_the_documented_layout(qtype):
    """Reading the packed bytes as the module doc says gives back every code of the weight."""
    w = random_ggml(qtype, 21, 256, np.random.default_rng(4))
    _, codes, _, _ = cpu._packed(w)
    groups, nb, cb = codes.shape
    c = codes.reshape(groups, nb, cb // 64, 16, 4).astype(np.int32)   # [g, b, word, row, byte i]
    got = np.zeros((groups, 16, nb, 32), np.int32)
    for wd in range(4):
        if qtype == "q3_k":
            lo, hi = (c[:, :, 0] >> (2 * wd)) & 3, (c[:, :, 1] >> (2 * wd)) & 3
            lo |= ((c[:, :, 2] >> wd) & 1) << 2
            hi |= ((c[:, :, 2] >> (4 + wd)) & 1) << 2
        else:
            lo, hi = c[:, :, wd] & 15, c[:, :, wd] >> 4
            if qtype == "q5_0":
                lo |= ((c[:, :, 4] >> wd) & 1) << 4
                hi |= ((c[:, :, 4] >> (4 + wd)) & 1) << 4
            else:
                lo |= ((c[:, :, 4] >> (2 * wd)) & 3) << 4
                hi |= ((c[:, :, 5] >> (2 * wd)) & 3) << 4
        got[..., 4 * wd:4 * wd + 4] = lo.transpose(0, 2, 1, 3)
        got[..., 16 + 4 * wd:16 + 4 * wd + 4] = hi.transpose(0, 2, 1, 3)
    np.testing.assert_array_equal(got.reshape(groups * 16, -1)[:21], unsigned_codes(w))


def test_fused_decode_mlp_on_mixed_types():
    """shardline/kernels/fused.py's decode MLP with a Q5_0 gate+up and a Q4_K down projection
    (as llama.cpp's Q4_K_M writes a 576-wide model): float64 SwiGLU of the dequantized weights,
    within the two GEMVs' activation-quantization error. (Q8_0/Q4_*'s float kernels in the same layer
    are tests/kernels/test_fused.py's.)"""
    rng = np.random.default_rng(5)
    hidden, ffn, n = 256, 512, 3
    x = rng.standard_normal((n, hidden)).astype(np.float32)
    norm_w = rng.uniform(0.5, 1.5, hidden).astype(np.float32)
    eps = np.float32(1e-5)
    for gu_type, dn_type in (("q5_0", "q4_k"),):
        gu = random_ggml(gu_type, 2 * ffn, hidden, rng, wide=False)
        dn = random_ggml(dn_type, hidden, ffn, rng, wide=False)
        got = fused.decode_mlp(x, norm_w, eps, *cpu._packed(gu), *cpu._packed(dn), 1)
        h = x.astype(np.float64) / np.sqrt((x.astype(np.float64) ** 2).mean(1, keepdims=True) + 1e-5) * norm_w
        g_u = h @ dequantize_ref(gu).astype(np.float64).T
        act = g_u[:, :ffn] / (1 + np.exp(-g_u[:, :ffn])) * g_u[:, ffn:]
        ref = act @ dequantize_ref(dn).astype(np.float64).T
        # two GEMVs at ~1e-5 relative each, the SwiGLU between them in float32
        np.testing.assert_allclose(got, ref, rtol=0, atol=3e-4 * np.abs(ref).max())


def test_a_model_compiles_only_its_own_types():
    """A fresh process multiplying Q4_1 and Q8_0 weights compiles (or loads from Numba's cache)
    no Q5/K-quant driver or integer kernel; one multiplying a Q4_K weight compiles Q4_K's alone
    (each driver specialization holds the decoder of its tag's format only, see cpu.dequant_row
    and qdot.word / qdot.scales)."""
    code = """
import numpy as np
from shardline.kernels import blocks, cpu, qdot
from shardline.kernels.formats import quantize
rng = np.random.default_rng(0)
x = rng.standard_normal((3, 512)).astype(np.float32)
for q in {types}:
    w = quantize(rng.standard_normal((40, 512)).astype(np.float32), q)
    cpu.gemv(x, w); cpu.gemm(x, w); cpu.dequantize(w)
kernels = (cpu._gemm, cpu._dequant, qdot.qdot_serial, qdot.qdot_parallel)
print(sorted({{str(s[0]) for k in kernels for s in k.signatures}}), len(qdot.qdot_serial.signatures))
"""
    def run(types):
        r = subprocess.run([sys.executable, "-c", code.format(types=types)], cwd=ROOT, capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        return r.stdout.strip().splitlines()[-1]

    assert run(["q4_1", "q8_0"]) == "['array(bool, 1d, C)'] 0"   # the LEGACY tag (dequantize) only
    assert run(["q4_k"]) == "['array(float32, 1d, C)'] 1"         # Q4_K's tag (code 9) only


@pytest.mark.parametrize("qtype", ["q4_k", "q5_0", "q6_k", "q2_k"])
def test_dequantize_from_the_packed_copy(qtype):
    """Once packed, dequantization (the torch tiles, the bf16 copy) reads the packed copy: the
    same values as the reference for any row range, group-aligned or not."""
    rng = np.random.default_rng(6)
    w = random_ggml(qtype, 70, 512, rng)
    ref = dequantize_ref(w)
    cpu.gemv(rng.standard_normal((1, 512)).astype(np.float32), w)  # packs
    assert w in cpu._pack_cache
    for start, stop in ((0, 70), (5, 37), (16, 64), (69, 70)):
        np.testing.assert_allclose(cpu.dequantize_rows(w, start, stop), ref[start:stop], rtol=1e-6,
                                   atol=1e-6 * np.abs(ref).max())
    with pytest.raises(ValueError, match="out of range"):
        cpu.dequantize_rows(w, 60, 71)


def _mapped_rss(path) -> int:
    """Resident bytes of this process's mappings of `path` (/proc/self/smaps, Linux)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:  # a mapping's header line
                inside = len(fields) >= 6 and fields[5] == str(path)
            elif inside and fields[0] == "Rss:":
                total += int(fields[1]) * 1024
    return total


def test_packing_a_memory_mapped_weight_releases_its_file_pages(tmp_path):
    """A weight read from a GGUF memmap: after packing, the file's pages leave the process's
    resident memory (the packed copy, at most 4% larger, replaces them rather than doubling
    them), and reading the original again still gives its bytes."""
    import gguf

    from shardline.kernels.formats import QuantizedWeight
    from shardline.kernels.quants import quantize_rows

    rng = np.random.default_rng(7)
    data = quantize_rows(rng.standard_normal((4096, 4096)).astype(np.float32), "Q4_K")  # 9.4 MB
    path = tmp_path / "w.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("w", data, raw_dtype=gguf.GGMLQuantizationType.Q4_K)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    w = QuantizedWeight.from_gguf(gguf.GGUFReader(str(path)).tensors[0])
    assert int(np.asarray(w.data, dtype=np.uint64).sum()) == int(data.sum(dtype=np.uint64))  # every page read
    assert _mapped_rss(path) >= data.nbytes
    p = cpu._packed(w)
    assert sum(a.nbytes for a in p[1:]) < 1.04 * data.nbytes
    assert _mapped_rss(path) < 64 * 1024, "the file's pages are still resident after packing"
    np.testing.assert_array_equal(w.data, data)
    assert not cpu.release_file_pages(np.ascontiguousarray(data))  # process memory: left alone
