"""Every served family in-process: one StageModel holding all layers, against transformers.

The tiny models come from tests/families.py (a config shaped like each real model, random
weights on Q8_0's grid, saved as a Hugging Face checkpoint and as a GGUF file written the way
llama.cpp's converter writes the family). Also: the GGUF and config.json readers agree, the
fast paths run where they fit and the general path where an option rules them out, the RoPE
variants' frequencies equal transformers', fused tensors travel through shard transfer, and
mixture-of-experts files are refused by name.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from shardline.model_file import ModelError, ModelSpec, read_model_spec
from shardline.worker.kv_cache import KVCache
from shardline.worker.loader import ShardSpec, open_shard_loader
from shardline.worker.model import StageModel, build_attention_metadata
from tests.families import FAMILIES, ROPE_VARIANTS, build_family, reference_logits, reference_model

BLOCK = 16
TABLE = [5, 2, 7, 0]  # non-contiguous KV blocks: 64 positions
CHUNKS = [12, 8]  # a prompt of 20 tokens in two chunks (the second reads the first's K/V from the cache)
# Our logits against transformers' on the same weights, both float32 (float32 KV cache): only
# the order of the sums differs (measured <= 4e-6 of the largest |logit| over every family).
REL_TOL = 1e-4


@pytest.fixture(scope="session")
def family_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return lambda name: build_family(name, root / name, gguf=name in FAMILIES)


def stage_logits(path, ids: list[int], chunks: list[int] = CHUNKS, bf16: bool = False, spec=None) -> np.ndarray:
    """All layers on one stage (TP 1): the prompt ids[:sum(chunks)] in `chunks`, then one token a
    step; the logits of every position [len(ids), vocab]."""
    spec = spec or read_model_spec(path)
    model = StageModel(spec, open_shard_loader(str(path), spec, ShardSpec(0, spec.num_layers, True, True)), 128)
    if bf16:
        model.keep_bf16_copies()
    kv = KVCache(spec.num_layers, 8, BLOCK, spec.num_kv_heads, spec.head_dim, dtype=torch.float32)
    rows, pos = [], 0
    for n in chunks + [1] * (len(ids) - sum(chunks)):
        meta = build_attention_metadata([(pos, n, TABLE, True)], BLOCK)
        meta.sample_rows = torch.arange(n)  # every position's logits, not only the last
        rows.append(model(torch.tensor(ids[pos:pos + n]), meta, kv))
        pos += n
    return torch.cat(rows).numpy()


def _ids(n: int, seed: int = 1) -> list[int]:
    return np.random.default_rng(seed).integers(0, 256, n).tolist()


@pytest.mark.parametrize("fmt", ["gguf", "safetensors"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_logits_match_transformers(family_dir, name, fmt):
    """Prefill in two chunks, then decode one token at a time past the pretraining context
    (scaled RoPE) and the sliding windows: every position's logits within REL_TOL of
    transformers' (fed the same chunks through its cache) and the same greedy choice."""
    f = family_dir(name)
    ids = _ids(f.family.reach)
    ref = reference_logits(reference_model(str(f.hf_dir)), ids, CHUNKS)
    ours = stage_logits(f.gguf_path if fmt == "gguf" else f.hf_dir, ids)
    err = np.abs(ours - ref).max(1) / np.abs(ref).max()
    assert err.max() < REL_TOL, f"position {err.argmax()}: {err.max():.2e}"
    assert np.array_equal(ours.argmax(1), ref.argmax(1))


@pytest.mark.parametrize("name", list(ROPE_VARIANTS))
def test_config_only_rope_variants_match_transformers(family_dir, name):
    """Linear and dynamic-NTK RoPE (config.json only; the dynamic base grows with every token past
    the 32-token context, and a chunk takes its end's length)."""
    f = family_dir(name)
    ids = _ids(f.family.reach)
    ref = reference_logits(reference_model(str(f.hf_dir)), ids, CHUNKS)
    ours = stage_logits(f.hf_dir, ids)
    assert np.abs(ours - ref).max() < REL_TOL * np.abs(ref).max()


