"""Output processing: new tokens -> text deltas, stop strings, DELTA and DONE messages; ending and
cancelling requests.

Each token a step samples is detokenized incrementally (`IncrementalDetokenizer`) and searched
for stop strings (`StopStringMatcher`, which holds back text that may begin one). A streaming
request gets one DELTA per token; every request gets one DONE when all its choices have ended,
whose top-level fields describe choice 0 and whose `choices` (n > 1) list each. When logprobs are
asked, `token_bytes` gives the raw bytes of every token they name, so clients can show token text
without the tokenizer.
"""

from __future__ import annotations

import time

from shardline.coordinator.input_processor import Request, RequestTable
from shardline.coordinator.metrics import CoordinatorMetrics, CoordinatorStats
from shardline.coordinator.outbox import Outbox
from shardline.coordinator.scheduler import Scheduler
from shardline.coordinator.sequence import Sequence
from shardline.coordinator.tokenizer import Tokenizer
from shardline import messages as M
from shardline import protocol as P
from shardline.protocol import ErrorCode


class OutputProcessor:
    """Streams the outputs of the requests in `requests` to their clients. `scheduler` arguments
    are the serving plan's scheduler (None before the first plan), where sequences are ended."""

    def __init__(self, tokenizer: Tokenizer, requests: RequestTable, outbox: Outbox, metrics: CoordinatorMetrics,
                 stats: CoordinatorStats):
        self.tokenizer = tokenizer
        self.requests = requests
        self.outbox = outbox
        self.metrics = metrics
        self.stats = stats

    def emit(self, seq: Sequence, scheduler: Scheduler) -> None:
        """`seq` has new output tokens: detokenize them, end the sequence on a stop string, send
        the DELTA (streaming requests) and, when the request has ended, DONE. A sequence whose
        step and continuation both returned before this runs is listed twice: its first call
        takes both tokens, the second finds none new and sends nothing."""
        req = self.requests.get(seq.seq_id)
        if req is None:
            return
        n = req.num_tokens_emitted
        new = seq.output_token_ids[n:]
        if not new:
            return
        self.stats.generation_tokens_total += len(new)
        t = seq.last_token_time
        for _ in new:
            if req.last_token_time is None:
                self.metrics.on_token(ttft_s=_dt(seq.arrival_time, t), itl_s=None)
            else:
                self.metrics.on_token(ttft_s=None, itl_s=_dt(req.last_token_time, t))
            req.last_token_time = t
        match = req.stop_matcher.push(req.detokenizer.push(new))
        text = match.text
        if match.stopped and not seq.is_finished:
            seq.stop_reason = match.stop
            scheduler.finish(seq.seq_id, "stop")
        if seq.is_finished and not match.stopped:
            text += req.stop_matcher.push(req.detokenizer.flush()).text + req.stop_matcher.flush()
        req.text += text
        req.num_tokens_emitted = seq.num_output_tokens
        if req.stream:
            body = M.Delta(request_id=req.request_id, index=req.index, text=text, token_ids=P.pack_ids(new))
            if req.num_logprobs:
                body.logprobs = seq.output_logprobs[n:]
            if req.prompt_logprobs is not None and n == 0:
                body.prompt_logprobs = req.prompt_logprobs
                body.prompt_token_ids = P.pack_ids(seq.prompt_token_ids)
            if req.num_logprobs or body.prompt_logprobs is not None:
                body.token_bytes = self.token_bytes(new, body.logprobs, body.prompt_logprobs, seq.prompt_token_ids)
            self.outbox.to_client(req.client, body)
        if seq.is_finished:
            self._send_done(req)

    def _send_done(self, req: Request) -> None:
        """One choice has ended; when every choice of its request has, send the one DONE.
        Top-level fields describe choice 0; `choices` (n > 1) lists every choice."""
        req.finished = True
        if not all(r.finished for r in req.choices):
            return
        head = req.choices[0]
        seq = head.seq
        now = time.monotonic()
        t = M.Timings(queue_s=_dt(seq.arrival_time, seq.first_scheduled_time),
                      ttft_s=_dt(seq.arrival_time, seq.first_token_time), e2e_s=now - seq.arrival_time)
        if seq.num_output_tokens > 1 and seq.first_token_time and seq.last_token_time:
            dt = seq.last_token_time - seq.first_token_time
            t.decode_tokens_per_s = (seq.num_output_tokens - 1) / dt if dt > 0 else None
        num_output = sum(r.seq.num_output_tokens for r in req.choices)
        body = M.Done(request_id=head.request_id, text=head.text, token_ids=P.pack_ids(seq.output_token_ids),
                      finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
                      usage=M.Usage(prompt_tokens=seq.num_prompt_tokens, completion_tokens=num_output,
                                    cached_tokens=seq.num_cached_tokens,
                                    num_preemptions=sum(r.seq.num_preemptions for r in req.choices)),
                      timings=t)
        if head.num_logprobs:
            body.logprobs = seq.output_logprobs
        if len(req.choices) > 1:
            body.choices = [M.Choice(index=r.index, text=r.text, token_ids=P.pack_ids(r.seq.output_token_ids),
                                     finish_reason=r.seq.finish_reason, stop_reason=r.seq.stop_reason,
                                     logprobs=r.seq.output_logprobs if r.num_logprobs else None)
                            for r in req.choices]
        if head.prompt_logprobs is not None:
            body.prompt_logprobs = head.prompt_logprobs
            body.prompt_token_ids = P.pack_ids(seq.prompt_token_ids)
        if head.num_logprobs or head.prompt_logprobs is not None:
            ids = [t for r in req.choices for t in r.seq.output_token_ids]
            entries = [e for r in req.choices for e in r.seq.output_logprobs]
            body.token_bytes = self.token_bytes(ids, entries, head.prompt_logprobs, seq.prompt_token_ids)
        self.outbox.to_client(head.client, body)
        self.requests.forget(seq.seq_id)
        self.stats.requests_finished += 1
        self.metrics.on_request_finished(seq.finish_reason, t.e2e_s, t.queue_s, seq.num_prompt_tokens, num_output)

    def token_bytes(self, token_ids: list[int], entries: list | None, prompt_entries: list | None,
                    prompt_ids: list[int]) -> dict[str, bytes]:
        """{str(token id): its raw bytes} for every token a DELTA/DONE names: `token_ids`, and in
        the logprob `entries` ([logprob, [[token, logprob] x k]] per sampled token) the top-k
        tokens, and for the scored prompt positions (`prompt_entries`, one per `prompt_ids`
        position, None where not scored) the prompt token and its top-k."""
        ids = set(token_ids)
        for e in entries or ():
            if e:
                ids.update(t for t, _ in e[1])
        if prompt_entries:
            for tok, e in zip(prompt_ids, prompt_entries):
                if e:
                    ids.add(tok)
                    ids.update(t for t, _ in e[1])
        return {str(i): self.tokenizer.token_bytes(i) for i in sorted(ids)}

    def finish(self, seq_id: int, reason: str, scheduler: Scheduler | None, code: ErrorCode | None = None,
               message: str = "") -> None:
        """End a request early, every choice of it: with `code`, answer ERROR `code` `message` and
        drop it; without, answer DONE with finish_reason `reason` (abort: a CANCEL)."""
        req = self.requests.get(seq_id)
        if scheduler is not None:
            scheduler.finish(seq_id, reason)
        if req is None:
            return
        for r in req.choices:
            if scheduler is not None:
                scheduler.finish(r.seq.seq_id, reason)
        if code is not None:
            self.outbox.error_to_client(req.client, req.request_id, code, message)
            self.requests.forget(seq_id)
        else:
            for r in req.choices:
                if not r.finished:
                    self._send_done(r)

    def finish_all(self, scheduler: Scheduler | None, code: ErrorCode, message: str) -> None:
        """End every request with ERROR `code` `message` (no plan came back in time)."""
        for seq_id in list(self.requests.by_seq):
            self.finish(seq_id, "error", scheduler, code, message)

    def cancel(self, client: bytes, request_id: str, scheduler: Scheduler | None) -> None:
        """CANCEL: end the client's request `request_id`, if it is still running (DONE, abort)."""
        seq_id = self.requests.find(client, request_id)
        if seq_id is not None:
            self.finish(seq_id, "abort", scheduler)

    def client_gone(self, client: bytes, scheduler: Scheduler | None) -> None:
        """A client disconnected or cannot be sent to: its requests end without an answer."""
        for seq_id in self.requests.drop_client(client):
            if scheduler is not None:
                scheduler.finish(seq_id, "abort")


def _dt(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else b - a
