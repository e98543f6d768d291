"""Request options: SamplingParams validation of the newer fields, choice seeds, and the sampler's
min_tokens, penalties, min-p/top-p order and prompt logprobs against NumPy re-implementations of
vLLM's definitions."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from shardline.sampling import MAX_LOGPROBS, MAX_N, SamplingParams, check_num_logprobs, choice_seed
from shardline.worker.sampler import Sampler, SequenceSampling, apply_penalties, prompt_logprobs


@pytest.mark.parametrize("field, value", [
    ("n", 0), ("n", MAX_N + 1), ("n", 1.5), ("n", True),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("repetition_penalty", 10.5),
    ("repetition_penalty", "x"), ("presence_penalty", 2.5), ("presence_penalty", -2.01),
    ("frequency_penalty", -3), ("frequency_penalty", None), ("min_tokens", 1.0),
])
def test_new_fields_out_of_range_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"^{field}="):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("name, value", [("logprobs", MAX_LOGPROBS + 1), ("logprobs", -1),
                                         ("prompt_logprobs", True), ("prompt_logprobs", 2.0)])
def test_logprob_counts_are_checked_with_the_field_named(name, value):
    with pytest.raises(ValueError, match=rf"^{name}="):
        check_num_logprobs(name, value)
    assert check_num_logprobs(name, None) == 0 and check_num_logprobs(name, MAX_LOGPROBS) == MAX_LOGPROBS


def test_choice_params_derive_distinct_seeds():
    p = SamplingParams(n=4, seed=123, temperature=1.0)
    seeds = [p.for_choice(i).seed for i in range(4)]
    assert seeds[0] == 123 and len(set(seeds)) == 4 and all(0 <= s < 2**63 for s in seeds)
    assert seeds[2] == choice_seed(123, 2) and all(p.for_choice(i).n == 1 for i in range(4))
    assert SamplingParams(n=3).for_choice(2).seed is None
    assert SamplingParams.from_dict(p.to_dict()) == p  # the new fields travel


def np_penalties(logits, prompt, output, rep, pres, freq):
    """vLLM's apply_penalties written out in NumPy (vllm/model_executor/layers/utils.py)."""
    x = logits.astype(np.float64).copy()
    seen = np.zeros(len(x), bool)
    seen[list(prompt) + list(output)] = True
    x[seen] = np.where(x[seen] > 0, x[seen] / rep, x[seen] * rep)
    counts = np.bincount(np.asarray(output, dtype=np.int64), minlength=len(x))
    return x - freq * counts - pres * (counts > 0)


def test_penalties_match_vllm_formula():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=64).astype(np.float32)
    prompt, output = [1, 5, 5, 9], [5, 7, 7, 7, 30]
    for rep, pres, freq in [(1.3, 0.0, 0.0), (0.7, 0.0, 0.0), (1.0, 0.5, 0.0), (1.0, 0.0, 0.4), (1.8, -0.3, 1.1)]:
        p = SamplingParams(repetition_penalty=rep, presence_penalty=pres, frequency_penalty=freq)
        got = apply_penalties(torch.from_numpy(logits), prompt, output, p).numpy()
        np.testing.assert_allclose(got, np_penalties(logits, prompt, output, rep, pres, freq), rtol=1e-6, atol=1e-6)


def _seq(prompt, output=(), **kw):
    p = SamplingParams(**kw)
    return p, SequenceSampling(p, prompt_len=len(prompt), token_ids=list(prompt) + list(output))


def test_greedy_with_penalties_takes_the_argmax_of_the_penalized_logits():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(6, 40)).astype(np.float32)
    prompt, output = [3, 4], [int(logits[0].argmax()), 11]
    p, st = _seq(prompt, output, repetition_penalty=5.0, frequency_penalty=1.0)
    rows = torch.from_numpy(logits)
    position = len(prompt) + len(output)
    tokens = Sampler()(rows, [p] * 6, [position] * 6, [0] * 6, [st] * 6).token_ids
    want = [int(np_penalties(r, prompt, output, 5.0, 0.0, 1.0).argmax()) for r in logits]
    assert tokens == want and tokens[0] != int(logits[0].argmax())
    # without the history (no seqs given) the raw argmax is taken
    assert Sampler()(rows, [p] * 6, [position] * 6, [0] * 6).token_ids == logits.argmax(-1).tolist()


