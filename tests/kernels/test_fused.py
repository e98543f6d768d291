"""The fused decode layer (shardline/kernels/fused.py) against the unfused DecoderLayer path of
shardline/worker/model.py on the real SmolLM2 weights: same hidden states / logits (to float32 rounding)
and the same K/V written into the cache (float16 and float32), for one and several decode
sequences, with and without a tensor-parallel split, and the fallback when a layer's linears would not take the packed
kernels."""
from __future__ import annotations

import pytest
import torch

from shardline.kernels import fused
from shardline.model_file import read_model_spec, resolve_model_path
from shardline.worker.kv_cache import KVCache
from shardline.worker.loader import GGUFShardLoader, ShardSpec
from shardline.worker.model import StageModel, build_attention_metadata

PATH = str(resolve_model_path("smollm2-135m"))
SPEC = read_model_spec(PATH)
BLOCK = 16


def _run(shard: ShardSpec, fused: bool, prompt_lens: list[int], decode_steps: int, seed: int = 0,
         kv_dtype: torch.dtype = torch.float16):
    """Prefill each sequence (unfused: many tokens), then `decode_steps` pure decode steps of all
    sequences together; returns the decode outputs and the KV cache."""
    model = StageModel(SPEC, GGUFShardLoader(PATH, SPEC, shard), 256)
    model.fused_decode = fused
    n_layers = shard.layer_end - shard.layer_start
    kv = KVCache(n_layers, 32, BLOCK, SPEC.num_kv_heads // shard.tp_size, SPEC.head_dim, dtype=kv_dtype)
    gen = torch.Generator().manual_seed(seed)
    tables = [list(range(i * 6, i * 6 + 6)) for i in range(len(prompt_lens))]  # 96 slots each

    def inputs(n):
        if shard.is_first:
            return torch.randint(0, SPEC.vocab_size, (n,), generator=gen)
        return torch.randn(n, SPEC.hidden_size, generator=gen)

    for length, table in zip(prompt_lens, tables):
        model(inputs(length), build_attention_metadata([(0, length, table, True)], BLOCK), kv)
    outs = []
    for step in range(decode_steps):
        entries = [(length + step, 1, table, True) for length, table in zip(prompt_lens, tables)]
        meta = build_attention_metadata(entries, BLOCK)
        assert meta.decode_rows_all
        outs.append(model(inputs(len(prompt_lens)), meta, kv))
    return outs, kv, model


@pytest.mark.parametrize("kv_dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("shard,prompt_lens", [
    (ShardSpec(0, 3, True, False, 0, 1), [5]),            # first stage, one sequence
    (ShardSpec(27, 30, False, True, 0, 1), [3, 17, 9]),   # last stage (logits), three sequences
    (ShardSpec(10, 12, False, False, 1, 3), [7, 2]),      # TP rank 1 of 3: attention and MLP halves
])
def test_fused_decode_matches_the_unfused_layers(shard, prompt_lens, kv_dtype, monkeypatch):
    ref, kv_ref, _ = _run(shard, False, prompt_lens, 4, kv_dtype=kv_dtype)
    calls = []
    name = "decode_layer" if shard.tp_size == 1 else "decode_attention"
    real = getattr(fused, name)
    monkeypatch.setattr(fused, name, lambda *a: calls.append(1) or real(*a))
    got, kv_got, model = _run(shard, True, prompt_lens, 4, kv_dtype=kv_dtype)
    assert len(calls) == 4 * len(model.layers), "the fused kernel did not run every decode layer"
    # float32 rounding differences of the two paths may move a float16 K/V element by one unit
    # in the last place (2^-10 relative), which reaches the outputs attenuated
    tol = 1e-4 if kv_dtype == torch.float32 else 2.0 ** -10
    for r, g in zip(ref, got):
        assert r.shape == g.shape
        torch.testing.assert_close(g, r, rtol=tol, atol=tol * float(r.abs().max()))
    # later layers' K/V inherit the earlier layers' rounding differences
    assert kv_got.k.dtype == kv_ref.k.dtype == kv_dtype
    torch.testing.assert_close(kv_got.k.float(), kv_ref.k.float(), rtol=tol, atol=1e-4)
    torch.testing.assert_close(kv_got.v.float(), kv_ref.v.float(), rtol=tol, atol=1e-4)


def test_fused_path_declines_when_a_linear_would_not_use_the_packed_kernels():
    shard = ShardSpec(0, 2, True, False, 0, 1)
    model = StageModel(SPEC, GGUFShardLoader(PATH, SPEC, shard), 64)
    layer = model.layers[0]
    assert layer.fused_args(1) is not None
    assert layer.fused_args(4096) is None  # far past the GEMM crossover: the torch path
    layer.o_proj.keep_bf16_copy()
    assert layer.fused_args(16) is None  # the bf16 copy takes >= 8 tokens
    assert layer.fused_args(2) is not None
    # with the bf16 copy, a 16-sequence decode step runs the unfused layer and still agrees
    model.fused_decode = False
    kv = KVCache(2, 16, BLOCK, SPEC.num_kv_heads, SPEC.head_dim)
    meta = build_attention_metadata([(0, 1, [i], True) for i in range(16)], BLOCK)
    ids = torch.arange(16)
    ref = model(ids, meta, kv)
    model.fused_decode = True
    torch.testing.assert_close(model(ids, meta, kv), ref)


