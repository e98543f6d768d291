"""Input processing: a client's GENERATE becomes validated, tokenized sequences in the scheduler,
and a `Request` per choice in the request table.

A request with `n` choices is `n` sequences of one prompt (choice i samples with
`params.for_choice(i)`); they share one `Request.choices` list and are answered with one DONE.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shardline.coordinator.metrics import CoordinatorMetrics, CoordinatorStats
from shardline.coordinator.outbox import Outbox
from shardline.coordinator.scheduler import RequestTooLarge, Scheduler
from shardline.coordinator.sequence import Sequence
from shardline.coordinator.served_model import ServedModel
from shardline.coordinator.tokenizer import IncrementalDetokenizer, StopStringMatcher
from shardline import messages as M
from shardline import protocol as P
from shardline.protocol import ErrorCode, ProtocolError
from shardline.sampling import SamplingParams, check_num_logprobs


@dataclass
class Request:
    """A client's request and its output stream state (one per choice)."""

    client: bytes
    request_id: str
    seq: Sequence
    stream: bool
    detokenizer: IncrementalDetokenizer
    stop_matcher: StopStringMatcher
    num_logprobs: int
    text: str = ""
    num_tokens_emitted: int = 0  # output tokens detokenized (and, when streaming, sent in DELTAs)
    last_token_time: float | None = None  # monotonic time of the previous token (inter-token latency)
    index: int = 0  # choice index within the client's request (params.n > 1)
    choices: list["Request"] = field(default_factory=list)  # all choices of the request, shared, index order
    num_prompt_logprobs: int = 0  # top-k per prompt token (choice 0 only)
    prompt_logprobs: list | None = None  # choice 0: entry per prompt position (None at 0 and until computed)
    finished: bool = False  # this choice's sequence has ended


class RequestTable:
    """The requests being served: every choice by its sequence id, and each client request's first
    sequence id by (client routing id, request_id)."""

    def __init__(self) -> None:
        self.by_seq: dict[int, Request] = {}
        self.by_client: dict[tuple[bytes, str], int] = {}

    def add(self, choices: list[Request]) -> None:
        for r in choices:
            self.by_seq[r.seq.seq_id] = r
        head = choices[0]
        self.by_client[(head.client, head.request_id)] = head.seq.seq_id

    def get(self, seq_id: int) -> Request | None:
        return self.by_seq.get(seq_id)

    def find(self, client: bytes, request_id: str) -> int | None:
        """The first sequence id of the client's request `request_id`, or None."""
        return self.by_client.get((client, request_id))

    def forget(self, seq_id: int) -> None:
        """Drop a request (every choice) from the table."""
        req = self.by_seq.pop(seq_id, None)
        if req is not None:
            for r in req.choices:
                self.by_seq.pop(r.seq.seq_id, None)
            self.by_client.pop((req.client, req.request_id), None)

    def drop_client(self, client: bytes) -> list[int]:
        """Drop every request of a client that is gone; returns their sequence ids."""
        dropped = []
        for (c, rid), seq_id in list(self.by_client.items()):
            if c == client:
                self.by_client.pop((c, rid), None)
                req = self.by_seq.get(seq_id)
                for sid in [r.seq.seq_id for r in req.choices] if req is not None else [seq_id]:
                    self.by_seq.pop(sid, None)
                    dropped.append(sid)
        return dropped

    def unfinished(self) -> list[Sequence]:
        """The sequences not finished, by sequence id."""
        return sorted({r.seq.seq_id: r.seq for r in self.by_seq.values() if not r.seq.is_finished}.values(),
                      key=lambda s: s.seq_id)

    @property
    def num_requests(self) -> int:
        """Client requests (a request with n choices counts once)."""
        return len({id(r.choices) for r in self.by_seq.values()})

    def __len__(self) -> int:
        return len(self.by_seq)


