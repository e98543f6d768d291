"""Vocabulary-parallel token embedding and lm_head (Megatron-LM, Shoeybi et al. 2019, sec. 3).

With tensor parallelism t, TP rank r of a stage holds only the vocabulary rows
[v0, v1) = `shardline.shard.vocab_range(V, r, t)` of the token embedding (first stage) and of the
lm_head (last stage; for tied models the same rows of the same tensor), each padded to
per = ceil(V / t) rows (only the last rank's slice can be short; padding rows are never stored):

    embedding   ids [T] int64
                rank r: row ids - v0 of its slice where v0 <= id < v1, zeros elsewhere   [T, hidden]
                all-reduce (sum over the TP group)                                       [T, hidden]
                Exactly one rank contributes each row and the others add +0.0, so the result is
                the TP=1 lookup bit for bit.

    lm_head     h [S, hidden] (after the final norm)
                rank r: h @ W[v0:v1].T = logits[:, v0:v1]                                [S, v1 - v0]
                pad to `per` columns with -inf (last rank only, when t does not divide V)  [S, per]
                all-gather (ranks side by side, in rank order)                           [S, t * per]
                cut to [:, :V]                                                            [S, V]
                Each column is the dot product of one weight row with h, as at TP=1; every rank
                then holds the full logits, and the sampler (first rank of the stage) sees the
                same logits as TP=1 (up to the hidden state's own TP rounding).

The all-reduce and all-gather are `shardline.worker.comm.StageComm`'s (gloo: one round of isend/irecv; NCCL:
its collectives). Per rank the stage holds V/t rows instead of V: for SmolLM2's 49152 x 576 Q8_0
tied embedding, 10.0 MB instead of 30.1 MB (and the CPU kernels' row-interleaved copy of the
lm_head shrinks alike).
"""

from __future__ import annotations

from typing import Callable

import torch

from shardline.kernels.dispatch import QuantizedLinear, dequantize
from shardline.kernels.formats import QuantizedWeight


class VocabParallelEmbedding:
    """Token embedding rows [vocab_start, vocab_start + weight.out_features), kept packed.

    weight: QuantizedWeight [v1 - v0, hidden] (a memmap view for GGUF; encoded on load for
    safetensors). all_reduce: sums [T, hidden] float32 over the TP group, or None at TP=1 (then
    the slice must be the whole vocabulary).
    __call__(ids [T] int64) -> [T, hidden] float32.
    """

    def __init__(self, weight: QuantizedWeight, vocab_start: int = 0,
                 all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None):
        assert all_reduce is not None or vocab_start == 0, "a vocabulary slice needs the TP all-reduce"
        self.weight = weight
        self.vocab_start = vocab_start
        self.all_reduce = all_reduce

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes

    def _rows(self, local: torch.Tensor) -> torch.Tensor:
        """Dequantized rows `local` [n] int64 of the slice -> [n, hidden] float32; only those rows
        are read (a GGUF memmap's other pages stay untouched)."""
        w = self.weight
        i = local.numpy()
        pick = lambda a: None if a is None else a[i]  # noqa: E731  (int8/int4: per-row scales, mins)
        return dequantize(QuantizedWeight(w.qtype, (len(i), w.in_features), w.data[i], pick(w.scales),
                                          pick(w.mins), w.group_size))

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        if self.all_reduce is None:
            return self._rows(ids)
        local = ids - self.vocab_start
        mine = (local >= 0) & (local < self.weight.out_features)
        out = torch.zeros(ids.shape[0], self.weight.in_features, dtype=torch.float32)
        if bool(mine.any()):
            out[mine] = self._rows(local[mine])
        return self.all_reduce(out)


class VocabParallelLMHead(QuantizedLinear):
    """The lm_head's vocabulary rows [vocab_start, vocab_start + weight.out_features), with the
    logits all-gathered over the TP group (see the module doc).

    weight: QuantizedWeight [v1 - v0, hidden]; vocab_size: V of the whole model; tp_size: t.
    all_gather: [S, per] float32 -> [S, t * per] (shardline.worker.comm.StageComm.all_gather), or None:
    then forward returns only this rank's partial logits [S, v1 - v0] (tests, or TP=1 where they
    are all of them).
    forward(h [S, hidden] float32) -> logits [S, V] float32.
    """

    def __init__(self, weight: QuantizedWeight, vocab_size: int, vocab_start: int = 0, tp_size: int = 1,
                 all_gather: Callable[[torch.Tensor], torch.Tensor] | None = None):
        super().__init__(weight)
        self.vocab_size = vocab_size
        self.vocab_start = vocab_start
        self.tp_size = tp_size
        self.per_rank = -(-vocab_size // tp_size)  # ceil(V / t): every rank's slice, padded
        assert weight.out_features <= self.per_rank and vocab_start + weight.out_features <= vocab_size
        self.all_gather = all_gather

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        logits = super().forward(h)  # [S, v1 - v0]
        if self.all_gather is None or self.tp_size == 1:
            return logits
        pad = self.per_rank - logits.shape[-1]
        if pad:
            logits = torch.cat([logits, logits.new_full((logits.shape[0], pad), float("-inf"))], dim=-1)
        return self.all_gather(logits)[:, : self.vocab_size]

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", vocab=[{self.vocab_start}, {self.vocab_start + self.out_features})"
                f" of {self.vocab_size}, tp_size={self.tp_size}")
