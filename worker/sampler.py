"""Token sampling on the last stage: greedy, temperature, top-k, top-p, min-p, seeded.

A seeded request draws from a generator keyed by (seed, position), so its tokens are the same
alone or in any batch. Logprobs are those of the model's raw distribution (log_softmax of the
logits before temperature and truncation), as vLLM reports them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shardline.sampling import SamplingParams

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, position) over 64 bits


def position_seed(seed: int, position: int) -> int:
    return (seed * _MIX + position * 0xBF58476D1CE4E5B9 + 1) % (2**63 - 1)


@dataclass
class SampleResult:
    token_ids: list[int]
    # per row: (logprob of the sampled token, [(token, logprob)] top-k) or None
    logprobs: list[tuple[float, list[tuple[int, float]]] | None]


class Sampler:
    def __init__(self):
        self._generator = torch.Generator().manual_seed(torch.seed() % (2**63 - 1))

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, params: list[SamplingParams], positions: list[int],
                 num_logprobs: list[int]) -> SampleResult:
        """logits: [num_rows, vocab] float32; params/positions/num_logprobs: one per row
        (position = index of the token being sampled). Returns one token per row."""
        tokens = logits.argmax(dim=-1).tolist()
        for i, p in enumerate(params):
            if not p.greedy:
                tokens[i] = self._sample_row(logits[i], p, positions[i])
        lps: list = [None] * len(params)
        if any(num_logprobs):
            logp = torch.log_softmax(logits.float(), dim=-1)
            for i, k in enumerate(num_logprobs):
                if k:
                    top = torch.topk(logp[i], k)
                    lps[i] = (float(logp[i, tokens[i]]), list(zip(top.indices.tolist(), top.values.tolist())))
        return SampleResult(tokens, lps)

    def _sample_row(self, logits: torch.Tensor, p: SamplingParams, position: int) -> int:
        x = logits.float() / p.temperature
        if p.top_k > 0 and p.top_k < x.shape[0]:
            kth = torch.topk(x, p.top_k).values[-1]
            x = x.masked_fill(x < kth, float("-inf"))
        probs = torch.softmax(x, dim=-1)
        if p.min_p > 0.0:
            probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
        if p.top_p < 1.0:
            sorted_p, idx = probs.sort(descending=True)
            cum = sorted_p.cumsum(0)
            drop = (cum - sorted_p) >= p.top_p  # keep the smallest prefix whose mass reaches top_p
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(0, idx, sorted_p)
        gen = self._generator
        if p.seed is not None:
            gen = torch.Generator().manual_seed(position_seed(p.seed, position))
        # Gumbel-max in exponential form: argmax(p / E), E ~ Exp(1), samples from p.
        e = torch.empty_like(probs).exponential_(1.0, generator=gen)
        return int((probs / e).argmax())
