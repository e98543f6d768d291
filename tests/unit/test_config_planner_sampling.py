"""cluster.yaml schema, the planner, SamplingParams validation, the sampler, and the step metadata
and rotary embedding of the model (pure functions of small tensors)."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from shardline.coordinator.planner import (
    ModelSizes,
    PlanError,
    WorkerOffer,
    check_parallel,
    format_plan,
    kv_bytes_per_block,
    make_plan,
    split_layers,
)
from shardline.config import ConfigError, load_config
from shardline.model_file import ModelSpec
from shardline.sampling import SamplingParams
from shardline.worker.model import RotaryEmbedding, build_attention_metadata
from shardline.worker.sampler import Sampler

CLUSTER_YAML = Path(__file__).resolve().parents[2] / "cluster.yaml"
GiB = 2**30

# ---- config ------------------------------------------------------------------------------------


def test_defaults_equal_the_checked_in_cluster_yaml():
    """cluster.yaml says its values are the defaults: every field is there, with the default value."""
    data = yaml.safe_load(CLUSTER_YAML.read_text())
    defaults = load_config().model_dump()
    from_file = load_config(CLUSTER_YAML)
    # pipeline_parallel: None means workers.count / tensor_parallel, 2 with these values
    assert load_config().pipeline_parallel == from_file.pipeline_parallel == 2
    assert data == defaults
    assert from_file.model_dump() == defaults


def test_config_values_are_validated_and_frozen():
    cfg = load_config(overrides={"scheduler": {"block_size": 32}, "workers": {"count": 4}})
    assert cfg.scheduler.block_size == 32 and cfg.pipeline_parallel == 4
    assert cfg.client_address == "tcp://127.0.0.1:7450" and cfg.worker_address == "tcp://127.0.0.1:7451"
    with pytest.raises(Exception):
        cfg.scheduler.block_size = 8  # type: ignore[misc]


def test_shutdown_timeout_accepts_its_old_name():
    """`coordinator.drain_timeout_s` (the old name) still sets `shutdown_timeout_s`, so existing
    cluster.yaml files keep working; the launcher's dump uses the new name and loads back."""
    assert load_config(overrides={"coordinator": {"drain_timeout_s": 5.0}}).coordinator.shutdown_timeout_s == 5.0
    cfg = load_config(overrides={"coordinator": {"shutdown_timeout_s": 7.0}})
    assert cfg.coordinator.shutdown_timeout_s == 7.0
    dumped = cfg.model_dump(mode="json")
    assert dumped["coordinator"]["shutdown_timeout_s"] == 7.0 and "drain_timeout_s" not in dumped["coordinator"]
    assert load_config(overrides=dumped) == cfg
    with pytest.raises(ConfigError, match="shutdown_timeout_s"):
        load_config(overrides={"coordinator": {"shutdown_timeout_s": -1}})


def test_unknown_field_is_refused_by_name():
    with pytest.raises(ConfigError, match=r"scheduler\.max_num_seq\b.*[Ee]xtra"):
        load_config(overrides={"scheduler": {"max_num_seq": 3}})
    with pytest.raises(ConfigError, match="modle"):
        load_config(overrides={"modle": "x"})


@pytest.mark.parametrize("overrides, names", [
    ({"workers": {"count": 3}, "parallel": {"pipeline_parallel": 2}}, ["pipeline_parallel=2", "workers.count=3"]),
    ({"workers": {"count": 3}, "parallel": {"tensor_parallel": 2}}, ["tensor_parallel=2", "workers.count=3"]),
])
def test_pp_times_tp_must_equal_the_worker_count(overrides, names):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=overrides)
    assert all(n in str(info.value) for n in names), str(info.value)


@pytest.mark.parametrize("section, field, value", [
    ("scheduler", "block_size", 0),
    ("scheduler", "max_num_seqs", 0),
    ("scheduler", "max_model_len", 8),
    ("coordinator", "client_port", 70000),
    ("workers", "device", "tpu"),
    ("parallel", "layer_split", "random"),
    ("heartbeat", "interval_s", 0),
])
def test_out_of_range_values_name_the_field(section, field, value):
    with pytest.raises(ConfigError, match=rf"defaults: invalid cluster config:\n  {section}\.{field}:"):
        load_config(overrides={section: {field: value}})


