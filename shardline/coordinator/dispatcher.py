"""The step dispatcher: scheduler output -> one STEP message to every worker of the plan; the steps
in flight and their timing; step results back to the scheduler.

Every worker gets the same STEP (each takes what its stage needs): per scheduled sequence its
`start` position, `n` new tokens and their ids, the block-table entries the workers have not seen
(`blocks`; all of them with `reset`), whether it samples, and with `reset` its sampling parameters.
A continuation (async scheduling) carries no token ids but `input_step`, the step whose sample is
its input. The result comes from the sampler, the last stage's TP rank 0: token ids and logprobs per
sampled sequence.
"""

from __future__ import annotations

import time

from shardline.coordinator.input_processor import RequestTable
from shardline.coordinator.metrics import CoordinatorMetrics, CoordinatorStats
from shardline.coordinator.outbox import Outbox
from shardline.coordinator.registry import WorkerInfo
from shardline.coordinator.scheduler import Scheduler, SchedulerOutput
from shardline.coordinator.sequence import Sequence
from shardline import messages as M
from shardline import protocol as P


class Dispatcher:
    """Keeps up to `max_in_flight` steps of the serving plan's scheduler in flight on its workers.

    `scheduler` is the latest plan's scheduler: it stays when that plan is abandoned (sequences
    queue in it until the next plan serves, which requeues them) and is None before any plan."""

    def __init__(self, requests: RequestTable, outbox: Outbox, metrics: CoordinatorMetrics, stats: CoordinatorStats):
        self.requests = requests
        self.outbox = outbox
        self.metrics = metrics
        self.stats = stats
        self.scheduler: Scheduler | None = None
        self.workers: list[WorkerInfo] = []  # the plan's workers, in assignment order; [] when none serves
        self.max_in_flight = 0
        self.in_flight: dict[int, SchedulerOutput] = {}  # step_id -> step
        self.step_started: dict[int, float] = {}  # step_id -> perf_counter seconds at dispatch

    def start(self, scheduler: Scheduler, workers: list[WorkerInfo], max_in_flight: int) -> None:
        """A new plan serves: dispatch `scheduler`'s steps to `workers`, `max_in_flight` at most
        (the pipeline's micro-batches, twice that with async scheduling)."""
        self.scheduler = scheduler
        self.workers = list(workers)
        self.max_in_flight = max_in_flight

    def abandon(self) -> None:
        """The plan is gone: its steps in flight never return (late results match no step id)."""
        self.workers = []
        self.in_flight.clear()
        self.step_started.clear()

    def can_dispatch(self) -> bool:
        """A plan serves, it has room for one more step in flight, and the scheduler has work."""
        return bool(self.workers) and len(self.in_flight) < self.max_in_flight and self.scheduler.has_work()

    def dispatch(self, out: SchedulerOutput) -> tuple[WorkerInfo, str] | None:
        """Send step `out` to every worker of the plan. Returns the first worker that could not be
        reached, with why (the caller declares it lost; the step is not in flight), or None."""
        failed = self.outbox.to_workers(self.workers, self.step_body(out))
        if failed is not None:
            return failed
        if out.scheduled:
            self.in_flight[out.step_id] = out
            self.step_started[out.step_id] = time.perf_counter()
        self.metrics.on_step(out.num_batched_tokens if out.scheduled else 0, out.num_preempted)
        return None

    def step_body(self, out: SchedulerOutput) -> M.Step:
        """The STEP body of `out` (docs/protocol.md, STEP): token ids and block entries packed as
        little-endian int32 (`P.pack_ids`); sampling parameters only with `reset`."""
        seqs = []
        for s in out.scheduled:
            seq = s.seq
            if s.prev_step is not None:  # a continuation: its input token is what step `input_step` samples
                tokens = b""
            else:
                tokens = P.pack_ids(seq.token_ids(s.start, s.start + s.num_new_tokens))
            entry = M.StepSeq(seq_id=seq.seq_id, start=s.start, n=s.num_new_tokens, tokens=tokens,
                              blocks=P.pack_ids(s.new_blocks), reset=s.reset, sample=s.sample,
                              input_step=s.prev_step)
            if s.reset:
                req = self.requests.get(seq.seq_id)
                entry.params = seq.sampling_params.to_dict()
                entry.logprobs = req.num_logprobs
                entry.prompt_len = seq.num_prompt_tokens
                entry.prompt_logprobs = req.num_prompt_logprobs
                if s.start and seq.sampling_params.needs_history:  # a cached prefix: penalties need its tokens
                    entry.history = P.pack_ids(seq.token_ids(0, s.start))
            seqs.append(entry)
        return M.Step(step_id=out.step_id, seqs=seqs, free=out.freed_seq_ids)

    def on_step_result(self, body: M.StepResult) -> list[Sequence]:
        """A STEP_RESULT from the sampler: record the logprobs, hand the sampled tokens to the
        scheduler. Returns the sequences with a new token (to stream); [] for a step not in
        flight (one of an abandoned plan)."""
        step_id = body.step_id
        out = self.in_flight.pop(step_id, None)
        if out is None:
            return []
        self.stats.steps_total += 1
        self.stats.step_time_s_total += time.perf_counter() - self.step_started.pop(step_id, time.perf_counter())
        seq_ids = P.unpack_ids(body.seq_ids)
        tokens = P.unpack_ids(body.tokens)
        logprobs = body.logprobs or [None] * len(seq_ids)
        sampled = dict(zip(seq_ids, tokens))
        for sid, lp in zip(seq_ids, logprobs):
            req = self.requests.get(sid)
            # a finished sequence's token is dropped (a continuation computed after its stop)
            if req is not None and lp is not None and not req.seq.is_finished:
                req.seq.output_logprobs.append(lp)
        for sid, first, entries in body.prompt_logprobs or ():
            req = self.requests.get(sid)
            if req is not None and req.prompt_logprobs is not None:
                entries = entries[: max(0, len(req.prompt_logprobs) - first)]
                req.prompt_logprobs[first:first + len(entries)] = entries
        return self.scheduler.update(out, sampled)

    @property
    def num_in_flight(self) -> int:
        return len(self.in_flight)