# option switched off -> the first position whose logits must then be wrong (the options bite
# where they should: RoPE scaling at once, LongRoPE's long factors past the 32-token context,
# the windows once a context is longer than them)
SENSITIVITY = [
    ("llama3.2", {"rope_scaling": "default"}, 1),
    ("qwen2.5", {"rope_scaling": "default"}, 1),
    ("phi3", {"long_factor": "short"}, 32),
    ("phi3", {"sliding_window": 1000}, 40),
    ("gemma2", {"attn_logit_softcapping": None, "final_logit_softcapping": None}, 0),
    ("gemma2", {"sliding_window": 1000}, 12),
    ("gemma3", {"sliding_rope_theta": None}, 1),
    ("gemma3", {"sliding_window": 1000}, 12),
]


@pytest.mark.parametrize("name,change,first_wrong", SENSITIVITY)
def test_each_option_changes_the_logits_where_it_should(family_dir, name, change, first_wrong):
    """The comparison above can see each option: served without it, the GGUF model parts from
    transformers at the first position the option affects, not before."""
    f = family_dir(name)
    spec = read_model_spec(f.gguf_path)
    if change.get("rope_scaling") == "default":
        change = {"rope_scaling": type(spec.rope_scaling)()}
    elif change.get("long_factor") == "short":
        change = {"rope_scaling": dataclasses.replace(spec.rope_scaling, long_factor=spec.rope_scaling.short_factor)}
    ids = _ids(f.family.reach)
    ref = reference_logits(reference_model(str(f.hf_dir)), ids, CHUNKS)
    ours = stage_logits(f.gguf_path, ids, spec=dataclasses.replace(spec, **change))
    err = np.abs(ours - ref).max(1) / np.abs(ref).max()
    assert err[:first_wrong].max(initial=0.0) < REL_TOL and err[first_wrong] > 10 * REL_TOL


def test_gguf_and_config_json_give_the_same_spec(family_dir):
    """The GGUF metadata (as the converter writes it) and config.json describe each model alike,
    up to float32 rounding of the stored floats; Mistral converts to GGUF architecture llama."""
    for name in FAMILIES:
        f = family_dir(name)
        a, b = read_model_spec(f.hf_dir), read_model_spec(f.gguf_path)
        assert b.architecture == ("llama" if name == "mistral" else a.architecture)
        for field in dataclasses.fields(a):
            x, y = getattr(a, field.name), getattr(b, field.name)
            if field.name in ("name", "architecture"):
                continue
            if field.name == "rope_scaling":  # GGUF llama3 is its divisors, and stores floats as float32
                if x.rope_type == "llama3":
                    from shardline.worker.rope import inv_frequencies

                    np.testing.assert_allclose(inv_frequencies(a.rope_theta, a.head_dim, x),
                                               inv_frequencies(b.rope_theta, b.head_dim, y), rtol=1e-6)
                    assert y.freq_factors and not x.freq_factors
                    continue
                x, y = dataclasses.replace(x, factor=y.factor), y  # the converter writes no LongRoPE factor
                np.testing.assert_allclose(np.hstack([x.short_factor, x.long_factor, x.attention_factor]),
                                           np.hstack([y.short_factor, y.long_factor, y.attention_factor]), rtol=1e-6)
                x = dataclasses.replace(x, short_factor=(), long_factor=(), attention_factor=0.0)
                y = dataclasses.replace(y, short_factor=(), long_factor=(), attention_factor=0.0)
                assert x == y, name
            elif isinstance(x, float):
                assert y == pytest.approx(x, rel=1e-6), (name, field.name)
            else:
                assert x == y, (name, field.name)


