"""StepRunner (shardline/worker/step_runner.py) without processes: a one-stage, one-rank runner
on the first two layers of the packaged SmolLM2 (their output through the final norm and
lm_head: a real forward, not a good model) and a stand-in for the data plane, which a one-stage
plan never uses. Async scheduling with one stage: the runner's own sampler gives a
continuation its input token."""

from __future__ import annotations

import pytest
import torch

from shardline import messages as M
from shardline import protocol as P
from shardline.model_file import read_model_spec, resolve_model_path
from shardline.sampling import SamplingParams
from shardline.worker.kv_cache import KVCache
from shardline.worker.loader import GGUFShardLoader, ShardSpec
from shardline.worker.model import StageModel
from shardline.worker.sampler import Sampler
from shardline.worker.step_runner import StepRunner

PATH = str(resolve_model_path("smollm2-135m"))
SPEC = read_model_spec(PATH)
SHARD = ShardSpec(0, 2, True, True, 0, 1)
BLOCK_SIZE = 16
PROMPT = [504, 3458, 282, 4649, 314]  # any in-vocabulary ids


class LocalComm:
    """The data plane of a one-stage, one-rank plan: nothing crosses it; records how it was left."""

    has_token_stream = False

    def __init__(self):
        self.left = None

    def abort(self) -> None:
        self.left = "abort"

    def close(self) -> None:
        self.left = "close"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return StageModel(SPEC, GGUFShardLoader(PATH, SPEC, SHARD), 64)


def make_runner(model) -> StepRunner:
    kv = KVCache(SHARD.layer_end - SHARD.layer_start, 8, BLOCK_SIZE, SPEC.num_kv_heads, SPEC.head_dim)
    return StepRunner(SPEC, SHARD, 1, BLOCK_SIZE, LocalComm(), model, kv, Sampler(SPEC.eos_token_id))


def prefill(seq_id: int, tokens: list[int], blocks: list[int]) -> M.StepSeq:
    """A sequence's first step: the whole prompt, its block table, greedy sampling."""
    return M.StepSeq(seq_id=seq_id, start=0, n=len(tokens), tokens=P.pack_ids(tokens), blocks=P.pack_ids(blocks),
                     reset=True, sample=True, params=SamplingParams(temperature=0.0).to_dict(), prompt_len=len(tokens))


def decode(seq_id: int, start: int, tokens: bytes = b"", input_step: int | None = None) -> M.StepSeq:
    """A decode step of one token at `start`, its input given as `tokens` or `input_step` (a continuation)."""
    return M.StepSeq(seq_id=seq_id, start=start, n=1, tokens=tokens, blocks=b"", reset=False, sample=True,
                     input_step=input_step)


def step(step_id: int, *seqs: M.StepSeq, free: list[int] = ()) -> M.Step:
    """A STEP as the worker decodes it (encoded and decoded, so the runner sees wire values)."""
    return P.decode(P.encode(M.Step(step_id=step_id, seqs=list(seqs), free=list(free))))[1]


def sampled(result: M.StepResult) -> dict[int, int]:
    return dict(zip(P.unpack_ids(result.seq_ids), P.unpack_ids(result.tokens)))


def test_a_continuation_takes_the_token_its_previous_step_sampled(model):
    """Two sequences; step 2 continues sequence 1 from step 1's token (`input_step`) and decodes
    sequence 2 from its token id: the same tokens as a runner given every input token."""
    ahead, given = make_runner(model), make_runner(model)
    first = step(1, prefill(1, PROMPT, [0]), prefill(2, PROMPT[:3], [1]))
    r1 = ahead.execute_step(first)
    want1 = given.execute_step(first)
    want1.forward_s = r1.forward_s
    assert r1 == want1
    t1 = sampled(r1)
    assert sorted(t1) == [1, 2] and ahead.sampled_tokens == {1: (1, t1[1]), 2: (1, t1[2])}
    r2 = ahead.execute_step(step(2, decode(1, len(PROMPT), input_step=1), decode(2, 3, tokens=P.pack_ids([t1[2]]))))
    want = given.execute_step(step(2, decode(1, len(PROMPT), tokens=P.pack_ids([t1[1]])),
                                   decode(2, 3, tokens=P.pack_ids([t1[2]]))))
    assert sampled(r2) == sampled(want) and r2.step_id == 2
    assert ahead.times.num_steps == 2 and ahead.times.busy_s > 0
    assert len(ahead.times.take_recent()) == 2 and ahead.times.take_recent() == []


def test_a_continuation_whose_token_is_not_here_fails_by_name(model):
    runner = make_runner(model)
    runner.execute_step(step(1, prefill(1, PROMPT, [0])))
    with pytest.raises(RuntimeError, match="continuation of sequence 1: step 5's token is not here"):
        runner.execute_step(step(6, decode(1, len(PROMPT), input_step=5)))
    runner.sampled_tokens[1] = (7, 42)  # a later step's token than the one asked for
    with pytest.raises(RuntimeError, match="expected step 5's token, have step 7's"):
        runner.execute_step(step(8, decode(1, len(PROMPT), input_step=5)))


def test_free_drops_a_sequence_and_its_late_tokens(model):
    """A freed sequence's block table, sampling state and sampled token go; a token that
    arrives for it afterwards is dropped; a step with nothing scheduled returns no result."""
    runner = make_runner(model)
    runner.execute_step(step(1, prefill(1, PROMPT, [0]), prefill(2, PROMPT, [1])))
    assert runner.execute_step(step(2, free=[1])) is None
    assert set(runner.block_tables) == set(runner.sampling) == set(runner.sampled_tokens) == {2}
    runner._keep_sampled([(2, [1, 2], [7, 8])])
    assert runner.sampled_tokens == {2: (2, 8)}


@pytest.mark.parametrize("wait_sends, left", [(False, "abort"), (True, "close")])
def test_close_leaves_the_data_plane_and_drops_the_sequences(model, wait_sends, left):
    runner = make_runner(model)
    runner.execute_step(step(1, prefill(1, PROMPT, [0])))
    runner.close(wait_sends=wait_sends)
    assert runner.comm.left == left
    assert not runner.block_tables and not runner.sampling and not runner.sampled_tokens
