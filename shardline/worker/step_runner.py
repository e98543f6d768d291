"""Step execution on one worker: the state of its place in a plan (stage model, KV cache, data
plane, block tables, per-sequence sampling state) and one STEP at a time.

`StepRunner.load` builds that state from an ASSIGN: join the data plane, open the weights
(weight_source.py), build the stage, allocate the KV pool, warm the kernels up. The runner then
replays the coordinator's steps in the order sent:

    first stage              middle stages           last stage
    token ids -> embed  -->  hidden states     -->   hidden states -> lm_head -> sample
    (or, for a continuation, the token step `input_step` sampled: async scheduling)
                                                     STEP_RESULT to the coordinator;
                                                     sampled tokens to the first stage (token stream)

Async scheduling: the coordinator plans a sequence's next step (a continuation, with
`input_step` in place of its token ids) before the previous step's token is known. The first stage keeps the
latest sampled token of each sequence (`sampled_tokens`): from its own sampler with one stage,
else from the token stream (shardline/worker/comm.py).
"""

from __future__ import annotations

import gc
import logging
import sys
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from shardline import messages as M
from shardline import protocol as P
from shardline.model_file import ModelSpec
from shardline.sampling import SamplingParams
from shardline.worker.loader import ShardSpec
from shardline.worker.process import rss_bytes
from shardline.worker.sampler import Sampler, SequenceSampling, prompt_logprobs
from shardline.worker.weight_source import WeightSource

log = logging.getLogger("shardline.worker")

MAX_STEP_TIMES = 4096  # forward-pass durations kept between two heartbeats (the coordinator takes no more)
KV_CACHE_DTYPES = {"float16": torch.float16, "float32": torch.float32}


@dataclass
class StepTimes:
    """Forward-pass timing of a worker since it started (across plans), read by the heartbeat
    thread. Busy time runs from a step's input being here (not while waiting for it) to its output
    sent, less the time a send waited for the next stage."""

    num_steps: int = 0
    step_time_s: float = 0.0  # the latest step, wall seconds from its STEP to its output handed on
    busy_s: float = 0.0  # busy seconds of every step
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=MAX_STEP_TIMES))  # busy s, since the last take

    def record(self, step_time_s: float, busy_s: float) -> None:
        self.step_time_s = step_time_s
        self.busy_s += busy_s
        self.recent.append(busy_s)
        self.num_steps += 1

    def take_recent(self) -> list[float]:
        """The busy seconds of the steps since the previous call (at most MAX_STEP_TIMES)."""
        recent, self.recent = self.recent, deque(maxlen=MAX_STEP_TIMES)
        return list(recent)


class LoadProgress:
    """A progress bar over the phases of loading a shard (rich), drawn on stderr only when it is a
    terminal, so the logs of launched or redirected workers stay clean."""

    def __init__(self, title: str, phases: list[str]):
        from rich.console import Console
        from rich.markup import escape
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.title, self.phases, self.done, self.escape = title, phases, 0, escape
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=Console(stderr=True), disable=not sys.stderr.isatty())
        self.task = self.progress.add_task(escape(f"{title}: {phases[0]}"), total=len(phases))
        self.progress.start()

    def next(self) -> None:
        """The current phase is done; the next one starts."""
        self.done += 1
        what = self.phases[self.done] if self.done < len(self.phases) else "done"
        self.progress.update(self.task, completed=self.done, description=self.escape(f"{self.title}: {what}"))

    def close(self) -> None:
        self.progress.stop()