def test_ports_must_differ():
    with pytest.raises(ConfigError, match="ports must differ"):
        load_config(overrides={"coordinator": {"worker_port": 7450}})


def test_bad_files_name_the_path(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=f"cannot read {missing}"):
        load_config(missing)
    bad = tmp_path / "bad.yaml"
    bad.write_text("scheduler: [unclosed\n")
    with pytest.raises(ConfigError, match=f"{bad}: invalid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping, got list"):
        load_config(bad)
    bad.write_text("scheduler:\n  block_size: -1\n")
    with pytest.raises(ConfigError, match=f"{bad}: invalid cluster config:\n  scheduler.block_size"):
        load_config(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty) == load_config()


# ---- planner -----------------------------------------------------------------------------------


SMOL = ModelSpec(architecture="llama", name="SmolLM2-like", num_layers=30, hidden_size=576, num_heads=9,
                 num_kv_heads=3, head_dim=64, intermediate_size=1536, vocab_size=49152, rope_theta=100000.0,
                 rms_norm_eps=1e-5, context_length=8192, tie_word_embeddings=True, attention_bias=False,
                 bos_token_id=1, eos_token_id=2)
LAYER = 4 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536 + 2 * 576)  # float32 bytes of one layer
EMBED = 4 * 49152 * 576
SIZES = ModelSizes(layer_bytes=(LAYER,) * 30, embed_bytes=EMBED, head_bytes=EMBED + 4 * 576)
BS = 16


def offers(*gib: float) -> list[WorkerOffer]:
    return [WorkerOffer(f"w{i}", f"host{i}", int(g * GiB)) for i, g in enumerate(gib)]


def test_kv_bytes_per_block():
    # K and V, per layer, per slot: num_kv_heads / tp heads of head_dim float32
    assert kv_bytes_per_block(SMOL, 15, BS, 1) == 2 * 15 * BS * 3 * 64 * 2  # float16 (the default)
    assert kv_bytes_per_block(SMOL, 30, BS, 3) == 2 * 30 * BS * 1 * 64 * 2
    assert kv_bytes_per_block(SMOL, 15, BS, 1, dtype_bytes=4) == 2 * 15 * BS * 3 * 64 * 4  # float32


def test_even_pipeline_plan():
    plan = make_plan(SMOL, SIZES, offers(2, 2), pp_size=2, tp_size=1, block_size=BS)
    a0, a1 = plan.assignments
    assert (plan.pp_size, plan.tp_size, plan.world_size, plan.block_size) == (2, 1, 2, BS)
    assert [(a.worker_id, a.rank, a.stage, a.tp_rank, a.layer_start, a.layer_end) for a in plan.assignments] == [
        ("w0", 0, 0, 0, 0, 15), ("w1", 1, 1, 0, 15, 30)]
    assert a0.weight_bytes == 15 * LAYER + EMBED  # the first stage holds the embedding
    assert a1.weight_bytes == 15 * LAYER + SIZES.head_bytes  # the last the (tied) head
    per_block = kv_bytes_per_block(SMOL, 15, BS, 1)
    assert a0.kv_bytes_per_block == per_block
    assert plan.num_kv_blocks == (2 * GiB - a1.weight_bytes) // per_block  # stage 1 has less room
    assert "w1" in format_plan(plan) and "15-29" in format_plan(plan)
    assert plan.to_dict()["assignments"][1]["layer_start"] == 15


def test_even_split_gives_the_first_stages_the_extra_layers():
    plan = make_plan(SMOL, SIZES, offers(4, 4, 4, 4), pp_size=4, tp_size=1, block_size=BS)
    assert [(a.layer_start, a.layer_end) for a in plan.assignments] == [(0, 8), (8, 16), (16, 23), (23, 30)]