@pytest.mark.parametrize("bf16_copies", [True, False])
def test_warm_up_runs_every_attention_path(bf16_copies, monkeypatch):
    """A worker's warm-up reaches each attention kernel a step can take (so Numba compiles them
    before the first request, not inside it): the fused decode layer, the prompt chunk's causal
    kernel, the paged decode kernel of a mixed step's decode rows (which once compiled only
    during the first mixed step of a fresh install, a 10-30 s stall), and the RoPE/cache/attention
    kernel of a many-sequence decode step, with bf16 weight copies and with packed weights."""
    from shardline.kernels import attention
    from shardline.worker import model as model_mod

    seen = set()

    def spy(name, fn):
        def wrapped(*a, **k):
            seen.add(name)
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(attention.PagedDecodePlan, "run", spy("paged", attention.PagedDecodePlan.run))
    monkeypatch.setattr(model_mod, "causal_attention", spy("causal", model_mod.causal_attention))
    monkeypatch.setattr(fused, "rope_cache_attention", spy("fused", fused.rope_cache_attention))
    model = StageModel(SPEC, GGUFShardLoader(PATH, SPEC, ShardSpec(28, 30, False, True)), 256)
    if bf16_copies:
        model.keep_bf16_copies()
    kv = KVCache(2, 32, BLOCK, SPEC.num_kv_heads, SPEC.head_dim, dtype=torch.float16)
    model.warm_up(kv, BLOCK)
    assert seen == {"paged", "causal", "fused"}


@pytest.mark.parametrize("kv_dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("shard", [ShardSpec(0, 3, True, False, 0, 1), ShardSpec(27, 30, False, True, 0, 1)])
def test_bf16_path_gives_the_same_numbers_as_the_float32_glue(shard, kv_dtype, monkeypatch):
    """DecoderLayer.forward_bf16 (bf16 activations between the bf16-copy GEMMs, norms and
    residual adds in shardline.kernels.fused) against DecoderLayer.forward (float32 between the GEMMs,
    torch's conversions at each GEMM): the same outputs and K/V bit for bit, on a prompt step, a
    mixed step (a prompt chunk beside decode rows) and pure decode steps of 12 sequences."""
    from shardline.worker.model import DecoderLayer

    calls = []
    real = DecoderLayer.forward_bf16
    monkeypatch.setattr(DecoderLayer, "forward_bf16", lambda self, *a: calls.append(1) or real(self, *a))

    def run(bf16_path: bool):
        model = StageModel(SPEC, GGUFShardLoader(PATH, SPEC, shard), 256)
        model.keep_bf16_copies()
        model.bf16_path = bf16_path
        kv = KVCache(3, 40, BLOCK, SPEC.num_kv_heads, SPEC.head_dim, dtype=kv_dtype)
        gen = torch.Generator().manual_seed(3)
        tables = [[3 * i, 3 * i + 1, 3 * i + 2] for i in range(13)]

        def inputs(n):
            if shard.is_first:
                return torch.randint(0, SPEC.vocab_size, (n,), generator=gen)
            return torch.randn(n, SPEC.hidden_size, generator=gen) * 3

        steps = [[(0, 20, tables[i], True) for i in range(11)]]  # prompts
        steps.append([(20, 1, tables[i], True) for i in range(11)] + [(0, 9, tables[11], True)])  # mixed
        steps += [[(21 + k if i < 11 else 9 + k, 1, tables[i], True) for i in range(12)] for k in range(3)]  # decode
        outs = []
        for entries in steps:
            meta = build_attention_metadata(entries, BLOCK)
            outs.append(model(inputs(meta.num_tokens), meta, kv))
        return outs, kv

    ref, kv_ref = run(False)
    assert not calls
    got, kv_got = run(True)
    assert len(calls) == 5 * 3, "forward_bf16 did not run every layer of every step"
    for r, g in zip(ref, got):
        assert torch.equal(r, g)
    assert torch.equal(kv_ref.k, kv_got.k) and torch.equal(kv_ref.v, kv_got.v)


def test_bf16_path_declines_without_copies_under_tp_and_below_the_copy_threshold():
    """forward_bf16 runs only where every linear takes its bf16 copy: not without copies, not
    for fewer tokens than the copies' threshold, not under tensor parallelism."""
    model = StageModel(SPEC, GGUFShardLoader(PATH, SPEC, ShardSpec(0, 1, True, False, 0, 1)), 64)
    layer = model.layers[0]
    x = torch.zeros(16, SPEC.hidden_size)
    assert not layer.takes_bf16_path(x)
    model.keep_bf16_copies()
    assert layer.takes_bf16_path(x)
    assert not layer.takes_bf16_path(x[:4])
    assert not layer.takes_bf16_path(x.t().contiguous().t())  # not contiguous
    tp = StageModel(SPEC, GGUFShardLoader(PATH, SPEC, ShardSpec(0, 1, True, False, 1, 3)), 64)
    tp.keep_bf16_copies()
    assert not tp.layers[0].takes_bf16_path(x)
