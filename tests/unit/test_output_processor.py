"""The input and output processors without sockets: GENERATE -> sequences; sampled tokens -> DELTA
and DONE (stop strings, n > 1 choices answered by one DONE, token bytes), cancel, a client gone.

The processors are built alone here, on a real scheduler and the packaged model's tokenizer; a
"step" schedules, samples the given tokens and hands the new tokens to the output processor, as
the dispatcher and the serving loop do."""

from __future__ import annotations

import msgspec
import pytest

from shardline import messages as M
from shardline import protocol as P
from shardline.coordinator.input_processor import InputProcessor, RequestTable
from shardline.coordinator.metrics import CoordinatorMetrics, CoordinatorStats
from shardline.coordinator.outbox import RecordingOutbox
from shardline.coordinator.output_processor import OutputProcessor
from shardline.protocol import ErrorCode, MsgType, ProtocolError
from tests.fake_cluster import served_model
from tests.helpers import make_scheduler

CLIENT = b"client-1"


class Processors:
    """An input and an output processor over one request table, scheduler and recording outbox."""

    def __init__(self, num_blocks: int = 256, max_model_len: int = 1 << 20, lookahead: bool = False):
        self.model = served_model()
        self.outbox = RecordingOutbox()
        self.requests = RequestTable()
        self.stats = CoordinatorStats()
        metrics = CoordinatorMetrics(self.model.model_id, self.model.max_model_len)
        self.input = InputProcessor(self.model, self.requests, self.outbox, metrics, self.stats)
        self.output = OutputProcessor(self.model.tokenizer, self.requests, self.outbox, metrics, self.stats)
        self.scheduler = make_scheduler(num_blocks=num_blocks, block_size=16, max_num_batched_tokens=256,
                                        max_model_len=max_model_len, eos_token_id=self.model.spec.eos_token_id,
                                        lookahead=lookahead)
        self.outbox.on_client_gone = lambda client: self.output.client_gone(client, self.scheduler)

    def generate(self, request_id: str, prompt: str = "Say it", stream: bool = True, client: bytes = CLIENT,
                 **body) -> list[int]:
        """GENERATE (`body`: further fields, as the wire carries them); returns the seq ids of its choices."""
        body = msgspec.convert({"request_id": request_id, "prompt": prompt, "stream": stream, **body}, M.Generate)
        self.input.on_generate(client, body, self.scheduler, None)
        return sorted(sid for sid, r in self.requests.by_seq.items() if r.request_id == request_id)

    def step(self, tokens: dict[int, int], logprobs: dict[int, list] | None = None) -> None:
        """One step: every scheduled sequence that samples gets tokens[seq id]."""
        out = self.scheduler.schedule()
        assert out is not None
        sampled = {s.seq.seq_id: tokens[s.seq.seq_id] for s in out.scheduled if s.sample}
        for sid, lp in (logprobs or {}).items():
            self.scheduler.seqs[sid].output_logprobs.append(lp)
        for seq in self.scheduler.update(out, sampled):
            self.output.emit(seq, self.scheduler)

    def sent(self, msg_type: MsgType, client: bytes = CLIENT) -> list[M.Message]:
        return self.outbox.to(client, msg_type)


@pytest.fixture
def p() -> Processors:
    return Processors()


def test_text_streams_until_a_stop_string_which_is_held_back(p):
    tok = p.model.tokenizer
    ids = tok.encode(" Hello world. STOP here and more")
    (sid,) = p.generate("r1", params={"max_tokens": 64, "stop": ["STOP"]})
    for t in ids:
        if p.requests.get(sid) is None:
            break
        p.step({sid: t})
    (done,) = p.sent(MsgType.DONE)
    assert (done.text, done.finish_reason, done.stop_reason) == (" Hello world. ", "stop", "STOP")
    deltas = p.sent(MsgType.DELTA)
    assert "".join(d.text for d in deltas) == done.text and all(d.index == 0 for d in deltas)
    sent_ids = P.unpack_ids(done.token_ids)
    assert sent_ids == ids[: len(sent_ids)] and "STOP" in tok.decode(sent_ids) and "STOP" not in tok.decode(sent_ids[:-1])
    assert [i for d in deltas for i in P.unpack_ids(d.token_ids)] == sent_ids
    assert p.scheduler.seqs == {} and len(p.requests) == 0 and p.stats.requests_finished == 1
    assert p.stats.generation_tokens_total == len(sent_ids)


