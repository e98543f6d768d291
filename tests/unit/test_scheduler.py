"""Scheduler: token budget, chunked prefill, preemption with recompute, steps in flight, cancel,
stop conditions; and a property test over random interleavings against a big-pool run."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from shardline.coordinator.scheduler import RequestTooLarge
from shardline.coordinator.sequence import SequenceStatus
from tests.helpers import (
    copy_seq,
    fake_token,
    make_prompt,
    make_scheduler,
    make_seq,
    run_to_completion,
)


def outputs(seqs) -> dict[int, tuple[list[int], str]]:
    return {s.seq_id: (list(s.output_token_ids), s.finish_reason) for s in seqs}


def reference_outputs(seqs, block_size: int, max_model_len: int, eos_token_id: int = -1) -> dict:
    """The same requests alone in a big pool, one step at a time."""
    copies = [copy_seq(s) for s in seqs]
    sched = make_scheduler(num_blocks=4096, block_size=block_size, max_num_seqs=256,
                           max_num_batched_tokens=4096, max_model_len=max_model_len, eos_token_id=eos_token_id)
    for c in copies:
        sched.add(c)
    run_to_completion(sched)
    return outputs(copies)


def at_output(index: int, token: int, other=fake_token):
    """token_fn that samples `token` as output number `index` (0-based), `other` elsewhere."""
    def fn(seq, position):
        return token if position - seq.num_prompt_tokens == index else other(seq, position)
    return fn


# ---- budget, chunking, batching ----------------------------------------------------------------


def test_budget_and_seat_limits_hold_every_step_and_are_reached():
    sched = make_scheduler(num_blocks=256, max_num_seqs=4, max_num_batched_tokens=16)
    seqs = [make_seq(10, max_tokens=6) for _ in range(12)]
    for s in seqs:
        sched.add(s)
    log = run_to_completion(sched)  # checks both limits on every step
    assert max(len(o.scheduled) for o in log) == 4
    assert max(o.num_batched_tokens for o in log) == 16
    assert all(s.finish_reason == "length" and s.num_output_tokens == 6 for s in seqs)
    assert sched.block_manager.num_free_blocks == 256
    assert sched.stats.num_steps == len(log)


def test_chunked_prefill_splits_a_long_prompt_and_samples_on_the_last_chunk():
    sched = make_scheduler(num_blocks=64, block_size=4, max_num_batched_tokens=16)
    seq = make_seq(50, max_tokens=2)
    sched.add(seq)
    log = run_to_completion(sched)
    assert log[-1].scheduled == [] and log[-1].freed_seq_ids == [seq.seq_id]  # workers drop its table
    log = log[:-1]
    chunks = [(o.scheduled[0].start, o.scheduled[0].num_new_tokens, o.scheduled[0].sample) for o in log[:4]]
    assert chunks == [(0, 16, False), (16, 16, False), (32, 16, False), (48, 2, True)]
    assert (log[4].scheduled[0].start, log[4].scheduled[0].num_new_tokens) == (50, 1)  # decode
    assert [o.scheduled[0].reset for o in log] == [True] + [False] * 4
    # block-table diffs: each step sends only the blocks the workers have not seen
    sent = [b for o in log for b in o.scheduled[0].new_blocks]
    assert len(sent) == len(set(sent)) == -(-51 // 4)
    assert seq.num_output_tokens == 2


def test_decode_and_prefill_share_a_step_running_first():
    sched = make_scheduler(max_num_batched_tokens=16)
    a = make_seq(4, max_tokens=8)
    sched.add(a)
    out = sched.schedule()
    assert out.scheduled[0].sample
    sched.update(out, {a.seq_id: 1})
    b = make_seq(30)
    sched.add(b)
    out = sched.schedule()
    assert [(s.seq is a, s.num_new_tokens, s.sample) for s in out.scheduled] == [(True, 1, True), (False, 15, False)]
    assert out.num_batched_tokens == 16


def test_waiting_sequences_are_admitted_in_arrival_order():
    sched = make_scheduler(max_num_seqs=2, max_num_batched_tokens=64)
    seqs = [make_seq(4, max_tokens=1) for _ in range(5)]
    for s in seqs:
        sched.add(s)
    log = run_to_completion(sched)
    first_step = {}
    for i, o in enumerate(log):
        for sid in o.seq_ids:
            first_step.setdefault(sid, i)
    order = sorted(first_step, key=first_step.get)
    assert order == [s.seq_id for s in seqs]


def test_prefix_cache_hit_skips_the_shared_system_prompt():
    sched = make_scheduler(num_blocks=64, block_size=4, max_num_batched_tokens=64)
    system = make_prompt(12, salt=42)
    a = make_seq(prompt=system + [1, 2], max_tokens=1)
    sched.add(a)
    run_to_completion(sched)
    b = make_seq(prompt=system + [3, 4, 5], max_tokens=1)
    sched.add(b)
    out = sched.schedule()
    assert (out.scheduled[0].start, out.scheduled[0].num_new_tokens) == (12, 3)
    assert b.num_cached_tokens == 12
    assert out.scheduled[0].reset and len(out.scheduled[0].new_blocks) == 4
    sched.update(out, {b.seq_id: 7})
    assert b.output_token_ids == [7] and b.finish_reason == "length"


# ---- preemption --------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_preemption_recomputes_the_most_recent_and_outputs_match(prefix_caching):
    block_size, num_blocks = 4, 6  # 24 token slots; two sequences growing to 18 tokens cannot both fit
    sched = make_scheduler(num_blocks=num_blocks, block_size=block_size, max_num_batched_tokens=32,
                           prefix_caching=prefix_caching)
    a, b = make_seq(8, max_tokens=10), make_seq(8, max_tokens=10)
    sched.add(a)
    sched.add(b)
    log = run_to_completion(sched)
    assert sched.stats.num_preemptions >= 1
    first = next(i for i, o in enumerate(log) if o.num_preempted)
    assert log[first].freed_seq_ids == [b.seq_id]  # the most recently admitted is the victim
    assert a.seq_id in log[first].seq_ids and b.seq_id not in log[first].seq_ids
    assert b.num_preemptions >= 1
    redo = next(o for o in log[first + 1:] if b.seq_id in o.seq_ids)
    s = next(s for s in redo.scheduled if s.seq is b)
    assert s.reset
    if prefix_caching:
        assert s.start > 0  # its own full blocks were still cached
    else:
        assert s.start == 0  # recomputed from its token history
    assert outputs([a, b]) == reference_outputs([a, b], block_size, num_blocks * block_size)
    assert sched.block_manager.num_free_blocks == num_blocks


def test_preemption_with_two_steps_in_flight_keeps_outputs():
    block_size = 4
    sched = make_scheduler(num_blocks=4, block_size=block_size, max_num_batched_tokens=32, prefix_caching=False)
    a, b = make_seq(7, max_tokens=8), make_seq(7, max_tokens=8)
    sched.add(a)
    sched.add(b)
    run_to_completion(sched, max_in_flight=2)
    assert sched.stats.num_preemptions >= 1
    assert outputs([a, b]) == reference_outputs([a, b], block_size, 16)


def test_two_sequences_in_flight_do_not_evict_each_other_forever():
    """Regression: with 2 steps in flight, an older sequence short of blocks used to preempt itself
    because the newer one was in flight, and the two recomputed in turn without end. It now waits
    for the newer one's step to return and preempts that one."""
    sched = make_scheduler(num_blocks=6, block_size=1, max_num_seqs=2, max_num_batched_tokens=3,
                           prefix_caching=False)
    a = make_seq(prompt=make_prompt(1, salt=1), max_tokens=4)
    b = make_seq(prompt=make_prompt(5, salt=2), max_tokens=1)
    sched.add(a)
    sched.add(b)
    run_to_completion(sched, max_in_flight=2, max_ticks=100)
    assert a.num_preemptions == 0  # the older sequence is never the victim
    assert outputs([a, b]) == reference_outputs([a, b], 1, 6)


