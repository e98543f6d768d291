"""Iteration-level scheduler: continuous batching with chunked prefill and preemption.

There are no prefill and decode phases. Each step, every running sequence gets the tokens it
still lacks (1 for decode, a chunk of its prompt otherwise) within the token budget
`max_num_batched_tokens`; then waiting sequences are admitted with prompt chunks while budget,
`max_num_seqs` and free KV blocks last. When blocks run out, the most recently admitted running
sequence is preempted (its blocks are freed; it is recomputed later from its token history).

With pipeline parallelism several steps are in flight at once; a sequence in flight is not
scheduled again until its step returns, so the steps in flight hold disjoint sequences, with one
exception. With `lookahead` (vLLM's async scheduling), a sequence whose step in flight samples
its next token may get its following decode step before that token is known: a continuation,
whose input token the workers take from the earlier step's sample (`ScheduledSeq.prev_step`).
Continuations are made for the oldest step in flight not yet continued, so the order of steps
at the first stage stays A(n), B(n), A(n+1), B(n+1), ...: the pipeline's first stage starts
A(n+1) as soon as the last stage has sampled A(n), without a round trip through this process.
A sequence is never more than two steps ahead of what it knows; a continuation is not made when
the earlier token is certain to be its last (max_tokens, the context length), when its
penalties need the full token history on the last stage, or when its block would have to be
taken by preemption. A sequence that stops on a token only found when its step returns (EOS, a
stop token or string, a cancel) has one continuation computed for nothing, whose token is
dropped; its blocks are freed when that continuation returns.

This is the only module that changes a sequence's status.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from shardline.coordinator.block_manager import BlockManager
from shardline.coordinator.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    start: int  # first position computed this step (== num_computed_tokens when scheduled)
    num_new_tokens: int
    sample: bool  # this chunk reaches the end of the sequence's tokens: sample one token
    new_blocks: list[int]  # block-table entries the workers have not seen yet
    reset: bool  # the workers must drop any block table they hold for this seq first
    prev_step: int | None = None  # a continuation: the input token is the one step `prev_step` samples


@dataclass
class SchedulerOutput:
    step_id: int
    scheduled: list[ScheduledSeq]
    freed_seq_ids: list[int]  # sequences whose worker-side state can be dropped
    num_batched_tokens: int
    num_preempted: int = 0
    continued: bool = False  # a later step holds the continuations of this one's sequences

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
    num_continuations: int = 0  # decode steps scheduled before their input token was known


class Scheduler:
    """Decides which sequences compute how many tokens in each step."""

    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        num_micro_batches: int = 1,
        lookahead: bool = False,
    ):
        """num_micro_batches: steps of disjoint sequences meant to be in flight at once (the
        share of the active sequences one step takes); lookahead: make continuations (see the
        module doc; the caller then keeps up to 2 x num_micro_batches steps in flight)."""
        assert num_micro_batches >= 1
        self.num_micro_batches = num_micro_batches
        self.lookahead = lookahead
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        pool_tokens = block_manager.num_blocks * block_manager.block_size
        self.max_model_len = min(max_model_len, pool_tokens)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.in_flight: dict[int, int] = {}  # seq id -> steps not yet returned that hold it (1 or 2)
        self._steps: deque[SchedulerOutput] = deque()  # steps in flight, in dispatch order
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

    def _leave_step(self, seq: Sequence) -> None:
        """One of `seq`'s steps in flight has returned or been abandoned."""
        n = self.in_flight[seq.seq_id] - 1
        if n:
            self.in_flight[seq.seq_id] = n
        else:
            del self.in_flight[seq.seq_id]

    def _release(self, seq: Sequence) -> None:
        if seq.block_table or seq.num_blocks_sent:
            self._freed.append(seq.seq_id)
        self.block_manager.free(seq)
        self.seqs.pop(seq.seq_id, None)

    def requeue(self, seq: Sequence) -> None:
        """Queue a sequence of an abandoned plan (a worker lost or drained) under this scheduler,
        to be recomputed from its token history (prompt + output so far): its KV state is gone, so
        it starts over as a waiting sequence with no blocks, like a preempted one; a sequence that
        had computed tokens counts one more preemption.

        Raises:
            RequestTooLarge: it cannot fit this plan's context length or KV pool (see `add`).
        """
        if seq.num_computed_tokens:
            seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = 0
        seq.block_table, seq.block_hashes, seq.num_blocks_sent = [], [], 0
        self.add(seq)

    def continue_from(self, previous: Scheduler) -> None:
        """Take over from the scheduler of the previous plan: step ids go on after its last one,
        so a late result of a step it dispatched never matches a step of this one, and its
        preemption count carries on."""
        self._next_step_id = previous._next_step_id
        self.stats.num_preemptions = previous.stats.num_preemptions

    def has_work(self) -> bool:
        """Whether `schedule()` has anything to consider: a sequence not in flight, a step in
        flight whose sequences may be continued, or frees the workers have not been told."""
        return self._other_work() or bool(self._continuations()[1]) or bool(self._freed)

    def _continuations(self) -> tuple[SchedulerOutput | None, dict[int, ScheduledSeq]]:
        """The oldest step in flight not yet continued, and its entries that may get a
        continuation now (by seq id); (None, {}) without lookahead or such a step. A step is
        continued only once num_micro_batches - 1 later steps are in flight (with pipeline
        stages to fill, the first stage would otherwise wait for the last one's sample of the
        step just before), or when nothing else could run."""
        if not self.lookahead:
            return None, {}
        for i, step in enumerate(self._steps):
            if not step.continued:
                break
        else:
            return None, {}
        if len(self._steps) - 1 - i < self.num_micro_batches - 1 and self._other_work():
            return None, {}
        return step, {s.seq.seq_id: s for s in step.scheduled if self._continuable(s)}

    def _other_work(self) -> bool:
        return bool(self.waiting) or any(s.seq_id not in self.in_flight for s in self.running)

    def _continuable(self, s: ScheduledSeq) -> bool:
        """May `s`'s sequence get its next decode step before `s` returns?"""
        seq = s.seq
        p = seq.sampling_params
        return (s.sample and not seq.is_finished and self.in_flight.get(seq.seq_id) == 1
                and seq.num_output_tokens + 1 < p.max_tokens and seq.num_tokens + 1 < self.max_model_len
                and not p.needs_history and self.block_manager.can_allocate(seq, s.num_new_tokens + 1))

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
        cont_step, cont = self._continuations()

        # 1. Running sequences (decode, or the rest of a chunked prompt), oldest first.
        i = 0
        blocked = False  # a running sequence waits for blocks held by a newer one in flight
        while i < len(self.running) and budget > 0 and len(scheduled) < seats:
            seq = self.running[i]
            if seq.seq_id in self.in_flight:
                prev = cont.get(seq.seq_id)
                # a continuation takes a free block if it needs one, never a preempted one
                if prev is not None and bm.allocate(seq, prev.num_new_tokens + 1):
                    scheduled.append(self._make_scheduled(seq, 1, prev, cont_step.step_id))
                    budget -= 1
                    self.stats.num_continuations += 1
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
        if cont_step is not None and scheduled:
            cont_step.continued = True
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
            self.in_flight[s.seq.seq_id] = self.in_flight.get(s.seq.seq_id, 0) + 1
        if scheduled:
            self._steps.append(out)
        self.stats.num_steps += 1
        self.stats.num_batched_tokens += out.num_batched_tokens
        self.stats.num_preemptions += num_preempted
        return out

    def _make_scheduled(self, seq: Sequence, n: int, prev: ScheduledSeq | None = None,
                        prev_step: int | None = None) -> ScheduledSeq:
        """`seq`'s next n tokens; with `prev` (its entry in a step in flight that samples), the
        continuation: the one token that step samples, at position seq.num_tokens."""
        reset = seq.num_blocks_sent == 0
        new_blocks = seq.block_table[seq.num_blocks_sent :]
        seq.num_blocks_sent = len(seq.block_table)
        start = seq.num_computed_tokens if prev is None else prev.start + prev.num_new_tokens
        return ScheduledSeq(
            seq=seq,
            start=start,
            num_new_tokens=n,
            sample=prev is not None or seq.num_computed_tokens + n == seq.num_tokens,
            new_blocks=list(new_blocks),
            reset=reset,
            prev_step=prev_step,
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
        self._forget_step(out)
        for s in out.scheduled:
            seq = s.seq
            self._leave_step(seq)
            if seq.is_finished:  # finished (cancelled, or stopped with a continuation out) while in flight
                if seq.seq_id not in self.in_flight:
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

    def _forget_step(self, out: SchedulerOutput) -> None:
        try:
            self._steps.remove(out)
        except ValueError:
            pass

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