@pytest.mark.parametrize("max_tokens", [2, 8])
def test_two_results_of_one_sequence_before_its_output_is_emitted(max_tokens):
    """Async scheduling keeps a sequence's step and its continuation in flight; both results can
    be read in one pass of the inbox, listing the sequence twice before its output is emitted.
    Every token goes out once, in order, whether or not the second one ends the sequence."""
    p = Processors(lookahead=True)
    (sid,) = p.generate("r1", params={"max_tokens": max_tokens})
    first, second = p.scheduler.schedule(), p.scheduler.schedule()
    assert second.scheduled[0].prev_step == first.step_id
    pending = p.scheduler.update(first, {sid: 100}) + p.scheduler.update(second, {sid: 101})
    assert [s.seq_id for s in pending] == [sid, sid]
    for seq in pending:
        p.output.emit(seq, p.scheduler)
    deltas = p.sent(MsgType.DELTA)
    assert [P.unpack_ids(d.token_ids) for d in deltas] == [[100, 101]]
    assert deltas[0].text == p.model.tokenizer.decode([100, 101]) and p.stats.generation_tokens_total == 2
    if max_tokens == 2:
        (done,) = p.sent(MsgType.DONE)
        assert done.text == deltas[0].text and done.finish_reason == "length"


def test_include_stop_str_in_output_keeps_it(p):
    ids = p.model.tokenizer.encode(" one two three")
    (sid,) = p.generate("r1", stream=False, params={"max_tokens": 64, "stop": [" two"],
                                                    "include_stop_str_in_output": True})
    for t in ids:
        if p.requests.get(sid) is None:
            break
        p.step({sid: t})
    assert p.sent(MsgType.DELTA) == []  # not streamed: one DONE
    (done,) = p.sent(MsgType.DONE)
    assert done.text == " one two" and done.finish_reason == "stop"


def test_n_choices_share_one_done_sent_when_the_last_ends(p):
    eos = p.model.spec.eos_token_id
    first, second = p.generate("r1", params={"n": 2, "max_tokens": 3, "seed": 5})
    assert p.requests.get(first).choices is p.requests.get(second).choices
    p.step({first: 100, second: 200})
    p.step({first: 101, second: eos})  # choice 1 ends on EOS
    assert p.sent(MsgType.DONE) == [] and p.requests.get(second).finished
    p.step({first: 102})  # choice 0 ends at max_tokens: now the request is done
    (done,) = p.sent(MsgType.DONE)
    choices = done.choices
    assert [c.index for c in choices] == [0, 1] and done.text == choices[0].text
    assert done.text == p.model.tokenizer.decode([100, 101, 102])
    assert [c.finish_reason for c in choices] == ["length", "stop"] and choices[1].stop_reason == eos
    assert P.unpack_ids(choices[1].token_ids) == [200, eos] and P.unpack_ids(done.token_ids) == [100, 101, 102]
    assert done.usage.completion_tokens == 5 and done.usage.prompt_tokens > 0
    assert [d.index for d in p.sent(MsgType.DELTA)] == [0, 1, 0, 1, 0]
    assert p.stats.requests_finished == 1 and len(p.requests) == 0


def test_cancel_ends_every_choice_with_abort_and_drops_late_tokens(p):
    a, b = p.generate("r1", params={"n": 2, "max_tokens": 8})
    p.step({a: 100, b: 101})
    p.output.cancel(CLIENT, "r1", p.scheduler)
    (done,) = p.sent(MsgType.DONE)
    assert done.finish_reason == "abort" and [c.finish_reason for c in done.choices] == ["abort", "abort"]
    assert done.text == p.model.tokenizer.decode([100])
    assert len(p.requests) == 0 and p.scheduler.schedule().freed_seq_ids == [a, b]
    p.output.cancel(CLIENT, "r1", p.scheduler)  # already gone: nothing more is sent
    assert len(p.outbox.client_messages) == len(p.sent(MsgType.ACCEPTED)) + len(p.sent(MsgType.DELTA)) + 1


