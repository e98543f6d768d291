"""Token sampling on the last stage: greedy, temperature, top-k, top-p, min-p, penalties, seeded.

Per row, in vLLM's order (vllm/v1/sample/sampler.py, and the grammar bitmask its model runner
applies before calling the sampler):

    raw logits
        v
    allowed-token bitmask of a constrained row: disallowed tokens -> -inf (in place)
        v  ------> logprobs reported to the client (log_softmax of these logits, as vLLM's
        |          default `raw_logprobs` mode: a constrained row's logprobs are of the masked
        |          distribution; logit bias and penalties are not in them)
        v
    min_tokens: EOS (unless ignore_eos) and stop_token_ids -> -inf while the output is shorter
        |       (unless that would leave no token: a grammar that allows only EOS wins)
        v
    logit_bias: + bias of each listed token
        v
    penalties: repetition (prompt + output tokens), frequency and presence (output tokens)
        v
    greedy: argmax   |   random: / temperature -> min-p -> top-k -> top-p -> draw

The random rows of a step are processed together (`Sampler._sample_rows`), each drawing its
token by Gumbel-max. A seeded request draws its noise from a generator keyed by (seed,
position), so its tokens are the same alone or in any batch; penalties read only the row's own
token history, so they do not depend on the batch either.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from shardline.sampling import SamplingParams
from shardline.token_bitmask import BITS_PER_WORD

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, position) over 64 bits


def position_seed(seed: int, position: int) -> int:
    return (seed * _MIX + position * 0xBF58476D1CE4E5B9 + 1) % (2**63 - 1)


@dataclass
class SequenceSampling:
    """What the last stage keeps for one sequence (sent with its first step, or after a reset).

    prompt_len:           prompt tokens; position - prompt_len = output tokens so far
    num_logprobs:         top-k logprobs per generated token (0: none)
    num_prompt_logprobs:  top-k logprobs per prompt token (0: none)
    token_ids:            the tokens at positions [0, len) when a penalty needs them, else None
    pending_logprobs:     [vocab] log_softmax of the last row of a prompt chunk whose next prompt
                          token arrives with the next chunk (prompt logprobs only)
    """

    params: SamplingParams
    num_logprobs: int = 0
    num_prompt_logprobs: int = 0
    prompt_len: int | None = None
    token_ids: list[int] | None = None
    pending_logprobs: torch.Tensor | None = field(default=None, repr=False)


@dataclass
class TokenBitmask:
    """Allowed-token masks of the constrained rows of one step (the other rows are unconstrained).

    rows:     [m] row indices into the step's logits, one per mask row
    bitmask:  [m, ceil(vocab / 32)] int32, bit j of word w allows token 32 * w + j
              (`shardline.token_bitmask` layout)
    """

    rows: list[int]
    bitmask: torch.Tensor


def apply_token_bitmask(logits: torch.Tensor, mask: TokenBitmask) -> None:
    """Set every token a row's mask disallows to -inf, in place. logits: [rows, vocab] float32;
    tokens past the mask's 32 * words bits count as disallowed."""
    if not mask.rows:
        return
    vocab = logits.shape[1]
    m, words = mask.bitmask.shape
    assert m == len(mask.rows), (m, len(mask.rows))
    shifts = torch.arange(BITS_PER_WORD, dtype=torch.int32)
    bits = (mask.bitmask.to(torch.int32)[:, :, None] >> shifts) & 1  # [m, words, 32]
    allowed = bits.reshape(m, words * BITS_PER_WORD).bool()
    if allowed.shape[1] < vocab:
        allowed = torch.cat([allowed, allowed.new_zeros(m, vocab - allowed.shape[1])], dim=1)
    rows = torch.tensor(mask.rows, dtype=torch.int64)
    logits[rows] = logits[rows].masked_fill(~allowed[:, :vocab], float("-inf"))


def apply_logit_bias(logits: torch.Tensor, bias: dict[int, float]) -> torch.Tensor:
    """logits [vocab] plus `bias` at its tokens (a new tensor); token ids outside the vocabulary
    are ignored."""
    vocab = logits.shape[0]
    items = [(t, b) for t, b in bias.items() if 0 <= t < vocab]
    x = logits.clone()
    if items:
        ids, values = zip(*items)
        x[torch.tensor(ids, dtype=torch.int64)] += torch.tensor(values, dtype=x.dtype)
    return x


@dataclass
class SampleResult:
    token_ids: list[int]
    # per row: (logprob of the sampled token, [(token, logprob)] top-k) or None
    logprobs: list[tuple[float, list[tuple[int, float]]] | None]


