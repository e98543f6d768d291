"""Iteration-level scheduler: continuous batching with chunked prefill and preemption.

There are no prefill and decode phases. Each step, every running sequence gets the tokens it
still lacks (1 for decode, a chunk of its prompt otherwise) within the token budget
`max_num_batched_tokens`; then waiting sequences are admitted with prompt chunks while budget,
`max_num_seqs` and free KV blocks last. When blocks run out, the most recently admitted running
sequence is preempted (its blocks are freed; it is recomputed later from its token history).

With pipeline parallelism several steps are in flight at once; a sequence in flight is not
scheduled again until its step returns, so the steps in flight hold disjoint sequences.

This is the only module that changes a sequence's status.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from coordinator.block_manager import BlockManager
from coordinator.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    start: int  # first position computed this step (== num_computed_tokens when scheduled)
    num_new_tokens: int
    sample: bool  # this chunk reaches the end of the sequence's tokens: sample one token
    new_blocks: list[int]  # block-table entries the workers have not seen yet
    reset: bool  # the workers must drop any block table they hold for this seq first


@dataclass
class SchedulerOutput:
    step_id: int
    scheduled: list[ScheduledSeq]
    freed_seq_ids: list[int]  # sequences whose worker-side state can be dropped
    num_batched_tokens: int
    num_preempted: int = 0

    @property
    def seq_ids(self) -> list[int]:
        return [s.seq.seq_id for s in self.scheduled]


class RequestTooLarge(ValueError):
    """A request that can never be scheduled (longer than the context or the KV pool)."""


@dataclass
class SchedulerStats:
    num_preemptions: int = 0
    num_steps: int = 0
    num_batched_tokens: int = 0


class Scheduler:
    """Decides which sequences compute how many tokens in each step."""

    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        num_micro_batches: int = 1,
    ):
        assert num_micro_batches >= 1
        self.num_micro_batches = num_micro_batches
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        pool_tokens = block_manager.num_blocks * block_manager.block_size
        self.max_model_len = min(max_model_len, pool_tokens)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.in_flight: set[int] = set()  # seq ids inside a step not yet returned
        self.seqs: dict[int, Sequence] = {}
        self._freed: list[int] = []
        self._next_step_id = 0
        self.stats = SchedulerStats()

    # ---- requests ------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        """Queue a new sequence.

        Raises:
            RequestTooLarge: the prompt plus one generated token exceeds the context length or
                the whole KV pool.
        """
        if seq.num_prompt_tokens == 0:
            raise RequestTooLarge("the prompt is empty")
        if seq.num_prompt_tokens + 1 > self.max_model_len:
            raise RequestTooLarge(
                f"prompt of {seq.num_prompt_tokens} tokens plus 1 generated token exceeds the maximum "
                f"sequence length of {self.max_model_len} tokens (context length and KV pool)"
            )
        self.seqs[seq.seq_id] = seq
        self.waiting.append(seq)

    def finish(self, seq_id: int, reason: str) -> Sequence | None:
        """End a sequence (stop, length, abort, error): free its blocks now, or when its step
        returns if it is in flight. Returns the sequence, or None if unknown."""
        seq = self.seqs.get(seq_id)
        if seq is None or seq.is_finished:
            return seq
        seq.finish_reason = reason
        seq.status = SequenceStatus.FINISHED
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if seq_id not in self.in_flight:
            self._release(seq)
        return seq

    def _release(self, seq: Sequence) -> None:
        if seq.block_table or seq.num_blocks_sent:
            self._freed.append(seq.seq_id)
        self.block_manager.free(seq)
        self.seqs.pop(seq.seq_id, None)

    def has_work(self) -> bool:
        return bool(self.waiting) or any(s.seq_id not in self.in_flight for s in self.running)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # ---- one step ------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput | None:
        """Pick the next step's sequences and token counts; None when nothing can run."""
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        num_preempted = 0
        bm = self.block_manager
        # Pipeline micro-batching: a step takes about 1/P of the active sequences, so P steps
        # of disjoint sequences can be in flight and every stage stays busy.
        active = len(self.running) + len(self.waiting)
        seats = min(self.max_num_seqs, max(1, -(-active // self.num_micro_batches)))

        # 1. Running sequences (decode, or the rest of a chunked prompt), oldest first.
        i = 0
        blocked = False  # a running sequence waits for blocks held by a newer one in flight
        while i < len(self.running) and budget > 0 and len(scheduled) < seats:
            seq = self.running[i]
            if seq.seq_id in self.in_flight:
                i += 1
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            assert n > 0
            while not bm.allocate(seq, n):
                victim = self._pick_victim(exclude=scheduled)
                if victim is seq and any(s.seq_id in self.in_flight for s in self.running[i + 1:]):
                    # A newer sequence is in flight: wait for it and preempt it when it returns.
                    # Preempting `seq` instead lets two sequences evict each other forever.
                    blocked = True
                    seq = None
                    i += 1
                    break
                if victim is None or victim is seq:
                    if victim is seq:
                        self._preempt(seq)
                        num_preempted += 1
                    seq = None
                    break
                self._preempt(victim)
                num_preempted += 1
            if seq is None:
                continue  # `seq` left self.running; index i now names the next one
            scheduled.append(self._make_scheduled(seq, n))
            budget -= n
            i += 1

        # 2. Waiting sequences, in arrival order, while budget, seats and blocks last.
        if num_preempted == 0 and not blocked:
            while (self.waiting and budget > 0 and len(self.running) < self.max_num_seqs
                   and len(scheduled) < seats):
                seq = self.waiting[0]
                cached = bm.find_cached_prefix(seq) if not seq.block_table and seq.use_prefix_cache else []
                n = min(seq.num_tokens - seq.num_computed_tokens - len(cached) * bm.block_size, budget)
                if not bm.allocate(seq, n, cached):
                    break
                self.waiting.popleft()
                seq.status = SequenceStatus.RUNNING
                if seq.first_scheduled_time is None:
                    seq.first_scheduled_time = time.monotonic()
                self.running.append(seq)
                scheduled.append(self._make_scheduled(seq, n))
                budget -= n

        if not scheduled and not self._freed:
            return None
        out = SchedulerOutput(
            step_id=self._next_step_id,
            scheduled=scheduled,
            freed_seq_ids=self._freed,
            num_batched_tokens=self.max_num_batched_tokens - budget,
            num_preempted=num_preempted,
        )
        self._freed = []
        self._next_step_id += 1
        for s in scheduled:
            self.in_flight.add(s.seq.seq_id)
        self.stats.num_steps += 1
        self.stats.num_batched_tokens += out.num_batched_tokens
        self.stats.num_preemptions += num_preempted
        return out

    def _make_scheduled(self, seq: Sequence, n: int) -> ScheduledSeq:
        reset = seq.num_blocks_sent == 0
        new_blocks = seq.block_table[seq.num_blocks_sent :]
        seq.num_blocks_sent = len(seq.block_table)
        return ScheduledSeq(
            seq=seq,
            start=seq.num_computed_tokens,
            num_new_tokens=n,
            sample=seq.num_computed_tokens + n == seq.num_tokens,
            new_blocks=list(new_blocks),
            reset=reset,
        )

    def _pick_victim(self, exclude: list[ScheduledSeq]) -> Sequence | None:
        """The most recently admitted running sequence that is neither in flight nor already
        scheduled in this step."""
        taken = {s.seq.seq_id for s in exclude}
        for seq in reversed(self.running):
            if seq.seq_id not in self.in_flight and seq.seq_id not in taken:
                return seq
        return None

    def _preempt(self, seq: Sequence) -> None:
        """Free `seq`'s blocks and put it first in the waiting queue; it is recomputed later."""
        self.running.remove(seq)
        if seq.block_table:
            self._freed.append(seq.seq_id)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)

    # ---- results -------------------------------------------------------------------------
    def update(self, out: SchedulerOutput, sampled: dict[int, int]) -> list[Sequence]:
        """Apply a finished step: advance computed counts, append sampled tokens, stop on EOS /
        stop token ids / max_tokens / max length. `sampled` maps seq_id -> token id for the
        sequences that sampled. Returns the sequences that got a new token (finished or not).
        """
        updated = []
        now = time.monotonic()
        for s in out.scheduled:
            seq = s.seq
            self.in_flight.discard(seq.seq_id)
            if seq.is_finished:  # finished (cancelled) while in flight
                self._release(seq)
                continue
            seq.num_computed_tokens += s.num_new_tokens
            self.block_manager.cache_full_blocks(seq)
            if not s.sample:
                continue
            token = sampled[seq.seq_id]
            seq.output_token_ids.append(token)
            if seq.first_token_time is None:
                seq.first_token_time = now
            seq.last_token_time = now
            updated.append(seq)
            reason = self._stop_reason(seq, token)
            if reason is not None:
                self.finish(seq.seq_id, reason)
        return updated

    def abort_step(self, out: SchedulerOutput) -> None:
        """A step that will never return (a worker died): release its sequences so they can be
        rescheduled from their token history."""
        for s in out.scheduled:
            self.in_flight.discard(s.seq.seq_id)
            if s.seq.is_finished:
                self._release(s.seq)

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.sampling_params
        n_out = seq.num_output_tokens
        if n_out >= p.min_tokens:
            if not p.ignore_eos and token == self.eos_token_id:
                seq.stop_reason = token
                return "stop"
            if token in p.stop_token_ids:
                seq.stop_reason = token
                return "stop"
        if n_out >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    eos_token_id: int = -1  # set by the server from the model spec
