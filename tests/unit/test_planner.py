"""Planner: the balanced layer split against brute force over every split, declared speeds,
room for the KV pool, the automatic choice of tensor/pipeline sizes, the refusals with their
reasons, the `shardline plan` table, and the coordinator refusing an impossible layout before
any worker loads."""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from shardline.coordinator.planner import (
    CostModel,
    ModelSizes,
    PlanError,
    WorkerOffer,
    format_plan,
    kv_bytes_per_block,
    make_plan,
    parallel_layouts,
    stage_weight_bytes,
)
from shardline.config import ConfigError, load_config
from shardline.local import free_port_block
from shardline.model_file import ModelSpec

GiB = 2**30
MiB = 2**20
BS = 16
SMOL = ModelSpec(architecture="llama", name="SmolLM2-like", num_layers=30, hidden_size=576, num_heads=9,
                 num_kv_heads=3, head_dim=64, intermediate_size=1536, vocab_size=49152, rope_theta=100000.0,
                 rms_norm_eps=1e-5, context_length=8192, tie_word_embeddings=True, attention_bias=False,
                 bos_token_id=1, eos_token_id=2)
# the real model's packed sizes: Q4_1 layers, a Q8_0 tied embedding/head
SIZES = ModelSizes(layer_bytes=(2216448,) * 30, embed_bytes=30081024, head_bytes=30083328)
CPU = CostModel.for_device("cpu")


def variant(**kw) -> ModelSpec:
    return ModelSpec(**{**SMOL.to_dict(), **kw})


def offers(*gib: float, speeds=None) -> list[WorkerOffer]:
    speeds = speeds or [1.0] * len(gib)
    return [WorkerOffer(f"w{i}", f"host{i}", int(g * GiB), "cpu", s) for i, (g, s) in enumerate(zip(gib, speeds))]


def rank_bytes(nbytes: int, spec, tp: int) -> int:
    """One TP rank's vocabulary slice (ceil(V / tp) of V rows) of a [V, hidden] tensor of nbytes."""
    return math.ceil(nbytes * math.ceil(spec.vocab_size / tp) / spec.vocab_size)


def head_rank_bytes(sizes, spec, tp: int) -> int:
    """The last stage's head on one TP rank: its slice of the lm_head and the whole float32 norm."""
    norm = min(4 * spec.hidden_size, sizes.head_bytes)
    return norm + rank_bytes(sizes.head_bytes - norm, spec, tp)


def stage_time(cost, sizes, spec, pp, tp, s, l0, l1, speed) -> float:
    """The objective written out again, independently of the planner's helpers: a TP rank reads
    its vocabulary slice of the head; the first and last stages add one collective each."""
    layer = sum(sizes.layer_bytes[l0:l1])
    head = head_rank_bytes(sizes, spec, tp) if s == pp - 1 else 0
    compute = (layer / tp + head) / cost.bytes_per_s + (l1 - l0) * cost.layer_overhead_s
    collectives = (l1 - l0) * 2 + (s == 0) + (s == pp - 1)
    return compute / speed + collectives * cost.all_reduce_s * (tp - 1)