def test_min_tokens_bans_eos_and_stop_token_ids_until_reached():
    eos, stop = 2, 7
    logits = torch.zeros(1, 16)
    logits[0, eos], logits[0, stop], logits[0, 9] = 5.0, 4.0, 3.0
    p, st = _seq([1, 1, 1], min_tokens=2, stop_token_ids=[stop])
    sampler = Sampler(eos_token_id=eos)
    # output so far: position - prompt_len tokens
    assert [sampler(logits, [p], [pos], [0], [st]).token_ids[0] for pos in (3, 4, 5)] == [9, 9, eos]
    p2, st2 = _seq([1, 1, 1], min_tokens=2, stop_token_ids=[stop], ignore_eos=True)
    assert sampler(logits, [p2], [3], [0], [st2]).token_ids == [eos]  # ignore_eos: EOS is no stop token
    # random sampling never draws a banned token either
    _, st3 = _seq([1, 1, 1])
    seen = {sampler(logits, [SamplingParams(min_tokens=1, temperature=1.0, seed=s)], [3], [0], [st3]).token_ids[0]
            for s in range(200)}
    assert eos not in seen and len(seen) > 1


def test_seeded_penalized_sampling_does_not_depend_on_the_batch():
    g = torch.Generator().manual_seed(5)
    row, others = torch.randn(50, generator=g), torch.randn(3, 50, generator=g)
    p, st = _seq([1, 2, 3], [4, 4], temperature=0.8, seed=42, presence_penalty=1.5, repetition_penalty=1.2)
    q, sq = _seq([9], [8, 8, 8], temperature=1.0, seed=1, frequency_penalty=2.0)
    s = Sampler()
    alone = s(row[None], [p], [5], [0], [st]).token_ids[0]
    mixed = s(torch.stack([*others, row]), [q, SamplingParams(), q, p], [4, 4, 4, 5], [0] * 4,
              [sq, None, sq, st]).token_ids[3]
    assert alone == mixed


def draws(probs, n=4000, **kw):
    logits = torch.log(torch.tensor(probs)).expand(n, -1)
    p = SamplingParams(temperature=1.0, seed=11, **kw)
    return Counter(Sampler()(logits, [p] * n, list(range(n)), [0] * n).token_ids)


def test_top_p_applies_to_the_min_p_survivors_renormalized():
    # min_p 0.6 keeps tokens with p >= 0.24: {0: 0.4, 1: 0.3} -> renormalized {4/7, 3/7};
    # top_p 0.5 then keeps token 0 alone (vLLM order: min-p, then top-k/top-p on what is left).
    assert set(draws([0.4, 0.3, 0.2, 0.1], min_p=0.6, top_p=0.5)) == {0}
    assert set(draws([0.4, 0.3, 0.2, 0.1], min_p=0.6)) == {0, 1}


def test_prompt_logprobs_entries_are_log_softmax_rows():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(3, 30)).astype(np.float32)
    ref = logits - np.log(np.exp(logits.astype(np.float64)).sum(-1, keepdims=True))
    entries = prompt_logprobs(torch.log_softmax(torch.from_numpy(logits), -1), [4, 0, 29], 3)
    for r, (target, (lp, top)) in enumerate(zip([4, 0, 29], entries)):
        assert lp == pytest.approx(ref[r, target], abs=1e-5)
        order = np.argsort(-ref[r])[:3]
        assert [t for t, _ in top] == order.tolist()
        assert [v for _, v in top] == pytest.approx(ref[r, order].tolist(), abs=1e-5)


@pytest.mark.parametrize("field, value", [
    ("max_tokens", 2**64), ("top_k", 2**64), ("stop_token_ids", [2**64]), ("stop", 5), ("stop", {"a": 1}),
    ("stop_token_ids", 5),
])
def test_values_the_wire_cannot_carry_are_refused_with_the_field_named(field, value):
    with pytest.raises(ValueError, match=rf"^{field}="):
        SamplingParams(**{field: value})


def test_extreme_top_p_and_temperature_still_sample_a_real_token():
    """top_p below float32's range and a denormal temperature once gave token 0 for every row
    (every token dropped; logits / 5e-324 = inf -> NaN probabilities)."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 500, generator=gen)
    best = logits.argmax(dim=-1).tolist()
    sampler = Sampler(eos_token_id=None)
    params = [SamplingParams(temperature=1.0, top_p=1e-300, seed=1), SamplingParams(temperature=5e-324)]
    assert params[1].greedy and not params[0].greedy
    assert sampler(logits, params, [3, 3], [0, 0]).token_ids == best