def test_in_flight_sequences_are_not_scheduled_again():
    sched = make_scheduler(max_num_batched_tokens=64)
    a, b = make_seq(5), make_seq(5)
    sched.add(a)
    first = sched.schedule()
    sched.add(b)
    second = sched.schedule()
    assert first.seq_ids == [a.seq_id] and second.seq_ids == [b.seq_id]
    assert sched.schedule() is None and sched.in_flight == {a.seq_id: 1, b.seq_id: 1}
    assert not sched.has_work()
    sched.update(first, {a.seq_id: 3})
    third = sched.schedule()
    assert third.seq_ids == [a.seq_id] and third.scheduled[0].start == 5


@pytest.mark.parametrize("max_in_flight,lookahead", [(2, False), (3, False), (2, True), (4, True)])
def test_pipelined_run_gives_the_same_outputs(max_in_flight, lookahead):
    sched = make_scheduler(num_blocks=40, block_size=4, max_num_seqs=5, max_num_batched_tokens=12,
                           num_micro_batches=max(1, max_in_flight // 2) if lookahead else 1, lookahead=lookahead)
    seqs = [make_seq(3 + 5 * i, max_tokens=7) for i in range(8)]
    for s in seqs:
        sched.add(s)
    log = run_to_completion(sched, max_in_flight=max_in_flight)
    assert outputs(seqs) == reference_outputs(seqs, 4, 160)
    assert any(s.prev_step is not None for o in log for s in o.scheduled) == lookahead


# ---- lookahead (async scheduling) ----------------------------------------------------------------


def test_continuations_alternate_with_the_other_micro_batch():
    """Two micro-batches, four steps in flight: A(n), B(n), then A's continuation, B's; a
    continuation names the step whose sample is its input and starts at that token's position."""
    sched = make_scheduler(num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=64,
                           num_micro_batches=2, lookahead=True)
    seqs = [make_seq(4, max_tokens=6) for _ in range(4)]
    for s in seqs:
        sched.add(s)
    a0 = sched.schedule()
    b0 = sched.schedule()
    a1, b1 = sched.schedule(), sched.schedule()
    assert sched.schedule() is None  # each sequence is two steps ahead at most
    assert set(a0.seq_ids) | set(b0.seq_ids) == {s.seq_id for s in seqs} and not set(a0.seq_ids) & set(b0.seq_ids)
    for step, prev in ((a1, a0), (b1, b0)):
        assert step.seq_ids == prev.seq_ids
        assert all(s.prev_step == prev.step_id and s.num_new_tokens == 1 and s.sample and s.start == 4
                   for s in step.scheduled)
    sched.update(a0, {sid: 10 for sid in a0.seq_ids})
    a2 = sched.schedule()  # A(n+1) is the oldest step not continued
    assert a2.seq_ids == a0.seq_ids and all(s.prev_step == a1.step_id and s.start == 5 for s in a2.scheduled)


def test_no_continuation_of_a_sequence_s_last_token():
    sched = make_scheduler(num_blocks=64, block_size=4, max_num_batched_tokens=64, lookahead=True)
    a = make_seq(4, max_tokens=2)
    sched.add(a)
    first = sched.schedule()  # prefill, samples output 1 of 2
    second = sched.schedule()  # its continuation samples output 2
    assert second.scheduled[0].prev_step == first.step_id
    assert sched.schedule() is None and not sched.has_work()  # output 2 is the last: nothing to continue
    sched.update(first, {a.seq_id: 11})
    sched.update(second, {a.seq_id: 12})
    assert a.output_token_ids == [11, 12] and a.finish_reason == "length"
    assert sched.block_manager.num_free_blocks == 64 and sched.in_flight == {}


@pytest.mark.parametrize("how", ["eos", "cancel"])
def test_a_stop_found_late_drops_the_continuation_and_frees_blocks_after_it(how):
    """The sequence stops on the token of step n (or is cancelled) while its continuation n+1 is
    in flight: the continuation's token is dropped and the blocks come back when it returns."""
    sched = make_scheduler(num_blocks=64, block_size=4, max_num_batched_tokens=64, eos_token_id=EOS, lookahead=True)
    a = make_seq(4, max_tokens=10)
    sched.add(a)
    first, second = sched.schedule(), sched.schedule()
    assert second.scheduled[0].prev_step == first.step_id
    if how == "cancel":
        sched.finish(a.seq_id, "abort")
    sched.update(first, {a.seq_id: EOS if how == "eos" else 11})
    assert a.is_finished and sched.block_manager.num_free_blocks < 64
    assert sched.schedule() is None
    assert sched.update(second, {a.seq_id: 12}) == []
    assert a.output_token_ids == ([EOS] if how == "eos" else [])
    assert a.finish_reason == ("stop" if how == "eos" else "abort")
    assert sched.block_manager.num_free_blocks == 64 and sched.in_flight == {} and sched.seqs == {}


def test_penalties_that_need_the_history_get_no_continuation():
    sched = make_scheduler(num_blocks=64, block_size=4, max_num_batched_tokens=64, lookahead=True)
    a = make_seq(4, max_tokens=5, repetition_penalty=1.2)
    sched.add(a)
    sched.schedule()
    assert sched.schedule() is None


# ---- cancel ------------------------------------------------------------------------------------


def test_cancel_waiting_sequence():
    sched = make_scheduler(max_num_seqs=1)
    a, b = make_seq(4), make_seq(4)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    assert out.seq_ids == [a.seq_id]
    assert sched.finish(b.seq_id, "abort") is b
    assert b.is_finished and b.finish_reason == "abort" and b not in sched.waiting
    assert sched.finish(b.seq_id, "abort") is None  # forgotten
    sched.update(out, {a.seq_id: 1})
    nxt = sched.schedule()
    assert nxt.seq_ids == [a.seq_id] and b.seq_id not in nxt.freed_seq_ids  # b held no blocks


def test_cancel_running_sequence_frees_its_blocks_at_once():
    sched = make_scheduler(num_blocks=16)
    a = make_seq(9)
    sched.add(a)
    out = sched.schedule()
    sched.update(out, {a.seq_id: 1})
    assert sched.block_manager.num_free_blocks == 16 - 3
    sched.finish(a.seq_id, "abort")
    assert sched.block_manager.num_free_blocks == 16 and a not in sched.running
    sched.block_manager.check_invariants()
    out = sched.schedule()
    assert out.scheduled == [] and out.freed_seq_ids == [a.seq_id]  # the workers drop its table
    assert sched.schedule() is None


def test_cancel_in_flight_sequence_frees_its_blocks_when_the_step_returns():
    sched = make_scheduler(num_blocks=16)
    a = make_seq(9, max_tokens=1)
    sched.add(a)
    out = sched.schedule()
    sched.finish(a.seq_id, "abort")
    assert a.is_finished and a.finish_reason == "abort"
    assert sched.block_manager.num_free_blocks == 13  # the step still writes its KV
    assert sched.schedule() is None  # not scheduled again, not freed yet
    assert sched.update(out, {a.seq_id: 5}) == []
    assert a.output_token_ids == [] and sched.in_flight == {}
    assert sched.block_manager.num_free_blocks == 16
    assert sched.schedule().freed_seq_ids == [a.seq_id]


def test_cancel_preempted_sequence():
    sched = make_scheduler(num_blocks=6, block_size=4, max_num_batched_tokens=32, prefix_caching=False)
    a, b = make_seq(8, max_tokens=12), make_seq(8, max_tokens=12)
    sched.add(a)
    sched.add(b)
    for _ in range(50):
        out = sched.schedule()
        sched.update(out, {s.seq.seq_id: 1 for s in out.scheduled if s.sample})
        if b.num_preemptions:
            break
    assert b.status is SequenceStatus.WAITING and b.num_preemptions == 1
    sched.finish(b.seq_id, "abort")
    assert b not in sched.waiting and b.finish_reason == "abort"
    while (out := sched.schedule()) is not None:
        assert b.seq_id not in out.seq_ids
        sched.update(out, {s.seq.seq_id: 1 for s in out.scheduled if s.sample})
    assert a.finish_reason == "length" and sched.block_manager.num_free_blocks == 6


def test_pending_frees_are_work_until_a_step_carries_them():
    sched = make_scheduler(num_blocks=16)
    a = make_seq(9)
    sched.add(a)
    sched.update(sched.schedule(), {a.seq_id: 1})
    sched.finish(a.seq_id, "abort")
    assert sched.has_work()  # nothing to compute, but the workers must drop a's block table
    assert sched.schedule().freed_seq_ids == [a.seq_id]
    assert not sched.has_work() and sched.schedule() is None


# ---- a new plan --------------------------------------------------------------------------------


def test_requeue_under_a_new_scheduler_recomputes_from_the_token_history():
    """The plan was lost with `a` mid-decode and `b` still waiting: under the next plan's
    scheduler both start over from their tokens, `a` counting one preemption, and finish with
    the outputs of a run without the loss."""
    old = make_scheduler(num_blocks=16, block_size=4)
    a, b = make_seq(6, max_tokens=5), make_seq(5, max_tokens=5)
    old.add(a)
    step = old.schedule()
    old.update(step, {a.seq_id: fake_token(a, 6)})
    old.schedule()  # a's next step: in flight when the plan is lost, its result never comes
    old.add(b)
    new = make_scheduler(num_blocks=16, block_size=4)
    new.continue_from(old)
    for seq in (a, b):
        new.requeue(seq)
    assert a.status is SequenceStatus.WAITING and a.num_computed_tokens == 0 and a.block_table == []
    assert a.num_blocks_sent == 0 and a.num_preemptions == 1 and b.num_preemptions == 0
    first = run_to_completion(new)[0]
    assert first.step_id == 2 and all(s.reset and s.start == 0 for s in first.scheduled)
    assert first.scheduled[0].num_new_tokens == 7  # a's prompt and its sampled token, recomputed
    assert outputs([a, b]) == reference_outputs([a, b], 4, 1 << 20)


def test_requeue_refuses_what_the_new_plan_cannot_hold():
    old = make_scheduler(num_blocks=16, block_size=4)
    a = make_seq(10)
    old.add(a)
    new = make_scheduler(num_blocks=2, block_size=4)  # a pool of 8 tokens
    with pytest.raises(RequestTooLarge):
        new.requeue(a)
    assert new.seqs == {} and not new.waiting


def test_continue_from_carries_step_ids_and_preemptions():
    old = make_scheduler(num_blocks=6, block_size=4, max_num_batched_tokens=32, prefix_caching=False)
    for seq in (make_seq(8, max_tokens=12), make_seq(8, max_tokens=12)):
        old.add(seq)
    while old.stats.num_preemptions == 0:
        out = old.schedule()
        old.update(out, {s.seq.seq_id: 1 for s in out.scheduled if s.sample})
    last = old.schedule().step_id
    new = make_scheduler()
    new.continue_from(old)
    new.add(make_seq(4))
    assert new.schedule().step_id == last + 1 and new.stats.num_preemptions == old.stats.num_preemptions


# ---- requests that can never run ---------------------------------------------------------------


def test_request_too_large_is_refused_while_others_go_on():
    sched = make_scheduler(num_blocks=4, block_size=4, max_model_len=100)  # pool of 16 tokens
    ok = make_seq(15, max_tokens=5)
    with pytest.raises(RequestTooLarge, match="16 tokens"):
        sched.add(make_seq(16))
    with pytest.raises(RequestTooLarge, match="empty"):
        sched.add(make_seq(prompt=[]))
    sched.add(ok)
    run_to_completion(sched)
    assert ok.finish_reason == "length" and ok.num_output_tokens == 1  # 15 + 1 fills the pool

    sched = make_scheduler(num_blocks=64, block_size=4, max_model_len=10)
    with pytest.raises(RequestTooLarge, match="10 tokens"):
        sched.add(make_seq(10))
    fits = make_seq(9, max_tokens=5)
    sched.add(fits)
    run_to_completion(sched)
    assert fits.num_tokens == 10 and fits.finish_reason == "length"


# ---- stop conditions ---------------------------------------------------------------------------


EOS = 2


def run_one(token_fn, eos_token_id=EOS, **params):
    sched = make_scheduler(eos_token_id=eos_token_id)
    seq = make_seq(5, **params)
    sched.add(seq)
    run_to_completion(sched, token_fn=token_fn)
    return seq


def no_eos(seq, position):
    return 10 + fake_token(seq, position) % 50


def test_stop_on_eos_includes_the_token():
    seq = run_one(at_output(2, EOS, no_eos), max_tokens=10)
    assert seq.num_output_tokens == 3 and seq.output_token_ids[-1] == EOS
    assert (seq.finish_reason, seq.stop_reason) == ("stop", EOS)


def test_ignore_eos_runs_to_max_tokens():
    seq = run_one(at_output(2, EOS, no_eos), max_tokens=6, ignore_eos=True)
    assert seq.num_output_tokens == 6 and seq.finish_reason == "length" and seq.output_token_ids[2] == EOS


def test_stop_token_ids():
    seq = run_one(at_output(3, 77, no_eos), max_tokens=10, stop_token_ids=[77, 78])
    assert seq.num_output_tokens == 4 and (seq.finish_reason, seq.stop_reason) == ("stop", 77)


def test_min_tokens_defers_eos_and_stop_tokens():
    seq = run_one(lambda s, p: EOS, max_tokens=10, min_tokens=3)
    assert seq.output_token_ids == [EOS] * 3 and seq.finish_reason == "stop"
    seq = run_one(lambda s, p: 77, max_tokens=10, min_tokens=4, stop_token_ids=[77])
    assert seq.output_token_ids == [77] * 4 and seq.finish_reason == "stop"


def test_max_tokens():
    seq = run_one(no_eos, max_tokens=7)
    assert seq.num_output_tokens == 7 and seq.finish_reason == "length" and seq.stop_reason is None


# ---- property: random interleavings ------------------------------------------------------------


request = st.fixed_dictionaries({
    "arrival": st.integers(0, 25),
    "prefix": st.sampled_from([None, 0, 1]),
    "suffix_len": st.integers(1, 14),
    "max_tokens": st.integers(1, 12),
    "min_tokens": st.integers(0, 2),
    "stop_token": st.sampled_from([None, 5, 17]),
    "ignore_eos": st.booleans(),
    "cancel": st.one_of(st.none(), st.integers(0, 60)),
})

scenario = st.fixed_dictionaries({
    "block_size": st.sampled_from([1, 2, 4]),
    "num_blocks": st.integers(6, 24),
    "max_num_seqs": st.integers(1, 6),
    "max_num_batched_tokens": st.integers(1, 24),
    "max_in_flight": st.integers(1, 3),
    "lookahead": st.booleans(),  # continuations; the pipeline then holds 2 x max_in_flight steps
    "split_micro_batches": st.booleans(),  # seats per step ~ active / max_in_flight
    "prefix_caching": st.booleans(),
    "eos": st.sampled_from([-1, 3]),
    "requests": st.lists(request, min_size=1, max_size=10),
})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenario)
def test_random_interleavings_finish_and_match_a_big_pool_run(sc):
    bs = sc["block_size"]
    sched = make_scheduler(num_blocks=sc["num_blocks"], block_size=bs, max_num_seqs=sc["max_num_seqs"],
                           max_num_batched_tokens=sc["max_num_batched_tokens"],
                           prefix_caching=sc["prefix_caching"], eos_token_id=sc["eos"],
                           num_micro_batches=sc["max_in_flight"] if sc["split_micro_batches"] else 1,
                           lookahead=sc["lookahead"])
    max_len = sched.max_model_len  # == pool tokens here
    prefixes = [make_prompt(3 * bs + 1, salt=900), make_prompt(2 * bs, salt=901)]
    seqs, refused, cancelled = [], [], set()
    events: dict[int, list] = {}

    def arrive(seq):
        def add(s):
            try:
                s.add(seq)
            except RequestTooLarge:
                refused.append(seq)
                return
            seqs.append(seq)
        return add

    def cancel(seq):
        def fn(s):
            if s.finish(seq.seq_id, "abort") is not None and seq.finish_reason == "abort":
                cancelled.add(seq.seq_id)
        return fn

    for i, r in enumerate(sc["requests"]):
        prompt = (prefixes[r["prefix"]] if r["prefix"] is not None else []) + make_prompt(r["suffix_len"], salt=i)
        stop = [r["stop_token"]] if r["stop_token"] is not None else []
        seq = make_seq(prompt=prompt, seq_id=i, max_tokens=r["max_tokens"], min_tokens=min(r["min_tokens"], r["max_tokens"]),
                       stop_token_ids=stop, ignore_eos=r["ignore_eos"])
        events.setdefault(r["arrival"], []).append(arrive(seq))
        if r["cancel"] is not None:
            events.setdefault(r["arrival"] + r["cancel"], []).append(cancel(seq))
    tick_events = {t: (lambda fns: lambda s: [f(s) for f in fns])(fns) for t, fns in events.items()}

    log = run_to_completion(sched, max_in_flight=sc["max_in_flight"] * (2 if sc["lookahead"] else 1),
                            events=tick_events, max_ticks=3_000)

    assert all(len(s.prompt_token_ids) + 1 > max_len for s in refused)
    for s in seqs:
        assert s.is_finished
        assert s.finish_reason in (("abort", "stop", "length") if s.seq_id in cancelled else ("stop", "length"))
        assert s.num_output_tokens <= s.sampling_params.max_tokens and s.num_tokens <= max_len
    bm = sched.block_manager
    bm.check_invariants()
    assert bm.num_free_blocks == bm.num_blocks and sum(bm.ref_counts) == 0
    assert sched.in_flight == {} and not sched.waiting and not sched.running and sched.seqs == {}
    done = [s for s in seqs if s.finish_reason != "abort"]
    event(f"preempted={sched.stats.num_preemptions > 0}")
    event(f"prefix hits={bm.num_prefix_hits > 0}")
    event(f"cancelled={bool(cancelled)}, refused={bool(refused)}")
    event(f"continuations={any(s.prev_step is not None for o in log for s in o.scheduled)}")
    assert outputs(done) == reference_outputs(done, bs, max_len, sc["eos"])