class InputProcessor:
    """GENERATE -> checked sampling parameters, prompt token ids (from `prompt`, chat `messages` or
    `prompt_token_ids`), sequences queued in the scheduler, ACCEPTED."""

    def __init__(self, model: ServedModel, requests: RequestTable, outbox: Outbox, metrics: CoordinatorMetrics,
                 stats: CoordinatorStats):
        self.model = model
        self.tokenizer = model.tokenizer
        self.requests = requests
        self.outbox = outbox
        self.metrics = metrics
        self.stats = stats
        self._next_seq_id = 0

    def on_generate(self, client: bytes, body: M.Generate, scheduler: Scheduler | None, refusal: str | None) -> None:
        """Admit one GENERATE: answer ACCEPTED {request_id, prompt_tokens}, or ERROR UNAVAILABLE
        ("cluster not serving: `refusal`") when the cluster admits no request now (`refusal` is
        not None), or ERROR INVALID_REQUEST when the prompt can never fit.

        Raises:
            ProtocolError: INVALID_REQUEST for a bad or reused `request_id`; BAD_FRAME for a
                missing prompt or malformed `prompt_token_ids`.
            ValueError: bad sampling parameters, token ids out of the vocabulary, or a prompt too
                long to tokenize.
        """
        request_id = body.request_id
        if not 0 < len(request_id) <= 128:
            raise ProtocolError("GENERATE: request_id must be 1..128 characters", ErrorCode.INVALID_REQUEST)
        if refusal is not None:
            self.outbox.error_to_client(client, request_id, ErrorCode.UNAVAILABLE, f"cluster not serving: {refusal}")
            return
        assert scheduler is not None  # a cluster that admits requests has served
        if self.requests.find(client, request_id) is not None:
            raise ProtocolError(f"request_id {request_id!r} is already in use", ErrorCode.INVALID_REQUEST)
        params = SamplingParams.from_dict(body.params or {})
        num_logprobs = check_num_logprobs("logprobs", body.logprobs)
        num_prompt_logprobs = check_num_logprobs("prompt_logprobs", body.prompt_logprobs)
        ids = self._prompt_ids(body)
        seqs = [Sequence(self._next_seq_id + i, ids, params.for_choice(i), request_id=request_id)
                for i in range(params.n)]
        if num_prompt_logprobs:  # every prompt position must be computed to be scored
            seqs[0].use_prefix_cache = False
        try:
            for seq in seqs:
                scheduler.add(seq)
        except RequestTooLarge as exc:
            for seq in seqs:
                scheduler.finish(seq.seq_id, "abort")
            self.outbox.error_to_client(client, request_id, ErrorCode.INVALID_REQUEST, str(exc))
            return
        self._next_seq_id += params.n
        choices: list[Request] = []
        for i, seq in enumerate(seqs):
            req = Request(client, request_id, seq, body.stream,
                          IncrementalDetokenizer(self.tokenizer, ids, skip_special_tokens=True),
                          StopStringMatcher(list(params.stop), params.include_stop_str_in_output), num_logprobs,
                          index=i, choices=choices)
            if i == 0 and num_prompt_logprobs:
                req.num_prompt_logprobs = num_prompt_logprobs
                req.prompt_logprobs = [None] * len(ids)
            choices.append(req)
        self.requests.add(choices)
        self.stats.requests_total += 1
        self.stats.prompt_tokens_total += len(ids)
        self.metrics.on_request_accepted(len(ids))
        self.outbox.to_client(client, M.Accepted(request_id=request_id, prompt_tokens=len(ids)))

    def _prompt_ids(self, body: M.Generate) -> list[int]:
        """The prompt's token ids: `prompt_token_ids` as given, else the chat template applied to
        `messages`, else `prompt`, tokenized.

        Raises:
            ProtocolError: BAD_FRAME for no prompt at all, or packed ids of a bad length.
            ValueError: ids out of the vocabulary, a text too long to fit the context.
        """
        if body.prompt_token_ids is not None:
            ids = P.unpack_ids(body.prompt_token_ids)
            vocab_size = self.model.spec.vocab_size
            if any(not 0 <= i < vocab_size for i in ids):
                raise ValueError(f"prompt_token_ids: ids must be in [0, {vocab_size})")
            return ids
        if body.messages is not None:
            messages = [{"role": m.role, "content": m.content} for m in body.messages]
            return self.tokenizer.encode(self._checked_text(
                self.tokenizer.apply_chat_template(messages, add_generation_prompt=True), "messages"))
        if body.prompt is None:
            raise ProtocolError("GENERATE: no prompt (give `prompt`, `messages` or `prompt_token_ids`)")
        return self.tokenizer.encode(self._checked_text(body.prompt, "prompt"))

    def _checked_text(self, text: str, field: str) -> str:
        """`text` if it can fit the context; else ValueError without tokenizing it. Tokenizing
        runs on the event loop (~2 us a character, up to ~16 s for a 9 MB prompt of one
        repeated digit), during which no heartbeat is read: a huge prompt must be refused by
        its length alone (`Tokenizer.max_chars_for`)."""
        max_model_len = self.model.max_model_len
        limit = self.tokenizer.max_chars_for(max_model_len)
        if len(text) > limit:
            raise ValueError(f"{field}: {len(text)} characters cannot fit the maximum sequence length of "
                             f"{max_model_len} tokens (no token covers more than "
                             f"{self.tokenizer.max_token_chars} characters)")
        return text