def test_finish_with_an_error_answers_error_and_forgets(p):
    (sid,) = p.generate("r1")
    p.output.finish(sid, "error", p.scheduler, ErrorCode.UNAVAILABLE, "no worker plan within 5 s (x)")
    assert p.sent(MsgType.ERROR) == [P.error(ErrorCode.UNAVAILABLE, "no worker plan within 5 s (x)",
                                             request_id="r1")]
    assert p.sent(MsgType.DONE) == [] and len(p.requests) == 0 and p.scheduler.schedule() is None


def test_a_client_found_gone_loses_its_requests(p):
    (sid,) = p.generate("r1", client=b"gone")
    (other,) = p.generate("r2")
    p.outbox.gone_clients.add(b"gone")
    p.step({sid: 100, other: 100})  # its DELTA cannot be sent
    assert p.requests.get(sid) is None and p.requests.get(other) is not None
    assert p.outbox.to(b"gone") == [M.Accepted(request_id="r1", prompt_tokens=2)]  # only what was sent before
    assert p.scheduler.schedule().freed_seq_ids == [sid]


def test_logprobs_come_with_the_bytes_of_every_token_they_name(p):
    tok = p.model.tokenizer
    (sid,) = p.generate("r1", logprobs=2, params={"max_tokens": 1})
    p.step({sid: 100}, logprobs={sid: [-0.1, [[100, -0.1], [2, -2.5]]]})
    (delta,) = p.sent(MsgType.DELTA)
    assert delta.logprobs == [(-0.1, [(100, -0.1), (2, -2.5)])]
    assert delta.token_bytes == {"2": tok.token_bytes(2), "100": tok.token_bytes(100)}
    (done,) = p.sent(MsgType.DONE)
    assert done.token_bytes == delta.token_bytes and done.logprobs == delta.logprobs


# ---- input ------------------------------------------------------------------------------------


def test_generate_is_accepted_with_its_prompt_length(p):
    ids = p.model.tokenizer.encode("Say it")
    (sid,) = p.generate("r1")
    assert p.sent(MsgType.ACCEPTED) == [M.Accepted(request_id="r1", prompt_tokens=len(ids))]
    assert p.scheduler.seqs[sid].prompt_token_ids == ids and p.stats.requests_total == 1
    (chat,) = p.generate("r2", prompt=None, messages=[{"role": "user", "content": "Say it"}])
    assert len(p.scheduler.seqs[chat].prompt_token_ids) > len(ids)  # the chat template's tokens too
    (given,) = p.generate("r3", prompt=None, prompt_token_ids=P.pack_ids([5, 6, 7]))
    assert p.scheduler.seqs[given].prompt_token_ids == [5, 6, 7]


def test_generate_refusals(p):
    p.input.on_generate(CLIENT, M.Generate(request_id="r0", prompt="x"), p.scheduler, "recovering: worker w1 lost")
    assert p.sent(MsgType.ERROR)[-1] == P.error(ErrorCode.UNAVAILABLE,
                                                "cluster not serving: recovering: worker w1 lost", request_id="r0")
    p.generate("r1")
    with pytest.raises(ProtocolError, match="already in use"):
        p.generate("r1")
    with pytest.raises(ProtocolError, match="1..128"):
        p.generate("x" * 129)
    with pytest.raises(ValueError, match=r"ids must be in \[0, 49152\)"):
        p.generate("r2", prompt=None, prompt_token_ids=P.pack_ids([49152]))
    with pytest.raises(ValueError, match="max_tokens"):
        p.generate("r3", params={"max_tokens": 0})
    small = Processors(num_blocks=2)  # a pool of 32 tokens
    small.generate("r4", prompt="word " * 40)
    err = small.sent(MsgType.ERROR)[-1]
    assert err.code == ErrorCode.INVALID_REQUEST and "exceeds the maximum sequence length" in err.message
    assert small.scheduler.seqs == {} and len(small.requests) == 0
