"""One-line builders for scheduler tests, and a fake model loop that replays steps like a pipeline.

The fake "model" keeps a KV cache of its own (slot -> (position, token)), written through the
block tables the scheduler sends, and samples from what it reads back through them. A wrong
block id, a block reused while still in use, or a bad prefix-cache hit therefore shows up as an
assertion (or as outputs that differ from a run with a big pool), not silently.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import Counter, deque
from typing import Callable

from shardline.coordinator.block_manager import BlockManager
from shardline.coordinator.scheduler import Scheduler, SchedulerOutput
from shardline.coordinator.sequence import Sequence
from shardline.sampling import SamplingParams

FAKE_VOCAB = 97
_seq_ids = itertools.count(1_000_000)

TokenFn = Callable[[Sequence, int], int]


def make_params(**kw) -> SamplingParams:
    kw.setdefault("max_tokens", 4)
    return SamplingParams(**kw)


def make_prompt(n: int, salt: int = 0) -> list[int]:
    """`n` deterministic token ids; different `salt`s give different prompts."""
    return [(salt * 7919 + i * 31 + 11) % 1000 + FAKE_VOCAB for i in range(n)]


def make_seq(prompt_len: int = 8, max_tokens: int = 4, seq_id: int | None = None,
             prompt: list[int] | None = None, **params) -> Sequence:
    """A waiting sequence; the prompt defaults to `make_prompt(prompt_len, salt=seq_id)`."""
    if seq_id is None:
        seq_id = next(_seq_ids)
    if prompt is None:
        prompt = make_prompt(prompt_len, seq_id)
    return Sequence(seq_id, list(prompt), make_params(max_tokens=max_tokens, **params), request_id=str(seq_id))


def copy_seq(seq: Sequence) -> Sequence:
    """A fresh waiting copy (same id, prompt and params) for a reference run."""
    return Sequence(seq.seq_id, list(seq.prompt_token_ids), seq.sampling_params, request_id=seq.request_id)


def make_scheduler(num_blocks: int = 64, block_size: int = 4, max_num_seqs: int = 8,
                   max_num_batched_tokens: int = 32, max_model_len: int = 1 << 20,
                   prefix_caching: bool = True, eos_token_id: int = -1, num_micro_batches: int = 1,
                   lookahead: bool = False) -> Scheduler:
    extra = {"num_micro_batches": num_micro_batches} if num_micro_batches != 1 else {}
    if lookahead:
        extra["lookahead"] = True
    sched = Scheduler(BlockManager(num_blocks, block_size, prefix_caching), max_num_seqs,
                      max_num_batched_tokens, max_model_len, **extra)
    sched.eos_token_id = eos_token_id
    return sched


def fake_token(seq: Sequence, position: int) -> int:
    """The fake model: a deterministic function of the tokens before `position`."""
    return hash(tuple(seq.token_ids(0, position))) % FAKE_VOCAB


class FakeWorker:
    """Replays step plans like a worker: block tables from diffs, a KV cache of (position, token).
    A continuation's input token is the one this worker sampled for the sequence in the step the
    plan names (`note_sampled`), as the real pipeline hands it from the last stage to the first."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self.block_tables: dict[int, list[int]] = {}
        self.kv: dict[int, tuple[int, int]] = {}
        self.sampled: dict[int, tuple[int, int]] = {}  # seq id -> (step id, token)

    def note_sampled(self, step_id: int, sampled: dict[int, int]) -> None:
        for seq_id, token in sampled.items():
            self.sampled[seq_id] = (step_id, token)

    def execute(self, out: SchedulerOutput) -> list[tuple[Sequence, int]]:
        """Run one step; returns (seq, position) for the rows that sample (for a continuation,
        a copy of seq with the token it was computed from appended)."""
        for seq_id in out.freed_seq_ids:
            self.block_tables.pop(seq_id, None)
            self.sampled.pop(seq_id, None)
        rows = []
        for s in out.scheduled:
            seq = s.seq
            if s.reset:
                self.block_tables[seq.seq_id] = list(s.new_blocks)
            else:
                assert seq.seq_id in self.block_tables, f"seq {seq.seq_id}: block diff without a reset"
                self.block_tables[seq.seq_id].extend(s.new_blocks)
            table = self.block_tables[seq.seq_id]
            assert table == seq.block_table[: len(table)], (seq.seq_id, table, seq.block_table)
            end = s.start + s.num_new_tokens
            assert end <= len(table) * self.block_size, "step writes past the block table"
            if s.prev_step is not None:  # the token the earlier step sampled, not known to the scheduler yet
                step_id, token = self.sampled[seq.seq_id]
                assert step_id == s.prev_step, (seq.seq_id, step_id, s.prev_step)
                seq = dataclasses.replace(seq, output_token_ids=seq.output_token_ids + [token])
            tokens = seq.token_ids(0, end)
            for pos in range(s.start, end):  # write this step's KV
                self.kv[self._slot(table, pos)] = (pos, tokens[pos])
            # read the whole context back: prefix-cache hits and earlier chunks must be there
            got = [self.kv.get(self._slot(table, pos)) for pos in range(end)]
            assert got == list(enumerate(tokens)), f"seq {seq.seq_id}: KV cache does not hold its context"
            if s.sample:
                rows.append((seq, end))
        return rows

    def _slot(self, table: list[int], pos: int) -> int:
        return table[pos // self.block_size] * self.block_size + pos % self.block_size


def check_step(sched: Scheduler, out: SchedulerOutput) -> None:
    """Invariants of one scheduled step."""
    assert out.num_batched_tokens == sum(s.num_new_tokens for s in out.scheduled)
    assert out.num_batched_tokens <= sched.max_num_batched_tokens
    assert len(out.scheduled) <= sched.max_num_seqs
    ids = out.seq_ids
    assert len(ids) == len(set(ids)), "a sequence scheduled twice in one step"
    for s in out.scheduled:
        assert s.num_new_tokens >= 1
        if s.prev_step is not None:  # a continuation: the token at num_tokens is being sampled
            assert sched.lookahead and s.num_new_tokens == 1 and s.sample and s.start == s.seq.num_tokens
            assert sched.in_flight[s.seq.seq_id] == 2
            continue
        assert s.start == s.seq.num_computed_tokens
        assert s.start + s.num_new_tokens <= s.seq.num_tokens
        assert s.sample == (s.start + s.num_new_tokens == s.seq.num_tokens)
    sched.block_manager.check_invariants()


def run_to_completion(sched: Scheduler, token_fn: TokenFn = fake_token, max_in_flight: int = 1,
                      events: dict[int, Callable[[Scheduler], None]] | None = None,
                      max_ticks: int = 100_000) -> list[SchedulerOutput]:
    """Schedule and update until no work is left; returns every step's output.

    Up to `max_in_flight` steps are scheduled before the oldest one's results are applied, like
    a pipeline. `events[tick]` runs at the start of loop iteration `tick` (arrivals, cancels).
    Sampled tokens are `token_fn(seq, position)`, computed when the step is dispatched.
    Checks the step invariants, that steps in flight hold disjoint sequences (but for a
    continuation, whose earlier step must be pending), and that the scheduler's in-flight counts
    are exactly those of the pending steps.
    """
    events = dict(events or {})
    worker = FakeWorker(sched.block_manager.block_size)
    pending: deque[tuple[SchedulerOutput, dict[int, int]]] = deque()
    log = []
    for tick in range(max_ticks):
        if tick in events:
            events.pop(tick)(sched)
        while len(pending) < max_in_flight:
            out = sched.schedule()
            if out is None:
                break
            check_step(sched, out)
            busy = Counter(sid for o, _ in pending for sid in o.seq_ids)
            for s in out.scheduled:
                if s.prev_step is None:
                    assert not busy[s.seq.seq_id], "an in-flight sequence was scheduled again"
                else:
                    assert busy[s.seq.seq_id] == 1 and any(
                        o.step_id == s.prev_step and s.seq.seq_id in o.seq_ids for o, _ in pending)
            log.append(out)
            sampled = {seq.seq_id: token_fn(seq, pos) for seq, pos in worker.execute(out)}
            worker.note_sampled(out.step_id, sampled)
            if out.scheduled:
                pending.append((out, sampled))
        assert sched.in_flight == dict(Counter(sid for o, _ in pending for sid in o.seq_ids))
        if pending:
            out, sampled = pending.popleft()
            sched.update(out, sampled)
            sched.block_manager.check_invariants()
        elif not events:
            assert sched.num_unfinished == 0, (
                f"stuck: {len(sched.waiting)} waiting, {len(sched.running)} running, nothing scheduled")
            return log
    raise AssertionError(f"no completion after {max_ticks} ticks")