def brute_force(spec, sizes, workers, pp, tp, min_kv=16, kv_cap=None, cost=CPU):
    """Every contiguous split: the least slowest-stage time among those that fit, then the most
    KV blocks among the splits reaching it. Returns (time, blocks) or None."""
    groups = [workers[s * tp:(s + 1) * tp] for s in range(pp)]
    results = []
    for cut in itertools.combinations(range(1, spec.num_layers), pp - 1):
        bounds = (0, *cut, spec.num_layers)
        worst, blocks, ok = 0.0, [], True
        for s in range(pp):
            l0, l1 = bounds[s], bounds[s + 1]
            embed = rank_bytes(sizes.embed_bytes, spec, tp)
            w = sum(sizes.layer_bytes[l0:l1]) // tp + (embed if s == 0 else 0)
            if s == pp - 1:  # lm_head + final norm; with one stage a tied lm_head is the embedding
                w += head_rank_bytes(sizes, spec, tp) - (embed if s == 0 and spec.tie_word_embeddings else 0)
            per = 2 * (l1 - l0) * BS * (spec.num_kv_heads // tp) * spec.head_dim * 2  # float16 K and V (the default cache)
            for g in groups[s]:
                room = g.memory_bytes - w
                if room < min_kv * per:
                    ok = False
                blocks.append((room if kv_cap is None else min(room, kv_cap)) // per)
            worst = max(worst, stage_time(cost, sizes, spec, pp, tp, s, l0, l1, min(g.speed for g in groups[s])))
        if ok:
            results.append((worst, min(blocks)))
    if not results:
        return None
    t = min(r[0] for r in results)
    return t, max(b for tt, b in results if tt <= t * (1 + 1e-9))


@given(st.data())
@settings(max_examples=150, deadline=None)
def test_balanced_split_matches_brute_force(data):
    n_layers = data.draw(st.integers(2, 9), label="layers")
    pp = data.draw(st.integers(1, min(4, n_layers)), label="pp")
    tp = data.draw(st.sampled_from([1, 3]), label="tp")
    spec = variant(num_layers=n_layers, tie_word_embeddings=data.draw(st.booleans(), label="tied"))
    layer = st.integers(1 * MiB, 20 * MiB)
    sizes = ModelSizes(tuple(data.draw(st.lists(layer, min_size=n_layers, max_size=n_layers), label="layer_bytes")),
                       data.draw(layer, label="embed"), data.draw(layer, label="head"))
    n = pp * tp
    mem = data.draw(st.lists(st.floats(0.02, 0.4), min_size=n, max_size=n), label="GiB")
    speeds = data.draw(st.lists(st.sampled_from([0.5, 1.0, 1.5, 3.0]), min_size=n, max_size=n), label="speeds")
    workers = offers(*mem, speeds=speeds)
    kv_cap = data.draw(st.sampled_from([None, 8 * MiB]), label="kv_cap")
    ref = brute_force(spec, sizes, workers, pp, tp, kv_cap=kv_cap)
    try:
        plan = make_plan(spec, sizes, workers, pp, tp, BS, "balanced", kv_cache_bytes=kv_cap)
    except PlanError as exc:
        assert ref is None, f"brute force found {ref}, planner said: {exc}"
        assert "needs" in str(exc)
        return
    assert ref is not None
    assert plan.est_step_s == pytest.approx(ref[0], rel=1e-9) and plan.num_kv_blocks == ref[1]
    ranges = sorted({(a.stage, a.layer_start, a.layer_end) for a in plan.assignments})
    assert [r[1] for r in ranges] == [0] + [r[2] for r in ranges[:-1]] and ranges[-1][2] == n_layers


def test_balanced_split_of_smollm2_gives_the_head_stage_fewer_layers():
    """The tied lm_head (30 MB, ~4.6 layers of decode time) sits on the last stage, so the even
    15/15 split makes it the bottleneck; the balanced split moves layers to stage 0."""
    even = make_plan(SMOL, SIZES, offers(2, 2), 2, 1, BS, "even")
    bal = make_plan(SMOL, SIZES, offers(2, 2), 2, 1, BS, "balanced")
    (a0, a1) = bal.assignments
    assert a0.layer_end == a1.layer_start and a0.layer_end > 15
    assert bal.est_step_s < even.est_step_s
    assert bal.est_step_s == pytest.approx(max(a0.est_step_s, a1.est_step_s))
    # no other split is faster
    for cut in range(1, 30):
        slowest = max(stage_time(CPU, SIZES, SMOL, 2, 1, 0, 0, cut, 1.0), stage_time(CPU, SIZES, SMOL, 2, 1, 1, cut, 30, 1.0))
        assert slowest >= bal.est_step_s * (1 - 1e-12)


def test_a_faster_worker_gets_more_layers():
    slow = make_plan(SMOL, SIZES, offers(2, 2, 2), 3, 1, BS, "balanced")
    fast = make_plan(SMOL, SIZES, offers(2, 2, 2, speeds=[1.0, 2.0, 1.0]), 3, 1, BS, "balanced")
    n = lambda p, s: p.assignments[s].layer_end - p.assignments[s].layer_start  # noqa: E731
    assert n(fast, 1) > n(slow, 1) and fast.est_step_s < slow.est_step_s
    assert fast.assignments[1].speed == 2.0 and "2" in format_plan(fast).splitlines()[2].split()


def test_balanced_split_keeps_room_for_the_kv_pool():
    """Worker 0 can hold its embedding and few layers; the balanced split gives it only as many
    as leave room for the KV pool, where the even split does not fit at all."""
    per_layer_kv = kv_bytes_per_block(SMOL, 1, BS, 1)
    tight = (SIZES.embed_bytes + 6 * SIZES.layer_bytes[0] + 16 * 6 * per_layer_kv + 1000) / GiB
    with pytest.raises(PlanError, match=r"worker w0 \(stage 0, layers 0-14\) needs"):
        make_plan(SMOL, SIZES, offers(tight, 2), 2, 1, BS, "even")
    plan = make_plan(SMOL, SIZES, offers(tight, 2), 2, 1, BS, "balanced")
    a0 = plan.assignments[0]
    assert a0.layer_end <= 6
    assert a0.weight_bytes + 16 * a0.kv_bytes_per_block <= a0.memory_bytes
    # and among equally fast splits, the one with the bigger KV pool
    assert plan.num_kv_blocks == brute_force(SMOL, SIZES, offers(tight, 2), 2, 1)[1]


def test_balanced_split_that_cannot_fit_names_the_worker():
    with pytest.raises(PlanError, match=r"^worker w1 \(stage 1, layers 29-29\) needs 0\.03 GiB for weights and a "
                                        r"minimal KV cache, offers 0\.02 GiB$"):
        make_plan(SMOL, SIZES, offers(2, 0.02), 2, 1, BS, "balanced")


def test_not_enough_memory_in_all_is_refused_with_both_totals():
    need = sum(SIZES.layer_bytes) + SIZES.head_bytes + 16 * kv_bytes_per_block(SMOL, 30, BS, 1)
    with pytest.raises(PlanError) as info:
        make_plan(SMOL, SIZES, offers(0.05), 1, 1, BS, "balanced")
    assert str(info.value).startswith(f"model needs {need / GiB:.2f} GiB, workers offer {int(0.05 * GiB) / GiB:.2f} GiB")
    # TP splits the embedding over the ranks of its stage (vocabulary-parallel): still too little here
    with pytest.raises(PlanError, match=r"model needs 0\.10 GiB, workers offer 0\.09 GiB \(weights .* with the "
                                        r"embedding and head split over 3 TP ranks"):
        make_plan(SMOL, SIZES, offers(0.03, 0.03, 0.03), 1, 3, BS, "balanced")
    # ... but 3 x 0.035 GiB now hold what needed 3 whole copies of the 30 MB embedding before
    plan = make_plan(SMOL, SIZES, offers(0.035, 0.035, 0.035), 1, 3, BS, "balanced")
    assert all(a.weight_bytes < 34 * MiB for a in plan.assignments)


def test_tensor_parallel_must_divide_the_head_counts():
    with pytest.raises(PlanError, match=r"^tensor_parallel=2 does not divide num_kv_heads=3$"):
        make_plan(variant(num_heads=12, head_dim=48), SIZES, offers(2, 2), 1, 2, BS)
    with pytest.raises(PlanError, match=r"^tensor_parallel=2 does not divide num_heads=9, num_kv_heads=3$"):
        make_plan(SMOL, SIZES, offers(2, 2), 1, 2, BS)
    with pytest.raises(PlanError, match="tensor_parallel=4 does not divide the 6 workers"):
        parallel_layouts(SMOL, 6, tp_size=4)


def test_automatic_layout_is_the_fastest_allowed():
    # 3 CPU workers: gloo all-reduces make TP slow, so three pipeline stages win
    plan = make_plan(SMOL, SIZES, offers(2, 2, 2), None, None, BS, "balanced")
    assert (plan.pp_size, plan.tp_size) == (3, 1)
    tp3 = make_plan(SMOL, SIZES, offers(2, 2, 2), 1, 3, BS, "balanced")
    assert tp3.est_step_s > plan.est_step_s
    # SmolLM2 allows TP 1 or 3; a 2-layer variant cannot have 6 stages and 9 heads forbid TP 2 and 6
    assert parallel_layouts(SMOL, 6) == [(6, 1), (2, 3)]
    two = variant(num_layers=2)
    assert parallel_layouts(two, 6) == [(2, 3)]
    plan = make_plan(two, ModelSizes(SIZES.layer_bytes[:2], SIZES.embed_bytes, SIZES.head_bytes), offers(*[2] * 6),
                     None, None, BS, "balanced")
    assert (plan.pp_size, plan.tp_size, plan.world_size) == (2, 3, 6)
    assert [(a.stage, a.tp_rank) for a in plan.assignments] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    # fixing one size fixes the other
    plan = make_plan(SMOL, SIZES, offers(*[2] * 6), None, 3, BS, "balanced")
    assert (plan.pp_size, plan.tp_size) == (2, 3)
    # with free all-reduces (a hypothetical fabric) and 31 layers, 3 stages hold 11/10/10 layers
    # but 3 TP ranks 31/3 each: TP wins
    free = CostModel(bytes_per_s=1e10, layer_overhead_s=0.0, all_reduce_s=0.0)
    odd = variant(num_layers=31, tie_word_embeddings=False)
    sizes = ModelSizes((SIZES.layer_bytes[0],) * 31, SIZES.embed_bytes, 1000)
    plan = make_plan(odd, sizes, offers(2, 2, 2), None, None, BS, "balanced", cost=free)
    assert (plan.pp_size, plan.tp_size) == (1, 3)
    assert plan.est_step_s < make_plan(odd, sizes, offers(2, 2, 2), 3, 1, BS, "balanced", cost=free).est_step_s


def test_no_layout_fits_names_every_reason():
    with pytest.raises(PlanError, match=r"^no layout of 2 workers is allowed: pipeline_parallel=2 exceeds "
                                        r"num_layers=1; tensor_parallel=2 does not divide num_heads=9, num_kv_heads=3$"):
        parallel_layouts(variant(num_layers=1), 2)
    with pytest.raises(PlanError, match=r"no layout fits: pipeline_parallel=3 x tensor_parallel=1: model needs "
                                        r".*; pipeline_parallel=1 x tensor_parallel=3: model needs"):
        make_plan(SMOL, SIZES, offers(0.01, 0.01, 0.01), None, None, BS, "balanced")


def test_stage_weight_bytes_counts_embedding_and_head_once():
    norm = SIZES.head_bytes - SIZES.embed_bytes  # tied: the head is the embedding plus the final norm
    assert norm == 4 * 576
    assert stage_weight_bytes(SMOL, SIZES, 0, 1, 0, 30, 1) == sum(SIZES.layer_bytes) + SIZES.embed_bytes + norm
    untied = variant(tie_word_embeddings=False)
    assert stage_weight_bytes(untied, SIZES, 0, 1, 0, 30, 1) == sum(SIZES.layer_bytes) + SIZES.embed_bytes + SIZES.head_bytes


def test_stage_weight_bytes_split_the_vocabulary_under_tp():
    """TP=3: each rank holds 49152 / 3 = 16384 rows of the embedding / lm_head (a third of their
    bytes) and the whole final norm; a vocabulary t does not divide gives every rank the padded
    ceil(V / t) rows' bytes (the largest slice)."""
    third = SIZES.embed_bytes // 3
    assert third * 3 == SIZES.embed_bytes
    norm = 4 * 576
    assert stage_weight_bytes(SMOL, SIZES, 1, 2, 15, 30, 3) == 15 * SIZES.layer_bytes[0] // 3 + third + norm
    assert stage_weight_bytes(SMOL, SIZES, 0, 2, 0, 15, 3) == 15 * SIZES.layer_bytes[0] // 3 + third
    assert stage_weight_bytes(SMOL, SIZES, 0, 1, 0, 30, 3) == sum(SIZES.layer_bytes) // 3 + third + norm
    untied = variant(tie_word_embeddings=False)
    assert stage_weight_bytes(untied, SIZES, 0, 1, 0, 30, 3) == sum(SIZES.layer_bytes) // 3 + 2 * third + norm
    odd = variant(vocab_size=49153)  # ceil(49153 / 3) = 16385 rows per rank
    sizes = ModelSizes(SIZES.layer_bytes, 49153 * 612, 49153 * 612 + norm, norm)
    assert stage_weight_bytes(odd, sizes, 1, 2, 15, 30, 3) == 15 * SIZES.layer_bytes[0] // 3 + 16385 * 612 + norm
    with pytest.raises(PlanError, match="tensor_parallel=3 leaves a TP rank no rows of the vocab_size=4"):
        make_plan(variant(vocab_size=4), SIZES, offers(2, 2, 2), 1, 3, BS)


def test_plan_table_has_the_named_columns():
    plan = make_plan(SMOL, SIZES, offers(2, 2, 2, 2, 2, 2), 2, 3, BS, "balanced")
    lines = format_plan(plan).splitlines()
    header = lines[0]
    for col in ("worker", "host", "stage", "layers", "TP rank", "weight bytes", "KV blocks", "speed"):
        assert col in header
    assert len(lines) == 7
    a = plan.assignments[4]
    row = lines[5]
    assert row.startswith("w4") and "host4" in row and f"{a.layer_start}-{a.layer_end - 1}" in row and "1/3" in row
    assert f"{a.weight_bytes / MiB:.1f} MiB" in row and str(plan.num_kv_blocks) in row


# ---- configuration and processes -----------------------------------------------------------------


def test_config_accepts_auto_layouts():
    cfg = load_config(overrides={"workers": {"count": 6}, "parallel": {"tensor_parallel": "auto"}})
    assert cfg.tensor_parallel is None and cfg.pipeline_parallel is None
    cfg = load_config(overrides={"workers": {"count": 6}, "parallel": {"pipeline_parallel": 2, "tensor_parallel": "auto"}})
    assert (cfg.pipeline_parallel, cfg.tensor_parallel) == (2, 3)
    cfg = load_config(overrides={"workers": {"count": 6}, "parallel": {"tensor_parallel": 3}})
    assert (cfg.pipeline_parallel, cfg.tensor_parallel) == (2, 3)
    assert load_config().parallel.layer_split == "balanced"
    with pytest.raises(ConfigError, match="pipeline_parallel=4 does not divide workers.count=6"):
        load_config(overrides={"workers": {"count": 6}, "parallel": {"pipeline_parallel": 4, "tensor_parallel": "auto"}})
    with pytest.raises(ConfigError, match="parallel.tensor_parallel"):
        load_config(overrides={"parallel": {"tensor_parallel": "some"}})


def _cli(*args, cwd=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shardline.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env={**os.environ, "PYTHONPATH": os.getcwd()})


def test_shardline_plan_prints_the_table_and_the_reasons(tmp_path):
    out = _cli("plan", "--workers", "3", "--pp", "auto", "--speed", "1,1,2", "--hosts", "a,b,c", "--memory-gb", "1",
               cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("worker"))
    rows = [line.split() for line in lines[header + 1:header + 4]]
    assert [r[0] for r in rows] == ["worker-0", "worker-1", "worker-2"] and [r[1] for r in rows] == ["a", "b", "c"]
    layers = [tuple(map(int, r[4].split("-"))) for r in rows]
    assert layers[0][0] == 0 and layers[-1][1] == 29 and all(layers[i][1] + 1 == layers[i + 1][0] for i in range(2))
    assert "pipeline 3 x tensor 1" in out.stdout
    out = _cli("plan", "--workers", "2", "--memory-gb", "0.05", cwd=tmp_path)
    assert out.returncode != 0 and "no plan fits: model needs" in out.stderr and "workers offer 0.10 GiB" in out.stderr
    out = _cli("plan", "--workers", "3", "--speed", "1,2", cwd=tmp_path)
    assert out.returncode != 0 and "2 values for 3 workers" in out.stderr


def test_coordinator_refuses_an_impossible_layout_before_any_worker_joins(tmp_path):
    port = free_port_block(3)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"workers": {"count": 2}, "parallel": {"tensor_parallel": 2},
                                   "coordinator": {"client_port": port, "worker_port": port + 1,
                                                   "rendezvous_port": port + 2}}))
    out = _cli("coordinator", str(cfg), timeout=120)
    assert out.returncode == 2
    assert "no plan fits: tensor_parallel=2 does not divide num_heads=9, num_kv_heads=3" in out.stderr
