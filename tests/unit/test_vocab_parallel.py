"""Vocabulary-parallel embedding and lm_head (shardline/worker/vocab_parallel.py) against the whole-vocabulary
versions on random weights: t ranks run in threads over a fake TP group whose all-reduce sums in
rank order and whose all-gather concatenates in rank order (as shardline/worker/comm.py's); a vocabulary
that t does not divide exercises the padding. On the real SmolLM2 GGUF: each TP=3 rank holds a
third of the embedding's rows and bytes, and a one-layer stage's weights drop by two thirds of it."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from shardline.kernels.formats import quantize
from shardline.shard import vocab_range
from shardline.worker.vocab_parallel import VocabParallelEmbedding, VocabParallelLMHead


class FakeGroup:
    """t ranks in threads: `all_reduce` sums the ranks' tensors in rank order, `all_gather`
    concatenates them along the last dimension in rank order; every rank gets the result."""

    def __init__(self, t: int):
        self.t = t
        self.slots: list[torch.Tensor | None] = [None] * t
        self.barrier = threading.Barrier(t, timeout=60)

    def _collect(self, rank: int, x: torch.Tensor) -> list[torch.Tensor]:
        self.slots[rank] = x.clone()
        self.barrier.wait()
        parts = list(self.slots)
        self.barrier.wait()  # nobody overwrites a slot before every rank has read them all
        return parts

    def all_reduce(self, rank: int):
        def f(x):
            parts = self._collect(rank, x)
            out = parts[0].clone()
            for p in parts[1:]:
                out += p
            return out
        return f

    def all_gather(self, rank: int):
        return lambda x: torch.cat(self._collect(rank, x), dim=-1)


def run_ranks(t: int, fn) -> list:
    """fn(rank) in t threads at once; their results in rank order."""
    out, errors = [None] * t, []

    def target(r):
        try:
            out[r] = fn(r)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=target, args=(r,)) for r in range(t)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert not errors, errors
    return out


def test_vocab_range_pads_to_ceil_and_covers_the_vocabulary():
    assert [vocab_range(49152, r, 3) for r in range(3)] == [(0, 16384), (16384, 32768), (32768, 49152)]
    assert [vocab_range(103, r, 3) for r in range(3)] == [(0, 35), (35, 70), (70, 103)]
    assert vocab_range(103, 0, 1) == (0, 103)
    assert vocab_range(10, 3, 4) == (9, 10)  # per = 3: only the last slice is short
    with pytest.raises(ValueError, match="leaves rank 5 no rows"):
        vocab_range(10, 5, 6)  # per = 2: ranks 0-4 hold all 10 rows


@pytest.mark.parametrize("vocab,t,qtype", [(96, 3, "q8_0"), (103, 3, "q4_1"), (103, 3, "int8"), (50, 2, "f32")])
def test_vocab_parallel_equals_the_whole_vocabulary(vocab, t, qtype):
    """The TP embedding equals the whole one bit for bit (one rank contributes each row, the others
    +0.0); the gathered TP logits equal the whole lm_head's within float32 rounding and give the
    same argmax and log-softmax, with no padding column left."""
    hidden = 64
    g = np.random.default_rng(7)
    w = quantize(g.standard_normal((vocab, hidden)).astype(np.float32), qtype, 32)
    ids = torch.tensor(g.integers(0, vocab, 41), dtype=torch.int64)
    ids[:3] = torch.tensor([0, vocab - 1, vocab // t])  # both ends and a slice boundary
    h = torch.from_numpy(g.standard_normal((5, hidden)).astype(np.float32))
    want_embed = VocabParallelEmbedding(w)(ids)
    want_logits = VocabParallelLMHead(w, vocab)(h)
    assert want_embed.shape == (41, hidden) and want_logits.shape == (5, vocab)

    group = FakeGroup(t)

    def rank(r):
        v0, v1 = vocab_range(vocab, r, t)
        part = w.row_slice(v0, v1)
        emb = VocabParallelEmbedding(part, v0, group.all_reduce(r))
        head = VocabParallelLMHead(part, vocab, v0, t, group.all_gather(r))
        return emb(ids), head(h), part.out_features

    results = run_ranks(t, rank)
    assert sum(n for _, _, n in results) == vocab  # the slices tile the vocabulary
    for embed, logits, _ in results:
        assert torch.equal(embed, want_embed)
        assert logits.shape == (5, vocab) and torch.isfinite(logits).all()
        torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-5)
        assert torch.equal(logits.argmax(-1), want_logits.argmax(-1))
        torch.testing.assert_close(torch.log_softmax(logits, -1), torch.log_softmax(want_logits, -1),
                                   rtol=1e-5, atol=1e-5)


def test_a_rank_alone_returns_its_partial_logits():
    w = quantize(np.random.default_rng(1).standard_normal((103, 32)).astype(np.float32), "f32")
    head = VocabParallelLMHead(w.row_slice(70, 103), 103, 70, 3)
    h = torch.randn(2, 32)
    torch.testing.assert_close(head(h), VocabParallelLMHead(w, 103)(h)[:, 70:])


def test_each_tp_rank_holds_a_third_of_smollm2s_embedding():
    """SmolLM2's token_embd (49152 x 576, Q8_0, tied lm_head) under TP=3: 16384 rows and a third of
    the bytes per rank (about V/t rows), and a one-stage one-layer shard's weights drop by two
    thirds of the embedding against TP=1's whole copy."""
    from shardline.model_file import read_model_spec, resolve_model_path
    from shardline.worker.loader import GGUFShardLoader, ShardSpec
    from shardline.worker.model import StageModel

    path = str(resolve_model_path("smollm2-135m"))
    spec = read_model_spec(path)
    whole = GGUFShardLoader(path, spec, ShardSpec(0, 1, True, True)).quantized("token_embd.weight")
    assert whole.shape == (49152, 576)
    tp1 = StageModel(spec, GGUFShardLoader(path, spec, ShardSpec(0, 1, True, True)), 64)
    for r in range(3):
        model = StageModel(spec, GGUFShardLoader(path, spec, ShardSpec(0, 1, True, True, r, 3)), 64)
        emb = model.embed_tokens.weight
        assert emb.out_features == spec.vocab_size // 3 and emb.nbytes == whole.nbytes // 3
        assert model.lm_head.qweight.out_features == emb.out_features  # tied: the same rows
        assert model.embed_tokens.vocab_start == model.lm_head.vocab_start == r * (spec.vocab_size // 3)
        layer = sum(m.qweight.nbytes for m in model.layers.modules() if hasattr(m, "qweight"))
        layer_tp1 = sum(m.qweight.nbytes for m in tp1.layers.modules() if hasattr(m, "qweight"))
        assert layer == layer_tp1 // 3
        saved = tp1.weight_bytes() - model.weight_bytes()
        assert saved == whole.nbytes - whole.nbytes // 3 + layer_tp1 - layer
