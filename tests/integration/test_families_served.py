"""Families served by real coordinator and worker processes, against transformers.

The tiny models of tests/families.py (configs shaped like the real ones, small pretraining
contexts and windows), a representative subset split over two pipeline stages and two
tensor-parallel ranks: Llama 3.2 with llama3 RoPE scaling (GGUF), Qwen3 with its q/k norms
(safetensors), Gemma 2 with soft-capping, post-norms and alternating sliding windows (GGUF),
Phi-3 with fused tensors, LongRoPE and partial rotary (safetensors). Greedy continuations run
past the pretraining context and the windows and must equal transformers' greedy generation on
the same weights, each token's logprob within LOGPROB_ATOL of transformers' (float32 KV cache:
only the order of the sums differs). A Mixtral-shaped file is refused at start, naming its experts.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shardline.local import LocalCluster
from tests.families import FAMILIES, build_family, reference_greedy, reference_logits, reference_model

pytestmark = pytest.mark.integration

LOGPROB_ATOL = 1e-3  # nats; the in-process test measures logits within 1e-6 of the largest
NEAR_TIE = 1e-3  # nats: a greedy choice may part from transformers' only where its top-2 gap is below this

# (family, format, pipeline stages, tensor-parallel ranks)
SERVED = [
    ("llama3.2", "gguf", 2, 2),
    ("qwen3", "safetensors", 2, 2),
    ("gemma2", "gguf", 2, 2),
    ("phi3", "safetensors", 2, 2),
]


@pytest.fixture(scope="module")
def family_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return lambda name: build_family(name, root / name)


def _config(path, pp: int, tp: int) -> dict:
    return {"model": str(path), "workers": {"count": pp * tp, "threads": 1, "kv_cache_dtype": "float32"},
            "parallel": {"pipeline_parallel": pp, "tensor_parallel": tp}}


@pytest.mark.parametrize("name,fmt,pp,tp", SERVED, ids=[f"{n}-{f}-pp{p}-tp{t}" for n, f, p, t in SERVED])
def test_served_family_generates_what_transformers_generates(family_files, name, fmt, pp, tp):
    f = family_files(name)
    # 12 prompt tokens: below Q8_0's crossover to bf16 tiles (shardline.kernels.dispatch), so every
    # GEMM of the cluster is exact float32 arithmetic, as transformers' is
    prompt = np.random.default_rng(7).integers(0, 256, 12).tolist()
    new = f.family.reach - len(prompt) + 4  # past the pretraining context and the windows
    model = reference_model(str(f.hf_dir))
    want = reference_greedy(model, prompt, new)
    with LocalCluster(_config(f.gguf_path if fmt == "gguf" else f.hf_dir, pp, tp)) as cluster:
        stats = cluster.client.stats()
        assert {(a["stage"], a["tp_rank"]) for a in stats["plan"]["assignments"]} == {
            (s, r) for s in range(pp) for r in range(tp)}
        got = cluster.client.generate(prompt_token_ids=prompt, max_tokens=new, ignore_eos=True, logprobs=2)
    ids = prompt + got.token_ids
    lp = torch.log_softmax(torch.from_numpy(reference_logits(model, ids[:-1], [len(prompt)])), -1).numpy()
    for i, (tok, (tok_lp, _)) in enumerate(zip(got.token_ids, got.logprobs)):
        row = lp[len(prompt) - 1 + i]
        assert abs(tok_lp - row[tok]) < LOGPROB_ATOL, f"token {i}: logprob {tok_lp:.5f} vs {row[tok]:.5f}"
        if tok != want[i]:  # only at a near tie, and then the runs part
            top = np.sort(row)[-2:]
            assert top[1] - top[0] < NEAR_TIE, f"token {i} (position {len(prompt) + i}): {tok} vs {want[i]}"
            return
    assert got.token_ids == want and len(ids) > max(32, FAMILIES[name].config.get("sliding_window") or 0)


def test_mixture_of_experts_gguf_is_refused_at_start(tmp_path):
    from tests.unit.test_families import _mixtral_gguf

    cluster = LocalCluster(_config(_mixtral_gguf(tmp_path / "mixtral.gguf"), 1, 1), ready_timeout_s=120)
    try:
        with pytest.raises(RuntimeError, match=r"architecture 'llama' is a mixture of experts \(8 experts per layer\)"):
            cluster.start()
    finally:
        cluster.stop()