def apply_penalties(logits: torch.Tensor, prompt_ids: list[int], output_ids: list[int], p: SamplingParams
                    ) -> torch.Tensor:
    """vLLM's `apply_penalties` for one row (vllm/model_executor/layers/utils.py).

    logits: [vocab] float32 (a new tensor is returned). A token seen in the prompt or the output
    has its logit divided by `repetition_penalty` when positive and multiplied when negative;
    then `frequency_penalty * count_in_output` and `presence_penalty * (count_in_output > 0)`
    are subtracted (OpenAI's definition).
    """
    vocab = logits.shape[0]
    out_counts = torch.bincount(torch.tensor(output_ids, dtype=torch.int64), minlength=vocab)[:vocab]
    x = logits.float().clone()
    if p.repetition_penalty != 1.0:
        seen = out_counts > 0
        if prompt_ids:
            seen |= torch.bincount(torch.tensor(prompt_ids, dtype=torch.int64), minlength=vocab)[:vocab] > 0
        r = torch.where(seen, torch.tensor(float(p.repetition_penalty)), torch.tensor(1.0))
        x = torch.where(x > 0, x / r, x * r)
    if p.frequency_penalty:
        x -= p.frequency_penalty * out_counts.float()
    if p.presence_penalty:
        x -= p.presence_penalty * (out_counts > 0).float()
    return x


def _argmax_rows(logits: torch.Tensor) -> list[int]:
    """Index of each row's largest logit (the first of equal ones; a NaN counts as largest, as in
    torch). logits [rows, vocab]. NumPy's argmax on a CPU float32 array (SIMD), which on one
    thread costs a fraction of torch's `argmax(dim=-1)` (the last stage runs it on every decode
    step); elsewhere torch's."""
    if not logits.is_cuda and logits.dtype == torch.float32 and logits.dim() == 2 and logits.shape[1]:
        return logits.detach().contiguous().numpy().argmax(axis=1).tolist()
    return logits.argmax(dim=-1).tolist()