@pytest.mark.parametrize("fmt", ["gguf", "safetensors"])
def test_planner_sizes_equal_what_the_worker_holds(family_dir, fmt):
    """The planner's bytes for one worker (ModelSizes from the GGUF tensor table or the
    safetensors headers) equal what the stage built from the file holds, for every family:
    fused tensors, extra norms, biases, tied heads; GGUF's rope_freqs / rope_factors are not
    held (they are read into the spec)."""
    from shardline.coordinator.planner import ModelSizes, WorkerOffer, make_plan

    for name in FAMILIES:
        f = family_dir(name)
        path = str(f.gguf_path if fmt == "gguf" else f.hf_dir)
        spec = read_model_spec(path)
        model = StageModel(spec, open_shard_loader(path, spec, ShardSpec(0, spec.num_layers, True, True)), 64)
        plan = make_plan(spec, ModelSizes.from_model(path, spec), [WorkerOffer("w0", "127.0.0.1", 2**30)], 1, 1, 16)
        assert model.weight_bytes() == plan.assignments[0].weight_bytes, name


def test_spec_travels_through_assign_and_old_dicts_still_load(family_dir):
    """ModelSpec.to_dict -> msgpack (the ASSIGN body) -> from_dict gives the same spec (tuples
    come back as lists), and a dict without the fields added for the families loads with their
    defaults (plain RoPE, no windows, no soft-capping)."""
    import msgpack

    for name in ("phi3", "gemma3", "llama3.2"):
        spec = read_model_spec(family_dir(name).gguf_path)
        wire = msgpack.unpackb(msgpack.packb(spec.to_dict()))
        assert ModelSpec.from_dict(wire) == spec
    old = {k: v for k, v in read_model_spec(family_dir("mistral").hf_dir).to_dict().items()
           if k in ModelSpec.__dataclass_fields__ and k not in (
               "rope_scaling", "rotary_dim", "sliding_window", "layer_types", "sliding_rope_theta", "attention_scale",
               "attn_logit_softcapping", "final_logit_softcapping")}
    spec = ModelSpec.from_dict(old)
    assert spec.rope_scaling.rope_type == "default" and spec.layer_types == () and not spec.is_sliding(0)


def test_fast_paths_where_they_fit_and_the_general_path_where_they_do_not(family_dir, monkeypatch):
    """Decode steps of the GGUF (Q8_0) models: the whole-layer kernel for Llama-shaped layers
    (Llama 3, Phi-3's fused tensors) while their attention is plain; Qwen3 (q/k norms) and
    Gemma (post-norms, GeGLU) keep the RoPE/cache/attention kernel between torch GEMMs; the
    torch paged attention only for soft-capping and for windows shorter than the context."""
    from shardline.kernels import fused
    from shardline.worker import model as model_mod

    seen: list[str] = []
    for mod, fn, tag in ((fused, "decode_layer", "layer"), (fused, "rope_cache_attention", "rope_cache"),
                         (model_mod, "paged_attention", "paged_torch"),
                         (model_mod, "masked_attention", "masked_torch")):
        real = getattr(mod, fn)
        monkeypatch.setattr(mod, fn, lambda *a, _r=real, _t=tag, **k: seen.append(_t) or _r(*a, **k))

    def paths(name, chunks, decode_to):
        seen.clear()
        stage_logits(family_dir(name).gguf_path, _ids(decode_to), chunks)
        return set(seen)

    assert paths("llama3.2", [20], 24) == {"layer"}
    assert paths("phi3", [20], 24) == {"layer"}  # window 40 covers the context
    assert paths("phi3", [20, 19], 44) == {"layer", "paged_torch"}  # decode from 40 tokens: window exceeded
    assert paths("phi3", [20, 22], 44) == {"masked_torch", "paged_torch"}  # a chunk past the window
    assert paths("qwen3", [20], 24) == {"rope_cache"}
    assert paths("gemma3", [10], 12) == {"rope_cache"}  # window 12 not yet exceeded
    assert paths("gemma3", [12], 16) == {"rope_cache", "paged_torch"}  # sliding layers: torch; global: kernel
    assert paths("gemma2", [8], 10) == {"masked_torch", "paged_torch"}  # soft-capping: torch everywhere