class StepRunner:
    """One worker's part of a plan: executes the STEPs the coordinator sends.

    `comm` is the stage's data plane (shardline.worker.comm.StageComm, or an object with its
    interface), `model` the stage (shardline.worker.model.StageModel), `kv_cache` its KV pool,
    `sampler` the last stage's sampler. Per sequence, from its first step until a step frees it:
    `block_tables` (seq_id -> KV block ids), `sampling` (seq_id -> SequenceSampling, last stage)
    and, on the first stage, `sampled_tokens` (seq_id -> (step_id, token id) of its latest
    sampled token).
    """

    def __init__(self, spec: ModelSpec, shard: ShardSpec, pp_size: int, block_size: int, comm, model, kv_cache,
                 sampler, times: StepTimes | None = None):
        self.spec, self.shard, self.pp_size, self.block_size = spec, shard, pp_size, block_size
        self.comm, self.model, self.kv_cache, self.sampler = comm, model, kv_cache, sampler
        self.times = times if times is not None else StepTimes()
        self.block_tables: dict[int, list[int]] = {}
        self.sampling: dict[int, SequenceSampling] = {}
        self.sampled_tokens: dict[int, tuple[int, int]] = {}
        self.transfer_stats: M.TransferStats | None = None  # how the shard was received (None: from a local file)
        self.load_s = 0.0

    # ---- ASSIGN: load the shard ----------------------------------------------------------
    @classmethod
    def load(cls, a: M.Assign, device: str, local_ip: str, weights: WeightSource, sock, worker_id: str,
             times: StepTimes | None = None) -> StepRunner:
        """Build the runner for ASSIGN `a` (docs/protocol.md, ASSIGN): join the data plane at
        its rendezvous (`local_ip`: this worker's address), open the shard's weights from
        `weights` (a transfer runs over `sock`, the worker-plane DEALER), build the stage,
        allocate the KV pool and run the warm-up steps. `times` is kept across plans.

        Raises what joining the group, the transfer or loading raises (a peer that died during
        the rendezvous, a failed transfer, a model that does not fit); the group is left then.
        """
        from shardline.worker.comm import StageComm
        from shardline.worker.kv_cache import KVCache
        from shardline.worker.model import StageModel

        gc.unfreeze()  # a previous plan's model (frozen below) can be collected once dropped
        t0 = time.monotonic()
        spec = ModelSpec.from_dict(a.spec)
        stage, pp_size, tp_size = a.stage, a.pp_size, a.tp_size
        shard = ShardSpec(a.layer_start, a.layer_end, stage == 0, stage == pp_size - 1, a.tp_rank, tp_size)
        bar = LoadProgress(f"stage {stage} layers [{shard.layer_start}, {shard.layer_end})",
                           ["joining the data plane", "weights", "KV cache", "warm-up (compiling kernels)"])
        try:
            comm = StageComm(a.rank, a.world_size, stage, pp_size, shard.tp_rank, tp_size, a.store_host,
                             a.store_port, a.store_prefix, "nccl" if device == "cuda" else "gloo", local_ip,
                             timeout_s=a.data_plane_timeout_s, token_stream=a.token_stream)
            try:
                bar.next()
                loader, transfer_stats = weights.open(a, spec, shard, sock, worker_id)
                model = StageModel(spec, loader, a.max_positions, all_reduce=comm.all_reduce,
                                   all_gather=comm.all_gather)
                loader.close()
                if a.gemm_weights == "bf16" and device == "cpu":
                    model.keep_bf16_copies()
                bar.next()
                kv_cache = KVCache(shard.layer_end - shard.layer_start, a.num_kv_blocks, a.block_size,
                                   spec.num_kv_heads // tp_size, spec.head_dim, dtype=KV_CACHE_DTYPES[a.kv_cache_dtype])
                bar.next()
                model.warm_up(kv_cache, a.block_size)
                bar.next()
            except BaseException:
                comm.abort()
                raise
        finally:
            bar.close()
        runner = cls(spec, shard, pp_size, a.block_size, comm, model, kv_cache, Sampler(spec.eos_token_id), times)
        runner.transfer_stats = transfer_stats
        # torch, Numba and the model make a heap that every full collection walks, a stall of the
        # whole pipeline when one comes during serving; frozen, collections look only at what
        # serving allocates
        gc.collect()
        gc.freeze()
        runner.load_s = time.monotonic() - t0
        log.info("worker %s: stage %d layers [%d, %d) tp %d/%d loaded in %.1f s (%.0f MB weights, %.0f MB KV)",
                 worker_id, stage, shard.layer_start, shard.layer_end, shard.tp_rank, tp_size, runner.load_s,
                 model.weight_bytes() / 1e6, kv_cache.nbytes / 1e6)
        return runner

    @property
    def async_scheduling(self) -> bool:
        """Whether this worker can run continuations (async scheduling): one TP rank, and one
        stage or the token stream open (the first stage needs the sampled tokens)."""
        return self.shard.tp_size == 1 and (self.pp_size == 1 or self.comm.has_token_stream)

    def ready(self, worker_id: str, plan_id: int) -> M.Ready:
        """The READY answering plan `plan_id`'s ASSIGN: what the loaded stage holds and how it loaded."""
        return M.Ready(worker_id=worker_id, plan_id=plan_id, weight_bytes=self.model.weight_bytes(),
                       rss_bytes=rss_bytes(), kv_bytes=self.kv_cache.nbytes, load_s=self.load_s,
                       async_scheduling=self.async_scheduling, shard_transfer=self.transfer_stats)

    def close(self, wait_sends: bool = False) -> None:
        """Leave the data plane (`wait_sends`: after the sends in flight complete; else at once,
        the group is broken or replaced) and drop the sequences. Never raises without
        `wait_sends`; with it, what a failed send raises (the group is left all the same)."""
        self.block_tables.clear()
        self.sampling.clear()
        self.sampled_tokens.clear()
        if wait_sends:
            self.comm.close()
        else:
            self.comm.abort()

    # ---- STEP: one forward pass ----------------------------------------------------------
    def execute_step(self, step: M.Step) -> M.StepResult | None:
        """Run one STEP (`shardline.messages.Step`) and return the STEP_RESULT body to send (last
        stage, TP rank 0), else None.

        Raises RuntimeError when a continuation's token cannot come (a step out of order),
        ConnectionError / TimeoutError when a peer stage is gone or frozen.
        """
        from shardline.worker.model import build_attention_metadata

        t0 = time.perf_counter()
        for seq_id in step.free:
            self.block_tables.pop(seq_id, None)
            self.sampling.pop(seq_id, None)
            self.sampled_tokens.pop(seq_id, None)
        stream_in = self.shard.is_first and self.comm.has_token_stream
        if stream_in:  # take the tokens the last stage has sent so far (its sends never wait on us)
            self._keep_sampled(self.comm.recv_sampled_tokens(block=False))
        seqs = step.seqs
        if not seqs:
            return None
        entries, tokens = [], []
        for s in seqs:
            sid = s.seq_id
            new_blocks = P.unpack_ids(s.blocks)
            if s.reset:
                self.block_tables[sid] = new_blocks
            else:
                self.block_tables[sid].extend(new_blocks)
            if s.params is not None:
                self.sampling[sid] = SequenceSampling(SamplingParams.from_dict(s.params), s.logprobs,
                                                      s.prompt_logprobs, s.prompt_len)
            if self.shard.is_last:
                self._keep_history(self.sampling[sid], s)
            entries.append((s.start, s.n, self.block_tables[sid], s.sample))
            if self.shard.is_first:
                if s.input_step is not None:  # a continuation: the token step `input_step` sampled for it
                    tokens.append(self._sampled_token(sid, s.input_step, stream_in))
                else:
                    tokens.extend(P.unpack_ids(s.tokens))
        meta = build_attention_metadata(entries, self.block_size)
        num_sampled = int(meta.sample_rows.shape[0])
        scored = self._prompt_logprob_rows(seqs) if self.shard.is_last else []
        if scored:  # the lm_head also runs on the prompt rows whose logprobs were asked for
            meta.sample_rows = torch.cat([meta.sample_rows, torch.tensor([r for sc in scored for r in sc[3]],
                                                                         dtype=torch.int64)])
        if self.shard.is_first:
            x = torch.tensor(tokens, dtype=torch.int64)  # x: [num_tokens] int64 token ids
        else:
            x = self.comm.recv_hidden((meta.num_tokens, self.spec.hidden_size), torch.float32)
        t_input = time.perf_counter()  # busy time starts when the input is here (not while waiting for it)
        out = self.model(x, meta, self.kv_cache)
        send_wait_s = 0.0
        result = None
        if not self.shard.is_last:
            t_send = time.perf_counter()
            self.comm.send_hidden(out)
            send_wait_s = time.perf_counter() - t_send  # a send may wait for the next stage (a full socket buffer)
        elif self.shard.tp_rank == 0:
            result = self._sample(step.step_id, seqs, out, num_sampled, scored, t0)
        t_end = time.perf_counter()
        self.times.record(t_end - t0, t_end - t_input - send_wait_s)
        return result

    def _sample(self, step_id: int, seqs: list[M.StepSeq], out: torch.Tensor, num_sampled: int, scored: list,
                t0: float) -> M.StepResult:
        """Last stage, TP rank 0: sample the rows of the sequences that sample, hand the tokens
        to the first stage, and build the STEP_RESULT body. out: [num_sampled + prompt rows,
        vocab] float32 logits."""
        sampled = [s for s in seqs if s.sample]
        states = [self.sampling[s.seq_id] for s in sampled]
        nlp = [st.num_logprobs for st in states]
        positions = [s.start + s.n for s in sampled]
        res = self.sampler(out[:num_sampled], [st.params for st in states], positions, nlp, states)
        sampled_ids = [s.seq_id for s in sampled]
        if self.shard.is_first:  # one stage: continuations read the tokens here
            self._keep_sampled([(step_id, sampled_ids, res.token_ids)])
        elif self.comm.has_token_stream:  # before the result: the first stage may be waiting for them
            self.comm.send_sampled_tokens(step_id, sampled_ids, res.token_ids)
        body = M.StepResult(step_id=step_id, seq_ids=P.pack_ids(sampled_ids), tokens=P.pack_ids(res.token_ids),
                            forward_s=time.perf_counter() - t0)
        if any(nlp):
            body.logprobs = res.logprobs
        if scored:
            body.prompt_logprobs = self._prompt_logprobs(scored, out[num_sampled:])
        return body

    def _keep_sampled(self, messages) -> None:
        """Keep (step_id, token) per live sequence from (step_id, seq_ids, token_ids) messages
        (a late one for a freed sequence is dropped)."""
        for step_id, seq_ids, token_ids in messages:
            for sid, tok in zip(seq_ids, token_ids):
                if sid in self.block_tables:
                    self.sampled_tokens[sid] = (step_id, tok)

    def _sampled_token(self, seq_id: int, step_id: int, stream_in: bool) -> int:
        """The token step `step_id` sampled for `seq_id`: waits on the token stream for it if it
        has not arrived. Raises RuntimeError when it cannot come (no token stream, a step out of
        order)."""
        got = self.sampled_tokens.get(seq_id)
        while got is None or got[0] < step_id:
            if not stream_in:
                raise RuntimeError(f"continuation of sequence {seq_id}: step {step_id}'s token is not here")
            self._keep_sampled(self.comm.recv_sampled_tokens(block=True))
            got = self.sampled_tokens.get(seq_id)
        if got[0] != step_id:
            raise RuntimeError(f"continuation of sequence {seq_id}: expected step {step_id}'s token, "
                               f"have step {got[0]}'s")
        return got[1]

    def _keep_history(self, st: SequenceSampling, s: M.StepSeq) -> None:
        """Last stage: keep the token ids of a sequence whose penalties need its history.
        `history` (with a reset) holds the tokens before the first computed position (a cached
        prefix); every step's `tokens` are the ids at positions [start, start + n)."""
        if not st.params.needs_history:
            return
        assert s.input_step is None, "a continuation of a sequence whose penalties need its history"
        if s.params is not None:
            st.token_ids = P.unpack_ids(s.history)
        start = s.start
        assert st.token_ids is not None and len(st.token_ids) >= start, (len(st.token_ids or ()), start)
        del st.token_ids[start:]
        st.token_ids.extend(P.unpack_ids(s.tokens))

    def _prompt_logprob_rows(self, seqs: list[M.StepSeq]) -> list[tuple[int, int, list[int], list[int], int]]:
        """Rows of this step whose logits give prompt logprobs: per sequence asking for them,
        (seq_id, start, targets, rows, the chunk's first token). The row at position p predicts
        the prompt token at p + 1; the last row of a chunk that ends inside the prompt predicts
        the first token of the next chunk (target -1), so its log-probabilities wait
        (`pending_logprobs`) for the next step."""
        scored, row = [], 0
        for s in seqs:
            st, start, n = self.sampling[s.seq_id], s.start, s.n
            if st.num_prompt_logprobs and st.prompt_len and start < st.prompt_len:
                end = min(start + n, st.prompt_len - 1)  # positions [start, end) predict a prompt token
                chunk = P.unpack_ids(s.tokens)
                targets = [chunk[p + 1 - start] if p + 1 < start + n else -1 for p in range(start, end)]
                scored.append((s.seq_id, start, targets, [row + p - start for p in range(start, end)], chunk[0]))
            row += n
        return scored

    def _prompt_logprobs(self, scored, logits: torch.Tensor) -> list[M.PromptLogprobs]:
        """(seq_id, first position, entries) per sequence: entries[i] is the logprob entry
        ([logprob, [[token, logprob] x k]]) of the prompt token at position first + i.
        logits: [prompt rows, vocab] float32, the rows of `scored` in order."""
        logp = torch.log_softmax(logits.float(), dim=-1)
        result, i = [], 0
        for seq_id, start, targets, rows, first_token in scored:
            st = self.sampling[seq_id]
            lp = logp[i:i + len(rows)]
            i += len(rows)
            entries, first = [], start + 1
            if st.pending_logprobs is not None and start > 0:  # the previous chunk's last row
                first = start
                entries += prompt_logprobs(st.pending_logprobs[None], [first_token], st.num_prompt_logprobs)
            st.pending_logprobs = None
            known = [t for t in targets if t >= 0]
            if known:
                entries += prompt_logprobs(lp[: len(known)], known, st.num_prompt_logprobs)
            if targets and targets[-1] < 0:
                st.pending_logprobs = lp[-1].clone()
            if entries:
                result.append((seq_id, first, entries))
        return result