class Sampler:
    def __init__(self, eos_token_id: int | None = None):
        self.eos_token_id = eos_token_id
        self._generator = torch.Generator().manual_seed(torch.seed() % (2**63 - 1))

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, params: list[SamplingParams], positions: list[int],
                 num_logprobs: list[int], seqs: list[SequenceSampling | None] | None = None,
                 token_bitmask: TokenBitmask | None = None) -> SampleResult:
        """logits: [num_rows, vocab] float32; params/positions/num_logprobs: one per row
        (position = index of the token being sampled). `seqs` (optional, one per row) gives the
        prompt length (for min_tokens) and the token history (for penalties); without it those
        options are not applied. `token_bitmask`: the allowed tokens of the constrained rows,
        applied to `logits` in place. Returns one token per row."""
        if token_bitmask is not None:
            apply_token_bitmask(logits, token_bitmask)
        tokens = _argmax_rows(logits)
        drawn: list[int] = []  # rows sampled at random, drawn together below
        drawn_rows: list[torch.Tensor] = []
        for i, p in enumerate(params):
            seq = seqs[i] if seqs is not None else None
            row = self._process_row(logits[i], p, positions[i], seq)
            if p.greedy:
                if row is not None:
                    tokens[i] = int(row.argmax())
            else:
                drawn.append(i)
                drawn_rows.append(logits[i] if row is None else row)
        if drawn:
            picks = self._sample_rows(torch.stack(drawn_rows), [params[i] for i in drawn],
                                      [positions[i] for i in drawn])
            for i, t in zip(drawn, picks):
                tokens[i] = t
        lps: list = [None] * len(params)
        if any(num_logprobs):
            logp = torch.log_softmax(logits.float(), dim=-1)
            for i, k in enumerate(num_logprobs):
                if k:
                    top = torch.topk(logp[i], k)
                    lps[i] = (float(logp[i, tokens[i]]), list(zip(top.indices.tolist(), top.values.tolist())))
        return SampleResult(tokens, lps)

    def _process_row(self, logits: torch.Tensor, p: SamplingParams, position: int,
                     seq: SequenceSampling | None) -> torch.Tensor:
        """min_tokens masking, logit bias and penalties: the processed row [vocab], or None when
        none applies (the row is used as is)."""
        known = seq is not None and seq.prompt_len is not None  # min_tokens and penalties need it
        x = logits
        changed = False
        if known and position - seq.prompt_len < p.min_tokens:
            banned = list(p.stop_token_ids)
            if not p.ignore_eos and self.eos_token_id is not None:
                banned.append(self.eos_token_id)
            banned = [t for t in banned if 0 <= t < x.shape[0]]
            if banned:
                y = x.clone()
                y[banned] = float("-inf")
                if bool(torch.isfinite(y).any()):  # else a grammar allows only these: it wins
                    x, changed = y, True
        if p.logit_bias:
            x = apply_logit_bias(x, p.logit_bias)
            changed = True
        if known and p.needs_history and seq.token_ids is not None:
            history = seq.token_ids[:position]
            x = apply_penalties(x, history[: seq.prompt_len], history[seq.prompt_len:], p)
            changed = True
        return x if changed else None

    def _sample_rows(self, logits: torch.Tensor, params: list[SamplingParams], positions: list[int]) -> list[int]:
        """Random sampling of every row of logits [rows, vocab] at once: / temperature -> min-p ->
        top-k -> top-p, then one Gumbel-max draw per row with noise from the row's generator
        ((seed, position) for a seeded row, so its token depends on nothing else in the batch).
        top-p takes the 64 most probable tokens of each row first and sorts the whole row only
        when their mass is below top_p (`_top_p`): a sort of the vocabulary costs far more than
        a top-k of a few candidates."""
        x = logits.float() / torch.tensor([p.temperature for p in params], dtype=torch.float32)[:, None]
        neg_inf = float("-inf")
        min_p = torch.tensor([p.min_p for p in params], dtype=torch.float32)[:, None]
        if bool((min_p > 0).any()):  # drop tokens below min_p x the row's top probability
            probs = torch.softmax(x, dim=-1)
            x = x.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, neg_inf)
        vocab = x.shape[1]
        top_k = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
        if any(top_k):  # keep the values >= each row's k-th largest
            vals = torch.topk(x, max(top_k), dim=-1).values
            kth = vals.gather(1, torch.tensor([max(k, 1) - 1 for k in top_k])[:, None])
            kth = torch.where(torch.tensor(top_k)[:, None] > 0, kth, torch.full_like(kth, neg_inf))
            x = x.masked_fill(x < kth, neg_inf)
        probs = torch.softmax(x, dim=-1)  # renormalized over the survivors of min-p and top-k
        for r, p in enumerate(params):
            if p.top_p < 1.0:
                probs[r] = _top_p(probs[r], p.top_p)
        # Gumbel-max in exponential form: argmax(p / E), E = -log U ~ Exp(1), one U per token of
        # the vocabulary from the row's generator. Each token keeps its own noise, so logits that
        # differ in the last bits (another batch size takes another GEMM path) change the draw
        # only on a near-tie; an inverse-CDF draw (one U against the cumulative sum) moves with
        # every change of the mass ahead of the token, so it flips far more often.
        noise = torch.empty_like(probs)
        for r, p in enumerate(params):
            gen = self._generator
            if p.seed is not None:
                gen = torch.Generator().manual_seed(position_seed(p.seed, positions[r]))
            noise[r].uniform_(generator=gen)  # [0, 1); uniform_ and one log below cost less than exponential_
        noise.clamp_(min=torch.finfo(torch.float32).tiny).log_().neg_()  # (0, 87.4]: never 0 or inf
        return _argmax_rows(probs / noise)


TOP_P_CANDIDATES = (64, 1024)  # top-k sizes tried before a full sort of the vocabulary (`_top_p`)


def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """probs [vocab] with every token outside the smallest most-probable prefix whose mass reaches
    top_p set to 0 (the most probable token always stays; a top_p below float32's range keeps
    it alone). The prefix is looked for among the 64, then the 1024 most probable tokens
    (`TOP_P_CANDIDATES`), and in the fully sorted row only when their mass falls short."""
    vocab = probs.shape[0]
    for k in (*(c for c in TOP_P_CANDIDATES if c < vocab), vocab):
        if k == vocab:
            sorted_p, idx = probs.sort(descending=True)
            break
        sorted_p, idx = torch.topk(probs, k)  # sorted, largest first
        if float(sorted_p.sum()) >= top_p:
            break
    cum = sorted_p.cumsum(0)
    drop = (cum - sorted_p) >= top_p  # keep the smallest prefix whose mass reaches top_p
    drop[0] = False
    return torch.zeros_like(probs).scatter_(0, idx, sorted_p.masked_fill(drop, 0.0))


def prompt_logprobs(logp: torch.Tensor, targets: list[int], k: int) -> list[list]:
    """Prompt logprob entries: logp [rows, vocab] log-probabilities of the rows predicting
    `targets` (one target token per row). Returns per row [logprob of the target,
    [[token, logprob] x k]] (the client-plane logprob entry)."""
    top = torch.topk(logp, k, dim=-1)
    idx = torch.tensor(targets, dtype=torch.int64)
    lp = logp.gather(1, idx[:, None])[:, 0].tolist()
    return [[lp[r], [[t, v] for t, v in zip(top.indices[r].tolist(), top.values[r].tolist())]]
            for r in range(len(targets))]