def test_bf16_path_with_qk_norms_gives_the_float32_glue_numbers(family_dir):
    """Qwen3's q/k norms inside DecoderLayer.forward_bf16 (bf16 copies, bfloat16 activations):
    the same logits and K/V bit for bit as DecoderLayer.forward, on a step of eight 12-token
    prompts and two pure decode steps of the eight (the RoPE/cache/attention kernel reading
    the normed float32 q and k)."""
    path = family_dir("qwen3").gguf_path
    spec = read_model_spec(path)
    ids = _ids(8 * 14)
    outs, caches = [], []
    for bf16_path in (False, True):
        model = StageModel(spec, open_shard_loader(str(path), spec, ShardSpec(0, 2, True, True)), 64)
        model.keep_bf16_copies()
        model.bf16_path = bf16_path
        assert model.layers[0].takes_bf16_path(torch.zeros(8, spec.hidden_size))
        kv = KVCache(2, 8, BLOCK, spec.num_kv_heads, spec.head_dim)
        steps = [[(0, 12, [i], True) for i in range(8)]] + [[(p, 1, [i], True) for i in range(8)] for p in (12, 13)]
        out, k = [], 0
        for entries in steps:
            meta = build_attention_metadata(entries, BLOCK)
            out.append(model(torch.tensor(ids[k:k + meta.num_tokens]), meta, kv))
            k += meta.num_tokens
        outs.append(out)
        caches.append(kv)
    for r, g in zip(*outs):
        assert torch.equal(r, g)
    assert torch.equal(caches[0].k, caches[1].k) and torch.equal(caches[0].v, caches[1].v)


def _attention_definition(q, k, v, q_pos, scale, softcap, window):
    """softmax(cap(q k^T * scale) + causal/window mask) v written out per query head (GQA by repeating K/V)."""
    group = q.shape[1] // k.shape[1]
    s = torch.einsum("nhd,lhd->hnl", q, k.repeat_interleave(group, 1)) * scale
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    k_pos = torch.arange(k.shape[0])[None, :]
    visible = (k_pos <= q_pos[:, None]) & ((q_pos[:, None] - k_pos < window) if window else True)
    return torch.einsum("hnl,lhd->nhd", s.masked_fill(~visible, float("-inf")).softmax(-1),
                        v.repeat_interleave(group, 1))


