"""Allowed-token bitmasks and logit bias on the last stage: the packed layout
(shardline/token_bitmask.py) and the sampler (worker/sampler.py) against NumPy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shardline import token_bitmask
from shardline.sampling import SamplingParams
from shardline.worker.sampler import Sampler, SequenceSampling, TokenBitmask, apply_token_bitmask

VOCAB = 100  # not a multiple of 32: the last word is partial


def np_unpack(row: np.ndarray, vocab: int) -> np.ndarray:
    """The layout written out: bit j of word w allows token 32 * w + j."""
    return np.array([(int(row[t // 32]) >> (t % 32)) & 1 for t in range(vocab)], dtype=bool)


def np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x[np.isfinite(x)].max()
    return x - m - np.log(np.exp(x - m).sum())


def test_bitmask_layout_round_trips():
    rng = np.random.default_rng(0)
    allowed = sorted(rng.choice(VOCAB, 37, replace=False).tolist() + [0, 31, 32, VOCAB - 1])
    row = token_bitmask.from_allowed(allowed, VOCAB)
    assert row.shape == (token_bitmask.num_words(VOCAB),) == (4,) and row.dtype == np.int32
    assert np.flatnonzero(np_unpack(row, VOCAB)).tolist() == sorted(set(allowed))
    assert token_bitmask.allowed_tokens(row, VOCAB).tolist() == sorted(set(allowed))
    assert row[0] < 0  # token 31 sets the sign bit of word 0
    rows = np.stack([row, token_bitmask.from_allowed([5], VOCAB)])
    data = token_bitmask.to_bytes(rows)
    assert len(data) == 2 * 4 * 4 and data[:4] == int(row[0]).to_bytes(4, "little", signed=True)
    assert np.array_equal(token_bitmask.from_bytes(data, VOCAB), rows)
    with pytest.raises(ValueError, match="not a whole number of 16-byte rows"):
        token_bitmask.from_bytes(data[:-1], VOCAB)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 100\)"):
        token_bitmask.from_allowed([VOCAB], VOCAB)
    assert not token_bitmask.allocate(3, VOCAB).any()


def _masks(rng, rows: list[int], vocab: int = VOCAB) -> tuple[TokenBitmask, dict[int, np.ndarray]]:
    """A random mask (3..30 allowed tokens) for each of `rows`."""
    allowed = {r: rng.choice(vocab, int(rng.integers(3, 30)), replace=False) for r in rows}
    words = np.stack([token_bitmask.from_allowed(allowed[r], vocab) for r in rows])
    return TokenBitmask(rows, torch.from_numpy(words)), allowed


def test_apply_token_bitmask_matches_numpy_and_leaves_other_rows():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(6, VOCAB)).astype(np.float32)
    mask, allowed = _masks(rng, [1, 4, 5])
    x = torch.from_numpy(logits.copy())
    apply_token_bitmask(x, mask)
    for r in range(6):
        want = logits[r].copy()
        if r in allowed:
            keep = np_unpack(token_bitmask.from_allowed(allowed[r], VOCAB), VOCAB)
            want[~keep] = -np.inf
        assert np.array_equal(x[r].numpy(), want)
    # a mask narrower than the vocabulary (an lm_head padded past the tokenizer) disallows the rest
    wide = torch.from_numpy(rng.normal(size=(1, VOCAB + 40)).astype(np.float32))
    apply_token_bitmask(wide, TokenBitmask([0], torch.from_numpy(token_bitmask.from_allowed([3, 99], VOCAB))[None]))
    assert torch.isfinite(wide[0]).nonzero().flatten().tolist() == [3, 99]


def test_greedy_rows_take_the_argmax_of_masked_biased_logits_and_report_masked_logprobs():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(5, VOCAB)).astype(np.float32) * 3
    mask, allowed = _masks(rng, [0, 2, 3])
    bias = {int(t): float(rng.uniform(-5, 5)) for t in rng.choice(VOCAB, 20, replace=False)}
    params = [SamplingParams(logit_bias=bias if r in (2, 4) else None) for r in range(5)]
    res = Sampler()(torch.from_numpy(logits.copy()), params, [10] * 5, [3] * 5, token_bitmask=mask)
    for r in range(5):
        masked = logits[r].astype(np.float64).copy()
        if r in allowed:
            masked[~np_unpack(token_bitmask.from_allowed(allowed[r], VOCAB), VOCAB)] = -np.inf
        final = masked.copy()
        if params[r].logit_bias:
            for t, b in bias.items():
                final[t] += b
        assert res.token_ids[r] == int(np.argmax(final))
        if r in allowed:
            assert res.token_ids[r] in allowed[r]
        logp = np_log_softmax(masked)  # vLLM's raw logprobs: after the grammar, before the bias
        lp, top = res.logprobs[r]
        assert lp == pytest.approx(logp[res.token_ids[r]], abs=1e-5)
        assert [t for t, _ in top] == np.argsort(-logp, kind="stable")[:3].tolist()
        assert [v for _, v in top] == pytest.approx(np.sort(logp)[::-1][:3], abs=1e-5)


def test_logit_bias_bans_and_forces_and_ignores_ids_past_the_vocabulary():
    logits = torch.zeros(2, VOCAB)
    logits[:, 7] = 10.0
    p_ban = SamplingParams(logit_bias={7: -100, VOCAB + 5: 100, 8: 1.0})
    p_force = SamplingParams(temperature=1.0, seed=3, logit_bias={42: 100})
    res = Sampler()(logits.clone(), [p_ban, p_force], [4, 4], [0, 0])
    assert res.token_ids == [8, 42]


def test_random_rows_draw_only_allowed_tokens_and_seeded_draws_ignore_the_batch():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(8, VOCAB)).astype(np.float32)
    mask, allowed = _masks(rng, [1, 3, 6])
    params = [SamplingParams(temperature=1.2, top_p=0.9, seed=100 + r) for r in range(8)]
    sampler = Sampler()
    for pos in range(20):
        res = sampler(torch.from_numpy(logits.copy()), params, [pos] * 8, [0] * 8, token_bitmask=mask)
        for r in allowed:
            assert res.token_ids[r] in allowed[r]
            alone = sampler(torch.from_numpy(logits[r:r + 1].copy()), [params[r]], [pos], [0],
                            token_bitmask=TokenBitmask([0], mask.bitmask[mask.rows.index(r)][None]))
            assert alone.token_ids == [res.token_ids[r]]


def test_unconstrained_rows_are_unchanged_by_constrained_neighbours():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(6, VOCAB)).astype(np.float32)
    params = [SamplingParams(temperature=0.0 if r % 2 else 0.9, seed=r) for r in range(6)]
    plain = Sampler()(torch.from_numpy(logits.copy()), params, [9] * 6, [2] * 6)
    mask, _ = _masks(rng, [0, 3])
    mixed = Sampler()(torch.from_numpy(logits.copy()), params, [9] * 6, [2] * 6, token_bitmask=mask)
    for r in (1, 2, 4, 5):
        assert mixed.token_ids[r] == plain.token_ids[r] and mixed.logprobs[r] == plain.logprobs[r]


def test_min_tokens_yields_to_a_mask_that_allows_only_eos():
    eos = 2
    logits = torch.from_numpy(np.random.default_rng(5).normal(size=(2, VOCAB)).astype(np.float32))
    p = SamplingParams(min_tokens=5)
    seqs = [SequenceSampling(p, prompt_len=3), SequenceSampling(p, prompt_len=3)]
    only_eos = token_bitmask.from_allowed([eos], VOCAB)
    eos_or_9 = token_bitmask.from_allowed([eos, 9], VOCAB)
    mask = TokenBitmask([0, 1], torch.from_numpy(np.stack([only_eos, eos_or_9])))
    logits[1, eos] = 50.0
    res = Sampler(eos_token_id=eos)(logits, [p, p], [4, 4], [0, 0], seqs, token_bitmask=mask)
    assert res.token_ids == [eos, 9]  # row 0: the grammar wins; row 1: min_tokens bans EOS