def test_tensor_parallel_plan_shards_weights_and_kv_heads():
    plan = make_plan(SMOL, SIZES, offers(2, 2, 2), pp_size=1, tp_size=3, block_size=BS)
    assert [(a.rank, a.stage, a.tp_rank) for a in plan.assignments] == [(0, 0, 0), (1, 0, 1), (2, 0, 2)]
    # tied head: no copy of the embedding, but the final norm (4 * 576 bytes) is held; the
    # embedding is vocabulary-parallel: a third of its rows per rank
    assert all(a.weight_bytes == 30 * LAYER // 3 + EMBED // 3 + 4 * 576 for a in plan.assignments)
    assert all(a.kv_bytes_per_block == kv_bytes_per_block(SMOL, 30, BS, 3) for a in plan.assignments)


def test_memory_split_follows_the_smallest_offer_of_each_stage():
    plan = make_plan(SMOL, SIZES, offers(2, 4), pp_size=2, tp_size=1, block_size=BS, layer_split="memory")
    assert [(a.layer_start, a.layer_end) for a in plan.assignments] == [(0, 10), (10, 30)]
    # pp=2 x tp=2: stage weights are min(1, 8) and min(3, 3)
    plan = make_plan(SMOL.__class__(**{**SMOL.to_dict(), "num_heads": 12, "num_kv_heads": 4}), SIZES,
                     offers(1, 8, 3, 3), pp_size=2, tp_size=2, block_size=BS, layer_split="memory")
    assert [(a.stage, a.layer_start, a.layer_end) for a in plan.assignments] == [
        (0, 0, 8), (0, 0, 8), (1, 8, 30), (1, 8, 30)]


def test_tp2_is_refused_naming_num_kv_heads():
    with pytest.raises(PlanError, match="tensor_parallel=2 does not divide") as info:
        make_plan(SMOL, SIZES, offers(2, 2), pp_size=1, tp_size=2, block_size=BS)
    assert "num_kv_heads=3" in str(info.value) and "num_heads=9" in str(info.value)
    assert "intermediate_size" not in str(info.value)  # 1536 is even
    check_parallel(SMOL, 1, 3)  # 9 heads, 3 KV heads, 1536: all divisible by 3


def test_other_impossible_splits():
    with pytest.raises(PlanError, match="pipeline_parallel=31 exceeds num_layers=30"):
        check_parallel(SMOL, 31, 1)
    with pytest.raises(PlanError, match="needs 4 workers, 3 registered"):
        make_plan(SMOL, SIZES, offers(2, 2, 2), pp_size=4, tp_size=1, block_size=BS)


def test_not_enough_memory_is_refused_with_gib_figures():
    small = 0.05
    with pytest.raises(PlanError) as info:
        make_plan(SMOL, SIZES, offers(2, small), pp_size=2, tp_size=1, block_size=BS)
    need = 15 * LAYER + SIZES.head_bytes + 16 * kv_bytes_per_block(SMOL, 15, BS, 1)
    msg = str(info.value)
    assert msg == (f"worker w1 (stage 1, layers 15-29) needs {need / GiB:.2f} GiB for weights and a minimal "
                   f"KV cache, offers {int(small * GiB) / GiB:.2f} GiB")


def test_kv_blocks_are_the_minimum_across_workers():
    workers = offers(3, 1.5, 2.5, 2)
    plan = make_plan(SMOL, SIZES, workers, pp_size=4, tp_size=1, block_size=BS)
    fits = [(w.memory_bytes - a.weight_bytes) // a.kv_bytes_per_block for w, a in zip(workers, plan.assignments)]
    assert plan.num_kv_blocks == min(fits) and len(set(fits)) > 1
    # a per-worker KV cap applies to each; forcing more blocks than fit is refused
    cap = make_plan(SMOL, SIZES, workers, pp_size=4, tp_size=1, block_size=BS, kv_cache_bytes=64 * 2**20)
    assert cap.num_kv_blocks == min(64 * 2**20 // a.kv_bytes_per_block for a in cap.assignments)
    forced = make_plan(SMOL, SIZES, workers, pp_size=4, tp_size=1, block_size=BS, num_kv_blocks=100)
    assert forced.num_kv_blocks == 100
    with pytest.raises(PlanError, match=f"num_kv_blocks={min(fits) + 1} does not fit: the workers hold at most {min(fits)}"):
        make_plan(SMOL, SIZES, workers, pp_size=4, tp_size=1, block_size=BS, num_kv_blocks=min(fits) + 1)


@given(st.integers(1, 64).flatmap(lambda n: st.tuples(
    st.just(n), st.lists(st.floats(0.1, 100.0), min_size=1, max_size=n))))
@settings(max_examples=200, deadline=None)
def test_split_layers_covers_every_layer_once(args):
    num_layers, weights = args
    ranges = split_layers(num_layers, weights)
    assert len(ranges) == len(weights)
    assert ranges[0][0] == 0 and ranges[-1][1] == num_layers
    assert all(a < b for a, b in ranges) and all(ranges[i][1] == ranges[i + 1][0] for i in range(len(ranges) - 1))
    even = [b - a for a, b in split_layers(num_layers, [1.0] * len(weights))]
    assert max(even) - min(even) <= 1 and even == sorted(even, reverse=True)


# ---- SamplingParams ----------------------------------------------------------------------------


@pytest.mark.parametrize("field, value", [
    ("max_tokens", 0), ("max_tokens", 1.5), ("max_tokens", True),
    ("min_tokens", -1), ("temperature", -0.1), ("temperature", 101), ("temperature", "hot"),
    ("top_k", -2), ("top_p", 0.0), ("top_p", 1.01), ("min_p", 1.5), ("seed", -1), ("seed", 2**63),
    ("stop", [""]), ("stop", ["x"] * 17), ("stop_token_ids", [-1]), ("ignore_eos", 1),
    ("include_stop_str_in_output", "yes"),
])
def test_sampling_params_range_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"^{field}="):
        SamplingParams(**{field: value})


def test_min_tokens_cannot_exceed_max_tokens():
    with pytest.raises(ValueError, match=r"^min_tokens=5: must be an integer in \[0, max_tokens\]"):
        SamplingParams(max_tokens=4, min_tokens=5)
    assert SamplingParams(max_tokens=4, min_tokens=4).min_tokens == 4


def test_sampling_params_wire_round_trip():
    p = SamplingParams(max_tokens=9, temperature=0.8, top_k=5, top_p=0.9, min_p=0.05, seed=7, stop="END",
                       stop_token_ids=[2, 3], min_tokens=1)
    assert p.stop == ("END",) and p.stop_token_ids == (2, 3) and not p.greedy
    d = p.to_dict()
    assert d["stop"] == ["END"] and d["stop_token_ids"] == [2, 3]
    assert SamplingParams.from_dict(d) == p
    with pytest.raises(ValueError, match="unknown sampling parameter.*: best_of, suffix"):
        SamplingParams.from_dict({"n": 2, "best_of": 2, "suffix": "x"})
    with pytest.raises(ValueError, match="must be a map, got list"):
        SamplingParams.from_dict([1])


# ---- sampler -----------------------------------------------------------------------------------


def sample(logits, params, positions=None):
    logits = torch.as_tensor(logits, dtype=torch.float32)
    if logits.dim() == 1:
        logits = logits[None]
    n = logits.shape[0]
    params = params if isinstance(params, list) else [params] * n
    positions = positions if positions is not None else list(range(n))
    return Sampler()(logits, params, positions, [0] * n).token_ids


def draws(probs, n=4000, seed=11, **kw):
    """`n` seeded draws from one row of log-probabilities `probs`, at positions 0..n-1."""
    logits = torch.log(torch.tensor(probs)).expand(n, -1)
    return Counter(sample(logits, SamplingParams(temperature=kw.pop("temperature", 1.0), seed=seed, **kw)))


def test_greedy_is_argmax_in_a_mixed_batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g)
    params = [SamplingParams(), SamplingParams(temperature=1.0, seed=1)] * 3
    tokens = sample(logits, params)
    argmax = logits.argmax(-1).tolist()
    assert [t for t, p in zip(tokens, params) if p.greedy] == argmax[0::2]


def test_greedy_rows_match_torch_argmax_with_ties_and_nan():
    """The greedy fast path (NumPy's argmax over the rows) against torch's argmax: random rows of
    a vocabulary-sized batch, a tie (the first index wins), a NaN (taken as the largest), and a
    non-contiguous view of the logits."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(32, 49152, generator=g)
    logits[3, 10] = logits[3, 20] = 100.0
    logits[5, 7] = float("nan")
    params = [SamplingParams()] * 32
    assert sample(logits, params) == logits.argmax(-1).tolist()
    assert sample(logits[:, 100:], params) == logits[:, 100:].argmax(-1).tolist()
    assert sample(logits, params)[3] == 10 and sample(logits, params)[5] == 7


def test_top_k_1_is_argmax():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(32, 50, generator=g)
    tokens = sample(logits, [SamplingParams(temperature=2.0, top_k=1, seed=s) for s in range(32)])
    assert tokens == logits.argmax(-1).tolist()


def test_seeded_sampling_depends_only_on_seed_and_position():
    g = torch.Generator().manual_seed(2)
    row = torch.randn(50, generator=g)
    others = torch.randn(3, 50, generator=g)
    p = SamplingParams(temperature=1.5, seed=1234)
    q = SamplingParams(temperature=0.9, seed=99)
    for position in range(20):
        alone = sample(row, p, [position])[0]
        first = sample(torch.stack([row, *others]), [p, q, q, SamplingParams()], [position, 3, 4, 5])[0]
        last = sample(torch.stack([*others, row]), [q, q, SamplingParams(), p], [7, 8, 9, position])[3]
        assert alone == first == last
    assert len({sample(row, p, [pos])[0] for pos in range(40)}) > 3  # not constant across positions
    assert len({sample(row, SamplingParams(temperature=1.5, seed=s), [0])[0] for s in range(40)}) > 3


def test_seeded_draws_survive_last_bit_logit_differences():
    """A batch of another size takes another GEMM path, so a row's logits differ in the last
    bits; a seeded draw must not change with them except on a near-tie (Gumbel-max keeps each
    token's own noise; an inverse-CDF draw flipped 8 of these 300)."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 49152, generator=g) * 4
    noisy = base + torch.randn(1, 49152, generator=g) * 1e-3
    flips = sum(sample(base, SamplingParams(temperature=1.0, seed=s), [5]) !=
                sample(noisy, SamplingParams(temperature=1.0, seed=s), [5]) for s in range(300))
    assert flips <= 1


def test_temperature_sampling_follows_the_softmax():
    """Chi-square of 20000 seeded draws against softmax(logits / T) on a 5-token vocabulary."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    n = 20000
    for temperature in (0.7, 1.0, 2.0):
        counts = Counter(sample(logits.expand(n, -1), SamplingParams(temperature=temperature, seed=5)))
        expected = (torch.softmax(logits / temperature, -1) * n).tolist()
        chi2 = sum((counts[i] - e) ** 2 / e for i, e in enumerate(expected))
        assert chi2 < 18.47, (temperature, counts, expected)  # chi-square, 4 dof, p = 0.001


PROBS = [0.5, 0.25, 0.125, 0.125]  # exact in binary


def test_top_k_keeps_the_k_most_likely():
    c = draws(PROBS, top_k=2)
    assert set(c) == {0, 1} and abs(c[0] / c[1] - 2) < 0.3


@pytest.mark.parametrize("top_p, kept", [(0.3, {0}), (0.6, {0, 1}), (0.8, {0, 1, 2}), (0.95, {0, 1, 2, 3}),
                                         (1.0, {0, 1, 2, 3})])
def test_top_p_keeps_the_minimal_prefix_reaching_top_p(top_p, kept):
    c = draws([0.5, 0.25, 0.15, 0.1], top_p=top_p)  # cumulative 0.5, 0.75, 0.9, 1.0
    assert set(c) == kept
    if kept == {0, 1}:
        assert abs(c[0] / c[1] - 2) < 0.3  # renormalized, relative weights kept


@pytest.mark.parametrize("top_p, kept", [(0.5, {0}), (0.75, {0, 1})])
def test_top_p_boundary_keeps_the_minimal_prefix(top_p, kept):
    assert set(draws(PROBS, top_p=top_p)) == kept


@pytest.mark.parametrize("top_p", [0.5, 0.9])
def test_top_p_on_a_flat_distribution_keeps_the_exact_prefix(top_p):
    """A slowly decaying distribution over 5000 tokens: the prefix reaching 0.5 holds ~690
    tokens (past the first 64 candidates), the one reaching 0.9 ~2300 (past 1024: the full
    sort). Every draw lies in the prefix NumPy computes, and draws reach its far end."""
    import numpy as np

    probs = np.exp(-np.arange(5000) / 1000.0)
    probs /= probs.sum()
    cum = np.cumsum(probs)
    n_kept = int(np.searchsorted(cum - probs, top_p, side="left"))  # positions whose mass before < top_p
    assert n_kept > (1024 if top_p == 0.9 else 64)
    c = draws(probs.tolist(), n=3000, top_p=top_p)
    assert max(c) < n_kept and max(c) > 0.9 * n_kept


@pytest.mark.parametrize("min_p, kept", [(0.3, {0, 1}), (0.5, {0, 1}), (0.6, {0}), (0.2, {0, 1, 2, 3})])
def test_min_p_filters_below_a_fraction_of_the_top_probability(min_p, kept):
    c = draws(PROBS, min_p=min_p)
    assert set(c) == kept
    if kept == {0, 1}:
        assert abs(c[0] / c[1] - 2) < 0.3  # the survivors keep their relative weights


def test_logprobs_are_of_the_raw_distribution():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    res = Sampler()(logits, [SamplingParams(temperature=0.5, top_k=1)], [0], [2])
    logp = torch.log_softmax(logits[0], -1)
    lp, top = res.logprobs[0]
    assert res.token_ids == [1] and lp == pytest.approx(float(logp[1]))
    assert [t for t, _ in top] == [1, 2] and [v for _, v in top] == pytest.approx(logp[[1, 2]].tolist())
    assert Sampler()(logits, [SamplingParams()], [0], [0]).logprobs == [None]


# ---- step metadata and rotary embedding --------------------------------------------------------


def test_build_attention_metadata_maps_positions_to_slots():
    bs = 4
    meta = build_attention_metadata([
        (4, 3, [5, 2], False),  # a prompt chunk: positions 4..6 of a sequence in blocks 5, 2
        (6, 1, [1, 3], True),  # a decode at position 6
        (1, 1, [7], True),  # a decode at position 1
    ], bs)
    assert meta.num_tokens == 5
    assert meta.positions.tolist() == [4, 5, 6, 6, 1]
    assert meta.slot_mapping.tolist() == [8, 9, 10, 14, 29]
    (row0, row1, ctx), = meta.prefills
    assert (row0, row1, ctx.tolist()) == (0, 3, [20, 21, 22, 23, 8, 9, 10])
    assert meta.decode_rows.tolist() == [3, 4]
    assert meta.decode_block_tables.tolist() == [[1, 3], [7, 0]]
    assert meta.decode_context_lens.tolist() == [7, 2]
    assert meta.sample_rows.tolist() == [3, 4]
    # decode rows before and after a chunk keep their places in the step's row order
    meta = build_attention_metadata([(5, 1, [3, 6], True), (0, 2, [4], True), (1, 1, [7], True)], bs)
    assert meta.positions.tolist() == [5, 0, 1, 1]
    assert meta.slot_mapping.tolist() == [25, 16, 17, 29]
    assert meta.decode_rows.tolist() == [0, 3]


def test_rotary_embedding():
    head_dim = 8
    rotary = RotaryEmbedding(head_dim, theta=10000.0, max_positions=64)

    def rope(x, positions):
        if hasattr(rotary, "for_positions"):  # rotations computed once per step, applied per layer
            return rotary.apply(x, rotary.for_positions(positions))
        return rotary(x, positions)

    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 2, head_dim, generator=g)  # [num_tokens, num_heads, head_dim]
    assert torch.equal(rope(x, torch.zeros(5, dtype=torch.long)), x)  # position 0: identity
    pos = torch.tensor([1, 7, 20, 33, 63])
    y = rope(x, pos)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5)  # a rotation
    # adjacent pairs: the first pair turns by `pos` radians, the last by pos * theta^(-6/8)
    a = torch.atan2(y[..., 1], y[..., 0]) - torch.atan2(x[..., 1], x[..., 0])
    assert torch.allclose(torch.remainder(a - pos[:, None].float() + math.pi, 2 * math.pi) - math.pi,
                          torch.zeros_like(a), atol=1e-4)
    # relative: <R(m) q, R(n) k> depends only on m - n
    q, k = x[0:1], x[1:2]

    def score(m, n):
        return (rope(q, torch.tensor([m])) * rope(k, torch.tensor([n]))).sum(-1)

    assert torch.allclose(score(10, 3), score(50, 43), atol=1e-4)
    assert not torch.allclose(score(10, 3), score(10, 4), atol=1e-3)