@pytest.mark.parametrize("n,length,window,softcap", [(300, 700, None, None), (600, 600, 100, 5.0), (5, 900, 50, None)])
def test_general_attention_against_the_definition(n, length, window, softcap):
    """masked_attention (a prompt chunk: queries in blocks of MASKED_QUERY_ROWS, only the keys a
    block sees) and paged_attention (decode rows through block tables) with grouped-query heads,
    windows and soft-capping, against the formula written out."""
    from shardline.worker.model import masked_attention, paged_attention

    g = torch.Generator().manual_seed(n)
    q, k, v = torch.randn(n, 8, 16, generator=g), torch.randn(length, 2, 16, generator=g), torch.randn(length, 2, 16,
                                                                                                       generator=g)
    want = _attention_definition(q, k, v, torch.arange(length - n, length), 0.25, softcap, window)
    torch.testing.assert_close(masked_attention(q, k, v, 0.25, softcap, window), want, atol=1e-5, rtol=1e-5)
    # decode: three sequences of lengths 1, length // 2, length on permuted blocks of 16 slots
    blocks = -(-length // 16)
    perm = torch.randperm(3 * blocks, generator=g)
    tables = perm.view(3, blocks).to(torch.int32)
    lens = torch.tensor([1, length // 2, length], dtype=torch.int32)
    k_cache, v_cache = torch.zeros(3 * blocks * 16, 2, 16), torch.zeros(3 * blocks * 16, 2, 16)
    for b in range(3):
        slots = (tables[b].long()[:, None] * 16 + torch.arange(16)).reshape(-1)[:length]
        k_cache[slots], v_cache[slots] = k, v
    got = paged_attention(q[:3], k_cache, v_cache, tables, lens, 16, 0.25, softcap, window)
    for b in range(3):
        ref = _attention_definition(q[b:b + 1], k[:lens[b]], v[:lens[b]], lens[b:b + 1].long() - 1, 0.25, softcap,
                                    window)
        torch.testing.assert_close(got[b:b + 1], ref, atol=1e-5, rtol=1e-5)


def test_rope_frequencies_equal_transformers():
    """shardline/worker/rope.py's inverse frequencies and attention factors against transformers'
    ROPE_INIT_FUNCTIONS, for every variant (LongRoPE and dynamic NTK at lengths below and past
    the pretraining context), and llama3 from GGUF divisors against llama3 from config.json."""
    from transformers import LlamaConfig, Phi3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from shardline.model_file import RopeScaling, _hf_rope
    from shardline.worker.rope import inv_frequencies
    from tests.families import _llama3_rope_freqs

    cases = [
        {"rope_type": "linear", "factor": 4.0},
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 64},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
        {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64, "beta_fast": 16.0,
         "beta_slow": 2.0, "mscale": 1.0, "mscale_all_dim": 0.5},
        {"rope_type": "dynamic", "factor": 4.0},
    ]
    for params in cases:
        rope = {"rope_theta": 50000.0, **params}
        cfg = LlamaConfig(hidden_size=128, num_attention_heads=4, max_position_embeddings=256, rope_parameters=rope)
        ours, _ = _hf_rope(cfg.to_dict(), rope, 32, 256, "cfg")
        for seq_len in (None, 100, 700):
            want, factor = ROPE_INIT_FUNCTIONS[params["rope_type"]](cfg, "cpu", seq_len=seq_len)
            np.testing.assert_allclose(inv_frequencies(50000.0, 32, ours, seq_len), want.double().numpy(), rtol=1e-5)
            assert ours.attention_factor == pytest.approx(factor)
    # llama3 as GGUF stores it: the converter's rope_freqs divisors
    rope = {"rope_theta": 50000.0, **cases[1]}
    from_config, _ = _hf_rope({}, rope, 32, 256, "cfg")
    from_gguf = RopeScaling("llama3", freq_factors=tuple(float(x) for x in _llama3_rope_freqs(rope, 32)))
    np.testing.assert_allclose(inv_frequencies(50000.0, 32, from_gguf), inv_frequencies(50000.0, 32, from_config),
                               rtol=1e-6)
    short, long = [1.0 + 0.1 * i for i in range(6)], [2.0 + 3 * i for i in range(6)]
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": short, "long_factor": long}
    cfg = Phi3Config(hidden_size=64, num_attention_heads=4, partial_rotary_factor=0.75, rope_parameters=rope,
                     max_position_embeddings=256, original_max_position_embeddings=32)
    ours, _ = _hf_rope(cfg.to_dict(), rope, 12, 256, "cfg")
    for seq_len in (None, 32, 33, 200):
        want, factor = ROPE_INIT_FUNCTIONS["longrope"](cfg, "cpu", seq_len=seq_len)
        np.testing.assert_allclose(inv_frequencies(10000.0, 12, ours, seq_len), want.double().numpy(), rtol=1e-6)
        assert ours.attention_factor == pytest.approx(factor)


@pytest.mark.parametrize("name", ["phi3", "gemma2"])
@pytest.mark.parametrize("fmt", ["gguf", "safetensors"])
def test_shard_transfer_of_family_tensors(family_dir, name, fmt):
    """TP rank 1 of 2, received from the coordinator: Phi-3's fused attn_qkv / gate+up cut into
    this rank's parts of each logical tensor, Gemma 2's extra norms (and, from GGUF, the Q/K rows
    the model permutes itself): the same logits bit for bit as the stage built from the files."""
    from shardline import messages as M
    from shardline.coordinator.shard_server import ShardServer
    from shardline.shard import model_digest, shard_tensor_slices
    from shardline.worker.shard_transfer import fetch_shard
    from tests.unit.test_shard_transfer import serve

    f = family_dir(name)
    path = str(f.gguf_path if fmt == "gguf" else f.hf_dir)
    spec = read_model_spec(path)
    shard = (0, spec.num_layers, True, True, 1, 2)
    digest = model_digest(path)
    server = ShardServer(path, spec, digest)
    n = server.on_request("probe", M.ShardRequest(worker_id="probe", model_digest=digest), shard).num_chunks
    dealer, t = serve(server, shard, 1 + n)
    try:
        received, _ = fetch_shard(dealer, "w0", digest, spec, ShardSpec(*shard), "test")
    finally:
        dealer.close(linger=0)
        t.join(5)
    names = {s.name for s in shard_tensor_slices(spec, *shard)}
    assert "blk.0.attn_q.weight" in names and ("blk.0.post_ffw_norm.weight" in names) == (name == "gemma2")
    ids = torch.tensor(_ids(6))
    meta = build_attention_metadata([(0, 6, [0], True)], BLOCK)
    outs = []
    for loader in (received, open_shard_loader(path, spec, ShardSpec(*shard))):
        model = StageModel(spec, loader, 64)
        kv = KVCache(spec.num_layers, 2, BLOCK, spec.num_kv_heads // 2, spec.head_dim)
        outs.append(model(ids.clone(), meta, kv))
    assert torch.equal(outs[0], outs[1])


# ---- refusals -------------------------------------------------------------------------------------


def _mixtral_gguf(path, arch: str = "llama", count_key: bool = True) -> str:
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    for key, value in (("block_count", 1), ("embedding_length", 64), ("feed_forward_length", 128),
                       ("attention.head_count", 4), ("vocab_size", 300)):
        w.add_uint32(f"{arch}.{key}", value)
    if count_key:
        w.add_expert_count(8)
        w.add_expert_used_count(2)
    w.add_eos_token_id(2)
    w.add_tensor("blk.0.ffn_gate_inp.weight", np.zeros((8, 64), np.float32))
    w.add_tensor("blk.0.ffn_gate_exps.weight", np.zeros((8, 128, 64), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def test_mixture_of_experts_files_are_refused_naming_the_experts(tmp_path, family_dir):
    """Mixtral's GGUF says architecture llama; its expert count (metadata, else the router's
    shape) is named, and so is a Qwen3-MoE GGUF and a Mixtral / Qwen3-MoE config.json."""
    for path, arch in ((_mixtral_gguf(tmp_path / "mixtral.gguf"), "llama"),
                       (_mixtral_gguf(tmp_path / "nokey.gguf", count_key=False), "llama"),
                       (_mixtral_gguf(tmp_path / "qwen3moe.gguf", "qwen3moe"), "qwen3moe")):
        with pytest.raises(ModelError, match=rf"architecture '{arch}' is a mixture of experts \(8 experts"):
            read_model_spec(path)
    import shutil

    for archs, key in ((["MixtralForCausalLM"], "num_local_experts"), (["Qwen3MoeForCausalLM"], "num_experts"),
                       (["LlamaForCausalLM"], "num_local_experts")):
        d = tmp_path / f"{archs[0]}-{key}"
        shutil.copytree(family_dir("mistral").hf_dir, d)
        cfg = json.loads((d / "config.json").read_text())
        cfg.update({"architectures": archs, key: 8})
        (d / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(ModelError, match=rf"'{archs[0]}' is a mixture of experts \(8 experts"):
            read_model_spec(d)


def test_unknown_rope_and_activation_are_refused_by_name(tmp_path, family_dir):
    import shutil

    def edited(name, **changes):
        d = tmp_path / f"{name}-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(family_dir(name).hf_dir, d)
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(changes)
        (d / "config.json").write_text(json.dumps(cfg))
        return d

    with pytest.raises(ModelError, match="rope_type 'mrope' is not supported"):
        read_model_spec(edited("qwen3", rope_parameters={"rope_type": "mrope", "rope_theta": 1e6}))
    with pytest.raises(ModelError, match="rope_type 'llama3' needs low_freq_factor"):
        read_model_spec(edited("llama3.1", rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}))
    with pytest.raises(ModelError, match="hidden_act 'silu' is not supported for gemma2"):
        read_model_spec(edited("gemma2", hidden_activation="silu"))
