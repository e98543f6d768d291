"""The 16-lane vector intrinsics (shardline.kernels.simd) against NumPy: loads (float32 and float16 bit
patterns), stores, splat, fma, prefetch, and the fold tree that turns 16 partial-sum vectors
into 16 dot products."""
import numpy as np
from numba import njit

from shardline.kernels.simd import fold1, fold2, fold4, fold8, prefetch, vfma, vload, vsplat, vstore, vzero


@njit(cache=True)
def _sixteen_dots(a, b, out):
    """out[i] = a[i] . b[i] for 16 rows of width a multiple of 16."""
    width = a.shape[1]
    p0 = p1 = p2 = p3 = p4 = p5 = p6 = p7 = vzero()
    p8 = p9 = p10 = p11 = p12 = p13 = p14 = p15 = vzero()
    for c in range(0, width, 16):
        p0 = vfma(vload(a, 0 * width + c), vload(b, 0 * width + c), p0)
        p1 = vfma(vload(a, 1 * width + c), vload(b, 1 * width + c), p1)
        p2 = vfma(vload(a, 2 * width + c), vload(b, 2 * width + c), p2)
        p3 = vfma(vload(a, 3 * width + c), vload(b, 3 * width + c), p3)
        p4 = vfma(vload(a, 4 * width + c), vload(b, 4 * width + c), p4)
        p5 = vfma(vload(a, 5 * width + c), vload(b, 5 * width + c), p5)
        p6 = vfma(vload(a, 6 * width + c), vload(b, 6 * width + c), p6)
        p7 = vfma(vload(a, 7 * width + c), vload(b, 7 * width + c), p7)
        p8 = vfma(vload(a, 8 * width + c), vload(b, 8 * width + c), p8)
        p9 = vfma(vload(a, 9 * width + c), vload(b, 9 * width + c), p9)
        p10 = vfma(vload(a, 10 * width + c), vload(b, 10 * width + c), p10)
        p11 = vfma(vload(a, 11 * width + c), vload(b, 11 * width + c), p11)
        p12 = vfma(vload(a, 12 * width + c), vload(b, 12 * width + c), p12)
        p13 = vfma(vload(a, 13 * width + c), vload(b, 13 * width + c), p13)
        p14 = vfma(vload(a, 14 * width + c), vload(b, 14 * width + c), p14)
        p15 = vfma(vload(a, 15 * width + c), vload(b, 15 * width + c), p15)
    lo = fold2(fold4(fold8(p0, p1), fold8(p2, p3)), fold4(fold8(p4, p5), fold8(p6, p7)))
    hi = fold2(fold4(fold8(p8, p9), fold8(p10, p11)), fold4(fold8(p12, p13), fold8(p14, p15)))
    vstore(out, 0, fold1(lo, hi))


def test_fold_tree_gives_sixteen_dot_products():
    rng = np.random.default_rng(0)
    for width in (16, 64, 128):
        a = rng.standard_normal((16, width)).astype(np.float32)
        b = rng.standard_normal((16, width)).astype(np.float32)
        out = np.zeros(16, np.float32)
        _sixteen_dots(a, b, out)
        want = np.einsum("ij,ij->i", a.astype(np.float64), b.astype(np.float64))
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5 * np.sqrt(width))


def test_each_fold_keeps_segment_order():
    """fold8 .. fold1 on vectors whose lane values identify (vector, lane): each output lane is
    the sum the docstrings promise."""
    vecs = np.arange(32, dtype=np.float32).reshape(2, 16) * np.float32(1.0)
    x, y = vecs[0], vecs[1]
    out = np.zeros(64, np.float32)
    _apply_folds(x, y, out)
    for i, width in enumerate((16, 8, 4, 2)):  # fold8, fold4, fold2, fold1
        half = width // 2
        want = []
        for src in (x, y):
            for s in range(16 // width):
                seg = src[s * width:(s + 1) * width]
                want += list(seg[:half] + seg[half:])
        np.testing.assert_array_equal(out[16 * i:16 * (i + 1)], np.array(want, np.float32))


@njit(cache=True)
def _apply_folds(x, y, out):
    vx, vy = vload(x, 0), vload(y, 0)
    vstore(out, 0, fold8(vx, vy))
    vstore(out, 16, fold4(vx, vy))
    vstore(out, 32, fold2(vx, vy))
    vstore(out, 48, fold1(vx, vy))


@njit(cache=True)
def _load_splat_mul(bits, x, s, out):
    vstore(out, 0, vload(bits, 0))
    vstore(out, 16, vload(x, 16))
    vstore(out, 32, vfma(vsplat(s), vload(x, 0), vzero()))


def test_loads_widen_float16_and_store_float32():
    rng = np.random.default_rng(2)
    half = (rng.standard_normal(16) * 100).astype(np.float16)
    x = rng.standard_normal(32).astype(np.float32)
    out = np.zeros(48, np.float32)
    _load_splat_mul(half.view(np.int16), x, np.float32(1.5), out)
    np.testing.assert_array_equal(out[:16], half.astype(np.float32))
    np.testing.assert_array_equal(out[16:32], x[16:])
    np.testing.assert_allclose(out[32:], np.float32(1.5) * x[:16], rtol=1e-7)


@njit
def _sum_with_prefetch(a, ahead):
    flat = a.ravel()
    total = np.float32(0)
    for i in range(flat.size):
        if i + ahead < flat.size:
            prefetch(a, i + ahead)
        total += flat[i]
    return total


def test_prefetch_is_a_hint_that_changes_nothing():
    """prefetch emits LLVM's llvm.prefetch and leaves results alone, up to the last element."""
    a = np.arange(1000, dtype=np.float32).reshape(10, 100)
    for ahead in (0, 1, 64, 999):
        assert _sum_with_prefetch(a, ahead) == np.float32(a.sum())
    h = np.zeros(48, np.int16)  # any dtype: the float16 KV cache is int16 bits
    assert _sum_with_prefetch(h, 16) == 0
    ir = "".join(_sum_with_prefetch.inspect_llvm().values())
    assert "llvm.prefetch" in ir
