"""Paged decode attention (shardline.kernels.attention) against an independent NumPy softmax(qk^T)v over
each sequence's context gathered from its block table, and against the torch SDPA path; the
prefill (causal) kernel against NumPy with a causal mask."""
import numpy as np
import pytest
import torch

from numba import njit

from shardline.kernels.attention import (_paged_decode, causal_attention, causal_attention_torch, exp_nonpositive,
                               load_float32, paged_decode_attention, paged_decode_attention_torch, store_as)


def _numpy_reference(q, k_cache, v_cache, tables, lens, block_size, scale):
    seqs, heads, dim = q.shape
    group = heads // k_cache.shape[1]
    out = np.zeros_like(q)
    for b in range(seqs):
        pos = np.arange(lens[b])
        slots = tables[b][pos // block_size] * block_size + pos % block_size
        for j in range(heads):
            k = k_cache[slots, j // group].astype(np.float64)
            v = v_cache[slots, j // group].astype(np.float64)
            s = k @ q[b, j].astype(np.float64) * scale
            p = np.exp(s - s.max())
            out[b, j] = (p / p.sum()) @ v
    return out


def _case(seed, seqs, heads, kv_heads, dim, block_size, max_len, num_blocks=64):
    rng = np.random.default_rng(seed)
    lens = rng.integers(1, max_len + 1, seqs).astype(np.int32)
    width = -(-int(lens.max()) // block_size)
    # every sequence gets distinct random blocks of the pool (as the block manager would)
    perm = rng.permutation(num_blocks)[: seqs * width].reshape(seqs, width).astype(np.int32)
    q = rng.standard_normal((seqs, heads, dim)).astype(np.float32)
    k = rng.standard_normal((num_blocks * block_size, kv_heads, dim)).astype(np.float32)
    v = rng.standard_normal((num_blocks * block_size, kv_heads, dim)).astype(np.float32)
    return q, k, v, perm, lens


@pytest.mark.parametrize("kv_dtype", [np.float32, np.float16])
@pytest.mark.parametrize("seqs,heads,kv_heads,dim,block_size,max_len", [
    (1, 1, 1, 8, 4, 1),  # one token of context
    (5, 9, 3, 64, 16, 40),  # SmolLM2's heads, lengths across block edges
    (3, 4, 4, 32, 8, 37),  # no grouping
    (7, 8, 1, 16, 1, 9),  # multi-query, block size 1
])
def test_paged_decode_matches_numpy(seqs, heads, kv_heads, dim, block_size, max_len, kv_dtype):
    q, k, v, tables, lens = _case(seqs, seqs, heads, kv_heads, dim, block_size, max_len)
    k, v = k.astype(kv_dtype), v.astype(kv_dtype)  # float16: the reference widens the same values
    scale = 1 / np.sqrt(dim)
    want = _numpy_reference(q, k, v, tables, lens, block_size, scale)
    args = (torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v), torch.from_numpy(tables),
            torch.from_numpy(lens), block_size)
    np.testing.assert_allclose(paged_decode_attention(*args).numpy(), want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(paged_decode_attention_torch(*args).numpy(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kv_dtype", [np.float32, np.float16])
@pytest.mark.parametrize("per_sequence", [True, False])
@pytest.mark.parametrize("seqs,heads,kv_heads,dim,block_size,max_len", [
    (6, 9, 3, 64, 16, 70),  # SmolLM2's heads
    (2, 6, 2, 24, 5, 23),  # block size and head_dim not powers of two (the scalar kernel)
    (4, 16, 2, 32, 32, 100),  # groups of 8 (two passes of four heads), 32-token blocks
    (3, 10, 2, 48, 16, 50),  # groups of 5 (four heads, then one)
    (3, 4, 4, 128, 16, 33),  # no grouping, head_dim 128
])
def test_both_work_splits_match_numpy(per_sequence, seqs, heads, kv_heads, dim, block_size, max_len, kv_dtype):
    """The kernel's two work splits (one sequence per work item, all heads; or one (sequence, KV
    head) per work item), whichever the thread count would pick; a float16 cache goes in as its
    int16 bit patterns."""
    q, k, v, tables, lens = _case(seqs + 100, seqs, heads, kv_heads, dim, block_size, max_len)
    k, v = k.astype(kv_dtype), v.astype(kv_dtype)
    scale = 1 / np.sqrt(dim)
    out = np.full_like(q, np.nan)
    bits = (lambda a: a.view(np.int16)) if kv_dtype == np.float16 else (lambda a: a)
    _paged_decode(q, bits(k), bits(v), tables, lens, block_size, np.float32(scale), out, per_sequence)
    np.testing.assert_allclose(out, _numpy_reference(q, k, v, tables, lens, block_size, scale), rtol=1e-4, atol=1e-5)


def test_paged_decode_refuses_bad_shapes():
    q, k, v, tables, lens = _case(0, 2, 9, 3, 8, 4, 8)
    t = [torch.from_numpy(a) for a in (q, k, v, tables, lens)]
    with pytest.raises(ValueError, match="group"):
        paged_decode_attention(t[0][:, :4], t[1], t[2], t[3], t[4], 4)
    with pytest.raises(ValueError, match="context_lens"):
        paged_decode_attention(t[0], t[1], t[2], t[3], t[4] * 0, 4)


@njit(cache=True)
def _exp_all(x, out):
    for i in range(x.shape[0]):
        out[i] = exp_nonpositive(x[i])


def test_exp_nonpositive_matches_numpy():
    """The softmax's polynomial exp against NumPy's (float64) on [-87, 0] and at the ends."""
    x = np.concatenate([-np.random.default_rng(0).random(100_000) * 87, [0.0, -1e-8, -0.5, -87.0]]).astype(np.float32)
    got = np.empty_like(x)
    _exp_all(x, got)
    want = np.exp(x.astype(np.float64))
    np.testing.assert_allclose(got, want, rtol=3e-7, atol=0)
    far = np.array([-88.0, -200.0, -1e30], np.float32)  # clamped at -87: tiny, never negative or NaN
    _exp_all(far, got[:3])
    assert np.all((got[:3] >= 0) & (got[:3] < 2e-38))


@njit(cache=True)
def _to_half_and_back(x, bits, back):
    for i in range(x.shape[0]):
        bits[i] = store_as(x[i], bits[0])
        back[i] = load_float32(bits[i])


def test_float16_store_and_load_match_numpy():
    """store_as rounds float32 to binary16 as NumPy does (nearest even; overflow to inf;
    subnormals), load_float32 widens exactly."""
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.standard_normal(10_000) * 10 ** rng.uniform(-8, 5, 10_000),
                        [0.0, -0.0, 65504.0, 65520.0, -1e6, 6e-8, 1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11]]).astype(np.float32)
    bits = np.zeros(x.shape, np.int16)
    back = np.empty_like(x)
    _to_half_and_back(x, bits, back)
    with np.errstate(over="ignore"):  # 65520 and -1e6 overflow to inf, as intended
        want = x.astype(np.float16)
    np.testing.assert_array_equal(bits, want.view(np.int16))
    np.testing.assert_array_equal(back, want.astype(np.float32))


def test_bfloat16_store_and_load_match_torch():
    """store_as into uint16 rounds float32 to bfloat16 as torch's `.bfloat16()` does (nearest,
    ties to even; overflow to inf; NaN to NaN), and load_float32 widens it as `.float()`."""
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.standard_normal(10_000) * 10 ** rng.uniform(-40, 38, 10_000),
                        [0.0, -0.0, 1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8, 1 + 2.0 ** -9, 3.3895e38, -3.4e38, 1e-45,
                         np.inf, -np.inf]]).astype(np.float32)
    x = np.concatenate([x, (rng.integers(0, 2 ** 16, 1000, dtype=np.uint32) << 16
                            | 0x8000).view(np.float32)])  # exact ties, every exponent
    bits = np.zeros(x.shape, np.uint16)
    back = np.empty_like(x)
    _to_half_and_back(x, bits, back)
    want = torch.from_numpy(x).bfloat16()
    num = ~np.isnan(x)  # the random ties include NaN patterns; torch keeps some payloads, we do not
    assert num.sum() > 10_500
    np.testing.assert_array_equal(bits[num], want.view(torch.uint16).numpy()[num])
    np.testing.assert_array_equal(back[num], want.float().numpy()[num])
    assert np.all(np.isnan(back[~num]))
    # NaNs stay NaN, also one whose payload is only in the bits that are cut off
    nan = np.array([0x7FC00000, 0xFFC00000, 0x7F800001], np.uint32).view(np.float32)
    nan_bits, nan_back = np.zeros(3, np.uint16), np.empty(3, np.float32)
    _to_half_and_back(nan, nan_bits, nan_back)
    assert np.all(np.isnan(nan_back))


@pytest.mark.parametrize("kv_dtype", [np.float32, np.float16])
def test_slots_past_the_context_are_never_used(kv_dtype):
    """The vector kernel reads K 16 rows at a time, past a sequence's last token within its last
    block: those slots hold NaN here (freed blocks hold stale values), and the output is still
    exact and finite."""
    q, k, v, tables, lens = _case(7, 5, 9, 3, 64, 16, 45)
    used = np.zeros(k.shape[0], bool)
    for b in range(len(lens)):
        pos = np.arange(lens[b])
        used[tables[b][pos // 16] * 16 + pos % 16] = True
    k[~used], v[~used] = np.nan, np.nan
    k, v = k.astype(kv_dtype), v.astype(kv_dtype)
    bits = (lambda a: a.view(np.int16)) if kv_dtype == np.float16 else (lambda a: a)
    for per_sequence in (True, False):
        out = np.full_like(q, np.nan)
        _paged_decode(q, bits(k), bits(v), tables, lens, 16, np.float32(0.125), out, per_sequence)
        np.testing.assert_allclose(out, _numpy_reference(q, k, v, tables, lens, 16, 0.125), rtol=1e-4, atol=1e-5)


def _causal_numpy(q, k, v, scale):
    """float64 softmax(q k^T * scale) v; row i (position L - n + i) sees keys 0 .. L - n + i."""
    n, heads, _ = q.shape
    L, kv_heads, _ = k.shape
    out = np.zeros(q.shape, np.float64)
    for j in range(heads):
        kk, vv = k[:, j // (heads // kv_heads)].astype(np.float64), v[:, j // (heads // kv_heads)].astype(np.float64)
        for i in range(n):
            s = kk[: L - n + i + 1] @ q[i, j].astype(np.float64) * scale
            p = np.exp(s - s.max())
            out[i, j] = (p / p.sum()) @ vv[: L - n + i + 1]
    return out


@pytest.mark.parametrize("n,L,heads,kv_heads,dim", [
    (128, 128, 9, 3, 64),  # SmolLM2's prompt chunk: the whole context is this step's
    (7, 40, 9, 3, 64),     # a chunk after 33 cached tokens
    (1, 1, 4, 2, 32),
    (5, 5, 4, 4, 16),      # fewer rows than a row block
    (33, 97, 6, 2, 16),    # key count not a multiple of 16
    (3, 20, 4, 1, 24),     # head_dim not a multiple of 16: the torch path
])
def test_causal_attention_matches_numpy(n, L, heads, kv_heads, dim):
    rng = np.random.default_rng(n * 1000 + L)
    q = rng.standard_normal((n, heads, dim)).astype(np.float32) * 2
    k = rng.standard_normal((L, kv_heads, dim)).astype(np.float32) * 2
    v = rng.standard_normal((L, kv_heads, dim)).astype(np.float32)
    scale = 1 / np.sqrt(dim)
    want = _causal_numpy(q, k, v, scale)
    got = causal_attention(torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v)).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)
    sdpa = causal_attention_torch(torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v)).numpy()
    np.testing.assert_allclose(sdpa, want, rtol=0, atol=2e-5)


def test_causal_attention_ignores_keys_past_each_row():
    """Changing the keys and values after position p must not change rows at positions <= p."""
    rng = np.random.default_rng(5)
    q, k, v = (torch.from_numpy(rng.standard_normal(s).astype(np.float32)) for s in ((40, 9, 64), (50, 3, 64), (50, 3, 64)))
    a = causal_attention(q, k, v)
    k2, v2 = k.clone(), v.clone()
    k2[30:], v2[30:] = 1e3, -1e3  # positions 30.. ; row i sits at position 10 + i
    b = causal_attention(q, k2, v2)
    assert torch.equal(a[:20], b[:20])
    assert not torch.allclose(a[20:], b[20:])


def test_causal_attention_refuses_bad_shapes():
    q = torch.zeros(4, 9, 64)
    with pytest.raises(ValueError):
        causal_attention(q, torch.zeros(3, 3, 64), torch.zeros(3, 3, 64))  # more queries than keys
    with pytest.raises(ValueError):
        causal_attention(q, torch.zeros(8, 2, 64), torch.zeros(8, 2, 64))  # 9 heads over 2 KV heads
    with pytest.raises(ValueError):
        causal_attention(q, torch.zeros(8, 3, 64), torch.zeros(8, 3, 32))
