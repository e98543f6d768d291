"""Tensor and pipeline parallel layouts on the real SmolLM2 (9 query heads, 3 KV heads, so TP is 1
or 3): TP=3, TP=3 x PP=2 and PP=3 give the greedy tokens of TP=1, and their log-probabilities
match transformers' fp32 forward on the same GGUF.

Tolerances: greedy tokens may part only at a near tie (`assert_same_greedy`, NEAR_TIE nats:
a TP rank sums its 1/3 of each row-parallel matmul and the all-reduce adds the three partial
sums, a different floating-point order than TP=1); logprobs within 2e-3 absolute of the
reference (measured differences are ~1e-5, as for pipeline layouts in test_end_to_end.py).
Six worker processes on two cores are slow, so outputs are short.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.integration.conftest import assert_same_greedy, pp_config

pytestmark = pytest.mark.integration

PROMPTS = ["The capital of France is", "def fibonacci(n):"]
MAX_TOKENS = 6
TOP_K = 5
LOGPROB_ATOL = 2e-3
KV_BLOCKS = 64  # small pools: six workers share this machine's memory

LAYOUTS = {
    "tp3": {"workers": {"count": 3, "threads": 1}, "parallel": {"pipeline_parallel": 1, "tensor_parallel": 3},
            "scheduler": {"num_kv_blocks": KV_BLOCKS}},
    "tp3xpp2": {"workers": {"count": 6, "threads": 1}, "parallel": {"pipeline_parallel": 2, "tensor_parallel": 3},
                "scheduler": {"num_kv_blocks": KV_BLOCKS}},
    "pp3": pp_config(3),
}


@pytest.fixture(scope="module")
def tokenizer():
    from coordinator.tokenizer import Tokenizer
    from shardline.model_file import resolve_model_path

    return Tokenizer.from_gguf(resolve_model_path("smollm2-135m"))


@pytest.fixture(scope="module")
def tp1_outputs(clusters, tokenizer):
    c = clusters.get(pp_config(1))
    return [c.client.generate(prompt_token_ids=tokenizer.encode(p), max_tokens=MAX_TOKENS, ignore_eos=True,
                              logprobs=TOP_K) for p in PROMPTS], c.client.stats()


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_tp1_and_transformers(layout, clusters, tokenizer, tp1_outputs):
    from tests.reference import reference_logits

    reference, tp1_stats = tp1_outputs
    c = clusters.get(LAYOUTS[layout])
    stats = c.client.stats()
    plan = stats["plan"]
    want = LAYOUTS[layout]["parallel"]
    assert (plan["pp_size"], plan["tp_size"]) == (want["pipeline_parallel"], want["tensor_parallel"])
    if plan["tp_size"] == 3:  # each rank holds a third of every layer (plus the whole embedding/head)
        full = tp1_stats["workers"][0]["weight_bytes"]
        assert all(w["weight_bytes"] < 0.8 * full for w in stats["workers"])
    for prompt, ref in zip(PROMPTS, reference):
        ids = tokenizer.encode(prompt)
        r = c.client.generate(prompt_token_ids=ids, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=TOP_K)
        assert len(r.token_ids) == MAX_TOKENS
        assert_same_greedy(ref, r)
        # every step's logprobs against transformers, teacher-forced on this layout's tokens
        logits = reference_logits(ids + r.token_ids[:-1])
        for i, (tok, (lp, top)) in enumerate(zip(r.token_ids, r.logprobs)):
            row = logits[len(ids) - 1 + i].astype(np.float64)
            row = row - row.max() - np.log(np.exp(row - row.max()).sum())
            assert abs(lp - row[tok]) < LOGPROB_ATOL, f"{layout} {prompt!r} token {i}: {lp} vs {row[tok]}"
            ref_top = np.argsort(-row)[:TOP_K]
            got = dict((t, v) for t, v in top)
            np.testing.assert_allclose([got.get(int(t), -np.inf) for t in ref_top], row[ref_top], atol=LOGPROB_ATOL,
                                       err_msg=f"{layout} {prompt!r} token {i}")
